"""The async datastore façade: typed tables over LmdbStore, run off the Trio thread.

LMDB calls block, so each runs in a worker thread: writes under a limiter of one (LMDB
allows a single writer anyway; queueing here keeps the waiting in Trio, where it can be
cancelled, instead of in a blocked thread), reads under `store.reader_threads`.
Cancellation never interrupts a transaction midway: `to_thread.run_sync` waits for the
thread, so a write either committed or did not happen.

`inline=True` runs every call on the Trio thread instead (for in-process test clusters
under `autojump_clock`, where a task waiting for a worker thread looks idle and lets the
mock clock jump to the next deadline while LMDB is still working).

**A small write commits on the Trio thread when the loop has nothing else to run** (issue
#16: handing a commit to a worker thread and hearing back cost a sequential durable call
~180 us of its ~700 us on a quiet machine, and 0.7-3 ms of waiting for the thread to be
scheduled on a loaded one). `write` does so when no task is runnable, the batch has at
most `INLINE_MAX_OPS` ops, and commits have recently been fast (a moving average of their
duration, inline or in the thread, at most `inline_commit_max_seconds`); otherwise it
hands the commit to the writer thread as before.
- *Durability* is the same either way: one LMDB write transaction, committed and synced
  before `write` returns, and whoever waits on it hears only then.
- *Fairness*: the loop is blocked for one commit only when no task was waiting to run,
  so what it delays is I/O that becomes ready during that commit (and the tasks of the
  scheduler's current batch, already taken off the run queue), by about one commit's
  time, which the average keeps small: on a slow or busy disk commits go back to the
  thread, and the loop keeps serving the network while the disk syncs.
"""

from __future__ import annotations

import collections
import contextlib
import operator
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Generic, Protocol, TypeVar

import attrs
import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from trionode.errors import StorageError
from trionode.store.encryption import KdfParams
from trionode.store.lmdb_store import (
    DEFAULT_MAX_VALUE_REFS,
    BulkTimes,
    Column,
    Delete,
    LmdbStore,
    Put,
    PutMany,
    PutRun,
    StoreStats,
    WriteOp,
)

_RUN_CONTEXT: Final[Any] = trio._core._run.GLOBAL_RUN_CONTEXT  # noqa: SLF001  # (`_loop_idle`)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")

INLINE_MAX_OPS: Final = 256
"""A write of more ops than this always goes to the writer thread (a snapshot batch, a
folding pass): only the common small commit (a delta or a group of them) runs inline."""
DEFAULT_INLINE_COMMIT_MAX: Final = 0.002
"""The default of `store.inline_commit_max_seconds`."""
_PUTS_ONLY: Final = {Put}
_COLUMN_OF: Final[Callable[[WriteOp], Column]] = operator.attrgetter("column")
_AVERAGE_WEIGHT: Final = 0.2
"""The weight of the newest commit in the moving average of commit durations."""
_WALL: Final = time.perf_counter
_CPU: Final = time.thread_time
"""The clocks of `WriterTimes` (bound once: the writer thread's loop reads them)."""


def _loop_idle() -> bool:
    """Whether no task of the running Trio loop is runnable and no callback from another
    thread (a worker thread's result) waits to run: what `current_statistics()` says in
    `tasks_runnable` and `run_sync_soon_queue_size`, read from the run loop itself.
    (`current_statistics()` also asks the I/O backend for its registrations, O(open
    sockets): 9-13 us of a sequential durable call's ~500 before its commit, issue #16.)
    Falls back to it if a Trio release moves these attributes."""
    runner: Any = getattr(_RUN_CONTEXT, "runner", None)  # (None outside a Trio run)
    try:
        return not runner.runq and not runner.entry_queue.size()
    except AttributeError:
        loop = trio.lowlevel.current_statistics()
        return loop.tasks_runnable == 0 and loop.run_sync_soon_queue_size == 0


