"""Heal at once (issue #17 item 3): after a partition heals, a member peer's reconnection or
re-subscription to a context's topic starts a sync session right away, so convergence does
not wait for a sync heartbeat or tick. Heartbeats and ticks are pushed out of reach here
(10,000 virtual seconds), so only the heal-at-once path can converge the nodes in time."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.context.replication import SYNC_PROTOCOL, SYNC_PROTOCOL_V1
from trionode.testing import Cluster, open_cluster

from .cluster_helpers import call, metric, share, sync_sessions, wait_converged, write

QUIET = 10_000.0
"""Seconds: heartbeats and ticks that never come within a test."""


def _no_safety_net(file: FileConfig) -> FileConfig:
    return replace(file, sync=replace(file.sync, heartbeat=QUIET, interval=QUIET))


HEAL_LIMIT = 5.0
"""Virtual seconds: the reconnect (the cluster's redial backoff is at most 2 s) plus one
jittered session, far below a heartbeat or tick period."""


async def test_partition_heals_without_heartbeats(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(5, tmp_path, configure=_no_safety_net) as cluster:
        nodes = cluster.nodes
        context = await share(cluster, list(range(5)), app="chat")
        for r in range(4):
            await cluster.partition([0])
            for i, node in enumerate(nodes):
                await write(node, context, "post", text=f"r{r}n{i}")
            await trio.sleep(0.37 * r)  # heal at different phases of the redial backoff
            await cluster.heal(wait=False)
            await wait_converged(cluster, nodes, context, limit=HEAL_LIMIT)
        assert await call(nodes[-1], context, "count") == 4 * 5


def _no_jitter(file: FileConfig) -> FileConfig:
    file = _no_safety_net(file)
    return replace(file, sync=replace(file.sync, join_jitter=0.0))


async def test_heal_into_three_islands_syncs_with_every_returning_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Each node is alone; at the heal each one sees both others re-subscribe at the same
    # moment. A session with one of them must not swallow the request of the other.
    async with open_cluster(3, tmp_path, configure=_no_jitter) as cluster:
        nodes = cluster.nodes
        context = await share(cluster, [0, 1, 2], app="chat")
        await cluster.partition([0], [1, 2])
        await cluster.partition([1], [2])
        for i, node in enumerate(nodes):
            await write(node, context, "post", text=f"n{i}")
        await cluster.heal(wait=False)
        await wait_converged(cluster, nodes, context, limit=60.0)
        assert await call(nodes[2], context, "count") == 3


async def test_hub_passes_on_what_one_side_brought_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # B - A - C: B and C reach each other only through A. Whatever A pulls from one side at
    # the heal must reach the other side without waiting for a heartbeat.
    async with open_cluster(
        3, tmp_path, configure=_no_safety_net, connect=[(0, 1), (0, 2)]
    ) as cluster:
        nodes = cluster.nodes
        context = await share(cluster, [0, 1, 2], app="chat")
        await cluster.partition([0], [1, 2])
        for i, node in enumerate(nodes):
            await write(node, context, "post", text=f"n{i}")
        await cluster.heal(wait=False)
        await wait_converged(cluster, nodes, context, limit=60.0)
        assert await call(nodes[1], context, "count") == 3


SLOW = 120.0
"""Seconds: redial backoffs long enough that waiting one out would show."""


def _slow_redials(file: FileConfig) -> FileConfig:
    file = _no_safety_net(file)
    network = replace(file.network, redial_max_backoff=SLOW, member_redial_max_backoff=SLOW)
    return replace(file, network=network)


async def test_a_long_partition_heals_within_the_offline_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Nodes as they run for real (discovery dials member peers). A is cut off long enough
    # that every redial toward it, and its own toward the others, backed off to SLOW.
    async with open_cluster(5, tmp_path, configure=_slow_redials, discovery=True) as cluster:
        nodes = cluster.nodes
        context = await share(cluster, list(range(5)), app="chat")
        await trio.sleep(5)  # the member peers are recorded at pubsub heartbeats
        await cluster.partition([0])
        for i, node in enumerate(nodes):
            await write(node, context, "post", text=f"n{i}")
        await trio.sleep(1000.0)
        await cluster.heal(wait=False)
        # Alone, A kept redialing every `offline_redial_interval` (0.25 s in clusters); its
        # first connection back makes it dial every other member at once; each reconnected
        # peer's re-subscription starts a session within `sync.join_jitter` (0.2 s). (The
        # helper checks at pubsub heartbeats, every 0.5 s: hence the 1.5 s.)
        await wait_converged(cluster, nodes, context, limit=1.5)
        assert await call(nodes[-1], context, "count") == 5


async def _a_writes_alone(cluster: Cluster, context: bytes, n: int) -> None:
    """Cut node 0 (A) off; it writes a chain of `n` deltas; its gossip is gone by the heal
    (past the message cache), so only sessions bring the chain."""
    await cluster.partition([0])
    for i in range(n):
        await write(cluster.nodes[0], context, "post", text=f"a{i}")
    await trio.sleep(10)


async def test_a_healed_chain_of_twenty_deltas_comes_in_one_round_trip_per_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A writes a chain of 20 deltas alone; its gossip is gone by the heal (past the message
    # cache), so each other node pulls the chain in its session with A. Asked for with its
    # ancestors (`/trionode/sync/2`), it comes in one answer, not one round trip per delta.
    async with open_cluster(5, tmp_path, configure=_no_safety_net) as cluster:
        nodes = cluster.nodes
        context = await share(cluster, list(range(5)), app="chat")
        await _a_writes_alone(cluster, context, 20)
        before = [metric(node, "trionode_sync_delta_requests_total") for node in nodes]
        served = metric(nodes[0], "trionode_sync_served_deltas_total")
        await cluster.heal(wait=False)
        await wait_converged(cluster, nodes, context, limit=HEAL_LIMIT)
        assert await call(nodes[-1], context, "count") == 20
        requests = [
            metric(node, "trionode_sync_delta_requests_total") - before[i]
            for i, node in enumerate(nodes)
        ]
        # One request each for the chain (a second only if gossip from a peer that got it
        # first raced the session); sync/1 made 20 each.
        assert all(1 <= n <= 2 for n in requests[1:]), requests
        # (The chain came by sync, from A or from a node that had it from A first.)
        assert metric(nodes[0], "trionode_sync_served_deltas_total") - served >= 20


async def test_a_peer_that_speaks_only_sync1_is_still_synced_with(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A node from before `/trionode/sync/2` serves only /1: the requester falls back to it
    # and fetches the chain one generation per round trip, as that node understands.
    async with open_cluster(2, tmp_path, configure=_no_safety_net) as cluster:
        old, new = cluster.nodes
        old.host._handlers.pop(SYNC_PROTOCOL)
        assert SYNC_PROTOCOL_V1 in old.host._handlers
        context = await share(cluster, [0, 1], app="chat")
        await cluster.partition([0])
        for i in range(5):
            await write(old, context, "post", text=f"a{i}")
        await trio.sleep(10)  # past gossip's message cache
        before = metric(new, "trionode_sync_delta_requests_total")
        await cluster.heal(wait=False)
        await wait_converged(cluster, cluster.nodes, context, limit=HEAL_LIMIT)
        assert await call(new, context, "count") == 5
        assert metric(new, "trionode_sync_delta_requests_total") - before == 5


def _greetings_only(file: FileConfig) -> FileConfig:
    """No heartbeats or ticks, and the jittered session a peer gets when it cannot be greeted
    out of reach: only greetings (`SyncManager.on_topic_joined`) can converge the nodes."""
    file = _no_safety_net(file)
    return replace(file, sync=replace(file.sync, join_jitter=60.0))


async def test_a_reconnected_member_is_greeted_and_only_the_side_that_lacks_something_syncs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Each side greets the other with its (heads, root) as soon as it re-subscribes: B..E,
    # which lack A's chain, each start a session with A at once (no jitter, not through a
    # peer one heartbeat later); A lacks nothing, so it starts none.
    async with open_cluster(5, tmp_path, configure=_greetings_only) as cluster:
        nodes = cluster.nodes
        context = await share(cluster, list(range(5)), app="chat")
        await _a_writes_alone(cluster, context, 5)
        before = [sync_sessions(node) for node in nodes]
        greeted = metric(nodes[0], "trionode_heartbeat_batches_total", direction="received")
        await cluster.heal(wait=False)
        await wait_converged(cluster, nodes, context, limit=HEAL_LIMIT)
        assert await call(nodes[-1], context, "count") == 5
        after = [sync_sessions(node) for node in nodes]
        assert after[0] == before[0]  # A lacked nothing: no session
        assert all(after[i] - before[i] >= 1 for i in range(1, 5)), (before, after)
        # Every peer greeted A once on its new connection.
        received = metric(nodes[0], "trionode_heartbeat_batches_total", direction="received")
        assert received - greeted == 4
