"""Gossipsub: propagation latency and throughput in an in-process cluster on loopback TCP.

trionode (Host + PubSub, every node subscribed to one topic) beside py-libp2p 0.8.1's GossipSub
(same degrees, StrictSign, same topology), measured in the same run, all nodes in this one
trio thread (so every hop's crypto, framing and routing share one core).

* **Topology:** a ring plus chords (i ↔ i + n/2 for every other i < n/2): sparse, so most
  messages take several hops (the 10-node ring has diameter 3 with its chords).
* **Latency:** one message at a time, publishers in turn; the time from ``publish`` to its
  delivery on the *last* subscriber (the node's event handler for trionode, the subscription
  queue for py-libp2p); p50/p99 over the rounds.
* **Throughput:** ``messages`` messages of 128 bytes published round-robin by every node with
  at most 16 messages in flight (published, not yet delivered everywhere), until every
  subscriber has every message; messages/s = messages / elapsed (each message is delivered
  n - 1 times). The window keeps py-libp2p honest: its subscription queues hold 32 messages
  and drop the rest, so an unpaced flood loses messages instead of measuring anything.

py-libp2p runs with 5 nodes (it is slow: it takes seconds per run), which the row names say;
trionode runs with 10 and with 5. The variant with nodes as separate processes is not
measured here.

Standalone: ``python -m benchmarks.pubsub_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
import trio
from libp2p.abc import ISubscriptionAPI
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from benchmarks.harness import Row, render
from benchmarks.transport_baseline import _libp2p_host, _percentile
from trionode.config import NetworkSection, PubsubSection
from trionode.net.events import GossipMessage, NetworkEvent, NetworkEvents
from trionode.net.host import Host
from trionode.net.metrics import NetMetrics
from trionode.net.pubsub import PubSub
from trionode.wire.keys import PrivateKey

TOPIC = "bench/topic"
PAYLOAD = 128
WINDOW = 16
PY_NODES = 5
HEARTBEAT = 0.2
# Budgets far above what the benchmark sends: the router's flood limits are not measured.
PUBSUB = PubsubSection(
    heartbeat_interval=HEARTBEAT,
    max_peer_messages_per_interval=1_000_000,
    max_peer_bytes_per_interval=1 << 30,
    outbox_capacity=100_000,
)


def topology(n: int) -> list[tuple[int, int]]:
    ring = [(i, (i + 1) % n) for i in range(n)] if n > 2 else [(0, 1)]
    chords = [(i, i + n // 2) for i in range(0, n // 2, 2) if n >= 4]
    return ring + chords


class _Tracker:
    """Deliveries per message (keyed by its random payload); wakes the benchmark when one
    message has reached every subscriber."""

    def __init__(self, subscribers: int) -> None:
        self.subscribers = subscribers
        self.count: defaultdict[bytes, int] = defaultdict(int)
        self.completed: dict[bytes, float] = {}
        self.published = 0
        self.changed = trio.Event()

    def delivered(self, key: bytes) -> None:
        self.count[key] += 1
        if self.count[key] == self.subscribers:
            self.completed[key] = time.perf_counter()
            self.changed.set()
            self.changed = trio.Event()

    def start_window(self) -> None:
        """Start counting in-flight messages (everything so far has been delivered)."""
        self.published = len(self.completed)

    async def wait_window(self) -> None:
        """Wait until fewer than WINDOW messages are still on their way, then count one more."""
        while self.published - len(self.completed) >= WINDOW:
            await self.changed.wait()
        self.published += 1

    async def wait_all(self, ids: set[bytes]) -> None:
        while not ids <= self.completed.keys():
            await self.changed.wait()


def _results(latencies: list[float], messages: int, elapsed: float) -> dict[str, float]:
    ms = [x * 1000 for x in latencies]
    return {
        "p50_ms": _percentile(ms, 0.5),
        "p99_ms": _percentile(ms, 0.99),
        "messages_per_s": messages / elapsed if elapsed > 0 else math.inf,
    }


# -- trionode ---------------------------------------------------------------------------------


@asynccontextmanager
async def _trionode_cluster(n: int, tracker: _Tracker) -> AsyncIterator[list[PubSub]]:
    async def on_event(event: NetworkEvent) -> None:
        if isinstance(event, GossipMessage):
            tracker.delivered(event.data)
        await trio.lowlevel.checkpoint()

    nodes: list[PubSub] = []
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            host = Host(
                PrivateKey.generate(),
                NetworkSection(listen=["/ip4/127.0.0.1/tcp/0"], ping_interval=3600.0),
                NetMetrics(None),
            )
            events = NetworkEvents(1_000_000)
            pubsub = PubSub(host, host.key, PUBSUB, events=events)
            await nursery.start(host.run)
            await nursery.start(events.run, on_event)
            await nursery.start(pubsub.run)
            pubsub.subscribe(TOPIC)
            nodes.append(pubsub)
        for a, b in topology(n):
            await nodes[a].host.connect(nodes[b].host.addresses()[0])
        for i, node in enumerate(nodes):
            want = {nodes[b if a == i else a].host.peer_id for a, b in topology(n) if i in (a, b)}
            while not (
                want <= set(node.topic_peers(TOPIC))
                and len(node.mesh_peers(TOPIC)) >= min(PUBSUB.d_lo, len(want))
            ):
                await node.wait_heartbeat()
        yield nodes
        nursery.cancel_scope.cancel()


async def measure_trionode(n: int, rounds: int, messages: int) -> dict[str, float]:
    tracker = _Tracker(n - 1)
    with trio.fail_after(120 + messages / 50):
        async with _trionode_cluster(n, tracker) as nodes:
            latencies: list[float] = []
            for r in range(rounds):
                data = os.urandom(PAYLOAD)
                started = time.perf_counter()
                nodes[r % n].publish(TOPIC, data)
                await tracker.wait_all({data})
                latencies.append(tracker.completed[data] - started)
            ids: set[bytes] = set()
            tracker.start_window()
            started = time.perf_counter()
            for k in range(messages):
                data = os.urandom(PAYLOAD)
                ids.add(data)
                await tracker.wait_window()
                nodes[k % n].publish(TOPIC, data)
            await tracker.wait_all(ids)
            elapsed = time.perf_counter() - started
            assert all(tracker.count[i] == n - 1 for i in ids), "duplicate or missing delivery"
    return _results(latencies, messages, elapsed)


# -- py-libp2p --------------------------------------------------------------------------------


async def measure_libp2p(n: int, rounds: int, messages: int) -> dict[str, float]:
    """The same measurement with py-libp2p 0.8.1 GossipSub nodes (StrictSign)."""
    tracker = _Tracker(n - 1)

    async def read(subscription: ISubscriptionAPI, me: bytes) -> None:
        while True:
            message = await subscription.get()
            if message.from_id != me:  # py delivers its own messages to itself too
                tracker.delivered(message.data)

    with trio.fail_after(300 + messages / 5):
        async with AsyncExitStack() as stack:
            hosts = [_libp2p_host() for _ in range(n)]
            pubsubs: list[Pubsub] = []
            subscriptions: list[ISubscriptionAPI] = []
            for host in hosts:
                await stack.enter_async_context(
                    host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
                )
                router = GossipSub(
                    protocols=[TProtocol(PROTOCOL_ID_V11)],
                    degree=PUBSUB.d,
                    degree_low=PUBSUB.d_lo,
                    degree_high=PUBSUB.d_hi,
                    heartbeat_initial_delay=0.1,
                    heartbeat_interval=1,
                    spam_protection_enabled=False,
                )
                pubsub = Pubsub(host, router, strict_signing=True)
                await stack.enter_async_context(background_trio_service(pubsub))
                await stack.enter_async_context(background_trio_service(router))
                await pubsub.wait_until_ready()
                subscriptions.append(await pubsub.subscribe(TOPIC))
                pubsubs.append(pubsub)
            for a, b in topology(n):
                target = hosts[b]
                await hosts[a].connect(PeerInfo(target.get_id(), target.get_addrs()))
            for i, pubsub in enumerate(pubsubs):
                for a, b in topology(n):
                    if i in (a, b):
                        other: ID = hosts[b if a == i else a].get_id()
                        await pubsub.wait_for_subscription(other, TOPIC, timeout=30)
                        await pubsub.wait_for_mesh(other, TOPIC, timeout=30)
            async with trio.open_nursery() as readers:
                for host, subscription in zip(hosts, subscriptions, strict=True):
                    readers.start_soon(read, subscription, host.get_id().to_bytes())
                latencies: list[float] = []
                for r in range(rounds):
                    data = os.urandom(PAYLOAD)
                    started = time.perf_counter()
                    await pubsubs[r % n].publish(TOPIC, data)
                    await tracker.wait_all({data})
                    latencies.append(tracker.completed[data] - started)
                ids: set[bytes] = set()
                tracker.start_window()
                started = time.perf_counter()
                for k in range(messages):
                    data = os.urandom(PAYLOAD)
                    ids.add(data)
                    await tracker.wait_window()
                    await pubsubs[k % n].publish(TOPIC, data)
                await tracker.wait_all(ids)
                elapsed = time.perf_counter() - started
                readers.cancel_scope.cancel()
            for host in hosts:
                with trio.move_on_after(5, shield=True):
                    await host.close()
    return _results(latencies, messages, elapsed)


# -- the suite --------------------------------------------------------------------------------


async def run(*, quick: bool) -> list[Row]:
    rounds = 20 if quick else 200
    messages = 200 if quick else 2000
    py_messages = messages // 2 if quick else messages // 4
    ours = {n: await measure_trionode(n, rounds, messages) for n in (10, PY_NODES)}
    py = await measure_libp2p(PY_NODES, rounds, py_messages)
    rows: list[Row] = []
    baseline = f"py-libp2p gossipsub, {PY_NODES} nodes"
    for n, result in ours.items():
        rows += [
            Row(
                f"gossip publish→last subscriber p50, {n} nodes",
                result["p50_ms"],
                "ms",
                baseline,
                py["p50_ms"],
                higher_is_better=False,
            ),
            Row(
                f"gossip publish→last subscriber p99, {n} nodes",
                result["p99_ms"],
                "ms",
                baseline,
                py["p99_ms"],
                higher_is_better=False,
            ),
            Row(
                f"gossip throughput, {n} nodes",
                result["messages_per_s"],
                "msg/s",
                baseline,
                py["messages_per_s"],
            ),
        ]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pubsub_bench")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
