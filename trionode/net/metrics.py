"""Transport metrics: connections, streams, bytes, handshake failures, protocol errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from trionode.net.host import Connection, Host


class NetMetrics:
    """Counters the host updates as things happen; gauges read from the live connections."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.connections = Gauge(
            "trionode_p2p_connections", "Open peer connections", ["direction"], registry=registry
        )
        self.dials = Counter(
            "trionode_p2p_dials", "Outbound dials by outcome", ["outcome"], registry=registry
        )
        self.handshake_failures = Counter(
            "trionode_p2p_handshake_failures",
            "Connections that failed to authenticate or negotiate, by reason",
            ["reason"],
            registry=registry,
        )
        self.protocol_errors = Counter(
            "trionode_p2p_protocol_errors",
            "Peers that broke a protocol, by layer (each one is disconnected or its stream reset)",
            ["layer"],
            registry=registry,
        )
        self.handler_errors = Counter(
            "trionode_p2p_handler_errors",
            "Stream handlers that failed with an unexpected error (a bug; the stream is reset)",
            ["protocol"],
            registry=registry,
        )
        self.pings_missed = Counter(
            "trionode_p2p_pings_missed",
            "Keepalive pings unanswered in time, by verdict (counted against the peer; "
            "excused: our own event loop ran late meanwhile) and connections closed for them",
            ["verdict"],
            registry=registry,
        )
        self.streams_refused = Counter(
            "trionode_p2p_streams_refused",
            "Inbound streams reset because the peer had too many open",
            registry=registry,
        )
        self.closed_for_room = Counter(
            "trionode_p2p_closed_for_room",
            "Unprotected peers closed to make room (trimmed above the high water mark, or "
            "displaced by a newcomer at max_connections)",
            ["reason"],
            registry=registry,
        )
        self.misbehaving = Counter(
            "trionode_p2p_misbehaving_peers",
            "Peers disconnected for breaking a protocol above the transport, by reason",
            ["reason"],
            registry=registry,
        )
        self.streams_stalled = Counter(
            "trionode_p2p_streams_stalled",
            "Streams closed because the peer sent nothing within the first-message or "
            "between-messages deadline, by protocol",
            ["protocol"],
            registry=registry,
        )
        self.retired = Counter(
            "trionode_p2p_connections_retired",
            "Connections that lost a simultaneous dial to the same peer (closed once idle)",
            registry=registry,
        )
        self.closed_bytes_sent = 0
        self.closed_bytes_received = 0
        self._registry = registry

    def account_closed(self, conn: Connection) -> None:
        """Fold a finished connection's byte counts into the running totals."""
        self.closed_bytes_sent += conn.noise.bytes_sent
        self.closed_bytes_received += conn.noise.bytes_received

    def bind(self, host: Host) -> None:
        """Expose live per-connection figures (bytes, streams) through a collector."""
        if self._registry is not None:
            self._registry.register(_LiveCollector(host, self))


class _LiveCollector(Collector):
    def __init__(self, host: Host, metrics: NetMetrics) -> None:
        self._host = host
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        conns = list(self._host.connections.values())
        total: Callable[[str], int] = lambda attr: sum(getattr(c.noise, attr) for c in conns)  # noqa: E731
        sent = CounterMetricFamily("trionode_p2p_bytes_sent", "Bytes written to peers (encrypted)")
        sent.add_metric([], self._metrics.closed_bytes_sent + total("bytes_sent"))
        received = CounterMetricFamily(
            "trionode_p2p_bytes_received", "Bytes read from peers (encrypted)"
        )
        received.add_metric([], self._metrics.closed_bytes_received + total("bytes_received"))
        streams = GaugeMetricFamily("trionode_p2p_streams", "Open streams over all connections")
        streams.add_metric([], sum(c.session.open_streams for c in conns))
        yield sent
        yield received
        yield streams
