"""Sync: a fresh member joining a large context, convergence after a partition heals,
propagation latency across 5 nodes, and one sync session. Every baseline is measured in the
same run.

* **Join.** A member holds a context with ``n`` entries, its history final and folded (so
  it is final state a joiner takes as a streamed snapshot); a fresh node (app installed,
  nothing else) joins with ``joins.join(invitation)``. Timed: from the call until the joiner's root
  hash equals the member's (the member's root moves once more during the join: admitting the
  joiner is a membership delta). The row names the sync protocol(s) the joiner's sessions
  used (``trionode_sync_sessions``), so whatever the join does is what is measured.
  Baseline: copying the same number of bytes through one noise+yamux stream between two
  fresh `Host`s on loopback (dial, open the stream, send, wait for the receiver's ack after
  EOF): the member's LMDB state rows of the context (key + value bytes) when the join took a
  snapshot, the sum of its delta rows when it fetched deltas.
* **Partition heal.** 5 in-process nodes (`open_cluster`: memory network, full mesh, real
  clock, the cluster's short redial timers, default sync timers, discovery on as in a real
  node, so member peers are redialed), partition {A} | {B..E};
  A writes ``k`` deltas, B..E write ``k`` between them (round-robin); heal; time from the heal
  until every node has the same root and heads and nothing pending (this includes the
  redial, the re-subscription and the sync sessions it starts; each heal first waits a
  seeded random part of `sync.heartbeat`, so the rounds sample the heartbeat's phase instead
  of locking onto it); median and max over the rounds. Each round logs when A's first
  connection came back (the reconnection's share). Baseline: the same writes without a
  partition, from the last write returning until the same convergence. With ``--heal``
  only these rows run, then again with delta answers that carry no ancestors
  (``sync.max_ancestors = 0``: a chain one round trip per delta, as before
  `/trionode/sync/2`), each beside its own no-partition baseline.
* **Propagation.** 5 real nodes on loopback TCP, full mesh. A write on A; the time from
  ``execute`` returning on A (the delta is committed there and handed to gossip) until the
  last of the other 4 has applied it (their ``node.hub`` subscriptions report it); p50/p99
  over the rounds, one write in flight at a time. Baseline: raw gossip on a separate topic of
  the same 5 nodes, a random payload of the delta's wire size published on A until the last
  of the other 4 nodes' event consumers handled it (``node.events.observe()``), interleaved
  round by round with the writes.
* **One sync session.** 2 real nodes on loopback TCP, sync sessions only when the bench
  runs one; B leaves the context's gossip topic, so A's writes reach it only by sync. A
  writes 10 deltas, then B runs a session with A (`sync_now`: the heads exchange and the
  delta fetch on the session's one stream); p50/p99 over the rounds. Baseline, interleaved
  round by round: the same session composed as sessions ran before, the heads exchange on
  one stream and the fetch on a second.

**Entries and writes.** Populating a context one ``kv_store.set`` per entry costs O(entries)
per call (each call recomputes the root hash, and the map's Merkle node hashes every child
digest), ~10 ms/call at 5k entries: 100k that way would take hours. So every case runs on
a bench bundle made at run time: the ``kv_store`` app's own source plus one method,
``set_many(items)``, that sets many keys in one delta and emits no events (the same state
schema, so a join moves the same records as with ``kv_store``). The partition and
propagation writes are ``set_many`` with one key: one delta each, and no event handlers on
the receivers (``kv_store.set`` would add a handler delta per receiving node).

Standalone: ``python -m benchmarks.sync_bench [--quick] [--heal]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final

import attrs
import base58
import trio
import trio.testing
from msgspec.structs import replace

from benchmarks.harness import Row, render
from benchmarks.transport_baseline import READ_SIZE, _percentile
from benchmarks.transport_bench import _host
from trionode.config import FileConfig
from trionode.context.events import ContextEvent
from trionode.context.folding import fold_all
from trionode.context.records import DELTAS, STATE
from trionode.context.replication import topic_for
from trionode.net.events import GossipMessage
from trionode.net.host import Connection
from trionode.node import Node
from trionode.testing import open_cluster, open_test_node
from trionode.wire.keys import PeerId

KV_STORE: Final = Path(__file__).resolve().parents[1] / "apps" / "kv_store"
SINK: Final = "/bench/sink/1.0.0"
RAW_TOPIC: Final = "bench/raw-gossip"
CHUNK: Final = 1000
"""Keys per ``set_many`` call while populating."""
VALUE_BYTES: Final = 100
NODES: Final = 5
POLL: Final = 0.002
"""Longest wait between two checks of a condition (`_until`)."""

_SET_MANY: Final = '''
    @app.method
    def set_many(self, items: dict[str, str]) -> None:
        """Bench only: insert or overwrite every key of `items` in one delta, no events."""
        for key, value in items.items():
            self.items[key].set(value)

'''
_ANCHOR: Final = "    @app.view\n    def get(self, key: str)"


# -- helpers ----------------------------------------------------------------------------------


def _bench_bundle(where: Path) -> Path:
    """``apps/kv_store`` with ``set_many`` added to its state class (module docstring)."""
    source = (KV_STORE / "kv_store.py").read_text()
    if _ANCHOR not in source:
        raise RuntimeError("apps/kv_store/kv_store.py changed: update sync_bench._ANCHOR")
    manifest = json.loads((KV_STORE / "manifest.json").read_text())
    manifest["version"] += "+bench.set-many"
    where.mkdir(parents=True)
    (where / "kv_store.py").write_text(source.replace(_ANCHOR, _SET_MANY + _ANCHOR, 1))
    (where / "manifest.json").write_text(json.dumps(manifest))
    return where


def _fast(file: FileConfig) -> FileConfig:
    """Loopback nodes as the replication tests run them: quick gossip heartbeats and no
    dialing toward a peer target (only the connections the benchmark makes)."""
    return replace(
        file,
        pubsub=replace(file.pubsub, heartbeat_interval=0.2),
        network=replace(file.network, target_peers=0),
    )


def _items(prefix: str, start: int, n: int) -> dict[str, str]:
    return {
        f"{prefix}:{i:08d}": (f"value {prefix} {i:08d} " * 8)[:VALUE_BYTES]
        for i in range(start, start + n)
    }


async def _set_many(node: Node, context: bytes, items: dict[str, str]) -> bytes:
    result = await node.contexts.execute(context, "set_many", json.dumps({"items": items}))
    assert result.delta_id is not None
    return result.delta_id


async def _share(nodes: Sequence[Node], bundle: Path) -> bytes:
    """nodes[0] creates a context; every other node installs the app, is invited, joins."""
    app_id = b""
    for node in nodes:
        app_id = (await node.applications.install(str(bundle))).application_id
    context = (await nodes[0].contexts.create(app_id)).context_id
    for node in nodes[1:]:
        await node.joins.join(await nodes[0].joins.invite(context))
    return context


async def _converged(nodes: Sequence[Node], context: bytes) -> bool:
    states = [await node.contexts.state(context) for node in nodes]
    return all(s == states[0] for s in states) and states[0][2] == 0


async def _wait_converged(nodes: Sequence[Node], context: bytes, limit: float = 120) -> None:
    await _until(lambda: _converged(nodes, context), nodes, limit)


async def _until(done: Callable[[], Awaitable[bool]], nodes: Sequence[Node], limit: float) -> None:
    """Re-check `done` after each delta any node applies, and at least every `POLL` seconds
    (snapshots and tree comparisons change state without a hub event)."""
    with trio.fail_after(limit):
        while not await done():
            with trio.move_on_after(POLL):
                async with trio.open_nursery() as nursery:
                    for node in nodes:
                        nursery.start_soon(_next_event, node, nursery.cancel_scope)


async def _next_event(node: Node, scope: trio.CancelScope) -> None:
    sub = node.hub.open()
    sub.contexts.update(_b58(c) for c in node.contexts.known_ids())
    try:
        await sub.receive.receive()
        scope.cancel()
    finally:
        sub.close()


@functools.lru_cache(maxsize=64)
def _b58(context_id: bytes) -> str:
    # Once per context, not per node per poll: the bench's own watcher shares the nodes'
    # event loop, and encoding every id anew was ~20 ms of a heal's ~250 ms of CPU.
    return base58.b58encode(context_id).decode()


def _sessions(node: Node) -> dict[str, int]:
    """Sync sessions the node ran, by "protocol/outcome"."""
    out: dict[str, int] = {}
    for metric in node.sync.metrics.sessions.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.value:
                key = f"{sample.labels['protocol']}/{sample.labels['outcome']}"
                out[key] = out.get(key, 0) + int(sample.value)
    return out


def _failed_sessions(nodes: Sequence[Node]) -> int:
    return sum(v for node in nodes for k, v in _sessions(node).items() if k.endswith("/failed"))


def _retired(nodes: Sequence[Node]) -> int:
    """Connections that lost a simultaneous dial, over all nodes (each end counts one)."""
    total = 0.0
    for node in nodes:
        for metric in node.host.metrics.retired.collect():
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return int(total)


def _log(message: str) -> None:
    print(f"  sync: {message}", file=sys.stderr)


# -- 1. join ----------------------------------------------------------------------------------


async def _sink(stream: trio.abc.Stream, _conn: Connection) -> None:
    while await stream.receive_some(READ_SIZE):
        pass
    await stream.send_all(b"\x01")
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


async def copy_seconds(total_bytes: int) -> float:
    """Dial a fresh Host on loopback, open one stream, send `total_bytes`, half-close and
    wait for the receiver's ack (sent once it has read everything)."""
    with trio.fail_after(60 + total_bytes / 1e6):
        async with _host() as server, _host() as client:
            server.set_handler(SINK, _sink)
            chunk = b"\x5a" * (1 << 20)
            started = time.perf_counter()
            conn = await client.connect(server.addresses()[0])
            _, stream = await conn.new_stream([SINK])
            sent = 0
            while sent < total_bytes:
                n = min(len(chunk), total_bytes - sent)
                await stream.send_all(chunk[:n])
                sent += n
            await stream.send_eof()
            ack = await stream.receive_some(1)
            elapsed = time.perf_counter() - started
            assert ack == b"\x01"
            await stream.aclose()
    return elapsed


