"""The root nursery: the only place that wires the node's services together.

```
open_node(config) ── root nursery
   ├─ serve_delta_processor  the one task that applies and commits deltas, local calls and
   │                    received ones alike, in group commits (context/pipeline.py)
   ├─ Host.run         p2p listeners, bootstrap dialers, one nursery per peer connection
   ├─ NetworkEvents.run the network event channel's consumer (bounded; full = drop and count,
   │                    see net/events.py): gossip messages and peers up/down, for now logged
   ├─ watch_peers      emits PeerConnected/PeerDisconnected into that channel
   ├─ PubSub.run       gossipsub: heartbeat, one writer per peer (readers run in Host's
   │                    connection nurseries); delivered messages go to the event channel
   ├─ AutoNat.run      (if `network.autonat`) asks peers to dial us back: public/private
   ├─ RelayClient.run  keeps a Circuit Relay v2 reservation on each `network.relays` entry
   │                    (`learn_relays`: while AutoNAT says private and none is configured,
   │                    on connected peers that offer the hop protocol instead)
   │                    (relayed connections run in the relay connection's stream task;
   │                    with `network.relay.serve` the hop handler splices circuits too)
   ├─ HolePuncher.run  DCUtR: each relayed connection we received is hole punched into a
   │                    direct one where the NATs allow (`network.dcutr`)
   ├─ Kademlia.run     (if `network.kad.enabled`) DHT routing-table refresh (a lookup of our
   │                    own id); requests to us are served in the Host's connection nurseries
   ├─ Rendezvous.run   (with the DHT) announces our contexts under private keys and dials
   │                    co-members found there (net/rendezvous.py); a context created
   │                    or joined is announced at once (ReplicaStore.wait_changed), a
   │                    re-keyed one within network.kad.key_check_interval
   ├─ serve_member_peers  peers sharing a context with us: loaded from LMDB into the peer
   │                    store at start (never forgotten), stored again when they change
   ├─ serve_discovery  peer store upkeep, /trionode/peers/1, dials toward `target_peers`
   ├─ serve_mdns       (if `network.mdns`) local-link discovery into the peer store
   ├─ Replicator.run   broadcasts local deltas, fetches missing parents, runs event handlers,
   │                    evicts stale pending deltas; received gossip reaches it via the channel,
   │                    and the heartbeats in it go on to the sync manager (a bounded channel)
   ├─ serve_clock_waits applies deltas stamped ahead of our clock once it has caught up
   ├─ serve_acks       our signed finality acks, every `sync.ack_interval` where we are
   │                    (or were) admin and what we hold moved (context/acks.py)
   ├─ serve_folding    folds final deltas older than `store.delta_retention` into the
   │                    final state, one batch per transaction (context/folding.py)
   ├─ SyncManager.run  heartbeats, interval sync sessions under one CapacityLimiter (shared
   │                    with the Replicator's incoming sessions; both get it from here)
   ├─ serve_gc         periodic GC: tombstones in every context, unreferenced blobs
   ├─ BlobFetcher.serve background fetches of blobs the states reference (on a call's
   │                    first read, or eagerly as deltas reference them: the app's policy)
   ├─ AppFollower.serve installs the app a context was upgraded to when this node lacks it
   │                    (fetched from members under the trust rule: context/app_upgrades.py)
   ├─ serve_event_log  writes WebSocket events to LMDB (loaded before the nursery, closed
   │                    with a clean-stop mark after it), so `since` survives restarts
   ├─ serve_api        hypercorn.trio.serve (stops intake when shutdown is requested)
   └─ _bound_shutdown  after a shutdown request, gives in-flight work `node.shutdown_grace`
                       seconds, then cancels what is left
```
The datastore is opened before the nursery and closed after it, so every task that might
write has finished (or been cancelled and joined) before the environment closes; every
acknowledged write has already committed, so shutdown loses nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import base58
import trio

from trionode import schemas
from trionode.api.admin_page import SessionBook
from trionode.api.app import create_app
from trionode.api.server import serve_api
from trionode.api.tokens import TicketBook, TokenStore
from trionode.blobs.calls import BlobCalls
from trionode.blobs.fetcher import BlobFetcher, BlobFetcherMetrics
from trionode.blobs.references import BlobReferences
from trionode.blobs.store import BlobMetrics, BlobStore
from trionode.blobs.transfer import BlobTransfer, BlobTransferMetrics
from trionode.config import NodeConfig
from trionode.context.acks import AckBook, PrometheusAckMetrics, serve_acks
from trionode.context.app_bundles import AppBundles, BundleServing
from trionode.context.app_upgrades import AppFollower, AppFollowerMetrics
from trionode.context.applications import Applications
from trionode.context.clock_waits import serve_clock_waits
from trionode.context.event_log import EventLog, serve_event_log
from trionode.context.events import EventHub
from trionode.context.finality import FinalityMetrics
from trionode.context.folding import serve_folding
from trionode.context.heartbeats import HeartbeatNews
from trionode.context.join import JoinService
from trionode.context.local_writes import Authored
from trionode.context.manager import ContextManager
from trionode.context.pipeline import serve_delta_processor
from trionode.context.replication import (
    TOPIC_PREFIX,
    AuthoredGossip,
    ReplicationMetrics,
    Replicator,
    topic_for,
)
from trionode.context.sync import SyncManager, SyncMetrics
from trionode.errors import ConfigError
from trionode.gc import GcMetrics, run_gc_once, serve_gc
from trionode.home import lock_home
from trionode.identity import NodeIdentity
from trionode.layout import API_URL_FILE
from trionode.metrics import NodeMetrics
from trionode.net.autonat import AutoNat, AutoNatMetrics
from trionode.net.dcutr import HolePuncher
from trionode.net.discovery import DiscoveryMetrics, serve_discovery
from trionode.net.events import (
    GossipMessage,
    NetworkEvent,
    NetworkEvents,
    TopicJoined,
    watch_peers,
)
from trionode.net.host import Host
from trionode.net.kad import Kademlia, KadMetrics
from trionode.net.mdns import serve_mdns
from trionode.net.member_peers import context_topics, serve_member_peers
from trionode.net.metrics import NetMetrics
from trionode.net.peerstore import PeerStore
from trionode.net.pubsub import PubSub, PubSubMetrics
from trionode.net.relay import RelayClient, RelayServer
from trionode.net.rendezvous import Rendezvous, context_provider_key
from trionode.net.transport import Transport
from trionode.store.store import AsyncStore, open_store
from trionode.sync.heartbeat import DigestLimits
from trionode.wire.keys import PeerId
from trionode.wire.messages import AckGossip, encode_gossip

if TYPE_CHECKING:
    from trionode.net.memory import GossipFaults

log = logging.getLogger(__name__)


class Node:
    """A running node's handle. Made by `open_node`; services hang off it."""

    def __init__(
        self,
        config: NodeConfig,
        identity: NodeIdentity,
        metrics: NodeMetrics,
        store: AsyncStore,
        *,
        transport: Transport | None = None,
        gossip_faults: GossipFaults | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.identity = identity
        self.metrics = metrics
        self.store = store
        self.shutdown_requested = trio.Event()
        self.api_urls: list[str] = []
        net_metrics = NetMetrics(metrics.registry)
        self.host = Host(identity.key, config.network, net_metrics, transport=transport)
        net_metrics.bind(self.host)
        self.peerstore = PeerStore.from_config(config.network, local_peer=self.host.peer_id)
        self.relay_client = RelayClient(self.host, config.network)
        self.relay_server = (
            RelayServer(self.host, config.network) if config.network.relay.serve else None
        )
        self.hole_puncher = HolePuncher(self.host, config.network, metrics.registry)
        self.autonat = (
            AutoNat(self.host, config.network, AutoNatMetrics(metrics.registry))
            if config.network.autonat
            else None
        )
        self.kad = (
            Kademlia(self.host, config.network, KadMetrics(metrics.registry))
            if config.network.kad.enabled
            else None
        )
        self.discovery_metrics = DiscoveryMetrics(metrics.registry)
        self.discovery_metrics.bind(self.peerstore)
        self.events = NetworkEvents(config.network.event_channel_capacity, metrics.registry)
        """The network event channel (receive side consumed by `open_node`'s task); tests
        observe what the node processed with `node.events.observe()`."""
        self.pubsub = PubSub(
            self.host,
            identity.key,
            config.pubsub,
            PubSubMetrics(metrics.registry),
            events=self.events,
            faults=gossip_faults,
            hold=_is_context_topic,
        )
        self.hub = EventHub()
        self.event_log = EventLog(
            self.hub,
            store,
            retention=config.api.event_retention,
            max_events=config.api.max_retained_events,
            max_shapes=config.api.max_event_shapes,
        )
        self.blobs = BlobStore(
            store,
            config.home,
            BlobMetrics(metrics.registry),
            max_size=config.blobs.max_size,
            read_only=config.node.mode == "read-only",
        )
        self.applications = Applications(store, config.apps.trusted_signers, self.blobs)
        self.replication_metrics = ReplicationMetrics(metrics.registry)
        # What this node authors goes from the delta processor to the replicator's gossip.
        send_authored, receive_authored = trio.open_memory_channel[Authored](
            config.replication.gossip_queue
        )
        self.contexts = ContextManager(
            store,
            self.hub,
            self.applications,
            max_pending=config.replication.max_pending,
            max_pending_per_author=config.replication.max_pending_per_author,
            max_clock_drift=config.sync.max_clock_drift,
            max_nonfinal_bytes=config.auth.max_nonfinal_bytes,
            pending_timeout=config.replication.pending_timeout,
            metrics=self.replication_metrics,
            read_only=config.node.mode == "read-only",
            wall_clock=wall_clock,
            processor_queue=config.replication.processor_queue,
            group_commit_max_deltas=config.replication.group_commit_max_deltas,
            group_commit_max_bytes=config.replication.group_commit_max_bytes,
            max_delta_bytes=config.replication.max_delta_bytes,
            event_log=self.event_log,
            authored=AuthoredGossip(send_authored, self.pubsub, self.replication_metrics),
        )
        self.finality_metrics = FinalityMetrics(
            metrics.registry,
            lambda: [(r.context_id, r.authority) for r in self.contexts.replicas.loaded()],
            wall_clock,
        )
        self.acks = AckBook(self.contexts.replicas, PrometheusAckMetrics(metrics.registry))
        # Sync sessions, outgoing (SyncManager) and incoming (Replicator), share one limiter;
        # heartbeats go from the replicator to the sync manager over a bounded channel.
        session_limiter = trio.CapacityLimiter(config.sync.max_concurrent)
        sync_metrics = SyncMetrics(metrics.registry, session_limiter)
        send_heartbeats, receive_heartbeats = trio.open_memory_channel[
            tuple[PeerId, HeartbeatNews]
        ](config.sync.heartbeat_queue)
        self.replicator = Replicator(
            self.contexts,
            self.host,
            self.pubsub,
            self.replication_metrics,
            pending_timeout=config.replication.pending_timeout,
            fetch_timeout=config.replication.fetch_timeout,
            session_limiter=session_limiter,
            session_started=sync_metrics.session_started,
            heartbeats=send_heartbeats,
            serve_max_requests=config.sync.serve_max_requests,
            serve_timeout=config.sync.serve_timeout,
            max_ancestors=config.sync.max_ancestors,
            ancestor_headers=config.sync.ancestor_headers,
            walk_budget=config.sync.walk_budget,
            snapshot_idle_timeout=config.sync.snapshot_idle_timeout,
            snapshot_keepalive=config.sync.snapshot_keepalive,
            acks=self.acks.receive,
            authored=receive_authored,
            max_batch_bytes=config.replication.gossip_batch_bytes,
            heartbeat_interval=config.sync.heartbeat,
            heartbeat_max_beats=config.sync.heartbeat_max_beats,
            heartbeat_digests=(
                DigestLimits(
                    max_buckets=config.sync.heartbeat_max_buckets,
                    bucket_contexts=config.sync.heartbeat_bucket_contexts,
                    max_beats=config.sync.heartbeat_max_beats,
                )
                if config.sync.heartbeat_digests
                else None
            ),
        )
        self.sync = SyncManager(
            self.contexts,
            self.replicator,
            self.pubsub,
            limiter=session_limiter,
            metrics=sync_metrics,
            heartbeats=receive_heartbeats,
            interval=config.sync.interval,
            min_interval=config.sync.min_interval,
            heartbeat=config.sync.heartbeat,
            announce_interval=config.sync.announce_interval,
            timeout=config.sync.timeout,
            on_join=config.sync.on_join,
            join_jitter=config.sync.join_jitter,
            max_peer_status=config.sync.max_peer_status,
            snapshot_page_records=config.sync.snapshot_page_records,
            snapshot_page_bytes=config.sync.snapshot_page_bytes,
            snapshot_window=config.sync.snapshot_window,
            snapshot_batch_bytes=config.sync.snapshot_batch_bytes,
            snapshot_idle_timeout=config.sync.snapshot_idle_timeout,
            snapshot_prepare_timeout=config.sync.snapshot_prepare_timeout,
            hub=self.hub,
        )
        self.blob_transfer = BlobTransfer(
            self.blobs,
            self.contexts,
            self.host,
            self.pubsub,
            self.hub,
            config=config.blobs,
            metrics=BlobTransferMetrics(metrics.registry),
            bundles=BundleServing(self.contexts, self.applications, self.blobs),
        )
        self.app_bundles = AppBundles(self.applications, self.blobs, self.blob_transfer)
        """Fetch, verify and install a context's app from its members (join, upgrade)."""
        self.app_follower = AppFollower(
            self.contexts,
            self.app_bundles,
            self.hub,
            retry=config.apps.upgrade_retry,
            metrics=AppFollowerMetrics(metrics.registry),
        )
        """Installs the app a context moved to (an upgrade) when this node lacks it."""
        self.joins = JoinService(
            self.contexts,
            self.applications,
            self.host,
            self.replicator,
            store,
            sync_session=self.sync.sync_now,
            app_bundles=self.app_bundles,
            wall_clock=wall_clock,
        )
        self.blob_references = BlobReferences(self.contexts.state_tree)
        self.blob_fetcher = BlobFetcher(
            self.blob_transfer,
            self.blobs,
            self.blob_references,
            self.hub,
            policy=self._blob_policy,
            contexts=self.contexts.known_ids,
            config=config.blobs,
            metrics=BlobFetcherMetrics(metrics.registry),
            application=self.contexts.replicas.application_of,
        )
        self.blob_calls = BlobCalls(
            self.contexts, self.blobs, self.blob_references, self.blob_fetcher, config=config.blobs
        )
        """App calls (the API's `execute`), with blob reads and attachments served."""
        self.rendezvous = (
            Rendezvous(
                self.host,
                self.kad,
                self.rendezvous_keys,
                config.network,
                contexts_changed=self.contexts.wait_changed,
            )
            if self.kad is not None
            else None
        )
        self.gc_metrics = GcMetrics(metrics.registry)
        self.tokens = TokenStore(store)
        """Scoped API tokens for browser apps (hashed in LMDB)."""
        self.sessions = SessionBook(ttl=config.api.session_ttl, capacity=config.api.max_sessions)
        """Signed-in sessions of the node's page (cookies; memory only)."""
        self.tickets = TicketBook(ttl=config.api.ticket_ttl, capacity=config.api.max_tickets)
        self._ready = False
        token = config.api.token_sha256
        if token is None:
            raise ConfigError(
                f"{config.home / 'config.toml'}: `api.token_sha256` is not set "
                "(run `trionode init` to create a token)"
            )
        self._token_sha256 = token

    # -- NodeApi ---------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def token_sha256(self) -> str:
        return self._token_sha256

    def is_ready(self) -> bool:
        return self._ready and not self.shutdown_requested.is_set()

    def peers(self) -> list[dict[str, Any]]:
        pubsub = self.pubsub
        topics = {str(peer): pubsub.peer_topics(peer) for peer in pubsub.router.peers()}
        return [{**attrs.asdict(p), "topics": topics.get(p.peer_id, [])} for p in self.host.peers()]

    def topics(self) -> list[dict[str, Any]]:
        pubsub = self.pubsub
        subscribed = set(pubsub.topics())
        return [
            {
                "topic": topic,
                "subscribed": topic in subscribed,
                "meshPeers": [str(p) for p in pubsub.mesh_peers(topic)],
                "subscribers": [str(p) for p in pubsub.topic_peers(topic)],
            }
            for topic in pubsub.known_topics()
        ]

    def listen_addresses(self) -> list[str]:
        return self.host.addresses()

    def reachability(self) -> dict[str, Any]:
        if self.autonat is None:
            return {"status": "disabled"}
        return self.autonat.status().to_json()

    def dht_status(self) -> schemas.DhtStatus:
        if self.kad is None:
            return schemas.DhtStatus(enabled=False)
        kad, rendezvous = self.kad, self.rendezvous
        return schemas.DhtStatus(
            enabled=True,
            protocol=kad.protocol,
            server=self.config.network.kad.server,
            routing_table=len(kad.table),
            provider_records=len(kad.providers),
            announced_contexts=0 if rendezvous is None else rendezvous.announced,
            last_bootstrap=kad.last_bootstrap,
            last_announcement=None if rendezvous is None else rendezvous.last_round,
        )

    async def connect(self, address: str) -> str:
        conn = await self.host.connect(address)
        return str(conn.peer_id)

    def knows_context(self, context_id_b58: str) -> bool:
        try:
            raw = base58.b58decode(context_id_b58)
        except ValueError:
            return False
        return raw in self.contexts.known_ids()

    async def rendezvous_keys(self) -> list[bytes]:
        """The private DHT keys of our contexts (see net/rendezvous.py)."""
        out: list[bytes] = []
        for record in await self.contexts.records():
            key = (await self.contexts.keys(record.context_id)).get(record.key_id)
            if key is not None:
                out.append(context_provider_key(record.context_id, key))
        return out

    async def collect_garbage(self) -> dict[str, int]:
        return await run_gc_once(
            self.collect_everything, self.config.gc.tombstone_retention, self.gc_metrics
        )

    async def collect_everything(self, horizon_unix: float) -> dict[str, int]:
        """One GC pass: tombstones older than `horizon_unix`, then unreferenced blobs."""
        result = await self.contexts.collect_garbage(horizon_unix)
        live = self.contexts.known_ids()
        blobs = await self.blobs.collect_garbage(
            self.config.gc.blob_retention,
            live,
            self.blob_transfer.running() | self.blob_fetcher.pending(),
            await self.blob_references.all_of(live),
        )
        return {**result, **blobs}

    async def _blob_policy(self, context_id: bytes) -> str:
        record = await self.contexts.get(context_id)
        app = await self.applications.load(record.application_id)
        return str(app.blob_policy)

    async def refresh_metrics(self) -> None:
        stats = await self.store.stats()
        self.metrics.store_map_size.set(stats.map_size)
        self.metrics.store_used.set(stats.used_bytes)
        for column, entries in stats.entries.items():
            self.metrics.store_entries.labels(column).set(entries)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return self.api_urls[0]

    def publish_ack(self, context_id: bytes, wire: bytes) -> None:
        """Gossip our signed finality ack on the context's topic (serve_acks)."""
        self.replicator.subscribe(context_id)
        message = encode_gossip(AckGossip(context_id=context_id, ack=wire))
        self.pubsub.publish(topic_for(context_id), message)

    def request_shutdown(self) -> None:
        """Phase one: stop taking new work; in-flight work drains within the grace period."""
        self.shutdown_requested.set()


def _is_context_topic(topic: str) -> bool:
    """The topics pubsub forwards once the replicator has judged their messages."""
    return topic.startswith(TOPIC_PREFIX)


async def _handle_network_event(node: Node, event: NetworkEvent) -> None:
    """The node's side of the network event channel: the single consumer that feeds
    received deltas to the delta processor (latency is recorded by NetworkEvents.run)."""
    if isinstance(event, GossipMessage):
        await node.replicator.on_gossip(event)
    elif isinstance(event, TopicJoined):
        node.sync.on_topic_joined(event.peer, event.topic)
        await trio.lowlevel.checkpoint()
    else:
        log.debug("network event: %s", event)
        await trio.lowlevel.checkpoint()


async def _bound_shutdown(node: Node, scope: trio.CancelScope) -> None:
    await node.shutdown_requested.wait()
    scope.deadline = trio.current_time() + node.config.node.shutdown_grace


async def _watch_peers_until(
    node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_peers, node.host, node.events)
        task_status.started()
        await node.shutdown_requested.wait()
        nursery.cancel_scope.cancel(reason="node shutting down")


def _api_url_file(home: Path) -> Path:
    return home / API_URL_FILE


@asynccontextmanager
async def open_node(
    config: NodeConfig,
    *,
    transport: Transport | None = None,
    gossip_faults: GossipFaults | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Node]:
    """Start every service and yield the node; leaving the block shuts it down gracefully.

    ``transport`` (default TCP), ``gossip_faults`` and ``wall_clock`` are for in-process
    clusters (``trionode.testing.open_cluster``): a MemoryNetwork transport, message faults,
    and the clock that stamps writes and judges stamps (skewed nodes, virtual time).
    The home is locked first, so a second node on the same home (one identity, one
    database) is refused with HomeLockedError before it reads or writes anything.
    """
    with lock_home(config.home):
        async with _open_locked_node(
            config, transport=transport, gossip_faults=gossip_faults, wall_clock=wall_clock
        ) as node:
            yield node


@asynccontextmanager
async def _open_locked_node(
    config: NodeConfig,
    *,
    transport: Transport | None,
    gossip_faults: GossipFaults | None,
    wall_clock: Callable[[], float],
) -> AsyncIterator[Node]:
    identity = NodeIdentity.load(config.identity_path)
    metrics = NodeMetrics()
    async with open_store(
        config.data_dir,
        initial_map_size=config.store.initial_map_size,
        max_map_size=config.store.max_map_size,
        reader_threads=config.store.reader_threads,
        max_value_refs=config.store.max_value_refs,
        passphrase=config.passphrase if config.store.encrypted else None,
        registry=metrics.registry,
        inline=config.inline_store,
        inline_commit_max=config.store.inline_commit_max_seconds,
    ) as store:
        node = Node(
            config,
            identity,
            metrics,
            store,
            transport=transport,
            gossip_faults=gossip_faults,
            wall_clock=wall_clock,
        )
        await node.event_log.load()  # numbering continues before anything is published
        await node.contexts.start()
        await node.tokens.load()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_bound_shutdown, node, nursery.cancel_scope, name="shutdown-grace")
            # First: every local call and received delta is committed by this one task.
            await nursery.start(
                serve_delta_processor,
                node.contexts.pipeline,
                node.shutdown_requested,
                name="delta-processor",
            )
            await nursery.start(
                node.events.run,
                partial(_handle_network_event, node),
                node.shutdown_requested,
                name="network-events",
            )
            await nursery.start(node.host.run, node.shutdown_requested, name="p2p")
            await nursery.start(_watch_peers_until, node, name="peer-events")
            if node.autonat is not None:
                await nursery.start(node.autonat.run, node.shutdown_requested, name="autonat")
            await nursery.start(node.relay_client.run, node.shutdown_requested, name="relays")
            if node.kad is not None:
                await nursery.start(node.kad.run, node.shutdown_requested, name="kad")
            if node.autonat is not None:
                await nursery.start(
                    node.relay_client.learn_relays,
                    node.autonat.is_private,
                    node.autonat.wait_status_changed,
                    node.shutdown_requested,
                    name="learned-relays",
                )
            await nursery.start(node.hole_puncher.run, node.shutdown_requested, name="dcutr")
            await nursery.start(node.pubsub.run, node.shutdown_requested, name="pubsub")
            await nursery.start(node.replicator.run, node.shutdown_requested, name="replication")
            await nursery.start(
                serve_clock_waits, node.contexts, node.shutdown_requested, name="clock-waits"
            )
            await nursery.start(node.sync.run, node.shutdown_requested, name="sync")
            await nursery.start(
                partial(
                    serve_folding,
                    node.contexts.replicas,
                    retention=node.config.store.delta_retention,
                    interval=node.config.store.fold_interval,
                    max_batch=node.config.store.fold_batch,
                    metrics=node.replication_metrics,
                    shutdown_requested=node.shutdown_requested,
                ),
                name="folding",
            )
            await nursery.start(
                serve_acks,
                node.acks,
                node.contexts.replicas,
                node.publish_ack,
                node.config.sync.ack_interval,
                node.shutdown_requested,
                name="acks",
            )
            discovery = (node.host, node.peerstore, config.network, node.discovery_metrics)
            stop = node.shutdown_requested
            # After the Replicator (it subscribes our contexts' topics), before discovery.
            await nursery.start(
                partial(serve_member_peers, shutdown_requested=stop),
                node.host,
                node.pubsub,
                node.peerstore,
                store,
                context_topics(node.pubsub, TOPIC_PREFIX),
                name="member-peers",
            )
            if config.discovery:
                resolve = None if node.kad is None else node.kad.find_peer
                await nursery.start(
                    partial(serve_discovery, *discovery, resolve=resolve, shutdown_requested=stop),
                    name="discovery",
                )
            if node.rendezvous is not None:
                await nursery.start(node.rendezvous.run, stop, name="rendezvous")
            if config.network.mdns:
                await nursery.start(
                    partial(serve_mdns, *discovery, shutdown_requested=stop), name="mdns"
                )
            await nursery.start(
                serve_gc,
                node.collect_everything,
                config.gc.interval,
                config.gc.tombstone_retention,
                node.gc_metrics,
                node.shutdown_requested,
                name="gc",
            )
            await nursery.start(
                node.blob_fetcher.serve, node.shutdown_requested, name="blob-fetcher"
            )
            await nursery.start(
                node.app_follower.serve, node.shutdown_requested, name="app-follower"
            )
            await nursery.start(
                serve_event_log, node.event_log, node.shutdown_requested, name="event-log"
            )
            if config.api.enabled:
                node.api_urls = await nursery.start(
                    partial(
                        serve_api,
                        graceful_timeout=config.node.shutdown_grace,
                        max_request_body=config.api.max_request_body,
                        max_ws_message=config.api.max_ws_message,
                    ),
                    create_app(node),
                    config.api.host,
                    config.api.port,
                    node.shutdown_requested,
                    name="api",
                )
                _api_url_file(config.home).write_text(node.api_url + "\n", encoding="utf-8")
            node._ready = True  # noqa: SLF001 - open_node is the Node's owner
            try:
                yield node
            finally:
                node.request_shutdown()
                with suppress(FileNotFoundError):
                    _api_url_file(config.home).unlink()
        # Every publisher has stopped: the last events and the clean-stop mark.
        await node.event_log.close()
