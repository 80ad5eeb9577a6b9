"""Joins at transport speed, end to end. A joiner keeps the records a snapshot brings as
their rows until something reads them (`trionode.crdt.lazy`): the snapshot's root is
checked over those bytes; a value no reader can decode is refused to the call that reads
it, with a typed error, while every other entry reads as usual and the replica stays as
the member's. A member whose final state is not built streams at once and hashes nothing
(`trionode.sync.snapshot`, "Root last, or none"), unless the stream resumed after a cut,
whose root comes later; a root the pages do not hash to is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from tests.replication.test_sync_protocols import (
    LIMIT,
    converged,
    create,
    entries,
    fold_now,
    folding,
    join,
    put,
    sessions,
)
from trionode.context import snapshot_state
from trionode.context.final_state import final_state
from trionode.context.snapshot import load_progress
from trionode.context.snapshot_state import SnapshotStream
from trionode.crdt import Entity, Kind, RegisterState, encode_entity
from trionode.crdt.lazy import RowEntity
from trionode.node import Node
from trionode.sdk.errors import StateSchemaError
from trionode.sync import driver
from trionode.sync.snapshot import RootMismatch
from trionode.testing import Cluster, open_cluster


async def folded(cluster: Cluster, entries_: int) -> bytes:
    """A context on node 0 with `entries_` entries, final and folded."""
    context = await create(cluster[0])
    for i in range(entries_):
        await put(cluster[0], context, f"k{i:02}")
    await fold_now(cluster)
    return context


async def get(node: Node, context: bytes, key: str) -> object:
    return (await node.contexts.execute(context, "get", json.dumps({"key": key}))).result


async def test_a_value_no_reader_decodes_is_refused_at_its_first_read_and_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await folded(cluster, 20)
            # The member holds (as a hostile member would serve) an entry whose value is
            # no msgpack at all: a well-formed register row around it.
            replica = await a.contexts.replica(context)
            template = next(e for e in replica.tree.entities() if e.name == b"\xa3k07")
            assert isinstance(template.body, RegisterState)
            stamp = template.body.stamp
            bad = Entity(
                template.parent,
                b"\xa3bad",
                Kind.REGISTER,
                added=stamp,
                body=RegisterState(stamp, b"\xc1"),
            )
            await a.contexts.store_snapshot_batch(context, [bad], [encode_entity(bad)])

            await join(cluster, 0, 1, context)
            assert sessions(c, "snapshot") == 1
            await converged(cluster, [a, c], context)
            # Taken as bytes, checked against the member's root over them, and not decoded.
            held = (await c.contexts.replica(context)).tree
            rows = [e for e in held.entities() if isinstance(e, RowEntity) and e.row is not None]
            assert len(rows) >= 20
            assert bad.id in {e.id for e in rows}

            with pytest.raises(StateSchemaError, match="not a valid"):
                await get(c, context, "bad")
            assert await get(c, context, "k07") == "v"
            assert await get(c, context, "k13") == "v"
            with pytest.raises(StateSchemaError):
                await entries(c, context)  # (a read of every value reads the bad one too)
            # The replica is unchanged by the refusals: same root as the member, and
            # writes go on.
            await put(c, context, "after")
            await converged(cluster, [a, c], context)
            assert await get(a, context, "after") == "v"


async def test_a_member_streams_before_its_final_state_is_built_and_hashes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The member's first snapshot since it loaded the context does not wait for its final
    state to be built: pages go at once, and nothing is hashed (a fresh stream sends no
    root); the joiner ends with the member's state and root."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await folded(cluster, 40)
            replica = await a.contexts.replica(context)
            assert replica.final.state is None
            c.sync.snapshot_page_records = 8  # several pages
            await join(cluster, 0, 1, context)
            assert sessions(c, "snapshot") == 1
            await converged(cluster, [a, c], context)
            assert await entries(c, context) == await entries(a, context)
            assert replica.final.builds == 0  # never built for it
            assert replica.final.state is None  # nor hashed beside the stream
            assert not replica.final.views  # the view closed with the stream
            ours, _, _ = await c.contexts.state(context)
            assert ours == (await a.contexts.state(context))[0]


async def test_a_root_the_pages_do_not_hash_to_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member whose final state is not built may still announce a root (one whose state
    is built does, and an older member sent one last): the joiner checks it, and a forged
    one refuses the snapshot and discards what it brought."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await folded(cluster, 20)
            assert (await a.contexts.replica(context)).final.state is None
            first_page = a.contexts.snapshot_first_page

            async def forging(*args: Any, **kwargs: Any) -> Any:
                records, after, begin = await first_page(*args, **kwargs)
                return records, after, msgspec.structs.replace(begin, root_hash=bytes(32))

            monkeypatch.setattr(a.contexts, "snapshot_first_page", forging)
            await join(cluster, 0, 1, context)  # the join succeeds; its snapshot does not
            assert sessions(c, "snapshot", "failed") == 1
            assert await c.contexts.is_fresh(context)
            monkeypatch.undo()
            await c.sync.sync_now(context, cluster.peer_ids[0])
            await converged(cluster, [a, c], context)
            assert await entries(c, context) == await entries(a, context)


async def test_a_record_whose_parent_the_state_lacks_travels_hidden_and_the_join_succeeds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Honest final state can hold a record whose parent it lacks: a member's write into a
    container a concurrently removed member created stays valid when the creator's write is
    filtered (auth case (e)), and child ids are derived from the parent's, so a later write
    creating that parent shows the child again on every member. Refusing such a snapshot
    would stop every join of that context for good; it travels, hidden as on the member,
    under no hash (the root covers only what is visible)."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await folded(cluster, 20)
            replica = await a.contexts.replica(context)
            template = next(e for e in replica.tree.entities() if e.name == b"\xa3k07")
            orphan = Entity(b"\x07" * 32, template.name, template.kind)
            orphan.body, orphan.added = template.copy().body, template.added
            await a.contexts.store_snapshot_batch(context, [orphan], [encode_entity(orphan)])

            await join(cluster, 0, 1, context)
            assert sessions(c, "snapshot", "ok") == 1
            await converged(cluster, [a, c], context)
            assert (await c.contexts.state(context))[0] == (await a.contexts.state(context))[0]
            assert await entries(c, context) == await entries(a, context)
            joined = await c.contexts.replica(context)
            assert orphan.id in {e.id for e in joined.tree.entities()}


async def test_a_member_streaming_before_its_state_is_built_reads_its_rows_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read that hashes the member's state beside the stream is also what the stream
    sends: every record is read from the store once (the first page, then the hashing
    read), not once to hash and once more to send."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await folded(cluster, 40)
            read: list[int] = []
            sent: list[int] = []

            def counting(owner: Any, name: str, counts: list[int]) -> None:
                original = getattr(owner, name)

                async def counted(*args: Any, **kwargs: Any) -> Any:
                    result = await original(*args, **kwargs)
                    counts.append(len(result[0]))
                    return result

                monkeypatch.setattr(owner, name, counted)

            counting(a.contexts.serving, "snapshot_view_page", read)
            counting(a.contexts, "snapshot_first_page", sent)
            counting(a.contexts, "snapshot_next_page", sent)
            c.sync.snapshot_page_records = 8  # several pages
            await join(cluster, 0, 1, context)
            assert sessions(c, "snapshot") == 1
            await converged(cluster, [a, c], context)
            assert len(sent) >= 5
            assert read[0] == 8  # the first page
            assert sum(read) == sum(sent)  # then the rest, once
            assert await entries(c, context) == await entries(a, context)


@pytest.mark.parametrize("built", [True, False])
async def test_a_member_starts_its_stream_with_small_pages_and_the_joiner_takes_them(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    built: bool,
) -> None:
    """A member serves its first pages smaller than the joiner asked for (so the joiner
    has rows to store while the rest is read), then full ones. The joiner takes the mixed
    sizes like any others and ends with the member's state and root: checked against the
    root the member announced when its state was `built`, hashed from the rows otherwise."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await folded(cluster, 40)
            replica = await a.contexts.replica(context)
            if built:
                await final_state(a.contexts.replicas, replica)
            assert (replica.final.state is not None) == built
            monkeypatch.setattr(driver, "SNAPSHOT_FIRST_PAGES", (2, 5))
            sent: list[int] = []
            for name in ("snapshot_first_page", "snapshot_next_page"):

                def counting(original: Any) -> Any:
                    async def counted(*args: Any, **kwargs: Any) -> Any:
                        result = await original(*args, **kwargs)
                        sent.append(len(result[0]))
                        return result

                    return counted

                monkeypatch.setattr(a.contexts, name, counting(getattr(a.contexts, name)))
            c.sync.snapshot_page_records = 8  # several pages
            await join(cluster, 0, 1, context)
            assert sessions(c, "snapshot") == 1
            assert sessions(c, "snapshot", "failed") == 0
            assert sent[:3] == [2, 5, 8]  # small first, then what the joiner asked for
            assert sum(sent) == len(await entries(a, context))  # every row, once
            await converged(cluster, [a, c], context)
            assert await entries(c, context) == await entries(a, context)
            ours, _, _ = await c.contexts.state(context)
            assert ours == (await a.contexts.state(context))[0]


