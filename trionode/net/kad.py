"""Kademlia DHT driver: libp2p ``kad-dht`` requests over the Host, on the sans-IO core.

```
Kademlia.run ── kad nursery
   ├─ _refresh_loop    at start and every kad.refresh_interval: admit connected DHT servers
   │                   to the table, then look up our own id (fills the nearby buckets)
   └─ _probe_loop      a full bucket's least recently seen contact gets a FIND_NODE for its
                       own id (any server answers that; not every one answers PING): it
                       stays if it answers, else the waiting newcomer takes its place
Kademlia.serve        (server mode; one task per inbound stream, in the Host's connection
                       nursery) up to kad.max_requests_per_stream requests per stream
lookups               run in the caller's task: a nursery with up to kad.alpha requests in
                       flight, the whole walk under kad.lookup_timeout
```

The routing table, the lookup walk and the provider store are ``wire/kad_table.py``; this
module dials, opens streams, reads frames under timeouts and turns failures into
``failed(peer)``. Requests go one per stream (as js and py clients do); ADD_PROVIDER is
written and the stream closed without waiting for an answer.

*Admission*: only DHT servers belong in the table: connected peers whose identify lists
our protocol id, and peers that answered one of our requests. A peer that sends a malformed
message is reported to the Host (counted, disconnected) and dropped from the table.

*Provider records* we publish are signed (``wire/kad.py``) and expire after
``kad.provider_ttl`` seconds of wall-clock time; we store others' records only when the
sender is the provider (libp2p's rule) and, if signed, when the signature and expiry check
out. Readers that ask for signed records (``find_providers(..., signed_only=True)``) drop
unsigned, forged, mismatched or expired ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from trionode.config import NetworkSection
from trionode.errors import PeerError, ProtocolError, RemoteProtocolError
from trionode.net.host import Connection, Host
from trionode.net.peerstore import is_dialable
from trionode.net.service import run_loops
from trionode.wire import kad as wire
from trionode.wire.kad_table import (
    AddResult,
    Contact,
    Lookup,
    ProviderStore,
    RoutingTable,
    StoredProvider,
)
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

log = logging.getLogger(__name__)

_FAILURES: Final = (
    PeerError,
    ProtocolError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)
CLOCK_SKEW: Final = 300
"""Seconds a signed record's expiry may lie beyond ``now + kad.provider_ttl`` (clocks differ)."""


class KadMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.table_size = Gauge(
            "trionode_kad_table_peers", "Peers in the Kademlia routing table", registry=registry
        )
        self.served = Counter(
            "trionode_kad_requests_served",
            "DHT requests we answered, by type",
            ["type"],
            registry=registry,
        )
        self.requests = Counter(
            "trionode_kad_requests",
            "DHT requests we sent, by outcome (ok, failed, bad_answer)",
            ["outcome"],
            registry=registry,
        )
        self.lookups = Counter(
            "trionode_kad_lookups",
            "Lookups by kind (find_node, find_peer, get_providers)",
            ["kind"],
            registry=registry,
        )
        self.bucket_probes = Counter(
            "trionode_kad_bucket_probes",
            "Pings of a full bucket's oldest contact, by outcome (kept, evicted)",
            ["outcome"],
            registry=registry,
        )
        self.provider_records = Counter(
            "trionode_kad_provider_records_rejected",
            "Provider records ignored, by reason (forged, expired, wrong_key, unsigned)",
            ["reason"],
            registry=registry,
        )


