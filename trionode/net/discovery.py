"""Discovery: learn peers (identify, peer exchange, mDNS, bootstrap) and keep enough connected.

```
serve_discovery ── discovery nursery
   ├─ _watch_connections   on every connection change: tell the peer store who is connected;
   │    └─ _on_connection  per new connection: wait for identify, store the peer's listen
   │                       addresses, then ask it for its peers (/trionode/peers/1)
   ├─ _watch_store         turns peer-store changes into wake-ups of the dial loop
   └─ _dial_loop           while fewer than `target_peers` are connected, dial the best
        └─ _dial           candidates (at most MAX_CONCURRENT_DIALS at once); failures back
                           off and, after `peer_max_failures`, the peer is forgotten. When
                           every known address of a *member* fails and a resolver is given
                           (the DHT's peer routing), its current addresses are looked up and
                           tried before the failure counts
```

The dial loop is level-triggered: it clears its wake-up event *before* looking at the state,
so any change after the look (a connection opening or closing, a peer learned, a dial
finishing) sets the fresh event and the loop looks again. Between changes it sleeps until the
earliest backoff or TTL deadline, never polling.

The serving side answers `/trionode/peers/1` with up to `peer_exchange_max_peers` of our
connected peers (a random sample), with the addresses the peer store holds for them;
loopback addresses are left out for a requester that is not on loopback itself.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from trionode.config import NetworkSection
from trionode.errors import PeerError, ProtocolError, RemoteProtocolError
from trionode.net.host import Connection, Host
from trionode.net.peerstore import PeerStore, Source, is_dialable, resolve_unspecified
from trionode.net.service import run_loops
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.peer_exchange import (
    MAX_RESPONSE_SIZE,
    PEER_EXCHANGE_PROTOCOL_ID,
    PeerAddrs,
    decode_response_frame,
    encode_response,
)

log = logging.getLogger(__name__)

PeerResolver = Callable[[PeerId], Awaitable[list[Multiaddr]]]
"""Finds where a peer can be dialed now (``Kademlia.find_peer``)."""

MAX_CONCURRENT_DIALS: Final = 4
"""Discovery dials in flight at once: enough to fill a small cluster quickly without a burst
of handshakes when a peer exchange names many peers."""


class DiscoveryMetrics:
    """Discovery and mDNS metrics; `bind` hooks them to a peer store."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.known_peers = Gauge(
            "trionode_discovery_known_peers", "Peers in the peer store", registry=registry
        )
        self.discovered = Counter(
            "trionode_discovery_peers_discovered",
            "Peers added to the peer store, by source (identify, exchange, mdns, bootstrap)",
            ["source"],
            registry=registry,
        )
        self.forgotten = Counter(
            "trionode_discovery_peers_forgotten",
            "Peers dropped from the peer store, by reason (unreachable, expired, evicted)",
            ["reason"],
            registry=registry,
        )
        self.dials = Counter(
            "trionode_discovery_dials", "Dials attempted by discovery", registry=registry
        )
        self.dial_failures = Counter(
            "trionode_discovery_dial_failures",
            "Discovery dials that reached none of the peer's addresses",
            registry=registry,
        )
        self.exchanges = Counter(
            "trionode_discovery_exchanges",
            "Peer exchange (/trionode/peers/1) requests by outcome (ok, failed, invalid, served)",
            ["outcome"],
            registry=registry,
        )
        self.mdns_packets = Counter(
            "trionode_mdns_packets",
            "mDNS packets received, by kind (query, response, other, invalid)",
            ["kind"],
            registry=registry,
        )

    def bind(self, store: PeerStore) -> None:
        """Report the store's size and count what it forgets."""
        self.known_peers.set_function(lambda: len(store))
        store.on_forget = lambda _peer, reason: self.forgotten.labels(reason).inc()

    def record_discovered(self, source: Source) -> None:
        self.discovered.labels(source).inc()


