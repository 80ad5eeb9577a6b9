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

from trionode.node import Node
from trionode.testing import open_cluster

from .cluster_helpers import call, metric, share, wait_converged, write
from .test_sync_protocols import quiet, sessions

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


async def test_a_covered_delta_the_source_filtered_is_judged_not_assumed_accepted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """B adopts A's heads as checkpoints (as a tree comparison does once B holds A's state
    as of them) while B holds one of them pending: C's write w1, which A filtered (A
    removed C concurrently). The adoption covers w1: applied, its body kept. It used to be
    marked accepted without a verdict of its own, so the next rebuild on B (here: A demotes
    B concurrently with B's own write) joined w1's records, which A never shows: same
    heads, different root. Now w1 is judged once the ops it is covered with are in."""
    async with open_cluster(3, tmp_path, configure=quiet) as cluster:
        a, b, c = cluster.nodes
        context = await share(cluster, [0, 1, 2])
        await cluster.partition([0])
        await cluster.partition([1], [2])  # each node alone: deltas go where the test says
        w0 = await write(c, context, "set", key="c0", value="x")
        w1 = await write(c, context, "set", key="c1", value="y")
        wb = await write(b, context, "set", key="b0", value="z")
        c_key, _ = await c.contexts.member_key(context)
        b_key, _ = await b.contexts.member_key(context)
        await a.contexts.change_members(context, [(c_key, None)])  # concurrent with w0, w1
        for delta in (w0, w1):
            await a.contexts.receive(context, await wire(c, context, delta))
        assert await call(a, context, "get", key="c1") is None  # filtered on A
        await b.contexts.receive(context, await wire(c, context, w1))
        assert (await b.contexts.state(context))[2] == 1  # pending: B lacks w0

        _, heads, _ = await a.contexts.state(context)
        assert w1 in heads
        ops, vvs = await a.contexts.auth_export(context, heads)
        await b.contexts.adopt_auth(context, ops, vvs)
        await b.contexts.adopt_heads(context, heads)
        assert await b.contexts.applied(context, [w1]) == {w1}

        demotion = await a.contexts.change_members(context, [(b_key, "read-only")])
        await b.contexts.receive(context, demotion.encode())  # wb is filtered: B rebuilds
        await a.contexts.receive(context, await wire(b, context, wb))
        assert await call(b, context, "get", key="b0") is None
        assert await call(b, context, "get", key="c1") is None
        assert await call(b, context, "entries") == await call(a, context, "entries")
        assert await a.contexts.state(context) == await b.contexts.state(context)


async def wire(node: Node, context: bytes, delta_id: bytes) -> bytes:
    data = await node.contexts.read_delta(context, delta_id)
    assert data is not None
    return data


async def test_a_delta_sync_that_leaves_deltas_waiting_for_the_clock_needs_no_tree_comparison(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """B missed A's delta (partitioned) and fetches it in a delta sync, but it is stamped
    ahead of B's clock, so it waits there. The session counted that as a gap delta sync
    could not close and ran a tree comparison, which failed on A's records stamped ahead
    (or, where it got that far, joined unsigned state of non-final deltas for good). Now
    the session ends there, and the delta applies once B's clock allows."""
    async with open_cluster(2, tmp_path, clock_skews=[AHEAD, 0.0], configure=quiet) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])
        await cluster.partition([0])
        delta = await write(a, context, "set", key="late", value="v")
        await trio.sleep(10)  # past gossip's message cache: B never hears of it
        await cluster.heal()
        assert await b.contexts.unknown(context, [delta]) == {delta}

        await b.sync.sync_now(context, cluster.peer_ids[0])

        assert sessions(b, "delta") == 1
        assert sessions(b, "tree") == sessions(b, "tree", "failed") == 0
        assert (await b.contexts.state(context))[2] == 1  # fetched, waiting for the clock
        await wait_converged(cluster, [a, b], context)
        assert await call(b, context, "get", key="late") == "v"
        assert metric(b, "trionode_sync_records_total", direction="pulled") == 0
