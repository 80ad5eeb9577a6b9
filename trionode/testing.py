"""Helpers to run several nodes inside one test (or benchmark, or demo) process.

Each node gets its own home under a base directory, its own datastore, metrics registry and
API app: nothing is process-global.

* :func:`open_test_node` / :func:`open_test_nodes`: real nodes on loopback TCP (ports chosen
  by the OS), API on; for tests that need sockets or the HTTP API. Keep the real clock.
* :func:`open_cluster`: ``n`` nodes on an in-process :class:`~trionode.net.memory.MemoryNetwork`
  (no sockets, no threads), connected in a chosen topology, with partitions and gossip faults,
  optionally skewed wall clocks and nodes that crash and restart on their home;
  made for ``autojump_clock``::

      async def test_gossip(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
          async with open_cluster(3, tmp_path, connect="chain") as cluster:
              for node in cluster.nodes:
                  node.pubsub.subscribe("t")
              await cluster.wait_mesh("t")
              with cluster.nodes[2].events.observe() as seen:
                  cluster.nodes[0].pubsub.publish("t", b"hi")
                  await cluster.settle()
                  assert seen.receive_nowait().data == b"hi"
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final, Literal

import attrs
import trio
import trio.testing
from msgspec.structs import replace

from trionode.client import Client, open_client
from trionode.config import FileConfig, NodeConfig, load_config
from trionode.home import init_home
from trionode.identity import NodeIdentity
from trionode.net.memory import GossipFaults, MemoryNetwork, MemoryTransport
from trionode.node import Node, open_node
from trionode.wire.keys import PeerId

ConfigureFn = Callable[[FileConfig], FileConfig]


@attrs.frozen
class TestNode:
    """A running node plus what a test needs to talk to it."""

    __test__ = False  # not a pytest class

    node: Node
    home: Path
    token: str

    @property
    def api_url(self) -> str:
        return self.node.api_url

    def client(self) -> AbstractAsyncContextManager[Client]:
        return open_client(self.api_url, self.token)


def make_test_config(
    home: Path,
    *,
    api: bool = True,
    configure: ConfigureFn | None = None,
    passphrase: str | None = None,
) -> tuple[NodeConfig, str]:
    """Initialise `home` with port-0 listeners and return its config and API token."""
    result = init_home(home, swarm_port=0, server_port=0, swarm_host="127.0.0.1")
    config = load_config(home)
    file = config.file
    # No mDNS in tests: test nodes must not find each other (or strangers) on the real link.
    file = replace(file, network=replace(file.network, mdns=False))
    if not api:
        file = replace(file, api=replace(file.api, enabled=False))
    if configure is not None:
        file = configure(file)
    return NodeConfig(home=home, file=file, passphrase=passphrase), result.token


@asynccontextmanager
async def open_test_node(
    home: Path,
    *,
    api: bool = True,
    configure: ConfigureFn | None = None,
    passphrase: str | None = None,
) -> AsyncIterator[TestNode]:
    config, token = make_test_config(home, api=api, configure=configure, passphrase=passphrase)
    async with open_node(config) as node:
        yield TestNode(node=node, home=home, token=token)


@asynccontextmanager
async def open_test_nodes(
    n: int, base: Path, *, api: bool = True, configure: ConfigureFn | None = None
) -> AsyncIterator[list[TestNode]]:
    """Start `n` nodes (homes `base/node0` …) and stop them all on exit, last first."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_test_node(base / f"node{i}", api=api, configure=configure)
            )
            for i in range(n)
        ]
        yield nodes


# -- in-process clusters ----------------------------------------------------------------------

CLUSTER_PORT: Final = 4001
"""Every cluster node listens on ``/ip4/<its virtual IP>/tcp/4001``."""

Topology = Literal["full", "chain", "none"] | Sequence[tuple[int, int]]
"""Which nodes ``open_cluster`` connects: every pair, ``i``-``i+1``, none, or explicit edges."""


def cluster_file_config(file: FileConfig) -> FileConfig:
    """The settings every cluster node starts from (before the test's ``configure``):
    no API, no mDNS, short timers so that a few virtual seconds cover reconnects and repairs.
    """
    return replace(
        file,
        node=replace(file.node, shutdown_grace=2.0),
        network=replace(
            file.network,
            mdns=False,
            # Like discovery: DHT lookups dial whom they learn of and would change the
            # topology a test built; tests of the DHT switch it on.
            kad=replace(file.network.kad, enabled=False),
            ping_interval=5.0,
            ping_timeout=2.0,
            handshake_timeout=5.0,
            dial_timeout=5.0,
            negotiation_timeout=5.0,
            redial_initial_backoff=0.5,
            redial_max_backoff=2.0,
            offline_redial_interval=0.25,
        ),
        pubsub=replace(file.pubsub, heartbeat_interval=0.5),
        api=replace(file.api, enabled=False),
    )


