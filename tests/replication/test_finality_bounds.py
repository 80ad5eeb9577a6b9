"""What finality costs and bounds on an in-process cluster: `serve_acks` looks only at
contexts whose frontier moved; equivocation against a folded delta is still seen after a
restart; the undo log is bounded by `auth.max_nonfinal_bytes`; a folded parent is
answered "folded" (context/acks.py, context/folding.py, context/finality.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from msgspec.structs import replace

from tests.replication.cluster_helpers import (
    LIMIT,
    call,
    deltas,
    forge,
    header_of,
    member_key,
    metric,
    share,
    wait_converged,
    write,
)
from tests.replication.test_folding import fold_fast
from trionode.auth.model import Verdict
from trionode.config import FileConfig
from trionode.context.acks import ack_round
from trionode.context.final_state import BASE_PREFIX
from trionode.context.replicas import (
    ACK_PREFIX,
    CHECKPOINT_VV_PREFIX,
    FOLDED_SEQ_PREFIX,
    Replica,
)
from trionode.dag.delta import DeltaBody, verify_delta
from trionode.node import Node
from trionode.store.lmdb_store import Column
from trionode.testing import open_cluster


def no_ack_loop(config: FileConfig) -> FileConfig:
    """The node's own ack loop stays idle: the test runs the rounds."""
    return replace(config, sync=replace(config.sync, ack_interval=1e6))


async def test_an_ack_round_loads_nothing_and_resolves_only_what_moved(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=no_ack_loop, restartable=True) as cluster:
            a, b = cluster
            contexts = [await share(cluster, [0, 1], "notes") for _ in range(4)]
            for context in contexts:
                await write(b, context, "set_title", title="x")
                await wait_converged(cluster, list(cluster), context)
            sent: list[bytes] = []
            loads: list[bytes] = []

            def publish(context_id: bytes, wire: bytes) -> None:
                sent.append(context_id)

            async def round_on(node: Node) -> int:
                """One ack round, counting the contexts it loads (none may be)."""
                replicas = node.contexts.replicas
                load = replicas.load

                async def counting_load(context_id: bytes) -> Replica:
                    loads.append(context_id)
                    return await load(context_id)

                with monkeypatch.context() as patch:
                    patch.setattr(replicas, "load", counting_load)
                    return await ack_round(node.acks, replicas, publish)

            assert await round_on(a) == 4
            assert sorted(sent) == sorted(contexts)
            examined = a.acks.examined
            # Nothing moved: the next round resolves no membership and sends nothing.
            assert await round_on(a) == 0
            assert a.acks.examined == examined
            # One context moves: only it is looked at again.
            await write(b, contexts[2], "set_title", title="y")
            await wait_converged(cluster, list(cluster), contexts[2])
            sent.clear()
            assert await round_on(a) == 1
            assert sent == [contexts[2]]
            assert a.acks.examined == examined + 1
            # After a restart: a round loads no context, and a loaded one whose frontier
            # equals our stored ack is not acked again.
            await cluster.crash(0)
            a = await cluster.restart(0)
            replicas = a.contexts.replicas
            for replica in replicas.loaded():
                replicas.forget_loaded(replica.context_id)
            await replicas.load(contexts[0])
            sent.clear()
            assert await round_on(a) == 0
            assert a.acks.examined == 0
            assert [r.context_id for r in replicas.loaded()] == [contexts[0]]
            assert loads == [], "an ack round loaded a context"


async def test_equivocation_against_a_folded_delta_is_seen_after_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=fold_fast, restartable=True) as cluster:
            a, c = cluster
            context = await share(cluster, [0, 1], "notes")
            first = await write(c, context, "set_title", title="one")
            folded = await header_of(c, context, first)
            await write(c, context, "set_title", title="two")
            await wait_converged(cluster, list(cluster), context)
            await trio.sleep(10)  # acks go round, then folding
            await cluster.settle()
            assert await a.contexts.read_delta(context, first) is None, "not folded"
            await cluster.crash(0)
            a = await cluster.restart(0)
            # C signs a second delta with the sequence number of its folded one.
            twin = await forge(
                a,
                context,
                await member_key(c, context),
                DeltaBody(records=[], events=[], root_hash=bytes(32)),
                parents=folded.parents,
            )
            assert verify_delta(twin, context_id=context).seq == folded.seq
            filtered = deltas(a, "auth_filtered")
            await a.contexts.receive(context, twin.encode())
            authority = (await a.contexts.replica(context)).authority
            assert authority.verdicts[twin.id] is Verdict.FILTERED
            assert authority.judge(twin.id)[1] == "equivocation"
            assert deltas(a, "auth_filtered") == filtered + 1
            # Deleting the context takes its finality rows with it (a later join starts
            # from nothing it held before).
            await a.contexts.delete(context)
            for prefix in (BASE_PREFIX, ACK_PREFIX, CHECKPOINT_VV_PREFIX, FOLDED_SEQ_PREFIX):
                assert await a.store.raw_scan(Column.GENERIC, prefix=prefix + context) == []


