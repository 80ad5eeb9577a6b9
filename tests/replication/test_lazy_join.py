"""Joins at transport speed, end to end. A joiner keeps the records a snapshot brings as
their rows until something reads them (`trionode.crdt.lazy`): the snapshot's root is
checked over those bytes; a value no reader can decode is refused to the call that reads
it, with a typed error, while every other entry reads as usual and the replica stays as
the member's. A member whose final state is not built streams at once and sends the root
later (`trionode.sync.snapshot`, "Root last"); a root the pages do not hash to is refused."""

from __future__ import annotations

import json
from pathlib import Path

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
from trionode.context.snapshot_state import SnapshotStream
from trionode.crdt import Entity, Kind, RegisterState, encode_entity
from trionode.crdt.lazy import RowEntity
from trionode.node import Node
from trionode.sdk.errors import StateSchemaError
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


async def test_a_member_streams_before_its_final_state_is_built_and_sends_the_root_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The member's first snapshot since it loaded the context does not wait for its final
    state to be built: pages go at once, the state is hashed beside them, the root follows
    with a later page, and the joiner ends with the member's root."""
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
            assert not replica.final.views  # the view closed with the stream


async def test_a_root_sent_last_that_the_pages_do_not_hash_to_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await folded(cluster, 20)
            assert (await a.contexts.replica(context)).final.state is None
            original = a.contexts.snapshot_hash_view

            async def lying(context_id: bytes, stream: SnapshotStream) -> None:
                await original(context_id, stream)
                stream.root = bytes(32)

            monkeypatch.setattr(a.contexts, "snapshot_hash_view", lying)
            await join(cluster, 0, 1, context)  # the join succeeds; its snapshot does not
            assert sessions(c, "snapshot", "failed") == 1
            assert await c.contexts.is_fresh(context)
            monkeypatch.undo()
            await c.sync.sync_now(context, cluster.peer_ids[0])
            await converged(cluster, [a, c], context)
            assert await entries(c, context) == await entries(a, context)
