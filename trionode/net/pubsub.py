"""The Trio driver for the sans-IO gossipsub router (`trionode.wire.gossipsub`).

```
PubSub.run ── pubsub nursery
   ├─ follow_connections    on each new connection: a _Link and its writer; on close: remove_peer
   ├─ _run_timer            router.handle_timer on the Trio clock (heartbeats)
   ├─ _flusher              pushes what subscribe/unsubscribe/publish queued
   └─ _run_writer(link)     one per peer: opens OUR outbound /meshsub stream, adds the peer to
                            the router, then drains the peer's outbox into that stream
host connection nursery (per peer, owned by the Host)
   └─ _serve_stream         the handler for the peer's inbound /meshsub stream: the reader,
                            feeding router.receive_data
```

Theory of operation:

* **Two streams per peer** (libp2p-wire §7.1): each side writes only on the stream it opened
  and reads only the one the other side opened. We open ours on every new connection, as
  py-libp2p does (js finds us through identify, which lists the `/meshsub/*` handlers we
  register here). A peer joins the router when *our* stream is negotiated (then we know its
  protocol and can write to it); its inbound stream is not read before that, so its hello
  (subscriptions) cannot reach the router before the router knows the peer. Unread bytes stay
  in the yamux window: the peer is flow-controlled, not lost.
* **Nothing waits on the router's behalf.** The router is synchronous; whoever gives it input
  (a reader, the timer, an API call) then runs :meth:`PubSub._pump`, which moves its output on
  without blocking: framed RPCs go to each peer's bounded outbox with ``send_nowait`` (full →
  dropped and counted: a slow peer loses gossip, which IHAVE/IWANT and sync repair, and never
  stalls the router or the other peers), and delivered messages go to the node's network event
  channel with :meth:`NetworkEvents.emit` (full → dropped and counted; see events.py). So a
  reader never blocks on anything but its own stream, and one peer's yamux reader is never
  stalled by another peer or by the node.
* **Publishing** from the API (:meth:`PubSub.publish`) only queues into the router and wakes the
  flusher task, so messages published in one burst leave as one RPC per peer.
* **Forwarded once delivered** (issue #16): messages of the topics ``hold`` names (the
  node's context topics) are forwarded when the node has judged them
  (:meth:`PubSub.validated`: the replicator, once a gossiped delta is applied and shown, or
  found not this node's to judge), not as they arrive, and never when all their deltas are
  invalid (libp2p's validate-then-forward). A node thus applies its own copy before it pays
  for the copies it sends on: in a full mesh every peer got the author's flood publish
  directly, and each forward it sends before applying made its own apply (and, on a shared
  core, its peers') wait; each further hop waits for one apply (~0.3-0.5 ms) more. A
  message not judged within ``hold_timeout`` is forwarded at the next heartbeat, and one
  whose event the full channel dropped is forwarded at once, as before. A judged message
  leaves with the flusher's next run, as a publish does, not from the judge's own step:
  whoever the delta's show woke (subscribers; on a bench's shared loop, the other nodes'
  readers) runs first, and what several judgements queued together leaves together (on
  the shared-loop propagation bench the gossip handler's step after a show went from
  ~125 to ~45 us, issue #16).
* **Misbehaviour** (router :class:`PeerMisbehaved`: a garbled or oversized frame, a budget
  exceeded, too many invalid messages) drops the peer from the router at once and closes its
  connection.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trionode.config import PubsubSection
from trionode.errors import PeerError, ProtocolError
from trionode.net.events import GossipMessage, NetworkEvents, TopicJoined, follow_connections
from trionode.net.host import Connection, Host
from trionode.net.multistream import ProtocolNotSupportedError
from trionode.wire.gossipsub import (
    PROTOCOLS,
    GossipRouter,
    GossipStatistics,
    InvalidMessage,
    MessageReceived,
    PeerMisbehaved,
    PeerSubscribed,
    PeerUnsubscribed,
)
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.pubsub_pb import RPC
from trionode.wire.varint import BytesLike

if TYPE_CHECKING:
    from trionode.net.memory import GossipFaults

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
"""Bytes asked for per read of a peer's inbound stream."""
WRITE_BATCH = 256 * 1024
"""A writer joins queued RPCs into one write up to about this many bytes."""
_LABEL_CACHE_SIZE = 1024
"""Topics whose metric children are remembered (cleared when full; they are cheap to redo)."""
DEFAULT_EVENT_CAPACITY = 1000
"""Capacity of the event channel a PubSub makes for itself when not given one."""