async def _row_bytes(node: Node, context: bytes) -> tuple[int, int]:
    """(state rows, delta rows) of `context` in the node's LMDB, key + value bytes."""
    state = await node.store.scan(STATE, prefix=context)
    deltas = await node.store.scan(DELTAS, prefix=context)
    return sum(len(k) + len(v) for k, v in state), sum(len(k) + len(v) for k, v in deltas)


def _folding(file: FileConfig) -> FileConfig:
    """`_fast`, and history folds only when the bench says (`fold_all`): the member's whole
    context is final state, which a joiner takes as a snapshot."""
    file = _fast(file)
    return replace(file, store=replace(file.store, delta_retention=0.0, fold_interval=1e6))


async def _join_rows(n: int, base: Path, bundle: Path) -> list[Row]:
    async with (
        open_test_node(base / "member", api=False, configure=_folding) as member_node,
        open_test_node(base / "joiner", api=False, configure=_fast) as joiner_node,
    ):
        member, joiner = member_node.node, joiner_node.node
        app_id = (await member.applications.install(str(bundle))).application_id
        await joiner.applications.install(str(bundle))
        context = (await member.contexts.create(app_id)).context_id
        started = time.perf_counter()
        for start in range(0, n, CHUNK):
            await _set_many(member, context, _items("key", start, min(CHUNK, n - start)))
        populate = time.perf_counter() - started
        count = (await member.contexts.execute(context, "len", "{}")).result
        assert count == n, f"populated {count} entries, wanted {n}"
        # One admin: its latest delta acks everything, so the whole history is final.
        await fold_all(member.contexts.replicas, retention=0.0, max_batch=1024)
        state_bytes, delta_bytes = await _row_bytes(member, context)
        _log(
            f"{n:,} entries populated in {populate:.1f}s ({-(-n // CHUNK)} set_many calls); "
            f"state rows {state_bytes:,} B, delta rows {delta_bytes:,} B"
        )
        invitation = await member.joins.invite(context)
        started = time.perf_counter()
        await joiner.joins.join(invitation)
        returned = time.perf_counter() - started

        async def same_root() -> bool:
            ours, _, _ = await joiner.contexts.state(context)
            theirs, _, _ = await member.contexts.state(context)
            return ours == theirs

        await _until(same_root, [member, joiner], 600)
        joined = time.perf_counter() - started
        sessions = _sessions(joiner)
        _log(
            f"join of {n:,}: join() returned after {returned:.2f}s, same root after "
            f"{joined:.2f}s; joiner sessions {sessions}"
        )
    snapshot = any(key.startswith("snapshot/") for key in sessions)
    copied = state_bytes if snapshot else delta_bytes
    what = "state rows" if snapshot else "delta rows"
    copy = statistics.median([await copy_seconds(copied) for _ in range(3)])
    how = (
        ", ".join(f"{k} x{v}" for k, v in sorted(sessions.items()))
        or "deltas fetched by join, no sync session"
    )
    return [
        Row(
            f"fresh member joins {n:,}-entry context -> same root ({how})",
            joined,
            "s",
            f"copy member's {what} ({copied / 1e6:.1f} MB) over 1 noise+yamux stream",
            copy,
            higher_is_better=False,
        )
    ]


