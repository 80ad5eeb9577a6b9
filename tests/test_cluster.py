"""The in-process cluster harness: topologies, gossip, partitions and gossip faults.

Every test runs on `open_cluster` (MemoryNetwork, no sockets, no threads) under
`autojump_clock`: waits are event-driven (`wait_connected`, `wait_mesh`, `settle`) and time
passes only through `trio.sleep` on the mock clock, so minutes of heartbeats, pings and
redial backoff run in milliseconds. Each test bounds itself with `trio.fail_after` in virtual
seconds, so a hang fails at once instead of stalling the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing

from trionode.errors import PeerError
from trionode.net.events import GossipMessage, NetworkEvent
from trionode.net.memory import GossipFaults
from trionode.node import Node
from trionode.testing import CLUSTER_PORT, Cluster, open_cluster
from trionode.wire.keys import PeerId
from trionode.wire.pubsub_pb import PubsubMessage

TOPIC = "test/cluster"
LIMIT = 120  # virtual seconds; autojump makes a generous bound free
APPS = Path(__file__).resolve().parents[1] / "apps"


@contextmanager
def observe_gossip(nodes: list[Node]) -> Iterator[list[trio.MemoryReceiveChannel[NetworkEvent]]]:
    """One observer per node of its network event channel (what the node processed)."""
    with ExitStack() as stack:
        yield [stack.enter_context(node.events.observe()) for node in nodes]


def gossip_received(channel: trio.MemoryReceiveChannel[NetworkEvent]) -> list[bytes]:
    """The payloads of the gossip messages an observer has seen so far, in order."""
    received: list[bytes] = []
    while True:
        try:
            event = channel.receive_nowait()
        except trio.WouldBlock:
            return received
        if isinstance(event, GossipMessage) and event.topic == TOPIC:
            received.append(event.data)


async def subscribe(cluster: Cluster, indices: list[int] | None = None) -> None:
    for i in range(len(cluster)) if indices is None else indices:
        cluster[i].pubsub.subscribe(TOPIC)
    await cluster.wait_mesh(TOPIC)


def connected_pairs(cluster: Cluster) -> set[tuple[int, int]]:
    n = len(cluster)
    return {(i, j) for i in range(n) for j in range(i + 1, n) if cluster.is_connected(i, j)}


# -- topologies -------------------------------------------------------------------------------


async def test_full_mesh_connects(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(5, tmp_path) as cluster:
            assert connected_pairs(cluster) == {(i, j) for i in range(5) for j in range(i + 1, 5)}
            assert all(len(node.host.connections) == 4 for node in cluster)
            # Start-up takes no virtual time: every handshake is in-memory work.
            assert trio.current_time() == 0.0
            assert cluster.network.statistics().connections == 10
            assert cluster[2].host.addresses() == [cluster.address(2)]
            assert cluster.address(2).startswith(f"/ip4/10.42.0.3/tcp/{CLUSTER_PORT}/p2p/")
            # Every node listed the others' listen addresses through identify.
            await cluster.settle()
            conn = cluster[0].host.connections[cluster.peer_ids[1]]
            assert [str(a) for a in conn.listen_addrs] == [f"/ip4/10.42.0.2/tcp/{CLUSTER_PORT}"]


async def test_chain_connects_and_stays_a_chain(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(5, tmp_path, connect="chain") as cluster:
            chain = {(i, i + 1) for i in range(4)}
            assert connected_pairs(cluster) == chain
            # Discovery is off in clusters: a minute of heartbeats and pings adds no link.
            await trio.sleep(60)
            assert connected_pairs(cluster) == chain
            # Node j dialed node i (its bootstrap peer) for each edge (i, j).
            conn = cluster[1].host.connections[cluster.peer_ids[0]]
            assert conn.outbound


async def test_explicit_topology_and_connect(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path, connect=[(0, 1), (2, 3)]) as cluster:
            assert connected_pairs(cluster) == {(0, 1), (2, 3)}
            await cluster.connect(1, 2)
            assert connected_pairs(cluster) == {(0, 1), (1, 2), (2, 3)}
            assert cluster[1].host.connections[cluster.peer_ids[2]].outbound


# -- gossip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["full", "chain"])
async def test_gossip_reaches_every_subscriber_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, topology: Literal["full", "chain"]
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(5, tmp_path, connect=topology) as cluster:
            # In a chain every node relays, so all subscribe; in the mesh node 3 stays out.
            subscribers = [0, 1, 2, 3, 4] if topology == "chain" else [0, 1, 2, 4]
            await subscribe(cluster, subscribers)
            with observe_gossip(cluster.nodes) as seen:
                cluster[0].pubsub.publish(TOPIC, b"hello")
                await cluster.settle()
                received = [gossip_received(channel) for channel in seen]
                await trio.sleep(10)  # heartbeats and IHAVE gossip bring no second copy
                later = [gossip_received(channel) for channel in seen]
            expected = [[b"hello"] if i in subscribers[1:] else [] for i in range(5)]
            assert received == expected
            assert later == [[]] * 5


async def test_partition_stops_delivery_and_heal_restores_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Heal is by redial: each node's Host redials its bootstrap peers with backoff."""
    with trio.fail_after(LIMIT):
        async with open_cluster(5, tmp_path) as cluster:
            await subscribe(cluster)
            await cluster.partition([0, 1], [2, 3, 4])
            assert connected_pairs(cluster) == {(0, 1), (2, 3), (2, 4), (3, 4)}
            assert cluster.network.statistics().aborted == 6
            with pytest.raises(PeerError, match="cannot connect"):
                await cluster[0].host.connect(cluster.address(3))

            with observe_gossip(cluster.nodes) as seen:
                cluster[0].pubsub.publish(TOPIC, b"during")
                await trio.sleep(30)  # redials keep failing; gossip cannot cross
                received = [gossip_received(channel) for channel in seen]
            assert received == [[], [b"during"], [], [], []]

            start = trio.current_time()
            await cluster.heal()
            assert trio.current_time() - start <= 2.5  # redial_max_backoff, plus a heartbeat
            assert len(connected_pairs(cluster)) == 10
            await cluster.wait_mesh(TOPIC)
            with observe_gossip(cluster.nodes) as seen:
                cluster[3].pubsub.publish(TOPIC, b"after")
                await cluster.settle()
                received = [gossip_received(channel) for channel in seen]
            assert [b"after" in r for r in received] == [True, True, True, False, True]