class Cluster:
    """In-process nodes on one :class:`MemoryNetwork`. Made by :func:`open_cluster`.

    Node ``i`` is ``cluster.nodes[i]`` (also ``cluster[i]``; a cluster unpacks into its
    nodes), at virtual IP ``cluster.hosts[i]``. ``edges`` is the topology the helpers keep and
    wait for: pairs ``(i, j)`` with ``i < j``.

    Every helper that waits is event-driven: it re-checks its condition after
    :meth:`settle`, and again after each connection change or pubsub heartbeat of any node;
    it never sleeps. None of them has a timeout: wrap them in ``trio.fail_after`` (virtual
    seconds under ``autojump_clock``, so a generous bound costs nothing).
    """

    def __init__(
        self,
        network: MemoryNetwork,
        *,
        faults: GossipFaults | None,
        hosts: list[str],
        homes: list[Path],
        peer_ids: list[PeerId],
        edges: Iterable[tuple[int, int]],
    ) -> None:
        self.network = network
        self.faults = faults
        """The gossip fault policy every node consults (None: no message faults)."""
        self.hosts = hosts
        self.homes = homes
        self.peer_ids = peer_ids
        self.nodes: list[Node] = []
        self.down: set[int] = set()
        """Nodes crashed (:meth:`crash`) and not restarted yet: ``nodes[i]`` is their last run."""
        self.edges: set[tuple[int, int]] = set(edges)
        # Edges whose dialer (the higher index) has the other as a bootstrap peer, so its
        # Host redials them by itself after a partition; other edges heal() redials.
        self._redialed = set(self.edges)
        self._dialer: dict[tuple[int, int], int] = {edge: edge[1] for edge in self.edges}
        self._slots: list[_Slot] = []
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def address(self, i: int) -> str:
        """Node ``i``'s listen address with ``/p2p/<peer id>``."""
        return f"/ip4/{self.hosts[i]}/tcp/{CLUSTER_PORT}/p2p/{self.peer_ids[i]}"

    def index(self, peer: PeerId | str) -> int:
        """Which node has ``peer`` as its peer id."""
        text = str(peer)
        for i, peer_id in enumerate(self.peer_ids):
            if str(peer_id) == text:
                return i
        raise KeyError(f"{peer} is not a node of this cluster")

    def is_connected(self, i: int, j: int) -> bool:
        """Whether both nodes hold an open connection to each other."""
        return _has_connection(self.nodes[i], self.peer_ids[j]) and _has_connection(
            self.nodes[j], self.peer_ids[i]
        )

    # -- waiting ---------------------------------------------------------------------------

    async def settle(self) -> None:
        """Wait until every task is blocked (``trio.testing.wait_all_tasks_blocked``).

        Under ``autojump_clock`` virtual time advances only when all tasks block, and a task
        waiting here is woken *before* the clock jumps. So ``settle()`` lets everything that
        needs no time finish (bytes in flight, handshakes, gossip hops, event handlers) and
        lets no timer fire. To let time pass, sleep: ``await trio.sleep(10)`` runs ten
        virtual seconds of heartbeats, pings and timeouts in a few milliseconds.

        This holds because cluster nodes use no sockets and no threads (the datastore runs
        inline); anything that waits for a worker thread would look idle too.
        """
        await trio.testing.wait_all_tasks_blocked()

    async def wait_connected(self) -> None:
        """Wait until every edge not cut by a partition is up on both ends, including
        each side's gossipsub link (the peer is in the other's router)."""
        await self._wait_until(self._topology_up)

    async def wait_mesh(self, topic: str) -> None:
        """Wait until gossip on ``topic`` can reach every subscriber.

        For every node subscribed to ``topic``: each connected neighbour that subscribes is
        known to it as a subscriber, and its mesh holds ``min(pubsub.d, such neighbours)``
        peers. Needs heartbeats, so virtual time passes.
        """
        await self._wait_until(lambda: self._mesh_ready(topic))

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while True:
            await self.settle()
            if predicate():
                return
            await self._next_change()

    async def _next_change(self) -> None:
        """Return at the next connection change or pubsub heartbeat of any node. A change
        between the caller's check and this wait is caught by the next heartbeat."""
        async with trio.open_nursery() as nursery:
            for i, node in enumerate(self.nodes):
                if i in self.down:
                    continue
                for wait in (node.host.wait_connection_changed, node.pubsub.wait_heartbeat):
                    nursery.start_soon(_cancel_after, wait, nursery.cancel_scope)

    # -- topology --------------------------------------------------------------------------

    async def connect(self, i: int, j: int) -> None:
        """Node ``i`` dials node ``j`` (unless connected) and waits until the link is up.

        The edge joins :attr:`edges`. Unlike the edges ``open_cluster`` made, it is not a
        bootstrap peer: after a partition, :meth:`heal` redials it.
        """
        edge = _edge(i, j, len(self.nodes))
        self.edges.add(edge)
        self._dialer.setdefault(edge, i)
        await self.nodes[i].host.connect(self.address(j))
        await self._wait_until(lambda: self._edge_up(edge))

    async def partition(self, group_a: Iterable[int], group_b: Iterable[int] | None = None) -> None:
        """Cut the network between two groups of nodes (``group_b`` defaults to the rest).

        Dials across fail and connections across are aborted
        (:meth:`MemoryNetwork.partition`); returns once no node holds a connection across.
        Edges across stay in :attr:`edges` and are waited for again after :meth:`heal`.
        """
        a = sorted(set(group_a))
        b = (
            sorted(set(range(len(self.nodes))) - set(a))
            if group_b is None
            else sorted(set(group_b))
        )
        self.network.partition([self.hosts[k] for k in a], [self.hosts[k] for k in b])

        def separated() -> bool:
            return not any(
                _has_connection(self.nodes[x], self.peer_ids[y])
                or _has_connection(self.nodes[y], self.peer_ids[x])
                for x in a
                for y in b
                if x not in self.down and y not in self.down
            )

        await self._wait_until(separated)

    async def heal(self, *, wait: bool = True) -> None:
        """Lift every partition; with ``wait``, return once every edge is up again.

        Edges made by ``open_cluster`` come back by themselves: the higher-numbered node has
        the other as a bootstrap peer and its Host redials with backoff (at most
        ``network.redial_max_backoff`` = 2 virtual seconds in clusters), as a real node
        would. Edges added with :meth:`connect` are redialed here, in order.
        """
        self.network.heal()
        if not wait:
            return
        for edge in sorted(self.edges - self._redialed):
            if not self.down.intersection(edge) and not self.is_connected(*edge):
                dialer = self._dialer[edge]
                other = edge[0] if dialer == edge[1] else edge[1]
                await self.nodes[dialer].host.connect(self.address(other))
        await self.wait_connected()

    # -- crashes ---------------------------------------------------------------------------

    async def crash(self, i: int) -> None:
        """Kill node ``i`` as ``kill -9`` would (clusters opened with ``restartable``).

        Its connections are reset at once (the peers see what a dead process leaves: a
        reset), then its tasks are cancelled wherever they are; no graceful shutdown runs.
        What it committed to its datastore stays: datastore writes in a cluster are single
        synchronous LMDB transactions, so a crash falls between two of them. Returns once the
        node has stopped; ``nodes[i]`` stays its (dead) last run until :meth:`restart`.
        """
        slot = self._slot(i)
        self.network.disconnect(self.hosts[i])
        self.down.add(i)
        if slot.scope is not None:
            slot.scope.cancel(reason="crash")
        await slot.stopped.wait()

    async def restart(self, i: int, *, wait: bool = True) -> Node:
        """Start crashed node ``i`` again on the same home, IP and port; with ``wait``, return
        once its edges are up again (it redials its bootstrap peers, the others redial it)."""
        slot = self._slot(i)
        if i not in self.down:
            raise ValueError(f"node {i} is running")
        assert self._nursery is not None
        node: Node = await self._nursery.start(_run_slot, slot, self.faults)
        self.nodes[i] = node
        self.down.discard(i)
        if wait:
            await self.wait_connected()
        return node

    def _slot(self, i: int) -> _Slot:
        if not self._slots:
            raise RuntimeError("crash/restart need open_cluster(..., restartable=True)")
        return self._slots[i]

    def _edge_up(self, edge: tuple[int, int]) -> bool:
        i, j = edge
        a, b = self.nodes[i], self.nodes[j]
        return (
            self.is_connected(i, j)
            and self.peer_ids[j] in a.pubsub.router.peers()
            and self.peer_ids[i] in b.pubsub.router.peers()
        )

    def _topology_up(self) -> bool:
        started = len(self.nodes)
        return all(
            self._edge_up(edge)
            for edge in self.edges
            if edge[1] < started
            and not self.down.intersection(edge)
            and self.network.reachable(self.hosts[edge[0]], self.hosts[edge[1]])
        )

    def _mesh_ready(self, topic: str) -> bool:
        subscribed = [
            i not in self.down and topic in node.pubsub.topics()
            for i, node in enumerate(self.nodes)
        ]
        for i, node in enumerate(self.nodes):
            if not subscribed[i]:
                continue
            neighbours = {
                self.peer_ids[j]
                for j in range(len(self.nodes))
                if j != i and subscribed[j] and _has_connection(node, self.peer_ids[j])
            }
            if not neighbours <= set(node.pubsub.topic_peers(topic)):
                return False
            if len(node.pubsub.mesh_peers(topic)) < min(node.config.pubsub.d, len(neighbours)):
                return False
        return True


