"""`context upgrade`: a context moves to a newer version of its app on every member.

The move is a signed operation (`Kind.UPGRADE`, admins only) in the replicated state; the
`@app.migrate` hook runs once, on the upgrading admin's node, and its writes are one delta;
concurrent upgrades resolve to the highest version (then id) on every node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from trionode.api.context_errors import JSONRPC_WAITING_FOR_APP, http_status, jsonrpc_code
from trionode.client import ApiError
from trionode.context.errors import WaitingForApp
from trionode.context.manager import ContextError
from trionode.context.replication import topic_for
from trionode.node import Node
from trionode.testing import Cluster, open_cluster, open_test_node

SOURCE = """
from trionode.sdk import App, Counter, LwwRegister

app = App("tally")


@app.state
class Tally:
    count: Counter
{fields}
    @app.method
    def add(self, by: int) -> int:
        self.count.increment(by)
        return self.count.value()

    @app.view
    def value(self) -> int:
        return self.count.value()
{extra}
"""

V2_FIELDS = "    note: LwwRegister[str]\n"
V2_EXTRA = """
    @app.migrate
    def migrate(self, from_version: str) -> None:
        self.note.set(f"{VERSION} from {from_version}")
        self.count.increment(100)

    @app.view
    def note_text(self) -> str | None:
        return self.note.get()
