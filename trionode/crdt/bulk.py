"""Bulk decoding with the cyclic garbage collector paused.

A snapshot page, a build of the final state or a restart decodes thousands of records at
once, and every one of them survives: the tree keeps it. Each record is a handful of
tracked objects (the entity, its stamps, its body), so CPython's collector runs its young
generation every ~100 records and, as the survivors pile up, re-traverses the whole
growing heap in its older generations, none of which frees anything: measured, that was
about 40 % of the time a page of `kv_store` records took to decode. Pausing it for one
bounded, synchronous step (a page, never across an `await`) lets the records be counted
once when it resumes; records hold no reference cycles, so nothing waits longer for
memory than that one step.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection inside the block (one bounded, synchronous bulk step). Nested
    or already paused: leaves the collector as it found it."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
