"""The page's server side: static files, the sign-in session cookie, DAG, methods, roles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as QuartClient

from trionode.api.admin_page import SESSION_COOKIE, SessionBook
from trionode.api.app import create_app
from trionode.sdk.bundle import load_bundle, pack_bundle
from trionode.testing import TestNode, open_test_node

ROOT = Path(__file__).resolve().parents[2]
KV_STORE = ROOT / "apps" / "kv_store"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(tmp_path / "home", api=False) as test_node:
        yield test_node


@pytest.fixture
def client(node: TestNode) -> QuartClient:
    return create_app(node.node).test_client()


def bearer(node: TestNode) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.token}"}


async def signed_in(client: QuartClient, node: TestNode) -> str:
    response = await client.post("/admin/session", json={"token": node.token})
    assert response.status_code == 200
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    assert node.token not in cookie
    return cookie.split(";")[0].split("=", 1)[1]


async def context_with_writes(client: QuartClient, node: TestNode, writes: int) -> str:
    app: Any = await (
        await client.post(
            "/admin-api/applications", json={"path": str(KV_STORE)}, headers=bearer(node)
        )
    ).get_json()
    context: Any = await (
        await client.post(
            "/admin-api/contexts",
            json={"applicationId": app["applicationId"]},
            headers=bearer(node),
        )
    ).get_json()
    for n in range(writes):
        body = {
            "jsonrpc": "2.0",
            "id": n,
            "method": "execute",
            "params": {
                "contextId": context["contextId"],
                "method": "set",
                "argsJson": {"key": f"k{n}", "value": "v"},
            },
        }
        await client.post("/jsonrpc", json=body, headers=bearer(node))
    return str(context["contextId"])


@pytest.mark.parametrize(
    ("path", "type_"),
    [
        ("/admin/", "text/html"),
        ("/admin/static/app.js", "text/javascript"),
        ("/admin/static/style.css", "text/css"),
    ],
)
async def test_the_page_is_public_and_locked_down(
    client: QuartClient, path: str, type_: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(type_)
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("name", ["../app.py", "nope.js", "%2e%2e%2fapp.py", "index.html%00"])
async def test_only_the_shipped_files_are_served(client: QuartClient, name: str) -> None:
    response = await client.get(f"/admin/static/{name}")
    assert response.status_code == 404


async def test_the_page_references_nothing_outside_the_node(client: QuartClient) -> None:
    for path in ("/admin/", "/admin/static/app.js", "/admin/static/style.css"):
        text = await (await client.get(path)).get_data(as_text=True)
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text
        assert "innerHTML" not in text  # text goes into the DOM as text only


async def test_a_session_cookie_is_the_admin_until_signed_out(
    client: QuartClient, node: TestNode
) -> None:
    session = await signed_in(client, node)
    client.set_cookie("localhost", SESSION_COOKIE, session)
    assert (await client.get("/admin-api/node")).status_code == 200
    response = await client.delete("/admin/session")
    assert response.status_code == 200
    client.set_cookie("localhost", SESSION_COOKIE, session)
    response = await client.get("/admin-api/node")
    assert response.status_code == 401
    assert "sign in again" in (await response.get_json())["error"]["message"]


async def test_a_wrong_token_opens_no_session(client: QuartClient) -> None:
    bodies: list[Any] = [{"token": "nope"}, {"token": 5}, [], None]
    for body in bodies:
        response = await client.post("/admin/session", json=body)
        assert response.status_code == 401
        assert "Set-Cookie" not in response.headers


async def test_cross_origin_writes_with_the_cookie_are_refused(
    client: QuartClient, node: TestNode
) -> None:
    session = await signed_in(client, node)
    client.set_cookie("localhost", SESSION_COOKIE, session)
    response = await client.post(
        "/admin-api/gc", json={}, headers={"Origin": "http://evil.example"}
    )
    assert response.status_code == 403
    response = await client.post("/admin-api/gc", json={}, headers={"Origin": "http://localhost"})
    assert response.status_code == 200
    # Signing in is refused from another origin too.
    response = await client.post(
        "/admin/session", json={"token": node.token}, headers={"Origin": "http://evil.example"}
    )
    assert response.status_code == 403


async def test_sessions_expire_and_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    book = SessionBook(ttl=60.0, capacity=2)
    first = book.open()
    await trio.sleep(59.0)
    assert book.valid(first)
    second = book.open()
    third = book.open()  # over capacity: the oldest gives way
    assert not book.valid(first)
    assert book.valid(second)
    assert book.valid(third)
    await trio.sleep(61.0)
    assert not book.valid(third)
    assert not book.valid("made-up")


async def test_the_dag_route_walks_back_from_the_heads(client: QuartClient, node: TestNode) -> None:
    context = await context_with_writes(client, node, 5)
    body: Any = await (
        await client.get(f"/admin-api/contexts/{context}/dag", headers=bearer(node))
    ).get_json()
    ids = [n["id"] for n in body["nodes"]]
    assert len(ids) == len(set(ids)) >= 6  # genesis write (init) + 5 calls
    by_id = {n["id"]: n for n in body["nodes"]}
    (head,) = body["heads"]
    assert by_id[head]["pending"] is False
    # A chain: every node but the oldest has its parent in the window.
    linked = [n for n in body["nodes"] if any(p in by_id for p in n["parents"])]
    assert len(linked) == len(ids) - 1
    limited: Any = await (
        await client.get(f"/admin-api/contexts/{context}/dag?limit=2", headers=bearer(node))
    ).get_json()
    assert limited["nodes"][0]["id"] == head
    assert len(limited["nodes"]) == 2


@pytest.mark.parametrize("limit", ["0", "501", "-1", "x", "1e3"])
async def test_the_dag_limit_is_checked(client: QuartClient, node: TestNode, limit: str) -> None:
    context = await context_with_writes(client, node, 0)
    response = await client.get(
        f"/admin-api/contexts/{context}/dag?limit={limit}", headers=bearer(node)
    )
    assert response.status_code == 400


async def test_an_uploaded_bundle_is_installed_like_a_path(
    client: QuartClient, node: TestNode
) -> None:
    packed = pack_bundle(load_bundle(KV_STORE))
    response = await client.post(
        "/admin-api/applications/bundle?name=kv_store.tar.gz", data=packed, headers=bearer(node)
    )
    assert response.status_code == 200, await response.get_data(as_text=True)
    app: Any = await response.get_json()
    assert (app["name"], app["path"]) == ("kv_store", "upload:kv_store.tar.gz")
    shown: Any = await (
        await client.get(f"/admin-api/applications/{app['applicationId']}", headers=bearer(node))
    ).get_json()
    assert "set" in {e["name"] for e in shown["entryPoints"]}
    # The same app as installing its directory by path: the same id.
    by_path: Any = await (
        await client.post(
            "/admin-api/applications", json={"path": str(KV_STORE)}, headers=bearer(node)
        )
    ).get_json()
    assert by_path["applicationId"] == app["applicationId"]


async def test_installing_a_path_the_system_refuses_is_a_400_not_a_500(
    client: QuartClient, node: TestNode, tmp_path: Path
) -> None:
    # The slow schemathesis run sent a 300-byte name: ENAMETOOLONG escaped as a 500.
    response = await client.post(
        "/admin-api/applications", json={"path": str(tmp_path / ("n" * 300))}, headers=bearer(node)
    )
    assert response.status_code == 400, await response.get_data(as_text=True)
    body: Any = await response.get_json()
    assert "cannot read" in body["error"]["message"]


@pytest.mark.parametrize(
    ("query", "body", "refusal"),
    [
        ("", b"", (400, "must be a bundle archive")),
        ("", b"not an archive at all", (400, "uploaded bundle")),
        ("?name=" + "x" * 256, b"x", (400, "longer than 255")),
        ("", b"\0" * (8 * 1024 * 1024 + 1), (413, "install it by path instead")),
    ],
)
async def test_a_bad_bundle_upload_is_a_clear_error(
    client: QuartClient, node: TestNode, query: str, body: bytes, refusal: tuple[int, str]
) -> None:
    status, message = refusal
    response = await client.post(
        f"/admin-api/applications/bundle{query}", data=body, headers=bearer(node)
    )
    assert response.status_code == status
    assert message in (await response.get_json())["error"]["message"]
    listed: Any = await (
        await client.get("/admin-api/applications", headers=bearer(node))
    ).get_json()
    assert listed["applications"] == []