def topic_kind(topic: str) -> str:
    """The metrics label for a topic: what comes before its last ``/`` (no per-topic labels).

    ``trionode/context/<id>`` → ``trionode/context``; a topic without ``/`` → ``other``.
    """
    kind, slash, _ = topic.rpartition("/")
    return kind if slash and kind else "other"


class _Link:
    """Our side of the pubsub conversation with one peer over one connection."""

    __slots__ = (
        "added",
        "closed",
        "conn",
        "outbox",
        "outbox_dropped",
        "peer_id",
        "reader_scope",
        "ready",
        "receive",
        "writer_scope",
    )

    def __init__(self, conn: Connection, capacity: int) -> None:
        self.conn = conn
        self.peer_id = conn.peer_id
        # Bounded (pubsub.outbox_capacity); full means drop and count (module docstring).
        self.outbox, self.receive = trio.open_memory_channel[bytes](capacity)
        self.outbox_dropped = 0
        self.ready = trio.Event()
        """Set once the peer is in the router (``added``), or it never will be."""
        self.added = False
        self.closed = False
        self.writer_scope = trio.CancelScope()
        self.reader_scope: trio.CancelScope | None = None


class PubSub:
    """Gossipsub for one host. Start it with ``await nursery.start(pubsub.run, shutdown)``.

    Handlers for the gossipsub protocols are registered on ``host`` here, so identify
    advertises them from the start; inbound streams wait until :meth:`run` is running.
    """

    def __init__(
        self,
        host: Host,
        key: PrivateKey,
        config: PubsubSection,
        metrics: PubSubMetrics | None = None,
        *,
        events: NetworkEvents | None = None,
        rng: random.Random | None = None,
        faults: GossipFaults | None = None,
        hold: Callable[[str], bool] | None = None,
    ) -> None:
        """Args:
        host: the transport; its connections are followed and its handler table extended.
        key: our identity; every message we publish is signed with it (StrictSign).
        config: the ``[pubsub]`` section.
        metrics: where to count; None counts nowhere.
        events: the node's network event channel; delivered messages go there. If None,
            a private one of capacity 1000 is made (read it through ``pubsub.events``).
        rng: peer selection randomness, seeded for reproducible simulations.
        faults: test clusters only: drops, duplicates or delays received messages before
            the router sees them (`trionode.net.memory.GossipFaults`). None: no faults.
        hold: the topics whose messages are forwarded only once judged (:meth:`validated`,
            the module docstring), if ``config.forward_after_delivery``.
        """
        self.host = host
        self.config = config
        # Seqnos must increase across restarts (libp2p-wire §7.3): seed from the wall clock.
        self.router = GossipRouter(
            key,
            initial_seqno=time.time_ns(),
            config=config.gossip_config(),
            rng=rng,
            hold=hold if config.forward_after_delivery else None,
        )
        self.events = events if events is not None else NetworkEvents(DEFAULT_EVENT_CAPACITY)
        self.metrics = metrics if metrics is not None else PubSubMetrics(None)
        self._links: dict[PeerId, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self._running = trio.Event()
        self._flush_wanted = trio.Event()
        self._heartbeat_done = trio.Event()
        self._subscribed = trio.Event()
        self._heartbeat_or_subscribed = trio.Event()
        for protocol in PROTOCOLS:
            host.set_handler(protocol, self._serve_stream)
        self.faults = faults
        self.metrics.bind(self)

    # -- running ---------------------------------------------------------------------------

    async def run(
        self,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until ``shutdown_requested`` is set (or cancelled).

        Ready (``task_status.started``) once the connections open now have their writers
        started and the first heartbeat has run.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._run_timer, name=f"{self.host.peer_id}:pubsub-timer")
                if self.faults is not None:
                    await nursery.start(self.faults.run, self, name=f"{self.host.peer_id}:faults")
                nursery.start_soon(self._flusher, name=f"{self.host.peer_id}:pubsub-flush")
                await nursery.start(
                    follow_connections,
                    self.host,
                    self._on_connection_open,
                    self._on_connection_close,
                    name=f"{self.host.peer_id}:pubsub-peers",
                )
                self._running.set()
                task_status.started()
                if shutdown_requested is not None:
                    await shutdown_requested.wait()
                    nursery.cancel_scope.cancel(reason="pubsub shutting down")
        finally:
            for link in list(self._links.values()):
                self._close_link(link)
            self._nursery = None

    async def _run_timer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        router = self.router
        router.heartbeat(trio.current_time())
        self._after_heartbeat()
        task_status.started()
        while True:
            due = router.get_timer()
            assert due is not None  # set by the first heartbeat
            await trio.sleep_until(due)
            router.handle_timer(trio.current_time())
            self._after_heartbeat()

    def _after_heartbeat(self) -> None:
        self._pump()
        self._heartbeat_done.set()
        self._heartbeat_done = trio.Event()
        self._heartbeat_or_subscribed.set()
        self._heartbeat_or_subscribed = trio.Event()

    async def wait_heartbeat(self) -> None:
        """Wait until the next heartbeat has run (and its output has been queued)."""
        await self._heartbeat_done.wait()

    async def wait_subscribed(self) -> None:
        """Wait until a peer next subscribes to a topic."""
        await self._subscribed.wait()

    async def wait_heartbeat_or_subscribed(self) -> None:
        """Wait until the next heartbeat has run or a peer next subscribes, whichever is
        first (one event: waiting for both in a nursery of two tasks cost every node a
        nursery per heartbeat)."""
        await self._heartbeat_or_subscribed.wait()

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            self._pump()

    # -- public API ------------------------------------------------------------------------

    def subscribe(self, topic: str) -> None:
        """Join ``topic`` (announce it, graft a mesh). Never blocks; idempotent.

        Raises:
            LocalProtocolError: the topic is too long.
        """
        self.router.subscribe(topic, now=trio.current_time())
        self._flush_wanted.set()

    def unsubscribe(self, topic: str) -> None:
        """Leave ``topic`` (announce it, prune the mesh). Never blocks; idempotent."""
        self.router.unsubscribe(topic, now=trio.current_time())
        self._flush_wanted.set()

    def publish(self, topic: str, data: BytesLike) -> bytes:
        """Sign and send a message; returns its message id. Never blocks.

        The message leaves with the next flush (messages published in one burst share RPCs).
        It is not delivered back to us. Publishing to a topic we do not subscribe to is
        allowed (fanout).

        Raises:
            LocalProtocolError: ``data`` is larger than ``pubsub.max_message_size`` or the
                topic is too long.
        """
        message_id = self.router.publish(topic, data, trio.current_time())
        self.metrics.published_for(topic).inc()
        self._flush_wanted.set()
        return message_id

    def validated(self, message_id: bytes, *, accept: bool) -> None:
        """The node's judgement of a delivered message of a held topic: accepted, it is
        queued for the mesh and leaves with the next flush; rejected, dropped (module
        docstring). Nothing if it is not held."""
        if self.router.validated(message_id, accept=accept) and accept:
            self._flush_wanted.set()

    def topics(self) -> list[str]:
        """Topics we subscribe to."""
        return self.router.subscriptions()

    def mesh_peers(self, topic: str) -> list[PeerId]:
        """Our mesh for ``topic`` (empty if we do not subscribe)."""
        return self.router.mesh_peers(topic)

    def topic_peers(self, topic: str) -> list[PeerId]:
        """Connected peers known to subscribe to ``topic``."""
        return self.router.topic_peers(topic)

    def has_topic_peers(self, topic: str) -> bool:
        """Whether any connected peer is known to subscribe to ``topic`` (none: `publish`
        would reach nobody, so a caller may skip building the message)."""
        return self.router.has_topic_peers(topic)

    def peer_topics(self, peer: PeerId) -> list[str]:
        """Topics ``peer`` announced."""
        return self.router.peer_topics(peer)

    def known_topics(self) -> list[str]:
        """Topics we subscribe to, then the others our peers subscribe to."""
        ours = self.router.subscriptions()
        theirs = [t for t in self.router.statistics().topic_peers if t not in ours]
        return ours + sorted(theirs)

    def receive_rpc(self, peer_id: PeerId, rpc: RPC) -> None:
        """Hand the router one RPC as if read from ``peer_id``, and pass its output on.

        For fault injection (delayed copies); peers' streams are read by ``_serve_stream``.
        """
        self.router.receive_rpc(peer_id, rpc, trio.current_time())
        self._pump()

    def statistics(self) -> GossipStatistics:
        return self.router.statistics()

    # -- peers -----------------------------------------------------------------------------

    def _on_connection_open(self, conn: Connection) -> None:
        self._open_link(conn)

    def _on_connection_close(self, conn: Connection) -> None:
        link = self._links.get(conn.peer_id)
        if link is not None and link.conn is conn:
            self._close_link(link)

    def _open_link(self, conn: Connection) -> _Link:
        link = self._links.get(conn.peer_id)
        if link is not None:
            if link.conn is conn:
                return link
            self._close_link(link)  # the connection was replaced (simultaneous dial)
        assert self._nursery is not None
        link = _Link(conn, self.config.outbox_capacity)
        self._links[conn.peer_id] = link
        self._nursery.start_soon(self._run_writer, link, name=f"{conn.peer_id}:pubsub-writer")
        return link

    def _close_link(self, link: _Link) -> None:
        """Forget the peer (router, outbox, tasks). Safe to call more than once."""
        if link.closed:
            return
        link.closed = True
        if self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]
        if link.added:
            self.router.remove_peer(link.peer_id)
        link.outbox.close()
        link.writer_scope.cancel()
        if link.reader_scope is not None:
            link.reader_scope.cancel()
        link.ready.set()

    async def _run_writer(self, link: _Link) -> None:
        conn = link.conn
        with link.writer_scope:
            try:
                protocol, stream = await conn.new_stream(
                    PROTOCOLS, negotiation_timeout=self.host.config.negotiation_timeout
                )
            except ProtocolNotSupportedError:
                log.debug("%s does not speak pubsub", link.peer_id)
                link.ready.set()
                return
            except (
                PeerError,
                ProtocolError,
                trio.TooSlowError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ) as exc:
                log.debug("cannot open a pubsub stream to %s: %s", link.peer_id, exc)
                self._close_link(link)
                return
            if link.closed:  # closed while the stream was being negotiated
                await trio.aclose_forcefully(stream)
                return
            try:
                self.router.add_peer(link.peer_id, protocol, outbound=conn.outbound)
                link.added = True
                link.ready.set()
                self._pump()  # our hello: every current subscription
                await self._drain(link, stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("pubsub stream to %s broke", link.peer_id)
                self._close_link(link)
            finally:
                await trio.aclose_forcefully(stream)

    @staticmethod
    async def _drain(link: _Link, stream: trio.abc.Stream) -> None:
        receive = link.receive
        async for first in receive:
            batch = [first]
            size = len(first)
            while size < WRITE_BATCH:
                try:
                    chunk = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                batch.append(chunk)
                size += len(chunk)
            await stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))

    async def _serve_stream(self, stream: trio.abc.Stream, conn: Connection) -> None:
        """The reader of a peer's inbound pubsub stream (runs in the host's connection)."""
        await self._running.wait()
        if self._nursery is None:
            return  # PubSub has stopped
        if self.host.connections.get(conn.peer_id) is not conn or conn.closed:
            return  # a connection being replaced or closed
        link = self._links.get(conn.peer_id)
        if link is None or link.conn is not conn:
            link = self._open_link(conn)
        if link.reader_scope is not None:
            log.debug("%s opened a second pubsub stream; refusing it", conn.peer_id)
            return
        with trio.CancelScope() as scope:
            link.reader_scope = scope
            await link.ready.wait()
            if not link.added or link.closed:
                return
            feed = self.router.receive_data if self.faults is None else self.faults.reader(self)
            peer_id = link.peer_id
            while not link.closed:  # _pump() closes it when the peer misbehaves
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    log.debug("%s closed its pubsub stream", peer_id)
                    self._close_link(link)
                    return
                feed(peer_id, data, trio.current_time())
                self._pump()

    # -- moving the router's output --------------------------------------------------------

    def _pump(self) -> None:
        """Hand the router's output on. Synchronous: never blocks (module docstring)."""
        router = self.router
        metrics = self.metrics
        self._send_rpcs()
        unheld = False
        while (event := router.next_event()) is not None:
            if isinstance(event, MessageReceived):
                metrics.received_for(event.topic).inc()
                if not self.events.emit(
                    GossipMessage(
                        topic=event.topic,
                        data=event.data,
                        author=event.from_peer,
                        seqno=event.seqno,
                        message_id=event.message_id,
                        received_from=event.received_from,
                    )
                ) and router.validated(event.message_id, accept=True):
                    unheld = True  # (nobody will judge it: forwarded as before)
            elif isinstance(event, InvalidMessage):
                kind = "none" if event.topic is None else topic_kind(event.topic)
                metrics.invalid.labels(kind, event.reason).inc()
                log.debug("invalid pubsub message from %s: %s", event.peer, event.reason)
            elif isinstance(event, PeerMisbehaved):
                self._misbehaved(event)
            elif isinstance(event, PeerSubscribed):
                log.debug("%s subscribed to %s", event.peer, event.topic)
                self.events.emit(TopicJoined(peer=event.peer, topic=event.topic))
                self._subscribed.set()
                self._subscribed = trio.Event()
                self._heartbeat_or_subscribed.set()
                self._heartbeat_or_subscribed = trio.Event()
            elif isinstance(event, PeerUnsubscribed):
                log.debug("%s unsubscribed from %s", event.peer, event.topic)
        if unheld:
            self._send_rpcs()

    def _send_rpcs(self) -> None:
        """The router's queued RPCs to each peer's outbox (full: dropped and counted)."""
        metrics = self.metrics
        for peer_id, chunk in self.router.rpcs_to_send():
            link = self._links.get(peer_id)
            if link is None or link.closed:
                continue
            try:
                link.outbox.send_nowait(chunk)
            except trio.WouldBlock:
                link.outbox_dropped += 1
                metrics.outbox_dropped.inc()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _misbehaved(self, event: PeerMisbehaved) -> None:
        link = self._links.get(event.peer)
        if link is None:
            return
        log.warning("disconnecting %s: pubsub misbehaviour (%s)", event.peer, event.reason)
        self.metrics.disconnects.labels(event.reason).inc()
        self._close_link(link)
        if self._nursery is not None:
            self._nursery.start_soon(link.conn.aclose)


