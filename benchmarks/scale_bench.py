"""Scale: many idle contexts on one node, and many nodes in one context.

* **Idle contexts.** Two in-process nodes (`open_cluster`, memory network, real clock, the
  node's default gossip and sync timers) share ``n`` contexts: node 0 creates each one and
  node 1 joins it, as members do. Then nothing happens for a measured window. Rows:
  - CPU the process spends per second of idle time (both nodes), beside the same two nodes
    sharing no context (what the transport and gossipsub cost on their own);
  - resident memory of the two nodes with ``n`` contexts, beside the same two nodes before
    the first context (the case names the increase per context);
  - bytes per second crossing the network between the two nodes while idle (sync
    heartbeats, gossipsub control traffic), beside ``n`` times what one shared context costs
    over the same window (so a ratio above 1 means contexts share their traffic, below 1
    that each costs more than it does alone).
* **Many nodes.** ``m`` in-process nodes on a memory network, each dialing 4 random earlier
  nodes (a sparse random graph, as discovery would leave it), all members of one context.
  ``w`` writes (one ``set_many`` key each, no event handlers) from random members, one after
  another; the time from the first write until every node has the same root and heads, beside
  the time the writes take on their writers alone (until the last one returned), and beside
  raw gossip in the same cluster afterwards: random payloads of each delta's wire size,
  published by the same writers at the same offsets from the first, until every node saw
  every one. Gossip copies sent per write (the routers' ``forwarded`` counts: publishes,
  forwards and IWANT replies, summed over nodes) beside gossipsub's expectation of ``D x m``
  (every node relays each message to its ``D`` mesh peers) and beside the raw gossip's;
  wire bytes per write (every byte the memory network carried) beside the raw gossip's. The
  nodes run their default sync timers (a lost gossip copy is repaired by a heartbeat's
  session), so the copies and bytes counted include the heartbeats sent meanwhile: one per
  node per `sync.heartbeat` seconds (the raw phase carries them too).
  The nodes run the timers they ship with (the idle case's too), not the cluster's short
  test timers. The full size, 100 nodes and 1,000 writes, is one process on one core: run
  it with ``TMPDIR`` on a tmpfs (``/dev/shm``), or the 100 LMDB fsyncs per write measure
  the disk.

Standalone: ``python -m benchmarks.scale_bench [--quick] [--many NODES WRITES] [--idle CONTEXTS]``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import attrs
import base58
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace
from prometheus_client import Counter

from benchmarks.harness import Row, render, timed
from benchmarks.sync_bench import (
    RAW_TOPIC,
    _bench_bundle,
    _items,
    _set_many,
)
from trionode.config import FileConfig, NetworkSection, PubsubSection, SyncSection
from trionode.context.errors import PeerFailed
from trionode.context.replication import topic_for
from trionode.dag.delta import GENESIS, DeltaBody, seal_delta
from trionode.net.events import GossipMessage
from trionode.net.memory import MemoryNetwork
from trionode.node import Node
from trionode.sync.machines import HeaderCache, ReadAncestors, ReadDeltas, Responder
from trionode.testing import Topology, open_cluster
from trionode.wire.messages import MAX_ANCESTORS, DeltaRequest, DeltaResponse, SyncAuth

IDLE_WINDOW: Final = 20.0
"""Seconds of idle time measured (several sync heartbeats and many gossipsub heartbeats)."""
QUICK_IDLE_WINDOW: Final = 6.0
EDGES_PER_NODE: Final = 4
SEED: Final = 16


def _log(message: str) -> None:
    print(f"  scale: {message}", file=sys.stderr, flush=True)


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _default_timers(file: FileConfig) -> FileConfig:
    """Undo the cluster's short test timers: an idle node measured as it ships."""
    defaults = NetworkSection()
    network = replace(
        file.network,
        ping_interval=defaults.ping_interval,
        ping_timeout=defaults.ping_timeout,
        target_peers=0,
    )
    return replace(file, network=network, pubsub=PubsubSection(), sync=SyncSection())


