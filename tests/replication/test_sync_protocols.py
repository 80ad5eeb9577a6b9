"""Session protocols beyond delta sync (issue 7 item 2): snapshot and tree comparison.

SCENARIOS 9-11 on in-process clusters (`open_cluster`, `autojump_clock`), plus the snapshot's
resumption after a dropped connection (and a reload from the store), the protocol choice,
the DAG bookkeeping of state-based sync, and malformed frames. Every test bounds itself with
`trio.fail_after` in virtual seconds and waits on the convergence condition (same root, same
heads, nothing pending, no session running), re-checked at each pubsub heartbeat.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
import trio
import trio.testing

from trionode.config import FileConfig
from trionode.context import snapshot
from trionode.context.final_state import BASE_PREFIX, NO_BASE, STATE_BASE_PREFIX
from trionode.context.folding import fold_all
from trionode.context.records import STATE
from trionode.context.replicas import AUX
from trionode.context.replication import SYNC_PROTOCOL, _Channel
from trionode.crdt import Entity, Kind, Timestamp, encode_entity
from trionode.crdt.compact import record_of_row
from trionode.crdt.entity import ROOT_ID
from trionode.dag.dag import CausalDag
from trionode.dag.delta import GENESIS
from trionode.errors import RemoteProtocolError
from trionode.node import Node
from trionode.store.lmdb_store import Column
from trionode.sync.driver import SyncServer, compare_trees
from trionode.sync.errors import UntrustedState
from trionode.sync.treecmp import TreeCompare
from trionode.testing import Cluster, open_cluster
from trionode.wire.messages import (
    MAX_FRAME,
    MAX_PAGE_RECORDS,
    MAX_RECORD,
    DeltaRequest,
    DeltaResponse,
    EntityPush,
    FrameReader,
    NodeQuery,
    NodeRequest,
    PeerProof,
    ProofRequest,
    SnapshotRequest,
    SyncError,
    SyncMessage,
    TreeDone,
    frame,
)

APPS: Final = Path(__file__).resolve().parents[2] / "apps"
LIMIT: Final = 600.0
"""Virtual seconds a scenario may take (autojump makes a generous bound free)."""


def quiet(file: FileConfig) -> FileConfig:
    """No heartbeats or interval ticks within a test's span: sessions run when the test
    says so (gossip still flows)."""
    return msgspec.structs.replace(
        file,
        sync=msgspec.structs.replace(
            file.sync, heartbeat=10_000.0, interval=10_000.0, on_join=False
        ),
    )


# -- helpers ----------------------------------------------------------------------------------


async def install(node: Node) -> bytes:
    record = await node.applications.install(str(APPS / "kv_store"))
    return record.application_id


async def create(node: Node) -> bytes:
    return (await node.contexts.create(await install(node))).context_id


async def join(cluster: Cluster, inviter: int, joiner: int, context: bytes) -> None:
    await install(cluster[joiner])
    text = await cluster[inviter].joins.invite(context)
    await cluster[joiner].joins.join(text)


async def put(node: Node, context: bytes, key: str, value: str = "v") -> bytes:
    result = await node.contexts.execute(context, "set", json.dumps({"key": key, "value": value}))
    assert result.delta_id is not None
    return result.delta_id


async def entries(node: Node, context: bytes) -> dict[str, str]:
    result: dict[str, str] = (await node.contexts.execute(context, "entries", "{}")).result
    return result


def metric(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def sessions(node: Node, protocol: str, outcome: str = "ok") -> float:
    return metric(node, "trionode_sync_sessions_total", protocol=protocol, outcome=outcome)


async def problem(nodes: Sequence[Node], context: bytes) -> str | None:
    first: tuple[bytes, list[bytes]] | None = None
    for node in nodes:
        if node.sync.limiter.borrowed_tokens or node.replicator._fetching:
            return f"{node.peer_id} is syncing"
        root, heads, pending = await node.contexts.state(context)
        if pending:
            return f"{node.peer_id} has {pending} pending deltas"
        if first is None:
            first = (root, heads)
        elif (root, heads) != first:
            return f"{node.peer_id}: root/heads differ"
    return None


async def converged(cluster: Cluster, nodes: Sequence[Node], context: bytes) -> None:
    """Wait until `nodes` agree on root and heads with nothing pending or running."""
    why: str | None = "not checked"
    try:
        with trio.fail_after(LIMIT):
            while True:
                await cluster.settle()
                why = await problem(nodes, context)
                if why is None:
                    return
                await cluster[0].pubsub.wait_heartbeat()
    except trio.TooSlowError:
        raise AssertionError(f"no convergence: {why}") from None


async def entity_count(node: Node, context: bytes) -> int:
    records, more, _, _ = await node.contexts.snapshot_page(context, None, 1 << 30, 1 << 40)
    assert more is None
    return len(records)


class Pages:
    """Counts snapshot pages served; lets a test wait for the n-th."""

    def __init__(self) -> None:
        self.served = 0
        self._waiting: list[tuple[int, trio.Event]] = []

    def count(self) -> None:
        self.served += 1
        for n, event in self._waiting:
            if self.served >= n:
                event.set()

    async def wait_for(self, n: int) -> None:
        if self.served < n:
            event = trio.Event()
            self._waiting.append((n, event))
            await event.wait()


def slow_pages(monkeypatch: pytest.MonkeyPatch, seconds: float = 1.0) -> Pages:
    """Every streamed snapshot page takes `seconds` (virtual) to serve."""
    pages = Pages()
    original = SyncServer._read_snapshot_page

    async def slow(*args: Any) -> Any:
        await trio.sleep(seconds)
        page = await original(*args)
        pages.count()
        return page

    monkeypatch.setattr(SyncServer, "_read_snapshot_page", slow)
    return pages


async def raw_session(
    node: Node, peer: Node, context: bytes, messages: Sequence[SyncMessage | bytes]
) -> SyncMessage | None:
    """Open a sync stream, prove membership, send `messages` (raw bytes as is); return the
    first reply, or None if the responder closed the stream."""
    _, stream = await node.host.new_stream(peer.host.peer_id, [SYNC_PROTOCOL])
    async with stream:
        conn = node.host.connections[peer.host.peer_id]
        channel = _Channel(stream)
        await channel.send(await node.replicator._auth(conn, context))
        for message in messages:
            await stream.send_all(message if isinstance(message, bytes) else frame(message))
        try:
            return await channel.receive(eof_ok=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None


# -- SCENARIO 9 -------------------------------------------------------------------------------


def folding(file: FileConfig) -> FileConfig:
    """`quiet`, acks every second and no retention; folding runs when the test says so
    (`fold_now`), so no fold races a snapshot's tail."""
    file = quiet(file)
    return msgspec.structs.replace(
        file,
        store=msgspec.structs.replace(file.store, delta_retention=0.0, fold_interval=10_000.0),
        sync=msgspec.structs.replace(file.sync, ack_interval=1.0),
    )