# -- 2. partition heal ------------------------------------------------------------------------


async def _write_sides(nodes: Sequence[Node], context: bytes, k: int, tag: str) -> None:
    """A writes `k` deltas and B..E write `k` between them, both sides at once."""

    async def side(writers: Sequence[Node], prefix: str) -> None:
        for i in range(k):
            await _set_many(writers[i % len(writers)], context, _items(prefix, i, 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, nodes[:1], f"{tag}-a")
        nursery.start_soon(side, nodes[1:], f"{tag}-b")


async def _partition_times(
    k: int,
    rounds: int,
    base: Path,
    bundle: Path,
    *,
    jitter: bool,
    configure: Callable[[FileConfig], FileConfig] | None = None,
) -> tuple[list[float], list[float]]:
    """Seconds to converge after each heal, and after the same writes without a partition.

    A heal is noticed at the next sync heartbeat (`sync.heartbeat`) of a node that lacks
    something; heartbeats keep their phase, and a loop of rounds would keep healing at the
    same point of it. So with `jitter` each heal waits a random part of a heartbeat period
    first (seeded), which samples the phase as a real partition would.
    """
    rng = random.Random(7)  # a reproducible delay
    healed: list[float] = []
    unpartitioned: list[float] = []
    with trio.fail_after(120 + rounds * 60):
        async with open_cluster(NODES, base, discovery=True, configure=configure) as cluster:
            nodes = cluster.nodes
            context = await _share(nodes, bundle)
            await _wait_converged(nodes, context)
            for r in range(rounds):
                await _write_sides(nodes, context, k, f"plain{r}")
                started = time.perf_counter()
                await _wait_converged(nodes, context)
                unpartitioned.append(time.perf_counter() - started)
            for r in range(rounds):
                await cluster.partition([0])
                await _write_sides(nodes, context, k, f"split{r}")
                await _wait_converged(nodes[1:], context)
                if jitter:
                    await trio.sleep(rng.uniform(0, nodes[0].config.sync.heartbeat))
                before = _sessions(nodes[0])
                failed_before = _failed_sessions(nodes)
                retired_before = _retired(nodes)
                started = time.perf_counter()
                reconnected: list[float] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_first_connection, nodes[0], started, reconnected)
                    await cluster.heal(wait=False)
                    await _wait_converged(nodes, context)
                    healed.append(time.perf_counter() - started)
                after = _sessions(nodes[0])
                ran = {key: v - before.get(key, 0) for key, v in after.items()}
                _log(
                    f"heal {r}: A reconnected after {reconnected[0]:.2f}s, converged after "
                    f"{healed[-1]:.2f}s; A's new sessions "
                    f"{ ({key: v for key, v in ran.items() if v}) }; failed sessions (all "
                    f"nodes) {_failed_sessions(nodes) - failed_before}, connections retired "
                    f"after a simultaneous dial {_retired(nodes) - retired_before}"
                )
    return healed, unpartitioned


