"""Contexts end to end through the API app (no sockets): install, create, call, watch, GC."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import base58
import pytest
from quart.testing.connections import WebsocketResponseError
from quart.typing import TestClientProtocol as QuartClient

from trionode.api.app import create_app
from trionode.node import open_node
from trionode.store.lmdb_store import Column
from trionode.testing import TestNode, make_test_config, open_test_node

ROOT = Path(__file__).resolve().parents[2]
KV_STORE = ROOT / "apps" / "kv_store"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(tmp_path / "home", api=False) as test_node:
        yield test_node


@pytest.fixture
def client(node: TestNode) -> QuartClient:
    return create_app(node.node).test_client()


def auth(node: TestNode) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.token}"}


async def post(client: QuartClient, node: TestNode, path: str, body: Any) -> Any:
    response = await client.post(path, json=body, headers=auth(node))
    return response.status_code, await response.get_json()


async def call(
    client: QuartClient, node: TestNode, context: str, method: str, args: Any = None
) -> Any:
    _, body = await post(
        client,
        node,
        "/jsonrpc",
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "execute",
            "params": {"contextId": context, "method": method, "argsJson": args or {}},
        },
    )
    return body


async def install_and_create(client: QuartClient, node: TestNode) -> str:
    status, app = await post(client, node, "/admin-api/applications", {"path": str(KV_STORE)})
    assert status == 200, app
    assert app["name"] == "kv_store"
    status, context = await post(
        client, node, "/admin-api/contexts", {"applicationId": app["applicationId"]}
    )
    assert status == 200, context
    assert context["members"][0]["role"] == "admin"
    return str(context["contextId"])


async def test_calls_become_deltas_and_views_do_not(client: QuartClient, node: TestNode) -> None:
    context = await install_and_create(client, node)
    before = await (
        await client.get(f"/admin-api/contexts/{context}", headers=auth(node))
    ).get_json()
    result = await call(client, node, context, "set", {"key": "a", "value": "1"})
    assert result["result"]["deltaId"] is not None
    assert result["result"]["rootHash"] != before["rootHash"]
    view = await call(client, node, context, "get", {"key": "a"})
    assert view["result"] == {
        "output": "1",
        "deltaId": None,
        "rootHash": result["result"]["rootHash"],
    }
    shown = await (
        await client.get(f"/admin-api/contexts/{context}", headers=auth(node))
    ).get_json()
    assert shown["heads"] == [result["result"]["deltaId"]]
    assert shown["rootHash"] == result["result"]["rootHash"]


async def test_errors_map_to_jsonrpc(client: QuartClient, node: TestNode) -> None:
    context = await install_and_create(client, node)
    missing = await call(client, node, context, "get_required", {"key": "zzz"})
    assert missing["error"]["code"] == 404
    bad = await call(client, node, context, "set", {"key": "a"})
    assert bad["error"]["code"] == -32602
    assert "value" in bad["error"]["message"]
    unknown = await call(client, node, context, "nope")
    assert unknown["error"]["code"] == -32601
    # Failed calls wrote nothing.
    shown = await (
        await client.get(f"/admin-api/contexts/{context}", headers=auth(node))
    ).get_json()
    assert len(shown["heads"]) <= 1


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    config, token = make_test_config(tmp_path / "home", api=False)
    async with open_node(config) as node:
        client = create_app(node).test_client()
        headers = {"Authorization": f"Bearer {token}"}
        response = await client.post(
            "/admin-api/applications", json={"path": str(KV_STORE)}, headers=headers
        )
        app_id = (await response.get_json())["applicationId"]
        response = await client.post(
            "/admin-api/contexts", json={"applicationId": app_id}, headers=headers
        )
        context = (await response.get_json())["contextId"]
        raw = base58.b58decode(context)
        for i in range(5):
            await node.contexts.execute(raw, "set", json.dumps({"key": f"k{i}", "value": str(i)}))
        root = (await node.contexts.get(raw)).root_hash
    async with open_node(config) as node:
        result = await node.contexts.execute(raw, "get", json.dumps({"key": "k3"}))
        assert result.result == "3"
        assert (await node.contexts.get(raw)).root_hash == root
        assert node.store.raw.count(Column.DELTA) == 6  # init + 5 calls


async def test_websocket_gets_one_event_per_delta_and_can_resume(
    client: QuartClient, node: TestNode
) -> None:
    context = await install_and_create(client, node)
    async with client.websocket("/ws", headers=auth(node)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "contextIds": [context]}))
        assert json.loads(await ws.receive())["type"] == "subscribed"
        await call(client, node, context, "set", {"key": "a", "value": "1"})
        await call(client, node, context, "set", {"key": "a", "value": "2"})
        first = json.loads(await ws.receive())
        second = json.loads(await ws.receive())
    assert first["type"] == second["type"] == "delta"
    assert first["events"] == [{"name": "Inserted", "payload": {"key": "a", "value": "1"}}]
    assert second["events"][0]["name"] == "Updated"
    assert second["seq"] == first["seq"] + 1
    # Reconnect and resume after the first event: only the second is replayed.
    async with client.websocket("/ws", headers=auth(node)) as ws:
        await ws.send(
            json.dumps({"type": "subscribe", "contextIds": [context], "since": first["seq"]})
        )
        replayed = json.loads(await ws.receive())
        assert replayed["seq"] == second["seq"]


async def test_websocket_needs_the_token(client: QuartClient) -> None:
    async def connect_without_token() -> None:
        async with client.websocket("/ws") as ws:
            await ws.send("{}")
            await ws.receive()

    statuses: list[int] = []
    try:
        await connect_without_token()
    except* WebsocketResponseError as group:
        statuses = [e.response.status_code for e in group.exceptions]  # type: ignore[union-attr]
    assert statuses == [401]


async def test_gc_runs_on_demand(client: QuartClient, node: TestNode) -> None:
    context = await install_and_create(client, node)
    await call(client, node, context, "set", {"key": "a", "value": "1"})
    await call(client, node, context, "remove", {"key": "a"})
    status, result = await post(client, node, "/admin-api/gc", {})
    assert status == 200
    assert result["tombstonesRemoved"] == 0  # younger than the retention: kept
    root = (await node.node.contexts.get(base58.b58decode(context))).root_hash
    # With the horizon in the future, the tombstone goes and the root hash does not change.
    removed = await node.node.contexts.collect_garbage(time.time() + 60)
    assert removed["tombstonesRemoved"] >= 1
    assert (await node.node.contexts.get(base58.b58decode(context))).root_hash == root
    view = await call(client, node, context, "get", {"key": "a"})
    assert view["result"]["output"] is None