@pytest.mark.parametrize("lying", [False, True])
async def test_a_stream_cut_before_its_late_root_resumes_after_its_cursor(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    lying: bool,
) -> None:
    """The member streams before its state is built, so no root comes with the fresh
    stream; the stream is cut after the first page is stored. The next session continues
    after that page (the boundary is the same), not from the first record; that one owes
    its root (hashed beside it, over every record: the pages before the cut too), and the
    joiner ends with the member's root. A `lying` member's resumed root is refused (the
    state it brought discarded), and the next snapshot starts over."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await folded(cluster, 40)
            assert (await a.contexts.replica(context)).final.state is None
            c.sync.snapshot_page_records = 8
            c.sync.snapshot_batch_bytes = 1  # a batch (a write with its marker) per page
            # The member's hashing read a page at a time, at most a page ahead: its root
            # is known only once the stream is nearly done.
            monkeypatch.setattr(snapshot_state, "BUILD_ROWS", 8)
            monkeypatch.setattr(snapshot_state, "AHEAD_RECORDS", 8)
            original = c.contexts.store_snapshot_batch
            stored: list[int] = []

            async def cut_at_the_second(
                context_id: bytes, entities: Any, records: Any, **kwargs: Any
            ) -> int | None:
                if len(stored) == 1:
                    stored.append(-1)
                    raise trio.BrokenResourceError("the stream broke")
                stored.append(len(entities))
                return await original(context_id, entities, records, **kwargs)

            monkeypatch.setattr(c.contexts, "store_snapshot_batch", cut_at_the_second)
            first_page = a.contexts.snapshot_first_page
            began: list[bytes | None] = []

            async def beginning(*args: Any, **kwargs: Any) -> Any:
                records, after, begin = await first_page(*args, **kwargs)
                began.append(begin.cursor)
                return records, after, begin

            monkeypatch.setattr(a.contexts, "snapshot_first_page", beginning)
            if lying:
                hash_view = a.contexts.snapshot_hash_view

                async def forging(context_id: bytes, stream: SnapshotStream) -> None:
                    await hash_view(context_id, stream)
                    stream.root = bytes(32)

                monkeypatch.setattr(a.contexts, "snapshot_hash_view", forging)
            await join(cluster, 0, 1, context)
            assert sessions(c, "snapshot", "failed") == 1
            marker = await load_progress(c.contexts.store, context)
            assert marker is not None
            assert marker.cursor is not None
            assert marker.root_hash is None  # cut before the root was stored
            assert stored == [8, -1]
            if lying:
                with pytest.raises(RootMismatch):
                    await c.sync.sync_now(context, cluster.peer_ids[0])
            else:
                await c.sync.sync_now(context, cluster.peer_ids[0])
            assert sessions(c, "snapshot") == int(not lying)
            assert began == [None, marker.cursor]  # the second stream went on from there
            if lying:
                assert sessions(c, "snapshot", "failed") == 2
                assert await c.contexts.is_fresh(context)
                monkeypatch.undo()
                await c.sync.sync_now(context, cluster.peer_ids[0])
            else:
                assert sum(stored[2:]) + 8 == len(await entries(c, context))  # each once
            await converged(cluster, [a, c], context)
            assert await entries(c, context) == await entries(a, context)