async def test_heal_redials_edges_added_with_connect(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, connect="chain") as cluster:
            await cluster.connect(0, 2)
            await cluster.partition([0])
            assert connected_pairs(cluster) == {(1, 2)}
            await cluster.heal()
            assert connected_pairs(cluster) == {(0, 1), (1, 2), (0, 2)}
            assert cluster[0].host.connections[cluster.peer_ids[2]].outbound


# -- gossip faults ----------------------------------------------------------------------------


async def test_drop_everything(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    faults = GossipFaults(drop=1.0, seed=1)
    with trio.fail_after(LIMIT):
        async with open_cluster(5, tmp_path, faults=faults) as cluster:
            await subscribe(cluster)  # control traffic is never faulted
            with observe_gossip(cluster.nodes) as seen:
                cluster[0].pubsub.publish(TOPIC, b"lost")
                await trio.sleep(10)  # IHAVE/IWANT repair is dropped too
                received = [gossip_received(channel) for channel in seen]
            assert received == [[]] * 5
            stats = faults.statistics()
            assert stats.considered >= 4
            assert stats.dropped == stats.considered
            assert stats.duplicated == stats.delayed == 0


async def test_duplicates_are_delivered_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faults = GossipFaults(duplicate=1.0, seed=2)
    with trio.fail_after(LIMIT):
        async with open_cluster(5, tmp_path, faults=faults) as cluster:
            await subscribe(cluster)
            with observe_gossip(cluster.nodes) as seen:
                cluster[0].pubsub.publish(TOPIC, b"twice")
                await cluster.settle()
                received = [gossip_received(channel) for channel in seen]
            assert received == [[], [b"twice"], [b"twice"], [b"twice"], [b"twice"]]
            stats = faults.statistics()
            assert stats.considered >= 4
            assert stats.duplicated == stats.considered
            assert stats.dropped == 0
            # Each node's router saw every extra copy and ignored it as a duplicate.
            duplicates = sum(node.pubsub.statistics().duplicates for node in cluster)
            assert duplicates >= stats.duplicated


async def test_delays_reorder_without_loss(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faults = GossipFaults(max_delay=2.0, seed=3)
    payloads = [b"m%02d" % k for k in range(20)]
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path, faults=faults) as cluster:
            await subscribe(cluster)
            with observe_gossip(cluster.nodes[1:]) as seen:
                for payload in payloads:
                    cluster[0].pubsub.publish(TOPIC, payload)
                await cluster.settle()
                # Every copy is delayed on the mock clock: nothing arrived without time passing.
                assert [gossip_received(channel) for channel in seen] == [[]] * 3
                await trio.sleep(2.0)
                received = [gossip_received(channel) for channel in seen]
            for order in received:
                assert sorted(order) == payloads  # each exactly once
            assert any(order != payloads for order in received)
            assert faults.statistics().delayed >= 3 * len(payloads)


async def test_faults_can_target_one_receiver(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    victim: list[PeerId] = []

    def to_victim(receiver: PeerId, _sender: PeerId, _message: PubsubMessage) -> bool:
        return receiver in victim

    faults = GossipFaults(drop=1.0, applies=to_victim)
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path, faults=faults) as cluster:
            victim.append(cluster.peer_ids[2])
            await subscribe(cluster)
            with observe_gossip(cluster.nodes) as seen:
                cluster[0].pubsub.publish(TOPIC, b"not for 2")
                await cluster.settle()
                received = [gossip_received(channel) for channel in seen]
            assert received == [[], [b"not for 2"], [], [b"not for 2"]]
            # Every copy that reached node 2 (from 0 and relayed by 1 and 3) was dropped.
            assert faults.statistics().dropped == faults.statistics().considered >= 1
            # Switched off mid-run, the policy lets the next message through.
            faults.drop = 0.0
            with observe_gossip(cluster.nodes) as seen:
                cluster[0].pubsub.publish(TOPIC, b"now for 2")
                await cluster.settle()
                assert gossip_received(seen[2]) == [b"now for 2"]


def test_fault_decisions_are_seeded() -> None:
    peer = PeerId.from_string("12D3KooWM32qZk7tN6HDa49XXyx8QDYmveeNpzzkcbReTDUhBRFk")
    message = PubsubMessage(topic=TOPIC, data=b"x")

    def decisions(seed: int) -> list[list[float]]:
        faults = GossipFaults(drop=0.3, duplicate=0.3, max_delay=1.0, seed=seed)
        return [faults.decide(peer, peer, message) for _ in range(50)]

    assert decisions(5) == decisions(5)
    assert decisions(5) != decisions(6)
    with pytest.raises(ValueError, match="probability"):
        GossipFaults(drop=1.5)


# -- crashes and skewed clocks (the chaos profiles' tools) ------------------------------------


async def test_a_crashed_node_restarts_on_its_home_and_catches_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """`crash` resets the node's connections and kills it without a graceful stop; what it
    acknowledged survives, and after `restart` (same home, IP and peer id) it reconnects
    and syncs what it missed."""
    async with open_cluster(3, tmp_path, restartable=True) as cluster:
        app = (await cluster[0].applications.install(str(APPS / "kv_store"))).application_id
        for node in cluster.nodes[1:]:
            await node.applications.install(str(APPS / "kv_store"))
        context = (await cluster[0].contexts.create(app)).context_id
        for node in cluster.nodes[1:]:
            await node.joins.join(await cluster[0].joins.invite(context))
        await cluster[2].contexts.execute(context, "set", '{"key": "before", "value": "1"}')
        old = cluster[2]
        await cluster.crash(2)
        assert cluster.down == {2}
        assert not cluster.is_connected(0, 2)
        assert cluster.network.connections_between(cluster.hosts[0], cluster.hosts[2]) == 0
        await cluster[0].contexts.execute(context, "set", '{"key": "during", "value": "2"}')
        with trio.fail_after(LIMIT):
            node = await cluster.restart(2)
            assert node is not old
            assert cluster[2] is node
            assert node.peer_id == old.peer_id
            assert cluster.is_connected(0, 2)
            while True:
                entries = (await node.contexts.execute(context, "entries", "{}")).result
                if entries == {"before": "1", "during": "2"}:
                    break
                await trio.sleep(1)
        first = (await cluster[0].contexts.execute(context, "entries", "{}")).result
        assert first == {"before": "1", "during": "2"}


async def test_crash_needs_a_restartable_cluster(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(1, tmp_path) as cluster:
        with pytest.raises(RuntimeError, match="restartable"):
            await cluster.crash(0)


async def test_skewed_wall_clocks_follow_the_virtual_clock(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """With `clock_skews`, each node's wall clock (what stamps its writes and judges
    received stamps) is Trio's clock plus its skew, so minutes of skew cost virtual time."""
    async with open_cluster(2, tmp_path, clock_skews=[0.0, 120.0]) as cluster:
        a, b = cluster.nodes
        before = a.joins.wall_clock()
        assert b.joins.wall_clock() - before == pytest.approx(120.0)
        await trio.sleep(3600)
        assert a.joins.wall_clock() - before == pytest.approx(3600.0)
        assert b.joins.wall_clock() - a.joins.wall_clock() == pytest.approx(120.0)