@asynccontextmanager
async def open_cluster(
    n: int,
    base_dir: Path,
    *,
    network: MemoryNetwork | None = None,
    faults: GossipFaults | None = None,
    configure: ConfigureFn | None = None,
    connect: Topology = "full",
    discovery: bool = False,
    restartable: bool = False,
    clock_skews: Sequence[float] | None = None,
) -> AsyncIterator[Cluster]:
    """Start ``n`` nodes on an in-process network, connect them, yield a :class:`Cluster`.

    Node ``i`` gets home ``base_dir/node<i>``, virtual IP ``10.42.0.<i+1>`` (with the default
    network) and listens on port 4001. Settings: :func:`cluster_file_config`, then
    ``configure`` (it cannot change ``network.listen``/``network.bootstrap``, which the
    topology sets). Datastore calls run inline on the Trio thread (``inline_store``), so
    the cluster is safe under ``autojump_clock`` (see :meth:`Cluster.settle`).

    Start-up is deterministic: nodes start one at a time, in order; for each edge
    ``(i, j)`` with ``i < j``, node ``j`` dials node ``i`` (node ``i`` is its bootstrap
    peer, so it also redials after a partition); node ``j + 1`` starts only once node
    ``j``'s edges are up, gossipsub links included. Discovery is off unless ``discovery``,
    so the topology stays the one asked for.

    On exit the network refuses new dials (nobody redials a stopping peer), every node is
    asked to shut down at once, then they are joined, last first.

    Args:
        n: number of nodes.
        base_dir: where the node homes go (e.g. ``tmp_path``).
        network: the network to use (default: a new :class:`MemoryNetwork`); closed on exit.
        faults: gossip message faults applied by every node (:class:`GossipFaults`).
        configure: adjusts each node's file config (e.g. pubsub degrees).
        connect: ``"full"``, ``"chain"``, ``"none"`` or a list of ``(i, j)`` edges.
        discovery: run peer discovery (peer exchange + dialing toward ``target_peers``).
        restartable: run each node in its own task so that :meth:`Cluster.crash` and
            :meth:`Cluster.restart` can kill one and start it again on its home.
        clock_skews: seconds each node's wall clock is ahead (negative: behind). Given, every
            node's wall clock follows Trio's clock (``autojump_clock`` moves it too) plus its
            skew, so waiting for a skewed peer's stamps costs virtual time only.
    """
    if n < 1:
        raise ValueError("a cluster needs at least one node")
    network = network if network is not None else MemoryNetwork()
    edges = _topology(n, connect)
    transports = [network.transport() for _ in range(n)]
    hosts = [transport.host for transport in transports]
    homes = [base_dir / f"node{i}" for i in range(n)]
    peer_ids: list[PeerId] = []
    configs: list[NodeConfig] = []
    for i, home in enumerate(homes):
        listen = [f"/ip4/{hosts[i]}/tcp/{CLUSTER_PORT}"]
        bootstrap = [
            f"/ip4/{hosts[k]}/tcp/{CLUSTER_PORT}/p2p/{peer_ids[k]}"
            for k in range(i)
            if (k, i) in edges
        ]

        def settings(
            file: FileConfig, listen: list[str] = listen, bootstrap: list[str] = bootstrap
        ) -> FileConfig:
            file = cluster_file_config(file)
            if configure is not None:
                file = configure(file)
            return replace(file, network=replace(file.network, listen=listen, bootstrap=bootstrap))

        config, _token = make_test_config(home, api=False, configure=settings)
        configs.append(replace(config, inline_store=True, discovery=discovery))
        peer_ids.append(NodeIdentity.load(config.identity_path).peer_id_obj)
    cluster = Cluster(
        network, faults=faults, hosts=hosts, homes=homes, peer_ids=peer_ids, edges=edges
    )
    if clock_skews is not None and len(clock_skews) != n:
        raise ValueError(f"clock_skews needs one skew per node ({n})")
    clocks = [
        time.time if clock_skews is None else _virtual_wall_clock(s)
        for s in clock_skews or [0.0] * n
    ]
    if restartable:
        cluster._slots = [  # noqa: SLF001 - the cluster's owner
            _Slot(config, transport, clock)
            for config, transport, clock in zip(configs, transports, clocks, strict=True)
        ]
        async with _running_slots(cluster) as started:
            yield started
        return
    async with AsyncExitStack() as stack:
        try:
            for config, transport, clock in zip(configs, transports, clocks, strict=True):
                node = await stack.enter_async_context(
                    open_node(config, transport=transport, gossip_faults=faults, wall_clock=clock)
                )
                cluster.nodes.append(node)
                await cluster.wait_connected()
            yield cluster
        finally:
            network.close()
            for node in cluster.nodes:
                node.request_shutdown()


