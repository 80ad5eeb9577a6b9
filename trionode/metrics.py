"""Per-node Prometheus metrics. Nothing uses the global REGISTRY: N nodes share a process."""

from __future__ import annotations

import platform
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from trionode import __version__


class NodeMetrics:
    """The node-level metrics every service can reach; services add their own families."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.started_at = time.monotonic()
        build = Info("trionode_build", "Build information", registry=self.registry)
        build.info({"version": __version__, "python": platform.python_version()})
        uptime = Gauge(
            "trionode_uptime_seconds", "Seconds since the node started", registry=self.registry
        )
        uptime.set_function(lambda: time.monotonic() - self.started_at)
        self.store_map_size = Gauge(
            "trionode_store_map_size_bytes", "LMDB map size", registry=self.registry
        )
        self.store_used = Gauge(
            "trionode_store_used_bytes", "Bytes of the LMDB map in use", registry=self.registry
        )
        self.store_entries = Gauge(
            "trionode_store_entries",
            "Entries per datastore column",
            ["column"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "trionode_http_requests",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "trionode_http_request_duration_seconds",
            "HTTP request handling time",
            ["route"],
            registry=self.registry,
        )