class _CommitThread:
    """One long-lived thread for the commits `AsyncStore.write` hands off the loop.

    `trio.to_thread.run_sync` per commit names the pooled thread and names it back (two
    system calls), captures the context, and builds its cancel machinery: on a loaded
    machine that was a sixth of the delta processor's time in the propagation bench
    (py-spy, issue #16). Here a commit is a queue put and, once done, one callback that
    wakes the waiting task. Like `run_sync` without `abandon_on_cancel`, a commit that
    has begun is waited for even if the caller is cancelled meanwhile: a write either
    committed or did not happen. (The waiting task is parked with an abort function
    that refuses every cancellation, and the callback reschedules it: a shielded cancel
    scope and an Event around the wait were ~380 of the ~2,200 bytecodes a sequential
    call adds on the loop when its commit goes to this thread, issue #16.) The thread
    starts with the first commit it gets and ends at `close` (the store's close)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.times = WriterTimes()
        """The commits it ran and where their time went (summed since the store opened)."""

    async def run(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the thread; raises what it raised."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="trionode-store-writer", daemon=True
            )
            self._thread.start()
        job = _Commit(fn, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        self._jobs.put(job)
        # (The commit is waited for, cancelled or not: see above. The thread's callback
        # runs on this loop, so not before this task is parked here.)
        await trio.lowlevel.wait_task_rescheduled(_refuse_abort)
        if job.error is not None:
            raise job.error

    def _work(self) -> None:
        clock, cpu, times = _WALL, _CPU, self.times
        while (job := self._jobs.get()) is not None:
            began, used = clock(), cpu()
            try:
                job.fn()
            except BaseException as exc:  # noqa: BLE001 (raised in the waiting task)
                job.error = exc
            times.commits += 1
            times.seconds += clock() - began
            times.cpu += cpu() - used
            with contextlib.suppress(trio.RunFinishedError):  # (nobody waits any more)
                job.token.run_sync_soon(trio.lowlevel.reschedule, job.task)

    def close(self) -> None:
        """End the thread once the commits queued before are done."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


@attrs.define
class WriterTimes:
    """Where the writer thread's commits spent their time (seconds), and the store's bulk
    writes in whichever thread made them (`LmdbStore.bulk`): what a snapshot's batches cost
    the writer (`AsyncStore.writer_times`; the join bench prints it, issue #17)."""

    commits: int = 0
    """Commits the writer thread ran."""
    seconds: float = 0.0
    """Their wall time in the thread."""
    cpu: float = 0.0
    """The thread's CPU time meanwhile: the rest of `seconds` it waited, for the disk or the
    GIL (py-lmdb takes the GIL back after every put: `BulkTimes`)."""
    bulk: BulkTimes = attrs.field(factory=BulkTimes)

    def since(self, earlier: WriterTimes) -> WriterTimes:
        return WriterTimes(
            self.commits - earlier.commits,
            self.seconds - earlier.seconds,
            self.cpu - earlier.cpu,
            self.bulk.since(earlier.bulk),
        )

    def line(self) -> str:
        bulk = self.bulk
        return (
            f"{self.commits} commits in the writer thread, {self.seconds:.3f}s"
            f" (CPU {self.cpu:.3f}s); {bulk.writes} bulk writes: preparing"
            f" {bulk.preparing:.3f}s, putting {bulk.putting:.3f}s, committing"
            f" {bulk.committing:.3f}s"
        )


@attrs.define(eq=False)
class _Commit:
    fn: Callable[[], None]
    token: trio.lowlevel.TrioToken
    task: trio.lowlevel.Task
    """The task waiting for it (rescheduled once it is done)."""
    error: BaseException | None = None


def _refuse_abort(_: Callable[[], BaseException]) -> trio.lowlevel.Abort:
    """A commit's waiter is not cancelled: the commit has begun (`_CommitThread`)."""
    return trio.lowlevel.Abort.FAILED


