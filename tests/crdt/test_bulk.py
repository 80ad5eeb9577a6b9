"""`collector_paused`: no cyclic collection inside a bulk step, the collector as it was
after it (an error included), and nested or already-paused steps leave it alone."""

from __future__ import annotations

import gc
import weakref

import pytest

from trionode.crdt.bulk import collector_paused, freeze_heap, records_kept, thaw_heap


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


def _frozen(*objects: object) -> list[bool]:
    """Whether each object sits in the permanent generation. The frozen count alone cannot
    say: a frozen object that another thread or a finaliser frees leaves it by refcount,
    and the freeze takes the whole heap, so the count moves without the step."""
    seen = {id(o) for o in gc.get_objects()}  # (generations 0-2: never the frozen ones)
    return [gc.is_tracked(o) and id(o) not in seen for o in objects]


class _Node:
    """A tracked object that can sit in a reference cycle and be watched (weakref)."""

    def __init__(self) -> None:
        self.other: object = None


def test_a_kept_step_freezes_what_it_made_while_a_snapshot_is_taken() -> None:
    assert gc.get_freeze_count() == 0  # (the test process froze nothing)
    with records_kept():
        dead = _Node()
        dead.other = dead  # a cycle that died before the step: collected, not frozen
        watch = weakref.ref(dead)
        del dead
        with collector_paused(kept=True):
            assert watch() is None
            kept = [_Node() for _ in range(100)]
        assert all(_frozen(*kept))
        refused: list[_Node] = []

        def bad_page() -> None:
            refused.extend(_Node() for _ in range(100))
            raise ValueError("bad page")

        with pytest.raises(ValueError, match="bad page"), collector_paused(kept=True):
            bad_page()
        assert not any(_frozen(*refused))  # (a step that raises freezes nothing)
        with collector_paused():  # (not kept: nothing more frozen)
            also = [_Node() for _ in range(100)]
        assert not any(_frozen(*also))
        assert gc.isenabled()
    # Nothing was frozen before: everything is back in the collector's sight.
    assert gc.get_freeze_count() == 0
    assert len(also) == 100


def test_a_kept_step_outside_a_snapshot_freezes_nothing() -> None:
    with collector_paused(kept=True):
        made = [_Node() for _ in range(10)]
    assert gc.get_freeze_count() == 0
    assert len(made) == 10


def test_a_process_that_keeps_its_heap_frozen_keeps_it_after_a_snapshot() -> None:
    """A started node froze its startup heap (`cli_node.freeze_startup_heap`): a snapshot
    leaves its records frozen with it rather than thawing both."""
    freeze_heap()
    try:
        with records_kept(), records_kept(), collector_paused(kept=True):  # (nested)
            made = [_Node() for _ in range(50)]
        assert all(_frozen(*made))
        assert gc.get_freeze_count() > 0
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0
    # Thawed, the process has nothing frozen for good: the next snapshot thaws its own.
    with records_kept():
        with collector_paused(kept=True):
            more = [_Node() for _ in range(50)]
        assert all(_frozen(*more))
    assert gc.get_freeze_count() == 0