class _Idle:
    """What one idle window cost: process CPU seconds, wire bytes, heartbeat bytes sent
    (both nodes, `trionode_heartbeat_bytes`), wall seconds."""

    def __init__(self, cpu: float, wire: int, heartbeat: int, wall: float) -> None:
        self.cpu = cpu
        self.wire = wire
        self.heartbeat = heartbeat
        self.wall = wall

    @property
    def cpu_share(self) -> float:
        return self.cpu / self.wall

    @property
    def bytes_per_second(self) -> float:
        return self.wire / self.wall

    @property
    def heartbeat_per_second(self) -> float:
        return self.heartbeat / self.wall


def _heartbeat_bytes(nodes: Sequence[Node]) -> int:
    return sum(
        int(sample.value)
        for node in nodes
        for family in node.replication_metrics.heartbeat.bytes.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("direction") == "sent"
    )


async def _measure_idle(network: MemoryNetwork, nodes: Sequence[Node], window: float) -> _Idle:
    wire = network.statistics().bytes_sent
    heartbeat = _heartbeat_bytes(nodes)
    cpu = time.process_time()
    started = time.perf_counter()
    await trio.sleep(window)
    wall = time.perf_counter() - started
    return _Idle(
        time.process_time() - cpu,
        network.statistics().bytes_sent - wire,
        _heartbeat_bytes(nodes) - heartbeat,
        wall,
    )


def _activity(nodes: Sequence[Node]) -> tuple[int, ...]:
    """What moves while a node is not idle yet: deltas by outcome (applied, pending,
    folded...), sync sessions, acks in and out, deltas served and fetched, on every node."""
    counters: list[Counter] = []
    for node in nodes:
        counters += [
            node.replication_metrics.deltas,
            node.replication_metrics.served_deltas,
            node.replication_metrics.fetches,
            node.sync.metrics.sessions,
        ]
    totals = _labelled(counters)
    acks = sum(
        int(sample.value)
        for node in nodes
        for family in node.metrics.registry.collect()
        if family.name == "trionode_acks"
        for sample in family.samples
        if sample.name.endswith("_total")
    )
    return (*totals.values(), len(totals), acks)


async def _settle(nodes: Sequence[Node], quiet: float, limit: float) -> float:
    """Wait until nothing has moved (`_activity`) for `quiet` seconds, at most `limit`;
    returns the seconds waited. After thousands of joins the acks, their folding into
    finality and the last sessions run for a while: a window opened 2 s after the joins
    caught them (3.4-10.9 % CPU for the same idle node)."""
    started = time.perf_counter()
    last = _activity(nodes)
    quiet_since = started
    while time.perf_counter() - started < limit:
        await trio.sleep(1.0)
        now = _activity(nodes)
        if now != last:
            last, quiet_since = now, time.perf_counter()
        elif time.perf_counter() - quiet_since >= quiet:
            break
    return time.perf_counter() - started


async def _share_many(a: Node, b: Node, app_id: bytes, n: int) -> None:
    for i in range(n):
        context = (await a.contexts.create(app_id)).context_id
        await b.joins.join(await a.joins.invite(context))
        if (i + 1) % 200 == 0:
            _log(f"{i + 1:,} contexts shared")


SETTLE_QUIET: Final = SyncSection().ack_interval + SyncSection().heartbeat
"""Seconds without a delta, session or ack that count as settled: longer than one ack
round, which acks what the last joins brought."""
SETTLE_LIMIT: Final = 240.0


