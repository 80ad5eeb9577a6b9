"""Upgrade bundles travel: a member that lacks the app a context moved to fetches it from
the other members under the trust rule (`trionode/context/app_upgrades.py`), and a member
that joined after an upgrade can fetch the original app if that upgrade is cancelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from tests.context.test_upgrade import bundle, call, converge, install, share
from tests.replication.cluster_helpers import b58, metric, subscribe
from trionode.client import ApiError
from trionode.config import FileConfig
from trionode.context.errors import ContextNotFound, WaitingForApp
from trionode.context.events import Notice, Subscription
from trionode.context.replication import topic_for
from trionode.dag.delta import FORMAT_VERSION, verify_delta
from trionode.node import Node
from trionode.sdk.bundle import sign_bundle
from trionode.sdk.errors import AppError
from trionode.sdk.signer import signer_id
from trionode.testing import Cluster, open_cluster, open_test_nodes
from trionode.wire.keys import PrivateKey

PUBLISHER = PrivateKey.generate()
STRANGER = PrivateKey.generate()


def signed(base: Path, version: str, key: PrivateKey = PUBLISHER) -> str:
    """The tally app (`test_upgrade.py`) at `version`, signed by `key`; versions after 1.0
    have a migration and a `note_text` view."""
    folder = base / key.public_key.data.hex()[:8]
    path = bundle(folder, "tally", version, upgraded=version != "1.0")
    sign_bundle(Path(path), key)
    return path


def trusting_publisher(config: FileConfig) -> FileConfig:
    apps = msgspec.structs.replace(config.apps, trusted_signers=[signer_id(PUBLISHER)])
    return msgspec.structs.replace(config, apps=apps)


async def share_v1_everywhere_v2_on_a(
    cluster: Cluster, v1: str, v2: str
) -> tuple[bytes, bytes, bytes]:
    """(context, v1's id, v2's id): every node installed v1 and shares a context of it, made
    by node 0, the only one with v2."""
    old = b""
    for node in cluster:
        old = await install(node, v1)
    new = await install(cluster[0], v2)
    return await share(cluster, old), old, new


def notices(sub: Subscription) -> list[dict[str, Any]]:
    """The transient notices queued for `sub` (not the applied-delta events)."""
    out: list[dict[str, Any]] = []
    while True:
        try:
            item = sub.receive.receive_nowait()
        except trio.WouldBlock:
            return out
        if isinstance(item, Notice):
            out.append(item.payload)


async def installed(node: Node, app: bytes) -> bool:
    try:
        await node.applications.get(app)
    except ContextNotFound:
        return False
    return True


async def wait_installed(cluster: Cluster, node: Node, app: bytes) -> None:
    with trio.fail_after(600):
        while not await installed(node, app):
            await cluster.settle()
            await cluster[0].pubsub.wait_heartbeat()


async def test_members_without_the_new_bundle_fetch_it_from_a_trusted_signer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    v1 = signed(tmp_path, "1.0")
    v2 = signed(tmp_path, "1.1")
    async with open_cluster(3, tmp_path / "nodes", configure=trusting_publisher) as cluster:
        a, b, c = cluster.nodes
        context, _, new = await share_v1_everywhere_v2_on_a(cluster, v1, v2)  # only A: v1.1
        await call(b, context, "add", by=2)
        done = await a.contexts.upgrade(context, new)
        # The upgrade op names the bundle (format 3), so the others know what to fetch.
        header = verify_delta(done.operation, context_id=context)
        assert header.version == FORMAT_VERSION
        assert header.auth is not None
        assert header.auth.bundle_blob_id == (await a.applications.get(new)).bundle_blob_id
        assert header.auth.app_signer == PUBLISHER.public_key.data
        for node in (b, c):
            await wait_installed(cluster, node, new)
        await converge(cluster, list(cluster), context)
        for node in cluster:
            assert (await node.contexts.get(context)).application_id == new
            # The new version's view, and the migration that ran once on A.
            assert await call(node, context, "note_text") == "1.1 from 1.0"
            assert await call(node, context, "value") == 102
        assert await call(c, context, "add", by=1) == 103
        record = await c.applications.get(new)
        assert record.signer == PUBLISHER.public_key.data
        assert metric(c, "trionode_app_follow_total", outcome="installed") == 1
        assert metric(c, "trionode_contexts_waiting_for_app") == 0
        # C serves it on in turn: pinned, like any installed bundle.
        assert record.bundle_blob_id is not None
        info = await c.blobs.info(record.bundle_blob_id)
        assert info is not None
        assert info.pinned


async def test_a_new_version_by_the_same_signer_is_fetched_without_trusted_signers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Nobody lists PUBLISHER in apps.trusted_signers; C's operator installed its v1.0, so
    # v1.1 signed by the same key may run for this context.
    v1 = signed(tmp_path, "1.0")
    v2 = signed(tmp_path, "1.1")
    async with open_cluster(2, tmp_path / "nodes") as cluster:
        a, c = cluster.nodes
        context, _, new = await share_v1_everywhere_v2_on_a(cluster, v1, v2)
        await a.contexts.upgrade(context, new)
        await wait_installed(cluster, c, new)
        assert await call(c, context, "add", by=1) == 101


async def test_another_signer_leaves_the_member_on_the_old_app_with_the_reason(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    v1 = signed(tmp_path, "1.0")
    v2 = signed(tmp_path, "1.1", STRANGER)  # same app name, another publisher
    async with open_cluster(2, tmp_path / "nodes") as cluster:
        a, c = cluster.nodes
        context, _, new = await share_v1_everywhere_v2_on_a(cluster, v1, v2)
        sub = subscribe(c, context)
        await a.contexts.upgrade(context, new)
        await converge(cluster, list(cluster), context)
        await cluster.settle()
        assert (await c.contexts.get(context)).application_id == new
        assert not await installed(c, new)
        assert metric(c, "trionode_app_follow_total", outcome="untrusted") == 1
        assert metric(c, "trionode_contexts_waiting_for_app") == 1
        # Nothing fetched: the trust rule is decided before any network.
        assert metric(c, "trionode_blob_chunks_fetched_total") == 0
        # Views of the state so far run on v1.0; calls say what the context waits for.
        assert await call(c, context, "value") == 100
        with pytest.raises(WaitingForApp) as refused:
            await call(c, context, "add", by=1)
        message = str(refused.value)
        assert "\n" not in message
        assert f"waiting for app {b58(new)} (tally v1.1, signer {signer_id(STRANGER)})" in message
        assert "apps.trusted_signers" in message
        waiting = notices(sub)
        assert [n["type"] for n in waiting] == ["app_waiting"]
        assert waiting[0]["applicationId"] == b58(new)
        # The operator decides: installing it switches the context at once.
        await install(c, v2)
        assert await call(c, context, "add", by=1) == 101
        await a.contexts.execute(context, "add", '{"by": 1}')
        await converge(cluster, list(cluster), context)
        assert metric(c, "trionode_contexts_waiting_for_app") == 0


async def test_a_member_that_joined_after_a_cancelled_upgrade_fetches_the_original_app(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A upgrades while B, cut off, takes A's admin rights away: A's upgrade is filtered
    once they meet, so the context runs v1.0 again. D joined (through C) in between, when
    the context ran v1.1, and has only v1.1: it fetches v1.0, named by the create op."""
    v1 = signed(tmp_path, "1.0")
    v2 = signed(tmp_path, "1.1")
    async with open_cluster(4, tmp_path / "nodes") as cluster:
        a, b, c, d = cluster.nodes
        old = await install(a, v1)
        for node in (b, c):
            await install(node, v1)
        new = await install(a, v2)
        context = (await a.contexts.create(old)).context_id
        for node in (b, c):
            await node.joins.join(await a.joins.invite(context, role="admin"))
        await cluster.wait_mesh(topic_for(context))
        await converge(cluster, [a, b, c], context)
        a_member, _ = await a.contexts.member_key(context)
        await cluster.partition([1])
        await b.contexts.change_members(context, [(a_member, "member")])
        await a.contexts.upgrade(context, new)
        await wait_installed(cluster, c, new)  # same signer as v1.0: C follows
        await d.joins.join(await c.joins.invite(context), trust_app=new)
        assert not await installed(d, old)
        assert await call(d, context, "value") == 100
        await cluster.heal()
        await cluster.wait_mesh(topic_for(context))
        await wait_installed(cluster, d, old)
        await converge(cluster, list(cluster), context)
        for node in cluster:
            assert (await node.contexts.get(context)).application_id == old
        # D runs v1.0 now: its calls work (v1.1's view is gone with the upgrade).
        assert await call(d, context, "add", by=1) == 101
        with pytest.raises(AppError, match="note_text"):
            await call(d, context, "note_text")