"""


def bundle(base: Path, name: str, version: str, *, upgraded: bool = True) -> str:
    folder = base / f"{name}-{version}"
    folder.mkdir(parents=True)
    manifest = {"name": name, "version": version, "entry": "tally:app"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    source = SOURCE.format(
        fields=V2_FIELDS if upgraded else "",
        extra=V2_EXTRA.replace("VERSION", version) if upgraded else "",
    )
    (folder / "tally.py").write_text(source.replace('App("tally")', f'App("{name}")'))
    return str(folder)


async def install(node: Node, path: str) -> bytes:
    return (await node.applications.install(path)).application_id


async def converge(cluster: Cluster, nodes: list[Node], context: bytes) -> None:
    """Every node holds the same heads and root, nothing pending or in flight."""
    with trio.fail_after(300):
        while True:
            await cluster.settle()
            states = [await node.contexts.state(context) for node in nodes]
            if all(s[2] == 0 for s in states) and len({(s[0], tuple(s[1])) for s in states}) == 1:
                return
            await cluster[0].pubsub.wait_heartbeat()


async def call(node: Node, context: bytes, method: str, **args: object) -> object:
    return (await node.contexts.execute(context, method, json.dumps(args))).result


async def share(cluster: Cluster, app: bytes, admins: int = 1) -> bytes:
    creator = cluster[0]
    context = (await creator.contexts.create(app)).context_id
    for i in range(1, len(cluster)):
        role = "admin" if i < admins else "member"
        await cluster[i].joins.join(await creator.joins.invite(context, role=role))
    await cluster.wait_mesh(topic_for(context))
    await converge(cluster, list(cluster), context)
    return context


async def test_upgrade_with_migrate_reaches_every_member(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    v1 = bundle(tmp_path / "bundles", "tally", "1.0", upgraded=False)
    v2 = bundle(tmp_path / "bundles", "tally", "1.1")
    async with open_cluster(3, tmp_path / "nodes") as cluster:
        installed: list[bytes] = []
        for node in cluster:
            installed = [await install(node, v1), await install(node, v2)]
        old, new = installed
        context = await share(cluster, old)
        await call(cluster[1], context, "add", by=2)
        await converge(cluster, list(cluster), context)

        done = await cluster[0].contexts.upgrade(context, new)
        assert done.application_id == new
        assert done.migration is not None  # the hook wrote: one delta of its own
        await converge(cluster, list(cluster), context)
        for node in cluster:
            record = await node.contexts.get(context)
            assert record.application_id == new
            assert record.base_application_id == old
            # The hook ran once (on the admin's node): +100 once, not once per member.
            assert await call(node, context, "value") == 102
            assert await call(node, context, "note_text") == "1.1 from 1.0"
        # Members call the new version's methods and views.
        assert await call(cluster[2], context, "add", by=1) == 103


async def test_concurrent_upgrades_converge_on_the_highest_version(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    paths = [bundle(tmp_path / "bundles", "tally", v) for v in ("1.0", "1.2", "1.10")]
    async with open_cluster(3, tmp_path / "nodes") as cluster:
        ids: list[bytes] = []
        for node in cluster:
            ids = [await install(node, p) for p in paths]
        context = await share(cluster, ids[0], admins=2)
        # Two admins upgrade while cut off from each other: 1.10 > 1.2 (numbers, not text).
        await cluster.partition([1])
        await cluster[0].contexts.upgrade(context, ids[1])
        await converge(cluster, [cluster[0], cluster[2]], context)
        await cluster[1].contexts.upgrade(context, ids[2])
        assert (await cluster[0].contexts.get(context)).application_id == ids[1]
        await cluster.heal()
        await converge(cluster, list(cluster), context)
        for node in cluster:
            assert (await node.contexts.get(context)).application_id == ids[2]
            # Both hooks ran, each once, on its own admin's node.
            assert await call(node, context, "value") == 200


async def test_only_admins_upgrade_and_only_to_a_newer_same_app(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    base = tmp_path / "bundles"
    v1 = bundle(base, "tally", "1.0", upgraded=False)
    v2 = bundle(base, "tally", "2.0")
    other = bundle(base, "other", "9.0")
    async with open_cluster(2, tmp_path / "nodes") as cluster:
        admin, member = cluster[0], cluster[1]
        installed: list[bytes] = []
        for node in cluster:
            installed = [await install(node, p) for p in (v1, v2, other)]
        old, new, foreign = installed
        context = await share(cluster, old)
        with pytest.raises(ContextError, match="only admins") as refused:
            await member.contexts.upgrade(context, new)
        assert http_status(refused.value) == 403
        with pytest.raises(ContextError, match="the app 'other'") as refused:
            await admin.contexts.upgrade(context, foreign)
        assert http_status(refused.value) == 400
        await admin.contexts.upgrade(context, new)
        with pytest.raises(ContextError, match="not newer") as refused:
            await admin.contexts.upgrade(context, old)
        assert http_status(refused.value) == 409
        await converge(cluster, list(cluster), context)
        assert (await member.contexts.get(context)).application_id == new


async def test_a_member_that_may_not_run_the_new_bundle_stays_on_views_until_installed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    v1 = bundle(tmp_path / "bundles", "tally", "1.0", upgraded=False)
    v2 = bundle(tmp_path / "bundles", "tally", "1.1")
    async with open_cluster(2, tmp_path / "nodes") as cluster:
        old = await install(cluster[0], v1)
        await install(cluster[1], v1)
        new = await install(cluster[0], v2)
        context = await share(cluster, old)
        await cluster[0].contexts.upgrade(context, new)
        await converge(cluster, list(cluster), context)
        assert (await cluster[1].contexts.get(context)).application_id == new
        # v1.1 is unsigned: node 1 does not fetch it on its own (the trust rule), it
        # waits: views of the state so far run on v1.0, calls are refused with the reason.
        assert await call(cluster[1], context, "value") == 100
        with pytest.raises(
            WaitingForApp, match=r"is waiting for app .*tally v1\.1.*may not run it on its own"
        ):
            await call(cluster[1], context, "add", by=1)
        with pytest.raises(WaitingForApp) as refused:  # a view v1.0 does not have
            await call(cluster[1], context, "note_text")
        assert http_status(refused.value) == 503
        assert jsonrpc_code(refused.value) == JSONRPC_WAITING_FOR_APP
        # Installing it is all it takes.
        await install(cluster[1], v2)
        assert await call(cluster[1], context, "add", by=1) == 101


@pytest.mark.real_network
async def test_upgrade_over_http_with_the_typed_client(tmp_path: Path) -> None:
    v1 = bundle(tmp_path / "bundles", "tally", "1.0", upgraded=False)
    v2 = bundle(tmp_path / "bundles", "tally", "1.1")
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "home") as node, node.client() as client:
            old = (await client.install_application(v1)).application_id
            new = (await client.install_application(v2)).application_id
            context = (await client.create_context(old)).context_id
            done = await client.upgrade_context(context, new)
            assert done.application_id == new
            assert done.migration_delta_id is not None
            assert (await client.context(context)).application_id == new
            assert (await client.call(context, "note_text")).output == "1.1 from 1.0"
            with pytest.raises(ApiError, match=r"^409: .*not newer") as refused:
                await client.upgrade_context(context, old)
            assert refused.value.status == 409