@attrs.frozen
class Provider:
    """A peer that provides a key, and where to dial it."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]
    signed: bool


class Kademlia:
    """Both roles. The server handler is installed at construction when ``network.kad.server``;
    run the refresh loop with ``await nursery.start(kad.run, shutdown_requested)``."""

    def __init__(
        self,
        host: Host,
        config: NetworkSection,
        metrics: KadMetrics | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._host = host
        self._config = config
        self.protocol = config.kad.protocol
        self.metrics = metrics if metrics is not None else KadMetrics(None)
        self._wall_clock = wall_clock
        self.table = RoutingTable(host.peer_id, config.kad.bucket_size)
        self.providers = ProviderStore(
            max_keys=config.kad.max_provider_keys, max_per_key=config.kad.max_providers_per_key
        )
        self._probes_wanted = trio.Event()
        self.last_bootstrap: float | None = None
        """Wall-clock time the last bootstrap lookup ended, or None before the first."""
        if config.kad.server:
            host.set_handler(self.protocol, self.serve)

    # -- running ---------------------------------------------------------------------------

    async def run(
        self,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        loops = [(self._refresh_loop, "kad-refresh"), (self._probe_loop, "kad-probes")]
        owner = str(self._host.peer_id)
        await run_loops(owner, loops, shutdown_requested, task_status=task_status)

    async def _refresh_loop(self) -> None:
        while True:
            await self.bootstrap()
            await trio.sleep(self._config.kad.refresh_interval)

    async def bootstrap(self) -> list[Contact]:
        """Admit connected DHT servers, then look up our own id: the peers nearest us learn
        of us and our table fills with them."""
        self.admit_connected()
        found = await self.closest_peers(self._host.peer_id.multihash)
        self.last_bootstrap = self._wall_clock()
        return found

    async def _probe_loop(self) -> None:
        while True:
            await self._probes_wanted.wait()
            self._probes_wanted = trio.Event()
            async with trio.open_nursery() as nursery:
                for contact in self.table.probes_due():
                    nursery.start_soon(self._probe, contact)

    async def _probe(self, contact: Contact) -> None:
        ping = wire.KadMessage(wire.MessageType.FIND_NODE, contact.peer_id.multihash)
        if await self._request(contact, ping) is None:
            self.table.probe_failed(contact.peer_id)
            self.metrics.bucket_probes.labels("evicted").inc()
        else:
            self.table.probe_answered(contact.peer_id, trio.current_time())
            self.metrics.bucket_probes.labels("kept").inc()
        self.metrics.table_size.set(len(self.table))

    def _add_contact(self, peer: PeerId, addrs: Iterable[Multiaddr]) -> None:
        if self.table.add(peer, addrs, trio.current_time()) is AddResult.PING:
            self._probes_wanted.set()

    def admit_connected(self) -> int:
        """Add every connected, identified peer that serves our protocol id; returns how many
        the table now holds."""
        for conn in list(self._host.connections.values()):
            self._admit(conn)
        self.metrics.table_size.set(len(self.table))
        return len(self.table)

    def _admit(self, conn: Connection) -> None:
        if conn.closed or not conn.identified.is_set() or self.protocol not in conn.protocols:
            return
        known = self.table.get(conn.peer_id)
        if known is None or not known.addrs:
            self._add_contact(conn.peer_id, _usable(conn.listen_addrs))

    async def wait_for_server(self) -> None:
        """Until the table holds a peer: a connected DHT server once identify says so."""
        while not self.admit_connected():
            async with trio.open_nursery() as nursery:
                scope = nursery.cancel_scope
                nursery.start_soon(_cancel_after, self._host.wait_connection_changed, scope)
                for conn in list(self._host.connections.values()):
                    if not conn.identified.is_set():
                        nursery.start_soon(_cancel_after, conn.identified.wait, scope)

    # -- client ----------------------------------------------------------------------------

    async def closest_peers(self, key: bytes) -> list[Contact]:
        """The k DHT servers nearest ``key`` that answered (FIND_NODE lookup)."""
        self.metrics.lookups.labels("find_node").inc()
        lookup = await self._walk(wire.KadMessage(wire.MessageType.FIND_NODE, key))
        return lookup.result()

    async def find_peer(self, peer: PeerId) -> list[Multiaddr]:
        """Where ``peer`` can be dialed now, as the DHT nodes nearest it know (possibly
        nothing). Stops as soon as some node names addresses for it."""
        self.metrics.lookups.labels("find_peer").inc()
        conn = self._host.connections.get(peer)
        if conn is not None and not conn.closed and conn.listen_addrs:
            return list(_usable(conn.listen_addrs))
        found: list[Multiaddr] = []

        def note(_contact: Contact, reply: wire.KadMessage) -> bool:
            for kad_peer in reply.closer:
                if kad_peer.id == peer.multihash:
                    found.extend(a for a in _usable(kad_peer.multiaddrs()) if a not in found)
            return bool(found)

        await self._walk(wire.KadMessage(wire.MessageType.FIND_NODE, peer.multihash), note)
        return found

    async def find_providers(
        self, key: bytes, *, limit: int = 20, signed_only: bool = False
    ) -> list[Provider]:
        """Providers of ``key`` (GET_PROVIDERS lookup), ours included when we store any;
        stops once ``limit`` distinct providers are known."""
        self.metrics.lookups.labels("get_providers").inc()
        found: dict[PeerId, Provider] = {}
        now = trio.current_time()
        for stored in self.providers.get(key, now):
            self._note_provider(
                found, key, stored.peer_id, stored.addrs, stored.record, signed_only=signed_only
            )

        def note(_contact: Contact, reply: wire.KadMessage) -> bool:
            for kad_peer in reply.providers:
                self._note_provider(
                    found,
                    key,
                    PeerId.from_bytes(kad_peer.id),
                    kad_peer.addrs,
                    kad_peer.provider_record,
                    signed_only=signed_only,
                )
            return len(found) >= limit

        if len(found) < limit:
            await self._walk(wire.KadMessage(wire.MessageType.GET_PROVIDERS, key), note)
        return list(found.values())[:limit]

    def _note_provider(
        self,
        found: dict[PeerId, Provider],
        key: bytes,
        peer: PeerId,
        addrs: Iterable[bytes],
        record: bytes | None,
        *,
        signed_only: bool,
    ) -> None:
        if peer == self._host.peer_id:
            return
        if record is not None:
            checked = self._check_record(record, key, peer)
            if checked is None:
                return
            found[peer] = Provider(peer, tuple(_usable(_parse(checked.addrs))), signed=True)
        elif signed_only:
            self.metrics.provider_records.labels("unsigned").inc()
        elif peer not in found:
            found[peer] = Provider(peer, tuple(_usable(_parse(addrs))), signed=False)

    def _check_record(self, record: bytes, key: bytes, peer: PeerId) -> wire.ProviderRecord | None:
        try:
            checked = wire.verify_provider_record(record)
        except RemoteProtocolError as exc:
            self.metrics.provider_records.labels("forged").inc()
            log.info("ignoring a provider record for %s: %s", peer, exc)
            return None
        if checked.peer_id != peer:
            self.metrics.provider_records.labels("forged").inc()
            return None
        if checked.key != key:
            self.metrics.provider_records.labels("wrong_key").inc()
            return None
        wall = self._wall_clock()
        if not wall < checked.expires <= wall + self._config.kad.provider_ttl + CLOCK_SKEW:
            self.metrics.provider_records.labels("expired").inc()
            return None
        return checked

    async def provide(self, key: bytes) -> int:
        """Announce us as a provider of ``key`` to the k nearest DHT servers (and store it
        ourselves when we are one); returns how many were told."""
        record = self.provider_record(key)
        ours = self._self_peer(record)
        if self._config.kad.server:
            self._store_provider(key, self._host.peer_id, ours.addrs, record)
        closest = await self.closest_peers(key)
        message = wire.KadMessage(wire.MessageType.ADD_PROVIDER, key, providers=(ours,))
        told = 0

        async def tell(contact: Contact) -> None:
            nonlocal told
            if await self._request(contact, message, answer=False) is not None:
                told += 1

        async with trio.open_nursery() as nursery:
            for contact in closest:
                nursery.start_soon(tell, contact)
        return told

    def provider_record(self, key: bytes) -> bytes:
        """Our signed record for ``key``: our advertised addresses, ``kad.provider_ttl``."""
        record = wire.ProviderRecord(
            key=key,
            peer_id=self._host.peer_id,
            addrs=tuple(a.to_bytes() for a in self._host.advertised_addrs),
            expires=int(self._wall_clock()) + self._config.kad.provider_ttl,
        )
        return wire.sign_provider_record(self._host.key, record)

    def _self_peer(self, record: bytes | None = None) -> wire.KadPeer:
        addrs = tuple(a.to_bytes() for a in self._host.advertised_addrs)
        return wire.KadPeer(
            self._host.peer_id.multihash,
            addrs[: wire.MAX_ADDRS_PER_PEER],
            wire.Connectedness.CONNECTED,
            record,
        )

    async def _walk(
        self,
        request: wire.KadMessage,
        note: Callable[[Contact, wire.KadMessage], bool] | None = None,
    ) -> Lookup:
        """One iterative lookup toward ``request.key``; ``note`` sees every answer and
        returns True to stop early."""
        self.admit_connected()
        target = wire.kad_id(request.key)
        config = self._config
        lookup = Lookup(
            target,
            self.table.closest(target, config.kad.bucket_size),
            k=config.kad.bucket_size,
            alpha=config.kad.alpha,
            max_candidates=config.kad.max_lookup_peers,
            max_queries=config.kad.max_lookup_queries,
            local=self._host.peer_id,
        )
        send, receive = trio.open_memory_channel[tuple[Contact, wire.KadMessage | None]](
            config.kad.max_lookup_queries
        )

        async def ask(contact: Contact) -> None:
            reply = await self._request(contact, request)
            send.send_nowait((contact, reply))  # room for every query the lookup may send

        with trio.move_on_after(config.kad.lookup_timeout):
            async with trio.open_nursery() as nursery:
                in_flight = 0
                while True:
                    for contact in lookup.next_queries():
                        in_flight += 1
                        nursery.start_soon(ask, contact)
                    if in_flight == 0:
                        break
                    contact, reply = await receive.receive()
                    in_flight -= 1
                    if reply is None:
                        lookup.failed(contact.peer_id)
                        continue
                    lookup.answered(contact.peer_id, _contacts(reply.closer))
                    if note is not None and note(contact, reply):
                        break
                    if lookup.finished:
                        break
                nursery.cancel_scope.cancel()
        self.metrics.table_size.set(len(self.table))
        return lookup

    async def _request(
        self, contact: Contact, message: wire.KadMessage, *, answer: bool = True
    ) -> wire.KadMessage | None:
        """Send ``message`` to ``contact``; its answer (or the request itself when no answer
        is expected) on success, None on any failure. Updates the table either way."""
        try:
            with trio.fail_after(self._config.kad.request_timeout):
                conn = await self._connection(contact)
                _, stream = await conn.new_stream(
                    [self.protocol], negotiation_timeout=self._config.negotiation_timeout
                )
                async with stream:
                    await stream.send_all(wire.encode_message(message))
                    reply: wire.KadMessage | None = message
                    if answer:
                        reply = await read_message(stream)
                    else:
                        await stream.send_eof()
        except RemoteProtocolError as exc:
            self.metrics.requests.labels("bad_answer").inc()
            self.table.remove(contact.peer_id)
            self._host.report_misbehaviour(contact.peer_id, "kad")
            log.info("bad DHT answer from %s: %s", contact.peer_id, exc)
            return None
        except _FAILURES as exc:
            self.metrics.requests.labels("failed").inc()
            self.table.mark_failed(contact.peer_id)
            log.debug("DHT request to %s failed: %r", contact.peer_id, exc)
            return None
        self.metrics.requests.labels("ok").inc()
        self._add_contact(contact.peer_id, contact.addrs)
        return reply

    async def _connection(self, contact: Contact) -> Connection:
        conn = self._host.connections.get(contact.peer_id)
        if conn is not None and not conn.closed:
            return conn
        failure: Exception = PeerError(f"no address for {contact.peer_id}")
        for addr in contact.addrs:
            try:
                return await self._host.connect(addr.with_peer_id(contact.peer_id))
            except (PeerError, ProtocolError) as exc:
                failure = exc
        raise failure

    # -- server ----------------------------------------------------------------------------

    async def serve(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        """Answer requests on one stream until the peer closes it (or the per-stream bound)."""
        buffer = bytearray()
        for _ in range(self._config.kad.max_requests_per_stream):
            with trio.fail_after(self._config.stream_idle_timeout):
                request = await read_message(stream, buffer, allow_eof=True)
            # A server that asks us is a contact too (once identify says it serves the DHT:
            # clients never enter the table). Checked per request: a fresh connection's
            # identify often completes after its first request.
            self._admit(conn)
            if request is None:
                return
            self.metrics.served.labels(request.type.name.lower()).inc()
            reply = self._answer(request, conn)
            if reply is None:
                if request.type in {wire.MessageType.PUT_VALUE, wire.MessageType.GET_VALUE}:
                    return  # records are not kept here: a reset, as libp2p servers refuse
                continue
            await stream.send_all(wire.encode_message(reply))

    def _answer(self, request: wire.KadMessage, conn: Connection) -> wire.KadMessage | None:
        kind = request.type
        if kind is wire.MessageType.PING:
            return wire.KadMessage(wire.MessageType.PING)
        if kind is wire.MessageType.ADD_PROVIDER:
            self._add_provider(request, conn)
            return None
        if kind not in {wire.MessageType.FIND_NODE, wire.MessageType.GET_PROVIDERS}:
            return None
        target = wire.kad_id(request.key)
        nearest = self.table.closest(target, self._config.kad.bucket_size, exclude=(conn.peer_id,))
        closer = [_kad_peer(c) for c in nearest]
        if kind is wire.MessageType.FIND_NODE:
            if request.key == self._host.peer_id.multihash:
                closer.insert(0, self._self_peer())
            return wire.KadMessage(kind, request.key, closer=tuple(closer[: wire.MAX_PEERS]))
        providers = tuple(
            wire.KadPeer(p.peer_id.multihash, p.addrs, provider_record=p.record)
            for p in self.providers.get(request.key, trio.current_time())
        )
        return wire.KadMessage(kind, request.key, tuple(closer), providers[: wire.MAX_PEERS])

    def _add_provider(self, request: wire.KadMessage, conn: Connection) -> None:
        for peer in request.providers:
            if peer.id != conn.peer_id.multihash:
                continue  # only the provider itself may announce (libp2p's rule)
            self._store_provider(request.key, conn.peer_id, peer.addrs, peer.provider_record)

    def _store_provider(
        self, key: bytes, peer: PeerId, addrs: tuple[bytes, ...], record: bytes | None
    ) -> None:
        now = trio.current_time()
        ttl = float(self._config.kad.provider_ttl)
        if record is not None:
            checked = self._check_record(record, key, peer)
            if checked is None:
                return
            addrs = checked.addrs
            ttl = min(ttl, checked.expires - self._wall_clock())
        if not addrs:
            return  # an announcement nobody could dial (libp2p's rule)
        stored = StoredProvider(peer, addrs[: wire.MAX_ADDRS_PER_PEER], record, now + ttl)
        self.providers.add(key, stored, now)


async def read_message(
    stream: trio.abc.ReceiveStream, buffer: bytearray | None = None, *, allow_eof: bool = False
) -> wire.KadMessage | None:
    """One whole message from ``stream``; bytes after it stay in ``buffer`` for the next.

    Returns None only at a clean end of stream between messages (when ``allow_eof``).

    Raises:
        RemoteProtocolError: a malformed or oversized frame, or the stream ended mid-frame.
    """
    data = bytearray() if buffer is None else buffer
    while True:
        decoded = wire.decode_frame(data)
        if decoded is not None:
            message, used = decoded
            del data[:used]
            return message
        chunk = await stream.receive_some(wire.MAX_MESSAGE_SIZE)
        if not chunk:
            if allow_eof and not data:
                return None
            raise RemoteProtocolError("DHT stream ended before a whole message")
        data += chunk


async def _cancel_after(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


def _usable(addrs: Iterable[Multiaddr]) -> list[Multiaddr]:
    """Addresses worth dialing: direct TCP to a real host, or through a relay."""
    out: list[Multiaddr] = []
    for given in addrs:
        addr = given.without_peer_id()
        if is_dialable(addr) or addr.is_circuit():
            out.append(addr)
    return out


def _parse(raw: Iterable[bytes]) -> list[Multiaddr]:
    out: list[Multiaddr] = []
    for item in raw:
        try:
            out.append(Multiaddr.from_bytes(item))
        except ProtocolError:
            continue
    return out


def _contacts(peers: Iterable[wire.KadPeer]) -> list[Contact]:
    return [Contact(PeerId.from_bytes(p.id), tuple(_usable(p.multiaddrs()))) for p in peers]


def _kad_peer(contact: Contact) -> wire.KadPeer:
    addrs = tuple(a.to_bytes() for a in contact.addrs[: wire.MAX_ADDRS_PER_PEER])
    return wire.KadPeer(contact.peer_id.multihash, addrs)
