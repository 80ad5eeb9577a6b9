"""`/ws` against hostile clients: foreign origins (and, below, caps and resumes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from quart.testing.connections import WebsocketResponseError
from quart.typing import TestClientProtocol as QuartClient

from trionode.api.app import create_app
from trionode.config import FileConfig
from trionode.testing import TestNode, open_test_node

ALLOWED = "http://localhost:5173"


def _allow_one_origin(file: FileConfig) -> FileConfig:
    return msgspec.structs.replace(
        file, api=msgspec.structs.replace(file.api, cors_origins=[ALLOWED])
    )


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(
        tmp_path / "home", api=False, configure=_allow_one_origin
    ) as test_node:
        yield test_node


@pytest.fixture
def client(node: TestNode) -> QuartClient:
    return create_app(node.node).test_client()


async def handshake_status(client: QuartClient, headers: dict[str, str]) -> int:
    """101 if the WebSocket opened (and answered a ping), else the HTTP status it got."""
    statuses = [101]
    try:
        async with client.websocket("/ws", headers=headers) as ws:
            await ws.send('{"type": "ping"}')
            assert await ws.receive() == '{"type": "pong"}'
    except* WebsocketResponseError as group:
        statuses = [e.response.status_code for e in group.exceptions]  # type: ignore[union-attr]
    [status] = statuses
    return status


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (None, 101),  # not a browser: the token is enough
        (ALLOWED, 101),
        ("http://evil.example", 403),
        ("http://localhost:5174", 403),  # another port is another origin
        ("null", 403),  # sandboxed frames and file:// pages
    ],
)
async def test_browser_origin_must_be_listed(
    client: QuartClient, node: TestNode, origin: str | None, status: int
) -> None:
    headers = {"Authorization": f"Bearer {node.token}"}
    if origin is not None:
        headers["Origin"] = origin
    assert await handshake_status(client, headers) == status
