"""Gossipsub over real loopback connections: a 10-host cluster, hostile peers, backpressure.

Every test uses the real clock and real sockets (never autojump_clock), bounds every wait
with `trio.fail_after`, and waits on conditions, not on time: deliveries wake a `Signal`,
and router state is re-checked on every heartbeat (`PubSub.wait_heartbeat`, 0.1 s here).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from msgspec.structs import replace
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from trionode.cli import _render_topics
from trionode.config import FileConfig, NetworkSection, PubsubSection, load_config
from trionode.errors import ConfigError
from trionode.home import init_home
from trionode.net.events import GossipMessage, NetworkEvent, NetworkEvents
from trionode.net.host import Connection, Host
from trionode.net.metrics import NetMetrics
from trionode.net.pubsub import PubSub, PubSubMetrics, topic_kind
from trionode.testing import open_test_nodes
from trionode.wire.gossipsub import MESHSUB_1_1
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.pubsub_pb import RPC, PubsubMessage, SubOpts, sign_message
from trionode.wire.varint import encode_uvarint

pytestmark = pytest.mark.real_network

TOPIC = "test/topic"
HEARTBEAT = 0.1
PUBSUB = PubsubSection(heartbeat_interval=HEARTBEAT)
N = 10
# A ring with three chords: sparse (degree 2-3), and still connected without any one host.
EDGES = [(i, (i + 1) % N) for i in range(N)] + [(0, 5), (2, 7), (3, 8)]


class Signal:
    """Wakes every waiter each time something changes; waiters re-check their condition."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


