"""The network event channel: what the network learns, carried to the node (DESIGN §1).

```
PubSub reader tasks ──emit()──┐
connection watcher  ──emit()──┴─► bounded memory channel ──► NetworkEvents.run ──► node handler
                                  (network.event_channel_capacity)                (+ observers)
```

**Policy when the channel is full: drop and count.** Producers call :meth:`NetworkEvents.emit`,
which is synchronous and never blocks. The producers are the tasks that read from peers (a
gossipsub stream's reader feeds the router and emits what it delivers); if they waited for
room, one slow consumer would stop them reading, the yamux window would close, and a peer's
whole connection (its pings, its sync streams) would stall behind a queue that has nothing
to do with it. Dropping is safe here because gossip is best effort: a delta lost on the way
in is found again by sync (heads advertised on the topic, periodic sessions), exactly as if
the network had lost it. Drops are counted by kind (``trionode_network_events_dropped_total``)
and a warning is logged once whenever the queue reaches 80 % of its capacity (re-armed when it
drains below half), so an overloaded node is visible before it drops anything.

There is one consumer, :meth:`NetworkEvents.run`, started by ``node.py``; it hands each event
to the node's handler, measures the latency from :meth:`~NetworkEvents.emit` to the end of the
handler (``trionode_network_event_latency_seconds``), and copies the event to observers
(:meth:`~NetworkEvents.observe`, for tests and tools; those copies are dropped, not waited
for, when an observer falls behind).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trionode.net.host import Connection, Host
from trionode.wire.keys import PeerId

log = logging.getLogger(__name__)

WARN_FRACTION = 0.8
"""Depth (fraction of capacity) at which the warning is logged ..."""
REARM_FRACTION = 0.5
"""... and below which it is re-armed."""
DEFAULT_OBSERVER_CAPACITY = 10_000
"""Events an observer may fall behind before its copies are dropped (tests read them all)."""
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


# -- events -----------------------------------------------------------------------------------


@attrs.frozen
class GossipMessage:
    """A valid (signature-checked) gossip message for a topic we subscribe to, delivered once."""

    topic: str
    data: bytes
    author: PeerId
    """Who published and signed it."""
    seqno: int
    message_id: bytes
    received_from: PeerId
    """The peer that forwarded it to us."""


@attrs.frozen
class PeerConnected:
    """A connection to ``peer`` opened (after the handshake)."""

    peer: PeerId
    outbound: bool


@attrs.frozen
class PeerDisconnected:
    """The connection to ``peer`` closed."""

    peer: PeerId


@attrs.frozen
class TopicJoined:
    """``peer`` (re)subscribed to ``topic``: after a reconnect, a partition healing, or a
    peer's restart, this is the moment to sync with it."""

    peer: PeerId
    topic: str


NetworkEvent = GossipMessage | PeerConnected | PeerDisconnected | TopicJoined
EventHandler = Callable[[NetworkEvent], Awaitable[None]]


def event_kind(event: NetworkEvent) -> str:
    """The metrics label for an event."""
    if isinstance(event, GossipMessage):
        return "gossip"
    if isinstance(event, PeerConnected):
        return "peer_connected"
    if isinstance(event, TopicJoined):
        return "topic_joined"
    return "peer_disconnected"


@attrs.frozen
class NetworkEventStatistics:
    capacity: int
    depth: int
    """Events queued now."""
    peak_depth: int
    queued: int
    """Events accepted since the start."""
    dropped: int
    """Events dropped because the channel was full."""
    handled: int


# -- the channel ------------------------------------------------------------------------------


