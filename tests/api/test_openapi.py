"""The OpenAPI document: generated from the routes, served without a token, and checked
against a live node by schemathesis (generated requests must never get a 500, and every
answer must match the documented status codes, media types and schemas)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, given, settings, strategies as st
from quart.typing import TestClientProtocol as QuartClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from trionode.api.admin_page import is_page_route
from trionode.api.app import create_app
from trionode.api.openapi import OPENAPI_PATH
from trionode.testing import TestNode, open_test_node

APPS = Path(__file__).resolve().parents[2] / "apps"

UNDOCUMENTED = frozenset({"/ws", "/static/<path:filename>", OPENAPI_PATH})
"""Routes outside the document: the WebSocket (docs/api.md), static files, the document."""
NOT_FUZZED = {
    ("POST", "/admin-api/peers"): "dials whatever address it is given (tests stay on loopback)",
    ("POST", "/admin-api/contexts/join"): "dials the addresses inside an invitation",
    ("GET", "/events"): "an endless stream (tests/api/test_sse_cors.py covers it)",
}


async def test_every_route_is_documented(node: TestNode) -> None:
    app = create_app(node.node)
    async with app.test_app():
        document = (await app.test_client().get(OPENAPI_PATH)).get_json
    documented = {
        (method.upper(), path)
        for path, item in (await document())["paths"].items()
        for method in item
    }
    for rule in app.url_map.iter_rules():
        if rule.rule in UNDOCUMENTED or is_page_route(rule.rule):  # the page: docs/api.md
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert (method, path) in documented, f"{method} {rule.rule} is not in the document"


async def test_the_document_is_public_and_typed(client: QuartClient) -> None:
    response = await client.get(OPENAPI_PATH)  # no Authorization header
    assert response.status_code == 200
    document: dict[str, Any] = await response.get_json()
    assert document["openapi"] == "3.1.0"
    create = document["paths"]["/admin-api/contexts"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CreateContextRequest"}
    schema = document["components"]["schemas"]["CreateContextRequest"]
    assert schema["required"] == ["applicationId"]
    assert schema["additionalProperties"] is False
    assert document["paths"]["/admin-api/health"]["get"]["security"] == []
    # Everything else needs the bearer token, and says so.
    assert document["security"] == [{"bearer": []}]
    assert "401" in create["responses"]


@pytest.fixture
def client(node: TestNode) -> QuartClient:
    return create_app(node.node).test_client()


@pytest.fixture
async def node(tmp_path: Path) -> Any:
    async with open_test_node(tmp_path / "home", api=False) as test_node:
        yield test_node


# -- schemathesis against a live node ---------------------------------------------------------


@contextmanager
def live_node(home: Path) -> Iterator[dict[str, Any]]:
    """A real node (API on a loopback port) in a thread of its own, with one context of the
    kv_store app, for synchronous tools (schemathesis uses blocking HTTP)."""
    ready = threading.Event()
    live: dict[str, Any] = {}

    async def main() -> None:
        try:
            async with open_test_node(home) as node, node.client() as client:
                app = await client.install_application(str(APPS / "kv_store"))
                context = await client.create_context(app.application_id)
                live.update(
                    url=node.api_url,
                    token=node.token,
                    context=context.context_id,
                    stop=trio.Event(),
                    trio_token=trio.lowlevel.current_trio_token(),
                )
                ready.set()
                await live["stop"].wait()
        finally:
            ready.set()  # also when start-up failed: the test then fails at once

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    ready.wait()
    if "stop" not in live:
        thread.join()
        raise AssertionError("the node did not start")
    try:
        yield live
    finally:
        trio.from_thread.run_sync(live["stop"].set, trio_token=live["trio_token"])
        thread.join()


def fuzz(home: Path, max_examples: int, *, derandomize: bool) -> None:
    with live_node(home) as live:
        document = httpx.get(live["url"] + OPENAPI_PATH).json()
        schema = schemathesis.openapi.from_dict(document)
        headers = {"Authorization": f"Bearer {live['token']}"}
        checks = [
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
        operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
        fuzzed = [op for op in operations if (op.method.upper(), op.path) not in _not_fuzzed()]
        assert len(fuzzed) >= 30, "the document lost operations"
        failures: list[str] = []
        for operation in fuzzed:

            @settings(
                max_examples=max_examples,
                derandomize=derandomize,  # the default run is the same every time
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(), use_context=st.booleans())
            def run(case: Any, use_context: bool) -> None:
                if use_context and case.path_parameters and "context_id" in case.path_parameters:
                    case.path_parameters["context_id"] = live["context"]  # reach past the 404
                response = case.call(base_url=live["url"], headers=headers, timeout=30)
                case.validate_response(response, checks=checks)

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
        assert not failures, "\n\n".join(failures)


def _not_fuzzed() -> set[tuple[str, str]]:
    return {(method, path.replace("<", "{").replace(">", "}")) for method, path in NOT_FUZZED}


@pytest.mark.real_network
def test_schemathesis_finds_no_500_and_no_undocumented_answer(tmp_path: Path) -> None:
    fuzz(tmp_path / "home", max_examples=4, derandomize=True)


@pytest.mark.slow
@pytest.mark.real_network
def test_schemathesis_long(tmp_path: Path) -> None:
    fuzz(tmp_path / "home", max_examples=200, derandomize=False)
