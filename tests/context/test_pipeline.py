"""The delta processor: concurrent calls share one commit, and nobody hears "done" before
the transaction holding their delta is durable (`trionode/context/pipeline.py`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.replication.helpers import install
from trionode.errors import StorageError
from trionode.node import Node
from trionode.sdk.errors import AppError
from trionode.store.store import WriteBatch
from trionode.testing import open_test_node


class GatedWrites:
    """Stands in for the context layer's store: holds every write until `gate` is set (or
    fails it, if told to); everything else goes to the real store."""

    def __init__(self, node: Node) -> None:
        self.replicas = node.contexts.replicas
        self.inner = self.replicas.store
        self.gate = trio.Event()
        self.sizes: list[int] = []
        self.fail_next = False
        self.replicas.store = self  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write(self, batch: WriteBatch) -> None:
        self.sizes.append(len(batch))
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise StorageError("disk full (test)")
        await self.inner.write(batch)

    def restore(self) -> None:
        self.replicas.store = self.inner


@asynccontextmanager
async def one_context(tmp_path: Path) -> AsyncIterator[tuple[Node, bytes]]:
    async with open_test_node(tmp_path / "a", api=False) as test_node:
        node = test_node.node
        record = await node.contexts.create(await install(node))
        yield node, record.context_id


def kv_set(key: str, value: str) -> str:
    return json.dumps({"key": key, "value": value})


async def test_concurrent_calls_share_one_commit_and_wait_for_it(tmp_path: Path) -> None:
    async with one_context(tmp_path) as (node, context):
        writes = GatedWrites(node)
        stats = node.contexts.pipeline.stats
        batches_before = stats.batches
        answered: list[int] = []

        async def call(i: int) -> None:
            result = await node.contexts.execute(context, "set", kv_set(f"k{i}", str(i)))
            assert result.delta_id is not None
            answered.append(i)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                # Every call is staged, none is durable: nobody has been answered.
                assert writes.sizes
                assert answered == []
                writes.gate.set()
        writes.restore()
        assert sorted(answered) == list(range(64))
        # One transaction for the first call (or more), one for all that queued behind it.
        assert stats.batches - batches_before <= 2
        assert stats.largest >= 32
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {f"k{i}": str(i) for i in range(64)}


async def test_a_failed_commit_fails_every_call_in_it_and_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    async with one_context(tmp_path) as (node, context):
        await node.contexts.execute(context, "set", kv_set("before", "1"))
        writes = GatedWrites(node)
        writes.fail_next = True
        failures: list[int] = []

        async def call(i: int) -> None:
            try:
                await node.contexts.execute(context, "set", kv_set(f"k{i}", str(i)))
            except StorageError:
                failures.append(i)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                writes.gate.set()
        writes.restore()
        assert failures  # the failed batch's calls all heard of it...
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        # ... and what they wrote is gone from memory too (reloaded from the store), while
        # the calls of a later batch, and everything before, stand.
        assert entries == {"before": "1"} | {f"k{i}": str(i) for i in range(8) if i not in failures}
        await node.contexts.execute(context, "set", kv_set("after", "2"))
        assert (await node.contexts.execute(context, "get", '{"key": "after"}')).result == "2"


async def test_a_bad_call_fails_alone_in_its_batch(tmp_path: Path) -> None:
    async with one_context(tmp_path) as (node, context):
        writes = GatedWrites(node)
        results: dict[str, object] = {}

        async def call(name: str, method: str, args: str) -> None:
            try:
                results[name] = (await node.contexts.execute(context, method, args)).result
            except AppError as exc:
                results[name] = exc

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "first", "set", kv_set("a", "1"))
                await trio.testing.wait_all_tasks_blocked()  # the first batch is committing
                nursery.start_soon(call, "good", "set", kv_set("b", "2"))
                nursery.start_soon(call, "bad", "get_required", '{"key": "missing"}')
                nursery.start_soon(call, "good2", "set", kv_set("c", "3"))
                await trio.testing.wait_all_tasks_blocked()
                writes.gate.set()
        writes.restore()
        assert isinstance(results.pop("bad"), AppError)
        assert results == {"first": None, "good": None, "good2": None}
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {"a": "1", "b": "2", "c": "3"}


async def test_calls_fail_cleanly_once_the_processor_has_stopped(tmp_path: Path) -> None:
    async with one_context(tmp_path) as (node, context):
        pipeline = node.contexts.pipeline
    # The node is closed: its processor is gone; a late call hears so instead of hanging.
    with pytest.raises(StorageError, match="stopping"):
        await pipeline.call(context, "set", kv_set("late", "1"))
