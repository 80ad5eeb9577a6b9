"""Circuit Relay v2: reach a node that nobody can dial, through a relay both can dial.

```
RelayServer (network.relay.serve)           RelayClient (every node)
  hop handler, one task per stream:           stop handler: a relay says "B wants you";
   RESERVE  → reservation until expiry        answer OK, then the stop stream is a raw
   CONNECT  → STOP CONNECT to the target,     inbound connection (Host.serve_relayed)
              then splice the two streams     circuit dialer: CONNECT on a hop stream to
              within time and byte limits     the relay; after OK it is a raw outbound one
                                            RelayClient.run: keep each `network.relays`
                                              entry connected, reserve, refresh, advertise
                                              <relay addr>/p2p/<R>/p2p-circuit
                                            RelayClient.learn_relays: with no configured
                                              relay and AutoNAT saying "private", reserve on
                                              up to `network.learn_relays` connected peers
                                              whose identify lists the hop protocol
```

The relayed connection is upgraded exactly like TCP (mss → Noise → yamux) *inside* the
spliced streams: the relay never sees plaintext. The peer that sent CONNECT is the initiator.
A reservation lives as long as the client's connection to the relay; the client reserves
again after every reconnect and before ``expire``.

Limits on the relay side: ``relay.max_reservations`` reservations, each lasting
``relay.reservation_ttl``; ``relay.max_circuits_per_peer`` circuits per target; each circuit
is cut after ``relay.circuit_duration`` seconds or ``relay.circuit_data`` bytes (both
directions counted together, as js and py do). Requests over a relayed connection are
refused (no relay chains), as are unreadable ones (MALFORMED_MESSAGE, then the stream closes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import trio

from trionode.config import NetworkSection
from trionode.errors import PeerError, ProtocolError, RemoteProtocolError
from trionode.net.host import Connection, Host
from trionode.net.multistream import PrefixedStream
from trionode.wire import relay as wire
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

log = logging.getLogger(__name__)

T = TypeVar("T")

REFRESH_MARGIN: Final = 0.2
"""Refresh a reservation when this fraction of its lifetime is left."""
_COPY_CHUNK: Final = 64 * 1024


def circuit_address(relay_addr: Multiaddr, relay: PeerId) -> Multiaddr:
    """``<relay addr>/p2p/<relay>/p2p-circuit``: where others dial us through ``relay``."""
    return relay_addr.circuit_through(relay)


def split_circuit(addr: Multiaddr) -> tuple[Multiaddr, PeerId, PeerId]:
    """``(relay part with /p2p/<R>, R, target)`` of ``…/p2p/<R>/p2p-circuit/p2p/<A>``.

    Raises:
        PeerError: not a circuit address naming both peers.
    """
    names = [c.name for c in addr.components]
    if "p2p-circuit" not in names:
        raise PeerError(f"{addr} is not a relay address")
    at = names.index("p2p-circuit")
    relay_part = Multiaddr(addr.components[:at])
    target_part = Multiaddr(addr.components[at + 1 :])
    relay = relay_part.peer_id()
    target = target_part.peer_id()
    if relay is None or target is None:
        raise PeerError(f"{addr} must name the relay and the target (/p2p/<R>/p2p-circuit/p2p/<A>)")
    return relay_part, relay, target


async def _read_frame(
    stream: trio.abc.Stream, decode: Callable[[bytearray], tuple[T, int] | None]
) -> tuple[T, bytes]:
    """One frame, and whatever arrived after it (it belongs to the next layer)."""
    data = bytearray()
    while (decoded := decode(data)) is None:
        chunk = await stream.receive_some(wire.MAX_MESSAGE_SIZE)
        if not chunk:
            raise RemoteProtocolError("relay stream ended before a whole message")
        data += chunk
    message, used = decoded
    return message, bytes(data[used:])


def _rest(stream: trio.abc.HalfCloseableStream, leftover: bytes) -> trio.abc.HalfCloseableStream:
    return PrefixedStream(stream, leftover) if leftover else stream


# -- the relay ---------------------------------------------------------------------------------


class RelayServer:
    """The hop side. Constructing it installs the handler."""

    def __init__(self, host: Host, config: NetworkSection) -> None:
        self._host = host
        self._config = config
        self.reservations: dict[PeerId, float] = {}
        """Reserved peer → expiry (Trio clock)."""
        self._circuits: dict[PeerId, int] = {}
        self.circuits_opened = 0
        self.circuits_cut = 0
        host.set_handler(wire.HOP_PROTOCOL, self._serve_hop)

    def _limit(self) -> wire.Limit:
        return wire.Limit(
            duration=self._config.relay.circuit_duration, data=self._config.relay.circuit_data
        )

    async def _reply(self, stream: trio.abc.Stream, status: wire.Status, **fields: object) -> None:
        message = wire.HopMessage(wire.HopType.STATUS, status=status, **fields)  # type: ignore[arg-type]
        await stream.send_all(wire.encode_hop(message))

    async def _serve_hop(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        try:
            with trio.fail_after(self._config.negotiation_timeout):
                request, leftover = await _read_frame(stream, wire.decode_hop_frame)
        except RemoteProtocolError:
            await self._reply(stream, wire.Status.MALFORMED_MESSAGE)
            raise
        if conn.relayed:
            await self._reply(stream, wire.Status.PERMISSION_DENIED)
        elif request.type is wire.HopType.RESERVE:
            await self._reserve(stream, conn)
        elif request.type is wire.HopType.CONNECT:
            await self._connect(_rest(stream, leftover), conn, request)
        else:
            await self._reply(stream, wire.Status.UNEXPECTED_MESSAGE)

    async def _reserve(self, stream: trio.abc.Stream, conn: Connection) -> None:
        now = trio.current_time()
        for peer, expiry in list(self.reservations.items()):
            if expiry <= now or peer not in self._host.connections:
                del self.reservations[peer]
        peer = conn.peer_id
        if peer not in self.reservations and (
            len(self.reservations) >= self._config.relay.max_reservations
        ):
            await self._reply(stream, wire.Status.RESERVATION_REFUSED)
            return
        ttl = self._config.relay.reservation_ttl
        self.reservations[peer] = now + ttl
        addrs = tuple(
            a.with_peer_id(self._host.peer_id).to_bytes() for a in self._host.advertised_addrs
        )
        reservation = wire.Reservation(expire=int(time.time()) + ttl, addrs=addrs)
        await self._reply(stream, wire.Status.OK, reservation=reservation, limit=self._limit())
        log.info("relay: %s reserved for %ds", peer, ttl)

    async def _connect(
        self, source: trio.abc.HalfCloseableStream, conn: Connection, request: wire.HopMessage
    ) -> None:
        if request.peer is None:
            await self._reply(source, wire.Status.MALFORMED_MESSAGE)
            return
        try:
            target = PeerId.from_bytes(request.peer.id)
        except ProtocolError:
            await self._reply(source, wire.Status.MALFORMED_MESSAGE)
            return
        expiry = self.reservations.get(target)
        target_conn = self._host.connections.get(target)
        if expiry is None or expiry <= trio.current_time() or target_conn is None:
            await self._reply(source, wire.Status.NO_RESERVATION)
            return
        if self._circuits.get(target, 0) >= self._config.relay.max_circuits_per_peer:
            await self._reply(source, wire.Status.RESOURCE_LIMIT_EXCEEDED)
            return
        self._circuits[target] = self._circuits.get(target, 0) + 1
        try:
            await self._bridge(source, conn.peer_id, target_conn)
        finally:
            self._circuits[target] -= 1
            if not self._circuits[target]:
                del self._circuits[target]

    async def _bridge(
        self, source: trio.abc.HalfCloseableStream, source_peer: PeerId, target: Connection
    ) -> None:
        limit = self._limit()
        try:
            with trio.fail_after(self._config.negotiation_timeout):
                _, stop = await target.new_stream(
                    [wire.STOP_PROTOCOL], negotiation_timeout=self._config.negotiation_timeout
                )
                await stop.send_all(
                    wire.encode_stop(
                        wire.StopMessage(
                            wire.StopType.CONNECT,
                            peer=wire.Peer(source_peer.multihash),
                            limit=limit,
                        )
                    )
                )
                answer, leftover = await _read_frame(stop, wire.decode_stop_frame)
        except (PeerError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.info("relay: cannot reach %s for %s: %s", target.peer_id, source_peer, exc)
            await self._reply(source, wire.Status.CONNECTION_FAILED)
            return
        async with stop:
            if answer.type is not wire.StopType.STATUS or answer.status is not wire.Status.OK:
                await self._reply(source, wire.Status.CONNECTION_FAILED)
                return
            await self._reply(source, wire.Status.OK, limit=limit)
            self.circuits_opened += 1
            log.info("relay: circuit %s → %s open", source_peer, target.peer_id)
            await self._splice(source, _rest(stop, leftover), limit)

    async def _splice(
        self, a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream, limit: wire.Limit
    ) -> None:
        budget = [limit.data]
        with trio.move_on_after(limit.duration) as timer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, a, b, budget, nursery.cancel_scope)
                nursery.start_soon(self._pump, b, a, budget, nursery.cancel_scope)
        if timer.cancelled_caught or budget[0] <= 0:
            self.circuits_cut += 1
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)

    @staticmethod
    async def _pump(
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        budget: list[int],
        scope: trio.CancelScope,
    ) -> None:
        try:
            while chunk := await src.receive_some(_COPY_CHUNK):
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    scope.cancel()  # over the byte limit: cut the circuit
                    return
                await dst.send_all(chunk)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()


# -- the client --------------------------------------------------------------------------------


class RelayClient:
    """Dial through relays, accept relayed connections, keep reservations on our relays."""

    def __init__(self, host: Host, config: NetworkSection) -> None:
        self._host = host
        self._config = config
        self.circuit_addrs: dict[PeerId, list[Multiaddr]] = {}
        """Per relay, the `/p2p-circuit` addresses our reservation there gives us."""
        self.learned: set[PeerId] = set()
        """Connected peers we hold (or are getting) a reservation on without configuration."""
        self._refused: dict[PeerId, Connection] = {}
        """Learned relays that refused us, per connection: not asked again on that one."""
        self._changed = trio.Event()
        host.set_handler(wire.STOP_PROTOCOL, self._serve_stop)
        host.set_circuit_dialer(self.dial)

    async def wait_changed(self) -> None:
        """Until a reservation is made or lost (tests)."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- dialing ---------------------------------------------------------------------------

    async def dial(self, addr: Multiaddr) -> trio.abc.Stream:
        """A raw stream to the target of a circuit address, through its relay."""
        relay_part, relay, target = split_circuit(addr)
        conn = self._host.connections.get(relay)
        if conn is None or conn.closed:
            if len(relay_part.components) < 2:
                raise PeerError(f"not connected to relay {relay} and no address to dial it")
            conn = await self._host.connect(relay_part)
        _, stream = await conn.new_stream(
            [wire.HOP_PROTOCOL], negotiation_timeout=self._config.negotiation_timeout
        )
        try:
            request = wire.HopMessage(wire.HopType.CONNECT, peer=wire.Peer(target.multihash))
            await stream.send_all(wire.encode_hop(request))
            answer, leftover = await _read_frame(stream, wire.decode_hop_frame)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if answer.type is not wire.HopType.STATUS or answer.status is not wire.Status.OK:
            await trio.aclose_forcefully(stream)
            status = answer.status.name if answer.status is not None else "no status"
            raise PeerError(f"relay {relay} refused the circuit to {target}: {status}")
        return _rest(stream, leftover)

    async def _serve_stop(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        with trio.fail_after(self._config.negotiation_timeout):
            request, leftover = await _read_frame(stream, wire.decode_stop_frame)
        if request.type is not wire.StopType.CONNECT or request.peer is None:
            status = wire.StopMessage(wire.StopType.STATUS, status=wire.Status.MALFORMED_MESSAGE)
            await stream.send_all(wire.encode_stop(status))
            return
        source = PeerId.from_bytes(request.peer.id)
        ok = wire.StopMessage(wire.StopType.STATUS, status=wire.Status.OK)
        await stream.send_all(wire.encode_stop(ok))
        remote = Multiaddr.from_string(f"/p2p/{conn.peer_id}/p2p-circuit/p2p/{source}")
        await self._host.serve_relayed(_rest(stream, leftover), remote)

    # -- reservations ----------------------------------------------------------------------

    async def reserve(self, conn: Connection) -> float:
        """Reserve on the relay at the other end of ``conn``; return the seconds it lasts.

        Raises:
            PeerError: the relay refused.
            RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError: as usual.
        """
        with trio.fail_after(self._config.negotiation_timeout):
            _, stream = await conn.new_stream(
                [wire.HOP_PROTOCOL], negotiation_timeout=self._config.negotiation_timeout
            )
            async with stream:
                await stream.send_all(wire.encode_hop(wire.HopMessage(wire.HopType.RESERVE)))
                answer, _ = await _read_frame(stream, wire.decode_hop_frame)
        if answer.status is not wire.Status.OK or answer.reservation is None:
            status = answer.status.name if answer.status is not None else "no status"
            raise PeerError(f"relay {conn.peer_id} refused the reservation: {status}")
        relay_addrs = []
        for raw in answer.reservation.addrs:
            try:
                relay_addrs.append(Multiaddr.from_bytes(raw).without_peer_id())
            except ProtocolError:
                continue
        if not relay_addrs and conn.remote_addr is not None and not conn.relayed:
            relay_addrs.append(conn.remote_addr.without_peer_id())  # py relays on 0.0.0.0
        self.circuit_addrs[conn.peer_id] = [circuit_address(a, conn.peer_id) for a in relay_addrs]
        for addr in self.circuit_addrs[conn.peer_id]:
            self._host.confirm_address(addr)
        self._notify()
        lasts = max(answer.reservation.expire - time.time(), 0.0)
        log.info("reserved on relay %s for %.0fs", conn.peer_id, lasts)
        return lasts

    async def run(
        self,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            for text in self._config.relays:
                try:
                    addr = Multiaddr.from_string(text)
                except ProtocolError as exc:
                    raise PeerError(f"network.relays: {text!r} is not a multiaddr: {exc}") from None
                if addr.peer_id() is None:
                    raise PeerError(f"network.relays: {text} needs /p2p/<relay peer id>")
                nursery.start_soon(self._keep_reserved, addr, name=f"relay {addr}")
            task_status.started()
            if shutdown_requested is not None:
                await shutdown_requested.wait()
                nursery.cancel_scope.cancel(reason="node shutting down")

    async def _keep_reserved(self, addr: Multiaddr) -> None:
        backoff = self._config.redial_initial_backoff
        while True:
            try:
                conn = await self._host.connect(addr)
                await self._hold_reservation(conn)
                backoff = self._config.redial_initial_backoff
            except (PeerError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                log.info("relay %s: %s; retrying in %.0fs", addr, exc, backoff)
            relay = addr.peer_id()
            if relay is not None:
                self._forget(relay)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self._config.redial_max_backoff)

    async def _hold_reservation(self, conn: Connection) -> None:
        """Reserve on ``conn``'s relay and refresh it until the connection ends."""
        while not conn.closed:
            lasts = await self.reserve(conn)
            with trio.move_on_after(max(lasts * (1 - REFRESH_MARGIN), 1.0)):
                await conn.session.wait_closed()

    def _forget(self, relay: PeerId) -> None:
        """Stop advertising what our reservation on ``relay`` gave us."""
        lost = self.circuit_addrs.pop(relay, [])
        for circuit in lost:
            if circuit in self._host.advertised_addrs:
                self._host.advertised_addrs.remove(circuit)
        if lost:
            self._notify()

    # -- relays learned from peers ---------------------------------------------------------

    async def learn_relays(
        self,
        private: Callable[[], bool],
        status_changed: Callable[[], Awaitable[None]],
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """While ``private()`` (AutoNAT's verdict) and no relay is configured, hold
        reservations on up to ``network.learn_relays`` connected peers that offer the hop
        protocol. Re-examined on every connection change and ``status_changed()``."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            if self._config.relays or self._config.learn_relays == 0:
                return
            nursery.start_soon(self._learn_loop, private, status_changed, nursery)
            if shutdown_requested is not None:
                await shutdown_requested.wait()
                nursery.cancel_scope.cancel(reason="node shutting down")

    async def _learn_loop(
        self,
        private: Callable[[], bool],
        status_changed: Callable[[], Awaitable[None]],
        nursery: trio.Nursery,
    ) -> None:
        while True:
            if private():
                for conn in self._relay_candidates()[
                    : self._config.learn_relays - len(self.learned)
                ]:
                    self.learned.add(conn.peer_id)
                    nursery.start_soon(self._keep_learned, conn, name=f"relay {conn.peer_id}")
            async with trio.open_nursery() as waiting:  # whichever comes first

                async def wait(event: Callable[[], Awaitable[None]]) -> None:
                    await event()
                    waiting.cancel_scope.cancel()

                waiting.start_soon(wait, self._host.wait_connection_changed)
                waiting.start_soon(wait, status_changed)
                waiting.start_soon(wait, self.wait_changed)

    def _relay_candidates(self) -> list[Connection]:
        return [
            conn
            for conn in self._host.connections.values()
            if not conn.closed
            and not conn.relayed
            and wire.HOP_PROTOCOL in conn.protocols
            and conn.peer_id not in self.learned
            and self._refused.get(conn.peer_id) is not conn
        ]

    async def _keep_learned(self, conn: Connection) -> None:
        try:
            log.info("private and no relay configured: reserving on %s", conn.peer_id)
            await self._hold_reservation(conn)
        except (PeerError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.info("learned relay %s: %s", conn.peer_id, exc)
            self._refused[conn.peer_id] = conn
        finally:
            self.learned.discard(conn.peer_id)
            self._forget(conn.peer_id)
            for peer, refused in list(self._refused.items()):
                if refused.closed:
                    del self._refused[peer]
            self._notify()