async def _first_connection(node: Node, started: float, out: list[float]) -> None:
    """Append the seconds from `started` until `node` has a connection again."""
    while not node.host.is_online():
        await node.host.wait_connection_changed()
    out.append(time.perf_counter() - started)


# -- 3. propagation ---------------------------------------------------------------------------


class _Arrivals:
    """When each of the receivers saw each key (delta id or gossip payload)."""

    def __init__(self, receivers: int) -> None:
        self.receivers = receivers
        self.seen: dict[bytes, list[float]] = {}
        self.changed = trio.Event()

    def arrived(self, key: bytes) -> None:
        self.seen.setdefault(key, []).append(time.perf_counter())
        if len(self.seen[key]) == self.receivers:
            self.changed.set()
            self.changed = trio.Event()

    async def last(self, key: bytes) -> float:
        """The time the last receiver saw `key`."""
        while len(self.seen.get(key, ())) < self.receivers:
            await self.changed.wait()
        return max(self.seen[key])


async def _read_hub(node: Node, context: bytes, arrivals: _Arrivals) -> None:
    sub = node.hub.open()
    sub.contexts.add(base58.b58encode(context).decode())
    try:
        async for event in sub.receive:
            if isinstance(event, ContextEvent):  # not transient notices
                arrivals.arrived(bytes.fromhex(event.delta_id))
    finally:
        sub.close()


