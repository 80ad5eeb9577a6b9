from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from msgspec.structs import replace

from trionode.client import ApiError
from trionode.config import FileConfig
from trionode.errors import WrongPassphraseError
from trionode.node import open_node
from trionode.store.lmdb_store import Column
from trionode.testing import make_test_config, open_test_node, open_test_nodes

pytestmark = pytest.mark.real_network


async def test_nodes_serve_their_api_on_real_sockets(tmp_path: Path) -> None:
    async with open_test_nodes(3, tmp_path) as nodes:
        assert len({n.node.peer_id for n in nodes}) == 3
        assert len({n.api_url for n in nodes}) == 3
        for n in nodes:
            assert (n.home / "api.url").read_text().strip() == n.api_url
            async with n.client() as client:
                assert (await client.ready()).peer_id == n.node.peer_id
        # A token is only good for its own node.
        async with httpx.AsyncClient() as http:
            response = await http.get(
                f"{nodes[0].api_url}/admin-api/ready",
                headers={"Authorization": f"Bearer {nodes[1].token}"},
            )
        assert response.status_code == 401
    for n in nodes:
        assert not (n.home / "api.url").exists()


async def test_leaving_the_block_shuts_down_and_keeps_writes(tmp_path: Path) -> None:
    async with open_test_node(tmp_path / "a") as n:
        await n.node.store.write([])
        n.node.store.raw.put(Column.GENERIC, b"k", b"v")
        n.node.request_shutdown()
        assert not n.node.is_ready()
    async with n.client() as client:
        with pytest.raises(ApiError, match="cannot reach node"):
            await client.health()
    config, _ = make_test_config(tmp_path / "b", api=False)
    async with open_node(replace(config, home=tmp_path / "a")) as again:
        assert again.store.raw.get(Column.GENERIC, b"k") == b"v"


def _encrypted(file: FileConfig) -> FileConfig:
    return replace(file, store=replace(file.store, encrypted=True))


async def test_encrypted_node_refuses_a_wrong_passphrase(tmp_path: Path) -> None:
    config, _ = make_test_config(tmp_path / "a", api=False, configure=_encrypted, passphrase="pw")
    async with open_node(config) as node:
        assert node.store.raw.encrypted
    with pytest.raises(WrongPassphraseError):
        async with open_node(replace(config, passphrase="not-pw")):
            pass