async def _idle_rows(n: int, window: float, base: Path) -> list[Row]:
    bundle = _bench_bundle(base / "bundle")
    network = MemoryNetwork()
    async with open_cluster(2, base / "idle", network=network, configure=_default_timers) as c:
        a, b = c[0], c[1]
        nodes = [a, b]
        app_id = b""
        for node in (a, b):
            app_id = (await node.applications.install(str(bundle))).application_id
        await trio.sleep(2.0)  # let start-up work (identify, mesh joins) finish before measuring
        bare = await _measure_idle(network, nodes, window)
        rss_before = _rss()
        await _share_many(a, b, app_id, 1)
        settled_one = await _settle(nodes, SETTLE_QUIET, SETTLE_LIMIT)
        one = await _measure_idle(network, nodes, window)
        started = time.perf_counter()
        await _share_many(a, b, app_id, n - 1)
        _log(f"{n:,} contexts shared in {time.perf_counter() - started:.1f}s")
        settled = await _settle(nodes, SETTLE_QUIET, SETTLE_LIMIT)
        many = await _measure_idle(network, nodes, window)
        rss_after = _rss()
        busy = settled >= SETTLE_LIMIT
    per_context_kib = (rss_after - rss_before) / n / 1024
    _log(
        f"settled in {settled_one:.0f}s (one) and {settled:.0f}s ({n:,})"
        f"{' (NOT settled: limit reached)' if busy else ''}; load {os.getloadavg()[0]:.1f}"
    )
    _log(
        f"idle CPU: none {bare.cpu_share:.2%}, one {one.cpu_share:.2%}, "
        f"{n:,} {many.cpu_share:.2%}; wire B/s: none {bare.bytes_per_second:,.0f}, "
        f"one {one.bytes_per_second:,.0f}, {n:,} {many.bytes_per_second:,.0f}; "
        f"heartbeat B/s: none {bare.heartbeat_per_second:,.0f}, "
        f"one {one.heartbeat_per_second:,.0f}, {n:,} {many.heartbeat_per_second:,.0f}; "
        f"RSS +{per_context_kib:,.1f} KiB per context"
    )
    return [
        Row(
            f"idle CPU, 2 nodes sharing {n:,} contexts",
            100 * many.cpu_share,
            "% CPU",
            "same 2 nodes, no context",
            100 * bare.cpu_share,
            higher_is_better=False,
        ),
        Row(
            f"RSS, 2 nodes with {n:,} idle contexts (+{per_context_kib:,.0f} KiB each)",
            rss_after / 2**20,
            "MiB",
            "same 2 nodes, no context",
            rss_before / 2**20,
            higher_is_better=False,
        ),
        Row(
            f"idle wire traffic, {n:,} shared contexts",
            many.bytes_per_second - bare.bytes_per_second,
            "B/s",
            f"{n:,} x one context's",
            n * max(one.bytes_per_second - bare.bytes_per_second, 0.0),
            higher_is_better=False,
        ),
        Row(
            f"idle heartbeat traffic, {n:,} shared contexts",
            many.heartbeat_per_second,
            "B/s",
            f"{n:,} x one context's",
            n * one.heartbeat_per_second,
            higher_is_better=False,
        ),
    ]


def _random_edges(m: int, rng: random.Random) -> list[tuple[int, int]]:
    edges: set[tuple[int, int]] = set()
    for j in range(1, m):
        for i in rng.sample(range(j), min(EDGES_PER_NODE, j)):
            edges.add((i, j))
    return sorted(edges)


def _forwarded(nodes: Sequence[Node]) -> int:
    return sum(node.pubsub.statistics().forwarded for node in nodes)


class _Seen:
    """How many nodes saw each raw gossip payload; set `done` once every node saw all."""

    def __init__(self, expected: int, receivers: int) -> None:
        self.expected = expected
        self.receivers = receivers
        self.count: dict[bytes, int] = {}
        self.complete = 0
        self.done = trio.Event()
        self.last = 0.0

    def arrived(self, payload: bytes) -> None:
        n = self.count.get(payload, 0) + 1
        self.count[payload] = n
        if n == self.receivers:
            self.complete += 1
            if self.complete == self.expected:
                self.last = time.perf_counter()
                self.done.set()