@pytest.mark.real_network
async def test_over_http_a_waiting_context_answers_minus_32004_and_says_why(
    tmp_path: Path,
) -> None:
    v1 = bundle(tmp_path / "bundles", "tally", "1.0", upgraded=False)
    v2 = bundle(tmp_path / "bundles", "tally", "1.1")  # unsigned: B will not fetch it
    with trio.fail_after(120):
        async with (
            open_test_nodes(2, tmp_path / "nodes") as (a, b),
            a.client() as client_a,
            b.client() as client_b,
        ):
            old = (await client_a.install_application(v1)).application_id
            await client_b.install_application(v1)
            new = (await client_a.install_application(v2)).application_id
            context = (await client_a.create_context(old)).context_id
            await client_b.join((await client_a.invite(context)).invitation)
            await client_a.upgrade_context(context, new)
            while (await client_b.context(context)).application_id != new:
                await client_b.sync(context)  # gossip gets there too; this is now
            shown = await client_b.context(context)
            while shown.waiting_for_app is None:  # the follower decides right after
                await trio.lowlevel.checkpoint()
                shown = await client_b.context(context)
            blob = (await client_a.application(new)).bundle_blob_id
            assert shown.waiting_for_app == (
                "this node may not run it on its own: fetch and install it yourself: "
                f"`trionode blob get {blob} -o tally-1.1.tar.gz --context {context}` then "
                "`trionode app install tally-1.1.tar.gz`"
            )
            assert (await client_b.call(context, "value")).output == 100  # a view: v1.0 runs it
            with pytest.raises(ApiError) as refused:
                await client_b.call(context, "add", {"by": 1})
            assert refused.value.status == -32004
            assert f"is waiting for app {new} (tally v1.1, unsigned)" in str(refused.value)
            # What the message says works: B's operator fetches the bundle from the members
            # and installs it; the context switches at once.
            assert blob is not None
            await client_b.fetch_blob(blob, context)
            archive = tmp_path / "tally-1.1.tar.gz"
            archive.write_bytes(b"".join([c async for c in client_b.blob_content(blob)]))
            assert (await client_b.install_application(str(archive))).application_id == new
            assert (await client_b.call(context, "add", {"by": 1})).output == 101
