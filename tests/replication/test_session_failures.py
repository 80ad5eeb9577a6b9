"""Why sync sessions fail, counted (`trionode_sync_session_failures{protocol, reason}`).

Under load a session that outlives `sync.timeout` used to show only as `delta/failed` (its
fetch sees a cancellation, so no fetch failure is counted either), and a peer that turned
the session away because it ran `max_concurrent` sessions looked like any refusal: the
scale bench needs both apart to tell the simulation's capacity from a liveness bug.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trionode.sync.errors import PeerBusy
from trionode.testing import open_cluster

from .cluster_helpers import metric, no_sync_timers, share


def failures(node: Any, protocol: str, reason: str) -> float:
    return metric(node, "trionode_sync_session_failures_total", protocol=protocol, reason=reason)


async def test_a_session_cut_by_its_timeout_counts_as_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=no_sync_timers) as cluster:
        a, b = cluster[0], cluster[1]
        context = await share(cluster, [0, 1])
        stalled = trio.Event()

        async def stall(*_: Any) -> Any:
            stalled.set()
            await trio.sleep_forever()

        b.contexts.capture = stall  # type: ignore[assignment]  # never answers heads
        with pytest.raises(trio.TooSlowError):
            await a.sync.sync_now(context, cluster.peer_ids[1])
        assert stalled.is_set()
        assert failures(a, "none", "timeout") == 1
        assert metric(a, "trionode_sync_sessions_total", protocol="none", outcome="failed") == 1


async def test_a_busy_peer_is_counted_apart_from_other_refusals(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=no_sync_timers) as cluster:
        a, b = cluster[0], cluster[1]
        context = await share(cluster, [0, 1])
        limiter = b.sync.limiter
        holders = [object() for _ in range(int(limiter.total_tokens))]
        for holder in holders:
            limiter.acquire_on_behalf_of_nowait(holder)
        with pytest.raises(PeerBusy):
            await a.sync.sync_now(context, cluster.peer_ids[1])
        assert failures(a, "none", "peer_busy") == 1
        assert failures(a, "none", "peer_refused") == 0
        for holder in holders:
            limiter.release_on_behalf_of(holder)
        await a.sync.sync_now(context, cluster.peer_ids[1])
        assert failures(a, "none", "peer_busy") == 1