async def _count_raw(node: Node, publisher_of: dict[bytes, Node], seen: _Seen) -> None:
    with node.events.observe(capacity=100_000) as events:
        async for event in events:
            if (
                isinstance(event, GossipMessage)
                and event.topic == RAW_TOPIC
                and publisher_of.get(event.data) is not node
            ):
                seen.arrived(event.data)


async def _raw_mesh_ready(nodes: Sequence[Node], limit: float) -> None:
    """Every node has grafted as many mesh peers on the raw topic as it can."""
    with trio.fail_after(limit):
        for node in nodes:
            links = len(node.host.connections)
            while len(node.pubsub.mesh_peers(RAW_TOPIC)) < min(node.config.pubsub.d_lo, links):
                await node.pubsub.wait_heartbeat()


@attrs.frozen
class _Phase:
    """One phase of the many-nodes case: seconds, gossip copies and wire bytes."""

    seconds: float
    copies: int
    wire: int


async def _raw_gossip(
    nodes: Sequence[Node],
    network: MemoryNetwork,
    schedule: Sequence[tuple[float, int, int]],
    limit: float,
) -> _Phase:
    """Publish random payloads of the deltas' sizes from the same writers on the same
    schedule (offsets from the first write), until every node saw every payload."""
    for node in nodes:
        node.pubsub.subscribe(RAW_TOPIC)
    await _raw_mesh_ready(nodes, limit)
    payloads = [(offset, nodes[i], os.urandom(size)) for offset, i, size in schedule]
    publisher_of = {payload: node for _, node, payload in payloads}
    seen = _Seen(len(payloads), len(nodes) - 1)
    async with trio.open_nursery() as readers:
        for node in nodes:
            readers.start_soon(_count_raw, node, publisher_of, seen)
        await trio.testing.wait_all_tasks_blocked()
        copies, wire = _forwarded(nodes), network.statistics().bytes_sent
        first = time.perf_counter()
        for offset, node, payload in payloads:
            await trio.sleep_until(
                trio.current_time() + max(0.0, first + offset - time.perf_counter())
            )
            node.pubsub.publish(RAW_TOPIC, payload)
        with trio.move_on_after(limit):
            await seen.done.wait()
        readers.cancel_scope.cancel()
    if not seen.done.is_set():
        _log(f"raw gossip: only {seen.complete} of {len(payloads)} reached every node")
        seen.last = time.perf_counter()
    return _Phase(
        seen.last - first,
        _forwarded(nodes) - copies,
        network.statistics().bytes_sent - wire,
    )


CONVERGE_POLL: Final = 0.1
"""Seconds between convergence checks while no node applies anything (a snapshot or a tree
comparison changes state without an event)."""
PROGRESS_EVERY: Final = 15.0
"""Seconds between progress lines while converging (pending deltas over time)."""
RAW_GRACE: Final = 300.0
"""Seconds raw gossip may take beyond its schedule's last publish before the phase gives up
(it had 1,800 s whatever the schedule)."""


def default_rate(m: int) -> float:
    """Writes per second the many-nodes case paces itself at unless told: what this 2-core
    machine sustains with every node in one process (each write costs every node a
    delivery, so it shrinks with the nodes: 100 nodes, 1 a second)."""
    return min(5.0, 100.0 / m)


class _Cpu:
    """The share of wall time this process spent on the CPU since the last `take`: near
    100 % the one core the nodes share is saturated (a capacity limit, not a stall)."""

    def __init__(self) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def take(self) -> float:
        cpu, wall = time.process_time(), time.perf_counter()
        share = (cpu - self._cpu) / max(wall - self._wall, 1e-9)
        self._cpu, self._wall = cpu, wall
        return share

    def busy(self) -> str:
        """`take` as a phrase, with the machine's load beside it: on a shared machine a
        share well below 100 % may mean the process waited for a core, not for work."""
        return f"CPU {self.take():.0%} busy (load {os.getloadavg()[0]:.1f})"


