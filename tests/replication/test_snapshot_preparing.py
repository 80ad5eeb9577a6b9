"""A snapshot whose final state takes long to prepare, and the final state kept current
(trionode/context/final_state.py, issue 17).

Before its first page a member may have to build its final state (a decode of every base
row: tens of seconds for a million entries). It tells the joiner to keep waiting meanwhile
(`SnapshotWait`), so the join completes however long that takes; before, the joiner's
deadline between messages cut the stream and every retry failed the same way. Once built,
the final state follows every fold instead of being rebuilt per snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

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
from trionode.config import FileConfig
from trionode.context.final_state import FinalSlot, final_state
from trionode.context.folding import fold_all
from trionode.context.snapshot_state import SnapshotStream
from trionode.crdt import encode_entity
from trionode.sync.driver import SyncServer
from trionode.testing import Cluster, open_cluster


async def test_a_join_completes_when_preparing_outlasts_the_deadline_between_messages(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    between = FileConfig().network.stream_idle_timeout
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await _folded_member(cluster)
            original = a.contexts.snapshot_first_page

            async def slow(*args: Any, **kwargs: Any) -> Any:
                # Preparing the final state outlasts the joiner's wait between messages
                # three times over.
                await trio.sleep(3 * between)
                return await original(*args, **kwargs)

            monkeypatch.setattr(a.contexts, "snapshot_first_page", slow)
            await install(c)
            await c.joins.join(await a.joins.invite(context))
            await converged(cluster, [a, c], context)
            assert sessions(c, "snapshot") == 1
            assert sessions(c, "snapshot", "failed") == 0
            assert len(await entries(c, context)) == 40


async def test_the_final_state_follows_folding_and_pages_are_the_stored_rows(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(1, tmp_path, configure=folding) as cluster:
            (a,) = cluster
            context = await share(cluster, [0])
            for i in range(30):
                await put(a, context, f"k{i:03}")
            await fold_now(cluster)
            replica = await a.contexts.replica(context)
            first = await _served(a, context)
            assert replica.final.builds == 1
            for round_ in range(3):
                for i in range(20):
                    await put(a, context, f"r{round_}-{i:03}", "w" * i)
                await fold_now(cluster)
                kept = await _served(a, context)
                assert replica.final.builds == 1  # followed the folds, never rebuilt
                assert kept != first
                # The same as a final state built from scratch out of the rows now.
                replica.final = FinalSlot()
                assert await _served(a, context) == kept
                assert replica.final.builds == 1


async def test_a_view_hashed_beside_its_stream_is_kept_as_the_final_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A fresh snapshot of a member whose final state was not built hashes nothing (it
    sends no root); one resumed after its cursor by its heads hashes the view it serves
    (snapshot_state.SnapshotState.hash_view) to send its root; that tree is then kept as
    the final state, with what was folded since the view opened joined in, so the next
    snapshot announces its root at once instead of hashing every record again. Kept or
    built from the rows, it is the same state."""
    with trio.fail_after(LIMIT):
        async with open_cluster(1, tmp_path, configure=folding) as cluster:
            (a,) = cluster
            context = await share(cluster, [0])
            for i in range(30):
                await put(a, context, f"k{i:03}")
            await fold_now(cluster)
            replica = await a.contexts.replica(context)
            before = await _served(a, context)
            replica.final = FinalSlot()  # (not built: as after a restart)
            fresh = SnapshotStream()
            _, after, first = await a.contexts.snapshot_first_page(
                context, None, None, 3, 1 << 20, stream=fresh
            )
            assert first.root_hash is None
            assert after is not None
            assert not fresh.needs_hashing  # a fresh stream sends no root
            fresh.close()
            stream = SnapshotStream()
            _, _, begin = await a.contexts.snapshot_first_page(
                context, after, None, 3, 1 << 20, stream=stream, resume_heads=first.heads
            )
            assert (begin.root_hash, begin.cursor) == (None, after)  # hashed beside the stream
            assert stream.needs_hashing
            for i in range(20):  # folded after the view opened: not in what it serves
                await put(a, context, f"k{i * 2:03}", "changed")
                await put(a, context, f"new{i:03}")
            await fold_now(cluster)
            await a.contexts.snapshot_hash_view(context, stream)
            stream.close()
            assert stream.root == before[0]
            assert replica.final.state is not None
            kept = await _served(a, context)
            assert replica.final.builds == 0
            assert kept != before
            assert len(kept[1]) >= len(before[1]) + 20
            replica.final = FinalSlot()
            assert await _served(a, context) == kept
            assert replica.final.builds == 1


