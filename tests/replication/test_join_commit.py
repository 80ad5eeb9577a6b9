"""A join records what it joined in one commit: the context, its keys, the snapshot's
marker and the inviter as a member peer (`JoinService._join`). A disk that fails that
commit leaves none of them: no marker or member-peer row without the context."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.replication.test_sync_protocols import LIMIT, create, install
from trionode.context.snapshot import load_progress
from trionode.errors import StorageError
from trionode.net.member_peers import MEMBER_PEERS, PREFIX
from trionode.store.lmdb_store import Column, Put, WriteOp
from trionode.store.store import WriteBatch
from trionode.testing import open_cluster


async def test_a_failed_commit_of_the_joined_context_leaves_no_marker_nor_member_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context = await create(a)
            await install(b)
            text = await a.joins.invite(context)
            write = b.store.write

            async def failing(
                batch: WriteBatch | Sequence[WriteOp], *, settle: bool = True
            ) -> None:
                ops = batch.ops if isinstance(batch, WriteBatch) else batch
                if any(isinstance(op, Put) and op.column is Column.IDENTITY for op in ops):
                    raise StorageError("disk full")  # (the commit that holds the member key)
                await write(batch, settle=settle)

            monkeypatch.setattr(b.store, "write", failing)
            with pytest.raises(StorageError):
                await b.joins.join(text)
            monkeypatch.undo()
            assert context not in b.contexts.known_ids()
            assert await load_progress(b.store, context) is None
            assert await b.store.get(MEMBER_PEERS, PREFIX + a.host.peer_id.multihash) is None