async def fold_now(cluster: Cluster) -> None:
    """Under `folding`: let acks go round, then fold what is final on every node."""
    await trio.sleep(3)
    await cluster.settle()
    for node in cluster:
        await fold_all(node.contexts.replicas, retention=0.0, max_batch=1024)


async def test_9_fresh_joiner_snapshots(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A and B hold N entries, final and folded; C joins: it snapshots the final state from
    the inviter, ends with A's root and heads, holds no delta from before, then applies
    A's next delta normally."""
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=folding) as cluster:
            a, b, c = cluster
            context = await create(a)
            await join(cluster, 0, 1, context)
            old = [await put(a if i % 2 else b, context, f"k{i:03}") for i in range(60)]
            await converged(cluster, [a, b], context)
            await fold_now(cluster)
            c.sync.snapshot_page_records = 16  # several pages

            await join(cluster, 0, 2, context)
            assert sessions(c, "snapshot") == 1
            assert sessions(c, "delta") == 0
            count = await entity_count(a, context)
            assert metric(c, "trionode_sync_records_total", direction="snapshot") == count
            assert count > 60
            await converged(cluster, [a, b, c], context)
            assert await entries(c, context) == await entries(a, context)
            assert len(await entries(c, context)) == 60
            # Nothing of the history before the snapshot: C answers "missing" for it.
            for delta_id in old[:3]:
                assert await c.contexts.read_delta(context, delta_id) is None
            reply = await raw_session(a, c, context, [DeltaRequest(ids=old[:3])])
            assert isinstance(reply, DeltaResponse)
            assert reply.deltas == []
            assert reply.missing == old[:3]
            # The snapshot left no marker behind.
            assert await snapshot.load_progress(c.store, context) is None
            # Each record is stored once: the state rows are the base (no base row each),
            # with a base row only where the state row moved on since, by the tail.
            assert c.store.get_sync(AUX, STATE_BASE_PREFIX + context) is not None
            rows = await c.store.raw_scan(Column.GENERIC, prefix=BASE_PREFIX + context)
            copies = {k[len(BASE_PREFIX) + len(context) :]: v for k, v in rows if v}
            assert len(rows) == len(copies) < 5
            for entity_id, value in copies.items():
                state = await c.store.get(STATE, context + entity_id)
                assert state is not None
                assert record_of_row(state) != value
            base = {e.id: encode_entity(e) for e in c.contexts.replicas.iter_base(context)}
            assert len(base) == count

            # A's next delta builds on the heads C recorded: it applies at once.
            pending_before = metric(c, "trionode_deltas_total", outcome="pending")
            new = await put(a, context, "after")
            await converged(cluster, [a, b, c], context)
            assert await c.contexts.read_delta(context, new) is not None
            assert metric(c, "trionode_deltas_total", outcome="pending") == pending_before
            assert (await entries(c, context))["after"] == "v"
            # The write changed state rows; the base is still what the snapshot brought.
            assert {e.id: encode_entity(e) for e in c.contexts.replicas.iter_base(context)} == base
            # (Base rows for the entities it changed: what they were, or "none" for new.)
            rows = await c.store.raw_scan(Column.GENERIC, prefix=BASE_PREFIX + context)
            assert len(copies) < len(rows) < count
            assert NO_BASE in {value for _, value in rows}
            # And C's own write reaches the others the same way.
            await put(c, context, "from-c")
            await converged(cluster, [a, b, c], context)
            assert (await entries(b, context))["from-c"] == "v"