@attrs.define(eq=False)
class Member:
    """A Host + PubSub + event channel, running in its own cancel scope (cancel = crash)."""

    host: Host
    pubsub: PubSub
    events: NetworkEvents
    registry: CollectorRegistry
    signal: Signal
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    received: list[GossipMessage] = attrs.field(factory=list)

    @property
    def peer_id(self) -> PeerId:
        return self.host.peer_id

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def on_event(self, event: NetworkEvent) -> None:
        if isinstance(event, GossipMessage):
            self.received.append(event)
            self.signal.fire()
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.host.run)
                await nursery.start(self.events.run, self.on_event)
                await nursery.start(self.pubsub.run)
                task_status.started()

    async def until_heartbeat(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.pubsub.wait_heartbeat()


def make_member(
    signal: Signal,
    config: PubsubSection = PUBSUB,
    capacity: int = 10_000,
    hold: Callable[[str], bool] | None = None,
) -> Member:
    registry = CollectorRegistry()
    host = Host(
        PrivateKey.generate(),
        NetworkSection(listen=["/ip4/127.0.0.1/tcp/0"], ping_interval=60.0),
        NetMetrics(registry),
    )
    events = NetworkEvents(capacity, registry)
    pubsub = PubSub(host, host.key, config, PubSubMetrics(registry), events=events, hold=hold)
    return Member(host, pubsub, events, registry, signal)


@asynccontextmanager
async def open_cluster(n: int, edges: list[tuple[int, int]]) -> AsyncIterator[list[Member]]:
    """`n` members subscribed to TOPIC, connected along `edges`."""
    signal = Signal()
    members = [make_member(signal) for _ in range(n)]
    async with trio.open_nursery() as nursery:
        for member in members:
            await nursery.start(member.run)
            member.pubsub.subscribe(TOPIC)
        for a, b in edges:
            await members[a].host.connect(members[b].host.addresses()[0])
        yield members
        nursery.cancel_scope.cancel()


def neighbours(i: int, edges: list[tuple[int, int]], alive: set[int]) -> set[int]:
    return {b if a == i else a for a, b in edges if i in (a, b)} & (alive - {i})


async def wait_mesh_ready(members: list[Member], alive: set[int]) -> None:
    """Every live member knows its live neighbours' subscriptions and has a mesh in bounds."""
    d_lo, d_hi = PUBSUB.d_lo, PUBSUB.d_hi

    def ready(i: int) -> Callable[[], bool]:
        member = members[i]
        expected = {members[j].peer_id for j in neighbours(i, EDGES, alive)}

        def check() -> bool:
            mesh = len(member.pubsub.mesh_peers(TOPIC))
            return set(member.pubsub.topic_peers(TOPIC)) == expected and d_lo <= mesh <= d_hi

        return check

    async with trio.open_nursery() as nursery:
        for i in alive:
            nursery.start_soon(members[i].until_heartbeat, ready(i))


def mesh_degrees(members: list[Member], alive: set[int]) -> list[int]:
    return [len(members[i].pubsub.mesh_peers(TOPIC)) for i in sorted(alive)]


async def heartbeats(members: list[Member], count: int) -> None:
    async with trio.open_nursery() as nursery:
        for member in members:

            async def wait(member: Member = member) -> None:
                for _ in range(count):
                    await member.pubsub.wait_heartbeat()

            nursery.start_soon(wait)


async def test_cluster_delivers_every_message_exactly_once_and_meshes_stay_in_bounds() -> None:
    alive = set(range(N))
    with trio.fail_after(20):
        async with open_cluster(N, EDGES) as members:
            await wait_mesh_ready(members, alive)
            await heartbeats(members, 3)
            degrees = mesh_degrees(members, alive)
            assert all(PUBSUB.d_lo <= d <= PUBSUB.d_hi for d in degrees), degrees
            # The mesh is symmetric: whoever is in my mesh has me in theirs.
            by_id = {m.peer_id: m for m in members}
            for member in members:
                for peer in member.pubsub.mesh_peers(TOPIC):
                    assert member.peer_id in by_id[peer].pubsub.mesh_peers(TOPIC)

            per_member = 3
            published: dict[bytes, tuple[int, bytes]] = {}
            for i, member in enumerate(members):
                for k in range(per_member):
                    data = f"{i}:{k}:".encode() + os.urandom(16)
                    published[member.pubsub.publish(TOPIC, data)] = (i, data)
            expected = (N - 1) * per_member
            signal = members[0].signal
            await signal.wait_until(lambda: all(len(m.received) >= expected for m in members))
            # Let gossip (IHAVE/IWANT) run a few rounds: a late copy would show up now.
            await heartbeats(members, PUBSUB.history_gossip + 1)
            for i, member in enumerate(members):
                ids = Counter(event.message_id for event in member.received)
                assert len(ids) == expected
                assert set(ids.values()) == {1}, "a message was delivered twice"
                for event in member.received:
                    author, data = published[event.message_id]
                    assert author != i, "a message came back to its author"
                    assert event.author == members[author].peer_id
                    assert event.data == data
                    assert event.topic == TOPIC
                stats = member.pubsub.statistics()
                assert stats.received == expected
                assert stats.published == per_member
                assert member.sample(
                    "trionode_pubsub_messages_received_total", kind="test"
                ) == float(expected)
                assert member.sample("trionode_pubsub_mesh_peers", kind="test") == float(
                    len(member.pubsub.mesh_peers(TOPIC))
                )
            # Still within bounds after all that traffic.
            degrees = mesh_degrees(members, alive)
            assert all(PUBSUB.d_lo <= d <= PUBSUB.d_hi for d in degrees), degrees


async def test_a_held_message_is_passed_on_once_judged_valid_never_once_invalid() -> None:
    """A - B - C in a line, B holding the topic (as a node holds its context topics): what
    A publishes reaches C only once B judged it valid (`PubSub.validated`), with B's next
    flush; one B judged invalid never does."""
    signal = Signal()
    a, c = make_member(signal), make_member(signal)
    b = make_member(signal, hold=lambda topic: topic == TOPIC)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for member in (a, b, c):
                await nursery.start(member.run)
                member.pubsub.subscribe(TOPIC)
            await a.host.connect(b.host.addresses()[0])
            await b.host.connect(c.host.addresses()[0])
            await b.until_heartbeat(lambda: len(b.pubsub.mesh_peers(TOPIC)) == 2)
            await a.until_heartbeat(lambda: b.peer_id in a.pubsub.mesh_peers(TOPIC))
            await c.until_heartbeat(lambda: b.peer_id in c.pubsub.mesh_peers(TOPIC))

            def judged(data: bytes, *, accept: bool) -> Callable[[], bool]:
                def arrived() -> bool:
                    for event in b.received:
                        if event.data == data:
                            b.pubsub.validated(event.message_id, accept=accept)
                            return True
                    return False

                return arrived

            a.pubsub.publish(TOPIC, b"forged")
            await signal.wait_until(judged(b"forged", accept=False))
            a.pubsub.publish(TOPIC, b"held")
            await signal.wait_until(lambda: any(e.data == b"held" for e in b.received))
            await b.pubsub.wait_heartbeat()
            assert c.received == []  # (held: not judged yet, the hold timeout is 1 s)
            await signal.wait_until(judged(b"held", accept=True))
            await signal.wait_until(lambda: bool(c.received))
            # (In order on B's one stream to C: the rejected one would have come first.)
            assert [event.data for event in c.received] == [b"held"]
            await b.pubsub.wait_heartbeat()
            assert [event.data for event in c.received] == [b"held"]
            assert b.pubsub.statistics().dropped.get("rejected") == 1
            nursery.cancel_scope.cancel()


async def test_a_host_removed_mid_stream_does_not_stop_delivery() -> None:
    total, victim, publisher = 60, 4, 0
    with trio.fail_after(20):
        async with open_cluster(N, EDGES) as members:
            await wait_mesh_ready(members, set(range(N)))
            signal = members[0].signal
            published: list[bytes] = []

            async def publish_all() -> None:
                for k in range(total):
                    published.append(members[publisher].pubsub.publish(TOPIC, b"m%d" % k))
                    await trio.sleep(0.005)  # pacing the workload, not waiting for readiness

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_all)
                await signal.wait_until(lambda: len(members[victim].received) >= total // 3)
                members[victim].scope.cancel()  # a crash: sockets close, no goodbyes
            survivors = [m for i, m in enumerate(members) if i not in (victim, publisher)]
            want = set(published)
            await signal.wait_until(
                lambda: all({e.message_id for e in m.received} >= want for m in survivors)
            )
            for member in survivors:
                assert len(member.received) == total
            # The neighbours noticed and repaired their meshes without the dead host.
            alive = set(range(N)) - {victim}
            await wait_mesh_ready(members, alive)
            dead = members[victim].peer_id
            for i in alive:
                assert dead not in members[i].pubsub.router.peers()


# -- hostile input ----------------------------------------------------------------------------


async def _drain(stream: trio.abc.Stream, _conn: Connection) -> None:
    while await stream.receive_some():
        pass


def _signed(key: PrivateKey, seqno: int, data: bytes) -> PubsubMessage:
    unsigned = PubsubMessage(
        from_peer=key.peer_id().multihash,
        data=data,
        seqno=seqno.to_bytes(8, "big"),
        topic=TOPIC,
    )
    return sign_message(key, unsigned)


def _frame(rpc: RPC) -> bytes:
    body = rpc.encode()
    return encode_uvarint(len(body)) + body


async def test_bad_signature_and_oversized_rpc_are_dropped_counted_and_never_delivered() -> None:
    signal = Signal()
    victim = make_member(signal)
    # The attacker is a bare Host that accepts our pubsub stream (and ignores it) and
    # writes hand-made RPCs on its own.
    attacker = Host(
        PrivateKey.generate(),
        NetworkSection(listen=["/ip4/127.0.0.1/tcp/0"], ping_interval=60.0),
        NetMetrics(CollectorRegistry()),
    )
    attacker.set_handler(MESHSUB_1_1, _drain)
    key = attacker.key
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(victim.run)
            await nursery.start(attacker.run)
            victim.pubsub.subscribe(TOPIC)
            conn = await attacker.connect(victim.host.addresses()[0])
            _, stream = await conn.new_stream([MESHSUB_1_1])

            good = _signed(key, 2, b"genuine")
            forged = dataclasses.replace(_signed(key, 1, b"genuine"), data=b"forged!")
            await stream.send_all(
                _frame(RPC(subscriptions=(SubOpts(subscribe=True, topic=TOPIC),)))
                + _frame(RPC(publish=(forged,)))
                + _frame(RPC(publish=(good,)))
            )
            # Same stream, so once the good one is delivered the forged one was handled.
            await signal.wait_until(lambda: len(victim.received) == 1)
            assert victim.received[0].data == b"genuine"
            assert (
                victim.sample(
                    "trionode_pubsub_messages_invalid_total", kind="test", reason="bad_signature"
                )
                == 1.0
            )
            assert victim.sample("trionode_pubsub_router_invalid_total", reason="bad_signature")
            # The attacker's subscription (TopicJoined) and the genuine message: no more.
            assert victim.events.statistics().queued == 2

            # Three valid messages in one RPC over the 1 MiB limit: the whole RPC goes,
            # and the peer is disconnected for it.
            big = [_signed(key, 3 + i, bytes([i]) * (400 * 1024)) for i in range(3)]
            frame = _frame(RPC(publish=tuple(big)))
            assert len(frame) > PUBSUB.max_rpc_size
            victim_id = victim.peer_id
            # The victim hangs up as soon as it reads the length prefix, maybe mid-write.
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(frame)
                await stream.send_all(_frame(RPC(publish=(_signed(key, 9, b"after"),))))
            while victim_id in attacker.connections:
                await attacker.wait_connection_changed()
            assert victim.sample("trionode_pubsub_router_invalid_total", reason="rpc_too_large")
            assert victim.sample("trionode_pubsub_disconnects_total", reason="rpc_too_large") == 1
            assert victim.events.statistics().queued == 2
            assert victim.pubsub.statistics().received == 1
            assert [e.data for e in victim.received] == [b"genuine"]
            nursery.cancel_scope.cancel()


async def test_a_peer_that_stops_reading_loses_gossip_and_stalls_nobody() -> None:
    signal = Signal()
    config = PubsubSection(heartbeat_interval=HEARTBEAT, outbox_capacity=4)
    publisher, honest = make_member(signal, config), make_member(signal)
    # The sink subscribes, then never reads what we send it: our writer to it blocks once
    # its yamux window (256 KiB) is full, and its outbox fills up.
    sink = Host(
        PrivateKey.generate(),
        NetworkSection(listen=["/ip4/127.0.0.1/tcp/0"], ping_interval=60.0),
        NetMetrics(CollectorRegistry()),
    )

    async def never_read(_stream: trio.abc.Stream, _conn: Connection) -> None:
        await trio.sleep_forever()

    sink.set_handler(MESHSUB_1_1, never_read)
    count, size = 200, 8 * 1024
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for runner in (publisher.run, honest.run, sink.run):
                await nursery.start(runner)
            for member in (publisher, honest):
                member.pubsub.subscribe(TOPIC)
            await honest.host.connect(publisher.host.addresses()[0])
            conn = await sink.connect(publisher.host.addresses()[0])
            _, stream = await conn.new_stream([MESHSUB_1_1])
            await stream.send_all(_frame(RPC(subscriptions=(SubOpts(True, TOPIC),))))
            peers = {honest.peer_id, sink.peer_id}
            await publisher.until_heartbeat(
                lambda: set(publisher.pubsub.topic_peers(TOPIC)) == peers
            )
            for k in range(count):
                publisher.pubsub.publish(TOPIC, bytes([k % 256]) * size)
                await signal.wait_until(lambda: len(honest.received) == k + 1)  # noqa: B023
            assert len(honest.received) == count
            assert publisher.sample("trionode_pubsub_outbox_dropped_total") > 0
            nursery.cancel_scope.cancel()


def test_inconsistent_pubsub_degrees_are_a_config_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    init_home(home, swarm_port=0, server_port=0)
    path = home / "config.toml"
    text = path.read_text()
    assert "\nd_lo = 2\n" in text  # `trionode init` writes every option
    path.write_text(text.replace("\nd_lo = 2\n", "\nd_lo = 5\n"))
    with pytest.raises(ConfigError, match=r"`pubsub`: need 0 <= d_lo <= d <= d_hi"):
        load_config(home)


# -- the node: event channel backpressure, API, metrics -----------------------------------------


def _node_config(capacity: int) -> Callable[[FileConfig], FileConfig]:
    def configure(file: FileConfig) -> FileConfig:
        network = replace(file.network, event_channel_capacity=capacity)
        if "mdns" in NetworkSection.__struct_fields__:  # keep discovery off the LAN
            network = replace(network, mdns=False)
        return replace(
            file, network=network, pubsub=replace(file.pubsub, heartbeat_interval=HEARTBEAT)
        )

    return configure


async def test_event_channel_flood_drops_and_counts_and_the_node_stays_responsive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capacity, burst = 8, 300
    topic = "trionode/context/flood"
    caplog.set_level(logging.WARNING, logger="trionode.net.events")
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            sender, victim = await stack.enter_async_context(
                open_test_nodes(2, tmp_path, configure=_node_config(capacity))
            )
            for node in (sender, victim):
                node.node.pubsub.subscribe(topic)
            await sender.node.connect(victim.node.listen_addresses()[0])
            victim_id = victim.node.host.peer_id
            sender_pubsub, victim_pubsub = sender.node.pubsub, victim.node.pubsub
            while victim_id not in sender_pubsub.topic_peers(topic):
                await sender_pubsub.wait_heartbeat()
            # The victim's consumer must be parked on the empty channel when the burst comes
            # (the first message goes straight to it): under load it could still be handling
            # the events of the connection (peer up, topic joined), and then one fewer is
            # dropped than counted below.
            await trio.testing.wait_all_tasks_blocked()
            # One burst: published without a checkpoint, so it leaves as one RPC and the
            # victim's reader emits every message in one go, far beyond the channel's room.
            for k in range(burst):
                sender_pubsub.publish(topic, b"flood %d" % k)
            while victim_pubsub.statistics().received < burst:
                await victim_pubsub.wait_heartbeat()

            stats = victim.node.events.statistics()
            # All but capacity + 1 dropped: the first goes straight to the waiting consumer,
            # the next `capacity` fill the buffer.
            assert stats.dropped == burst - capacity - 1
            assert stats.peak_depth == capacity
            warnings = [r for r in caplog.records if "network event channel" in r.getMessage()]
            assert len(warnings) == 1

            async with victim.client() as client:
                assert (await client.ready()).ready is True
                families = {
                    f.name: f for f in text_string_to_metric_families(await client.metrics_text())
                }
                topics = await client.topics()
                peers = await client.peers()

            def value(family: str, sample: str, **labels: str) -> float:
                return sum(
                    s.value
                    for s in families[family].samples
                    if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
                )

            dropped = value(
                "trionode_network_events_dropped",
                "trionode_network_events_dropped_total",
                kind="gossip",
            )
            assert dropped == stats.dropped
            queued = value(
                "trionode_network_events_queued",
                "trionode_network_events_queued_total",
                kind="gossip",
            )
            assert queued + dropped == burst
            assert "trionode_network_events_depth" in families
            assert (
                value("trionode_network_events_capacity", "trionode_network_events_capacity") == 8
            )
            latency_count = value(
                "trionode_network_event_latency_seconds",
                "trionode_network_event_latency_seconds_count",
            )
            assert latency_count >= stats.queued - stats.depth - 1
            received = value(
                "trionode_pubsub_messages_received",
                "trionode_pubsub_messages_received_total",
                kind=topic_kind(topic),
            )
            assert received == burst
            assert (
                value("trionode_pubsub_control", "trionode_pubsub_control_total", type="graft") >= 0
            )
            # The node still answers on the p2p side too.
            rtt = await sender.node.host.ping(victim_id)
            assert rtt > 0  # it answered (how fast is for the bench, not a test)
            # Introspection: the topic, its mesh and subscribers; the peers listing.
            [row] = topics.topics
            assert row["topic"] == topic
            assert row["subscribed"] is True
            assert row["subscribers"] == [str(sender.node.host.peer_id)]
            assert row["meshPeers"] == [str(sender.node.host.peer_id)]
            assert "flood" in _render_topics(topics)
            [peer] = peers.peers
            assert peer["topics"] == [topic]
            # Leaving: the sender hears of it and drops the victim from the topic's mesh.
            victim_pubsub.unsubscribe(topic)
            assert victim_pubsub.topics() == []
            sender_id = sender.node.host.peer_id
            while victim_id in sender_pubsub.topic_peers(topic):
                await sender_pubsub.wait_heartbeat()
            assert victim_id not in sender_pubsub.mesh_peers(topic)
            assert sender_id not in victim_pubsub.mesh_peers(topic)
