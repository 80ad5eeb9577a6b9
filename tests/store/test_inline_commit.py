"""A small write commits on the Trio thread when the loop has nothing else to run, and in
the writer thread otherwise (`trionode/store/store.py`, issue #16)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from trionode.errors import StorageError
from trionode.store import store as store_module
from trionode.store.lmdb_store import Column, LmdbStore, Put, PutRun, WriteOp
from trionode.store.store import INLINE_MAX_OPS, AsyncStore, WriteBatch, open_store


class Commits:
    """Which thread ran each `LmdbStore.write`; optionally failing, or taking `took`
    seconds by the store's clock (a busy or a fast disk, whatever this one's fsync costs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[int] = []
        self.took = 0.0
        self.delay = 0.0
        self.fail = False
        self.now = 0.0
        self.on_start: Callable[[], object] | None = None
        original: Callable[[LmdbStore, Sequence[WriteOp]], None] = LmdbStore.write
        monkeypatch.setattr(store_module, "time", SimpleNamespace(perf_counter=lambda: self.now))

        def write(store: LmdbStore, ops: Sequence[WriteOp]) -> None:
            self.threads.append(threading.get_ident())
            if self.on_start is not None:
                self.on_start()
            self.now += self.took
            if self.delay:
                time.sleep(self.delay)  # (holds the writer thread busy, not a wait)
            if self.fail:
                raise StorageError("disk full (test)")
            original(store, ops)

        monkeypatch.setattr(LmdbStore, "write", write)

    def last_inline(self) -> bool:
        return self.threads[-1] == threading.get_ident()


@asynccontextmanager
async def store_at(
    path: Path, registry: CollectorRegistry | None = None, inline_max: float = 0.002
) -> AsyncIterator[AsyncStore]:
    async with open_store(
        path,
        initial_map_size=1 << 20,
        max_map_size=1 << 30,
        reader_threads=1,
        passphrase=None,
        registry=registry,
        inline_commit_max=inline_max,
    ) as store:
        yield store


def puts(prefix: bytes, n: int = 1) -> list[WriteOp]:
    return [Put(Column.GENERIC, prefix + b"%d" % i, b"v") for i in range(n)]


def batch_of(ops: list[WriteOp]) -> WriteBatch:
    batch = WriteBatch()
    batch.ops += ops
    return batch


async def test_a_small_write_on_an_idle_loop_commits_on_the_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db") as store:
        await trio.testing.wait_all_tasks_blocked()
        await store.write(puts(b"a/"))
        assert commits.last_inline()
        assert store.inline_commits == 1
        assert store.raw.get(Column.GENERIC, b"a/0") == b"v"  # committed when it returned


async def test_a_write_goes_to_the_writer_thread_while_another_task_waits_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db") as store, trio.open_nursery() as nursery:
        ran = trio.Event()

        async def runnable() -> None:
            ran.set()

        nursery.start_soon(runnable)  # runnable now, not yet run
        await store.write(puts(b"a/"))
        assert not commits.last_inline()
        assert store.inline_commits == 0
        assert ran.is_set()
        assert store.raw.get(Column.GENERIC, b"a/0") == b"v"


async def test_a_large_batch_always_goes_to_the_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db") as store:
        await store.write(puts(b"a/", INLINE_MAX_OPS + 1))
        assert not commits.last_inline()
        await store.write(puts(b"b/", INLINE_MAX_OPS))
        assert commits.last_inline()


async def test_slow_commits_go_back_to_the_writer_thread_until_commits_are_fast_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db", inline_max=0.002) as store:
        commits.took = 0.02  # a busy disk: each commit takes 20 ms
        await store.write(puts(b"a/"))  # (inline: nothing measured yet)
        assert commits.last_inline()
        for i in range(3):
            await store.write(puts(b"b%d/" % i))
            assert not commits.last_inline()  # the loop is not blocked for a slow sync
        assert store.commit_seconds > 0.002
        commits.took = 0.0001
        inline = []
        for i in range(40):  # fast commits (measured in the thread) bring the average down
            await store.write(puts(b"c%d/" % i))
            inline.append(commits.last_inline())
        assert not inline[0]
        assert inline[-1]