# -- SCENARIO 10 ------------------------------------------------------------------------------


async def test_10_join_while_writes_continue(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While C takes its snapshot page by page, A writes 5 more deltas: C ends with all."""
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=folding) as cluster:
            a, b, c = cluster
            context = await create(a)
            await join(cluster, 0, 1, context)
            for i in range(40):
                await put(a, context, f"k{i:03}")
            await converged(cluster, [a, b], context)
            await fold_now(cluster)
            c.sync.snapshot_page_records = 8
            c.sync.snapshot_window = 2  # one page per write: progress is persisted per page
            served = slow_pages(monkeypatch)
            during: list[bytes] = []
            pages_at_last_write = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(join, cluster, 0, 2, context)
                await served.wait_for(2)
                # Visible while it runs: A serves the session, C has persisted a page.
                assert metric(a, "trionode_sync_serving") == 1
                assert metric(c, "trionode_snapshot_pages_total") == 1
                for i in range(5):
                    during.append(await put(a, context, f"during{i}", "w"))
                    pages_at_last_write = served.served
                    await trio.sleep(0.5)
            assert pages_at_last_write < served.served  # the writes fell between pages
            assert sessions(c, "snapshot") == 1
            await converged(cluster, [a, b, c], context)
            assert metric(a, "trionode_sync_serving") == 0
            assert metric(c, "trionode_snapshot_pages_total") == served.served
            values = await entries(c, context)
            assert len(values) == 45
            assert all(values[f"during{i}"] == "w" for i in range(5))
            # The writes after the boundary arrived as deltas (by gossip, released by the
            # boundary, or by the tail sync), judged by C itself (and maybe folded since).
            replica = await c.contexts.replica(context)
            for delta_id in during:
                assert delta_id in replica.dag.applied


# -- SCENARIO 11 ------------------------------------------------------------------------------


async def test_11_no_snapshot_over_existing_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=quiet) as cluster:
            a, b = cluster
            context = await create(a)
            await join(cluster, 0, 1, context)
            await put(b, context, "mine")
            await converged(cluster, [a, b], context)
            root, heads, _ = await b.contexts.state(context)
            # A marker (as a join leaves) on a node that has state: refused, counted, dropped.
            admin, _ = await a.contexts.member_key(context)
            await snapshot.begin(b.store, context, source=admin, peer=str(cluster.peer_ids[0]))
            with pytest.raises(snapshot.SnapshotRefused):
                await b.sync.sync_now(context, cluster.peer_ids[0])
            assert metric(b, "trionode_sync_snapshot_refused_total") == 1
            assert sessions(b, "snapshot", "refused") == 1
            assert await snapshot.load_progress(b.store, context) is None
            assert await b.contexts.state(context) == (root, heads, 0)
            # Without a marker the protocol choice never picks a snapshot, and `take` refuses.
            async with b.replicator.session(cluster.peer_ids[0], context) as (channel, conn):
                with pytest.raises(snapshot.SnapshotRefused):
                    await snapshot.take(b.contexts, channel, conn, cluster.peer_ids[0], context)
            await put(a, context, "more")
            snapshots = sessions(b, "snapshot")  # one: its join
            await b.sync.sync_now(context, cluster.peer_ids[0])
            # "more" may still be in B's processor (gossip can deliver it while the session
            # runs, and the session then leaves it to the processor): wait for it.
            await converged(cluster, [a, b], context)
            assert sessions(b, "snapshot") == snapshots


async def test_11_divergent_nodes_reconcile_by_tree_comparison(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A (with C) and B diverge in a partition: A writes 10 entries, B 3. One session of B
    with A (the gap is too deep for B's delta sync) compares final state — equal, nothing
    is folded — and fetches A's deltas by id on the same stream: no record moves unsigned,
    since none of them is final and folded. A's own session brings B's branch, signed; then
    deltas from either side apply everywhere, also on C, which was cut off from B."""
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=quiet) as cluster:
            a, b, c = cluster
            context = await create(a)
            await join(cluster, 0, 1, context)
            await join(cluster, 0, 2, context)
            await put(a, context, "shared1")
            await put(b, context, "shared2")
            await converged(cluster, [a, b, c], context)

            await cluster.partition([1])
            a_deltas = [await put(a, context, f"a{i}") for i in range(10)]
            b_deltas = [await put(b, context, f"b{i}") for i in range(3)]
            await converged(cluster, [a, c], context)
            await trio.sleep(10)  # past gossip's message cache: B's deltas stay with B
            await cluster.heal()
            # Two rounds of at most two deltas each (one asked for, one ancestor): short of
            # A's ten.
            b.sync.max_delta_rounds = 2
            b.replicator.max_ancestors = 1
            await b.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(b, "tree") == 1
            assert metric(b, "trionode_sync_records_total", direction="pulled") == 0
            assert metric(b, "trionode_sync_records_total", direction="pushed") == 0
            assert await b.contexts.read_delta(context, a_deltas[-1]) is not None
            assert len(await entries(b, context)) == 15
            # B's branch reaches A as signed deltas, in A's own session (one A may have
            # started already: a member peer that reconnects gets a session at once).
            await a.sync.sync_now(context, cluster.peer_ids[1])
            await cluster.settle()
            assert await a.contexts.read_delta(context, b_deltas[-1]) is not None
            assert len(await entries(a, context)) == 15
            assert metric(a, "trionode_sync_records_total", direction="pulled") == 0

            # B's next delta applies on A at once; C (cut off from B) gets it from A and
            # fills the gap from A, which now holds B's bodies.
            await cluster.partition([1], [2])
            from_b = await put(b, context, "from-b")
            await cluster.settle()
            assert await a.contexts.read_delta(context, from_b) is not None
            await c.sync.sync_now(context, cluster.peer_ids[0])
            await cluster.settle()
            assert await c.contexts.read_delta(context, from_b) is not None
            await cluster.heal()

            from_a = await put(a, context, "from-a")
            from_c = await put(c, context, "from-c")
            await converged(cluster, [a, b, c], context)
            for node in cluster:
                assert await node.contexts.read_delta(context, from_a) is not None
                assert await node.contexts.read_delta(context, from_c) is not None
                assert len(await entries(node, context)) == 18


