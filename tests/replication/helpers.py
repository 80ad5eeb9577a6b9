"""Helpers for replication tests: a small cluster of real nodes on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import base58
import trio
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.node import Node
from trionode.testing import open_test_node

APPS = Path(__file__).resolve().parents[2] / "apps"


def _fast(file: FileConfig) -> FileConfig:
    return replace(
        file,
        pubsub=replace(file.pubsub, heartbeat_interval=0.2),
        network=replace(file.network, target_peers=0),
    )


@asynccontextmanager
async def open_nodes(n: int, base: Path) -> AsyncIterator[list[Node]]:
    async with AsyncExitStack() as stack:
        nodes = [
            (
                await stack.enter_async_context(
                    open_test_node(base / f"n{i}", api=False, configure=_fast)
                )
            ).node
            for i in range(n)
        ]
        yield nodes


async def install(node: Node, app: str = "kv_store") -> bytes:
    record = await node.applications.install(str(APPS / app))
    return record.application_id


async def connect_all(nodes: list[Node]) -> None:
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            await a.host.connect(b.host.addresses()[0])


async def share(nodes: list[Node], app: str = "kv_store") -> bytes:
    """nodes[0] creates a context; every other node installs the app, is invited and joins."""
    for node in nodes:
        await install(node, app)
    app_id = await install(nodes[0], app)
    record = await nodes[0].contexts.create(app_id)
    for node in nodes[1:]:
        text = await nodes[0].joins.invite(record.context_id)
        await node.joins.join(text)
    return record.context_id


async def call(node: Node, context: bytes, method: str, **args: Any) -> Any:
    return (await node.contexts.execute(context, method, json.dumps(args))).result


async def converged(nodes: list[Node], context: bytes) -> bool:
    states = [await node.contexts.state(context) for node in nodes]
    return all(s == states[0] for s in states) and states[0][2] == 0


async def wait_converged(
    nodes: list[Node],
    context: bytes,
    limit: float = 20,
    *,
    also: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Wait until every node has the same root, heads and no pending delta (and `also`
    holds: say, until event handlers that write have run everywhere).

    Event-driven where it can be: each round waits for the next applied delta anywhere
    (the hub's sequence), bounded so that a settled state is noticed too.
    """
    with trio.fail_after(limit):
        while not (await converged(nodes, context) and (also is None or await also())):
            with trio.move_on_after(0.05):
                async with trio.open_nursery() as nursery:
                    for node in nodes:
                        nursery.start_soon(_next_event, node, nursery.cancel_scope)


async def _next_event(node: Node, scope: trio.CancelScope) -> None:
    sub = node.hub.open()
    sub.contexts.update(map(_b58, node.contexts.known_ids()))
    try:
        await sub.receive.receive()
        scope.cancel()
    finally:
        sub.close()


def _b58(raw: bytes) -> str:
    return base58.b58encode(raw).decode()
