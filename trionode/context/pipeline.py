"""The delta processor: one task that owns every write of a delta into a replica, and
commits them in groups.

```
 API calls ──────┐                                      ┌─> answer each job (its result or
 gossip, fetch ──┤  bounded channel of jobs    serve()  │   its error) once durable
 (VerifiedDelta) ┴─> [LocalCall | Received] ──> batch ──┼─> publish to subscribers, gossip
                                                        └─> one LMDB transaction, one fsync
```

Submitters (`call`, `receive`) put a job on a bounded memory channel (full: they wait,
which is the backpressure) and wait for its answer. The processor takes what is queued,
up to `replication.group_commit_max_deltas` jobs and `..._max_bytes` bytes, stages every
job into one `WriteBatch` in arrival order (holding the lock of each replica it touches,
so no reader sees a change before it is durable), commits the batch in one write
transaction, and only then answers each job and announces its deltas. A failed commit
fails every job in the batch and drops the replicas it touched (they reload from the
store): nothing is acknowledged that is not on disk, and memory never runs ahead of it.

**A lone call runs its batch in its caller's task** (`_run_here`, issue #16): when no
other call is under way, the processor waits for work with nothing queued and no task is
runnable, the caller runs the same one-job batch itself, without the trip through the
channel and the processor's task step. When its commit may run on the event loop's thread
the batch does not yield (so it can neither be cancelled halfway nor overlap one of the
processor's); when commits have been slow of late (`store.inline_commit_max_seconds`) it
commits in the writer thread, waited for whatever becomes of the caller, and the processor
waits for the batch to end. Concurrent callers and received deltas still queue for the
processor and share its commits.

Local calls of one context that queue together become **one delta** (`_Merge`): they run
one after another as before, and their changes are sealed once, signed by the context's
own member, with their app events in call order; each caller is answered with its own
result and the shared delta id.

A job's own error (an app error, a refused call, a bad delta) fails that job alone. An
error after a job began to change its replica leaves that replica unusable: later jobs of
the same context wait for the next batch, and the replica is reloaded after the commit.

**Received deltas are shown before their commit is durable** (issue #16: on a receiver
the commit's fsync was most of a propagated write's latency). The events of a context the
batch changed only with received deltas go to subscribers as soon as the batch is staged,
while the commit runs; everything else is still shown and answered only once durable. This
is safe because such a delta is already durable on its author, who publishes only after
its own commit, and a crash here can only lose what peers still hold:
- *Nothing acknowledged builds on it early.* The replica stays locked until the commit
  is over, and this task stages the next batch only after it, so a local write on top of
  a received delta commits in the same or a later LMDB transaction (LMDB makes those
  durable in order); if the commit fails, the replica reloads without it first.
- *A crash loses nothing that cannot be fetched again.* The author (and every peer that
  applied it) still has the delta, and our heads after the restart lack it, so a
  heartbeat or sync session brings it back. Subscribers are told to resync after a
  crash (the event log's numbering jumps, `event_log.py`) or a failed commit
  (`EventHub.settle`), so none keeps a delta the node lost as applied.
- *Peers are promised nothing.* Heads (heartbeats, sync's first message) were already read
  from memory during a commit; a peer that asks for a delta not yet stored hears
  "missing" and asks again or elsewhere, and finality and acks count only deltas we author,
  which commit after what they build on.
The processor yields between showing and committing (the batch's event-log and state
rows are encoded after it): whom the show woke — subscribers, and on a bench's shared
event loop the other nodes' readers — runs first, then the submitters it answers next
(the gossip handler, which passes the message on), instead of after this batch's
remaining work; the replicas stay held meanwhile, so nothing can see or change them
(issue #16). The node's own services that act on received deltas (the app follower, the
blob fetcher) hear of them only once durable (`EventHub.show_early`).
Handler runs are queued in the same commit and start only once it is durable. For the
same reasons `receive_many` (gossip, fetched chains) answers its submitter once the
deltas are staged, so the gossip handler, which handles every network event of the node in
turn, does not wait for an fsync per message; a failed commit is then counted and logged
here.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Sequence
from typing import Final

import attrs
import msgspec
import trio

from trionode.context.app_choice import running_app
from trionode.context.errors import ContextError, ContextNotFound, NotPermitted
from trionode.context.event_log import EventLog
from trionode.context.events import Change, ContextEvent, EventHub, Id
from trionode.context.local_writes import AppLoader, CallResult, LocalWriter
from trionode.context.notices import b58
from trionode.context.processing import DeltaProcessor, Progress, Received
from trionode.context.replicas import GroupWrite, Replica, ReplicaStore
from trionode.crdt import Entity
from trionode.dag.delta import SignedDelta, VerifiedDelta, verify_wire
from trionode.errors import ProtocolError, StorageError
from trionode.sdk.app import App
from trionode.sdk.blobs import BlobLoadNeeded
from trionode.sdk.errors import AppError
from trionode.sdk.runtime import CallOutcome
from trionode.store.lmdb_store import WriteOp
from trionode.store.store import WriteBatch

log = logging.getLogger(__name__)

DEFAULT_QUEUE: Final = 1024
DEFAULT_MAX_DELTAS: Final = 256
DEFAULT_MAX_BYTES: Final = 4 * 1024 * 1024

JOB_ERRORS: Final = (AppError, ContextError, ProtocolError, BlobLoadNeeded)
"""Errors that belong to one job: they fail it and not the batch. `BlobLoadNeeded` is the
signal that a call must wait for blob bytes: the caller loads them and calls again."""


class LocalCall(msgspec.Struct, frozen=True):
    """An app call to run. (This and `_Staged` are structs, not attrs classes: one of each
    is made per call, and a frozen attrs class's `__init__` cost ~1 us.)"""

    method: str
    args_json: str
    caller: contextvars.Context = msgspec.field(default_factory=contextvars.copy_context)
    """The submitting task's context variables: the call runs in the processor's task,
    and what the caller set up for it (the blob access of an API call) must come along."""
    app: App | None = None
    """The app to run it with, as `call` found it, for a call that runs its own batch
    with nothing yielding meanwhile (`_run_here`): not looked up a second time."""


@attrs.frozen
class LocalJob:
    """What a `LocalWrite` stages into: the replica (held), the batch, the deltas staged
    but not yet written for this replica, and where the events for subscribers go."""

    replica: Replica
    batch: WriteBatch
    fresh: dict[bytes, SignedDelta]
    changes: list[Change]
    progress: Progress
    """`mutated` must be set before the stage changes the replica in memory."""


@attrs.frozen
class LocalWrite:
    """Any other write of this node's member (a membership change, a handler run): `stage`
    runs in the processor's task, returns its answer and what to announce once durable.
    Its errors fail the job alone; the replica is reloaded after an error raised once the
    stage had begun to change it (`LocalJob.progress`)."""

    stage: Callable[[LocalJob], tuple[object, Callable[[], None] | None]]


@attrs.define(eq=False)
class _Job:
    context_id: bytes
    work: LocalCall | VerifiedDelta | LocalWrite
    size: int
    done: trio.Event = attrs.field(factory=trio.Event)
    result: object = None
    error: BaseException | None = None
    staged: trio.Event | None = None
    """Set (for a received delta submitted by `receive_many`) once the job's outcome is
    known, before its commit: its submitter goes on without waiting for the disk."""
    early: tuple[object, BaseException | None] = (None, None)
    """The (result, error) that `staged` announced (a later failed commit leaves it)."""
    alone: bool = False
    """A local call whose delta is sealed on its own, not merged with its neighbours'
    (`_Merge`): set when a merged delta could not be sealed, for its calls' second try,
    and for the only job of a batch (nothing to merge with: no bookkeeping)."""

    def succeed(self, result: object) -> None:
        self.result = result
        self._answer()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._answer()

    def _answer(self) -> None:
        self.done.set()
        self.answer_early(self.result, self.error)

    def answer_early(self, result: object, error: BaseException | None = None) -> bool:
        """Tell a submitter that waits only for staging what became of the job; whether
        it was waiting so (then the job's commit is no longer its submitter's concern)."""
        if self.staged is None or self.staged.is_set():
            return False
        self.early = (result, error)
        self.staged.set()
        return True


class _Staged(msgspec.Struct, frozen=True):
    """A job staged in the batch: its answer, what to announce once durable, its events,
    and the span of the batch's ops it added."""

    job: _Job
    answer: object
    after: Callable[[], None] | None
    changes: list[Change]
    start: int
    end: int


@attrs.frozen
class _Executed:
    """A local call that ran and changed its replica, its delta not sealed yet: it joins
    its context's `_Merge`."""

    outcome: CallOutcome


@attrs.define(eq=False)
class _Merge:
    """Consecutive local calls of one context in a batch that ran and changed it: their
    changes become one delta (`DeltaPipeline._flush`).

    Every local call is by the context's `our_member`, so one author signs them all; the
    records of the calls are joined (a delta-state CRDT: applying the join is applying
    each in turn, so a peer ends with the same state as from one delta per call) and their
    app events travel in call order. Each caller is answered with its own result, the
    shared delta id and the root hash after that delta. A call that fails before it
    changed the replica is not in it (the runtime rolled it back); one that fails after
    sends the context's calls of this batch to the next one (as it did before merging).
    A merged delta that cannot be sealed (larger than `replication.max_delta_bytes`) sends
    its calls to the next batch to be sealed each on its own. Anything else a batch does
    for the context (a received delta, a membership change, a call sealed alone) seals the
    pending calls first, so the context's deltas keep the order of its jobs.

    What it saves: one seal (body encoding, encryption, Ed25519 signature), one DAG insert,
    one delta row, one event-log row and one gossip message per merged call."""

    replica: Replica
    calls: list[tuple[_Job, CallOutcome]] = attrs.field(factory=list)


@attrs.define
class BatchStats:
    """What the processor has done (for tests, metrics and the bench)."""

    batches: int = 0
    jobs: int = 0
    largest: int = 0


class DeltaPipeline:
    def __init__(
        self,
        replicas: ReplicaStore,
        writer: LocalWriter,
        processor: DeltaProcessor,
        apps: AppLoader,
        hub: EventHub,
        *,
        event_log: EventLog | None = None,
        queue: int = DEFAULT_QUEUE,
        max_deltas: int = DEFAULT_MAX_DELTAS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._replicas = replicas
        self._writer = writer
        self._processor = processor
        self._apps = apps
        self._hub = hub
        self._event_log = event_log
        self._max_deltas = max_deltas
        self._max_bytes = max_bytes
        # Full: submitters wait (an API call, a gossip handler): the backpressure.
        # (None on the channel: the shutdown watcher's wake-up, see `_next`.)
        self._send, self._receive = trio.open_memory_channel[_Job | None](queue)
        self.stats = BatchStats()
        self._stopping = False
        """A shutdown was requested: what is queued is committed, then `serve` ends."""
        self._idle = False
        """The processor waits for a job (the shutdown watcher wakes it)."""
        self._here = False
        """A caller runs its batch itself (`_run_here`): the processor waits for it."""
        self._callers = 0
        """Calls under way (`call`): only one alone may run its own batch."""
        self._here_over: trio.Event | None = None
        """Set when that batch is over, if the processor waits for it."""

    async def _running_app(self, replica: Replica, method: str) -> App:
        return await running_app(self._apps, self._replicas, replica, method)

    # -- submitting ------------------------------------------------------------------------

    async def call(
        self, context_id: bytes, method: str, args_json: str, *, executor: bytes | None = None
    ) -> CallResult:
        """Run an app call as this node's member; returns once its delta (if it made one)
        is durable. Raises ContextError, AppError, ReadOnlyError (a read-only node runs
        only views), or StorageError if the commit failed."""
        self._callers += 1
        try:
            replica = await self._replicas.load(context_id)  # ContextNotFound at once
            if executor is not None and executor != replica.record.our_member:
                raise NotPermitted("this node holds no key for that executor")
            app = await running_app(self._apps, self._replicas, replica, method)
            self._writer.check_call(app, method)
            size = len(method) + len(args_json)
            if (
                self._callers == 1
                and self._idle
                and not self._here
                and not self._stopping
                and not replica.lock.locked()
                and self._replicas.store.may_run_here()
            ):
                result = await self._run_here(
                    _Job(context_id, LocalCall(method, args_json, app=app), size)
                )
            else:
                result = await self._submit(_Job(context_id, LocalCall(method, args_json), size))
        finally:
            self._callers -= 1
        assert isinstance(result, CallResult)
        return result

    async def _run_here(self, job: _Job) -> object:
        """Run the batch of `job` alone in the caller's task, when no other call is under
        way, the processor waits for work, nothing is queued and no task is runnable
        (`AsyncStore.may_run_here`: a sequential caller's call, issue #16; concurrent
        callers still share the processor's batches, and a received delta queued makes
        the processor runnable): the same `_run_batch` the processor would
        run, without the trip through its channel and the two task switches (~1,000
        bytecodes of a call's ~13,000). Nothing in it yields while its commit may be made
        on this thread (its replica is loaded and free, its app loaded:
        `AsyncStore.may_write_now`), so it cannot be cancelled once it has changed the
        replica (a cancel point fires only after a yield) and the processor cannot start a
        batch meanwhile. If something does yield (an app not installed here, whose load
        reads the store), or the commit goes to the writer thread (commits slow of late:
        such a call costs ~900 bytecodes less here than through the processor, issue
        #16), the processor waits for this batch to end (`_here`), and the commit is
        waited for whatever becomes of the caller (`AsyncStore.write_unstoppable`)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # (a cancelled caller runs nothing)
        self._here = True
        try:
            carry = await self._run_batch([job], here=True)
        finally:
            self._here = False
            if self._here_over is not None:
                self._here_over.set()
                self._here_over = None
        if carry:  # (not for one job: it is answered or failed; to the processor, if so)
            if isinstance(job.work, LocalCall):  # (its app is looked up again there)
                job.work = msgspec.structs.replace(job.work, app=None)
            return await self._submit(job)
        # A call is a schedule point, as through the processor (not a cancel point: it is
        # durable and answered).
        await trio.lowlevel.cancel_shielded_checkpoint()
        if job.error is not None:
            raise job.error
        return job.result

    async def receive(self, context_id: bytes, delta: bytes | VerifiedDelta) -> Received:
        """Take a delta from a peer (gossip, fetch, sync); returns what became of it once
        that is durable. Raises ProtocolError for a bad delta, ContextNotFound if this node
        is not a member of `context_id`."""
        verified = (
            delta if isinstance(delta, VerifiedDelta) else verify_wire(delta, context_id=context_id)
        )
        if not self._replicas.knows(context_id):
            raise_not_member(context_id)
        result = await self._submit(_Job(context_id, verified, len(verified.wire)))
        assert isinstance(result, Received)
        return result

    async def receive_many(
        self, context_id: bytes, wires: Sequence[bytes | VerifiedDelta]
    ) -> list[Received | ProtocolError]:
        """`receive` of several deltas (a gossip batch, a fetched chain), all queued before
        any is awaited, so they commit together; each one's outcome or error, in order.
        Raises ContextNotFound if this node is not a member of `context_id`.

        Returns once they are *staged* (applied in memory, shown to subscribers), not once
        durable: their commit follows in the same group commit. Whoever delivers deltas
        (the gossip handler, which handles every network event of the node in turn) then
        goes on while the disk syncs, instead of holding every later event for an fsync.
        Nothing is promised to anyone on receipt (the module docstring's reasons for
        showing early); if that commit fails, the replica reloads from disk, the failure
        is counted (`outcome="store_failed"`) and logged here, and sync brings the deltas
        again."""
        if not self._replicas.knows(context_id):
            raise_not_member(context_id)
        outcomes: list[Received | ProtocolError | _Job] = []
        for wire in wires:
            # (A fetch's machine verified what it fetched: not a second Ed25519 check.)
            if isinstance(wire, VerifiedDelta):
                verified = wire
            else:
                try:
                    verified = verify_wire(wire, context_id=context_id)
                except ProtocolError as exc:
                    outcomes.append(exc)
                    continue
            job = _Job(context_id, verified, len(verified.wire), staged=trio.Event())
            await self._send_job(job)
            outcomes.append(job)
        results: list[Received | ProtocolError] = []
        for outcome in outcomes:
            if not isinstance(outcome, _Job):
                results.append(outcome)
                continue
            assert outcome.staged is not None
            await outcome.staged.wait()
            result, error = outcome.early
            if isinstance(error, ProtocolError):
                results.append(error)
            elif error is not None:
                raise error
            else:
                assert isinstance(result, Received)
                results.append(result)
        return results

    async def write(
        self,
        context_id: bytes,
        stage: Callable[[LocalJob], tuple[object, Callable[[], None] | None]],
    ) -> object:
        """Run `stage` as a job (see `LocalWrite`); its answer once it is durable. Raises
        what `stage` raised, ContextNotFound, or StorageError if the commit failed."""
        return await self._submit(_Job(context_id, LocalWrite(stage), 0))

    async def _send_job(self, job: _Job) -> None:
        # A cancelled submitter queues nothing (as `send` would not); this does not yield.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            try:
                # Room in the queue: no trip through the scheduler (every one costs a
                # round of whatever else is runnable, e.g. gossip being forwarded).
                self._send.send_nowait(job)
            except trio.WouldBlock:
                await self._send.send(job)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise StorageError("the node is stopping: nothing was written") from None

    async def _submit(self, job: _Job) -> object:
        await self._send_job(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    # -- processing ------------------------------------------------------------------------

    async def serve(
        self,
        shutdown_requested: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Process jobs (the root nursery's task `delta-processor`) until shutdown is
        requested and what was queued by then is committed (or until cancelled)."""
        jobs: list[_Job] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_shutdown, shutdown_requested)
                task_status.started()
                await self._process(jobs)
                nursery.cancel_scope.cancel()
        finally:
            # Stopping: whoever still waits hears so (a job cancelled mid-commit may or may
            # not be on disk; none was acknowledged).
            stopped = StorageError("the node stopped before this write was acknowledged")
            while True:
                try:
                    queued = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                else:
                    if queued is not None:
                        jobs.append(queued)
            self._receive.close()
            for job in jobs:
                if not job.done.is_set():
                    job.fail(stopped)

    async def _process(self, jobs: list[_Job]) -> None:
        """Run batches until shutdown is requested and nothing is queued; `jobs` holds
        the jobs taken and not yet answered (the caller fails them if this is cancelled)."""
        polled = False  # (the queue was found empty just now)
        while True:
            if not jobs:
                first = await self._next(polled=polled)
                if first is None:
                    return
                jobs.append(first)
            size = sum(job.size for job in jobs)
            while len(jobs) < self._max_deltas and size < self._max_bytes:
                try:
                    job = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                if job is not None:
                    jobs.append(job)
                    size += job.size
            if self._here:  # (a caller's own batch yielded: `_run_here`)
                self._here_over = trio.Event()
                await self._here_over.wait()
            jobs[:] = await self._run_batch(jobs)
            polled = False
            if not jobs:
                # (What is queued is taken now: building the channel's statistics to ask
                # was ~5 us of every sequential call, issue #16.)
                try:
                    queued = self._receive.receive_nowait()
                except trio.WouldBlock:
                    polled = True
                    continue
                if queued is None:  # (the shutdown watcher's wake-up: `_next` ends)
                    continue
                jobs.append(queued)
            # More to do at once: others run first (the commit did not yield: the callers
            # just answered, and whoever submits or reads, get their turn).
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _watch_shutdown(self, shutdown_requested: trio.Event) -> None:
        await shutdown_requested.wait()
        self._stopping = True
        if self._idle:
            # The processor waits on an empty channel: this goes straight to it. (If a job
            # reached it first, this waits in the queue and `_next` passes over it.)
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._send.send_nowait(None)

    async def _next(self, *, polled: bool = False) -> _Job | None:
        """The next job; None once shutdown is requested and nothing is queued. `polled`:
        the caller just found the queue empty (no second look). (The shutdown watcher
        wakes the wait with None on the channel, not by cancelling it: a cancel scope
        around each wait was ~830 bytecodes, a twentieth of a sequential call's, issue
        #16; nor a nursery per job: a job is taken without extra trips through the
        scheduler.)"""
        while True:
            job: _Job | None = None
            if not polled:
                try:
                    job = self._receive.receive_nowait()
                except trio.WouldBlock:
                    polled = True
            if polled:
                polled = False
                if self._stopping:
                    return None
                self._idle = True
                try:
                    job = await self._receive.receive()
                finally:
                    self._idle = False
            if job is not None:
                return job

    async def _run_batch(self, jobs: list[_Job], *, here: bool = False) -> list[_Job]:
        """Stage `jobs`, commit them in one write, answer them; returns the jobs left for
        the next batch (those of a replica an error left unusable). `here`: a caller runs
        it (`_run_here`): committed on this thread if it still may, else shielded."""
        batch = GroupWrite()
        held: dict[bytes, Replica] = {}
        fresh: dict[bytes, dict[bytes, SignedDelta]] = {}
        unusable: set[bytes] = set()
        retry: set[_Job] = set()
        staged: list[_Staged] = []
        failed: list[tuple[_Job, BaseException]] = []
        events: list[ContextEvent] | None = None
        early = 0
        durable = False
        merging: dict[bytes, _Merge] = {}
        if len(jobs) == 1:
            jobs[0].alone = True  # (a sequential caller's call: sealed as it runs)
        try:
            for job in jobs:
                if job.context_id in unusable:
                    retry.add(job)
                    continue
                if job.alone or not isinstance(job.work, LocalCall):
                    # (The context's deltas keep its jobs' order: see `_Merge`.)
                    pending = merging.pop(job.context_id, None)
                    if pending is not None:
                        staged = self._flush(
                            pending,
                            batch,
                            fresh=fresh,
                            staged=staged,
                            unusable=unusable,
                            retry=retry,
                            failed=failed,
                        )
                        if job.context_id in unusable:
                            retry.add(job)
                            continue
                progress = Progress()
                start = len(batch.ops)
                try:
                    replica = await self._hold(job.context_id, held)
                    answer, after = await self._stage(
                        job, replica, batch, fresh.setdefault(job.context_id, {}), progress
                    )
                except JOB_ERRORS as exc:
                    failed.append((job, exc))
                    if progress.mutated:
                        unusable.add(job.context_id)
                        log.warning("%s needs a reload: %s", b58(job.context_id), exc)
                        # (Its ops may be half staged: they go, and so do those of the
                        # context's earlier jobs, whose record is yet to be refreshed from
                        # a replica this job has now changed: they run again next batch.)
                        del batch.ops[start:]
                        staged = self._unstage(staged, job.context_id, batch, retry)
                        pending = merging.pop(job.context_id, None)
                        if pending is not None:
                            retry.update(call for call, _ in pending.calls)
                    continue
                if isinstance(answer, _Executed):
                    pending = merging.get(job.context_id)
                    if pending is None:
                        pending = merging[job.context_id] = _Merge(replica)
                    pending.calls.append((job, answer.outcome))
                    continue
                staged.append(_Staged(job, answer, after, progress.changes, start, len(batch.ops)))
            for pending in merging.values():
                staged = self._flush(
                    pending,
                    batch,
                    fresh=fresh,
                    staged=staged,
                    unusable=unusable,
                    retry=retry,
                    failed=failed,
                )
            batch.finish_records()  # the records data deltas changed: once each
            changes, early = self._settled_changes(staged, held)
            if changes:
                events = self._hub.reserve(changes)  # (numbered now)
                # Received deltas are shown now, while their commit runs (module docstring).
                self._hub.show_early(events[:early])
            if early:
                # Whom the show woke (subscribers; on one loop, the other nodes' readers)
                # run before the submitters hear (the gossip handler, which then queues
                # the message's copies for its peers) and before this batch's rows and
                # commit.
                await trio.lowlevel.cancel_shielded_checkpoint()
            released = self._answer_early(staged, failed)
            if early or released:
                # Let whom that woke (the gossip handler; on one loop, other nodes'
                # processors) run before this batch's rows and commit. Twice in all: a
                # yield puts this task in the same scheduling batch as them, which Trio
                # may run in either order. Not cancel points; nothing changes meanwhile
                # (the replicas stay held).
                await trio.lowlevel.cancel_shielded_checkpoint()
                if not early:
                    await trio.lowlevel.cancel_shielded_checkpoint()
            if events is not None:
                self._log_events(events, batch)
            batch.finish_rows()  # (and their state rows)
            if len(batch):
                try:
                    store = self._replicas.store
                    if not here:
                        # (Not yielding after an inline commit: `_process` yields next.)
                        await store.write(batch, settle=False)
                    else:
                        # (A caller's own batch commits at once on this thread, with no
                        # cancel point; if it may not, in the writer thread, waited for
                        # whatever becomes of the caller: `_run_here`.)
                        await store.write_unstoppable(batch)
                except StorageError as write_error:
                    unusable.update(held)
                    failed.extend((each.job, write_error) for each in staged)
                    staged = []
                    if released:
                        self._processor.metrics.outcome("store_failed", released)
                        log.warning(
                            "could not store %d received deltas (sync brings them again): %s",
                            released,
                            write_error,
                        )
            durable = True
        finally:
            for context_id, replica in held.items():
                if context_id in unusable:
                    self._replicas.forget_loaded(context_id)  # reload from disk next time
                replica.lock.release()
            if events is not None:
                self._hub.settle(events, durable=durable and bool(staged), early=early)
        for job, error in failed:
            job.fail(error)
        for each in staged:
            if each.after is not None:
                each.after()  # announce (subscribers, gossip) as soon as it is durable
            answer = each.answer
            if isinstance(answer, CallResult):
                # The root hash once the call is durable (the batch's: see `GroupWrite`).
                # (Built, not `attrs.evolve`d: that reads the class's fields every call.)
                root_hash = held[each.job.context_id].tree.root_hash()
                answer = CallResult(answer.result, answer.delta_id, root_hash)
            each.job.succeed(answer)
        carry = [job for job in jobs if job in retry] if retry else []
        done = len(jobs) - len(carry)
        stats = self.stats
        stats.batches += 1
        stats.jobs += done
        stats.largest = max(stats.largest, done)
        return carry

    def _flush(
        self,
        pending: _Merge,
        batch: GroupWrite,
        *,
        fresh: dict[bytes, dict[bytes, SignedDelta]],
        staged: list[_Staged],
        unusable: set[bytes],
        retry: set[_Job],
        failed: list[tuple[_Job, BaseException]],
    ) -> list[_Staged]:
        """Seal and stage the merged delta of `pending`'s calls (see `_Merge`); returns the
        staged jobs, its calls added (or, if it could not be sealed, the context's jobs
        taken out to run again, its calls each alone)."""
        replica = pending.replica
        context_id = replica.context_id
        start = len(batch.ops)
        changes: list[Change] = []
        try:
            delta, after = self._writer.stage_outcome(
                replica,
                merged_outcome([outcome for _, outcome in pending.calls]),
                batch,
                fresh.setdefault(context_id, {}),
                changes,
            )
        except JOB_ERRORS as exc:
            unusable.add(context_id)
            del batch.ops[start:]
            staged = self._unstage(staged, context_id, batch, retry)
            if len(pending.calls) == 1:  # (its own error, as if it had been sealed alone)
                log.warning("%s needs a reload: %s", b58(context_id), exc)
                failed.append((pending.calls[0][0], exc))
                return staged
            log.warning("%s needs a reload: a merged delta failed: %s", b58(context_id), exc)
            for job, _ in pending.calls:
                job.alone = True
                retry.add(job)
            return staged
        end = len(batch.ops)
        for i, (job, outcome) in enumerate(pending.calls):
            # (The first holds the delta's ops, its announcement and its event; the others
            # an empty span, so `_unstage` moves the ops once.)
            answer = CallResult(outcome.result, delta.id, b"")
            if i == 0:
                staged.append(_Staged(job, answer, after, changes, start, end))
            else:
                staged.append(_Staged(job, answer, None, [], end, end))
        return staged

    @staticmethod
    def _answer_early(staged: list[_Staged], failed: list[tuple[_Job, BaseException]]) -> int:
        """Answer the received deltas whose submitters wait only for staging (`receive_many`):
        their outcomes, and the errors of those that failed to stage. Returns how many
        staged ones were answered so (their commit is now this task's to report)."""
        for job, error in failed:
            job.answer_early(None, error)
        return sum(1 for each in staged if each.job.answer_early(each.answer))

    @staticmethod
    def _unstage(
        staged: list[_Staged], context_id: bytes, batch: GroupWrite, retry: set[_Job]
    ) -> list[_Staged]:
        """Take the jobs of `context_id` out of the batch, their ops too, to run again;
        returns the staged jobs left (their spans of ops moved down)."""
        kept: list[_Staged] = []
        ops: list[WriteOp] = []
        for each in staged:
            if each.job.context_id == context_id:
                retry.add(each.job)
                continue
            start = len(ops)
            ops += batch.ops[each.start : each.end]
            kept.append(msgspec.structs.replace(each, start=start, end=len(ops)))
        staged_end = staged[-1].end if staged else 0
        batch.ops[:staged_end] = ops
        batch.stale.pop(context_id, None)
        return kept

    @staticmethod
    def _settled_changes(
        staged: list[_Staged], held: dict[bytes, Replica]
    ) -> tuple[list[Change], int]:
        """The staged jobs' events, each with the root hash and heads of its context once
        the batch is durable (staging left the records of data deltas stale: `GroupWrite`),
        and how many come first that may be shown before the commit: those of contexts
        this batch changed only with received deltas. Every event of a context stays in
        one of the two runs, in staging order, so each context's events keep their causal
        order (and across contexts order carries no meaning)."""
        final: dict[str, tuple[Id, list[Id]]] = {}
        for context_id, replica in held.items():
            record = replica.record
            final[b58(context_id)] = (record.root_hash, list(record.heads))  # (raw: `Change`)
        written_here = {
            b58(each.job.context_id)
            for each in staged
            if not isinstance(each.job.work, VerifiedDelta)
        }
        early: list[Change] = []
        late: list[Change] = []
        for each in staged:
            for change in each.changes:
                root_hash, heads = final.get(change.context_id, (change.root_hash, change.heads))
                settled = Change(
                    change.context_id,
                    change.delta_id,
                    root_hash,
                    heads,
                    change.events,
                    change.origin,
                )
                (late if change.context_id in written_here else early).append(settled)
        return early + late, len(early)

    def _log_events(self, events: list[ContextEvent], batch: WriteBatch) -> None:
        """Store the batch's numbered events in `batch` with the deltas they describe (the
        rest are shown once it is durable: `EventHub.settle`). Encoded after the early
        show: nothing before the commit reads them, and a received delta is shown ~20 us
        sooner (issue #16). If this raises, the batch fails, and what was shown is lost
        as with a failed commit."""
        if self._event_log is not None:
            self._event_log.stage(batch, events)

    async def _handles(self, replica: Replica) -> Callable[[str], bool] | None:
        """Whether the app the context runs has a handler for an event name (None: its app
        is not installed or cannot load here, so every event queues its run, which waits
        for the app: `handler_runs.py`)."""
        try:
            app = await running_app(self._apps, self._replicas, replica)
        except ContextError:
            return None
        return lambda name: bool(app.handlers_for(name))

    async def _hold(self, context_id: bytes, held: dict[bytes, Replica]) -> Replica:
        """The replica of `context_id`, locked until the batch is committed."""
        replica = held.get(context_id)
        if replica is None:
            if not self._replicas.knows(context_id):
                raise_not_member(context_id)
            replica = await self._replicas.load(context_id)
            try:
                replica.lock.acquire_nowait()  # (free: no trip through the scheduler)
            except trio.WouldBlock:
                await replica.lock.acquire()
            held[context_id] = replica
        return replica

    async def _stage(
        self,
        job: _Job,
        replica: Replica,
        batch: WriteBatch,
        fresh: dict[bytes, SignedDelta],
        progress: Progress,
    ) -> tuple[object, Callable[[], None] | None]:
        work = job.work
        if isinstance(work, VerifiedDelta):
            handles = await self._handles(replica)
            return self._processor.stage_received(
                replica, work, batch, fresh, progress, handles=handles
            )
        if isinstance(work, LocalWrite):
            own = WriteBatch()  # (joins the batch only if the whole job stages)
            staged = work.stage(LocalJob(replica, own, fresh, progress.changes, progress))
            batch.ops += own.ops
            return staged
        app = work.app
        if app is None:
            app = await self._running_app(replica, work.method)
        result = work.caller.run(self._writer.run_call, replica, app, work.method, work.args_json)
        # (The root hash is the batch's, filled in once it is durable: `_run_batch`.)
        if not result.delta_records and not result.events:
            return CallResult(result.result, None, b""), None
        progress.mutated = True
        if not job.alone:
            return _Executed(result), None  # (sealed with its neighbours': `_Merge`)
        delta, after = self._writer.stage_outcome(replica, result, batch, fresh, progress.changes)
        return CallResult(result.result, delta.id, b""), after


def merged_outcome(outcomes: Sequence[CallOutcome]) -> CallOutcome:
    """The changes of calls run one after another as one: their records joined (by entity
    id, sorted as a call's are) and their app events in order."""
    if len(outcomes) == 1:
        return outcomes[0]
    records: dict[bytes, Entity] = {}
    for outcome in outcomes:
        for record in outcome.delta_records:
            mine = records.get(record.id)
            records[record.id] = record if mine is None else mine.join(record)  # (copies)
    events = [event for outcome in outcomes for event in outcome.events]
    return CallOutcome(b"null", [records[i] for i in sorted(records)], events)


def raise_not_member(context_id: bytes) -> None:
    raise ContextNotFound(f"not a member of {b58(context_id)}")


async def serve_delta_processor(
    pipeline: DeltaPipeline,
    shutdown_requested: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The delta processor task (see the module docstring). A shutdown request ends it
    once what was queued is committed: later submitters hear that the node is stopping,
    and the node's shutdown does not wait for its grace period on this task."""
    await pipeline.serve(shutdown_requested, task_status=task_status)
