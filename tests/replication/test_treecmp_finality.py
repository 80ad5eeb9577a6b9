"""Tree comparison carries only final state unsigned (issue #10, reference
local-first-auth.md §5.5): the hostile case on a cluster, and a folded gap repaired through
the final tree. The machine itself is tested in memory in tests/sync/test_treecmp.py."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.replication.cluster_helpers import LIMIT, call, metric, share, wait_converged
from tests.replication.test_authorization import forged_set, member_id
from tests.replication.test_sync_protocols import fold_now, folding, quiet, sessions
from trionode.auth.model import Verdict, tag
from trionode.context.folding import fold_all
from trionode.node import Node
from trionode.testing import open_cluster


async def verdict(node: Node, context: bytes, delta_id: bytes) -> Verdict | None:
    return (await node.contexts.replica(context)).authority.verdicts.get(delta_id)


async def test_a_non_final_record_a_removal_filters_never_sticks_through_tree_comparison(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """B applies the victim's write while A, cut off from B, removes the victim (the write
    is concurrent with the removal, so it is filtered once both are known). Tree comparisons
    both ways (delta sync limited to nothing, so the sessions walk the trees) must not carry
    the write's record as unsigned state: on the old protocol B pushed it to A, where it
    joined the base rows and stayed after the removal filtered its delta."""
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=quiet) as cluster:
            a, b, victim = cluster
            context = await share(cluster, [0, 1, 2])
            gone = await member_id(victim, context)
            before = (await a.contexts.state(context))[1]
            write = await forged_set(a, victim, context, "late", "x", parents=before)
            await cluster.partition([0])
            await b.contexts.receive(context, write.encode())
            assert (await call(b, context, "entries")).get("late") == "x"
            await a.contexts.remove_member(context, gone)
            await trio.sleep(10)  # past gossip's message cache: the removal stays with A
            await cluster.heal()
            await cluster.partition([2])

            b.sync.max_delta_rounds = 0
            await b.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(b, "tree") == 1
            a.sync.max_delta_rounds = 0
            await a.sync.sync_now(context, cluster.peer_ids[1])
            assert sessions(a, "tree") == 1
            for node in (a, b):
                # No record moved unsigned: nothing was final and folded on either side.
                assert metric(node, "trionode_sync_records_total", direction="pushed") == 0
                assert metric(node, "trionode_sync_records_total", direction="pulled") == 0
            await wait_converged(cluster, [a, b], context)
            for node in (a, b):
                assert "late" not in await call(node, context, "entries")
                # The write reached A signed, and A judged it itself.
                assert await node.contexts.read_delta(context, write.id) is not None
                assert await verdict(node, context, write.id) is Verdict.FILTERED


async def test_a_folded_gap_is_repaired_through_the_final_tree(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A writes while B is cut off, then folds: the bodies B lacks are gone from A, so delta
    sync cannot close the gap. B's tree comparison pulls A's final records (unsigned, from a
    writer in B's own resolution), adopts A's final boundary as checkpoints and fetches the
    non-final rest by id on the same stream; A gets B's own writes signed by delta sync."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, b = cluster
            context = await share(cluster, [0, 1])
            await cluster.partition([1])
            for i in range(8):
                await call(a, context, "set", key=f"a{i}", value="v")
            await call(b, context, "set", key="b0", value="v")
            await fold_now(cluster)
            folded = (await a.contexts.replica(context)).authority.checkpoint_vv
            assert len(folded) >= 5, "A folded its final deltas"
            await cluster.heal()
            await b.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(b, "tree") == 1
            assert metric(b, "trionode_sync_records_total", direction="pulled") >= 1
            await a.sync.sync_now(context, cluster.peer_ids[1])
            await wait_converged(cluster, [a, b], context)
            want = {f"a{i}" for i in range(8)} | {"b0"}
            for node in (a, b):
                assert want <= set(await call(node, context, "entries"))


async def test_a_tree_comparison_between_different_final_frontiers_exchanges_acks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """B misses A's signed ack while cut off: A (the only admin) acked C's write, which no
    delta of A's has in its past, and folded its own writes. B's session with A cannot
    close the gap by deltas (A answers "missing" for folded bodies), so it compares trees:
    the final frontiers differ, the two exchange their signed acks, and B's frontier
    catches up with A's (without A's ack it would stop at A's own latest delta)."""
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=folding) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2])
            await cluster.partition([1])
            for i in range(3):
                await call(a, context, "set", key=f"a{i}", value="v")
            await cluster.settle()
            await call(c, context, "set", key="c0", value="v")
            await trio.sleep(3)  # A's ack round: its signed ack covers C's write
            await cluster.settle()
            await fold_all(a.contexts.replicas, retention=0.0, max_batch=1024)
            await trio.sleep(10)  # past gossip's message cache: A's ack stays off B
            a_final = dict((await a.contexts.replica(context)).authority.finality().final)
            c_tag = tag(await member_id(c, context))
            assert a_final.get(c_tag, 0) >= 1, "A's ack made C's write final on A"
            b_replica = await b.contexts.replica(context)
            assert dict(b_replica.authority.finality().final) != a_final
            await cluster.heal()
            await cluster.partition([2])
            await b.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(b, "tree") == 1
            assert metric(b, "trionode_acks_total", outcome="kept") >= 1
            assert dict(b_replica.authority.finality().final) == a_final
            assert {"a0", "a1", "a2", "c0"} <= set(await call(b, context, "entries"))
