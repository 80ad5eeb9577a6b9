"""A session asked for while another ran is checked again before it runs (issue #16, the
100-node scale row): under load every heartbeat showing heads still in flight queued one
session per peer behind the running one, and each ran after it whether or not gossip had
brought those heads meanwhile. It now runs only if they are still unknown here (or
deltas here wait for parents)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from trionode.net.memory import GossipFaults
from trionode.testing import open_cluster
from trionode.wire.keys import PeerId
from trionode.wire.messages import Heartbeat

from .cluster_helpers import metric, no_sync_timers, share, write


async def _queued_behind_a_held_session(tmp_path: Path, *, arrives: bool) -> tuple[float, bool]:
    """B writes a delta gossip brings to nobody; B's heartbeat naming it reaches A while A
    runs a session with C (held at its heads exchange); then, if `arrives`, A fetches it
    from B. A's session ends: (A's sessions ended as "arrived", whether A holds the delta)."""
    faults = GossipFaults()
    async with open_cluster(3, tmp_path, faults=faults, configure=no_sync_timers) as cluster:
        a, b = cluster[0], cluster[1]
        context = await share(cluster, [0, 1, 2])
        b_id = cluster.peer_ids[1]

        def not_to_b(receiver: PeerId, *_: Any) -> bool:
            return receiver != b_id

        faults.applies, faults.drop = not_to_b, 1.0
        new = await write(b, context, "set", key="k", value="v")
        await cluster.settle()
        assert not await a.contexts.applied(context, [new])
        entered, release = trio.Event(), trio.Event()
        ask = a.replicator.ask_heads_on

        async def held(channel: Any, context_id: bytes) -> Any:
            entered.set()
            await release.wait()
            return await ask(channel, context_id)

        a.replicator.ask_heads_on = held  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.sync.sync_now, context, cluster.peer_ids[2])
            await entered.wait()
            root, _, _ = await b.contexts.state(context)
            beat = Heartbeat(context_id=context, heads=[new], root_hash=root)
            await a.sync._on_heartbeat(b_id, beat)
            if arrives:
                await a.replicator.fetch(b_id, context, {new})
            a.replicator.ask_heads_on = ask  # type: ignore[method-assign]
            release.set()
        await cluster.settle()
        arrived = metric(a, "trionode_sync_sessions_total", protocol="none", outcome="arrived")
        return arrived, bool(await a.contexts.applied(context, [new]))


async def test_a_queued_session_whose_heads_arrived_meanwhile_does_not_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    assert await _queued_behind_a_held_session(tmp_path, arrives=True) == (1, True)


async def test_a_queued_session_whose_heads_are_still_lacking_runs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    assert await _queued_behind_a_held_session(tmp_path, arrives=False) == (0, True)
