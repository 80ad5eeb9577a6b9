"""Hostile JSON against every route that reads one: 400 / JSON-RPC errors, never a 500.

Each attack here gave a 500 and a traceback in the log (deep nesting), or was accepted
(`expiresIn` NaN/Infinity/true, JSON-RPC `"id": NaN` echoed back) before strict decoding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from quart.typing import TestClientProtocol as QuartClient

from tests.context.test_contexts import auth, install_and_create
from trionode.api.app import create_app
from trionode.api.jsonio import decode_json
from trionode.testing import TestNode, open_test_node

DEEP = "[" * 50_000 + "]" * 50_000
CONTEXT = "11111111111111111111111111111111"

# Every route that reads a JSON body (ids in paths are placeholders: the body is read first).
JSON_ROUTES = [
    "/admin-api/peers",
    "/admin-api/applications",
    "/admin-api/contexts",
    f"/admin-api/contexts/{CONTEXT}/invitations",
    "/admin-api/contexts/join",
]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(tmp_path / "home", api=False) as test_node:
        yield test_node


@pytest.fixture
def client(node: TestNode) -> QuartClient:
    return create_app(node.node).test_client()


async def post_raw(client: QuartClient, node: TestNode, path: str, text: str) -> Any:
    headers = {**auth(node), "Content-Type": "application/json"}
    response = await client.post(path, data=text, headers=headers)
    # Whatever we answer must itself be strict JSON (no NaN echoed back).
    body = decode_json(await response.get_data(), max_depth=64, max_size=1 << 20)
    return response.status_code, body


def assert_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    records = [r for r in caplog.records if r.name.startswith("trionode")]
    assert records, "the refusal is logged"
    for record in records:
        assert record.levelno < logging.ERROR
        assert record.exc_info is None
        assert "\n" not in record.getMessage()


@pytest.mark.parametrize("path", JSON_ROUTES)
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (DEEP, "nested 50000 deep; the limit is 64"),
        ('{"a": NaN}', "NaN is not JSON"),
        ('{"a": 1e999}', "out of range"),
        ("[1, 2", "not JSON"),
    ],
)
async def test_every_json_route_answers_400(
    client: QuartClient,
    node: TestNode,
    caplog: pytest.LogCaptureFixture,
    path: str,
    *,
    text: str,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO)
    status, body = await post_raw(client, node, path, text)
    assert status == 400
    assert reason in body["error"]["message"]
    assert_logged_in_one_line(caplog)


async def test_no_post_route_gives_500_for_deep_json(client: QuartClient, node: TestNode) -> None:
    app = client.app
    posts = [r.rule for r in app.url_map.iter_rules() if "POST" in (r.methods or ())]
    assert len(posts) >= len(JSON_ROUTES) + 1  # + /jsonrpc and routes without a body
    for rule in posts:
        path = rule.replace("<context_id>", CONTEXT).replace("<application_id>", CONTEXT)
        status, _ = await post_raw(client, node, path, DEEP)
        assert status < 500, rule


@pytest.mark.parametrize(
    "expires",
    ["NaN", "Infinity", "-Infinity", "1e999", "true", "false", "0", "-5", '"60"', "null"],
)
async def test_expires_in_must_be_a_finite_positive_number(
    client: QuartClient, node: TestNode, expires: str
) -> None:
    context = await install_and_create(client, node)
    path = f"/admin-api/contexts/{context}/invitations"
    status, body = await post_raw(client, node, path, f'{{"expiresIn": {expires}}}')
    assert status == 400, body
    message = body["error"]["message"]
    assert any(why in message for why in ("expiresIn", "not JSON", "out of range"))


async def test_expires_in_is_bounded_by_the_setting(client: QuartClient, node: TestNode) -> None:
    context = await install_and_create(client, node)
    path = f"/admin-api/contexts/{context}/invitations"
    most = node.node.config.api.max_invitation_lifetime
    status, body = await post_raw(client, node, path, json.dumps({"expiresIn": most + 1}))
    assert status == 400
    assert "at most" in body["error"]["message"]
    status, body = await post_raw(client, node, path, json.dumps({"expiresIn": most}))
    assert status == 200
    assert body["invitation"].startswith("trinv1")


def rpc(request_id: str, params: str = "{}") -> str:
    return f'{{"jsonrpc": "2.0", "id": {request_id}, "method": "execute", "params": {params}}}'


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (rpc("NaN"), -32700),
        (rpc("Infinity"), -32700),
        (rpc("1", "[" * 5000 + "]" * 5000), -32700),
        (rpc("true"), -32600),
        (rpc('{"a": 1}'), -32600),
        (rpc("[1]"), -32600),
        (rpc(json.dumps("x" * 257)), -32600),
    ],
)
async def test_jsonrpc_never_echoes_an_invalid_id(
    client: QuartClient, node: TestNode, text: str, code: int
) -> None:
    status, body = await post_raw(client, node, "/jsonrpc", text)
    assert status == 200
    assert body["id"] is None
    assert body["error"]["code"] == code


async def test_jsonrpc_keeps_valid_ids(client: QuartClient, node: TestNode) -> None:
    for request_id in ['"abc"', "7", "2.5", "null"]:
        _, body = await post_raw(client, node, "/jsonrpc", rpc(request_id))
        assert body["id"] == json.loads(request_id)
        assert body["error"]["code"] == -32602  # the params are wrong, the id was fine


async def test_args_json_string_is_held_to_the_same_rules(
    client: QuartClient, node: TestNode, caplog: pytest.LogCaptureFixture
) -> None:
    context = await install_and_create(client, node)
    for args in ["[" * 5000 + "]" * 5000, '{"key": NaN}']:
        params = {"contextId": context, "method": "set", "argsJson": args}
        status, body = await post_raw(client, node, "/jsonrpc", rpc("1", json.dumps(params)))
        assert status == 200
        assert body["error"]["code"] == -32602
    assert not [r for r in caplog.records if r.exc_info is not None]
