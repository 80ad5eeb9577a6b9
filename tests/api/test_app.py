from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from quart.typing import TestClientProtocol as QuartClient

from trionode.api.app import create_app
from trionode.testing import TestNode, open_test_node


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(tmp_path / "home", api=False) as test_node:
        yield test_node


@pytest.fixture
def client(node: TestNode) -> QuartClient:
    return create_app(node.node).test_client()


def auth(node: TestNode) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.token}"}


async def test_health_is_public(client: QuartClient) -> None:
    response = await client.get("/admin-api/health")
    assert response.status_code == 200
    assert await response.get_json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer nope"}, "invalid bearer token"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "missing bearer token"),
    ],
)
@pytest.mark.parametrize("path", ["/admin-api/ready", "/metrics", "/admin-api/node", "/nope"])
async def test_everything_else_needs_the_token(
    client: QuartClient, path: str, headers: dict[str, str], message: str
) -> None:
    response = await client.get(path, headers=headers)
    assert response.status_code == 401
    assert await response.get_json() == {"error": {"code": 401, "message": message}}


async def test_ready_and_node_info(client: QuartClient, node: TestNode) -> None:
    response = await client.get("/admin-api/ready", headers=auth(node))
    body = await response.get_json()
    assert response.status_code == 200
    assert body["ready"] is True
    assert body["peerId"] == node.node.peer_id
    response = await client.get("/admin-api/node", headers=auth(node))
    dht = (await response.get_json())["dht"]
    assert dht == msgspec.to_builtins(node.node.dht_status())
    assert set(dht) >= {"enabled", "routingTable", "providerRecords", "lastBootstrap"}
    node.node.request_shutdown()
    response = await client.get("/admin-api/ready", headers=auth(node))
    assert response.status_code == 503
    assert (await response.get_json())["error"]["ready"] is False


async def test_errors_are_json(client: QuartClient, node: TestNode) -> None:
    response = await client.get("/no/such/route", headers=auth(node))
    assert response.status_code == 404
    assert (await response.get_json())["error"]["code"] == 404
    response = await client.post("/admin-api/health")
    assert response.status_code == 405
    assert (await response.get_json())["error"]["code"] == 405


async def test_metrics_parse_and_count_requests(client: QuartClient, node: TestNode) -> None:
    await client.get("/admin-api/health")
    await client.get("/admin-api/ready")
    response = await client.get("/metrics", headers=auth(node))
    assert response.status_code == 200
    text = await response.get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "trionode_build_info",
        "trionode_uptime_seconds",
        "trionode_store_map_size_bytes",
        "trionode_store_used_bytes",
        "trionode_store_entries",
        "trionode_store_operations",
        "trionode_http_requests",
        "trionode_http_request_duration_seconds",
    ):
        assert name in families, name
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["trionode_http_requests"].samples
        if s.name == "trionode_http_requests_total"
    }
    assert requests[("/admin-api/health", "200")] == 1.0
    assert requests[("/admin-api/ready", "401")] == 1.0
    assert families["trionode_store_map_size_bytes"].samples[0].value > 0
