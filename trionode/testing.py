"""Helpers to run several nodes inside one test (or benchmark, or demo) process.

Each node gets its own home under a base directory, ports chosen by the OS (0), its own
datastore, metrics registry and API app: nothing is process-global.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
from msgspec.structs import replace

from trionode.client import Client, open_client
from trionode.config import FileConfig, NodeConfig, load_config
from trionode.home import init_home
from trionode.node import Node, open_node

ConfigureFn = Callable[[FileConfig], FileConfig]


@attrs.frozen
class TestNode:
    """A running node plus what a test needs to talk to it."""

    __test__ = False  # not a pytest class

    node: Node
    home: Path
    token: str

    @property
    def api_url(self) -> str:
        return self.node.api_url

    def client(self) -> AbstractAsyncContextManager[Client]:
        return open_client(self.api_url, self.token)


def make_test_config(
    home: Path,
    *,
    api: bool = True,
    configure: ConfigureFn | None = None,
    passphrase: str | None = None,
) -> tuple[NodeConfig, str]:
    """Initialise `home` with port-0 listeners and return its config and API token."""
    result = init_home(home, swarm_port=0, server_port=0, swarm_host="127.0.0.1")
    config = load_config(home)
    file = config.file
    # No mDNS in tests: test nodes must not find each other (or strangers) on the real link.
    file = replace(file, network=replace(file.network, mdns=False))
    if not api:
        file = replace(file, api=replace(file.api, enabled=False))
    if configure is not None:
        file = configure(file)
    return NodeConfig(home=home, file=file, passphrase=passphrase), result.token


@asynccontextmanager
async def open_test_node(
    home: Path,
    *,
    api: bool = True,
    configure: ConfigureFn | None = None,
    passphrase: str | None = None,
) -> AsyncIterator[TestNode]:
    config, token = make_test_config(home, api=api, configure=configure, passphrase=passphrase)
    async with open_node(config) as node:
        yield TestNode(node=node, home=home, token=token)


@asynccontextmanager
async def open_test_nodes(
    n: int, base: Path, *, api: bool = True, configure: ConfigureFn | None = None
) -> AsyncIterator[list[TestNode]]:
    """Start `n` nodes (homes `base/node0` …) and stop them all on exit, last first."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_test_node(base / f"node{i}", api=api, configure=configure)
            )
            for i in range(n)
        ]
        yield nodes