class Codec(Protocol[T]):
    def encode(self, value: T, /) -> bytes: ...
    def decode(self, data: bytes, /) -> T: ...


class BytesCodec:
    def encode(self, value: bytes, /) -> bytes:
        return value

    def decode(self, data: bytes, /) -> bytes:
        return data


class StrCodec:
    def encode(self, value: str, /) -> bytes:
        return value.encode("utf-8")

    def decode(self, data: bytes, /) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise StorageError("stored key is not UTF-8") from None


class MsgpackCodec(Generic[T]):
    """msgspec-typed values: decoding validates, and bad bytes raise StorageError."""

    def __init__(self, type_: type[T]) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(type_)
        self._name = getattr(type_, "__name__", str(type_))

    def encode(self, value: T, /) -> bytes:
        return self._encoder.encode(value)

    def decode(self, data: bytes, /) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise StorageError(f"stored {self._name} is unreadable: {exc}") from None


@attrs.frozen
class Table(Generic[K, V]):
    """A typed view of one column: how its keys and values are encoded."""

    column: Column
    keys: Codec[K]
    values: Codec[V]


class WriteBatch:
    """Writes to any tables, committed together by `AsyncStore.write`."""

    def __init__(self) -> None:
        self.ops: list[WriteOp] = []

    def put(self, table: Table[K, V], key: K, value: V) -> None:
        self.ops.append(Put(table.column, table.keys.encode(key), table.values.encode(value)))

    def delete(self, table: Table[K, V], key: K) -> None:
        self.ops.append(Delete(table.column, table.keys.encode(key)))

    def __len__(self) -> int:
        return len(self.ops)


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.operations = _OperationCounts()
        """`trionode_store_operations` by (op, column): plain counts, read at each scrape
        (a prometheus `Counter` child's `inc` takes a lock and checks that it may be
        observed, each time: several per write, on every call's path)."""
        registry.register(self.operations)
        self.errors = Counter(
            "trionode_store_errors", "Datastore operations that failed", ["op"], registry=registry
        )


