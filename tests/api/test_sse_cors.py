"""Server-Sent Events and CORS against a live node (Hypercorn on loopback, real HTTP)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from msgspec.structs import replace

from trionode.api.sse import EventRequestError, check_resumable, format_event, parse_since
from trionode.config import FileConfig
from trionode.context.events import EventHub, Notice
from trionode.testing import TestNode, open_test_node

pytestmark = pytest.mark.real_network

ROOT = Path(__file__).resolve().parents[2]
KV_STORE = ROOT / "apps" / "kv_store"
APP_ORIGIN = "http://app.example:8080"


def allow_app_origin(file: FileConfig) -> FileConfig:
    return replace(file, api=replace(file.api, cors_origins=[APP_ORIGIN], sse_keepalive=0.5))


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(tmp_path / "home", configure=allow_app_origin) as node:
        yield node


@pytest.fixture
async def http(live: TestNode) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {live.token}"}
    async with httpx.AsyncClient(base_url=live.api_url, headers=headers, timeout=10) as client:
        yield client


async def make_context(live: TestNode) -> str:
    async with live.client() as client:
        app = await client.install_application(str(KV_STORE))
        context = await client.create_context(app.application_id)
    return str(context.context_id)


async def write(live: TestNode, context: str, key: str) -> str:
    async with live.client() as client:
        result = await client.call(context, "set", {"key": key, "value": key.upper()})
    return str(result.delta_id)


class EventReader:
    """A minimal EventSource over one raw HTTP/1.1 connection (h11), as a browser reads it.

    (httpx's streaming iterators are nested async generators that it never closes early,
    which pytest rightly reports; reading the socket directly leaves nothing open.)
    """

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        self._stream = stream
        self._conn = conn
        self._buffer = b""

    async def next_event(self) -> type[h11.PAUSED | h11.NEED_DATA] | h11.Event:
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self._conn.receive_data(await self._stream.receive_some(65536))

    async def next_line(self) -> str:
        while b"\n" not in self._buffer:
            event = await self.next_event()
            assert isinstance(event, h11.Data), f"the stream ended: {event}"
            self._buffer += bytes(event.data)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def next_block(self) -> dict[str, str]:
        block: dict[str, str] = {}
        while True:
            line = await self.next_line()
            if line == "":
                if block:
                    return block
                continue
            name, _, value = line.partition(":")
            block["comment" if name == "" else name] = value.removeprefix(" ")

    async def next_delta(self) -> tuple[int, dict[str, Any]]:
        while True:
            block = await self.next_block()
            if block.get("event") == "delta":
                data = json.loads(block["data"])
                assert int(block["id"]) == data["seq"]
                return data["seq"], data


@asynccontextmanager
async def follow(
    live: TestNode,
    params: dict[str, str],
    headers: dict[str, str] | None = None,
    *,
    authorization: bool = True,
) -> AsyncIterator[EventReader]:
    url = httpx.URL(live.api_url).join("/events").copy_merge_params(params)
    assert url.host == "127.0.0.1"
    conn = h11.Connection(h11.CLIENT)
    request_headers = {
        "Host": f"{url.host}:{url.port}",
        "Accept": "text/event-stream",
        **(headers or {}),
    }
    if authorization:
        request_headers["Authorization"] = f"Bearer {live.token}"
    async with await trio.open_tcp_stream(url.host, url.port or 80) as stream:
        target = url.raw_path
        await stream.send_all(
            conn.send(
                h11.Request(method="GET", target=target, headers=list(request_headers.items()))
            )
            + conn.send(h11.EndOfMessage())
        )
        reader = EventReader(stream, conn)
        response = await reader.next_event()
        assert isinstance(response, h11.Response)
        assert response.status_code == 200
        assert dict(response.headers)[b"content-type"].startswith(b"text/event-stream")
        yield reader


async def test_events_stream_deltas_and_resume_from_last_event_id(
    live: TestNode, http: httpx.AsyncClient
) -> None:
    context = await make_context(live)
    with trio.fail_after(20):
        async with follow(live, {"context": context}) as reader:
            first = await reader.next_block()
            assert first["retry"] == "2000"
            delta_id = await write(live, context, "a")
            seq, event = await reader.next_delta()
            assert event["deltaId"] == delta_id
            assert event["contextId"] == context
            assert event["origin"] == "local"
            assert event["events"][0]["payload"]["key"] == "a"
        # Gone: two writes happen while nobody listens.
        missed = [await write(live, context, "b"), await write(live, context, "c")]
        headers = {"Last-Event-ID": str(seq)}
        async with follow(live, {"context": context}, headers) as reader:
            replayed = [await reader.next_delta(), await reader.next_delta()]
            assert [e["deltaId"] for _, e in replayed] == missed
            assert [s for s, _ in replayed] == [seq + 1, seq + 2]
        # ?since= means the same thing (for clients that can't set headers on the first try).
        params = {"context": context, "since": str(seq + 1)}
        async with follow(live, params) as reader:
            _, event = await reader.next_delta()
            assert event["deltaId"] == missed[1]


async def test_an_event_source_uses_a_one_time_ticket_with_its_tokens_rights(
    live: TestNode, http: httpx.AsyncClient
) -> None:
    mine, other = await make_context(live), await make_context(live)
    made = await http.post("/admin-api/tokens", json={"contexts": [mine], "scope": "read"})
    scoped = {"Authorization": f"Bearer {made.json()['token']}"}

    async def ticket() -> str:
        response = await http.post("/admin-api/tickets", headers={**scoped, "Origin": APP_ORIGIN})
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN
        return str(response.json()["ticket"])

    with trio.fail_after(20):
        first = await ticket()
        async with follow(live, {"context": mine, "ticket": first}, authorization=False) as reader:
            delta_id = await write(live, mine, "t")
            _, event = await reader.next_delta()
            assert event["deltaId"] == delta_id
    async with httpx.AsyncClient(base_url=live.api_url) as browser:
        used = await browser.get("/events", params={"context": mine, "ticket": first})
        assert used.status_code == 401
        elsewhere = await browser.get(
            "/events", params={"context": other, "ticket": await ticket()}
        )
        assert elsewhere.status_code == 404


async def test_a_quiet_stream_gets_keepalive_comments(
    live: TestNode, http: httpx.AsyncClient
) -> None:
    context = await make_context(live)
    with trio.fail_after(20):
        async with follow(live, {"context": context}) as reader:
            await reader.next_block()  # retry + "following"
            assert await reader.next_block() == {"comment": "keepalive"}


@pytest.mark.parametrize(
    ("params", "headers", "status", "message"),
    [
        ({}, {}, 400, "name at least one context"),
        ({"context": "nope"}, {}, 404, "unknown context ids: nope"),
        ({"context": "{ctx}"}, {"Last-Event-ID": "-1"}, 400, "non-negative integer"),
        ({"context": "{ctx}", "since": "1e9"}, {}, 400, "non-negative integer"),
        ({"context": "{ctx}", "since": "9" * 30}, {}, 400, "non-negative integer"),
        ({"context": ",".join(["{ctx}"] * 65)}, {}, 400, "at most 64 contexts"),
    ],
)
async def test_bad_event_requests_get_clear_errors(
    live: TestNode,
    http: httpx.AsyncClient,
    *,
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    context = await make_context(live)
    params = {k: v.replace("{ctx}", context) for k, v in params.items()}
    response = await http.get("/events", params=params, headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


async def test_events_need_authentication(live: TestNode) -> None:
    context = await make_context(live)
    async with httpx.AsyncClient(base_url=live.api_url) as anonymous:
        response = await anonymous.get("/events", params={"context": context})
    assert response.status_code == 401


def test_a_resume_point_no_longer_buffered_asks_for_a_resync() -> None:
    hub = EventHub(replay=3)
    for n in range(10):
        hub.publish(
            context_id="c", delta_id=str(n), root_hash="", heads=[], events=[], origin="local"
        )
    check_resumable(hub, ["c"], 7)  # seqs 8, 9 and 10 are still buffered
    with pytest.raises(EventRequestError) as caught:
        check_resumable(hub, ["c"], 6)
    assert caught.value.status == 410
    assert caught.value.resync
    # The probe left nothing behind.
    assert not hub._subscriptions


def test_notices_carry_no_id_so_resume_stays_on_deltas() -> None:
    hub = EventHub()
    delta = hub.publish(
        context_id="c", delta_id="d", root_hash="", heads=[], events=[], origin="local"
    )
    assert format_event(delta).startswith(f"id: {delta.seq}\nevent: delta\n".encode())
    notice = format_event(Notice("c", {"type": "blob", "done": 3}))
    assert notice == b'event: notice\ndata: {"type":"blob","done":3}\n\n'


def test_last_event_id_wins_over_since() -> None:
    assert parse_since("3", "7") == 7
    assert parse_since("3", None) == 3
    assert parse_since("3", "") == 3
    assert parse_since(None, None) is None


# -- CORS --------------------------------------------------------------------------------------


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


async def test_preflight_for_a_listed_origin_on_jsonrpc_and_events(
    http: httpx.AsyncClient,
) -> None:
    for path, method in (("/jsonrpc", "POST"), ("/events", "GET")):
        response = await http.options(
            path,
            headers={
                "Origin": APP_ORIGIN,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert response.status_code == 200, path
        headers = cors_headers(response)
        assert headers["access-control-allow-origin"] == APP_ORIGIN
        assert method in headers["access-control-allow-methods"]
        assert "Authorization" in headers["access-control-allow-headers"]
        assert "access-control-allow-credentials" not in headers
        assert "Origin" in response.headers["vary"]


async def test_listed_origin_reads_jsonrpc_answers_and_errors(
    live: TestNode, http: httpx.AsyncClient
) -> None:
    context = await make_context(live)
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "execute",
        "params": {"contextId": context, "method": "get", "argsJson": {"key": "x"}},
    }
    response = await http.post("/jsonrpc", json=body, headers={"Origin": APP_ORIGIN})
    assert response.json()["result"]["output"] is None
    assert cors_headers(response) == {"access-control-allow-origin": APP_ORIGIN}
    # A refused token is still readable by the app, so it can tell its user why.
    async with httpx.AsyncClient(base_url=live.api_url) as anonymous:
        response = await anonymous.post("/jsonrpc", json=body, headers={"Origin": APP_ORIGIN})
    assert response.status_code == 401
    assert cors_headers(response) == {"access-control-allow-origin": APP_ORIGIN}


@pytest.mark.parametrize(
    ("path", "origin"),
    [
        ("/jsonrpc", "http://evil.example"),
        ("/jsonrpc", APP_ORIGIN + "/"),  # not an origin: origins have no path
        ("/jsonrpc", "null"),
        ("/events", "http://app.example"),  # same host, other port: another origin
        ("/admin-api/contexts", APP_ORIGIN),  # listed origin, but not a browser-app route
        ("/admin-api/node", APP_ORIGIN),
        ("/metrics", APP_ORIGIN),
    ],
)
async def test_no_cors_for_other_origins_or_other_routes(
    http: httpx.AsyncClient, path: str, origin: str
) -> None:
    preflight = await http.options(
        path, headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
    )
    assert cors_headers(preflight) == {}
    actual = await http.get(path, headers={"Origin": origin})
    assert cors_headers(actual) == {}


async def test_no_origin_is_listed_by_default(tmp_path: Path) -> None:
    async with (
        open_test_node(tmp_path / "home") as node,
        httpx.AsyncClient(base_url=node.api_url) as client,
    ):
        response = await client.options(
            "/jsonrpc", headers={"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"}
        )
    assert cors_headers(response) == {}
