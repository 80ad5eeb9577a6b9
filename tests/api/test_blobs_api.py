"""Blob routes through the real server: streaming upload, Range downloads, list, delete."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import base58
import httpx
import pytest
import trio
from msgspec.structs import replace

from trionode import schemas
from trionode.client import ApiError, Client
from trionode.config import FileConfig
from trionode.testing import TestNode, open_test_node

pytestmark = pytest.mark.real_network


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    async with open_test_node(tmp_path / "home") as test_node:
        yield test_node


async def stream(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        await trio.lowlevel.checkpoint()
        yield data[i : i + size]


async def download(client: Client, blob_id: str, start: int = 0) -> bytes:
    return b"".join([p async for p in client.blob_content(blob_id, start=start)])


async def test_upload_list_show_download_delete(node: TestNode) -> None:
    data = os.urandom(3 * 1024 * 1024 + 12345)
    async with node.client() as client:
        info = await client.add_blob(stream(data), name="photo.jpg")
        assert info.size == len(data)
        assert info.chunks == 4
        assert info.name == "photo.jpg"
        blob_id = info.blob_id
        assert await download(client, blob_id) == data
        assert await download(client, blob_id, start=2_000_000) == data[2_000_000:]
        listed = await client.blobs()
        assert [b.blob_id for b in listed.blobs] == [blob_id]
        assert (await client.blob(blob_id)).size == len(data)
        assert (await client.pin_blob(blob_id)).pinned is True
        assert (await client.blob(blob_id)).pinned is True
        assert (await client.pin_blob(blob_id, pinned=False)).pinned is False
        with pytest.raises(ApiError, match="404"):
            await client.pin_blob("1" * 32)
        assert await client.delete_blob(blob_id) == schemas.BlobDeleted(deleted=blob_id)
        with pytest.raises(ApiError, match="404"):
            await client.blob(blob_id)
        with pytest.raises(ApiError, match="404"):
            await download(client, blob_id)


async def test_ranges(node: TestNode) -> None:
    data = os.urandom(2 * 1024 * 1024 + 7)
    headers = {"Authorization": f"Bearer {node.token}"}
    async with node.client() as client:
        blob_id = (await client.add_blob(stream(data))).blob_id
    url = f"{node.api_url}/admin-api/blobs/{blob_id}/content"
    async with httpx.AsyncClient(headers=headers) as http:
        r = await http.get(url, headers={"Range": "bytes=1048570-1048590"})
        assert r.status_code == 206
        assert r.content == data[1048570:1048591]
        assert r.headers["Content-Range"] == f"bytes 1048570-1048590/{len(data)}"
        r = await http.get(url, headers={"Range": "bytes=-10"})
        assert (r.status_code, r.content) == (206, data[-10:])
        r = await http.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416
        r = await http.get(url, headers={"Range": "bytes=0-1,5-6"})
        assert r.status_code == 416
        r = await http.get(url)
        assert (r.status_code, r.headers["Accept-Ranges"]) == (200, "bytes")
        assert r.content == data


async def test_hostile_requests_get_clear_errors(node: TestNode) -> None:
    base = f"{node.api_url}/admin-api/blobs"
    good = {"Authorization": f"Bearer {node.token}"}
    async with httpx.AsyncClient() as http:
        r = await http.post(base, content=b"x")
        assert r.status_code == 401
        r = await http.post(base, content=b"x", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "invalid bearer token"
        r = await http.post(base, params={"context": "not-base58-0OIl"}, content=b"x", headers=good)
        assert r.status_code == 400
        r = await http.post(base, params={"context": "1" * 31}, content=b"x", headers=good)
        assert r.status_code == 400  # 31 zero bytes
        unknown = base58.b58encode(os.urandom(32)).decode()
        r = await http.post(base, params={"context": unknown}, content=b"x", headers=good)
        assert r.status_code == 404
        assert "unknown context" in r.json()["error"]["message"]
        r = await http.get(f"{base}/nope", headers=good)
        assert r.status_code == 400
        r = await http.get(f"{base}/{'1' * 32}", headers=good)
        assert r.status_code == 404
        r = await http.delete(f"{base}/{'1' * 32}", headers=good)
        assert r.status_code == 404
    # Nothing half-stored by any of it.
    async with node.client() as client:
        assert (await client.blobs()).blobs == []


async def test_upload_over_the_limit_is_refused_without_a_blob(tmp_path: Path) -> None:
    def small(file: FileConfig) -> FileConfig:
        return replace(file, blobs=replace(file.blobs, max_size=1024 * 1024))

    async with (
        open_test_node(tmp_path / "home", configure=small) as node,
        node.client() as client,
    ):
        with pytest.raises(ApiError, match="413"):
            await client.add_blob(stream(os.urandom(1024 * 1024 + 1)), size=1024 * 1024 + 1)
        # Chunked (no length announced): refused when the limit is crossed.
        with pytest.raises(ApiError, match="413"):
            await client.add_blob(stream(os.urandom(2 * 1024 * 1024)))
        assert (await client.blobs()).blobs == []


async def test_the_page_uploads_with_its_session_cookie_from_its_own_origin(
    node: TestNode,
) -> None:
    base = f"{node.api_url}/admin-api/blobs"
    async with httpx.AsyncClient() as http:
        signed_in = await http.post(f"{node.api_url}/admin/session", json={"token": node.token})
        session = signed_in.cookies["trionode_session"]
        cookie = {"Cookie": f"trionode_session={session}"}
        # Another site's page can't upload with the operator's session...
        r = await http.post(
            base, content=b"evil", headers={**cookie, "Origin": "https://evil.example"}
        )
        assert r.status_code == 403
        assert "cross-origin" in r.json()["error"]["message"]
        # ...a made-up session is no session...
        r = await http.post(base, content=b"x", headers={"Cookie": "trionode_session=forged"})
        assert r.status_code == 401
        assert "sign in again" in r.json()["error"]["message"]
        # ...and the page itself can.
        r = await http.post(
            base,
            params={"name": "note.txt"},
            content=b"from the page",
            headers={**cookie, "Origin": node.api_url},
        )
        assert r.status_code == 200, r.text
        blob_id = r.json()["blobId"]
        r = await http.get(f"{base}/{blob_id}/content", headers=cookie)
        assert r.content == b"from the page"
        # Signing out ends it for uploads too.
        await http.delete(f"{node.api_url}/admin/session", headers=cookie)
        r = await http.post(base, content=b"x", headers={**cookie, "Origin": node.api_url})
        assert r.status_code == 401
    async with node.client() as client:
        assert [b.name for b in (await client.blobs()).blobs] == ["note.txt"]