class _Wake:
    """Set by any node's event; the waiter replaces `event` before each check."""

    def __init__(self) -> None:
        self.event = trio.Event()

    async def watch(self, node: Node, context: bytes) -> None:
        sub = node.hub.open()
        sub.contexts.add(base58.b58encode(context).decode())
        try:
            while True:
                await sub.receive.receive()
                self.event.set()
        finally:
            sub.close()


async def _same_state(nodes: Sequence[Node], context: bytes) -> bool:
    """Every node holds the same root and heads, with nothing pending; stops at the first
    node that differs (while the writes spread that is the first or second one)."""
    first = await nodes[0].contexts.state(context)
    if first[2]:
        return False
    for node in nodes[1:]:
        if await node.contexts.state(context) != first:
            return False
    return True


def _labelled(metrics: Sequence[Counter]) -> dict[str, int]:
    """A labelled counter of every node, summed by its labels (joined by "/")."""
    total: dict[str, int] = {}
    for metric in metrics:
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels:
                    label = "/".join(sample.labels.values())
                    total[label] = total.get(label, 0) + int(sample.value)
    return {label: n for label, n in sorted(total.items()) if n}


def _fetch_failures(nodes: Sequence[Node]) -> str:
    """Failed delta fetches by reason, summed over the nodes (`trionode_delta_fetch_failures`),
    the deltas evicted from pending, sync sessions by outcome and failed ones by reason
    (`trionode_sync_session_failures`: a timed-out session's fetch counts no failure)."""
    failures = _labelled([node.replication_metrics.fetch_failures for node in nodes])
    evicted = _labelled([node.replication_metrics.deltas for node in nodes]).get("evicted", 0)
    sessions = _labelled([node.sync.metrics.sessions for node in nodes])
    reasons = _labelled([node.sync.metrics.failures for node in nodes])
    return (
        f"failed fetches: {_listed(failures)}; evicted from pending: {evicted:,}; "
        f"sync sessions (protocol/outcome): {_listed(sessions)}; "
        f"failed sessions (protocol/reason): {_listed(reasons)}"
    )


def _links(nodes: Sequence[Node], context: bytes) -> str:
    """Connections, the context's topic peers and mesh per node (min/median/max), and how
    many nodes have no peer on the topic (they can neither gossip nor sync)."""
    topic = topic_for(context)

    def spread(values: list[int]) -> str:
        ordered = sorted(values)
        return f"{ordered[0]}/{ordered[len(ordered) // 2]}/{ordered[-1]}"

    connections = [len(node.host.connections) for node in nodes]
    peers = [
        len([p for p in node.pubsub.topic_peers(topic) if p in node.host.connections])
        for node in nodes
    ]
    mesh = [len(node.pubsub.mesh_peers(topic)) for node in nodes]
    alone = [i for i, n in enumerate(peers) if n == 0]
    return (
        f"connections {spread(connections)}, topic peers {spread(peers)}, "
        f"mesh {spread(mesh)} (min/median/max); nodes with no topic peer: {alone or 'none'}"
    )


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} {n:,}" for label, n in counts.items()) or "none"


async def _wait_all_converged(nodes: Sequence[Node], context: bytes, limit: float) -> None:
    """Until every node holds the same state. One subscription per node for the whole wait
    and a check that stops at the first difference: `sync_bench._wait_converged` opens a
    subscription on every node every 2 ms and reads every node's state each time, which at
    100 nodes was most of what the process did while it waited."""
    wake = _Wake()
    cpu = _Cpu()
    started = last_log = time.perf_counter()
    async with trio.open_nursery() as watchers:
        for node in nodes:
            watchers.start_soon(wake.watch, node, context)
        with trio.fail_after(limit):
            while True:
                wake.event = trio.Event()
                if await _same_state(nodes, context):
                    break
                if time.perf_counter() - last_log > PROGRESS_EVERY:
                    last_log = time.perf_counter()
                    states = [await node.contexts.state(context) for node in nodes]
                    _log(
                        f"converging for {last_log - started:.0f}s: "
                        f"{sum(s[:2] == states[0][:2] for s in states)} of {len(nodes)} "
                        f"nodes hold node 0's state, {sum(s[2] for s in states)} deltas pending, "
                        f"at most {max(len(s[1]) for s in states)} heads on a node; "
                        f"{cpu.busy()}; {_fetch_failures(nodes)}; {_links(nodes, context)}"
                    )
                with trio.move_on_after(CONVERGE_POLL):
                    await wake.event.wait()
        watchers.cancel_scope.cancel()


