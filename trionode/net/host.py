"""The libp2p host: listeners, dialer, connection manager and per-stream protocol dispatch.

```
Host.run ── host nursery
   ├─ serve_listeners(...)      one per listen multiaddr; each accepted TCP stream → _accept
   ├─ _keep_connected(addr)     one per bootstrap peer: dial, wait for the connection to end,
   │                            re-dial with capped exponential backoff
   └─ _run_connection(conn)     one per connection, own nursery (a failing peer stays alone):
        ├─ YamuxSession.run     reader / writer / timer
        ├─ _accept_streams      negotiates each inbound stream, runs its handler in a task
        ├─ _identify_peer       asks the peer who it is (/ipfs/id/1.0.0)
        └─ _keepalive           /ipfs/ping/1.0.0 every ping_interval; two misses close it
                                (a miss while our own loop ran late is excused, a few times)
```

Upgrade of a raw TCP stream (both directions): multistream-select `/noise` → Noise XX
(the initiator checks the /p2p/ peer id it dialed) → multistream-select `/yamux/1.0.0`.
One connection per peer: when two connections to the same peer exist (a simultaneous dial)
both sides keep the one *initiated by the smaller peer id*, so they agree without talking
about it. The other one is *retired*, not cut: new streams go to the one kept, but the
retired one keeps serving for `network.replaced_connection_grace` and then until no stream
is open on it (at most `network.replaced_connection_drain`). Each end learns of the second
connection a little later than the other; in between it may have opened a stream (a sync
session) on the one the other end already retired, and that stream must finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import trio

from trionode import __version__
from trionode.config import NetworkSection
from trionode.errors import (
    ListenError,
    LocalProtocolError,
    PeerError,
    ProtocolError,
    RemoteProtocolError,
    StreamEndedError,
    StreamStalledError,
)
from trionode.net.addresses import advertised_addresses, interface_ips, is_unspecified
from trionode.net.connmgr import AddressGroup, ConnectionLimits, ConnectionManager, address_group
from trionode.net.framed import StreamLimits
from trionode.net.metrics import NetMetrics
from trionode.net.multistream import (
    ProtocolNotSupportedError,
    accept_protocol,
    select_protocol,
)
from trionode.net.noise_stream import NoiseProtocolError, NoiseStream, noise_handshake
from trionode.net.transport import TcpTransport, Transport
from trionode.net.yamux_session import YamuxSession, YamuxStream
from trionode.wire.identify import (
    IDENTIFY_PROTOCOL_ID,
    MAX_IDENTIFY_MESSAGE_SIZE,
    PING_PAYLOAD_LENGTH,
    PING_PROTOCOL_ID,
    IdentifyMessage,
    check_ping_response,
    make_ping_payload,
)
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.noise import NOISE_PROTOCOL_ID
from trionode.wire.varint import decode_length_prefixed
from trionode.wire.yamux import (
    GO_AWAY_PROTOCOL_ERROR,
    PROTOCOL_ID as YAMUX_PROTOCOL_ID,
    YamuxConfig,
)

log = logging.getLogger(__name__)

AGENT_VERSION = f"trionode/{__version__}"
PROTOCOL_VERSION = "ipfs/0.1.0"
MAX_IDENTIFY_SIZE = MAX_IDENTIFY_MESSAGE_SIZE

StreamHandler = Callable[[trio.abc.HalfCloseableStream, "Connection"], Awaitable[None]]
CircuitDialer = Callable[[Multiaddr], Awaitable[trio.abc.Stream]]
"""Opens a raw stream to a `/p2p-circuit` address (through its relay); Noise comes after."""
"""Serves one inbound stream. Not always a YamuxStream: bytes the dialer pipelined after its
proposal come first through a PrefixedStream wrapper."""


@attrs.define(eq=False)
class Connection:
    """An authenticated, multiplexed connection to one peer."""

    peer_id: PeerId
    remote_addr: Multiaddr | None
    outbound: bool
    session: YamuxSession
    noise: NoiseStream
    opened_at: float = attrs.field(factory=time.time)
    agent: str | None = None
    protocols: tuple[str, ...] = ()
    listen_addrs: tuple[Multiaddr, ...] = ()
    observed_addr: Multiaddr | None = None
    """Our address as this peer sees it (identify); a candidate until AutoNAT confirms it."""
    ping_rtt: float | None = None
    identified: trio.Event = attrs.field(factory=trio.Event)
    refused_streams: int = 0
    member: bool = False
    """Dialled as a member of a context we share (the caller said so): never closed for room."""

    @property
    def direction(self) -> str:
        return "outbound" if self.outbound else "inbound"

    @property
    def relayed(self) -> bool:
        """Whether this connection runs through a relay (Circuit Relay v2)."""
        return self.remote_addr is not None and self.remote_addr.is_circuit()

    @property
    def closed(self) -> bool:
        return self.session.closed

    def initiator(self, local: PeerId) -> PeerId:
        return local if self.outbound else self.peer_id

    async def new_stream(
        self, protocols: list[str] | tuple[str, ...], *, negotiation_timeout: float = 10.0
    ) -> tuple[str, trio.abc.HalfCloseableStream]:
        """Open a stream and agree on one of `protocols` (most preferred first)."""
        stream = await self.session.open_stream()
        try:
            with trio.fail_after(negotiation_timeout):
                protocol, negotiated = await select_protocol(stream, protocols)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        stream.protocol = protocol
        return protocol, negotiated

    async def aclose(self) -> None:
        await self.session.aclose()


@attrs.frozen
class PeerInfo:
    """One row of `Host.peers()`."""

    peer_id: str
    address: str | None
    direction: str
    agent: str | None
    streams: int
    ping_rtt_ms: float | None
    protocols: tuple[str, ...]
    connected_for: float


class Host:
    """A libp2p host. Run it with `await nursery.start(host.run)`."""

    def __init__(
        self,
        key: PrivateKey,
        config: NetworkSection,
        metrics: NetMetrics | None = None,
        *,
        yamux: YamuxConfig | None = None,
        transport: Transport | None = None,
        local_ips: Callable[[], list[str]] = interface_ips,
    ) -> None:
        self.key = key
        self.transport: Transport = (
            transport if transport is not None else TcpTransport(reuse_port=config.tcp_reuse_port)
        )
        """Where raw connections come from: TCP, or an in-process MemoryNetwork in tests."""
        self.peer_id = key.peer_id()
        self.config = config
        self.metrics = metrics if metrics is not None else NetMetrics(None)
        self.listen_addrs: list[Multiaddr] = []
        """What the listeners bound (a wildcard stays a wildcard)."""
        self.advertised_addrs: list[Multiaddr] = []
        """What we tell others to dial (identify, invitations, `info`): see net/addresses.py."""
        self._local_ips = local_ips
        self.connections: dict[PeerId, Connection] = {}
        self._handlers: dict[str, StreamHandler] = {}
        self._yamux = yamux or YamuxConfig(max_inbound_streams=config.max_streams_per_connection)
        self.stream_limits = StreamLimits(
            first_message=config.stream_first_message_timeout,
            between_messages=config.stream_idle_timeout,
        )
        """Deadlines of the framed streams (sync, join, fetch) that protocols run over us."""
        self.connmgr = ConnectionManager(ConnectionLimits.from_config(config))
        """Per-address shares, watermarks and protected members (net/connmgr.py)."""
        self._nursery: trio.Nursery | None = None
        self._connection_changed = trio.Event()
        self._redial_now = trio.Event()
        """Set (and replaced) when a backed-off bootstrap redial is worth trying at once: the
        first connection opened after none was open (the network came back), a bootstrap
        peer whose dials were failing connected (it came back: so may the others), or the
        last connection closed (we are offline: the offline interval applies from now)."""
        self._failing: set[PeerId] = set()
        """Bootstrap peers whose last dial failed."""
        self._dialing: dict[PeerId, trio.Event] = {}
        self._circuit_dialer: CircuitDialer | None = None
        self.set_handler(PING_PROTOCOL_ID, _serve_ping)
        self.set_handler(IDENTIFY_PROTOCOL_ID, self._serve_identify)

    # -- configuration ---------------------------------------------------------------------

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve inbound streams that negotiate `protocol` with `handler(stream, conn)`."""
        self._handlers[protocol] = handler

    def remove_handler(self, protocol: str) -> None:
        """Stop serving `protocol` (streams that negotiate it are refused from now on)."""
        self._handlers.pop(protocol, None)

    def set_circuit_dialer(self, dialer: CircuitDialer) -> None:
        """Dial `/p2p-circuit` addresses with `dialer` (the relay client registers itself,
        as protocols register their handlers)."""
        self._circuit_dialer = dialer

    @property
    def protocols(self) -> list[str]:
        return list(self._handlers)

    # -- running ---------------------------------------------------------------------------

    async def run(
        self,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen, keep bootstrap peers connected and serve peers until `shutdown_requested`.

        On shutdown every connection says GoAway (so peers know it is deliberate) and the
        listeners close.
        """
        listen = [_parse_addr(text, "network.listen") for text in self.config.listen]
        announce = [_parse_addr(text, "network.announce") for text in self.config.announce]
        for addr in announce:
            if is_unspecified(addr):
                raise PeerError(f"network.announce: {addr} is not an address anyone can dial")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for addr in listen:
                hp = addr.tcp_host_port()
                if hp is None:
                    raise PeerError(f"network.listen: {addr} is not a TCP multiaddr")
                try:
                    listeners, bound = await self.transport.listen(addr)
                except OSError as exc:
                    raise ListenError(
                        f"network.listen: cannot listen on {addr}: {exc.strerror or exc}"
                    ) from None
                self.listen_addrs.extend(bound)
                for listener in listeners:
                    nursery.start_soon(
                        partial(trio.serve_listeners, self._accept, [listener]),
                        name=f"{self.peer_id}:listen",
                    )
            self.advertised_addrs = advertised_addresses(
                self.listen_addrs,
                # Only a wildcard needs the interface list (the memory network has none).
                self._local_ips() if any(map(is_unspecified, self.listen_addrs)) else [],
                announce=announce,
                announce_replace=self.config.announce_replace,
            )
            for text in self.config.bootstrap:
                nursery.start_soon(
                    self._keep_connected, _parse_addr(text, "network.bootstrap"), name="bootstrap"
                )
            task_status.started(list(self.listen_addrs))
            if shutdown_requested is not None:
                await shutdown_requested.wait()
                async with trio.open_nursery() as closing:
                    for conn in list(self.connections.values()):
                        closing.start_soon(conn.aclose)
                nursery.cancel_scope.cancel()

    def confirm_address(self, addr: Multiaddr) -> bool:
        """Advertise ``addr`` too: AutoNAT peers dialed us back there. True if it is new."""
        addr = addr.without_peer_id()
        if addr in self.advertised_addrs or is_unspecified(addr):
            return False
        self.advertised_addrs.append(addr)
        return True

    def addresses(self) -> list[str]:
        """Our advertised addresses with /p2p/<peer id>, for others to dial."""
        return [str(a.with_peer_id(self.peer_id)) for a in self.advertised_addrs]

    # -- outbound --------------------------------------------------------------------------

    async def connect(self, address: str | Multiaddr, *, member: bool = False) -> Connection:
        """Dial `address` (a TCP multiaddr, ideally with /p2p/<peer id>) unless connected.

        `member`: the peer is a member of a context we share (the caller knows, e.g. an
        invitation names it). Such a dial is never refused for lack of room: another,
        unprotected peer is closed instead.
        """
        addr = address if isinstance(address, Multiaddr) else _parse_addr(address, "address")
        expected = addr.peer_id()
        if expected == self.peer_id:
            raise PeerError("refusing to dial ourselves")
        if expected is not None:
            existing = await self._existing_or_pending(expected)
            if existing is not None:
                return existing
        if not self.connmgr.may_dial(expected, member=member):
            raise PeerError(f"connection limit ({self.config.max_connections}) reached")
        circuit = addr.is_circuit()
        if circuit and self._circuit_dialer is None:
            raise PeerError(f"{addr} is a relay address and relaying is off")
        if not circuit and addr.tcp_host_port() is None:
            raise PeerError(f"{addr} is not a TCP multiaddr")
        dial = self._circuit_dialer if circuit else self.transport.dial
        assert dial is not None
        done = trio.Event()
        if expected is not None:
            self._dialing[expected] = done
        try:
            try:
                with trio.fail_after(self.config.dial_timeout):
                    tcp = await dial(addr)
            except (OSError, trio.TooSlowError) as exc:
                self.metrics.dials.labels("unreachable").inc()
                raise PeerError(f"cannot connect to {addr}: {str(exc) or 'timed out'}") from None
            conn = await self._upgrade_or_close(tcp, addr, outbound=True, expected=expected)
            conn.member = member
            self.metrics.dials.labels("ok").inc()
            return await self._start_connection(conn)
        finally:
            if expected is not None:
                self._dialing.pop(expected, None)
            done.set()

    async def dial_direct(self, addr: Multiaddr, peer: PeerId, *, initiator: bool) -> Connection:
        """A direct connection to ``peer`` at ``addr`` even while a relayed one exists: a hole
        punch (DCUtR). ``initiator`` is our role above TCP (multistream, Noise, yamux), fixed
        by the DCUtR roles rather than by who dialed; the peer must turn out to be ``peer``.
        Registered like any connection, so it replaces the relayed one (see ``_register``).

        Raises:
            PeerError: unreachable, or the upgrade failed (wrong peer, roles that clash).
        """
        try:
            with trio.fail_after(self.config.dial_timeout):
                tcp = await self.transport.dial(addr)
        except (OSError, trio.TooSlowError) as exc:
            raise PeerError(f"cannot connect to {addr}: {str(exc) or 'timed out'}") from None
        # Noise checks the expected peer only as the initiator; as the responder we check.
        expected = peer if initiator else None
        conn = await self._upgrade_or_close(tcp, addr, outbound=initiator, expected=expected)
        if conn.peer_id != peer:
            await conn.aclose()
            raise PeerError(f"{addr} is {conn.peer_id}, not {peer}")
        # Shielded: the hole puncher cancels the other dials as soon as one registers, and a
        # connection being started must not be torn down by that.
        with trio.CancelScope(shield=True):
            started = await self._start_connection(conn)
        return started  # noqa: RET504 - returned inside the scope, mypy sees a path without one

    async def _existing_or_pending(self, peer: PeerId) -> Connection | None:
        pending = self._dialing.get(peer)
        if pending is not None:
            await pending.wait()
        conn = self.connections.get(peer)
        return conn if conn is not None and not conn.closed else None

    async def new_stream(
        self, peer: PeerId, protocols: list[str] | tuple[str, ...]
    ) -> tuple[str, trio.abc.HalfCloseableStream]:
        conn = self.connections.get(peer)
        if conn is None or conn.closed:
            raise PeerError(f"not connected to {peer}")
        return await conn.new_stream(protocols, negotiation_timeout=self.config.negotiation_timeout)

    async def ping(self, peer: PeerId) -> float:
        """One /ipfs/ping/1.0.0 round trip; returns seconds."""
        _, stream = await self.new_stream(peer, [PING_PROTOCOL_ID])
        async with stream:
            with trio.fail_after(self.config.ping_timeout):
                rtt = await _ping_once(stream)
            await stream.send_eof()
        conn = self.connections.get(peer)
        if conn is not None:
            conn.ping_rtt = rtt
        return rtt

    async def _keep_connected(self, addr: Multiaddr) -> None:
        backoff = self.config.redial_initial_backoff
        peer = addr.peer_id()
        while True:
            try:
                conn = await self.connect(addr)
            except (PeerError, ProtocolError, trio.TooSlowError) as exc:
                if peer is not None:
                    self._failing.add(peer)
                # Offline, the likely cause is our own network: try again soon, whatever
                # the backoff (`network.offline_redial_interval`).
                wait = (
                    backoff
                    if self.is_online()
                    else min(backoff, self.config.offline_redial_interval)
                )
                log.info("bootstrap peer %s unreachable (%s); retrying in %.1fs", addr, exc, wait)
                # A sign that the network changed ends the wait (see `_redial_now`): a healed
                # link is worth trying at once, not after a long backoff.
                with trio.move_on_after(wait):
                    await self._redial_now.wait()
                backoff = min(backoff * 2, self.config.redial_max_backoff)
                continue
            if peer is not None:
                self._failing.discard(peer)
            backoff = self.config.redial_initial_backoff
            await conn.session.wait_closed()
            # Do not hammer a peer that accepts and then drops us at once.
            await trio.sleep(self.config.redial_initial_backoff)

    # -- inbound ---------------------------------------------------------------------------

    async def _accept(self, tcp: trio.abc.Stream) -> None:
        remote = self.transport.remote_address(tcp)
        group = address_group(remote)
        handshake = trio.CancelScope()
        admission = self.connmgr.begin_handshake(group, handshake)
        if admission.refused is not None:
            self.metrics.handshake_failures.labels(admission.refused).inc()
            await trio.aclose_forcefully(tcp)
            return
        if isinstance(admission.evict, trio.CancelScope):
            # Every slot was taken: the oldest pending handshake of the most crowded
            # address gives its slot to this one.
            self.metrics.handshake_failures.labels("evicted_pending").inc()
            admission.evict.cancel()
        conn: Connection | None = None
        try:
            refused = self.connmgr.may_accept(group)
            if refused is not None:
                self.metrics.handshake_failures.labels(refused).inc()
                await trio.aclose_forcefully(tcp)
                return
            with handshake:
                try:
                    conn = await self._upgrade_or_close(tcp, remote, outbound=False, expected=None)
                except (PeerError, ProtocolError, trio.TooSlowError):
                    return  # counted and logged in _upgrade_or_close
        finally:
            self.connmgr.end_handshake(handshake)
        if conn is not None:  # None: evicted (the socket is closed)
            await self._run_connection(conn)

    async def serve_relayed(self, stream: trio.abc.Stream, addr: Multiaddr) -> None:
        """Run an inbound connection that arrived through a relay (a stop stream) until it
        closes. The caller is the stop handler, so the connection lives inside the relay
        connection's stream task and dies with it."""
        if len(self.connections) >= self.config.max_connections:
            self.metrics.handshake_failures.labels("connection_limit").inc()
            await trio.aclose_forcefully(stream)
            return
        try:
            conn = await self._upgrade_or_close(stream, addr, outbound=False, expected=None)
        except (PeerError, ProtocolError, trio.TooSlowError):
            return
        await self._run_connection(conn)

    # -- both directions -------------------------------------------------------------------

    async def _upgrade_or_close(
        self,
        tcp: trio.abc.Stream,
        addr: Multiaddr | None,
        *,
        outbound: bool,
        expected: PeerId | None,
    ) -> Connection:
        try:
            with trio.fail_after(self.config.handshake_timeout):
                return await self._upgrade(tcp, addr, outbound=outbound, expected=expected)
        except BaseException as exc:
            reason = _failure_reason(exc)
            if reason is not None:
                self.metrics.handshake_failures.labels(reason).inc()
                # Our own dials report failures to whoever dialed (discovery and mDNS at
                # DEBUG: a foreign libp2p node on the LAN is not news; bootstrap and the API
                # say it themselves), so only inbound failures are worth INFO here.
                log.log(
                    logging.DEBUG if outbound else logging.INFO,
                    "handshake with %s failed: %s: %s",
                    addr,
                    reason,
                    exc,
                )
            await trio.aclose_forcefully(tcp)
            if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
                raise PeerError(f"connection to {addr} broke during the handshake") from None
            raise

    async def _upgrade(
        self,
        tcp: trio.abc.Stream,
        addr: Multiaddr | None,
        *,
        outbound: bool,
        expected: PeerId | None,
    ) -> Connection:
        if outbound:
            _, stream = await select_protocol(tcp, [NOISE_PROTOCOL_ID])
        else:
            _, stream = await accept_protocol(tcp, [NOISE_PROTOCOL_ID])
        noise = await noise_handshake(
            stream, self.key, initiator=outbound, expected_peer_id=expected
        )
        if outbound:
            _, muxed = await select_protocol(noise, [YAMUX_PROTOCOL_ID])
        else:
            _, muxed = await accept_protocol(noise, [YAMUX_PROTOCOL_ID])
        conn = Connection(
            peer_id=noise.remote_peer_id,
            remote_addr=addr,
            outbound=outbound,
            session=YamuxSession(muxed, is_client=outbound, config=self._yamux),
            noise=noise,
        )
        conn.session.on_stream_refused = partial(self._on_stream_refused, conn)
        return conn

    async def _start_connection(self, conn: Connection) -> Connection:
        assert self._nursery is not None, "Host.run is not running"
        kept: Connection = await self._nursery.start(self._run_connection, conn)
        return kept

    async def _run_connection(
        self,
        conn: Connection,
        *,
        task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        kept = self._register(conn)
        if kept is None:
            await conn.session.aclose()
            if conn.outbound:  # start() raises it to the dialer
                raise PeerError(f"connection limit ({self.config.max_connections}) reached")
            return
        retiring = kept is not conn
        if retiring:
            task_status.started(kept)
            if kept.relayed != conn.relayed:
                await conn.session.aclose()  # a relayed one that lost to a direct one
                return
            log.debug("%s: kept the connection %s initiated", conn.peer_id, kept.direction)
        direction = conn.direction
        self.metrics.connections.labels(direction).inc()
        log.info("connected to %s (%s, %s)", conn.peer_id, direction, conn.remote_addr)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.session.run)
                nursery.start_soon(self._accept_streams, conn)
                if retiring:
                    # Lost a simultaneous dial: serve what the peer opens until it knows.
                    nursery.start_soon(self._retire, conn)
                else:
                    nursery.start_soon(self._identify_peer, conn)
                    nursery.start_soon(self._keepalive, conn)
                    task_status.started(conn)
                await conn.session.wait_closed()
                nursery.cancel_scope.cancel()
        except* RemoteProtocolError as group:
            error = _first_leaf(group)
            layer = "noise" if isinstance(error, NoiseProtocolError) else "yamux"
            self.metrics.protocol_errors.labels(layer).inc()
            log.warning("disconnected %s: %s", conn.peer_id, error)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.metrics.connections.labels(direction).dec()
            self.metrics.account_closed(conn)
            if self.connections.get(conn.peer_id) is conn:
                del self.connections[conn.peer_id]
                self.connmgr.remove(conn.peer_id)
            self._notify()
            if not self.is_online():
                self._wake_redials()
            log.info(
                "disconnected from %s (%s)", conn.peer_id, conn.session.close_reason or "closed"
            )

    def _register(self, conn: Connection) -> Connection | None:
        """Keep `conn`, keep the peer's other connection instead (returned), or refuse it
        for lack of room (None). Peers displaced to make room are closed."""
        existing = self.connections.get(conn.peer_id)
        if existing is not None and not existing.closed:
            if existing.relayed != conn.relayed:
                # A direct connection beats a relayed one (DCUtR's point); both ends agree.
                keep_new = existing.relayed
            else:
                # Keep the connection initiated by the smaller peer id; both ends agree.
                keep_new = bytes(conn.initiator(self.peer_id).multihash) < bytes(
                    existing.initiator(self.peer_id).multihash
                ) and conn.initiator(self.peer_id) != existing.initiator(self.peer_id)
            if not keep_new:
                return existing
            self._admit(conn, self._group_of(conn))
            self.connections[conn.peer_id] = conn
            self._notify()
            if self._nursery is not None:
                # New streams go to `conn` from now on; streams still running on the old
                # one get time to finish (a relayed one: DCUtR's handover).
                if existing.relayed:
                    grace = self.config.dcutr.handover_grace
                    self._nursery.start_soon(_close_after, existing, grace)
                else:
                    self._nursery.start_soon(self._retire, existing)
            return conn
        group = self._group_of(conn)
        if not self._admit(conn, group):
            return None
        alone = not self.is_online()
        self.connections[conn.peer_id] = conn
        self._notify()
        if alone or conn.peer_id in self._failing:
            self._failing.discard(conn.peer_id)
            self._wake_redials()
        for peer in self.connmgr.trim(trio.current_time()):
            self._close_for_room(peer, "trimmed")
        return conn

    async def _retire(self, conn: Connection) -> None:
        """Close `conn`, the loser of a simultaneous dial, once the peer has had time to learn
        which connection won (`replaced_connection_grace`) and no stream is open on it
        (within `replaced_connection_drain`). Both ends do the same, so neither cuts a stream
        the other opened on it before it knew."""
        self.metrics.retired.inc()
        with trio.move_on_after(self.config.replaced_connection_drain):
            await trio.sleep(self.config.replaced_connection_grace)
            await conn.session.wait_idle()
        await conn.session.aclose()

    def _group_of(self, conn: Connection) -> AddressGroup:
        return None if conn.outbound else address_group(conn.remote_addr)

    def _admit(self, conn: Connection, group: AddressGroup) -> bool:
        admission = self.connmgr.admit(
            conn.peer_id,
            group,
            outbound=conn.outbound,
            now=trio.current_time(),
            member=conn.member,
        )
        if admission.refused is not None:
            self.metrics.handshake_failures.labels(admission.refused).inc()
            log.info("refused %s from %s: %s", conn.peer_id, conn.remote_addr, admission.refused)
            return False
        for peer in admission.evict:
            self._close_for_room(peer, "displaced")
        return True

    def _close_for_room(self, peer: PeerId, reason: str) -> None:
        """Close an unprotected peer's connection to make room (`trimmed` above the high
        water mark, `displaced` by a newcomer at the cap)."""
        conn = self.connections.get(peer)
        self.metrics.closed_for_room.labels(reason).inc()
        if conn is not None and self._nursery is not None:
            log.info("closing %s to make room (%s)", peer, reason)
            self._nursery.start_soon(conn.aclose)

    def member_proven(self, peer: PeerId, context_id: bytes) -> None:
        """`peer` signed a valid membership proof for `context_id`, a context we share (the
        sync responder calls this): its connection is protected from now on."""
        if self.connmgr.prove(peer, context_id):
            log.info("%s proved membership; its connection is protected", peer)

    def report_misbehaviour(self, peer: PeerId, reason: str) -> None:
        """`peer` broke a protocol above the transport in a way no honest peer does (the
        protocol's driver decides): disconnect it and count it."""
        self.metrics.misbehaving.labels(reason).inc()
        conn = self.connections.get(peer)
        if conn is not None and not conn.closed and self._nursery is not None:
            log.warning("disconnecting %s: %s", peer, reason)
            self._nursery.start_soon(conn.aclose)

    def is_online(self) -> bool:
        """Whether any connection is open."""
        return any(not conn.closed for conn in self.connections.values())

    def _wake_redials(self) -> None:
        self._redial_now.set()
        self._redial_now = trio.Event()

    def _notify(self) -> None:
        self._connection_changed.set()
        self._connection_changed = trio.Event()

    async def wait_connection_changed(self) -> None:
        """Wait until a connection opens or closes (for tests and the discovery loop)."""
        await self._connection_changed.wait()

    def _on_stream_refused(self, conn: Connection) -> None:
        conn.refused_streams += 1
        self.metrics.streams_refused.inc()
        if conn.refused_streams == self.config.max_refused_streams:
            log.warning("disconnecting %s: stream flood", conn.peer_id)
            self.metrics.protocol_errors.labels("stream_flood").inc()
            conn.session.conn.go_away(GO_AWAY_PROTOCOL_ERROR)  # aclose() flushes it
            if self._nursery is not None:
                self._nursery.start_soon(conn.session.aclose)

    async def _accept_streams(self, conn: Connection) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await conn.session.accept_stream()
                except trio.EndOfChannel:
                    return
                nursery.start_soon(self._handle_stream, stream, conn)

    async def _handle_stream(self, stream: YamuxStream, conn: Connection) -> None:
        try:
            with trio.fail_after(self.config.negotiation_timeout):
                protocol, negotiated = await accept_protocol(stream, self._handlers)
        except (
            ProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            await trio.aclose_forcefully(stream)
            return
        stream.protocol = protocol
        handler = self._handlers.get(protocol)
        if handler is None:  # (removed while the stream negotiated it)
            await trio.aclose_forcefully(stream)
            return
        try:
            await handler(negotiated, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except (StreamStalledError, trio.TooSlowError) as exc:
            self.metrics.streams_stalled.labels(protocol).inc()
            log.info("%s from %s: %s", protocol, conn.peer_id, str(exc) or "timed out")
        except StreamEndedError as exc:
            log.info("%s from %s: %s", protocol, conn.peer_id, exc)
        except ProtocolError as exc:  # a bad frame costs its stream; protocols decide more
            self.metrics.protocol_errors.labels("stream").inc()
            log.info("%s on %s from %s: %s", type(exc).__name__, protocol, conn.peer_id, exc)
        except Exception:  # a handler bug must cost one stream, never the node
            self.metrics.handler_errors.labels(protocol).inc()
            log.exception("handler for %s failed on a stream from %s", protocol, conn.peer_id)
        finally:
            await trio.aclose_forcefully(negotiated)

    # -- identify and ping -----------------------------------------------------------------

    def _identify_message(self, conn: Connection) -> IdentifyMessage:
        return IdentifyMessage.create(
            protocol_version=PROTOCOL_VERSION,
            agent_version=AGENT_VERSION,
            public_key=self.key.public_key,
            listen_addrs=self.advertised_addrs,
            observed_addr=conn.remote_addr,
            protocols=self.protocols,
        )

    async def _serve_identify(self, stream: trio.abc.Stream, conn: Connection) -> None:
        await stream.send_all(self._identify_message(conn).encode_framed())
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()

    async def _identify_peer(self, conn: Connection) -> None:
        try:
            _, stream = await conn.new_stream(
                [IDENTIFY_PROTOCOL_ID], negotiation_timeout=self.config.negotiation_timeout
            )
            async with stream:
                with trio.fail_after(self.config.negotiation_timeout):
                    message = await _read_identify(stream)
        except (
            ProtocolNotSupportedError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            LocalProtocolError,
        ):
            return
        except RemoteProtocolError as exc:
            self.metrics.protocol_errors.labels("identify").inc()
            log.info("bad identify from %s: %s", conn.peer_id, exc)
            return
        key = message.decoded_public_key()
        if key is not None and key.peer_id() != conn.peer_id:
            self.metrics.protocol_errors.labels("identify").inc()
            log.warning("identify from %s carries another peer's key; disconnecting", conn.peer_id)
            await conn.aclose()
            return
        conn.agent = message.agent_version
        conn.protocols = tuple(message.protocols)
        conn.listen_addrs = tuple(message.decoded_listen_addrs())
        # Through a relay, "observed" is the relay's view of the relay: never learn from it.
        conn.observed_addr = None if conn.relayed else message.decoded_observed_addr()
        conn.identified.set()

    async def _keepalive(self, conn: Connection) -> None:
        failures = excused = 0
        while not conn.closed:
            answered, late = await self._ping_watched(conn.peer_id)
            if answered:
                failures = excused = 0
            elif late and excused < self.config.ping_excused_misses:
                # Our loop ran late while we waited: the peer may well have answered in
                # time, unread. A whole node under load closed every connection at once.
                excused += 1
                self.metrics.pings_missed.labels("excused").inc()
            else:
                failures += 1
                self.metrics.pings_missed.labels("counted").inc()
                if failures >= 2:
                    log.info("%s stopped answering pings; disconnecting", conn.peer_id)
                    self.metrics.pings_missed.labels("disconnected").inc()
                    await conn.aclose()
                    return
            await trio.sleep(self.config.ping_interval)

    async def _ping_watched(self, peer: PeerId) -> tuple[bool, bool]:
        """One keepalive ping: (answered, whether our event loop ran late meanwhile: its
        timers resumed, on average, more than `ping_lag_allowance` after their time).

        A watcher sleeps beside the ping in steps of a twentieth of `ping_timeout` and adds
        up how late each step resumed; an answered ping (a few ms) cancels it before its
        first step. A loop with thousands of runnable tasks runs each a little late, and a
        ping needs a few dozen task switches across both ends: a lag of a few hundred ms
        each made a 10 s ping time out while every peer answered."""
        allowance = self.config.ping_lag_allowance
        step = self.config.ping_timeout / 20
        late_by = 0.0
        steps = 0
        due = trio.current_time() + step

        async def watch() -> None:
            nonlocal late_by, steps, due
            while True:
                await trio.sleep_until(due)
                now = trio.current_time()
                late_by += now - due
                steps += 1
                due = now + step

        answered = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            try:
                await self.ping(peer)
                answered = True
            except (
                trio.TooSlowError,
                PeerError,
                ProtocolError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ):
                pass
            nursery.cancel_scope.cancel()
        # (A step overdue now and not run counts too: the ping's deadline woke first.)
        overdue = max(0.0, trio.current_time() - due)
        lag = (late_by + overdue) / max(steps + (overdue > 0), 1)
        return answered, lag > allowance

    # -- introspection ---------------------------------------------------------------------

    def peers(self) -> list[PeerInfo]:
        now = time.time()
        return [
            PeerInfo(
                peer_id=str(conn.peer_id),
                address=None if conn.remote_addr is None else str(conn.remote_addr),
                direction=conn.direction,
                agent=conn.agent,
                streams=conn.session.open_streams,
                ping_rtt_ms=None if conn.ping_rtt is None else round(conn.ping_rtt * 1000, 3),
                protocols=conn.protocols,
                connected_for=round(now - conn.opened_at, 1),
            )
            for conn in self.connections.values()
        ]


# -- helpers ----------------------------------------------------------------------------------


async def _close_after(conn: Connection, delay: float) -> None:
    await trio.sleep(delay)
    await conn.session.aclose()


async def _serve_ping(stream: trio.abc.Stream, _conn: Connection) -> None:
    buffer = bytearray()
    while True:
        chunk = await stream.receive_some(PING_PAYLOAD_LENGTH - len(buffer))
        if not chunk:
            return
        buffer += chunk
        if len(buffer) == PING_PAYLOAD_LENGTH:
            await stream.send_all(bytes(buffer))
            buffer.clear()


async def _ping_once(stream: trio.abc.Stream) -> float:
    payload = make_ping_payload()
    started = trio.current_time()
    await stream.send_all(payload)
    received = bytearray()
    while len(received) < PING_PAYLOAD_LENGTH:
        chunk = await stream.receive_some(PING_PAYLOAD_LENGTH - len(received))
        if not chunk:
            raise RemoteProtocolError("peer closed the ping stream")
        received += chunk
    check_ping_response(payload, bytes(received))
    return trio.current_time() - started


async def _read_identify(stream: trio.abc.Stream) -> IdentifyMessage:
    data = bytearray()
    while True:
        framed = decode_length_prefixed(data, max_size=MAX_IDENTIFY_SIZE)
        if framed is not None:
            return IdentifyMessage.decode(framed[0])
        chunk = await stream.receive_some(MAX_IDENTIFY_SIZE)
        if not chunk:
            raise RemoteProtocolError("identify stream ended before a whole message")
        data += chunk


def _parse_addr(text: str, what: str) -> Multiaddr:
    try:
        return Multiaddr.from_string(text)
    except ProtocolError as exc:
        raise PeerError(f"{what}: {text!r} is not a multiaddr: {exc}") from None


def _first_leaf(group: BaseExceptionGroup[RemoteProtocolError]) -> RemoteProtocolError:
    error: RemoteProtocolError | BaseExceptionGroup[RemoteProtocolError] = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _failure_reason(exc: BaseException) -> str | None:
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, ProtocolNotSupportedError):
        return "unsupported"
    if isinstance(exc, RemoteProtocolError):
        return "dialled_wrong_peer" if "dialled" in str(exc) else "protocol"
    if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
        return "broken"
    if isinstance(exc, trio.Cancelled):
        return None
    return "other"
