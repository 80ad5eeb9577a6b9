"""A received delta queues a handler run only for the events its app handles
(`trionode/context/processing.py`, issue #16): a run of an event no handler takes cost a
row, a wake-up of the handler runner, a store scan and a second commit, for nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio
import trio.testing

from trionode.context.records import HANDLER_PREFIX, HANDLER_RUNS
from trionode.node import Node
from trionode.store.lmdb_store import Put, WriteOp
from trionode.store.store import WriteBatch
from trionode.testing import open_cluster

from ..replication.cluster_helpers import call, drain, share, subscribe, wait_converged, write


def record_queued_runs(node: Node) -> list[bytes]:
    """The handler-run rows `node` puts from now on (its store's writes, recorded)."""
    queued: list[bytes] = []
    original = node.store.write

    async def recording(batch: WriteBatch | Sequence[WriteOp]) -> None:
        ops = batch.ops if isinstance(batch, WriteBatch) else batch
        queued.extend(
            op.key
            for op in ops
            if isinstance(op, Put)
            and op.column is HANDLER_RUNS.column
            and op.key.startswith(HANDLER_PREFIX)
        )
        await original(batch)

    node.store.write = recording  # type: ignore[method-assign]
    return queued


async def test_an_event_no_handler_takes_queues_no_run_on_the_receiver(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path) as cluster:
        context = await share(cluster, [0, 1], "chat")  # chat has no event handlers
        author, receiver = cluster[0], cluster[1]
        queued = record_queued_runs(receiver)
        events = subscribe(receiver, context)
        posted = await write(author, context, "post", text="hello")
        await wait_converged(cluster, [author, receiver], context)
        assert await call(receiver, context, "count") == 1
        # Subscribers still see the event ...
        seen = [e for e in drain(events) if e.delta_id == posted.hex()]
        assert [event["name"] for event in seen[0].events] == ["MessagePosted"]
        # ... but no run was queued for it (nor any other commit made for one).
        assert queued == []
        assert await receiver.store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX) == []


async def test_an_event_a_handler_takes_still_queues_its_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path) as cluster:
        context = await share(cluster, [0, 1], "kv_store")  # a handler for every event
        author, receiver = cluster[0], cluster[1]
        queued = record_queued_runs(receiver)
        await write(author, context, "set", key="k", value="v")
        await wait_converged(cluster, [author, receiver], context)  # (runs included)
        assert await call(receiver, context, "handler_calls") == 1
        assert len(queued) == 1
        assert await receiver.store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX) == []
