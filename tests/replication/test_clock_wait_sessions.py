"""A peer's heads that wait here for our clock (stamped ahead of it) start no sync session:
the wait knows when they apply, and a session would fetch nothing. Heartbeats used to start
one every `sync.heartbeat` until the clock allowed (issue #17)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.node import Node
from trionode.testing import open_cluster

from .cluster_helpers import call, share, wait_converged, write

AHEAD = 60.0
"""Seconds A's wall clock leads B's: beyond `sync.max_clock_drift` (5 s), within the pending
timeout (300 s), so A's deltas wait on B for B's clock."""

HEARTBEAT = 2.0


def _beats_only(file: FileConfig) -> FileConfig:
    """Heartbeats every 2 s; no interval ticks within the test."""
    return replace(file, sync=replace(file.sync, heartbeat=HEARTBEAT, interval=10_000.0))


def _sessions(node: Node) -> float:
    """Sync sessions `node` ran, whatever their protocol and outcome."""
    return sum(
        sample.value
        for metric in node.sync.metrics.sessions.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def test_heads_waiting_for_our_clock_start_no_session(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(
        2, tmp_path, clock_skews=[AHEAD, 0.0], configure=_beats_only
    ) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])
        await wait_converged(cluster, [a, b], context)
        await write(a, context, "set", key="late", value="v")
        await cluster.settle()  # gossip delivered; B's clock wait has not fired
        assert (await b.contexts.state(context))[2] == 1, "A's delta waits on B"
        before = _sessions(b)
        await trio.sleep(AHEAD - 10.0)  # some 25 of A's heartbeats name the waiting head
        assert _sessions(b) == before
        await wait_converged(cluster, [a, b], context)  # and the wait applies it in time
        assert await call(b, context, "get", key="late") == "v"
        assert _sessions(b) == before