class NetworkEvents:
    """The bounded network → node channel. See the module docstring for the full policy."""

    def __init__(self, capacity: int, registry: CollectorRegistry | None = None) -> None:
        if capacity < 1:
            raise ValueError("event channel capacity must be positive")
        self.capacity = capacity
        # Bounded (network.event_channel_capacity); full means drop and count (module docstring).
        self._send, self._receive = trio.open_memory_channel[tuple[NetworkEvent, float]](capacity)
        self._observers: list[trio.MemorySendChannel[NetworkEvent]] = []
        self._warned = False
        self._peak = 0
        self._queued = 0
        self._dropped = 0
        self._handled = 0
        queued = Counter(
            "trionode_network_events_queued",
            "Network events accepted into the node's event channel, by kind",
            ["kind"],
            registry=registry,
        )
        dropped = Counter(
            "trionode_network_events_dropped",
            "Network events dropped because the event channel was full, by kind",
            ["kind"],
            registry=registry,
        )
        latency = Histogram(
            "trionode_network_event_latency_seconds",
            "Time from a network event's arrival to the end of its processing, by kind",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Children resolved once per kind: labels() is a lookup under a lock, on a hot path.
        kinds = ("gossip", "peer_connected", "peer_disconnected", "topic_joined")
        self._queued_metric = {kind: queued.labels(kind) for kind in kinds}
        self._dropped_metric = {kind: dropped.labels(kind) for kind in kinds}
        self._latency = {kind: latency.labels(kind) for kind in kinds}
        depth = Gauge(
            "trionode_network_events_depth",
            "Network events waiting in the node's event channel",
            registry=registry,
        )
        depth.set_function(lambda: self._send.statistics().current_buffer_used)
        capacity_gauge = Gauge(
            "trionode_network_events_capacity",
            "Capacity of the node's event channel (network.event_channel_capacity)",
            registry=registry,
        )
        capacity_gauge.set(capacity)

    # -- producers --------------------------------------------------------------------------

    def emit(self, event: NetworkEvent) -> bool:
        """Queue ``event`` for the node; never blocks. Returns False if it was dropped."""
        kind = event_kind(event)
        try:
            self._send.send_nowait((event, trio.current_time()))
        except trio.WouldBlock:
            self._dropped += 1
            self._dropped_metric[kind].inc()
            return False
        except trio.BrokenResourceError:  # the consumer is gone: the node is stopping
            return False
        self._queued += 1
        self._queued_metric[kind].inc()
        depth = self._send.statistics().current_buffer_used
        self._peak = max(self._peak, depth)
        if not self._warned and depth >= WARN_FRACTION * self.capacity:
            self._warned = True
            log.warning(
                "network event channel is %d%% full (%d of %d); events will be dropped when full",
                100 * depth // self.capacity,
                depth,
                self.capacity,
            )
        return True

    # -- the consumer -----------------------------------------------------------------------

    async def run(
        self,
        handler: EventHandler | None = None,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume events until ``shutdown_requested`` (or cancellation). The only consumer.

        Each event goes to ``await handler(event)``, then to the observers. Events still queued
        at shutdown are discarded (best effort, like the rest of gossip).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._consume, handler, name="network-events")
            task_status.started()
            if shutdown_requested is not None:
                await shutdown_requested.wait()
                nursery.cancel_scope.cancel(reason="node shutting down")

    async def _consume(self, handler: EventHandler | None) -> None:
        rearm_below = REARM_FRACTION * self.capacity
        async for event, queued_at in self._receive:
            if handler is not None:
                await handler(event)
            for observer in self._observers:
                # An observer that falls behind loses copies; it never slows the node down.
                with suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    observer.send_nowait(event)
            self._handled += 1
            self._latency[event_kind(event)].observe(trio.current_time() - queued_at)
            if self._warned and self._receive.statistics().current_buffer_used < rearm_below:
                self._warned = False

    @contextmanager
    def observe(
        self, capacity: int = DEFAULT_OBSERVER_CAPACITY
    ) -> Iterator[trio.MemoryReceiveChannel[NetworkEvent]]:
        """Receive a copy of every event the consumer handles while the block runs.

        For tests and tools. The copy is made after the node's handler ran, so what an
        observer sees is what the node processed: events dropped at the channel never appear.
        """
        # Bounded: an observer that stops reading loses copies instead of growing memory.
        send, receive = trio.open_memory_channel[NetworkEvent](capacity)
        self._observers.append(send)
        try:
            with receive:
                yield receive
        finally:
            self._observers.remove(send)
            send.close()

    def statistics(self) -> NetworkEventStatistics:
        return NetworkEventStatistics(
            capacity=self.capacity,
            depth=self._send.statistics().current_buffer_used,
            peak_depth=self._peak,
            queued=self._queued,
            dropped=self._dropped,
            handled=self._handled,
        )


# -- peers up/down ----------------------------------------------------------------------------


async def follow_connections(
    host: Host,
    on_open: Callable[[Connection], None],
    on_close: Callable[[Connection], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_open``/``on_close`` for every connection of ``host`` as it opens and closes.

    Connections open when this starts are reported first (before ``task_status.started``).
    A connection replaced by another one to the same peer (simultaneous dial) is reported
    closed, then the new one open. Never returns; cancel it.
    """
    known: dict[PeerId, Connection] = {}
    started = False
    while True:
        current = {peer: conn for peer, conn in host.connections.items() if not conn.closed}
        for peer, conn in list(known.items()):
            if current.get(peer) is not conn:
                del known[peer]
                on_close(conn)
        for peer, conn in current.items():
            if peer not in known:
                known[peer] = conn
                on_open(conn)
        if not started:
            started = True
            task_status.started()
        # No checkpoint between the snapshot above and this wait: no change can slip between.
        await host.wait_connection_changed()


async def watch_peers(
    host: Host,
    events: NetworkEvents,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Emit PeerConnected/PeerDisconnected for ``host``'s connections. Never returns."""

    def opened(conn: Connection) -> None:
        events.emit(PeerConnected(conn.peer_id, conn.outbound))

    def closed(conn: Connection) -> None:
        events.emit(PeerDisconnected(conn.peer_id))

    await follow_connections(host, opened, closed, task_status=task_status)
