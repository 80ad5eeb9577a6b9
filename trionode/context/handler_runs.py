"""Handler runs: the app event handlers that received deltas queued, run once each as this
node's member, each a job of the delta processor (`pipeline.py`).

A received delta's app events are queued (the `handler-run/` rows) in the same write that
applies it; a run removes its queue entry in the same write that commits the delta its
handlers produce, so a crash replays a run at most once, and never loses one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import msgspec
import trio

from trionode.auth.model import WRITERS
from trionode.context.app_choice import running_app
from trionode.context.errors import WaitingForApp
from trionode.context.local_writes import AppLoader, LocalWriter
from trionode.context.pipeline import DeltaPipeline, LocalJob
from trionode.context.processing import ReplicationMetrics
from trionode.context.records import HANDLER_PREFIX, HANDLER_RUNS, HandlerRun
from trionode.context.replicas import Replica, ReplicaStore
from trionode.sdk.app import App
from trionode.sdk.errors import AppError
from trionode.sdk.runtime import CallOutcome, run_handler

log = logging.getLogger(__name__)


class HandlerRunner:
    def __init__(
        self,
        replicas: ReplicaStore,
        writer: LocalWriter,
        apps: AppLoader,
        metrics: ReplicationMetrics,
        pipeline: DeltaPipeline,
        *,
        read_only: bool = False,
    ) -> None:
        self._replicas = replicas
        self._read_only = read_only
        self._writer = writer
        self._apps = apps
        self._metrics = metrics
        self._pipeline = pipeline
        self._lock = trio.Lock()

    async def run_pending_handlers(self) -> int:
        """Run every queued handler once, as this node's member; each run commits its own
        delta together with the removal of its queue entry (so a crash replays it once)."""
        if self._read_only:
            return 0  # runs queued while the node was read-write wait for that mode again
        async with self._lock:  # one runner at a time, or a run could happen twice
            ran = 0
            store = self._replicas.store
            for key, run in await store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX):
                context_id = key[len(HANDLER_PREFIX) : len(HANDLER_PREFIX) + 32]
                if not self._replicas.knows(context_id):
                    continue
                replica = await self._replicas.load(context_id)
                try:
                    app = await running_app(self._apps, self._replicas, replica)
                except WaitingForApp:
                    continue  # its runs wait for the app the context moved to (queued)
                await self._pipeline.write(context_id, partial(self._stage, key, app, run))
                ran += 1
            return ran

    def _stage(
        self, key: bytes, app: App, run: HandlerRun, job: LocalJob
    ) -> tuple[None, Callable[[], None] | None]:
        """One run as a delta processor job: its delta and the removal of its queue entry
        commit together."""
        job.progress.mutated = True  # (handlers change the state tree as they run)
        job.batch.delete(HANDLER_RUNS, key)
        outcome = self._run(app, job.replica, run)
        if outcome is None or not (outcome.delta_records or outcome.events):
            return None, None
        _, after = self._writer.stage_outcome(
            job.replica, outcome, job.batch, job.fresh, job.changes
        )
        return None, after

    def _run(self, app: App, replica: Replica, run: HandlerRun) -> CallOutcome | None:
        """Every handler of `run`'s event, their changes merged (None: nothing ran)."""
        outcome: CallOutcome | None = None
        for handler in app.handlers_for(run.name):
            try:
                result = run_handler(
                    app,
                    replica.tree,
                    replica.clock,
                    self._replicas.physical_now(),
                    handler,
                    run.payload,
                    executor=replica.record.our_member,
                    context_id=replica.context_id,
                    writable=replica.authority.role(replica.record.our_member) in WRITERS,
                )
            except AppError as exc:
                self._metrics.handler_run(ok=False)
                log.warning("handler %s for %s failed: %s", handler, run.name, exc)
                continue
            self._metrics.handler_run(ok=True)
            outcome = _merge(outcome, result)
        return outcome


def _merge(a: CallOutcome | None, b: CallOutcome) -> CallOutcome:
    if a is None:
        return b
    return msgspec.structs.replace(
        b, delta_records=[*a.delta_records, *b.delta_records], events=[*a.events, *b.events]
    )
