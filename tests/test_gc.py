from __future__ import annotations

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from trionode.gc import GcMetrics, serve_gc


async def test_gc_runs_every_interval_and_stops_on_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    horizons: list[float] = []

    async def collect(horizon: float) -> dict[str, int]:
        horizons.append(horizon)
        await trio.lowlevel.checkpoint()
        return {"tombstonesRemoved": 2, "contexts": 1}

    registry = CollectorRegistry()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_gc, collect, 100.0, 50.0, GcMetrics(registry), stop)
        await trio.sleep(99)
        assert horizons == []
        await trio.sleep(2)
        assert len(horizons) == 1
        await trio.sleep(200)
        assert len(horizons) == 3
        stop.set()
    assert registry.get_sample_value("trionode_gc_runs_total") == 3.0
    assert registry.get_sample_value("trionode_gc_tombstones_removed_total") == 6.0
