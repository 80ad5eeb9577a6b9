"""The delta processor: concurrent calls share one commit, and nobody hears "done" before
the transaction holding their delta is durable (`trionode/context/pipeline.py`)."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.replication.cluster_helpers import body_of
from tests.replication.helpers import install
from trionode.context.errors import ContextError, ContextNotFound, DeltaTooLarge
from trionode.context.event_log import EVENT_PREFIX
from trionode.context.events import ContextEvent, Replay, Subscription
from trionode.context.local_writes import CallResult
from trionode.context.notices import b58
from trionode.context.pipeline import DeltaPipeline
from trionode.context.records import CONTEXTS, ContextRecord
from trionode.crdt import Entity, Kind, RegisterState, decode_entities
from trionode.dag.delta import AppEvent, SignedDelta
from trionode.errors import StorageError
from trionode.node import Node
from trionode.sdk.errors import AppError
from trionode.store.lmdb_store import Column, Put
from trionode.store.store import BytesCodec, Table, WriteBatch
from trionode.testing import open_test_node


class GatedWrites:
    """Stands in for the context layer's store: holds every write until `gate` is set (or
    fails it, if told to); everything else goes to the real store."""

    def __init__(self, node: Node) -> None:
        self.replicas = node.contexts.replicas
        self.inner = self.replicas.store
        self.gate = trio.Event()
        self.sizes: list[int] = []
        self.batches: list[WriteBatch] = []
        self.fail_next = False
        self.replicas.store = self  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def may_write_now(self) -> bool:
        return False  # (every write waits at the gate: no caller commits its own batch)

    def may_run_here(self) -> bool:
        return False  # (nor runs it)

    def write_now(self, batch: WriteBatch) -> bool:
        return False  # (nor past the gate)

    async def write(self, batch: WriteBatch, *, settle: bool = True) -> None:
        self.sizes.append(len(batch))
        self.batches.append(batch)
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise StorageError("disk full (test)")
        await self.inner.write(batch, settle=settle)

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


async def test_a_record_read_during_a_commit_is_the_stored_one(tmp_path: Path) -> None:
    # `ReplicaStore.get` answers from memory when no change holds the replica (issue #16):
    # never with a staged record whose commit may yet fail.
    async with one_context(tmp_path) as (node, context):
        replicas = node.contexts.replicas
        before = await replicas.get(context)
        writes = GatedWrites(node)
        writes.fail_next = True
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    with suppress(StorageError):
                        await node.contexts.execute(context, "set", kv_set("k", "v"))

                nursery.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                staged = (await replicas.load(context)).record
                assert staged.root_hash != before.root_hash  # (staged, not durable)
                assert await replicas.get(context) == before
                writes.gate.set()
        writes.restore()
        assert await replicas.get(context) == before  # the commit failed
        result = await node.contexts.execute(context, "set", kv_set("k", "v"))
        after = await replicas.get(context)
        assert after.root_hash == result.root_hash != before.root_hash
        assert after == await replicas.store.get(CONTEXTS, context)


async def test_a_batch_refreshes_each_record_once_and_every_answer_names_its_root(
    tmp_path: Path,
) -> None:
    # Issue #16: data deltas committed together refresh their context's record (root hash,
    # heads) once, and every call and event of the batch names the root hash it left.
    async with one_context(tmp_path) as (node, context):
        writes = GatedWrites(node)
        results: list[CallResult] = []
        sub = node.hub.watch()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def call(i: int) -> None:
                    results.append(
                        await node.contexts.execute(context, "set", kv_set(f"k{i}", "v"))
                    )

                for i in range(16):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                writes.gate.set()
        writes.restore()
        shown = [e for e in drain_nowait(sub) if isinstance(e, ContextEvent)]
        sub.close()
        (batch,) = [b for b in writes.batches if _event_seqs(b)]
        records = [op for op in batch.ops if isinstance(op, Put) and op.column is CONTEXTS.column]
        assert len(records) == 1  # one record for the batch's deltas
        stored = await replicas_record(node, context)
        assert stored.heads == sorted(node.contexts.replicas.loaded()[0].dag.heads)
        assert {r.root_hash for r in results} == {stored.root_hash}
        # (The 16 calls queued together: one delta, one event with their 16 app events.)
        assert sum(len(e.events) for e in shown) == 16
        assert {e.root_hash for e in shown} == {stored.root_hash.hex()}
        assert {tuple(e.heads) for e in shown} == {tuple(h.hex() for h in stored.heads)}


async def test_a_call_failing_after_it_changed_the_replica_makes_its_batch_mates_run_again(
    tmp_path: Path,
) -> None:
    # A job that fails once it has changed the replica in memory (here: a delta too large
    # to seal, after the app wrote) leaves the replica to reload. The context's other jobs
    # in the batch run again in the next one: their record, not yet refreshed, would be
    # computed from the changed replica. Nothing is lost, the failed call leaves no trace.
    async with one_context(tmp_path) as (node, context):
        node.contexts.writer._max_delta_bytes = 4096
        writes = GatedWrites(node)
        outcomes: dict[str, object] = {}

        async def call(key: str, value: str) -> None:
            try:
                outcomes[key] = await node.contexts.execute(context, "set", kv_set(key, value))
            except DeltaTooLarge as exc:
                outcomes[key] = exc

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "first", "1")
                await trio.testing.wait_all_tasks_blocked()  # (its batch waits at the gate)
                for key, value in (("a", "1"), ("b", "2"), ("big", "x" * 10_000)):
                    nursery.start_soon(call, key, value)
                    await trio.testing.wait_all_tasks_blocked()
                writes.gate.set()
        writes.restore()
        assert isinstance(outcomes["big"], DeltaTooLarge)
        assert all(isinstance(outcomes[k], CallResult) for k in ("first", "a", "b"))
        # (Nothing was written after the batch that ran a and b again: what is stored is
        # what that batch wrote.)
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {"first": "1", "a": "1", "b": "2"}
        stored = await replicas_record(node, context)
        replica = await node.contexts.replicas.load(context)  # (reloaded from the store)
        assert stored.heads == sorted(replica.dag.heads)
        assert stored.root_hash == replica.tree.root_hash()
        for key in ("a", "b"):
            result = outcomes[key]
            assert isinstance(result, CallResult)
            assert result.delta_id is not None
            assert await node.contexts.read_delta(context, result.delta_id) is not None


async def replicas_record(node: Node, context: bytes) -> ContextRecord:
    record = await node.contexts.replicas.store.get(CONTEXTS, context)
    assert record is not None
    return record


def drain_nowait(sub: Subscription) -> list[object]:
    items: list[object] = []
    while True:
        try:
            items.append(sub.receive.receive_nowait())
        except trio.WouldBlock:
            return items


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


_LOG_ROWS = Table(Column.GENERIC, BytesCodec(), BytesCodec())


def _event_seqs(batch: WriteBatch) -> list[int]:
    """The event log rows a batch writes (their seq numbers)."""
    return [
        int.from_bytes(op.key[len(EVENT_PREFIX) :], "big")
        for op in batch.ops
        if isinstance(op, Put) and op.key.startswith(EVENT_PREFIX)
    ]


async def test_events_commit_with_their_deltas_and_are_shown_once_durable(tmp_path: Path) -> None:
    async with one_context(tmp_path) as (node, context):
        hub = node.hub
        sub = hub.open()
        hub.add_contexts(sub, [b58(context)], None)
        assert isinstance(sub.receive.receive_nowait(), Replay)  # the subscribe's answer
        shown = hub.shown
        writes = GatedWrites(node)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(node.contexts.execute, context, "set", kv_set(f"k{i}", "v"))
                await trio.testing.wait_all_tasks_blocked()
                # Committing: numbered, in the commit, seen by nobody yet.
                staged = [seq for batch in writes.batches for seq in _event_seqs(batch)]
                assert staged
                assert hub.shown == shown
                with pytest.raises(trio.WouldBlock):
                    sub.receive.receive_nowait()
                # Something published meanwhile elsewhere waits behind them.
                hub.publish(
                    context_id=b58(context),
                    delta_id="",
                    root_hash="",
                    heads=[],
                    events=[],
                    origin="sync",
                )
                with pytest.raises(trio.WouldBlock):
                    sub.receive.receive_nowait()
                writes.gate.set()
        writes.restore()
        seen = []
        while True:
            try:
                event = sub.receive.receive_nowait()
            except trio.WouldBlock:
                break
            assert isinstance(event, ContextEvent)
            seen.append(event)
        seqs = [event.seq for event in seen]
        assert seqs == sorted(seqs)
        # (Calls that queued together share one delta: one event with their app events.)
        inserted = sorted(e["payload"]["key"] for event in seen[:-1] for e in event.events)
        assert inserted == [f"k{i}" for i in range(8)]
        assert seen[-1].origin == "sync"
        assert hub.shown == seqs[-1]
        # Every call's event was written by its commit: nothing is left for the log task.
        staged = [seq for batch in writes.batches for seq in _event_seqs(batch)]
        assert sorted(staged) == seqs[:-1]
        stored = await node.store.scan(_LOG_ROWS, prefix=EVENT_PREFIX)
        assert {int.from_bytes(key[len(EVENT_PREFIX) :], "big") for key, _ in stored} >= set(
            seqs[:-1]
        )


async def test_a_failed_commit_shows_none_of_its_events(tmp_path: Path) -> None:
    async with one_context(tmp_path) as (node, context):
        hub = node.hub
        sub = hub.open()
        hub.add_contexts(sub, [b58(context)], None)
        sub.receive.receive_nowait()
        writes = GatedWrites(node)
        writes.fail_next = True
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def call(i: int) -> None:
                    with suppress(StorageError):
                        await node.contexts.execute(context, "set", kv_set(f"k{i}", "v"))

                for i in range(4):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                failed = [seq for batch in writes.batches for seq in _event_seqs(batch)]
                writes.gate.set()
        writes.restore()
        await node.contexts.execute(context, "set", kv_set("after", "v"))
        seqs = []
        while True:
            try:
                event = sub.receive.receive_nowait()
            except trio.WouldBlock:
                break
            assert isinstance(event, ContextEvent)
            seqs.append(event.seq)
        assert failed
        assert not set(failed) & set(seqs)  # never shown, numbers never reused
        assert seqs == sorted(seqs)
        assert seqs[-1] > max(failed)


async def test_membership_changes_commit_with_calls_and_a_refused_one_writes_nothing(
    tmp_path: Path,
) -> None:
    async with one_context(tmp_path) as (node, context):
        stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        writes = GatedWrites(node)
        results: dict[str, object] = {}

        async def run(name: str, op: Callable[[], Awaitable[object]]) -> None:
            try:
                results[name] = await op()
            except ContextError as exc:
                results[name] = exc

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    run, "first", lambda: node.contexts.execute(context, "set", kv_set("a", "1"))
                )
                await trio.testing.wait_all_tasks_blocked()  # the first batch is committing
                nursery.start_soon(
                    run,
                    "grant",
                    lambda: node.contexts.change_members(
                        context, [(other, "member"), (stranger, "member")]
                    ),
                )
                nursery.start_soon(
                    run, "bad", lambda: node.contexts.remove_member(context, b"\x09" * 32)
                )
                nursery.start_soon(
                    run, "call", lambda: node.contexts.execute(context, "set", kv_set("b", "2"))
                )
                await trio.testing.wait_all_tasks_blocked()
                writes.gate.set()
        writes.restore()
        assert len(writes.sizes) == 2  # the first call, then everything that queued behind it
        assert isinstance(results["bad"], ContextNotFound)
        grant = results["grant"]
        assert isinstance(grant, SignedDelta)
        roles = await node.contexts.roles(context)
        assert roles[other] == roles[stranger] == "member"
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {"a": "1", "b": "2"}
        stored = await node.contexts.read_delta(context, grant.id)
        assert stored is not None


def _second_pipeline(node: Node) -> DeltaPipeline:
    """A processor of the node's contexts besides the node's own (to stop it alone)."""
    running = node.contexts.pipeline
    return DeltaPipeline(
        running._replicas,
        running._writer,
        running._processor,
        running._apps,
        running._hub,
    )


async def test_a_shutdown_request_ends_an_idle_processor(tmp_path: Path) -> None:
    async with one_context(tmp_path) as (node, context):
        pipeline = _second_pipeline(node)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.serve, stop)
            await trio.testing.wait_all_tasks_blocked()  # (it waits for a job)
            stop.set()
        # (The nursery is done: `serve` ended by itself, not by a cancellation.)
        with pytest.raises(StorageError, match="stopping"):
            await pipeline.call(context, "set", kv_set("late", "1"))


@pytest.mark.parametrize("run", range(6))
async def test_a_call_queued_as_shutdown_is_requested_still_commits(
    tmp_path: Path, run: int
) -> None:
    """The call reaches the idle processor in the same round of the scheduler as the
    shutdown request (in either order, as Trio runs them): it is committed and answered,
    then the processor ends."""
    async with one_context(tmp_path) as (node, context):
        pipeline = _second_pipeline(node)
        stop = trio.Event()
        answers: list[CallResult] = []

        async def call() -> None:
            answers.append(await pipeline.call(context, "set", kv_set(f"k{run}", "v")))

        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.serve, stop)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call)
            stop.set()
        assert len(answers) == 1
        assert answers[0].delta_id is not None
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {f"k{run}": "v"}


def _values(records: list[Entity]) -> dict[bytes, tuple[Kind, bytes | None]]:
    """Records by id, as what they hold apart from their stamps (which differ run to run)."""
    return {
        r.id: (r.kind, r.body.value if isinstance(r.body, RegisterState) else None) for r in records
    }


async def test_calls_queued_together_share_one_delta_as_the_calls_one_by_one_make(
    tmp_path: Path,
) -> None:
    """Local calls of one context in one batch become one delta (`_Merge`): each caller
    hears its own answer, the shared delta id and the root after it; a call that fails in
    the middle is not in it; its records and app events are those of the same calls made
    one by one."""
    async with one_context(tmp_path) as (node, context):
        await node.contexts.execute(context, "set", kv_set("before", "0"))
        writes = GatedWrites(node)
        answers: dict[int, CallResult | AppError] = {}

        async def call(i: int) -> None:
            # Call 3 is refused (a value that is no string): it changes nothing.
            args = json.dumps({"key": "bad", "value": 5}) if i == 3 else kv_set(f"k{i}", f"v{i}")
            try:
                answers[i] = await node.contexts.execute(context, "set", args)
            except AppError as exc:
                answers[i] = exc

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                writes.gate.set()
        writes.restore()
        assert isinstance(answers.pop(3), AppError)
        good = list(answers.values())
        assert all(isinstance(a, CallResult) and a.result is None for a in good)
        (delta_id,) = {a.delta_id for a in good if isinstance(a, CallResult)}
        assert delta_id is not None
        stored = await replicas_record(node, context)
        assert {a.root_hash for a in good if isinstance(a, CallResult)} == {stored.root_hash}
        merged = await body_of(node, context, delta_id)
        keys = [json.loads(e.payload)["key"] for e in merged.events]
        assert sorted(keys) == ["k0", "k1", "k2", "k4", "k5"]
        assert (await node.contexts.execute(context, "entries", "{}")).result == {
            "before": "0",
            **{f"k{i}": f"v{i}" for i in (0, 1, 2, 4, 5)},
        }
        # The same calls one by one, in the order the batch ran them, in another context:
        # the same app events in the same order, and the join of their records.
        other = (await node.contexts.create(await install(node))).context_id
        one_by_one: list[Entity] = []
        events: list[AppEvent] = []
        for key in keys:
            done = await node.contexts.execute(other, "set", kv_set(key, f"v{key[1:]}"))
            assert done.delta_id is not None
            body = await body_of(node, other, done.delta_id)
            one_by_one += decode_entities(body.records)
            events += body.events
        assert merged.events == events
        joined: dict[bytes, Entity] = {}
        for record in one_by_one:
            joined[record.id] = (
                record if record.id not in joined else joined[record.id].join(record)
            )
        assert _values(decode_entities(merged.records)) == _values(list(joined.values()))


async def test_a_merged_delta_too_large_to_seal_leaves_its_calls_each_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Calls small enough each, whose merged delta is over `replication.max_delta_bytes`,
    are sealed one by one in the next batch: every call succeeds, each its own delta."""
    async with one_context(tmp_path) as (node, context):
        writer = node.contexts.pipeline._writer
        writer._max_delta_bytes = 1500  # (a 400-byte value makes a ~600-byte delta)
        writes = GatedWrites(node)
        answers: list[CallResult] = []

        async def call(i: int) -> None:
            answers.append(await node.contexts.execute(context, "set", kv_set(f"k{i}", "x" * 400)))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(call, i)
                await trio.testing.wait_all_tasks_blocked()
                writes.gate.set()
        writes.restore()
        assert "a merged delta failed" in caplog.text  # (it was tried)
        assert len(answers) == 4
        assert len({a.delta_id for a in answers}) == 4
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {f"k{i}": "x" * 400 for i in range(4)}