JOIN_ATTEMPTS: Final = 5


async def _share_retrying(nodes: Sequence[Node], bundle: Path) -> bytes:
    """`sync_bench._share`, each joiner trying again when it cannot reach node 0: with
    dozens of nodes in one process on a loaded machine, a dial to the inviter can time out
    (a real joiner would try again too)."""
    app_id = b""
    for node in nodes:
        app_id = (await node.applications.install(str(bundle))).application_id
    context = (await nodes[0].contexts.create(app_id)).context_id
    started = time.perf_counter()
    for number, node in enumerate(nodes[1:], start=1):
        if number % 10 == 0:
            _log(f"{number} joined, {(time.perf_counter() - started) / number:.2f}s per join")
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            try:
                await node.joins.join(await nodes[0].joins.invite(context))
                break
            except PeerFailed as exc:
                if attempt == JOIN_ATTEMPTS:
                    raise
                _log(f"join attempt {attempt} failed ({exc}); trying again")
    return context


async def _many_rows(m: int, w: int, base: Path, rate: float | None = None) -> list[Row]:
    rate = default_rate(m) if rate is None else rate
    bundle = _bench_bundle(base / "bundle")
    rng = random.Random(SEED)
    topology: Topology = _random_edges(m, rng)
    # The timers a node ships with, not the cluster's short test timers: those refresh
    # member peers on every 0.5 s pubsub heartbeat and ping every link every 5 s, work that
    # grows with the members, and at 100 nodes in one process it kept the one core busy
    # enough that joins timed out (session 6: a join failed at 48 s, a start stalled).
    configure: Callable[[FileConfig], FileConfig] = _default_timers
    network = MemoryNetwork()
    started = time.perf_counter()
    async with open_cluster(
        m, base / "many", network=network, connect=topology, configure=configure
    ) as c:
        nodes = list(c)
        _log(f"{m} nodes up in {time.perf_counter() - started:.1f}s")
        context = await _share_retrying(nodes, bundle)
        await _wait_all_converged(nodes, context, limit=1800)
        _log(f"{m} members joined after {time.perf_counter() - started:.1f}s")
        degree = nodes[0].config.pubsub.d
        copies, wire = _forwarded(nodes), network.statistics().bytes_sent
        made: list[tuple[float, int, bytes]] = []
        interval = 1.0 / rate
        cpu, writing_cpu = _Cpu(), _Cpu()
        _log(f"{w:,} writes paced at {rate:g} a second ({interval * w:,.0f}s of writing)")
        first = time.perf_counter()

        async def one(i: int, writer: int, offset: float) -> None:
            delta_id = await _set_many(nodes[writer], context, _items("s", i, 1))
            made.append((offset, writer, delta_id))

        async with trio.open_nursery() as writers:
            for i in range(w):
                offset = i * interval
                await trio.sleep_until(
                    trio.current_time() + max(0.0, first + offset - time.perf_counter())
                )
                writers.start_soon(one, i, rng.randrange(m), offset)
                if (i + 1) % 100 == 0:
                    states = [await node.contexts.state(context) for node in nodes]
                    _log(
                        f"{i + 1:,} writes issued at {time.perf_counter() - first:.0f}s, "
                        f"{len(made):,} done; {sum(s[2] for s in states)} deltas pending, at "
                        f"most {max(len(s[1]) for s in states)} heads on a node; "
                        f"{cpu.busy()}; {_fetch_failures(nodes)}; {_links(nodes, context)}"
                    )
        made.sort()
        written = time.perf_counter()
        writing_busy, converging_cpu = writing_cpu.busy(), _Cpu()
        await _wait_all_converged(nodes, context, limit=3600)
        converged = time.perf_counter()
        converging_busy = converging_cpu.busy()
        failures = _fetch_failures(nodes)
        writes = _Phase(
            converged - first,
            _forwarded(nodes) - copies,
            network.statistics().bytes_sent - wire,
        )
        schedule = [
            (offset, i, len(await nodes[i].contexts.read_delta(context, delta_id) or b""))
            for offset, i, delta_id in made
        ]
        delta_bytes = sum(size for _, _, size in schedule)
        raw = await _raw_gossip(nodes, network, schedule, limit=interval * w + RAW_GRACE)
    _log(
        f"{w:,} writes paced at {rate:g}/s in {written - first:.1f}s ({writing_busy}), "
        f"converged {converged - written:.2f}s later ({converging_busy}); "
        f"raw gossip of the same payloads on the same schedule: {raw.seconds:.1f}s; "
        f"copies per write {writes.copies / w:,.0f} (raw {raw.copies / w:,.0f}, "
        f"D={degree}, m={m}); wire bytes per write {writes.wire / w:,.0f} "
        f"(raw {raw.wire / w:,.0f}); mean delta {delta_bytes / w:,.0f} B; {failures}"
    )
    case = f"{w:,} writes at {rate:g}/s on {m} nodes"
    return [
        Row(
            f"{case}: first write -> all converged",
            writes.seconds,
            "s",
            "the writes on their writers alone",
            written - first,
            higher_is_better=False,
        ),
        Row(
            f"{case}: first write -> all converged",
            writes.seconds,
            "s",
            "raw gossip, same payload sizes, writers, schedule: all seen",
            raw.seconds,
            higher_is_better=False,
        ),
        Row(
            f"gossip copies per write, {m} nodes",
            writes.copies / w,
            "msgs",
            f"gossipsub's D x N (D={degree})",
            float(degree * m),
            higher_is_better=False,
        ),
        Row(
            f"gossip copies per write, {m} nodes",
            writes.copies / w,
            "msgs",
            "raw gossip of the same payloads",
            raw.copies / w,
            higher_is_better=False,
        ),
        Row(
            f"wire bytes per write, {m} nodes (all traffic, heartbeats and sessions too)",
            writes.wire / w,
            "B",
            "raw gossip of the same payloads",
            raw.wire / w,
            higher_is_better=False,
        ),
    ]


