"""`/ws` against hostile clients: foreign origins (and, below, caps and resumes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError
from quart.typing import TestClientProtocol as QuartClient
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request

from tests.context.test_contexts import install_and_create
from trionode.api.app import create_app
from trionode.config import FileConfig
from trionode.testing import ConfigureFn, TestNode, open_test_node

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


def auth(node: TestNode) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.token}"}


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("[" * 20_000 + "]" * 20_000, "nested 20000 deep"),
        ('{"type": "ping", "x": NaN}', "NaN is not JSON"),
        ('{"type": "subscribe", "contextIds": [], "since": true}', "since must be an integer"),
        ('{"type": "subscribe", "contextIds": [], "since": -1}', "since must be between"),
        ('{"type": "subscribe", "contextIds": [], "since": 1.5}', "since must be an integer"),
        ('{"type": "subscribe", "contextIds": [], "progress": 1}', "progress must be true or"),
        ('{"type": "subscribe", "contextIds": [], "since": 1e999}', "out of range"),
    ],
)
async def test_bad_messages_get_an_error_and_the_socket_stays_usable(
    client: QuartClient, node: TestNode, message: str, reason: str
) -> None:
    async with client.websocket("/ws", headers=auth(node)) as ws:
        await ws.send(message)
        answer = json.loads(await ws.receive())
        assert answer["type"] == "error"
        assert reason in answer["message"]
        await ws.send('{"type": "ping"}')
        assert json.loads(await ws.receive()) == {"type": "pong"}


async def test_an_oversized_message_closes_the_socket_before_it_is_buffered(
    tmp_path: Path,
) -> None:
    # Real server (loopback): the frame limit is hypercorn's, which the test client skips.
    # wsproto by hand, so the test owns (and closes) its socket whatever the server does.
    async with open_test_node(tmp_path / "real") as real:
        host, port = real.api_url.removeprefix("http://").rsplit(":", 1)
        limit = real.node.config.api.max_ws_message
        ws = WSConnection(ConnectionType.CLIENT)
        headers = [(b"authorization", f"Bearer {real.token}".encode())]
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(ws.send(Request(host=host, target="/ws", extra_headers=headers)))
            events = await _next_events(stream, ws)
            assert isinstance(events[0], AcceptConnection)
            await stream.send_all(ws.send(Message(data="x" * (limit + 1))))
            events = await _next_events(stream, ws)
        assert [type(e) for e in events] == [CloseConnection]
        assert events[0].code == 1009  # "message too big"


async def _next_events(stream: trio.SocketStream, ws: WSConnection) -> list[Any]:
    while True:
        events = list(ws.events())
        if events:
            return events
        ws.receive_data(await stream.receive_some() or None)


def _with_settings(**changes: object) -> ConfigureFn:
    def configure(file: FileConfig) -> FileConfig:
        return msgspec.structs.replace(file, api=msgspec.structs.replace(file.api, **changes))

    return configure


async def test_the_connection_cap_refuses_the_next_handshake(tmp_path: Path) -> None:
    async with open_test_node(
        tmp_path / "capped", api=False, configure=_with_settings(max_websockets=2)
    ) as capped:
        client = create_app(capped.node).test_client()
        headers = auth(capped)
        async with client.websocket("/ws", headers=headers) as a:
            await a.send('{"type": "ping"}')
            await a.receive()
            async with client.websocket("/ws", headers=headers) as b:
                await b.send('{"type": "ping"}')
                await b.receive()
                assert await handshake_status(client, headers) == 503
            assert capped.node.hub.subscribers == 1
            # A slot is free again once a socket closes.
            assert await handshake_status(client, headers) == 101


async def _subscribe(ws: Any, context: str, since: int | None) -> list[dict[str, Any]]:
    """Subscribe and collect what comes up to (and including) the answer."""
    request: dict[str, Any] = {"type": "subscribe", "contextIds": [context]}
    if since is not None:
        request["since"] = since
    await ws.send(json.dumps(request))
    received: list[dict[str, Any]] = []
    while not received or received[-1]["type"] not in ("subscribed", "resync"):
        received.append(json.loads(await ws.receive()))
    return received


def _publish(node: TestNode, context: str, n: int) -> None:
    for i in range(n):
        node.node.hub.publish(
            context_id=context,
            delta_id=f"{i:064x}",
            root_hash="00" * 32,
            heads=[],
            events=[{"name": "Test", "payload": i}],
            origin="local",
        )


async def test_resuming_past_the_queue_size_replays_everything_in_order(
    client: QuartClient, node: TestNode
) -> None:
    # More buffered events than a subscriber's queue holds (256): this closed the socket
    # with 1008 before the replay went through the queue as one item.
    context = await install_and_create(client, node)
    _publish(node, context, 600)
    async with client.websocket("/ws", headers=auth(node)) as ws:
        received = await _subscribe(ws, context, since=0)
    deltas, answer = received[:-1], received[-1]
    assert answer["type"] == "subscribed"
    seqs = [d["seq"] for d in deltas]
    assert seqs == sorted(seqs)
    assert len(seqs) == len(set(seqs))
    assert seqs[-1] == answer["seq"] == node.node.hub.seq
    assert len(deltas) >= 600


@pytest.mark.parametrize("since", ["too old", "ahead"])
async def test_a_resume_that_cannot_be_served_says_resync(tmp_path: Path, since: str) -> None:
    async with open_test_node(tmp_path / "small", api=False) as small:
        small.node.hub._replay = 10  # a small in-memory window per context, for the test
        client = create_app(small.node).test_client()
        context = await install_and_create(client, small)
        _publish(small, context, 30)
        position = 1 if since == "too old" else small.node.hub.seq + 5
        async with client.websocket("/ws", headers=auth(small)) as ws:
            [answer] = await _subscribe(ws, context, since=position)
            assert answer["type"] == "resync"
            assert answer["seq"] == small.node.hub.seq
            assert "fetch the state again" in answer["reason"]
            # Subscribed anyway: live events follow.
            _publish(small, context, 1)
            live = json.loads(await ws.receive())
            assert (live["type"], live["seq"]) == ("delta", answer["seq"] + 1)


async def test_a_client_that_falls_behind_is_told_to_resync_then_resumes(
    client: QuartClient, node: TestNode
) -> None:
    """More events at once than a subscriber's queue holds (256): the client gets what was
    queued, then an explicit `resync` message, then close 1008; resuming with the last
    `seq` it got replays the rest from the log, so nothing is missed."""
    context = await install_and_create(client, node)
    async with client.websocket("/ws", headers=auth(node)) as ws:
        [answer] = await _subscribe(ws, context, since=None)
        assert answer["type"] == "subscribed"
        _publish(node, context, 600)  # synchronously: the writer cannot keep up
        received: list[dict[str, Any]] = []
        code = None
        while code is None:
            try:
                received.append(json.loads(await ws.receive()))
            except WebsocketDisconnectError as exc:
                code = exc.args[0]
    assert code == 1008
    deltas, last = received[:-1], received[-1]
    assert all(d["type"] == "delta" for d in deltas)
    assert 0 < len(deltas) < 600
    assert last["type"] == "resync"
    assert last["contextIds"] == [context]
    assert last["seq"] == node.node.hub.seq
    assert "too slow" in last["reason"]
    async with client.websocket("/ws", headers=auth(node)) as ws:
        replayed = await _subscribe(ws, context, since=deltas[-1]["seq"])
    assert replayed[-1]["type"] == "subscribed"
    seqs = [d["seq"] for d in deltas + replayed[:-1]]
    assert seqs == list(range(seqs[0], seqs[0] + 600))
