"""Same heads, different root (issue 11): the mechanisms the crash chaos profile found, each
reproduced on a small cluster under `autojump_clock`.

Two replicas that applied the same deltas hold the same state; a node that counts a delta
applied without its effects reports the same heads as its peers and a different root, and
only an unsigned tree comparison can repair that (which a read-only or removed member's
node cannot push, and which joins records no later removal can take back).
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from trionode.testing import open_cluster

from .cluster_helpers import call, metric, share, wait_converged, write

AHEAD = 60.0
"""Seconds node A's wall clock leads B's: beyond `sync.max_clock_drift` (5 s), within the
pending timeout (300 s), so A's deltas wait on B for B's clock."""


async def test_a_delta_waiting_for_the_clock_is_not_taken_as_applied_by_a_sync(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """B holds A's newest delta pending (stamped ahead of B's clock) when a sync session
    with A starts: every head of A's is known here and none is missing, so the session
    used to drop B's superseded head by adopting A's heads as checkpoints, which counted
    the pending delta applied as if its records had come as state. B then reported A's
    heads with a different root (a divergence the crash profile logged a thousand times
    per seed, repaired only by tree comparison). Now it waits, and applies the delta when
    B's clock allows: converged by deltas alone, no divergence."""
    async with open_cluster(2, tmp_path, clock_skews=[AHEAD, 0.0]) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])
        delta = await write(a, context, "set", key="late", value="v")
        await cluster.settle()  # gossip delivered; no timer (the wait for B's clock) fired
        assert (await b.contexts.state(context))[2] == 1, "A's delta waits on B"

        await b.sync.sync_now(context, cluster.peer_ids[0])

        _, heads, pending = await b.contexts.state(context)
        assert delta not in await b.contexts.applied(context, [delta])
        assert delta not in heads
        assert pending == 1
        assert await call(b, context, "get", key="late") is None

        await wait_converged(cluster, [a, b], context)
        assert await call(b, context, "get", key="late") == "v"
        for node in (a, b):
            assert metric(node, "trionode_sync_divergence_total") == 0
            assert metric(node, "trionode_sync_records_total", direction="pulled") == 0