async def test_a_small_write_waits_for_a_commit_in_the_writer_thread_and_follows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    started, release = threading.Event(), threading.Event()

    def hold_the_first() -> None:
        if not started.is_set():
            started.set()
            release.wait(30)

    commits.on_start = hold_the_first
    async with store_at(tmp_path / "db") as store:
        small = trio.Event()

        async def write_small() -> None:
            await store.write(puts(b"b/"))
            small.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, puts(b"a/", INLINE_MAX_OPS + 1))  # (the thread)
            await trio.to_thread.run_sync(started.wait)
            nursery.start_soon(write_small)
            await trio.testing.wait_all_tasks_blocked()  # (the loop is idle: only waits)
            assert not small.is_set()
            assert len(commits.threads) == 1  # it waits for the writer, not on this thread
            release.set()
        assert small.is_set()
        assert not commits.last_inline()
        assert store.inline_commits == 0
        assert store.raw.get(Column.GENERIC, b"b/0") == b"v"


async def test_zero_disables_inline_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db", inline_max=0.0) as store:
        await store.write(puts(b"a/"))
        assert not commits.last_inline()
        assert store.inline_commits == 0


async def test_a_failed_inline_commit_is_a_counted_storage_error_and_frees_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    registry = CollectorRegistry()
    async with store_at(tmp_path / "db", registry) as store:
        commits.fail = True
        with pytest.raises(StorageError, match="disk full"):
            await store.write(puts(b"a/"))
        assert commits.last_inline()
        assert registry.get_sample_value("trionode_store_errors_total", {"op": "write"}) == 1.0
        assert store.raw.get(Column.GENERIC, b"a/0") is None
        commits.fail = False
        with trio.fail_after(5):  # the writer limiter was released
            await store.write(puts(b"b/"))
        assert store.raw.get(Column.GENERIC, b"b/0") == b"v"