async def test_equal_heads_different_roots_is_divergence_repaired_by_tree_comparison(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """State that belongs to no delta (here: joined directly on B) makes roots differ under
    equal heads: counted as divergence, then repaired by tree comparison both ways."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=quiet) as cluster:
            a, b = cluster
            context = await create(a)
            await join(cluster, 0, 1, context)
            await put(a, context, "x")
            await converged(cluster, [a, b], context)
            # A record only B holds (a field the app does not declare).
            member, _ = await b.contexts.member_key(context)
            source = Entity(ROOT_ID, b"extra", Kind.REGISTER, added=Timestamp(1 << 40, member))
            assert await b.contexts.merge_state(context, [source]) == 1
            assert (await a.contexts.state(context))[1] == (await b.contexts.state(context))[1]
            assert (await a.contexts.state(context))[0] != (await b.contexts.state(context))[0]
            await b.sync.sync_now(context, cluster.peer_ids[0])
            assert metric(b, "trionode_sync_divergence_total") == 1
            assert sessions(b, "tree") == 1
            assert await a.contexts.state(context) == await b.contexts.state(context)
            # Nothing left to do: the next session changes nothing.
            await b.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(b, "none") == 1


async def test_protocol_choice(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Equal roots → none; a small known gap → delta sync; we are ahead → none."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=quiet) as cluster:
            a, b = cluster
            context = await create(a)
            await join(cluster, 0, 1, context)
            await converged(cluster, [a, b], context)
            await b.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(b, "none") == 1
            await cluster.partition([1])
            for i in range(3):
                await put(a, context, f"k{i}")
            await cluster.heal()
            served = metric(a, "trionode_sync_served_deltas_total")
            assert await b.sync.sync_now(context, cluster.peer_ids[0]) == 3
            assert sessions(b, "delta") == 1
            assert metric(a, "trionode_sync_served_deltas_total") == served + 3
            # (B's kv_store handlers answer what it received with deltas of their own:
            # agreement comes once those have crossed too.)
            await converged(cluster, [a, b], context)
            await cluster.partition([1])
            await put(b, context, "ahead")
            await cluster.heal()
            await b.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(b, "none") == 2
            assert sessions(b, "tree") == 0
            assert sessions(b, "snapshot") == 1  # its join


async def test_stale_heads_from_pre_boundary_deltas_are_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A checkpoint does not know its ancestors: a delta from before a snapshot's boundary
    that arrives later (here: the context's first delta) applies as a head. The next session
    learns the peer had applied it (`HeadsResponse.known`) and drops it. (The context's
    first delta is its Create operation, which the snapshot carries as a signed op, so the
    first *data* delta plays that part.)"""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await create(a)
            first_id = await put(a, context, "k")
            first = await a.contexts.read_delta(context, first_id)
            assert first is not None
            await put(a, context, "k1")
            await put(a, context, "k2")
            await fold_now(cluster)  # the boundary: "k1" (folded); "k2" is a head
            await join(cluster, 0, 1, context)
            # (Whatever C writes of its own after joining goes first: a delta of C's staged
            # around the receive would merge the stale head before it is looked at.)
            await trio.testing.wait_all_tasks_blocked()
            assert (await c.contexts.receive(context, first)).applied
            _, heads, _ = await c.contexts.state(context)
            assert len(heads) == 2
            assert await entries(c, context) == await entries(a, context)
            await c.sync.sync_now(context, cluster.peer_ids[0])
            assert await c.contexts.state(context) == await a.contexts.state(context)


# -- resumption -------------------------------------------------------------------------------


async def test_snapshot_resumes_after_dropped_connection_and_reload(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops mid-snapshot (and C's in-memory state is dropped, as by a
    restart): the join still succeeds, and the next session continues from the persisted
    cursor with the same peer, taking every record exactly once."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await create(a)
            for i in range(40):
                await put(a, context, f"k{i:03}")
            await fold_now(cluster)
            c.sync.snapshot_page_records = 8
            c.sync.snapshot_window = 2  # one page per write: progress is persisted per page
            served = slow_pages(monkeypatch)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(join, cluster, 0, 1, context)
                await served.wait_for(3)
                await cluster.partition([1])
            assert context in c.contexts.known_ids()  # joined, state to follow
            assert sessions(c, "snapshot", "failed") == 1
            progress = await snapshot.load_progress(c.store, context)
            assert progress is not None
            assert progress.peer == str(cluster.peer_ids[0])
            assert progress.pages >= 2
            assert not progress.complete
            assert progress.cursor is not None
            taken = progress.records
            c.contexts.replicas.forget_loaded(context)  # reload from the store, as after a restart

            await cluster.heal()
            await c.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(c, "snapshot") == 1
            total = await entity_count(a, context)
            assert metric(c, "trionode_sync_records_total", direction="snapshot") == total - taken
            assert await snapshot.load_progress(c.store, context) is None
            await converged(cluster, [a, c], context)
            assert len(await entries(c, context)) == 40


# -- trust ------------------------------------------------------------------------------------


async def test_state_from_read_only_members_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=quiet) as cluster:
            a, r = cluster
            context = await create(a)
            await install(r)
            await r.joins.join(await a.joins.invite(context, role="read-only"))
            await converged(cluster, [a, r], context)
            before = await a.contexts.state(context)
            forged = encode_entity(Entity(ROOT_ID, b"forged", Kind.REGISTER))
            reply = await raw_session(r, a, context, [EntityPush(records=[forged])])
            assert reply is not None
            assert msgspec.structs.asdict(reply) == {"changed": 0, "refused": 1}
            assert await a.contexts.state(context) == before
            # A read-only peer is no source of state for tree comparison either.
            async with a.replicator.session(cluster.peer_ids[1], context) as (channel, conn):
                ours, _ = await a.contexts.final_start(context, ())
                with pytest.raises(UntrustedState, match="not a writer"):
                    await compare_trees(channel, TreeCompare(ours), a.contexts, conn, context)


# -- malformed frames -------------------------------------------------------------------------


def _decode(data: bytes) -> SyncMessage | None:
    reader = FrameReader()
    reader.receive_data(data)
    return reader.next_message()


def _raw_frame(body: dict[str, Any]) -> bytes:
    data = msgspec.msgpack.encode(body)
    return struct.pack(">I", len(data)) + data


@pytest.mark.parametrize(
    "body",
    [
        {
            "type": "snapshot",
            "records": [b"x" * (MAX_RECORD + 1)],
            "next_cursor": None,
            "heads": [],
            "root_hash": bytes(32),
        },
        {
            "type": "snapshot",
            "records": [b"x"] * (MAX_PAGE_RECORDS + 1),
            "next_cursor": None,
            "heads": [],
            "root_hash": bytes(32),
        },
        {"type": "get_snapshot", "cursor": b"short", "max_records": 10, "max_bytes": 10},
        {"type": "get_snapshot", "cursor": None, "max_records": 0, "max_bytes": 10},
        {"type": "get_snapshot", "cursor": None, "max_records": 10, "max_bytes": MAX_FRAME},
        {"type": "get_nodes", "queries": []},
        {"type": "get_nodes", "queries": [[bytes(32), None]] * 257},
        {"type": "nodes", "nodes": [[bytes(32), None, None, [[bytes(32), None]] * 16385, False]]},
        {"type": "nodes", "nodes": [[bytes(31), None, None, [], False]]},
        {"type": "push", "records": "not a list"},
        {"type": "tree_start", "heads": [bytes(32)] * 257, "known": []},
        {"type": "tree_done", "extra": 1},
        {"type": "proof", "member": bytes(32), "signature": bytes(63)},
    ],
)
def test_malformed_frames_raise_the_typed_error(body: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        _decode(_raw_frame(body))


def test_oversized_and_garbage_frames_raise_the_typed_error() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        _decode(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(RemoteProtocolError):
        _decode(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    ok = frame(NodeRequest(queries=[NodeQuery(id=bytes(32))]))
    assert isinstance(_decode(ok), NodeRequest)


async def test_garbage_on_a_sync_stream_costs_only_that_stream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, b = cluster
            context = await create(a)
            for i in range(3):
                await put(a, context, f"k{i}")
            await fold_now(cluster)
            await join(cluster, 0, 1, context)
            await converged(cluster, [a, b], context)
            before = await a.contexts.state(context)
            bad: list[list[SyncMessage | bytes]] = [
                [EntityPush(records=[b"garbage"])],
                [_raw_frame({"type": "get_nodes", "queries": []})],
                [struct.pack(">I", MAX_FRAME + 1)],
                [TreeDone()],  # done before it started
            ]
            for messages in bad:
                assert await raw_session(b, a, context, messages) is None
            assert await a.contexts.state(context) == before
            # A still serves sessions.
            proof = await raw_session(b, a, context, [ProofRequest()])
            assert isinstance(proof, PeerProof)
            # The page-by-page snapshot is gone: an old peer asking for a page hears why.
            old = await raw_session(
                b, a, context, [SnapshotRequest(cursor=None, max_records=1, max_bytes=1 << 20)]
            )
            assert isinstance(old, SyncError)
            assert "no longer served" in old.message


async def test_bad_answers_fail_the_session_and_change_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await create(a)
            for i in range(10):
                await put(a, context, f"k{i}")
            await fold_now(cluster)

            original = SyncServer._read_snapshot_page

            async def shuffled(*args: Any) -> Any:
                records, next_cursor, begin = await original(*args)
                return records[::-1], next_cursor, begin

            monkeypatch.setattr(SyncServer, "_read_snapshot_page", shuffled)
            await join(cluster, 0, 1, context)  # the join succeeds; its snapshot does not
            assert sessions(c, "snapshot", "failed") == 1
            assert await c.contexts.is_fresh(context)
            monkeypatch.undo()
            await c.sync.sync_now(context, cluster.peer_ids[0])
            await converged(cluster, [a, c], context)


# -- the DAG's bookkeeping --------------------------------------------------------------------


def _id(n: int) -> bytes:
    return n.to_bytes(32, "big")


def test_checkpoint_marks_heads_covers_ancestors_and_releases_children() -> None:
    dag: CausalDag[str] = CausalDag()
    dag.offer(_id(1), [GENESIS], "1", now=0)
    # Fetched on the way down from the peer's head 5: 5 and its parent 4 wait for 3.
    dag.offer(_id(5), [_id(4)], "5", now=0)
    dag.offer(_id(4), [_id(3)], "4", now=0)
    # Gossip after the peer's head: 6 waits for 5; 7 waits for 6 and for 9 (unknown).
    dag.offer(_id(6), [_id(5)], "6", now=0)
    dag.offer(_id(7), [_id(6), _id(9)], "7", now=0)
    applied: list[bytes] = []

    def apply(delta_id: bytes, _item: str) -> bool:
        applied.append(delta_id)
        return True

    released, covered = dag.checkpoint([_id(5)], superseded=[_id(1)], apply=apply)
    assert sorted(d for d, _ in covered) == [_id(4), _id(5)]
    assert [d for d, _ in released] == applied == [_id(6)]
    assert dag.heads == {_id(6)}
    assert {_id(4), _id(5), _id(6)} <= dag.applied
    assert dag.pending_count == 1  # 7 still waits for 9
    assert dag.missing() == {_id(9)}
    # Checkpointing an id already applied changes nothing.
    assert dag.checkpoint([_id(1)]) == ([], [])
    assert dag.heads == {_id(6)}


def test_checkpoint_heads_are_the_union_of_both_sides() -> None:
    """Both sides of a tree comparison end with the maximal ids of the union."""
    shared, a1, b1 = _id(1), _id(2), _id(3)
    side_a: CausalDag[str] = CausalDag(applied=[shared, a1], heads=[a1])
    side_b: CausalDag[str] = CausalDag(applied=[shared, b1], heads=[b1])
    side_a.checkpoint([b1], superseded=[])
    side_b.checkpoint([a1], superseded=[])
    assert side_a.heads == side_b.heads == {a1, b1}
    # One side strictly ahead: the other's head is superseded (the peer had applied it).
    behind: CausalDag[str] = CausalDag(applied=[shared], heads=[shared])
    behind.checkpoint([a1], superseded=[shared])
    assert behind.heads == {a1}