async def serve_discovery(
    host: Host,
    peerstore: PeerStore,
    config: NetworkSection,
    metrics: DiscoveryMetrics | None = None,
    *,
    resolve: PeerResolver | None = None,
    shutdown_requested: trio.Event | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `/trionode/peers/1` and keep up to `config.target_peers` peers connected.

    Start it after `host.run` (dials need the host's nursery). Ready once the exchange handler
    is installed and the watchers run. Returns when `shutdown_requested` is set (there is
    nothing to drain: an interrupted dial is simply abandoned); runs forever without it.
    """
    if metrics is None:
        metrics = DiscoveryMetrics(None)
        metrics.bind(peerstore)
    discovery = _Discovery(host, peerstore, config, metrics, resolve)
    host.set_handler(PEER_EXCHANGE_PROTOCOL_ID, discovery.serve_exchange)
    discovery.add_bootstrap_peers()
    loops = [
        (discovery.watch_connections, "discovery:connections"),
        (discovery.watch_store, "discovery:store"),
        (discovery.dial_loop, "discovery:dial"),
    ]
    await run_loops(str(host.peer_id), loops, shutdown_requested, task_status=task_status)


async def read_peers(stream: trio.abc.HalfCloseableStream) -> list[PeerAddrs]:
    """Make the (empty) request on a negotiated `/trionode/peers/1` stream; read the answer.

    The caller opens and closes the stream and bounds the exchange in time.

    Raises:
        RemoteProtocolError: the response is malformed or the stream ends before it.
        trio.BrokenResourceError, trio.ClosedResourceError: the stream or connection broke.
    """
    await stream.send_eof()  # the request is empty
    data = bytearray()
    while (peers := decode_response_frame(data)) is None:
        chunk = await stream.receive_some(MAX_RESPONSE_SIZE)
        if not chunk:
            raise RemoteProtocolError("peer exchange stream ended before a whole response")
        data += chunk
    return peers


class _Discovery:
    def __init__(
        self,
        host: Host,
        store: PeerStore,
        config: NetworkSection,
        metrics: DiscoveryMetrics,
        resolve: PeerResolver | None = None,
    ) -> None:
        self._host = host
        self._resolve = resolve
        self._store = store
        self._config = config
        self._metrics = metrics
        self._dialing: set[PeerId] = set()
        self._wake = trio.Event()
        # Read now, before any loop runs: a change made between `serve_discovery` reporting
        # started and `watch_store` first waiting still wakes the dial loop.
        self._store_seen = store.version

    def _poke(self) -> None:
        self._wake.set()

    # -- learning --------------------------------------------------------------------------

    def add_bootstrap_peers(self) -> None:
        for text in self._config.bootstrap:
            try:
                addr = Multiaddr.from_string(text)
            except ProtocolError:
                continue  # the host reports bad bootstrap addresses
            peer = addr.peer_id()
            if peer is not None and self._store.add(peer, [addr], source="bootstrap"):
                self._metrics.record_discovered("bootstrap")

    def _learn(self, peer: PeerId, addrs: list[Multiaddr], source: Source) -> None:
        if peer == self._host.peer_id:
            return
        if self._store.add(peer, addrs, source=source):
            self._metrics.record_discovered(source)
            log.debug("learned %s from %s: %s", peer, source, addrs)

    async def watch_connections(self) -> None:
        handled: dict[PeerId, Connection] = {}
        async with trio.open_nursery() as nursery:
            while True:
                # No checkpoint between reading `connections` and waiting for the next
                # change, so no change can slip in unseen.
                current = dict(self._host.connections)
                for peer, conn in current.items():
                    if handled.get(peer) is not conn:
                        nursery.start_soon(
                            self._on_connection, conn, name=f"{self._host.peer_id}:pex {peer}"
                        )
                handled = current
                self._store.set_connected(current)
                self._poke()
                await self._host.wait_connection_changed()

    async def _on_connection(self, conn: Connection) -> None:
        async with trio.open_nursery() as nursery:
            # Everything below stops when the connection closes (identify may never come).
            nursery.start_soon(_cancel_when_closed, conn, nursery.cancel_scope)
            await conn.identified.wait()
            self._learn(conn.peer_id, identified_addrs(conn), "identify")
            if PEER_EXCHANGE_PROTOCOL_ID in conn.protocols:
                await self._exchange(conn)
            nursery.cancel_scope.cancel()

    async def _exchange(self, conn: Connection) -> None:
        timeout = self._config.negotiation_timeout
        peers: list[PeerAddrs] | None = None
        invalid = False
        try:
            with trio.fail_after(timeout):
                _, stream = await conn.new_stream(
                    [PEER_EXCHANGE_PROTOCOL_ID], negotiation_timeout=timeout
                )
                async with stream:
                    try:
                        peers = await read_peers(stream)
                    except RemoteProtocolError as exc:
                        # Counted before the stream closes: nobody sees the close first.
                        invalid = True
                        self._metrics.exchanges.labels("invalid").inc()
                        self._host.metrics.protocol_errors.labels("peer_exchange").inc()
                        log.info("bad peer exchange response from %s: %s", conn.peer_id, exc)
        except (
            PeerError,
            ProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            if peers is None and not invalid:
                self._metrics.exchanges.labels("failed").inc()
                log.debug("peer exchange with %s failed: %r", conn.peer_id, exc)
                return
        if peers is None:
            return
        self._metrics.exchanges.labels("ok").inc()
        for entry in peers:
            if entry.peer_id != conn.peer_id:
                self._learn(entry.peer_id, list(entry.addrs), "exchange")

    async def watch_store(self) -> None:
        while True:
            await self._store.wait_changed(since=self._store_seen)
            self._store_seen = self._store.version
            self._poke()

    # -- serving ---------------------------------------------------------------------------

    async def serve_exchange(self, stream: trio.abc.Stream, conn: Connection) -> None:
        others = [c for peer, c in self._host.connections.items() if peer != conn.peer_id]
        random.shuffle(others)
        remote_is_local = conn.remote_addr is not None and _is_loopback(conn.remote_addr)
        entries: list[PeerAddrs] = []
        for other in others:
            peer = other.peer_id
            known = self._store.addresses(peer) or identified_addrs(other)
            addrs = [a for a in known if remote_is_local or not _is_loopback(a)]
            if addrs:
                entries.append(PeerAddrs(peer, tuple(addrs)))
            if len(entries) == self._config.peer_exchange_max_peers:
                break
        await stream.send_all(encode_response(entries))
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        self._metrics.exchanges.labels("served").inc()

    # -- dialing ---------------------------------------------------------------------------

    def _target(self) -> int:
        return min(self._config.target_peers, self._config.max_connections)

    async def dial_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()  # before looking: later changes wake us again
                self._store.expire()
                busy = len(self._host.connections) + len(self._dialing)
                slots = MAX_CONCURRENT_DIALS - len(self._dialing)
                room = min(self._target() - busy, slots)
                # Members are dialed past `target_peers` (never past max_connections): a
                # node must reach the peers it shares contexts with, whoever else it knows.
                member_room = min(self._config.max_connections - busy, slots)
                exclude = set(self._host.connections) | self._dialing
                for peer in self._store.dial_candidates(max(room, member_room), exclude=exclude):
                    if not self._store.is_member(peer):
                        if room <= 0:
                            break  # members come first, so only non-members are left
                    elif member_room <= 0:
                        continue
                    self._dialing.add(peer)
                    nursery.start_soon(self._dial, peer, name=f"{self._host.peer_id}:dial {peer}")
                    room -= 1
                    member_room -= 1
                deadline = self._store.next_expiry_time()
                if room > 0 or member_room > 0:
                    # Every ready candidate is being dialed; wake for the next backoff end.
                    exclude = set(self._host.connections) | self._dialing
                    deadline = min(
                        deadline,
                        self._store.next_dial_time(exclude=exclude, members_only=room <= 0),
                    )
                with trio.move_on_at(deadline):
                    await self._wake.wait()

    async def _dial(self, peer: PeerId) -> None:
        try:
            self._metrics.dials.inc()
            reached = await self._try_addresses(peer)
            if reached is False and self._resolve is not None and self._store.is_member(peer):
                reached = await self._try_resolved(peer, self._resolve)
            if reached is None:
                return  # the connection limit stopped us; not the peer's fault
            if reached:
                self._store.record_success(peer)
                return
            self._metrics.dial_failures.inc()
            known = self._store.get(peer)
            if self._store.record_failure(peer):
                # A peer mDNS found that never answered is most likely another program's
                # libp2p node on the LAN: not news (its handshake failures are DEBUG too).
                level = (
                    logging.DEBUG if known is not None and known.source == "mdns" else logging.INFO
                )
                log.log(level, "forgetting %s: unreachable", peer)
        finally:
            self._dialing.discard(peer)
            self._poke()

    async def _try_resolved(self, peer: PeerId, resolve: PeerResolver) -> bool | None:
        """A member moved: ask the DHT where it is now, and try what is new."""
        tried = set(self._store.addresses(peer))
        try:
            found = await resolve(peer)
        except (PeerError, ProtocolError, trio.TooSlowError) as exc:
            log.debug("looking up %s in the DHT failed: %s", peer, exc)
            return False
        fresh = [a for a in found if a not in tried]
        if not fresh:
            return False
        log.info("member %s found in the DHT at %s", peer, ", ".join(map(str, fresh)))
        self._learn(peer, fresh, "dht")
        return await self._try_addresses(peer, fresh)

    async def _try_addresses(
        self, peer: PeerId, addrs: list[Multiaddr] | None = None
    ) -> bool | None:
        for addr in self._store.addresses(peer) if addrs is None else addrs:
            if peer in self._host.connections:
                return True
            if len(self._host.connections) >= self._config.max_connections:
                return None
            try:
                await self._host.connect(addr.with_peer_id(peer))
            except (PeerError, ProtocolError, trio.TooSlowError) as exc:
                log.debug("dial %s at %s failed: %s", peer, addr, exc)
                if len(self._host.connections) >= self._config.max_connections:
                    return None
                continue
            return True
        return False


def identified_addrs(conn: Connection) -> list[Multiaddr]:
    """The listen addresses `conn`'s peer reported in identify, 0.0.0.0 made concrete."""
    resolved = (resolve_unspecified(a, conn.remote_addr) for a in conn.listen_addrs)
    return [a.without_peer_id() for a in resolved if is_dialable(a)]


async def _cancel_when_closed(conn: Connection, scope: trio.CancelScope) -> None:
    await conn.session.wait_closed()
    scope.cancel()


def _is_loopback(addr: Multiaddr) -> bool:
    if not addr.components or addr.components[0].name not in {"ip4", "ip6"}:
        return False
    text = addr.components[0].value_text()
    return text is not None and ipaddress.ip_address(text).is_loopback
