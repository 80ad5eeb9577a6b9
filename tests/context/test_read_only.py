"""`node.mode = "read-only"`: a mirror that reads, follows and serves sync but writes nothing.

Over real HTTP (a home first used read-write, restarted read-only) and in a cluster (a
read-only member joins, receives, answers views, runs no handlers and serves sync)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import httpx
import pytest
import trio
from msgspec.structs import replace

from trionode.config import FileConfig, load_config
from trionode.context.records import DELTAS, HANDLER_PREFIX, HANDLER_RUNS
from trionode.context.replication import topic_for
from trionode.dag.delta import verify_wire
from trionode.errors import ReadOnlyError
from trionode.node import Node, open_node
from trionode.testing import open_cluster, open_test_node

from ..replication.cluster_helpers import (
    call,
    drain,
    install,
    subscribe,
    wait_converged,
    write,
)

APPS = Path(__file__).resolve().parents[2] / "apps"


@pytest.mark.real_network
async def test_read_only_node_refuses_writes_over_http(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with trio.fail_after(60):
        async with open_test_node(home) as rw, rw.client() as client:
            installed_app = await client.install_application(str(APPS / "kv_store"))
            app = installed_app.application_id
            ctx = (await client.create_context(app)).context_id
            await client.call(ctx, "set", {"key": "a", "value": "1"})
            member = (await client.context(ctx)).member_public_key
            invitation = (await client.invite(ctx)).invitation
            token = rw.token
        config = load_config(home)
        file = config.file
        file = replace(
            file,
            node=replace(file.node, mode="read-only"),
            network=replace(file.network, mdns=False),
        )
        async with (
            open_node(replace(config, file=file)) as node,
            httpx.AsyncClient(
                base_url=node.api_url, headers={"Authorization": f"Bearer {token}"}
            ) as http,
        ):
            assert (await http.get("/admin-api/node")).json()["mode"] == "read-only"

            async def rpc(method: str, args: object) -> dict[str, object]:
                params = {"contextId": ctx, "method": method, "argsJson": args}
                body = {"jsonrpc": "2.0", "id": 7, "method": "execute", "params": params}
                response = await http.post("/jsonrpc", json=body)
                assert response.status_code == 200
                answer: dict[str, object] = response.json()
                return answer

            # Views still answer; a method that writes is refused before it runs.
            assert (await rpc("get", {"key": "a"}))["result"] == {
                "output": "1",
                "deltaId": None,
                "rootHash": (await http.get(f"/admin-api/contexts/{ctx}")).json()["rootHash"],
            }
            refused = await rpc("set", {"key": "b", "value": "2"})
            assert refused["error"] == {
                "code": -32003,
                "message": "this node is read-only (node.mode): calling 'set' (only views run) "
                "is not allowed",
            }
            assert (await rpc("get", {"key": "b"}))["result"]["output"] is None  # type: ignore[index]

            writes = [
                ("POST", "/admin-api/contexts", {"applicationId": app}),
                ("POST", f"/admin-api/contexts/{ctx}/invitations", {"role": "member"}),
                ("POST", f"/admin-api/contexts/{ctx}/members/{member}/role", {"role": "admin"}),
                ("DELETE", f"/admin-api/contexts/{ctx}/members/{app}", None),
                ("POST", f"/admin-api/contexts/{ctx}/leave", {}),
                (
                    "POST",
                    f"/admin-api/contexts/{ctx}/invitations/revoke",
                    {"invitation": invitation},
                ),
            ]
            for method, path, body in writes:
                response = await http.request(method, path, json=body)
                assert response.status_code == 403, (path, response.text)
                error = response.json()["error"]
                assert error["reason"] == "read-only", path
                assert error["message"].startswith("this node is read-only (node.mode): "), path
            upload = await http.post("/admin-api/blobs", content=b"hello")
            assert upload.status_code == 403
            assert "uploading a blob is not allowed" in upload.json()["error"]["message"]
            # Only the app's bundle, stored when it was installed (read-write then).
            blobs = (await http.get("/admin-api/blobs")).json()["blobs"]
            assert [b["blobId"] for b in blobs] == [installed_app.bundle_blob_id]

            # Node-local administration a reader needs stays allowed (docs/operating.md).
            installed = await http.post(
                "/admin-api/applications", json={"path": str(APPS / "chat")}
            )
            assert installed.status_code == 200
            token_made = await http.post(
                "/admin-api/tokens", json={"contexts": [ctx], "scope": "read"}
            )
            assert token_made.status_code == 200
            assert (await http.post(f"/admin-api/contexts/{ctx}/sync", json={})).status_code in (
                200,
                502,  # no other member to sync with: the route ran
            )
            # The state is what it was: nothing was written.
            entries = (await rpc("entries", {}))["result"]
            assert entries["output"] == {"a": "1"}  # type: ignore[index]


def _modes(*modes: Literal["read-write", "read-only"]) -> Callable[[FileConfig], FileConfig]:
    """A `configure` for open_cluster giving node i the mode modes[i] (open_cluster
    configures its nodes one by one, in order)."""
    order = iter(modes)

    def configure(file: FileConfig) -> FileConfig:
        return replace(file, node=replace(file.node, mode=next(order)))

    return configure


async def _authored_by(node: Node, context: bytes) -> list[bytes]:
    """The keys of the deltas in `node`'s log that its own member wrote."""
    member, _ = await node.contexts.member_key(context)
    rows = await node.store.scan(DELTAS, prefix=context)
    return [
        key
        for key, wire in rows
        if wire and verify_wire(wire, context_id=context).header.author == member
    ]


