"""A replica loads its state rows page by page (`ReplicaStore._state_tree`, decoded on the
event loop a read at a time): with pages far smaller than the state, a restarted node reads
back exactly the state it wrote: every entry, and the same root."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from tests.replication.cluster_helpers import LIMIT, call, share, write
from trionode.context import replicas
from trionode.store.lmdb_store import Column
from trionode.testing import open_cluster


@pytest.mark.parametrize("page", [1, 2, 4])
async def test_a_restart_reads_the_state_back_in_small_pages(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    page: int,
) -> None:
    monkeypatch.setattr(replicas, "LOAD_PAGE", page)
    with trio.fail_after(LIMIT):
        async with open_cluster(1, tmp_path, restartable=True) as cluster:
            (node,) = cluster
            context = await share(cluster, [0], "kv_store")
            for i in range(13):
                await write(node, context, "set", key=f"k{i:02}", value="v" * i)
            root = (await node.contexts.state(context))[0]
            rows = await node.contexts.replicas.store.raw_scan(Column.STATE, prefix=context)
            assert len(rows) > 2 * page  # the load below crosses page boundaries
            await cluster.crash(0)
            node = await cluster.restart(0)
            assert (await node.contexts.state(context))[0] == root
            for i in range(13):
                assert await call(node, context, "get", key=f"k{i:02}") == "v" * i
