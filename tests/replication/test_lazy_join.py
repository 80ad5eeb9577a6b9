"""A joiner keeps the records a snapshot brings as their rows until something reads them
(`trionode.crdt.lazy`): the snapshot's root is checked over those bytes; a value no
reader can decode is refused to the call that reads it, with a typed error, while every
other entry reads as usual and the replica stays as the member's."""

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
from trionode.crdt import Entity, Kind, RegisterState, encode_entity
from trionode.crdt.lazy import RowEntity
from trionode.node import Node
from trionode.sdk.errors import StateSchemaError
from trionode.testing import open_cluster


async def get(node: Node, context: bytes, key: str) -> object:
    return (await node.contexts.execute(context, "get", json.dumps({"key": key}))).result


async def test_a_value_no_reader_decodes_is_refused_at_its_first_read_and_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            a, c = cluster
            context = await create(a)
            for i in range(20):
                await put(a, context, f"k{i:02}")
            await fold_now(cluster)
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