async def _read_gossip(node: Node, arrivals: _Arrivals, ready: trio.Event) -> None:
    with node.events.observe(capacity=10_000) as seen:
        ready.set()
        async for event in seen:
            if isinstance(event, GossipMessage) and event.topic == RAW_TOPIC:
                arrivals.arrived(event.data)


async def _wait_raw_mesh(nodes: Sequence[Node]) -> None:
    with trio.fail_after(30):
        for node in nodes:
            others = {n.host.peer_id for n in nodes if n is not node}
            while not (
                others <= set(node.pubsub.topic_peers(RAW_TOPIC))
                and len(node.pubsub.mesh_peers(RAW_TOPIC))
                >= min(node.config.pubsub.d_lo, len(others))
            ):
                await node.pubsub.wait_heartbeat()


async def loopback_mesh(stack: AsyncExitStack, base: Path) -> list[Node]:
    """`NODES` real nodes (`_fast`) under `base`, on loopback, connected in a full mesh
    (closed with `stack`)."""
    nodes = [
        (
            await stack.enter_async_context(
                open_test_node(base / f"node{i}", api=False, configure=_fast)
            )
        ).node
        for i in range(NODES)
    ]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            await a.host.connect(b.host.addresses()[0])
    return nodes


async def wait_stored(nodes: Sequence[Node], context: bytes, delta_id: bytes) -> None:
    """Until every node has stored the delta: a received delta is shown while its commit
    runs (`trionode/context/pipeline.py`), and the next round (a raw gossip one too) must
    not share the machine with the end of those commits. A view is a job of the node's
    delta processor, which takes it only once the batch before it is committed."""
    for node in nodes:
        # (A view of one key: `len` walked every entry, in the delta processor, and the
        # propagation bench's CPU row counted it as receiving: issue #16.)
        await node.contexts.execute(context, "get", '{"key": ""}')
        if await node.contexts.read_delta(context, delta_id) is None:
            raise RuntimeError(f"{node.peer_id} showed {delta_id.hex()[:16]} but did not store it")


@attrs.frozen
class PropagationMesh:
    """`NODES` loopback nodes sharing a context, each receiver's hub and raw gossip read."""

    nodes: list[Node]
    context: bytes
    applied: _Arrivals
    """When each receiver's hub showed each delta."""
    gossiped: _Arrivals
    """When each receiver got each raw gossip payload."""


@asynccontextmanager
async def propagation_mesh(base: Path, bundle: Path) -> AsyncIterator[PropagationMesh]:
    """The propagation rows' nodes (`loopback_mesh`), converged on a shared context and
    meshed on the raw topic, with their readers running."""
    async with AsyncExitStack() as stack:
        nodes = await loopback_mesh(stack, base)
        context = await _share(nodes, bundle)
        await _wait_converged(nodes, context)
        for node in nodes:
            node.pubsub.subscribe(RAW_TOPIC)
        await _wait_raw_mesh(nodes)
        mesh = PropagationMesh(nodes, context, _Arrivals(NODES - 1), _Arrivals(NODES - 1))
        async with trio.open_nursery() as readers:
            for node in nodes[1:]:
                readers.start_soon(_read_hub, node, context, mesh.applied)
                ready = trio.Event()
                readers.start_soon(_read_gossip, node, mesh.gossiped, ready)
                await ready.wait()
            yield mesh
            readers.cancel_scope.cancel()


