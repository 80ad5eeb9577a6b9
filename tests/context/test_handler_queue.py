"""A received delta queues a handler run only for the events its app handles
(`trionode/context/processing.py`, issue #16): a run of an event no handler takes cost a
row, a wake-up of the handler runner, a store scan and a second commit, for nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
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

    async def recording(batch: WriteBatch | Sequence[WriteOp], *, settle: bool = True) -> None:
        ops = batch.ops if isinstance(batch, WriteBatch) else batch
        queued.extend(
            op.key
            for op in ops
            if isinstance(op, Put)
            and op.column is HANDLER_RUNS.column
            and op.key.startswith(HANDLER_PREFIX)
        )
        await original(batch, settle=settle)

    node.store.write = recording  # type: ignore[method-assign]
    return queued


@pytest.mark.parametrize(
    "case",
    [
        ("chat", "post", {"text": "hello"}, 0),  # chat has no event handlers
        ("kv_store", "set", {"key": "k", "value": "v"}, 1),  # a handler for every event
    ],
)
async def test_a_received_event_queues_a_run_only_if_its_app_handles_it(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    case: tuple[str, str, dict[str, str], int],
) -> None:
    app, method, args, runs = case
    async with open_cluster(2, tmp_path) as cluster:
        context = await share(cluster, [0, 1], app)
        author, receiver = cluster[0], cluster[1]
        queued = record_queued_runs(receiver)
        events = subscribe(receiver, context)
        written = await write(author, context, method, **args)
        await wait_converged(cluster, [author, receiver], context)  # (runs included)
        # Subscribers see the event either way ...
        seen = [e for e in drain(events) if e.delta_id == written.hex()]
        assert len(seen[0].events) == 1
        # ... but a run (its row, and the commit that deletes it) only if a handler takes it.
        assert len(queued) == runs
        assert await receiver.store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX) == []
        if app == "kv_store":
            assert await call(receiver, context, "handler_calls") == 1
