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
from trionode.context.final_state import FinalSlot
from trionode.crdt import encode_entity
from trionode.testing import open_cluster


async def test_a_join_completes_when_preparing_outlasts_the_deadline_between_messages(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    between = FileConfig().network.stream_idle_timeout
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await share(cluster, [0])
            for i in range(40):
                await put(a, context, f"k{i:03}")
            await fold_now(cluster)
            original = a.contexts.snapshot_first_page

            async def slow(*args: Any) -> Any:
                # Preparing the final state outlasts the joiner's wait between messages
                # three times over.
                await trio.sleep(3 * between)
                return await original(*args)

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