async def test_write_now_commits_on_the_trio_thread_only_when_write_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`write_now`: `write`'s inline commit, made at once (no yield, no cancel point), or
    nothing at all (False) when `write` would hand it to the writer thread."""
    commits = Commits(monkeypatch)
    registry = CollectorRegistry()
    async with store_at(tmp_path / "db", registry) as store, trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()
        assert store.write_now(batch_of(puts(b"a/")))
        assert commits.last_inline()
        assert store.inline_commits == 1
        assert store.raw.get(Column.GENERIC, b"a/0") == b"v"  # committed when it returned
        assert (
            registry.get_sample_value(
                "trionode_store_operations_total", {"op": "put", "column": "generic"}
            )
            == 1.0
        )
        assert not store.write_now(batch_of(puts(b"b/", INLINE_MAX_OPS + 1)))
        nursery.start_soon(trio.sleep, 0)  # (a task runnable now)
        assert not store.write_now(batch_of(puts(b"c/")))
        commits.fail = True
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(StorageError, match="disk full"):
            store.write_now(batch_of(puts(b"d/")))
        assert registry.get_sample_value("trionode_store_errors_total", {"op": "write"}) == 1.0
        assert len(commits.threads) == 2
        assert store.raw.get(Column.GENERIC, b"b/0") is None
        assert store.raw.get(Column.GENERIC, b"c/0") is None


class Steps(trio.abc.Instrument):
    """How many times the task that made it was scheduled (its rounds of the scheduler)."""

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


@pytest.mark.parametrize(("settle", "rounds"), [(True, 1), (False, 0)])
async def test_an_inline_commit_yields_once_unless_its_caller_yields_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settle: bool, rounds: int
) -> None:
    # settle=False is the delta processor's: it answers its callers, then waits for a job.
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db") as store:
        await trio.testing.wait_all_tasks_blocked()
        steps = Steps()
        trio.lowlevel.add_instrument(steps)
        try:
            await store.write(puts(b"a/"), settle=settle)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert commits.last_inline()
        assert store.raw.get(Column.GENERIC, b"a/0") == b"v"
        assert steps.steps == rounds


async def test_a_commit_in_the_thread_waits_only_for_the_thread_when_the_writer_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db", inline_max=0.0) as store:
        steps = Steps()
        trio.lowlevel.add_instrument(steps)
        try:
            await store.write(puts(b"a/"))
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert not commits.last_inline()
        assert store.raw.get(Column.GENERIC, b"a/0") == b"v"
        assert steps.steps == 1  # (taking the free writer was not a second round)


@pytest.mark.parametrize("inline_max", [0.002, 0.0])
async def test_a_cancelled_writer_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline_max: float
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db", inline_max=inline_max) as store:
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.write(puts(b"a/"))
        assert commits.threads == []
        assert store.raw.get(Column.GENERIC, b"a/0") is None


async def test_an_inline_commit_waits_for_a_writer_thread_still_committing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db", inline_max=1.0) as store, trio.open_nursery() as nursery:
        commits.delay = 0.05
        nursery.start_soon(store.write, puts(b"a/", INLINE_MAX_OPS + 1))  # in the thread
        await trio.testing.wait_all_tasks_blocked()
        commits.delay = 0.0
        await store.write(puts(b"b/"))  # nothing runnable, but the writer is busy
        assert len(commits.threads) == 2
        assert not commits.last_inline()  # it queued for the writer like any write
        assert store.raw.get(Column.GENERIC, b"a/0") == b"v"  # after the first, not beside
        assert store.raw.get(Column.GENERIC, b"b/0") == b"v"


async def test_commits_off_the_loop_share_one_long_lived_thread_that_ends_with_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db", inline_max=0.0) as store:
        for i in range(5):
            await store.write(puts(b"a%d/" % i))
        assert len(set(commits.threads)) == 1
        assert not commits.last_inline()
        # (Other tests' stores left open, as a simulated crash leaves them, keep theirs.)
        writer = next(t for t in threading.enumerate() if t.ident == commits.threads[0])
        assert writer.name == "trionode-store-writer"
        assert writer.is_alive()
    assert not writer.is_alive()  # the store's close ended it


async def test_a_writer_cancelled_while_its_commit_runs_in_the_thread_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    async with store_at(tmp_path / "db", inline_max=0.0) as store:
        commits.delay = 0.05
        token = trio.lowlevel.current_trio_token()
        committing = trio.Event()
        commits.on_start = lambda: token.run_sync_soon(committing.set)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_once_committing() -> None:
                    await committing.wait()
                    scope.cancel()

                nursery.start_soon(cancel_once_committing)
                await store.write(puts(b"a/"))
                # Not abandoned: the write returns once committed (it did happen), and the
                # cancellation comes at the caller's next checkpoint.
                assert store.raw.get(Column.GENERIC, b"a/0") == b"v"
                await trio.lowlevel.checkpoint()
                raise AssertionError("the cancellation should have come by now")
        assert scope.cancelled_caught
        commits.delay = 0.0
        with trio.fail_after(5):  # and the writer is free again
            await store.write(puts(b"b/"))


async def test_a_failed_commit_in_the_thread_is_a_counted_storage_error_and_frees_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = Commits(monkeypatch)
    registry = CollectorRegistry()
    async with store_at(tmp_path / "db", registry, inline_max=0.0) as store:
        commits.fail = True
        with pytest.raises(StorageError, match="disk full"):
            await store.write(puts(b"a/"))
        assert not commits.last_inline()
        assert registry.get_sample_value("trionode_store_errors_total", {"op": "write"}) == 1.0
        commits.fail = False
        with trio.fail_after(5):
            await store.write(puts(b"b/"))
        assert store.raw.get(Column.GENERIC, b"b/0") == b"v"
        assert store.raw.get(Column.GENERIC, b"a/0") is None


async def test_the_writer_times_count_the_thread_commits_and_the_bulk_writes(
    tmp_path: Path,
) -> None:
    # (inline commits off: every write goes to the writer thread)
    async with store_at(tmp_path / "db", inline_max=0.0) as store:
        before = store.writer_times()
        rows = [b"%04d" % i for i in range(100)]
        await store.write([PutRun(Column.STATE, b"c" * 32, rows, rows), *puts(b"p/")])
        after_bulk = store.writer_times()
        await store.write(puts(b"a/", 3))  # `Put`s alone: not a bulk write
        after_puts = store.writer_times()
    one = after_bulk.since(before)
    assert one.commits == 1
    assert one.bulk.writes == 1
    times = (one.seconds, one.cpu, one.bulk.preparing, one.bulk.putting, one.bulk.committing)
    assert all(t >= 0 for t in times)
    two = after_puts.since(after_bulk)
    assert two.commits == 1
    assert two.bulk.writes == 0
    assert after_puts.since(before).commits == 2
    assert "2 commits in the writer thread" in after_puts.since(before).line()