async def _folded_member(cluster: Cluster) -> bytes:
    """A context of the first node alone, with 40 entries written and folded."""
    a = cluster[0]
    context = await share(cluster, [0])
    for i in range(40):
        await put(a, context, f"k{i:03}")
    await fold_now(cluster)
    return context


async def _served(node: Any, context: bytes) -> tuple[bytes, list[bytes]]:
    """(final root, every record) as a snapshot serves them, page by page (3 records a
    page); the records must be the final tree's, in id order."""
    records, cursor, begin = await node.contexts.snapshot_first_page(
        context, None, None, 3, 1 << 20
    )
    while cursor is not None:
        more, cursor, _, root = await node.contexts.snapshot_page(context, cursor, 3, 1 << 20)
        assert root == begin.root_hash
        records += more
    replica = await node.contexts.replica(context)
    tree = replica.final.state.tree
    assert records == [encode_entity(e) for e in tree.entities()]
    assert tree.root_hash() == begin.root_hash
    assert begin.entries == len(records)
    return begin.root_hash, records


@pytest.mark.parametrize("built", [True, False])
async def test_folding_during_a_snapshot_does_not_change_what_it_serves(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    built: bool,
) -> None:
    """The member folds while a snapshot streams: new base rows land among the pages still
    to come. Every page comes from the view of the first (trionode/context/final_state.py),
    so the pages add up to the root announced before them (or, when the member's final
    state was not `built`, to the root of that view hashed beside the stream and sent with
    a later page) and the snapshot is taken in one go. Before, later pages carried the new
    rows, the joiner's root check failed, and the snapshot was refused and started over.
    (Not built, a fresh stream sends no root: the joiner's state must be the view's all
    the same, as the tree comparison afterwards shows.)"""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await _folded_member(cluster)
            for i in range(30):  # final, not yet folded: folded mid-stream below
                await put(a, context, f"late{i:03}", "w")
            for i in range(10):  # rows already served or still to come change too
                await put(a, context, f"k{i * 4:03}", "changed")
            await trio.sleep(3)  # acks go round: final
            await cluster.settle()
            c.sync.snapshot_page_records = 8  # several pages
            replica = await a.contexts.replica(context)
            if built:
                await final_state(a.contexts.replicas, replica)
            assert (replica.final.state is not None) == built
            original = SyncServer._read_snapshot_page
            served: list[int] = []

            async def folding_meanwhile(*args: Any) -> Any:
                page = await original(*args)
                served.append(len(page[0]))
                if len(served) == 2:
                    replica = await a.contexts.replica(context)
                    base = len(replica.final.state.tree) if replica.final.state else 0
                    folded = await fold_all(a.contexts.replicas, retention=0.0, max_batch=1024)
                    assert folded >= 40
                    # (Unbuilt, it may be kept already: the hashing read ran ahead.)
                    assert replica.final.state is not None or not built
                    if replica.final.state is not None:
                        assert len(replica.final.state.tree) >= base + 30
                return page

            monkeypatch.setattr(SyncServer, "_read_snapshot_page", folding_meanwhile)
            await install(c)
            await c.joins.join(await a.joins.invite(context))
            monkeypatch.undo()
            assert len(served) >= 5  # the fold came after the second of many pages
            # Built before it, the final state was brought up to date with the fold: the
            # same as one built from the rows now. Not built, the fresh stream hashed
            # nothing and it is still not built.
            assert (replica.final.state is not None) == built
            adopted = await _served(a, context)
            assert replica.final.builds == 1
            replica.final = FinalSlot()
            assert await _served(a, context) == adopted
            # The deltas folded mid-stream came after the snapshot's boundary, and their
            # bodies are gone: the next sessions bring their records as final state.
            for _ in range(3):
                await c.sync.sync_now(context, cluster.peer_ids[0])
            await converged(cluster, [a, c], context)
            # Taken once, its root check passed (its tail was folded: "partial"), and a
            # tree comparison brought the rest.
            assert sessions(c, "snapshot", "failed") == 0
            assert sessions(c, "snapshot", "partial") == 1
            assert sessions(c, "tree") >= 1
            ours = await entries(c, context)
            assert len(ours) == 70
            assert ours == await entries(a, context)
            assert ours["k036"] == "changed"
            assert not (await a.contexts.replica(context)).final.views  # every view closed