async def _propagation(rounds: int, base: Path, bundle: Path) -> tuple[list[float], list[float]]:
    """(write latencies, raw gossip latencies) in seconds, interleaved round by round."""
    writes: list[float] = []
    raw: list[float] = []
    firsts: list[float] = []
    with trio.fail_after(120 + rounds):
        async with propagation_mesh(base, bundle) as mesh:
            nodes, context, applied, gossiped = (
                mesh.nodes,
                mesh.context,
                mesh.applied,
                mesh.gossiped,
            )
            await trio.testing.wait_all_tasks_blocked()
            writer = nodes[0]
            size = 0
            for r in range(rounds):
                delta_id = await _set_many(writer, context, _items("prop", r, 1))
                committed = time.perf_counter()
                writes.append(await applied.last(delta_id) - committed)
                firsts.append(min(applied.seen[delta_id]) - committed)
                await wait_stored(nodes[1:], context, delta_id)
                if not size:
                    wire = await writer.contexts.read_delta(context, delta_id)
                    size = len(wire or b"")
                payload = os.urandom(size)
                started = time.perf_counter()
                writer.pubsub.publish(RAW_TOPIC, payload)
                raw.append(await gossiped.last(payload) - started)
            _log(
                f"propagation: delta wire size {size} B, {rounds} rounds; applied on the "
                f"first of 4 p50 {_percentile(firsts, 0.5) * 1000:.2f} ms"
            )
    return writes, raw


# -- 4. one sync session ----------------------------------------------------------------------


def _quiet(file: FileConfig) -> FileConfig:
    """`_fast`, and sync sessions only when the benchmark runs one."""
    file = _fast(file)
    return replace(
        file, sync=replace(file.sync, heartbeat=10_000.0, interval=10_000.0, on_join=False)
    )


async def _two_stream_session(node: Node, peer: PeerId, context: bytes) -> int:
    """A delta-sync session as sessions ran before #17's one stream: the heads exchange on
    one stream, the fetch on a second (the same machines, the same requests)."""
    async with node.replicator.session(peer, context) as (channel, _):
        heads = await node.replicator.ask_heads_on(channel, context)
    wanted = await node.contexts.unknown(context, heads.heads)
    return await node.replicator.fetch(peer, context, wanted)


async def _session_times(
    rounds: int, k: int, base: Path, bundle: Path
) -> tuple[list[float], list[float]]:
    """Seconds of one delta-sync session of B with A (B lacks `k` deltas A wrote): the
    session as it runs now (one stream) and composed of two streams, interleaved round by
    round on the same two loopback nodes. B is off the context's topic, so the deltas
    reach it only by the session."""
    one: list[float] = []
    two: list[float] = []
    with trio.fail_after(120 + rounds * 10):
        async with AsyncExitStack() as stack:
            a, b = [
                (
                    await stack.enter_async_context(
                        open_test_node(base / f"node{i}", api=False, configure=_announcing_at_once)
                    )
                ).node
                for i in range(2)
            ]
            await a.host.connect(b.host.addresses()[0])
            context = await _share([a, b], bundle)
            await _wait_converged([a, b], context)
            topic = topic_for(context)
            for r in range(rounds):
                for session, times in ((None, one), (_two_stream_session, two)):
                    # A session that applied deltas announces B's new heads on the topic,
                    # subscribing B again (a member belongs on its context's topic): leave
                    # it again before each round, or A's writes reach B by gossip. The
                    # announcement runs as its own task: let it end first, or it subscribes
                    # B again after B left (and the round's deltas reach B before its
                    # session: "applied 0 deltas").
                    await _until(lambda: _announced(b, context), [a, b], limit=30)
                    b.pubsub.unsubscribe(topic)
                    await _until(lambda: _absent(a, topic, b.host.peer_id), [a, b], limit=30)
                    for i in range(k):
                        await _set_many(a, context, _items(f"session{r}-{len(times)}", i, 1))
                    started = time.perf_counter()
                    if session is None:
                        applied = await b.sync.sync_now(context, a.host.peer_id)
                    else:
                        applied = await session(b, a.host.peer_id, context)
                    times.append(time.perf_counter() - started)
                    if applied != k:
                        raise RuntimeError(f"a session applied {applied} deltas, not {k}")
    return one, two


def _announcing_at_once(file: FileConfig) -> FileConfig:
    """`_quiet`, and a session's announcement sent as soon as the session ends (not held
    for `announce_interval` after the one before: it would land in a later round)."""
    file = _quiet(file)
    return replace(file, sync=replace(file.sync, announce_interval=1e-6))


