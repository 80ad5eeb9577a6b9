"""Background fetches of the blobs contexts' states reference, so app calls never wait.

```
serve_fetcher (node.py)
├─ _worker (blobs.background_fetches)  take a request, BlobTransfer.fetch(by_reference)
├─ _retry per failed request             sleep (backoff), then queue it again
└─ _watch                                eager policy: follow applied deltas (EventHub.watch),
                                         request every referenced blob not stored here
```
Requests come from two places: a call that read a blob not stored here (on-read, see
`trionode.blobs.calls`), and `_watch` for contexts whose app's manifest says
`"blobs": "eager"`. `request` never blocks: a blob already queued, running or waiting for
its retry is not asked for twice, and past `blobs.fetch_queue` waiting requests new ones
are dropped and counted (the next read or change asks again). A fetch that fails is tried
again after `blobs.fetch_retry` seconds, doubling up to `blobs.fetch_retry_max`, at most
`blobs.fetch_attempts` times; every `blobs.eager_rescan` seconds `_watch` checks every
eager context again, so what gave up (or a restart interrupted) is asked for again. Delta
processing never waits for any of it: `_watch` reads a bounded queue of its own, and if it
falls behind the hub closes it and `_watch` rescans every context instead.

When a fetched blob is stored, the context's WebSocket subscribers get a `blob_available`
notice, so an app's UI knows to read again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import base58
import trio
from prometheus_client import CollectorRegistry, Counter

from trionode.blobs.references import BlobReferences
from trionode.blobs.store import BlobStore
from trionode.blobs.transfer import BlobTransfer
from trionode.config import BlobsSection
from trionode.context.events import ContextEvent, EventHub
from trionode.context.notices import from_b58
from trionode.errors import TrionodeError

log = logging.getLogger(__name__)


class BlobFetcherMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "trionode_blob_background_requests",
            "Background blob fetches requested, by trigger (read, eager) and fate "
            "(queued, dropped: the queue was full)",
            ["trigger", "fate"],
            registry=registry,
        )
        self.outcomes = Counter(
            "trionode_blob_background_fetches",
            "Background blob fetch attempts by outcome (ok, retry, gave_up)",
            ["outcome"],
            registry=registry,
        )


@attrs.define(eq=False)
class _Job:
    context_id: bytes
    blob_id: bytes
    attempts: int = 0
    done: trio.Event = attrs.field(factory=trio.Event)
    stored: bool = False


class BlobFetcher:
    """Args:
    policy: the blob policy of a context's app ("on-read" or "eager").
    contexts: the ids of the contexts this node holds now.
    application: the app a context runs, if known without a read (else None): a context
        whose app was found not eager is not checked again for each received delta.
    """

    def __init__(
        self,
        transfer: BlobTransfer,
        blobs: BlobStore,
        references: BlobReferences,
        hub: EventHub,
        *,
        policy: Callable[[bytes], Awaitable[str]],
        contexts: Callable[[], set[bytes]],
        config: BlobsSection,
        metrics: BlobFetcherMetrics,
        application: Callable[[bytes], bytes | None] = lambda _context_id: None,
    ) -> None:
        self._transfer = transfer
        self._blobs = blobs
        self._references = references
        self._hub = hub
        self._policy = policy
        self._contexts = contexts
        self._config = config
        self.metrics = metrics
        self._jobs: dict[bytes, _Job] = {}
        self._send, self._receive = trio.open_memory_channel[_Job](config.fetch_queue)
        self._checked: dict[bytes, frozenset[bytes]] = {}
        """Per eager context: references already seen stored or requested."""
        self._application = application
        self._not_eager: dict[bytes, bytes] = {}
        """Context → the app it ran when its policy was last found not eager (an app's
        policy is part of its bundle: it changes only with the app)."""

    def request(self, context_id: bytes, blob_id: bytes, *, trigger: str = "read") -> bool:
        """Fetch `blob_id` from the members of `context_id` in the background. Never blocks.
        False if it was dropped (the queue is full)."""
        if blob_id in self._jobs:
            return True
        job = _Job(context_id, blob_id)
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            self.metrics.requests.labels(trigger, "dropped").inc()
            return False
        self._jobs[blob_id] = job
        self.metrics.requests.labels(trigger, "queued").inc()
        return True

    async def wait(self, blob_id: bytes) -> bool:
        """Wait for the background fetch of `blob_id` (if any) to end; whether it is stored."""
        job = self._jobs.get(blob_id)
        if job is not None:
            await job.done.wait()
            return job.stored
        return await self._blobs.has(blob_id)

    def pending(self) -> set[bytes]:
        """Blobs queued, being fetched or waiting to retry."""
        return set(self._jobs)

    async def serve(
        self,
        shutdown_requested: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until shutdown is requested; fetches in flight then stop (their verified
        chunks are kept, so the next start resumes them)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self._config.background_fetches):
                nursery.start_soon(self._worker, nursery)
            await nursery.start(self._watch)
            task_status.started()
            await shutdown_requested.wait()
            nursery.cancel_scope.cancel(reason="node shutting down")

    async def _worker(self, nursery: trio.Nursery) -> None:
        async for job in self._receive:
            job.attempts += 1
            try:
                await self._transfer.fetch(job.blob_id, job.context_id, by_reference=True)
            except TrionodeError as exc:
                if job.attempts >= self._config.fetch_attempts:
                    self.metrics.outcomes.labels("gave_up").inc()
                    log.info(
                        "gave up fetching blob %s after %d attempts: %s",
                        _b58(job.blob_id),
                        job.attempts,
                        exc,
                    )
                    self._finish(job, stored=False)
                else:
                    self.metrics.outcomes.labels("retry").inc()
                    nursery.start_soon(self._retry, job)
                continue
            self.metrics.outcomes.labels("ok").inc()
            self._finish(job, stored=True)
            context = _b58(job.context_id)
            self._hub.notify(
                context,
                {"type": "blob_available", "contextId": context, "blobId": _b58(job.blob_id)},
            )

    async def _retry(self, job: _Job) -> None:
        cfg = self._config
        await trio.sleep(min(cfg.fetch_retry * 2 ** (job.attempts - 1), cfg.fetch_retry_max))
        if job.context_id not in self._contexts():
            self._finish(job, stored=False)
            return
        await self._send.send(job)  # a retry waits for room rather than being dropped

    def _finish(self, job: _Job, *, stored: bool) -> None:
        job.stored = stored
        del self._jobs[job.blob_id]
        if not stored and job.context_id in self._checked:  # the next change asks again
            self._checked[job.context_id] -= {job.blob_id}
        job.done.set()

    # -- the eager policy -----------------------------------------------------------------

    async def _watch(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Besides following changes, every `blobs.eager_rescan` seconds (the first time that
        # long after start, not during it) check every context again: fetches that gave up,
        # or that a restart interrupted, start again.
        dirty: set[bytes] = set()
        rescan = trio.current_time() + self._config.eager_rescan
        # (Only received deltas: a local write can reference only blobs already held here,
        # since attaching needs the bytes; a copied reference was checked when it arrived.)
        sub = self._hub.watch(remote_only=True, wants=self._concerns)
        task_status.started()
        try:
            while True:
                for context_id in dirty:
                    await self._check(context_id)
                dirty = set()
                items: list[object] = []
                with trio.move_on_at(rescan):
                    try:
                        # One check per context for everything that arrived meanwhile.
                        items.append(await sub.receive.receive())
                        while True:
                            try:
                                items.append(sub.receive.receive_nowait())
                            except trio.WouldBlock:
                                break
                    except trio.EndOfChannel:  # fell behind: the hub closed our queue
                        sub.close()
                        sub = self._hub.watch(remote_only=True, wants=self._concerns)
                        rescan = trio.current_time()
                if trio.current_time() >= rescan:
                    self._checked.clear()
                    dirty = set(self._contexts())
                    rescan = trio.current_time() + self._config.eager_rescan
                    continue
                dirty = {
                    from_b58(name)  # (each context once: a burst of writes is one)
                    for name in {i.context_id for i in items if isinstance(i, ContextEvent)}
                }
        finally:
            sub.close()

    def _concerns(self, event: ContextEvent) -> bool:
        """Whether `_check` may have something to do after `event`: not if the context runs
        the app last found not eager (most contexts, whose every received delta woke this
        task for nothing: two task steps each, issue #16)."""
        context_id = from_b58(event.context_id)
        application = self._application(context_id)
        return application is None or self._not_eager.get(context_id) != application

    async def _check(self, context_id: bytes) -> None:
        """Request the blobs an eager context references that are not stored here."""
        application = self._application(context_id)  # (before the policy: see `_concerns`)
        try:
            if await self._policy(context_id) != "eager":
                if application is not None:
                    self._not_eager[context_id] = application
                return
            self._not_eager.pop(context_id, None)
            refs = await self._references.of(context_id)
        except TrionodeError as exc:  # gone, or its app cannot load here
            log.debug("no eager blob check for %s: %s", _b58(context_id), exc)
            self._checked.pop(context_id, None)
            return
        seen = self._checked.get(context_id, frozenset())
        dropped: set[bytes] = set()
        for blob_id in refs - seen:
            if not await self._blobs.linked(context_id, blob_id) and not self.request(
                context_id, blob_id, trigger="eager"
            ):
                dropped.add(blob_id)
        self._checked[context_id] = refs - dropped


def _b58(raw: bytes) -> str:
    return base58.b58encode(raw).decode("ascii")
