"""`/trionode/blob/1` between in-process nodes: members fetch, strangers learn nothing,
corrupt peers are dropped, interrupted fetches resume from what they verified."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
from base58 import b58encode
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.replication.cluster_helpers import install, metric, share
from trionode.blobs.protocol import (
    BLOB_PROTOCOL,
    BlobManifest,
    BlobOpen,
    BlobRefused,
    auth_message,
)
from trionode.blobs.transfer import BlobUnavailableError, _Channel
from trionode.context.events import Notice, Replay
from trionode.context.manager import ContextError
from trionode.node import Node
from trionode.testing import Cluster, open_cluster

MiB = 1024 * 1024


async def read(node: Node, blob_id: bytes) -> bytes:
    return b"".join([p async for p in await node.blobs.read(blob_id)])


async def test_member_fetches_with_progress_and_bytes_match(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = os.urandom(5 * MiB + 123)
    async with open_cluster(2, tmp_path) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])
        info = await a.blobs.add_bytes(data, context_id=context)
        sub = b.hub.open()
        b.hub.add_contexts(sub, [base58(context)], None)
        got = await b.blob_transfer.fetch(info.blob_id, context)
        assert got.blob_id == info.blob_id
        assert got.contexts == [context]
        assert await read(b, info.blob_id) == data
        assert metric(b, "trionode_blob_chunks_fetched_total") == 6
        notices = []
        while True:
            try:
                notices.append(sub.receive.receive_nowait())
            except trio.WouldBlock:
                break
        answer, *notices = notices  # the subscribe's answer comes first, through the queue
        assert isinstance(answer, Replay)
        assert all(isinstance(n, Notice) for n in notices)
        last = notices[-1]
        assert isinstance(last, Notice)
        assert last.to_json()["complete"] is True
        assert last.to_json()["blobId"] == base58(info.blob_id)
        # Fetching again is a no-op.
        await b.blob_transfer.fetch(info.blob_id, context)
        assert metric(b, "trionode_blob_chunks_fetched_total") == 6


def base58(raw: bytes) -> str:
    return b58encode(raw).decode()


def proof(
    cluster: Cluster, signer: int, server: int, context: bytes, key: Ed25519PrivateKey
) -> tuple[bytes, bytes]:
    """(member, signature) for the connection signer → server."""
    conn = cluster.nodes[signer].host.connections[cluster.nodes[server].host.peer_id]
    member = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return member, key.sign(auth_message(conn.noise.remote.handshake_hash, context))


async def ask(cluster: Cluster, asker: int, server: int, opening: BlobOpen) -> object:
    _, stream = await cluster.nodes[asker].host.new_stream(
        cluster.nodes[server].host.peer_id, [BLOB_PROTOCOL]
    )
    async with stream:
        channel = _Channel(stream)
        await channel.send(opening)
        return await channel.receive()


async def test_non_member_is_refused_and_learns_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(3, tmp_path) as cluster:
        a, b, c = cluster.nodes
        context = await share(cluster, [0, 1])
        await install(c, "kv_store")
        info = await a.blobs.add_bytes(os.urandom(3 * MiB), context_id=context)
        # The stranger's own node refuses to try (it holds no member key) ...
        with pytest.raises(ContextError):
            await c.blob_transfer.fetch(info.blob_id, context)
        # ... and speaking the protocol with any key gets the same answer whether the blob
        # exists or not.
        stranger = proof(cluster, 2, 0, context, Ed25519PrivateKey.generate())
        existing = await ask(cluster, 2, 0, BlobOpen(context, *stranger, info.blob_id))
        absent = await ask(cluster, 2, 0, BlobOpen(context, *stranger, os.urandom(32)))
        assert existing == absent == BlobRefused(message="not available")
        # A member's proof for its own connection, replayed by the stranger on another one,
        # does not work either.
        _, key = await b.contexts.member_key(context)
        members_proof = proof(cluster, 1, 0, context, key)
        replayed = await ask(cluster, 2, 0, BlobOpen(context, *members_proof, info.blob_id))
        assert replayed == BlobRefused(message="not available")
        assert metric(a, "trionode_blob_streams_refused_total") == 3
        # The member itself gets the manifest.
        ok = await ask(cluster, 1, 0, BlobOpen(context, *members_proof, info.blob_id))
        assert isinstance(ok, BlobManifest)


async def test_corrupt_chunks_are_refused_and_the_peer_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = os.urandom(6 * MiB)
    async with open_cluster(3, tmp_path) as cluster:
        a, b, c = cluster.nodes
        context = await share(cluster, [0, 1, 2])
        info = await a.blobs.add_bytes(data, context_id=context)
        await c.blob_transfer.fetch(info.blob_id, context)
        # Node A turns malicious: every chunk it serves is flipped.
        honest = a.blobs.read_chunk

        async def lying(digest: bytes) -> bytes | None:
            chunk = await honest(digest)
            return None if chunk is None else bytes([chunk[0] ^ 1]) + chunk[1:]

        a.blobs.read_chunk = lying  # type: ignore[method-assign]
        got = await b.blob_transfer.fetch(info.blob_id, context)
        assert await read(b, got.blob_id) == data
        assert metric(b, "trionode_blob_bad_peers_total", reason="bad_chunk") == 1
        assert a.host.peer_id not in b.host.connections  # disconnected
        # Nothing corrupt was kept: every chunk B holds verifies.
        manifest = await b.blobs.manifest(info.blob_id)
        assert manifest is not None
        assert await b.blobs.missing_chunks(manifest) == []


async def test_interrupted_fetch_resumes_from_verified_chunks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = os.urandom(8 * MiB)
    async with open_cluster(2, tmp_path) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])
        info = await a.blobs.add_bytes(data, context_id=context)
        honest = a.blobs.read_chunk
        served = 0

        async def dies_after_three(digest: bytes) -> bytes | None:
            nonlocal served
            served += 1
            if served > 3:
                raise trio.BrokenResourceError("server went away")
            return await honest(digest)

        a.blobs.read_chunk = dies_after_three  # type: ignore[method-assign]
        with pytest.raises(BlobUnavailableError, match="3 chunks kept"):
            await b.blob_transfer.fetch(info.blob_id, context)
        assert not await b.blobs.has(info.blob_id)
        a.blobs.read_chunk = honest  # type: ignore[method-assign]
        await b.blob_transfer.fetch(info.blob_id, context)
        assert await read(b, info.blob_id) == data
        # Only the 5 missing chunks were fetched the second time.
        assert metric(b, "trionode_blob_chunks_fetched_total") == 8


async def test_chunks_come_from_several_peers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = os.urandom(12 * MiB)
    async with open_cluster(4, tmp_path) as cluster:
        context = await share(cluster, [0, 1, 2, 3])
        a, b, c, d = cluster.nodes
        info = await a.blobs.add_bytes(data, context_id=context)
        await b.blob_transfer.fetch(info.blob_id, context)
        await c.blob_transfer.fetch(info.blob_id, context)
        before = [metric(n, "trionode_blob_chunks_served_total") for n in (a, b, c)]
        await d.blob_transfer.fetch(info.blob_id, context)
        assert await read(d, info.blob_id) == data
        after = [metric(n, "trionode_blob_chunks_served_total") for n in (a, b, c)]
        shares = [x - y for x, y in zip(after, before, strict=True)]
        # D's 12 chunks came from all three holders at once, each exactly once.
        assert sum(shares) == 12
        assert all(share > 0 for share in shares)


async def test_node_gc_pass_includes_blobs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(1, tmp_path) as cluster:
        node = cluster.nodes[0]
        await node.blobs.add_bytes(b"unreferenced")
        result = await node.collect_garbage()
        assert result["blobsRemoved"] == 0  # marked now, removed after gc.blob_retention
        assert {"tombstonesRemoved", "blobChunksRemoved", "blobPartialsRemoved"} <= set(result)
        assert metric(node, "trionode_gc_runs_total") == 1
