"""Periodic garbage collection: tombstones older than the retention, in every context.

Tombstones are kept for `gc.tombstone_retention` so that late concurrent writes still
resolve against them; after that they go. They never enter Merkle hashes, so when each
node runs its GC never makes two nodes' root hashes differ.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)


class GcMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.runs = Counter("trionode_gc_runs", "Garbage collection passes", registry=registry)
        self.tombstones = Counter(
            "trionode_gc_tombstones_removed", "Tombstones removed by GC", registry=registry
        )


async def run_gc_once(
    collect: Callable[[float], Awaitable[dict[str, int]]],
    retention: float,
    metrics: GcMetrics,
    *,
    wall_clock: Callable[[], float] = time.time,
) -> dict[str, int]:
    result = await collect(wall_clock() - retention)
    metrics.runs.inc()
    metrics.tombstones.inc(result.get("tombstonesRemoved", 0))
    return result


async def serve_gc(
    collect: Callable[[float], Awaitable[dict[str, int]]],
    interval: float,
    retention: float,
    metrics: GcMetrics,
    shutdown_requested: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Collect every `interval` seconds until shutdown is requested."""
    task_status.started()
    while True:
        with trio.move_on_after(interval):
            await shutdown_requested.wait()
            return
        result = await run_gc_once(collect, retention, metrics)
        if result.get("tombstonesRemoved"):
            log.info("gc removed %d tombstones", result["tombstonesRemoved"])
