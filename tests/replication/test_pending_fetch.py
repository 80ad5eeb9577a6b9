"""A missing-parent fetch asks only for what is still missing when its turn comes (issue
#16's 100-node row): under load fetches queue behind `max_concurrent_fetches`, and gossip
often brings the parent meanwhile (a child overtook it on another path). Such a fetch opens
no stream at all (`trionode_delta_fetches_total{outcome="arrived"}`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trionode.dag import delta as delta_module
from trionode.dag.delta import DeltaHeader, SignedDelta, verify_delta
from trionode.testing import open_cluster

from .cluster_helpers import metric, no_sync_timers, share, write


async def test_a_queued_fetch_whose_parent_arrived_meanwhile_opens_no_stream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=no_sync_timers) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1], app="chat")
        await cluster.partition([0])  # (only what the test hands B reaches it)
        first = await a.contexts.read_delta(context, await write(a, context, "post", text="1"))
        second = await a.contexts.read_delta(context, await write(a, context, "post", text="2"))
        assert first is not None
        assert second is not None
        requests = metric(b, "trionode_sync_delta_requests_total")
        # Every fetch slot is taken: the fetch for `first` waits its turn.
        limit = b.replicator._fetch_limit
        holders = [object() for _ in range(int(limit.total_tokens))]
        for holder in holders:
            limit.acquire_on_behalf_of_nowait(holder)
        await b.replicator.receive_from(a.host.peer_id, context, second)
        assert await b.contexts.missing(context)
        await trio.testing.wait_all_tasks_blocked()
        # Meanwhile gossip (here: the test) brings it.
        await b.replicator.receive_from(a.host.peer_id, context, first)
        assert not await b.contexts.missing(context)
        for holder in holders:
            limit.release_on_behalf_of(holder)
        await trio.testing.wait_all_tasks_blocked()
        assert metric(b, "trionode_delta_fetches_total", outcome="arrived") == 1
        assert metric(b, "trionode_delta_fetches_total", outcome="failed") == 0
        assert metric(b, "trionode_sync_delta_requests_total") == requests
        _, pending, _ = await b.contexts.state(context)
        assert await b.contexts.applied(context, pending) == set(pending)


async def test_a_fetched_chain_is_verified_once_per_delta(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fetch's machine checks each delta's signature as it reads the answer; handing
    # the pipeline the verified deltas (not their bytes) spares a second Ed25519 check.
    async with open_cluster(2, tmp_path, configure=no_sync_timers) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1], app="chat")
        await cluster.partition([0])
        ids = [await write(a, context, "post", text=str(i)) for i in range(3)]
        await cluster.heal()
        checked: list[bytes] = []

        def counting(signed: SignedDelta, **kwargs: Any) -> DeltaHeader:
            checked.append(signed.id)
            return verify_delta(signed, **kwargs)

        monkeypatch.setattr(delta_module, "verify_delta", counting)
        assert await b.replicator.fetch(a.host.peer_id, context, {ids[-1]}) == 3
        assert sorted(checked) == sorted(ids)
        _, heads, _ = await b.contexts.state(context)
        assert heads == [ids[-1]]
