"""Execution is atomic, and every kind of failure has its own JSON-RPC code."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import base58
import pytest
from quart.typing import TestClientProtocol as QuartClient

from trionode.api.app import create_app
from trionode.store.lmdb_store import Column
from trionode.testing import TestNode, open_test_node

FAULTY = Path(__file__).resolve().parent / "faulty_app"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(tmp_path / "home", api=False) as test_node:
        yield test_node


async def _setup(node: TestNode) -> bytes:
    app = await node.node.applications.install(str(FAULTY))
    record = await node.node.contexts.create(app.application_id)
    await node.node.contexts.execute(
        record.context_id, "set", json.dumps({"key": "a", "value": "1"})
    )
    return record.context_id


def _snapshot(node: TestNode) -> dict[str, list[tuple[bytes, bytes]]]:
    raw = node.node.store.raw
    return {c.value: raw.scan(c) for c in (Column.STATE, Column.DELTA, Column.CONFIG)}


async def _rpc(client: QuartClient, node: TestNode, context: bytes, method: str, args: Any) -> Any:
    response = await client.post(
        "/jsonrpc",
        json={
            "jsonrpc": "2.0",
            "id": 7,
            "method": "execute",
            "params": {
                "contextId": base58.b58encode(context).decode(),
                "method": method,
                "argsJson": args,
            },
        },
        headers={"Authorization": f"Bearer {node.token}"},
    )
    assert response.status_code == 200
    body = await response.get_json()
    assert body["id"] == 7
    return body


@pytest.mark.parametrize(
    ("method", "args", "code", "message"),
    [
        ("set_then_fail", {"key": "b", "value": "2"}, 409, "refusing after writing 'b'"),
        ("set_then_crash", {"key": "b"}, -32012, "ZeroDivisionError"),
        ("sneaky", {"key": "b"}, -32010, "view"),
        ("set", {"key": "b"}, -32602, "value"),
        ("set", {"key": "b", "value": 3}, -32602, "value"),
        ("nope", {}, -32601, "nope"),
    ],
)
async def test_failed_calls_leave_state_dag_and_store_untouched(
    node: TestNode, method: str, args: Any, code: int, message: str
) -> None:
    context = await _setup(node)
    client = create_app(node.node).test_client()
    before_store = _snapshot(node)
    before = await node.node.contexts.get(context)
    body = await _rpc(client, node, context, method, args)
    assert body["error"]["code"] == code
    assert message in body["error"]["message"]
    assert _snapshot(node) == before_store
    after = await node.node.contexts.get(context)
    assert (after.heads, after.root_hash) == (before.heads, before.root_hash)
    # The in-memory state was not touched either: the key the failed call wrote is absent,
    # and the next good call builds on the same head.
    assert (await _rpc(client, node, context, "get", {"key": "b"}))["result"]["output"] is None
    good = await _rpc(client, node, context, "set", {"key": "c", "value": "3"})
    assert good["result"]["deltaId"] is not None
    assert len((await node.node.contexts.get(context)).heads) == 1


async def test_unknown_context_and_bad_ids(node: TestNode) -> None:
    client = create_app(node.node).test_client()
    body = await _rpc(client, node, os.urandom(32), "get", {"key": "a"})
    assert body["error"]["code"] == -32001
    assert "no context" in body["error"]["message"]
    response = await client.post(
        "/jsonrpc",
        json={"jsonrpc": "2.0", "id": 1, "method": "execute", "params": {"contextId": "0OIl"}},
        headers={"Authorization": f"Bearer {node.token}"},
    )
    body = await response.get_json()
    assert body["error"]["code"] == -32602
    assert "base58" in body["error"]["message"]
    response = await client.post(
        "/jsonrpc", data="{not json", headers={"Authorization": f"Bearer {node.token}"}
    )
    assert (await response.get_json())["error"]["code"] == -32700
    response = await client.post(
        "/jsonrpc",
        json={"jsonrpc": "2.0", "id": 1, "method": "fly"},
        headers={"Authorization": f"Bearer {node.token}"},
    )
    assert (await response.get_json())["error"]["code"] == -32601
