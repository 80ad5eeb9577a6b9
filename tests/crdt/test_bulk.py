"""`collector_paused`: no cyclic collection inside a bulk step, the collector as it was
after it (an error included), and nested or already-paused steps leave it alone."""

from __future__ import annotations

import gc

import pytest

from trionode.crdt.bulk import collector_paused


def test_the_collector_is_off_inside_and_back_on_after_even_after_an_error() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner step does not resume it early
    assert gc.isenabled()
    with pytest.raises(ValueError, match="bad page"), collector_paused():
        raise ValueError("bad page")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
