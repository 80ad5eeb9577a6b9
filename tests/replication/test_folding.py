"""Folding on an in-process cluster: final deltas older than `store.delta_retention` leave
the delta log for the final state, changing no state and no root; an undo after folding
rebuilds from the final state plus the non-final deltas; a restart and a late joiner
reach the same state (context/folding.py)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from msgspec.structs import replace

from tests.replication.cluster_helpers import (
    LIMIT,
    call,
    deltas,
    share,
    wait_converged,
    write,
)
from trionode.auth.model import Verdict
from trionode.config import FileConfig
from trionode.node import Node
from trionode.testing import open_cluster


def fold_fast(config: FileConfig) -> FileConfig:
    return replace(
        config,
        store=replace(config.store, delta_retention=0.0, fold_interval=1.0),
        sync=replace(config.sync, ack_interval=2.0),
    )


def fold_at_once(config: FileConfig) -> FileConfig:
    return replace(config, store=replace(config.store, delta_retention=0.0, fold_interval=1.0))


async def held(node: Node, context: bytes, ids: list[bytes]) -> list[bool]:
    return [await node.contexts.read_delta(context, i) is not None for i in ids]


async def root(node: Node, context: bytes) -> bytes:
    return (await node.contexts.state(context))[0]


async def test_final_deltas_fold_and_an_undo_rebuilds_from_the_final_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=fold_fast, restartable=True) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], "notes", roles={1: "admin"})
            words = ["one ", "two ", "three ", "four "]
            ids = [
                await write(c, context, "insert", pos=len("".join(words[:i])), text=w)
                for i, w in enumerate(words)
            ]
            await wait_converged(cluster, list(cluster), context)
            ids.append(await write(a, context, "set_title", title="A"))  # the only head
            await wait_converged(cluster, list(cluster), context)
            before = await root(a, context)
            assert [deltas(node, "folded") for node in cluster] == [0.0] * 3
            await trio.sleep(10)  # acks go round, then a folding pass
            await cluster.settle()
            for node in cluster:
                # Everything but the head is final and folded: no body left, same state.
                assert await held(node, context, ids) == [False] * 4 + [True]
                assert await root(node, context) == before
                assert await call(node, context, "text") == "one two three four "
                assert deltas(node, "folded") == 4
            # An undo after folding: B applies C's write, then learns (straight from A's
            # removal, before any sync could repair it) that A removed C concurrently.
            c_member = (await c.contexts.member_key(context))[0]
            await cluster.partition([0])
            evil = await write(c, context, "insert", pos=0, text="EVIL ")
            await wait_converged(cluster, [b, c], context)
            assert await call(b, context, "text") == "EVIL one two three four "
            removal = await a.contexts.remove_member(context, c_member)
            await b.contexts.receive(context, removal.encode())
            authority = (await b.contexts.replica(context)).authority
            assert authority.verdicts[evil] is Verdict.FILTERED
            # Rebuilt without it, from the folded final state plus non-final deltas.
            assert await call(b, context, "text") == "one two three four "
            assert await call(b, context, "title") == "A"
            await cluster.heal()
            await wait_converged(cluster, [a, b], context)
            assert await call(a, context, "text") == "one two three four "
            assert await root(a, context) == await root(b, context)
            # A restart reads the same state back, and folding goes on from there.
            expected = await root(b, context)
            await cluster.crash(1)
            b = await cluster.restart(1)
            assert await root(b, context) == expected
            assert await call(b, context, "text") == "one two three four "


async def test_nothing_folds_while_an_admin_has_not_acked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=fold_at_once) as cluster:
            _, b, c = cluster
            context = await share(cluster, [0, 1, 2], "notes", roles={1: "admin"})
            first = await write(c, context, "set_title", title="one")
            await write(c, context, "set_title", title="two")
            await wait_converged(cluster, list(cluster), context)
            await trio.sleep(5)  # folding passes run; B's first ack is 30 s away
            await cluster.settle()
            for node in cluster:
                assert await held(node, context, [first]) == [True]
            await trio.sleep(b.config.sync.ack_interval)
            await cluster.settle()
            for node in cluster:
                assert await held(node, context, [first]) == [False]
                assert await call(node, context, "title") == "two"


async def test_a_node_joining_after_folding_gets_the_same_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=fold_fast) as cluster:
            a, b, late = cluster
            context = await share(cluster, [0, 1], "notes")
            for word in ("alpha ", "beta ", "gamma "):
                await write(b, context, "insert", pos=0, text=word)
            await wait_converged(cluster, [a, b], context)
            await write(a, context, "set_title", title="T")
            await wait_converged(cluster, [a, b], context)
            await trio.sleep(10)
            await cluster.settle()
            assert (await a.contexts.replica(context)).authority.checkpoint_vv, "nothing folded"
            await late.applications.install(str(Path(__file__).parents[2] / "apps" / "notes"))
            await late.joins.join(await a.joins.invite(context))
            await wait_converged(cluster, [a, b, late], context)
            assert await call(late, context, "text") == "gamma beta alpha "
            assert await root(late, context) == await root(a, context)
