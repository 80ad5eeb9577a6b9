"""The root nursery: the only place that wires the node's services together.

```
open_node(config) ── root nursery
   ├─ Host.run         p2p listeners, bootstrap dialers, one nursery per peer connection
   ├─ serve_api        hypercorn.trio.serve (stops intake when shutdown is requested)
   └─ _bound_shutdown  after a shutdown request, gives in-flight work `node.shutdown_grace`
                       seconds, then cancels what is left
```
The datastore is opened before the nursery and closed after it, so every task that might
write has finished (or been cancelled and joined) before the environment closes; every
acknowledged write has already committed, so shutdown loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from trionode.api.app import create_app
from trionode.api.server import serve_api
from trionode.config import NodeConfig
from trionode.errors import ConfigError
from trionode.home import API_URL_FILE
from trionode.identity import NodeIdentity
from trionode.metrics import NodeMetrics
from trionode.net.host import Host
from trionode.net.metrics import NetMetrics
from trionode.store.store import AsyncStore, open_store

log = logging.getLogger(__name__)


class Node:
    """A running node's handle. Made by `open_node`; services hang off it."""

    def __init__(
        self, config: NodeConfig, identity: NodeIdentity, metrics: NodeMetrics, store: AsyncStore
    ) -> None:
        self.config = config
        self.identity = identity
        self.metrics = metrics
        self.store = store
        self.shutdown_requested = trio.Event()
        self.api_urls: list[str] = []
        net_metrics = NetMetrics(metrics.registry)
        self.host = Host(identity.key, config.network, net_metrics)
        net_metrics.bind(self.host)
        self._ready = False
        token = config.api.token_sha256
        if token is None:
            raise ConfigError(
                f"{config.home / 'config.toml'}: `api.token_sha256` is not set "
                "(run `trionode init` to create a token)"
            )
        self._token_sha256 = token

    # -- NodeApi ---------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def token_sha256(self) -> str:
        return self._token_sha256

    def is_ready(self) -> bool:
        return self._ready and not self.shutdown_requested.is_set()

    def peers(self) -> list[dict[str, Any]]:
        return [attrs.asdict(p) for p in self.host.peers()]

    def listen_addresses(self) -> list[str]:
        return self.host.addresses()

    async def connect(self, address: str) -> str:
        conn = await self.host.connect(address)
        return str(conn.peer_id)

    async def refresh_metrics(self) -> None:
        stats = await self.store.stats()
        self.metrics.store_map_size.set(stats.map_size)
        self.metrics.store_used.set(stats.used_bytes)
        for column, entries in stats.entries.items():
            self.metrics.store_entries.labels(column).set(entries)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return self.api_urls[0]

    def request_shutdown(self) -> None:
        """Phase one: stop taking new work; in-flight work drains within the grace period."""
        self.shutdown_requested.set()


async def _bound_shutdown(node: Node, scope: trio.CancelScope) -> None:
    await node.shutdown_requested.wait()
    scope.deadline = trio.current_time() + node.config.node.shutdown_grace


def _api_url_file(home: Path) -> Path:
    return home / API_URL_FILE


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[Node]:
    """Start every service and yield the node; leaving the block shuts it down gracefully."""
    identity = NodeIdentity.load(config.identity_path)
    metrics = NodeMetrics()
    async with open_store(
        config.data_dir,
        initial_map_size=config.store.initial_map_size,
        max_map_size=config.store.max_map_size,
        reader_threads=config.store.reader_threads,
        passphrase=config.passphrase if config.store.encrypted else None,
        registry=metrics.registry,
    ) as store:
        node = Node(config, identity, metrics, store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_bound_shutdown, node, nursery.cancel_scope, name="shutdown-grace")
            await nursery.start(node.host.run, node.shutdown_requested, name="p2p")
            if config.api.enabled:
                node.api_urls = await nursery.start(
                    partial(
                        serve_api,
                        graceful_timeout=config.node.shutdown_grace,
                        max_request_body=config.api.max_request_body,
                    ),
                    create_app(node),
                    config.api.host,
                    config.api.port,
                    node.shutdown_requested,
                    name="api",
                )
                _api_url_file(config.home).write_text(node.api_url + "\n", encoding="utf-8")
            node._ready = True  # noqa: SLF001 - open_node is the Node's owner
            try:
                yield node
            finally:
                node.request_shutdown()
                with suppress(FileNotFoundError):
                    _api_url_file(config.home).unlink()
