"""Scoped tokens and one-time tickets: what a browser app's credentials can and cannot reach."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from quart.testing.connections import WebsocketResponseError
from quart.typing import TestClientProtocol as QuartClient

from trionode.api.app import create_app
from trionode.api.tokens import ADMIN, TicketBook, TokenError, TokenStore
from trionode.cli import main
from trionode.node import open_node
from trionode.testing import TestNode, make_test_config, open_test_node

ROOT = Path(__file__).resolve().parents[2]
KV_STORE = ROOT / "apps" / "kv_store"
UNKNOWN = "6pnwRnpbGZ8yCDd4X3yVr3ZpwJbL2XExXC1aJ8uvfGLs"
"""A well-formed context id no node here knows."""


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(tmp_path / "home", api=False) as test_node:
        yield test_node


@pytest.fixture
def client(node: TestNode) -> QuartClient:
    return create_app(node.node).test_client()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(client: QuartClient, token: str, path: str, body: Any) -> tuple[int, Any]:
    response = await client.post(path, json=body, headers=bearer(token))
    return response.status_code, await response.get_json()


async def two_contexts(client: QuartClient, node: TestNode) -> tuple[str, str]:
    _, app = await post(client, node.token, "/admin-api/applications", {"path": str(KV_STORE)})
    ids = []
    for _ in range(2):
        _, context = await post(
            client, node.token, "/admin-api/contexts", {"applicationId": app["applicationId"]}
        )
        ids.append(context["contextId"])
    return ids[0], ids[1]


async def make_token(
    client: QuartClient, node: TestNode, contexts: list[str], scope: str, **extra: Any
) -> str:
    status, body = await post(
        client, node.token, "/admin-api/tokens", {"contexts": contexts, "scope": scope, **extra}
    )
    assert status == 200, body
    assert body["token"].startswith("trn_")
    return str(body["token"])


def rpc(context: str, method: str, args: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "execute",
        "params": {"contextId": context, "method": method, "argsJson": args},
    }


async def test_a_call_token_calls_methods_of_its_contexts_only(
    client: QuartClient, node: TestNode
) -> None:
    mine, other = await two_contexts(client, node)
    token = await make_token(client, node, [mine], "call")
    _, body = await post(client, token, "/jsonrpc", rpc(mine, "set", {"key": "k", "value": "v"}))
    assert body["result"]["deltaId"] is not None
    _, body = await post(client, token, "/jsonrpc", rpc(mine, "get", {"key": "k"}))
    assert body["result"]["output"] == "v"
    _, body = await post(client, token, "/jsonrpc", rpc(other, "get", {"key": "k"}))
    assert body["error"]["code"] == -32002
    assert "may not" in body["error"]["message"]


async def test_a_read_token_calls_views_but_not_methods(
    client: QuartClient, node: TestNode
) -> None:
    mine, _ = await two_contexts(client, node)
    token = await make_token(client, node, [mine], "read")
    _, body = await post(client, token, "/jsonrpc", rpc(mine, "get", {"key": "k"}))
    assert body["result"]["output"] is None
    _, body = await post(client, token, "/jsonrpc", rpc(mine, "set", {"key": "k", "value": "v"}))
    assert body["error"]["code"] == -32002
    assert "call methods" in body["error"]["message"]
    # Nothing was written.
    _, body = await post(client, node.token, "/jsonrpc", rpc(mine, "get", {"key": "k"}))
    assert body["result"]["output"] is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin-api/contexts"),
        ("GET", "/admin-api/node"),
        ("GET", "/admin-api/tokens"),
        ("POST", "/admin-api/tokens"),
        ("POST", "/admin-api/applications"),
        ("GET", "/metrics"),
        ("DELETE", "/admin-api/contexts/{ctx}"),
    ],
)
async def test_a_scoped_token_reaches_no_admin_route(
    client: QuartClient, node: TestNode, method: str, path: str
) -> None:
    mine, _ = await two_contexts(client, node)
    token = await make_token(client, node, [mine], "call")
    response = await client.open(
        path.replace("{ctx}", mine), method=method, json={}, headers=bearer(token)
    )
    assert response.status_code == 403
    assert "only allows JSON-RPC and events" in (await response.get_json())["error"]["message"]
    assert node.node.knows_context(mine)


async def test_revoked_and_expired_tokens_stop_working(client: QuartClient, node: TestNode) -> None:
    mine, _ = await two_contexts(client, node)
    token = await make_token(client, node, [mine], "read")
    response = await client.get("/admin-api/tokens", headers=bearer(node.token))
    listed = (await response.get_json())["tokens"]
    assert [t["contexts"] for t in listed] == [[mine]]
    assert token not in json.dumps(listed)  # the token itself is never shown again
    response = await client.delete(
        f"/admin-api/tokens/{listed[0]['id']}", headers=bearer(node.token)
    )
    assert response.status_code == 200
    status, _ = await post(client, token, "/jsonrpc", rpc(mine, "get", {"key": "k"}))
    assert status == 401
    response = await client.delete(
        f"/admin-api/tokens/{listed[0]['id']}", headers=bearer(node.token)
    )
    assert response.status_code == 404


async def test_tokens_expire_by_the_wall_clock(node: TestNode) -> None:
    now = [1000.0]
    tokens = TokenStore(node.node.store, wall_clock=lambda: now[0])
    token, record = await tokens.create(["ctx"], "read", 60.0)
    assert tokens.principal(token) is not None
    now[0] += 59.0
    assert tokens.principal(token) is not None
    now[0] += 1.0
    assert tokens.principal(token) is None
    assert record.to_json(now[0])["expired"] is True
    assert tokens.principal("trn_" + "x" * 43) is None
    assert tokens.principal(node.token) is None


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"contexts": [], "scope": "read"}, 400, "between 1 and 64"),
        ({"contexts": "{ctx}", "scope": "read"}, 400, "body.contexts: Expected `array`"),
        ({"contexts": ["{ctx}"], "scope": "admin"}, 400, "body.scope: Invalid enum value"),
        (
            {"contexts": ["nope"], "scope": "read"},
            400,
            "body.contexts[0]: Expected `str` that is a base58",
        ),
        ({"contexts": [UNKNOWN], "scope": "read"}, 404, "unknown context ids"),
        ({"contexts": ["{ctx}"], "scope": "read", "expiresIn": -1}, 400, "body.expiresIn"),
        ({"contexts": ["{ctx}"], "scope": "read", "expiresIn": True}, 400, "body.expiresIn"),
        ({"contexts": ["{ctx}"], "scope": "read", "extra": 1}, 400, "unknown field `extra`"),
        ({"contexts": ["{ctx}"], "scope": "read", "expiresIn": 1e12}, 400, "ten years"),
        ([], 400, "body:"),
    ],
)
async def test_bad_token_requests_get_clear_errors(
    client: QuartClient, node: TestNode, body: Any, status: int, message: str
) -> None:
    mine, _ = await two_contexts(client, node)
    text = json.dumps(body).replace("{ctx}", mine)
    response = await client.post(
        "/admin-api/tokens",
        data=text,
        headers={**bearer(node.token), "Content-Type": "application/json"},
    )
    assert response.status_code == status
    assert message in (await response.get_json())["error"]["message"]


async def test_tokens_survive_a_restart(tmp_path: Path) -> None:
    config, admin = make_test_config(tmp_path / "home", api=False)
    async with open_node(config) as node:
        client = create_app(node).test_client()
        _, app = await post(client, admin, "/admin-api/applications", {"path": str(KV_STORE)})
        _, context = await post(
            client, admin, "/admin-api/contexts", {"applicationId": app["applicationId"]}
        )
        _, made = await post(
            client,
            admin,
            "/admin-api/tokens",
            {"contexts": [context["contextId"]], "scope": "read"},
        )
    async with open_node(config) as node:
        client = create_app(node).test_client()
        _, body = await post(
            client, made["token"], "/jsonrpc", rpc(context["contextId"], "get", {"key": "k"})
        )
        assert body["result"]["output"] is None


# -- tickets -------------------------------------------------------------------------------


async def websocket_status(client: QuartClient, path: str) -> int | None:
    """The HTTP status that refused the WebSocket handshake (None: it was accepted)."""
    statuses: list[int] = []
    try:
        async with client.websocket(path) as ws:
            await ws.receive()
    except* WebsocketResponseError as group:
        statuses = [e.response.status_code for e in group.exceptions]  # type: ignore[union-attr]
    return statuses[0] if statuses else None


async def test_a_ticket_opens_one_websocket_with_the_tokens_rights(
    client: QuartClient, node: TestNode
) -> None:
    mine, other = await two_contexts(client, node)
    token = await make_token(client, node, [mine], "read")
    _, issued = await post(client, token, "/admin-api/tickets", {})
    ticket = issued["ticket"]
    assert issued["expiresIn"] == 30.0
    async with client.websocket(f"/ws?ticket={ticket}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "contextIds": [other]}))
        assert "unknown context ids" in json.loads(await ws.receive())["message"]
        await ws.send(json.dumps({"type": "subscribe", "contextIds": [mine]}))
        assert json.loads(await ws.receive())["type"] == "subscribed"
        await post(client, node.token, "/jsonrpc", rpc(mine, "set", {"key": "a", "value": "b"}))
        event = json.loads(await ws.receive())
        assert event["type"] == "delta"
        assert event["contextId"] == mine
    # Used once: the same ticket opens nothing more.
    assert await websocket_status(client, f"/ws?ticket={ticket}") == 401


async def test_the_long_lived_token_no_longer_works_in_the_ws_url(
    client: QuartClient, node: TestNode
) -> None:
    assert await websocket_status(client, f"/ws?token={node.token}") == 401


async def test_a_ticket_is_no_credential_outside_ws_and_events(
    client: QuartClient, node: TestNode
) -> None:
    _, issued = await post(client, node.token, "/admin-api/tickets", {})
    response = await client.get(f"/admin-api/contexts?ticket={issued['ticket']}")
    assert response.status_code == 401


async def test_tickets_expire_and_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    book = TicketBook(ttl=30.0, capacity=2)
    first = book.issue(ADMIN)
    await trio.sleep(29.9)
    assert book.redeem(first) is ADMIN
    late = book.issue(ADMIN)
    book.issue(ADMIN)
    with pytest.raises(TokenError) as full:
        book.issue(ADMIN)
    assert full.value.status == 429
    await trio.sleep(30.0)
    assert book.redeem(late) is None
    book.issue(ADMIN)  # expired ones made room


# -- the CLI -------------------------------------------------------------------------------


@pytest.mark.real_network
async def test_token_commands_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_test_node(tmp_path / "home") as live:
        async with live.client() as admin:
            app = await admin.install_application(str(KV_STORE))
            context = (await admin.create_context(app.application_id)).context_id
        target = ["--api", live.api_url, f"--token={live.token}"]

        def run(*argv: str) -> tuple[int, str, str]:
            code = main([*argv, *target])
            out, err = capsys.readouterr()
            return code, out, err

        code, out, _ = await trio.to_thread.run_sync(
            run, "token", "create", "--context", context, "--scope", "call", "--expires", "30d"
        )
        assert code == 0
        token = out.split()[0]
        assert token.startswith("trn_")
        assert "only time the token is shown" in out
        code, out, _ = await trio.to_thread.run_sync(run, "token", "ls")
        assert code == 0
        assert context in out
        assert "call" in out
        token_id = out.splitlines()[1].split()[0]
        code, out, _ = await trio.to_thread.run_sync(run, "token", "revoke", token_id)
        assert code == 0
        code, _, err = await trio.to_thread.run_sync(run, "token", "revoke", token_id)
        assert code != 0
        assert err.count("\n") == 1
        assert "no token with id" in err