async def test_a_folded_parent_is_answered_folded_and_final_state_covers_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=fold_fast) as cluster:
            a, b, d = cluster
            context = await share(cluster, [0, 1], "notes")
            parent = await write(a, context, "set_title", title="p")
            await wait_converged(cluster, [a, b], context)
            await cluster.partition([1])
            # B writes on `parent` while cut off; A goes on and folds `parent`.
            late = await write(b, context, "set_title", title="late")
            late_wire = await b.contexts.read_delta(context, late)
            assert late_wire is not None
            await write(a, context, "set_title", title="q")
            await write(a, context, "set_title", title="r")
            await trio.sleep(10)
            await cluster.settle()
            assert await a.contexts.read_delta(context, parent) is None, "not folded"
            # D joins after the folding: `parent` reaches it only as final state.
            await d.applications.install(str(Path(__file__).parents[2] / "apps" / "notes"))
            await d.joins.join(await a.joins.invite(context))
            await wait_converged(cluster, [a, d], context)
            replica = await d.contexts.replica(context)
            assert not replica.dag.knows(parent)
            # B's late delta arrives; its parent is asked of A, which folded it.
            received = await d.contexts.receive(context, late_wire)
            assert received.missing == {parent}
            asked: list[list[bytes]] = []
            serve = a.contexts.read_delta

            async def counting(context_id: bytes, delta_id: bytes) -> bytes | None:
                asked.append([delta_id])
                return await serve(context_id, delta_id)

            a.contexts.read_delta = counting  # type: ignore[method-assign]
            released = await d.replicator.fetch(cluster.peer_ids[0], context, {parent})
            # "Folded", and D's own finality covers it: the late delta applies, judged
            # like any other; the parent stays unknown (should it come, it applies).
            assert released == 1
            assert await d.contexts.read_delta(context, late) is not None
            assert (await d.contexts.state(context))[2] == 0, "still pending"
            assert not replica.dag.knows(parent)
            assert metric(d, "trionode_delta_fetches_total", outcome="folded") == 1
            assert metric(d, "trionode_delta_fetches_total", outcome="failed") == 0
            # Not asked again: A said folded, and nothing waits for it any more.
            d.replicator.request_fetch(cluster.peer_ids[0], context, frozenset({parent}))
            assert not d.replicator._fetching
            assert asked == [[parent]]
            await wait_converged(cluster, [a, d], context)


def quiet_sync(config: FileConfig) -> FileConfig:
    """Sync sessions only when the test asks (fetches are explicit)."""
    return replace(
        config,
        sync=replace(config.sync, interval=1e5, heartbeat=1e5, on_join=False),
    )


async def test_a_forged_folded_answer_cannot_make_a_node_skip_a_parent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=quiet_sync) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], "notes")
            await cluster.partition([2])
            parent = await write(b, context, "set_title", title="needed")
            child = await write(b, context, "insert", pos=0, text="child ")
            await wait_converged(cluster, [a, b], context)
            child_wire = await b.contexts.read_delta(context, child)
            assert child_wire is not None
            await cluster.heal()
            received = await c.contexts.receive(context, child_wire)
            assert received.missing == {parent}
            # A claims it folded `parent`: it did not (nothing is final: A never saw B's
            # ack of it, and C holds none of it).
            serve = a.contexts.read_delta

            async def hiding(context_id: bytes, delta_id: bytes) -> bytes | None:
                return None if delta_id == parent else await serve(context_id, delta_id)

            async def claiming(context_id: bytes, ids: object) -> set[bytes]:
                return {parent}

            monkeypatch.setattr(a.contexts, "read_delta", hiding)
            monkeypatch.setattr(a.contexts, "folded", claiming)
            assert await c.replicator.fetch(cluster.peer_ids[0], context, {parent}) == 0
            replica = await c.contexts.replica(context)
            assert replica.dag.is_pending(child), "the claim let the child skip its parent"
            assert parent in await c.contexts.missing(context)
            # The parent is still asked of the others: a delta on it that B relays makes C
            # ask B, which sends it.
            sibling = await forge(
                b,
                context,
                await member_key(c, context),
                DeltaBody(records=[], events=[], root_hash=bytes(32)),
                parents=[parent],
            )
            await c.replicator.receive_from(cluster.peer_ids[1], context, sibling.encode())
            await cluster.settle()
            assert not replica.dag.is_pending(child)
            assert replica.dag.knows(sibling.id)
            assert not replica.dag.is_pending(sibling.id)
            assert await call(c, context, "title") == "needed"
            assert await call(c, context, "text") == "child "
