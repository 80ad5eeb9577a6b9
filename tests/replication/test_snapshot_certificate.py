"""A streamed snapshot's checks on a real cluster (trionode/sync/snapshot.py,
local-first-auth.md §5.5): the joiner takes unsigned state only if the pages add up to the
announced final root and the finality certificate proves, under its own resolution of the
auth DAG, that the boundary is final. A responder that forges, trims or backdates the
certificate, or whose pages do not hash to the root, is refused: the session fails, the
state it brought is discarded, and the next honest snapshot starts clean.

A and B are admins (the AckSet); C joins through A, whose snapshot the tests tamper with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.replication.cluster_helpers import share
from tests.replication.test_sync_protocols import (
    LIMIT,
    converged,
    entries,
    fold_now,
    folding,
    install,
    put,
    sessions,
)
from trionode.auth.acks import sign_ack
from trionode.context import snapshot
from trionode.context.records import STATE
from trionode.node import Node
from trionode.testing import open_cluster
from trionode.wire.messages import SnapshotBegin


async def _run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tamper: Callable[[SnapshotBegin, bytes, Node], Any],
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=folding) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1], roles={1: "admin"})
            for i in range(30):
                await put(a if i % 2 else b, context, f"k{i:03}")
            await fold_now(cluster)
            original = a.contexts.snapshot_first_page

            async def tampered(
                *args: Any, **kwargs: Any
            ) -> tuple[list[bytes], bytes | None, SnapshotBegin]:
                records, next_cursor, begin = await original(*args, **kwargs)
                changed = await tamper(begin, context, b)
                return records, next_cursor, changed

            monkeypatch.setattr(a.contexts, "snapshot_first_page", tampered)
            await install(c)
            await c.joins.join(await a.joins.invite(context))
            assert sessions(c, "snapshot", "failed") == 1
            assert sessions(c, "snapshot") == 0
            # Nothing of the refused snapshot stays: no state, and the next one starts over.
            assert await c.contexts.is_fresh(context)
            assert len(await c.store.scan(STATE, prefix=context)) == 0
            progress = await snapshot.load_progress(c.store, context)
            assert progress is not None
            assert progress.heads is None
            assert progress.cursor is None

            monkeypatch.setattr(a.contexts, "snapshot_first_page", original)
            await c.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(c, "snapshot") == 1
            await converged(cluster, [a, b, c], context)
            assert len(await entries(c, context)) == 30


async def _forged(begin: SnapshotBegin, context: bytes, _b: Node) -> SnapshotBegin:
    """B's ack replaced by one that claims to be B's, signed by another key."""
    forger = Ed25519PrivateKey.generate()
    fake = sign_ack(forger, context, {}, 1)
    signed = msgspec.msgpack.decode(fake)
    body = msgspec.msgpack.decode(signed[0])
    b_key = (await _b.contexts.member_key(context))[0]
    body[2] = b_key
    forged = msgspec.msgpack.encode([msgspec.msgpack.encode(body), signed[1]])
    return msgspec.structs.replace(begin, certificate=[*begin.certificate, forged])


async def _trimmed(begin: SnapshotBegin, context: bytes, b: Node) -> SnapshotBegin:
    """B's entry left out: an AckSet member without an ack."""
    b_member = (await b.contexts.member_key(context))[0]
    kept = [e for e in begin.certificate if b_member not in e]
    assert len(kept) < len(begin.certificate)
    return msgspec.structs.replace(begin, certificate=kept)


async def _stale(begin: SnapshotBegin, context: bytes, b: Node) -> SnapshotBegin:
    """B's entry replaced by a real ack of B's that acknowledges nothing (an old one)."""
    b_member, b_key = await b.contexts.member_key(context)
    kept = [e for e in begin.certificate if b_member not in e]
    return msgspec.structs.replace(begin, certificate=[*kept, sign_ack(b_key, context, {}, 1)])


async def _wrong_root(begin: SnapshotBegin, _context: bytes, _b: Node) -> SnapshotBegin:
    return msgspec.structs.replace(begin, root_hash=bytes(32))


@pytest.mark.parametrize("tamper", [_forged, _trimmed, _stale, _wrong_root])
async def test_a_tampered_snapshot_is_refused_and_discarded(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    tamper: Callable[[SnapshotBegin, bytes, Node], Any],
) -> None:
    await _run(tmp_path, monkeypatch, tamper)


async def test_the_honest_certificate_proves_the_boundary_final(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The certificate A serves holds an entry of each AckSet member, and the joiner's
    final frontier from it covers every checkpoint of the boundary (and is kept as acks)."""
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=folding) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1], roles={1: "admin"})
            for i in range(10):
                await put(a if i % 2 else b, context, f"k{i:03}")
            await fold_now(cluster)
            _, _, begin = await a.contexts.snapshot_first_page(context, None, None, 100, 1 << 20)
            assert begin.heads
            assert len(begin.certificate) == 2
            await install(c)
            await c.joins.join(await a.joins.invite(context))
            assert sessions(c, "snapshot") == 1
            authority = (await c.contexts.replica(context)).authority
            members = {(await n.contexts.member_key(context))[0] for n in (a, b)}
            assert authority.finality().ack_set == members
            assert all(authority.finality().is_final(authority.vv_of(h) or {}) for h in begin.heads)
