"""When the network comes back, the peers we share a context with are redialed at once
(issue #17 item 3), not each after its own long backoff."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.testing import Cluster, open_cluster

from ..replication.cluster_helpers import share

SLOW = 120.0
"""Seconds: redial backoffs long enough that waiting them out would show."""


def _slow_redials(file: FileConfig) -> FileConfig:
    network = replace(file.network, redial_max_backoff=SLOW, member_redial_max_backoff=SLOW)
    return replace(file, network=network)


def _linked(cluster: Cluster) -> list[int]:
    return [j for j in range(1, len(cluster.nodes)) if cluster.is_connected(0, j)]


async def test_an_isolated_node_redials_every_member_once_one_link_is_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(4, tmp_path, discovery=True, configure=_slow_redials) as cluster:
        a = cluster.nodes[0]
        await share(cluster, [0, 1, 2, 3], app="chat")
        await trio.sleep(5)  # the member peers are recorded at pubsub heartbeats
        # A loses its peers one by one, so every redial timer toward it has its own phase.
        for j, apart in ((1, 41.0), (2, 23.0), (3, 400.0)):
            await cluster.partition([0], [j])
            await trio.sleep(apart)
        assert not _linked(cluster)
        await cluster.heal(wait=False)
        with trio.fail_after(2 * SLOW):
            while not _linked(cluster):
                await a.host.wait_connection_changed()
            first = trio.current_time()
            while len(_linked(cluster)) < 3:
                await a.host.wait_connection_changed()
        # One dial round trip, not the rest of the others' backoffs (up to SLOW seconds).
        assert trio.current_time() - first < 1.0


def _connected_to(cluster: Cluster, i: int) -> list[int]:
    return [j for j in range(len(cluster.nodes)) if j != i and cluster.is_connected(i, j)]


async def test_an_offline_node_redials_its_bootstrap_peers_at_the_offline_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # No discovery: node 3's bootstrap redial loops (toward 0, 1, 2) are the only dialers.
    async with open_cluster(4, tmp_path, configure=_slow_redials) as cluster:
        await cluster.partition([3])
        await trio.sleep(1000)  # its loops' backoffs have long reached SLOW
        await cluster.heal(wait=False)
        healed = trio.current_time()
        offline = cluster.nodes[3].config.network.offline_redial_interval
        with trio.fail_after(2 * SLOW):
            while len(_connected_to(cluster, 3)) < 3:
                await cluster.nodes[3].host.wait_connection_changed()
        # Alone, it blamed its own network and kept trying: no SLOW backoff to wait out.
        assert trio.current_time() - healed <= offline + 0.1


async def test_a_bootstrap_peer_that_comes_back_wakes_the_other_redials(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(4, tmp_path, configure=_slow_redials) as cluster:
        node = cluster.nodes[3]
        # Node 3 loses 0, then 1 (its loops toward them in different phases), keeps 2:
        # online all along, so its backoffs grow to SLOW.
        await cluster.partition([3], [0])
        await trio.sleep(41.0)
        await cluster.partition([3], [1])
        await trio.sleep(400.0)
        assert _connected_to(cluster, 3) == [2]
        await cluster.heal(wait=False)
        with trio.fail_after(2 * SLOW):
            while len(_connected_to(cluster, 3)) < 2:
                await node.host.wait_connection_changed()
            first = trio.current_time()
            while len(_connected_to(cluster, 3)) < 3:
                await node.host.wait_connection_changed()
        # The first one back is a sign the network changed: the other loop tries at once.
        assert trio.current_time() - first < 0.1
