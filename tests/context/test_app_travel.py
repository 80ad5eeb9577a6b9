"""Apps travel with the context: a joiner without the app fetches its bundle from the
inviter, and runs it only if a trusted signer signed it or the operator named it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.replication.cluster_helpers import APPS, b58, call, metric, wait_converged, write
from trionode.blobs.protocol import BLOB_PROTOCOL, BlobOpen, BlobRefused, InvitedOpen
from trionode.blobs.transfer import _Channel
from trionode.client import ApiError
from trionode.config import FileConfig
from trionode.context import invitations as inv
from trionode.context.app_bundles import (
    AppBundleRefusedError,
    AppNotTrustedError,
    invited_opener,
)
from trionode.context.manager import ContextError
from trionode.context.records import APPLICATIONS
from trionode.context.replication import topic_for
from trionode.node import Node
from trionode.sdk.bundle import load_bundle, pack_bundle, sign_bundle
from trionode.sdk.signer import signer_id
from trionode.testing import Cluster, open_cluster, open_test_node
from trionode.wire.keys import PrivateKey

SIGNER = PrivateKey.generate()


def trusting(config: FileConfig) -> FileConfig:
    apps = msgspec.structs.replace(config.apps, trusted_signers=[signer_id(SIGNER)])
    return msgspec.structs.replace(config, apps=apps)


def signed_kv(tmp_path: Path, key: PrivateKey = SIGNER) -> Path:
    bundle = shutil.copytree(APPS / "kv_store", tmp_path / "signed_kv")
    sign_bundle(bundle, key)
    return bundle


async def create_and_invite(node: Node, bundle: Path) -> tuple[bytes, bytes, str]:
    """(app id, context id, invitation) for a new context of the bundle at `bundle`."""
    record = await node.applications.install(str(bundle))
    context = (await node.contexts.create(record.application_id, None)).context_id
    return record.application_id, context, await node.joins.invite(context)


async def joined(cluster: Cluster, context: bytes) -> None:
    await cluster.wait_mesh(topic_for(context))
    await wait_converged(cluster, cluster.nodes, context)


async def test_joiner_fetches_an_app_signed_by_a_trusted_signer_and_calls_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=trusting) as cluster:
        a, b = cluster.nodes
        app_id, context, text = await create_and_invite(a, signed_kv(tmp_path))
        served = await a.applications.get(app_id)
        assert served.bundle_blob_id is not None
        assert served.signer == SIGNER.public_key.data
        info = await a.blobs.info(served.bundle_blob_id)
        assert info is not None
        assert info.pinned  # kept while installed, whatever GC finds
        with pytest.raises(ContextError):
            await b.applications.get(app_id)
        await b.joins.join(text)
        record = await b.applications.get(app_id)
        assert record.signer == SIGNER.public_key.data
        assert record.bundle_blob_id == served.bundle_blob_id
        # Straight away: B runs the app it just fetched, and its writes reach A.
        await write(b, context, "set", key="from-b", value="1")
        await joined(cluster, context)
        assert await call(a, context, "get", key="from-b") == "1"
        # B now serves the bundle to later joiners: it is pinned and linked to the context.
        got = await b.blobs.info(served.bundle_blob_id)
        assert got is not None
        assert got.pinned
        assert context in got.contexts


async def test_unsigned_app_is_refused_with_one_line_then_accepted_with_trust_app(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path) as cluster:
        a, b = cluster.nodes
        app_id, context, text = await create_and_invite(a, APPS / "kv_store")
        with pytest.raises(AppNotTrustedError) as refused:
            await b.joins.join(text)
        message = str(refused.value)
        assert "\n" not in message
        assert message == (
            f"app {b58(app_id)} (kv_store v0.1.0, unsigned) is not trusted: "
            f"pass --trust-app {b58(app_id)} to run it"
        )
        # Refused before any network: nothing fetched, the invitation is still good.
        assert metric(b, "trionode_blob_chunks_fetched_total") == 0
        assert context not in b.contexts.known_ids()
        with pytest.raises(AppNotTrustedError):  # another app id is no consent to this one
            await b.joins.join(text, trust_app=b"\x07" * 32)
        await b.joins.join(text, trust_app=app_id)
        assert (await b.applications.get(app_id)).signer is None
        await write(b, context, "set", key="k", value="v")
        await joined(cluster, context)
        assert await call(a, context, "get", key="k") == "v"


async def test_untrusted_signer_is_named_in_the_refusal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path) as cluster:  # nobody trusts SIGNER
        a, b = cluster.nodes
        app_id, _, text = await create_and_invite(a, signed_kv(tmp_path))
        with pytest.raises(AppNotTrustedError) as refused:
            await b.joins.join(text)
        signer = signer_id(SIGNER)
        assert str(refused.value) == (
            f"app {b58(app_id)} (kv_store v0.1.0, signer {signer}) is not trusted: "
            f"pass --trust-app {b58(app_id)} or add {signer} to apps.trusted_signers"
        )


async def test_a_bundle_changed_after_signing_is_refused_before_it_runs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=trusting) as cluster:
        a, b = cluster.nodes
        bundle = signed_kv(tmp_path)
        app_id, context, _ = await create_and_invite(a, bundle)
        # A serves a bundle whose bytes changed after signing (same manifest, signature
        # and name; one file edited), as a compromised or broken inviter would.
        module = bundle / "kv_store.py"
        module.write_text(module.read_text() + "\nTAMPERED = True\n")
        tampered = pack_bundle(load_bundle(bundle))
        blob = await a.blobs.add_bytes(tampered)
        record = await a.applications.get(app_id)
        await a.store.put(
            APPLICATIONS, app_id, msgspec.structs.replace(record, bundle_blob_id=blob.blob_id)
        )
        text = await a.joins.invite(context)
        with pytest.raises(AppBundleRefusedError, match="changed after signing") as refused:
            await b.joins.join(text)
        assert "\n" not in str(refused.value)
        assert await b.blobs.info(blob.blob_id) is None  # not kept, never served on
        assert context not in b.contexts.known_ids()
        with pytest.raises(ContextError):
            await b.applications.get(app_id)
        # The invitation was not spent: A still lists one member.
        assert len(await a.contexts.roles(context)) == 1


async def test_invited_fetch_serves_only_the_bundle_to_a_valid_invitation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path) as cluster:
        a, b = cluster.nodes
        app_id, context, text = await create_and_invite(a, APPS / "kv_store")
        bundle_blob = (await a.applications.get(app_id)).bundle_blob_id
        assert bundle_blob is not None
        other = await a.blobs.add_bytes(b"context data", context_id=context)
        signed, invitation = inv.parse_invitation(text)
        key = Ed25519PrivateKey.generate()
        conn = b.host.connections[a.host.peer_id]

        async def first_answer(message: BlobOpen | InvitedOpen) -> object:
            _, stream = await b.host.new_stream(a.host.peer_id, [BLOB_PROTOCOL])
            async with stream:
                channel = _Channel(stream)
                await channel.send(message)
                return await channel.receive()

        opener = invited_opener(signed, invitation.id, key)
        good = await opener(conn, bundle_blob)
        assert isinstance(good, InvitedOpen)
        answer = await first_answer(good)
        assert not isinstance(answer, BlobRefused)
        refusals = [
            # Any other blob of the context, even with a valid invitation.
            await opener(conn, other.blob_id),
            # A proof made for another session.
            msgspec.structs.replace(good, proof=key.sign(b"elsewhere")),
            # The invitation without its one-time secret.
            msgspec.structs.replace(
                good,
                invitation=inv.encode_signed(msgspec.structs.replace(signed, secret=None)),
            ),
            # Not an invitation at all.
            msgspec.structs.replace(good, invitation=b"\x93garbage"),
        ]
        for message in refusals:
            assert await first_answer(message) == BlobRefused(message="not available")
        assert metric(a, "trionode_blob_streams_refused_total") == len(refusals)


async def test_a_member_without_the_app_gets_it_from_other_members(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """`ensure_app_bundle` with the membership proof (what a context upgrade uses)."""
    async with open_cluster(2, tmp_path, configure=trusting) as cluster:
        a, b = cluster.nodes
        app_id, context, text = await create_and_invite(a, signed_kv(tmp_path))
        await b.joins.join(text)
        await joined(cluster, context)
        bundles = b.app_bundles
        ref = await bundles.ref(app_id)
        assert ref is not None
        await b.applications.uninstall(app_id)
        await b.blobs.delete(ref.bundle_blob_id)
        record = await bundles.ensure_app_bundle(ref, context_id=context)
        assert record.application_id == app_id
        assert await b.blobs.has(ref.bundle_blob_id)


@pytest.mark.real_network
@pytest.mark.parametrize(
    ("trust_app", "reason"),
    # (the request schema refuses what is not a base58 id of 32 bytes: trionode/schemas.py)
    [
        (5, "body.trustApp"),
        ("0OIl", "body.trustApp: Expected `str` that is a base58 id"),
        ("abc", "body.trustApp: Expected `str` that is a base58 id"),
    ],
)
async def test_join_api_refuses_a_bad_trust_app_with_400(
    tmp_path: Path, trust_app: object, reason: str
) -> None:
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "n") as node, node.client() as client:
            body = {"invitation": "trinv1xyz", "trustApp": trust_app}
            with pytest.raises(ApiError) as refused:
                await client.request("POST", "/admin-api/contexts/join", json=body)
            assert refused.value.status == 400
            assert reason in str(refused.value)


def _second_read_only() -> Callable[[FileConfig], FileConfig]:
    modes = iter(["read-write", "read-only"])

    def configure(file: FileConfig) -> FileConfig:
        node = msgspec.structs.replace(file.node, mode=next(modes))
        return msgspec.structs.replace(file, node=node)

    return configure


async def test_a_read_only_node_installs_and_fetches_apps(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Installing code stays allowed on a read-only node: one it installs itself is not
    stored as a blob (it adds no blobs), one it fetches to join is kept and pinned."""
    async with open_cluster(2, tmp_path, configure=_second_read_only()) as cluster:
        a, mirror = cluster.nodes
        local = await mirror.applications.install(str(APPS / "chat"))
        assert local.bundle_blob_id is None
        app_id, context, text = await create_and_invite(a, APPS / "kv_store")
        await mirror.joins.join(text, trust_app=app_id)
        record = await mirror.applications.get(app_id)
        assert record.bundle_blob_id is not None
        info = await mirror.blobs.info(record.bundle_blob_id)
        assert info is not None
        assert info.pinned
        await write(a, context, "set", key="k", value="v")
        await joined(cluster, context)
        assert await call(mirror, context, "get", key="k") == "v"
