"""Finality on an in-process cluster: a delta is final once every ever-admin has
acknowledged it (here by writing on top of it), the same on every node; the lag gauges
and the authority agree (trionode/auth/finality.py, local-first-auth.md §5.4)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.replication.cluster_helpers import LIMIT, b58, metric, share, wait_converged, write
from trionode.auth.acks import sign_ack
from trionode.node import Node
from trionode.testing import open_cluster


async def is_final(node: Node, context: bytes, delta_id: bytes) -> bool:
    return (await node.contexts.replica(context)).authority.is_final(delta_id)


async def test_a_delta_is_final_once_every_admin_has_it_in_its_past(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = cluster
            # Notes runs no event handlers: nobody writes but the test.
            context = await share(cluster, [0, 1, 2], "notes", roles={1: "admin"})
            by_c = await write(c, context, "set_title", title="c")
            await wait_converged(cluster, list(cluster), context)
            for node in cluster:
                # Neither admin has acknowledged it: its verdict may still change.
                assert not await is_final(node, context, by_c)
                lag = metric(node, "trionode_finality_lag_deltas", context=b58(context))
                assert lag >= 1
            by_a = await write(a, context, "set_title", title="a")
            await wait_converged(cluster, list(cluster), context)
            for node in cluster:
                assert not await is_final(node, context, by_c), "B has not seen it yet"
            await write(b, context, "set_title", title="b")
            await wait_converged(cluster, list(cluster), context)
            for node in cluster:
                assert await is_final(node, context, by_c)
                assert await is_final(node, context, by_a)
            finals = [
                (await node.contexts.replica(context)).authority.finality().final
                for node in cluster
            ]
            assert finals[0] == finals[1] == finals[2]


async def test_an_idle_admin_moves_finality_with_signed_acks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, restartable=True) as cluster:
            a, _, c = cluster
            context = await share(cluster, [0, 1, 2], "notes", roles={1: "admin"})
            by_c = await write(c, context, "set_title", title="c")
            await wait_converged(cluster, list(cluster), context)
            assert not await is_final(a, context, by_c)
            # Neither admin writes; their acks ride gossip every sync.ack_interval.
            await trio.sleep(a.config.sync.ack_interval + 1)
            await cluster.settle()
            for node in cluster:
                assert await is_final(node, context, by_c)
                assert metric(node, "trionode_finality_lag_deltas", context=b58(context)) == 0
                assert metric(node, "trionode_acks_total", outcome="kept") >= 1
            # Kept across a restart (from the store).
            await cluster.crash(2)
            await cluster.restart(2)
            assert await is_final(cluster[2], context, by_c)


async def test_hostile_acks_are_refused_and_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, c = cluster
            context = await share(cluster, [0, 1], "notes")
            await write(c, context, "set_title", title="c")
            await wait_converged(cluster, list(cluster), context)
            replica = await c.contexts.replica(context)
            everything = dict.fromkeys(replica.authority.frontier(), 1 << 40)
            # A member that was never admin acks: not an ack finality waits for.
            mine = sign_ack(replica.member_key, context, everything, 1)
            assert not await a.acks.receive(context, mine)
            assert metric(a, "trionode_acks_total", outcome="refused_not_admin") == 1
            # Garbage, a cut signature, an oversized one, another context's: refused.
            a_replica = await a.contexts.replica(context)
            # Stamped ahead of any ack A's node sent on its own meanwhile.
            good = sign_ack(a_replica.member_key, context, replica.authority.frontier(), 1 << 63)
            for bad in (b"\x00" * 10, good[:-1] + bytes([good[-1] ^ 1]), b"\x91" * 200_000):
                assert not await c.acks.receive(context, bad)
            other = sign_ack(a_replica.member_key, b"\x01" * 32, replica.authority.frontier(), 11)
            assert not await c.acks.receive(context, other)
            assert metric(c, "trionode_acks_total", outcome="refused_malformed") == 4
            # The genuine one is kept, once; a replay is stale.
            assert await c.acks.receive(context, good)
            assert not await c.acks.receive(context, good)
            assert metric(c, "trionode_acks_total", outcome="stale") == 1