async def test_read_only_member_follows_and_serves_sync(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    configure = _modes("read-write", "read-only", "read-write")
    async with open_cluster(3, tmp_path, configure=configure) as cluster:
        writer, mirror, late = cluster[0], cluster[1], cluster[2]
        assert mirror.contexts.read_only
        assert not writer.contexts.read_only
        app = b""
        for node in cluster:
            app = await install(node, "kv_store")  # installing code is allowed read-only
        context = (await writer.contexts.create(app)).context_id
        # The mirror joins as a plain member: its own node refuses its writes.
        await mirror.joins.join(await writer.joins.invite(context, role="member"))
        await late.joins.join(await writer.joins.invite(context, role="member"))
        await cluster.wait_mesh(topic_for(context))
        events = subscribe(mirror, context)

        inserted = await write(writer, context, "set", key="k", value="v")
        await wait_converged(cluster, list(cluster), context)
        assert await call(mirror, context, "get", key="k") == "v"
        # The event reaches the mirror's subscribers (WebSocket/SSE) ...
        assert inserted.hex() in [event.delta_id for event in drain(events)]
        # ... but its handlers never run: only `late` counted the insert (a node runs
        # handlers for events it receives, not for its own).
        assert await call(mirror, context, "handler_calls") == 1
        assert await mirror.store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX) == []
        assert await _authored_by(mirror, context) == []

        with pytest.raises(ReadOnlyError):
            await mirror.contexts.execute(context, "set", json.dumps({"key": "x", "value": "y"}))
        with pytest.raises(ReadOnlyError):
            await mirror.joins.invite(context)
        with pytest.raises(ReadOnlyError):
            await mirror.contexts.create(app)
        with pytest.raises(ReadOnlyError):
            await mirror.contexts.leave(context)
        assert await _authored_by(mirror, context) == []

        # The mirror serves sync: `late` is cut off while the writer writes, then reconnected
        # to the mirror only.
        await cluster.partition([2])
        await write(writer, context, "set", key="k2", value="v2")
        await wait_converged(cluster, [writer, mirror], context)
        cluster.network.heal()
        cluster.network.partition([cluster.hosts[0]], [cluster.hosts[2]])
        await cluster.connect(2, 1)
        await late.sync.sync_now(context)
        assert not cluster.is_connected(0, 2)
        assert await call(late, context, "get", key="k2") == "v2"
        # (`late` ran its handler for the new insert: the mirror receives that delta too.)
        await wait_converged(cluster, [mirror, late], context)
        assert await call(mirror, context, "handler_calls") == 2
        assert await _authored_by(mirror, context) == []