async def _announced(node: Node, context: bytes) -> bool:
    """Whether no announcement of `context` is due on `node`."""
    return not node.sync.announcement_due(context)


async def _absent(node: Node, topic: str, peer: PeerId) -> bool:
    return peer not in node.pubsub.topic_peers(topic)


# -- the suite --------------------------------------------------------------------------------


def _one_generation(file: FileConfig) -> FileConfig:
    """Delta answers without ancestors: a chain comes one round trip per delta (as on
    `/trionode/sync/1`)."""
    return replace(file, sync=replace(file.sync, max_ancestors=0))


async def heal_rows(
    k: int, rounds: int, base: Path, bundle: Path, *, quick: bool, one_generation: bool = False
) -> list[Row]:
    """Median (and max) of `_partition_times` beside the no-partition baseline; with
    `one_generation`, the same rounds again with delta answers that carry no ancestors."""
    rows: list[Row] = []
    cases: list[tuple[str, Callable[[FileConfig], FileConfig] | None]] = [("", None)]
    if one_generation:
        cases.append((", answers without ancestors", _one_generation))
    for suffix, configure in cases:
        healed, plain = await _partition_times(
            k,
            rounds,
            base / f"partition{len(rows)}",
            bundle,
            jitter=not quick,
            configure=configure,
        )
        heartbeat = FileConfig().sync.heartbeat
        figures = [("median", statistics.median(healed), statistics.median(plain))]
        if rounds > 1:
            figures.append(("max", max(healed), max(plain)))
        for name, ours, theirs in figures:
            rows.append(
                Row(
                    f"5 nodes (memory net), {{A}}|{{B..E}}, {k}+{k} deltas: heal -> converged, "
                    f"{name} of {rounds} (sync.heartbeat {heartbeat:g} s){suffix}",
                    ours,
                    "s",
                    "same writes, no partition: last write -> converged",
                    theirs,
                    higher_is_better=False,
                )
            )
    return rows


async def run(*, quick: bool, heal_only: bool = False) -> list[Row]:
    sizes = [1_000] if quick else [10_000, 100_000]
    k, heal_rounds = (5, 1) if quick else (20, 8)
    rounds = 30 if quick else 300
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trionode-sync-bench-") as tmp:
        base = Path(tmp)
        bundle = _bench_bundle(base / "bundle")
        if heal_only:
            return await heal_rows(k, heal_rounds, base, bundle, quick=quick, one_generation=True)
        for n in sizes:
            rows += await _join_rows(n, base / f"join-{n}", bundle)
        rows += await heal_rows(k, heal_rounds, base, bundle, quick=quick)
        writes, raw = await _propagation(rounds, base / "propagation", bundle)
        session_rounds = 20 if quick else 200
        one, two = await _session_times(session_rounds, 10, base / "session", bundle)
    return rows + propagation_rows(writes, raw) + session_rows(one, two)


def propagation_rows(writes: list[float], raw: list[float]) -> list[Row]:
    """p50 and p99 of `_propagation`'s latencies, in ms."""
    return [
        Row(
            f"write on A -> applied on last of 4 (loopback, full mesh) {name}, "
            f"{len(writes)} rounds",
            _percentile(writes, q) * 1000,
            "ms",
            "raw gossip publish -> last of 4, same nodes",
            _percentile(raw, q) * 1000,
            higher_is_better=False,
        )
        for q, name in ((0.5, "p50"), (0.99, "p99"))
    ]


def session_rows(one: list[float], two: list[float]) -> list[Row]:
    """p50 and p99 of `_session_times`, in ms: one stream against two."""
    return [
        Row(
            f"sync session of B with A (loopback), B lacks 10 deltas: one stream {name}, "
            f"{len(one)} rounds",
            _percentile(one, q) * 1000,
            "ms",
            "same session on two streams (heads, then fetch), interleaved",
            _percentile(two, q) * 1000,
            higher_is_better=False,
        )
        for q, name in ((0.5, "p50"), (0.99, "p99"))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync_bench")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--heal",
        action="store_true",
        help="only the partition heal, also with delta answers that carry no ancestors",
    )
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick, heal_only=args.heal))))


if __name__ == "__main__":
    main()
