"""Many joins in one process: what a join freezes (`crdt/bulk.py`: while a snapshot is
taken, each page's records are frozen out of the collector's sight) does not pile up in a
node, which keeps its startup heap frozen (`cli_node.freeze_startup_heap`) and so keeps
frozen whatever a page's freeze caught. A frozen object that later dies in a reference
cycle is never collected (the price of `gc.freeze`): if anything alive at a page's freeze
(the stream's tasks, its machine, a replica dropped later) died that way, every join
would leave it behind for good, and the process's memory would grow join by join.

(A node is its process: these nodes start before the freeze, as a node's services do. A
node that closes inside a process that froze it leaves its cycles frozen, whatever
froze them; that is the test process's concern, not a node's.)"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.replication.test_sync_protocols import (
    LIMIT,
    converged,
    create,
    fold_now,
    folding,
    join,
    put,
    sessions,
)
from trionode.crdt.bulk import freeze_heap, thaw_heap
from trionode.testing import open_cluster

pytestmark = [pytest.mark.trio, pytest.mark.slow]

ROUNDS = 10
ENTRIES = 40


def _rss() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


async def test_joins_one_after_another_leave_nothing_dead_frozen(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT * ROUNDS):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            c.sync.snapshot_page_records = 4  # many pages: a freeze each
            freeze_heap()  # as a started node does
            try:
                sizes: list[int] = []
                for i in range(ROUNDS):
                    context = await create(a)
                    for k in range(ENTRIES):
                        await put(a, context, f"k{k:02}")
                    await fold_now(cluster)
                    frozen = gc.get_freeze_count()
                    await join(cluster, 0, 1, context)
                    assert sessions(c, "snapshot") == i + 1
                    assert gc.get_freeze_count() > frozen  # (the pages were frozen)
                    await converged(cluster, [a, c], context)
                    await c.contexts.leave(context)
                    await converged(cluster, [a, c], context)
                    gc.collect()
                    sizes.append(_rss())
                gc.collect()  # (what died unfrozen since: not this count's)
            finally:
                thaw_heap()
            # What the freezes kept of what died since: found only now, none per join.
            dead_frozen = gc.collect()
            assert dead_frozen < ENTRIES, dead_frozen
            # Memory grows by the contexts' state alone (a few kB a round), not per page.
            assert sizes[-1] - sizes[1] < 16 * 1024 * 1024, sizes