WALK_AUTHORS: Final = 16
WALK_PARENTS: Final = 48


def _walk_dag(n: int) -> dict[bytes, bytes]:
    """`n` signed deltas by `WALK_AUTHORS` members writing at once: each names the last
    `WALK_PARENTS` deltas as parents (the scale run's DAG has tens of heads). id → wire."""
    keys = [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(WALK_AUTHORS)]
    seqs = [0] * WALK_AUTHORS
    order: list[bytes] = []
    wires: dict[bytes, bytes] = {}
    for i in range(n):
        author = i % WALK_AUTHORS
        seqs[author] += 1
        delta = seal_delta(
            context_id=WALK_CONTEXT,
            parents=order[-WALK_PARENTS:] or [GENESIS],
            author=keys[author],
            hlc=i + 1,
            key_id=0,
            context_key=bytes(32),
            body=DeltaBody(records=[os.urandom(100)], events=[], root_hash=bytes(32)),
            seq=seqs[author],
        )
        order.append(delta.id)
        wires[delta.id] = delta.encode()
    return wires


WALK_CONTEXT: Final = b"\x16" * 32


def _serve_walk(wires: dict[bytes, bytes], top: bytes, headers: HeaderCache) -> int:
    """One delta request for `top` with every ancestor it may carry, answered from `wires`
    as a `SyncServer` answers it from the store; the ancestors sent."""
    responder = Responder(headers=headers)
    responder.receive_message(
        SyncAuth(context_id=WALK_CONTEXT, member=bytes(32), signature=bytes(64)), 0.0
    )
    responder.next_action()
    responder.auth_checked(None)
    responder.receive_message(DeltaRequest(ids=[top], ancestors=MAX_ANCESTORS), 0.0)
    while (action := responder.next_action()) is not None:
        if isinstance(action, ReadDeltas):
            responder.deltas_read([(i, wires[i]) for i in action.ids], [])
        else:
            assert isinstance(action, ReadAncestors)
            responder.ancestors_read([(i, wires[i]) for i in action.ids if i in wires])
    (answer,) = responder.messages_to_send()
    assert isinstance(answer, DeltaResponse)
    return len(answer.ancestors)


