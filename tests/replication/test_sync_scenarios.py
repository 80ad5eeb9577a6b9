"""SCENARIOS 12-15: partitions heal, lost gossip is recovered, chains and meshes fill in, and
the sync limiter holds — on `open_cluster` under `autojump_clock`, no manual action."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.testing import open_cluster

from .cluster_helpers import call, share, wait_converged, write


def _limited(file: FileConfig) -> FileConfig:
    # Tick-driven sessions only (not one per re-subscription at the heal), so that ten
    # contexts' sessions pile up against the limit.
    sync = replace(file.sync, max_concurrent=2, interval=3.0, min_interval=1.0, on_join=False)
    return replace(file, sync=sync)


async def test_12_partition_heals_by_itself(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(3, tmp_path) as cluster:
        a, b, c = cluster.nodes
        context = await share(cluster, [0, 1, 2], app="chat")
        await cluster.partition([0], [1, 2])
        for i in range(3):
            await write(a, context, "post", text=f"a{i}")
            await write(b, context, "post", text=f"b{i}")
            await write(c, context, "post", text=f"c{i}")
        await cluster.heal()
        # No manual sync: heartbeats and sync ticks converge everyone.
        await wait_converged(cluster, [a, b, c], context)
        assert await call(a, context, "count") == 9


async def test_13_delta_published_without_peers_reaches_everyone_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(3, tmp_path) as cluster:
        a, b, c = cluster.nodes
        context = await share(cluster, [0, 1, 2], app="chat")
        await cluster.partition([0], [1, 2])  # a has no peer on the topic now
        lost = await write(a, context, "post", text="nobody heard this")
        assert await b.contexts.read_delta(context, lost) is None
        await cluster.heal()
        await wait_converged(cluster, [a, b, c], context)
        assert await b.contexts.read_delta(context, lost) is not None
        assert await c.contexts.read_delta(context, lost) is not None


async def test_14_chain_with_unique_data_fills_in(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(3, tmp_path, connect="chain") as cluster:  # a - b - c
        a, b, c = cluster.nodes
        context = await share(cluster, [0, 1, 2], app="kv_store")
        await cluster.partition([0], [1, 2])
        await cluster.partition([0, 1], [2])
        for node, name in ((a, "a"), (b, "b"), (c, "c")):
            for i in range(4):
                await write(node, context, "set", key=f"{name}{i}", value=name)
        await cluster.heal()
        await wait_converged(cluster, [a, b, c], context)
        entries = await call(c, context, "entries")
        assert {k for k in entries if k[0] in "abc"} == {f"{n}{i}" for n in "abc" for i in range(4)}


async def test_15_sync_limit_holds_across_ten_contexts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(3, tmp_path, configure=_limited) as cluster:
        a, b, c = cluster.nodes
        contexts = [await share(cluster, [0, 1, 2], app="chat") for _ in range(10)]
        await cluster.partition([0], [1, 2])
        for context in contexts:
            await write(a, context, "post", text="while apart")
            await write(b, context, "post", text="on the other side")
        await cluster.heal()
        for context in contexts:
            await wait_converged(cluster, [a, b, c], context)
        peaks = [node.sync.metrics.peak_in_use for node in cluster.nodes]
        assert max(peaks) == 2  # sessions overlapped, never more than max_concurrent at once
        for context in contexts:
            assert await call(c, context, "count") == 2
