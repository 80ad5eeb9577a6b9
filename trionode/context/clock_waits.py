"""The task that applies deltas once our clock has caught up with their stamps.

A received delta stamped more than `sync.max_clock_drift` ahead of our wall clock is valid
but waits (pending, persisted; see `DeltaProcessor.apply_one` in `processing.py`). This
task sleeps until the earliest such wait is over, or until a new one starts, then lets the
manager apply what is due. It uses Trio's clock, so under `autojump_clock` an hour's wait
costs nothing.
"""

from __future__ import annotations

import logging
import math

import trio

from trionode.context.manager import ContextManager

log = logging.getLogger(__name__)


async def serve_clock_waits(
    contexts: ContextManager,
    shutdown_requested: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_release_loop, contexts)
        task_status.started()
        await shutdown_requested.wait()
        nursery.cancel_scope.cancel(reason="node shutting down")


async def _release_loop(contexts: ContextManager) -> None:
    # Deltas that waited when the node stopped wait in contexts not loaded yet.
    await contexts.load_waiting()
    while True:
        # Take the event before reading the deadline: a wait that starts in between sets it.
        woken = contexts.deferral_wakeup()
        due = contexts.next_release()
        with trio.move_on_at(math.inf if due is None else due):
            await woken.wait()
        released = await contexts.release_deferred()
        if released:
            log.info("applied %d deltas whose stamps our clock has caught up with", released)
