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

Counted once is still once too many while a snapshot streams in: each page's records
were traversed by the young collection that ran as the collector resumed, again by the
middle one, and the whole growing state by every full one (a joiner taking 100,000
records, gc callbacks, load 8: 0.8-1.1 s in collections over its life, 0.2-0.35 s with
what follows). So while a snapshot is taken (`records_kept`), a step that keeps what it
makes (`collector_paused(kept=True)`) starts with a collection of the two younger
generations (any cycle that died since the last step: the objects made meanwhile, a few
hundred) and ends by freezing what is alive (`gc.freeze`: a splice of lists, no
traversal): its records are never traversed at all, as a started node keeps its startup
heap (`cli_node.freeze_startup_heap`). (The collection used to end the step, and
traversed the page it had just made, some 4,000 records: 2-6 ms a page, loaded.) Such a
step must make no reference cycle, which would be frozen with the records and never
collected: records hold none, and a step that raises freezes nothing. A process that did
not freeze its heap for good before the snapshot (`freeze_heap`: a started node does; a
test's does not) gets everything back into the oldest generation when it ends. An object
alive at a freeze that later dies in a reference cycle is not collected (anything else is
freed by its count, frozen or not): the price `gc.freeze` always has
(tests/replication/test_join_soak.py: none in a node's joins).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_keeping = 0
"""Snapshots being taken (`records_kept`): while any is, kept steps freeze."""
_thaw = False
"""The heap was not frozen for good when the first of them began: unfreeze after the last."""
_heap_frozen = False
"""The process keeps its heap frozen for good (`freeze_heap`: a started node)."""


def freeze_heap() -> None:
    """Collect once, then keep everything alive now out of the collector's sight for good
    (`gc.freeze`): a started node's startup heap (`cli_node.freeze_startup_heap`). Snapshots
    taken afterwards leave what they freeze frozen with it (`records_kept`); `thaw_heap`
    undoes both. (Known from this flag, not from `gc.get_freeze_count()`, which walks every
    frozen object: ~95,000 in a started node, 25 ms at the start of every join.)"""
    global _heap_frozen  # noqa: PLW0603 (one collector per process, one flag)
    gc.collect()
    gc.freeze()
    _heap_frozen = True


def thaw_heap() -> None:
    """Back into the collector's sight: everything `freeze_heap` and snapshots froze."""
    global _heap_frozen  # noqa: PLW0603 (one collector per process, one flag)
    gc.unfreeze()
    _heap_frozen = False


@contextmanager
def collector_paused(*, kept: bool = False) -> Iterator[None]:
    """No cyclic collection inside the block (one bounded, synchronous bulk step). Nested
    or already paused: leaves the collector as it found it. `kept`: what the block makes
    is kept (a snapshot's records), and it makes no reference cycle: while a snapshot is
    taken (`records_kept`), the block starts with a collection of the younger generations
    and its end freezes what it made, never traversed (module doc); a block that raises
    freezes nothing."""
    if not gc.isenabled():
        yield
        return
    freezes = kept and _keeping
    gc.disable()
    try:
        if freezes:
            gc.collect(1)
        yield
    except BaseException:
        gc.enable()
        raise
    if freezes:
        gc.freeze()
    gc.enable()


@contextmanager
def records_kept() -> Iterator[None]:
    """A snapshot is taken inside: its kept steps freeze what they made (module doc)."""
    global _keeping, _thaw  # noqa: PLW0603 (one collector per process, one count)
    if not _keeping:
        _thaw = not _heap_frozen
    _keeping += 1
    try:
        yield
    finally:
        _keeping -= 1
        if not _keeping and _thaw:
            gc.unfreeze()