@asynccontextmanager
async def batch_runners(pipeline: DeltaPipeline) -> AsyncIterator[list[str]]:
    """The names of the tasks that run each batch of `pipeline`, in order."""
    runners: list[str] = []
    original = pipeline._run_batch

    async def recording(jobs: list[Any], *, here: bool = False) -> list[Any]:
        runners.append(trio.lowlevel.current_task().name)
        return await original(jobs, here=here)

    pipeline._run_batch = recording  # type: ignore[method-assign]
    try:
        yield runners
    finally:
        del pipeline._run_batch


async def test_a_lone_call_runs_its_own_batch_durably_and_concurrent_calls_still_share_one(
    tmp_path: Path,
) -> None:
    async with one_context(tmp_path) as (node, context):
        node.store.inline_commit_max = 60.0  # (however slow this disk is now)
        pipeline = node.contexts.pipeline
        me = trio.lowlevel.current_task().name
        async with batch_runners(pipeline) as runners:
            ran_here = 0
            for i in range(5):
                await trio.testing.wait_all_tasks_blocked()  # (nothing else runnable)
                # (Unless a write of the node's own, its event log's say, still holds the
                # writer thread: that is for the processor, as before.)
                here = node.store.may_run_here()
                result = await node.contexts.execute(context, "set", kv_set(f"k{i}", str(i)))
                # Run in this task, not the processor's, and on disk once answered.
                assert runners[-1] == (me if here else "delta-processor")
                assert result.delta_id is not None
                assert node.store.raw.get(Column.DELTA, context + result.delta_id)
                ran_here += here
            assert ran_here  # (the path this tests was taken)
            runners.clear()
            before = pipeline.stats.batches
            async with trio.open_nursery() as nursery:
                for i in range(32):
                    nursery.start_soon(node.contexts.execute, context, "set", kv_set(f"c{i}", "v"))
        # The first may run alone; all that came meanwhile share the processor's batch.
        assert pipeline.stats.batches - before <= 2
        assert runners[-1] == "delta-processor"
        assert pipeline.stats.largest >= 31
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert len(entries) == 5 + 32