# -- metrics ----------------------------------------------------------------------------------


class PubSubMetrics:
    """Counters the driver updates, plus a collector reading the router's statistics.

    Labels are topic *kinds* (:func:`topic_kind`), never topics: a node may hold thousands of
    contexts, one topic each.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._registry = registry
        self.published = Counter(
            "trionode_pubsub_messages_published",
            "Messages we published, by topic kind",
            ["kind"],
            registry=registry,
        )
        self.received = Counter(
            "trionode_pubsub_messages_received",
            "Valid new messages delivered to the node, by topic kind",
            ["kind"],
            registry=registry,
        )
        self.invalid = Counter(
            "trionode_pubsub_messages_invalid",
            "Messages dropped as invalid (bad signature, too large, ...), by topic kind and reason",
            ["kind", "reason"],
            registry=registry,
        )
        self.outbox_dropped = Counter(
            "trionode_pubsub_outbox_dropped",
            "RPCs dropped because a peer's outbox was full (a slow peer)",
            registry=registry,
        )
        self.disconnects = Counter(
            "trionode_pubsub_disconnects",
            "Peers disconnected for pubsub misbehaviour, by reason",
            ["reason"],
            registry=registry,
        )

        self._published: dict[str, Counter] = {}
        self._received: dict[str, Counter] = {}

    def published_for(self, topic: str) -> Counter:
        """The published counter of ``topic``'s kind (children cached: a hot path)."""
        return _child(self.published, self._published, topic)

    def received_for(self, topic: str) -> Counter:
        """The received counter of ``topic``'s kind."""
        return _child(self.received, self._received, topic)

    def bind(self, pubsub: PubSub) -> None:
        """Expose the router's counters and mesh sizes through a collector."""
        if self._registry is not None:
            self._registry.register(_RouterCollector(pubsub))