def _walk_rows(*, quick: bool) -> list[Row]:
    """Serving the same ancestor walk again (many members catching up walk the same recent
    deltas), with the node's header cache beside decoding every header each time."""
    n = 256 if quick else SyncSection().max_ancestors + 1
    wires = _walk_dag(n)
    top = list(wires)[-1]
    repeats = 5 if quick else 20
    cached = HeaderCache(SyncSection().ancestor_headers)
    assert _serve_walk(wires, top, cached) == n - 1  # (warms the cache)
    with_cache = timed(lambda: [_serve_walk(wires, top, cached) for _ in range(repeats)])
    without = timed(lambda: [_serve_walk(wires, top, HeaderCache(0)) for _ in range(repeats)])
    _log(
        f"ancestor walk of {n - 1:,}: {with_cache / repeats * 1e3:.1f} ms with the cache, "
        f"{without / repeats * 1e3:.1f} ms decoding every header"
    )
    return [
        Row(
            f"serving a walk of {n - 1:,} ancestors again ({WALK_PARENTS} parents each)",
            repeats / with_cache,
            "walks/s",
            "decoding every header each walk (sync.ancestor_headers = 0)",
            repeats / without,
        )
    ]


async def run(
    *,
    quick: bool,
    many: tuple[int, int] | None = None,
    idle: bool = True,
    rate: float | None = None,
    idle_only: int | None = None,
) -> list[Row]:
    """Both cases; `many` = (nodes, writes) overrides the many-nodes size, `rate` its
    writes per second (default `default_rate`), and `idle` False skips the idle-contexts
    case (and the ancestor-walk rows)."""
    contexts = 100 if quick else 1000
    window = QUICK_IDLE_WINDOW if quick else IDLE_WINDOW
    nodes, writes = many or ((20, 100) if quick else (100, 1000))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trionode-scale-") as tmp:
        base = Path(tmp)
        if idle_only is not None:
            return await _idle_rows(idle_only, window, base / "idle")
        if idle:
            rows += _walk_rows(quick=quick)
            rows += await _idle_rows(contexts, window, base / "idle")
        rows += await _many_rows(nodes, writes, base / "many", rate)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_bench")
    parser.add_argument("--quick", action="store_true", help="100 contexts, 20 nodes")
    parser.add_argument(
        "--many",
        nargs=2,
        type=int,
        metavar=("NODES", "WRITES"),
        help="the many-nodes case at this size, alone (no idle-contexts case)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        metavar="WRITES_PER_S",
        help="pace the many-nodes writes at this rate (default: 100 / NODES, at most 5)",
    )
    parser.add_argument(
        "--idle",
        type=int,
        metavar="CONTEXTS",
        help="the idle-contexts case with this many contexts, alone",
    )
    args = parser.parse_args()
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    many = None if args.many is None else (args.many[0], args.many[1])
    print(
        render(
            trio.run(
                lambda: run(
                    quick=args.quick,
                    many=many,
                    idle=many is None,
                    rate=args.rate,
                    idle_only=args.idle,
                )
            )
        )
    )


if __name__ == "__main__":
    main()