class _OperationCounts(Collector):
    """Datastore operations by kind and column, a plain counter read at each scrape. The
    store's methods count on the Trio thread, where they are called (a write before it
    goes to the commit thread), so it takes no lock; a scrape copies it in one step."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, Column]] = collections.Counter()
        self.puts: collections.Counter[Column] = collections.Counter()
        """Puts by column, of writes made of puts alone (a call's: counted in one C step,
        not a Python step per op, issue #16): `counts`' ("put", column) adds these."""

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(
            "trionode_store_operations",
            "Datastore operations by kind and column",
            labels=["op", "column"],
        )
        counts = collections.Counter(dict(list(self.counts.items())))  # (one step each: no
        for column, n in list(self.puts.items()):  # count changes it meanwhile)
            counts["put", column] += n
        for (op, column), n in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
            family.add_metric([op, column.value], n)
        return [family]

    def describe(self) -> list[CounterMetricFamily]:
        return [
            CounterMetricFamily(
                "trionode_store_operations",
                "Datastore operations by kind and column",
                labels=["op", "column"],
            )
        ]


class AsyncStore:
    """What the rest of the node uses. Open with `open_store`."""

    def __init__(
        self,
        raw: LmdbStore,
        reader_threads: int,
        metrics: StoreMetrics | None,
        *,
        inline: bool = False,
        inline_commit_max: float = DEFAULT_INLINE_COMMIT_MAX,
    ) -> None:
        self.raw = raw
        self.inline = inline
        """Run LMDB calls on the Trio thread (blocking it) instead of in worker threads."""
        self.inline_commit_max = inline_commit_max
        """`store.inline_commit_max_seconds`: a write may commit on the Trio thread while
        the moving average of commit durations is at most this (0: never; module docs)."""
        self.commit_seconds = 0.0
        """The moving average of write durations (inline or in the writer thread)."""
        self.inline_commits = 0
        """Writes committed on the Trio thread because the loop had nothing else to run."""
        self._writer = trio.CapacityLimiter(1)
        self._commits = _CommitThread()
        self._readers = trio.CapacityLimiter(reader_threads)
        self._metrics = metrics
        self._counts = None if metrics is None else metrics.operations.counts
        self._puts = None if metrics is None else metrics.operations.puts

    async def _run(
        self, limiter: trio.CapacityLimiter, op: str, fn: Callable[..., R], *args: Any
    ) -> R:
        try:
            if self.inline:
                # One synchronous call is atomic for Trio: no limiter needed.
                await trio.lowlevel.checkpoint()
                return fn(*args)
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        except StorageError:
            if self._metrics is not None:
                self._metrics.errors.labels(op).inc()
            raise

    def _count(self, op: str, column: Column, n: int = 1) -> None:
        if self._counts is not None:
            self._counts[op, column] += n

    async def get(self, table: Table[K, V], key: K) -> V | None:
        # A point read is a lookup in a memory-mapped B-tree that never waits for the writer
        # (MVCC): a few microseconds, where a thread hop costs ~100. So it runs inline.
        await trio.lowlevel.checkpoint()
        self._count("get", table.column)
        raw = self.raw.get(table.column, table.keys.encode(key))
        return None if raw is None else table.values.decode(raw)

    def get_sync(self, table: Table[K, V], key: K) -> V | None:
        """A point read without yielding (for code that must not checkpoint: see `get`)."""
        self._count("get", table.column)
        raw = self.raw.get(table.column, table.keys.encode(key))
        return None if raw is None else table.values.decode(raw)

    def scan_sync(
        self, column: Column, prefix: bytes, *, fill: tuple[Column, int] | None = None
    ) -> list[tuple[bytes, bytes]]:
        """A prefix scan without yielding (rare, bounded work: a rebuild). `fill`: see
        `LmdbStore.scan`."""
        self._count("scan", column)
        return self.raw.scan(column, prefix=prefix, fill=fill)

    async def scan(
        self,
        table: Table[K, V],
        *,
        prefix: bytes = b"",
        start: K | None = None,
        end: K | None = None,
        limit: int | None = None,
    ) -> list[tuple[K, V]]:
        self._count("scan", table.column)
        rows = await self._run(
            self._readers,
            "scan",
            lambda: self.raw.scan(
                table.column,
                prefix=prefix,
                start=None if start is None else table.keys.encode(start),
                end=None if end is None else table.keys.encode(end),
                limit=limit,
            ),
        )
        return [(table.keys.decode(k), table.values.decode(v)) for k, v in rows]

    async def raw_scan(self, column: Column, *, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        """Untyped rows of a column (for whole-prefix deletes)."""
        self._count("scan", column)
        return await self._run(self._readers, "scan", lambda: self.raw.scan(column, prefix=prefix))

    async def write(self, batch: WriteBatch | Sequence[WriteOp], *, settle: bool = True) -> None:
        """Commit `batch` in one durable write transaction. `settle=False`: a commit made on
        the Trio thread returns without yielding (it is a cancel point before, as always);
        for a caller that yields right after anyway (the delta processor answers its
        callers, then waits for the next job), whose extra round of the scheduler per
        commit was a fifth of a sequential call's task steps (issue #16)."""
        ops = batch.ops if isinstance(batch, WriteBatch) else list(batch)
        self._count_ops(ops)
        if self.inline:
            await self._run(self._writer, "write", self.raw.write, ops)
        elif self._may_inline(ops):
            # (A cancelled caller writes nothing; no yield before the commit, which would
            # let other tasks become runnable. The limiter is free unless a writer thread
            # is still busy or queued for: then wait for it like any writer. It is not
            # borrowed for the commit: that runs on this thread without yielding, so no
            # task can ask for it meanwhile; borrowing and giving it back were ~250
            # bytecodes of every sequential call, issue #16.)
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._writer.borrowed_tokens:
                await self._commit_in_thread(ops)
            else:
                self._commit_here(ops)
                if settle:
                    # Yield once, as any write does, but it is done: not a cancel point.
                    await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._commit_in_thread(ops)

    def _count_ops(self, ops: Sequence[WriteOp]) -> None:
        counts, puts = self._counts, self._puts
        if counts is not None and puts is not None:
            if set(map(type, ops)) == _PUTS_ONLY:  # (a call's write: no Python step per op)
                puts.update(map(_COLUMN_OF, ops))
                return
            for op in ops:
                if op.__class__ is Put:
                    counts["put", op.column] += 1
                elif isinstance(op, PutMany):  # (one op for 100,000s of a snapshot's rows)
                    counts["put", op.column] += len(op.rows)
                elif isinstance(op, PutRun):
                    counts["put", op.column] += len(op.keys)
                else:
                    counts["delete", op.column] += 1

    def write_now(self, batch: WriteBatch) -> bool:
        """Commit `batch` on the Trio thread at once, without yielding, if `write` would
        commit it on this thread now (`may_write_now`, and at most `INLINE_MAX_OPS` ops);
        False, having written nothing, if not (then `write` it). Raises StorageError as
        `write` does. For a caller whose commit must not meet a cancel point (the delta
        processor's batch that a caller runs itself: `DeltaPipeline.call`): `write`'s
        own look at the loop and its cancel point before the commit were ~150 bytecodes
        of every sequential call, issue #16."""
        ops = batch.ops
        if len(ops) > INLINE_MAX_OPS or not self.may_write_now():
            return False
        self._count_ops(ops)
        self._commit_here(ops)
        return True

    def _commit_here(self, ops: Sequence[WriteOp]) -> None:
        """Commit on the Trio thread (the caller checked it may), counted as such."""
        self.inline_commits += 1
        try:
            self._timed_write(ops)
        except StorageError:
            if self._metrics is not None:
                self._metrics.errors.labels("write").inc()
            raise

    def may_write_now(self) -> bool:
        """Whether a small write (at most `INLINE_MAX_OPS` ops) would commit now on the Trio
        thread (`write`'s rule: module docs), so that `write` neither yields nor meets a
        cancel point that can fire, if nothing has yielded since this said so (the delta
        processor's batch that a caller runs itself: `DeltaPipeline.call`). Never with
        `inline` (whose writes yield first)."""
        limit = self.inline_commit_max
        return (
            not self.inline
            and limit > 0
            and self.commit_seconds <= limit
            and not self._writer.borrowed_tokens
            and _loop_idle()
        )

    def may_run_here(self) -> bool:
        """Whether a caller may run a lone call's batch in its own task now
        (`DeltaPipeline.call`): no task of the loop is runnable, no worker thread's result
        waits, and writes do not yield first (not `inline`). Its commit then goes through
        `write_unstoppable`: on this thread if `may_write_now` still says so, else in the
        writer thread."""
        return not self.inline and _loop_idle()

    async def write_unstoppable(self, batch: WriteBatch) -> None:
        """`write` for a caller that must not stop halfway (one running its own batch,
        whose replica already holds the changes: `DeltaPipeline._run_here`): no cancel
        point. Committed at once on this thread if `write_now` would, else in the writer
        thread, waited for whatever becomes of the caller (parked until the thread is
        done: no shielded scope, ~300 bytecodes of a call whose commits go to the thread,
        issue #16), or, if a writer holds the thread, after it, shielded. Raises
        StorageError as `write` does."""
        if self.write_now(batch):
            return
        ops = batch.ops
        if not self.inline:
            try:
                self._writer.acquire_nowait()
            except trio.WouldBlock:
                pass  # (another writer has the thread or waits for it: after them)
            else:
                self._count_ops(ops)
                await self._commit_taken(ops)
                return
        with trio.CancelScope(shield=True):
            await self.write(ops, settle=False)

    async def _commit_in_thread(self, ops: Sequence[WriteOp]) -> None:
        """Commit `ops` in the commit thread, one writer at a time."""
        # (A free writer is taken without the round of the scheduler `acquire` makes: the
        # wait for the thread yields anyway. A cancelled caller writes nothing.)
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._writer.acquire_nowait()
        except trio.WouldBlock:
            await self._writer.acquire()
        await self._commit_taken(ops)

    async def _commit_taken(self, ops: Sequence[WriteOp]) -> None:
        """Commit `ops` in the commit thread, the writer taken (given back after)."""
        try:
            await self._commits.run(lambda: self._timed_write(ops))
        except StorageError:
            if self._metrics is not None:
                self._metrics.errors.labels("write").inc()
            raise
        finally:
            self._writer.release()

    def writer_times(self) -> WriterTimes:
        """The writer thread's commits and the bulk writes so far (`WriterTimes`: take
        two and subtract, `since`). Read while writes go on, the sums may be a commit
        apart."""
        times = self._commits.times
        return WriterTimes(times.commits, times.seconds, times.cpu, attrs.evolve(self.raw.bulk))

    def close(self) -> None:
        """Stop the commit thread (the store's close: no write is running)."""
        self._commits.close()

    def _may_inline(self, ops: Sequence[WriteOp]) -> bool:
        """Whether `ops` may commit on the Trio thread now (see the module docs)."""
        limit = self.inline_commit_max
        if len(ops) > INLINE_MAX_OPS or limit <= 0 or self.commit_seconds > limit:
            return False
        # (Nothing runnable, and no worker thread's result waiting to wake a task.)
        return _loop_idle()

    def _timed_write(self, ops: Sequence[WriteOp]) -> None:
        """`LmdbStore.write`, its duration folded into `commit_seconds` (in whichever
        thread runs it: one writer at a time, so the update does not race)."""
        began = time.perf_counter()
        try:
            self.raw.write(ops)
        finally:
            took = time.perf_counter() - began
            self.commit_seconds += (took - self.commit_seconds) * _AVERAGE_WEIGHT

    async def put(self, table: Table[K, V], key: K, value: V) -> None:
        batch = WriteBatch()
        batch.put(table, key, value)
        await self.write(batch)

    async def delete(self, table: Table[K, V], key: K) -> None:
        batch = WriteBatch()
        batch.delete(table, key)
        await self.write(batch)

    async def stats(self) -> StoreStats:
        return await self._run(self._readers, "stats", self.raw.stats)


@asynccontextmanager
async def open_store(
    path: Path,
    *,
    initial_map_size: int,
    max_map_size: int,
    reader_threads: int,
    passphrase: str | None,
    registry: CollectorRegistry | None = None,
    kdf: KdfParams | None = None,
    inline: bool = False,
    inline_commit_max: float = DEFAULT_INLINE_COMMIT_MAX,
    max_value_refs: int = DEFAULT_MAX_VALUE_REFS,
) -> AsyncIterator[AsyncStore]:
    """Open the datastore in a worker thread (Argon2id takes a moment) and close it after.

    With ``inline``, the store is opened and used on the Trio thread (see the module docs).
    """

    def open_raw() -> LmdbStore:
        return LmdbStore.open(
            path,
            initial_map_size=initial_map_size,
            max_map_size=max_map_size,
            passphrase=passphrase,
            kdf=kdf,
            max_value_refs=max_value_refs,
        )

    if inline:
        await trio.lowlevel.checkpoint()
        raw = open_raw()
    else:
        raw = await trio.to_thread.run_sync(open_raw)
    try:
        metrics = StoreMetrics(registry) if registry is not None else None
        store = AsyncStore(
            raw, reader_threads, metrics, inline=inline, inline_commit_max=inline_commit_max
        )
        try:
            yield store
        finally:
            store.close()
    finally:
        raw.close()