def _child(counter: Counter, cache: dict[str, Counter], topic: str) -> Counter:
    child = cache.get(topic)
    if child is None:
        if len(cache) >= _LABEL_CACHE_SIZE:
            cache.clear()
        child = cache[topic] = counter.labels(topic_kind(topic))
    return child


class _RouterCollector(Collector):
    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub

    def collect(self) -> Iterator[Metric]:
        stats = self._pubsub.statistics()
        duplicates = CounterMetricFamily(
            "trionode_pubsub_messages_duplicate", "Messages received again and ignored"
        )
        duplicates.add_metric([], stats.duplicates)
        yield duplicates
        forwarded = CounterMetricFamily(
            "trionode_pubsub_messages_forwarded",
            "Message copies queued for peers (publishes, forwards, IWANT replies)",
        )
        forwarded.add_metric([], stats.forwarded)
        yield forwarded
        for name, doc, table in (
            (
                "trionode_pubsub_router_invalid",
                "Invalid RPCs and messages by reason",
                stats.invalid,
            ),
            ("trionode_pubsub_router_dropped", "Discarded traffic by reason", stats.dropped),
            ("trionode_pubsub_misbehaviour", "Peer misbehaviour by reason", stats.misbehaviour),
        ):
            family = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, count in sorted(table.items()):
                family.add_metric([reason], count)
            yield family
        control = CounterMetricFamily(
            "trionode_pubsub_control",
            "Control entries by type and direction (IHAVE per topic, IWANT per message id)",
            labels=["type", "direction"],
        )
        for kind, sent, received in (
            ("ihave", stats.ihave_sent, stats.ihave_received),
            ("iwant", stats.iwant_sent, stats.iwant_received),
            ("graft", stats.graft_sent, stats.graft_received),
            ("prune", stats.prune_sent, stats.prune_received),
        ):
            control.add_metric([kind, "sent"], sent)
            control.add_metric([kind, "received"], received)
        yield control
        served = CounterMetricFamily(
            "trionode_pubsub_iwant_served", "Messages sent in answer to IWANT"
        )
        served.add_metric([], stats.iwant_served)
        yield served
        heartbeats = CounterMetricFamily("trionode_pubsub_heartbeats", "Router heartbeats run")
        heartbeats.add_metric([], stats.heartbeats)
        yield heartbeats
        peers = GaugeMetricFamily("trionode_pubsub_peers", "Peers we talk pubsub with")
        peers.add_metric([], stats.peers)
        yield peers
        topics: dict[str, int] = {}
        mesh: dict[str, int] = {}
        mesh_min: dict[str, int] = {}
        for topic in stats.subscriptions:
            kind = topic_kind(topic)
            size = stats.mesh_sizes.get(topic, 0)
            topics[kind] = topics.get(kind, 0) + 1
            mesh[kind] = mesh.get(kind, 0) + size
            mesh_min[kind] = min(mesh_min.get(kind, size), size)
        for name, doc, values in (
            ("trionode_pubsub_topics", "Topics we subscribe to, by kind", topics),
            ("trionode_pubsub_mesh_peers", "Mesh memberships summed over topics, by kind", mesh),
            ("trionode_pubsub_mesh_peers_min", "Smallest mesh among topics, by kind", mesh_min),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["kind"])
            for kind, value in sorted(values.items()):
                gauge.add_metric([kind], value)
            yield gauge
        for name, doc, value in (
            ("trionode_pubsub_seen_cache", "Message ids in the seen cache", stats.seen_cache_size),
            ("trionode_pubsub_message_cache", "Messages in the cache", stats.message_cache_size),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