@attrs.define
class _Slot:
    """What a restartable cluster node needs to start again: the same home, IP and clock."""

    config: NodeConfig
    transport: MemoryTransport
    wall_clock: Callable[[], float]
    scope: trio.CancelScope | None = None
    stopped: trio.Event = attrs.field(factory=trio.Event)


async def _run_slot(
    slot: _Slot, faults: GossipFaults | None, *, task_status: trio.TaskStatus[Node]
) -> None:
    """One run of a restartable node: until it is asked to shut down or crashes."""
    slot.stopped = trio.Event()
    try:
        with trio.CancelScope() as scope:
            slot.scope = scope
            async with open_node(
                slot.config,
                transport=slot.transport,
                gossip_faults=faults,
                wall_clock=slot.wall_clock,
            ) as node:
                task_status.started(node)
                await node.shutdown_requested.wait()
    finally:
        slot.scope = None
        slot.stopped.set()


@asynccontextmanager
async def _running_slots(cluster: Cluster) -> AsyncIterator[Cluster]:
    """Start a restartable cluster's nodes one at a time, each in its own task; on exit
    ask every running node to shut down at once and join them last first."""
    async with trio.open_nursery() as nursery:
        cluster._nursery = nursery  # noqa: SLF001 - the cluster's owner
        try:
            for slot in cluster._slots:  # noqa: SLF001
                cluster.nodes.append(await nursery.start(_run_slot, slot, cluster.faults))
                await cluster.wait_connected()
            yield cluster
        finally:
            cluster.network.close()
            for i, node in enumerate(cluster.nodes):
                if i not in cluster.down:
                    node.request_shutdown()
            for slot in reversed(cluster._slots[: len(cluster.nodes)]):  # noqa: SLF001
                await slot.stopped.wait()


def _virtual_wall_clock(skew: float) -> Callable[[], float]:
    """Unix time that moves with Trio's clock (so with ``autojump_clock``), ``skew`` ahead."""
    offset = time.time() - trio.current_time() + skew

    def now() -> float:
        return trio.current_time() + offset

    return now


def _topology(n: int, connect: Topology) -> set[tuple[int, int]]:
    if connect == "full":
        return {(i, j) for i in range(n) for j in range(i + 1, n)}
    if connect == "chain":
        return {(i, i + 1) for i in range(n - 1)}
    if connect == "none":
        return set()
    return {_edge(i, j, n) for i, j in connect}


def _edge(i: int, j: int, n: int) -> tuple[int, int]:
    if not (0 <= i < n and 0 <= j < n) or i == j:
        raise ValueError(f"bad edge ({i}, {j}) for {n} nodes")
    return (i, j) if i < j else (j, i)


def _has_connection(node: Node, peer: PeerId) -> bool:
    conn = node.host.connections.get(peer)
    return conn is not None and not conn.closed


async def _cancel_after(wait: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()