async def test_a_lone_call_whose_commit_fails_hears_so_and_leaves_nothing_in_memory(
    tmp_path: Path,
) -> None:
    async with one_context(tmp_path) as (node, context):
        node.store.inline_commit_max = 60.0
        await node.contexts.execute(context, "set", kv_set("before", "1"))
        me = trio.lowlevel.current_task().name

        def full(ops: object) -> None:
            raise StorageError("disk full (test)")

        async with batch_runners(node.contexts.pipeline) as runners:
            raw_write = node.store.raw.write
            node.store.raw.write = full  # type: ignore[method-assign]
            try:
                await trio.testing.wait_all_tasks_blocked()
                here = node.store.may_run_here()  # (see the test above)
                with pytest.raises(StorageError, match="disk full"):
                    await node.contexts.execute(context, "set", kv_set("lost", "2"))
            finally:
                del node.store.raw.write
            assert runners == [me if here else "delta-processor"]
            assert node.store.raw.write == raw_write
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {"before": "1"}
        await node.contexts.execute(context, "set", kv_set("after", "3"))
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {"before": "1", "after": "3"}


async def test_a_lone_call_whose_commit_goes_to_the_writer_thread_still_runs_its_own_batch(
    tmp_path: Path,
) -> None:
    """Commits slow of late (`store.inline_commit_max_seconds`: 0, never on the loop's
    thread): the lone caller still runs its batch, its commit in the writer thread. A
    cancellation while that commit runs comes after it: the call is answered, durable."""
    async with one_context(tmp_path) as (node, context):
        node.store.inline_commit_max = 0.0
        me = trio.lowlevel.current_task().name
        token = trio.lowlevel.current_trio_token()
        committing = trio.Event()
        release = threading.Event()
        raw_write = node.store.raw.write
        threads: list[int | None] = []

        def held(ops: Any) -> None:
            if any(op.column is Column.DELTA for op in ops):  # (the call's: not the node's own)
                threads.append(threading.get_ident())
                token.run_sync_soon(committing.set)
                release.wait()
            raw_write(ops)

        async with batch_runners(node.contexts.pipeline) as runners:
            here: list[bool] = []
            result: list[CallResult] = []
            node.store.raw.write = held  # type: ignore[method-assign]
            try:
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:

                        async def cancel_once_committing() -> None:
                            await committing.wait()
                            scope.cancel()
                            release.set()

                        nursery.start_soon(cancel_once_committing)
                        for _ in range(10):  # (nothing runnable, no thread's result due)
                            await trio.testing.wait_all_tasks_blocked()
                            if node.store.may_run_here():
                                break
                        here.append(node.store.may_run_here())
                        result.append(await node.contexts.execute(context, "set", kv_set("k", "v")))
                        await trio.lowlevel.checkpoint()
            finally:
                del node.store.raw.write
        assert threads
        assert threads[0] != threading.get_ident()  # (the writer thread's)
        assert scope.cancelled_caught
        if here == [True]:  # (as good as always: see the loop above)
            assert runners == [me]
            (answer,) = result  # answered before the cancellation came
            assert answer.delta_id is not None
            assert node.store.raw.get(Column.DELTA, context + answer.delta_id)
        else:  # (through the processor, whose batch commits: its caller heard nothing)
            assert runners == ["delta-processor"]
            assert result == []
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {"k": "v"}


async def test_a_cancelled_lone_caller_runs_and_writes_nothing(tmp_path: Path) -> None:
    async with one_context(tmp_path) as (node, context):
        node.store.inline_commit_max = 60.0
        async with batch_runners(node.contexts.pipeline) as runners:
            with trio.CancelScope() as scope:
                scope.cancel()
                await node.contexts.execute(context, "set", kv_set("never", "1"))
            assert runners == []
        entries = (await node.contexts.execute(context, "entries", "{}")).result
        assert entries == {}
