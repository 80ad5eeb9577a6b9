"""AutoNAT v1: are we reachable from outside? Client and server of ``/libp2p/autonat/1.0.0``.

```
AutoNat.run ── autonat nursery
   └─ every autonat_interval (autonat_retry_interval while unknown):
        ask up to MAX_SERVERS_PER_ROUND connected peers that speak AutoNAT, at once:
        "dial me back at <candidate addresses>"; keep each peer's latest answer
AutoNat.serve (one task per inbound stream): read the request, dial the requester back on
   a NEW connection with a throwaway identity, answer OK + the address that worked, or
   E_DIAL_ERROR
```

*Verdict.* Only OK and E_DIAL_ERROR count (a refusal says nothing about us). Once
``autonat_confirmations`` distinct peers said OK we are ``public``; once as many said
E_DIAL_ERROR (and fewer said OK) we are ``private``; otherwise ``unknown``.

*Candidates* are our advertised addresses plus, for each peer's identify-observed IP, that
IP with each of our listen ports (a port forward the operator did not announce). A
candidate a peer dialed back successfully is *confirmed*: the Host advertises it from then
on (identify, invitations, `trionode info`).

*Server rules* (spec v1, plus limits): only addresses whose IP is the requester's observed
IP (no dialing third parties for someone), TCP only, private/loopback ones only with
``autonat_allow_private``; at most ``autonat_max_dialbacks`` dial-backs at once and one per
requester; the dial-back is a fresh connection (an existing one proves nothing) made with a
throwaway key, so it never replaces the requester's connection to us; it is closed once the
Noise handshake proved the requester's identity.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Final, TypeVar

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from trionode.config import NetworkSection
from trionode.errors import PeerError, ProtocolError, RemoteProtocolError
from trionode.net.host import Connection, Host
from trionode.net.multistream import select_protocol
from trionode.net.noise_stream import noise_handshake
from trionode.net.peerstore import is_dialable
from trionode.net.service import run_loops
from trionode.wire import autonat as wire
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.noise import NOISE_PROTOCOL_ID
from trionode.wire.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_SERVERS_PER_ROUND: Final = 8
MAX_DIALBACK_ADDRS: Final = 4
"""Addresses one request may make us try (the rest are ignored)."""
MAX_RESULTS: Final = 64
"""Peers whose latest answer we remember."""


class Reachability(StrEnum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


@attrs.frozen
class AutoNatStatus:
    status: Reachability
    confirmed: tuple[str, ...]
    """Addresses peers dialed us back at."""
    ok_peers: int
    failed_peers: int
    checked_at: float | None
    """Wall-clock time of the last answer (UNIX seconds)."""

    def to_json(self) -> dict[str, object]:
        return {
            "status": str(self.status),
            "confirmedAddresses": list(self.confirmed),
            "okPeers": self.ok_peers,
            "failedPeers": self.failed_peers,
            "checkedAt": self.checked_at,
        }


class AutoNatMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.status = Gauge(
            "trionode_autonat_status",
            "1 for the current reachability verdict (unknown, public, private), 0 otherwise",
            ["status"],
            registry=registry,
        )
        self.probes = Counter(
            "trionode_autonat_probes",
            "Our AutoNAT requests by answer (ok, dial_error, refused, bad_request, "
            "internal_error, failed)",
            ["outcome"],
            registry=registry,
        )
        self.served = Counter(
            "trionode_autonat_served",
            "AutoNAT requests from peers by our answer (ok, dial_error, refused, bad_request)",
            ["outcome"],
            registry=registry,
        )
        for status in Reachability:
            self.status.labels(str(status)).set(1 if status is Reachability.UNKNOWN else 0)

    def set_status(self, current: Reachability) -> None:
        for status in Reachability:
            self.status.labels(str(status)).set(1 if status is current else 0)


_OUTCOME: Final = {
    wire.Status.OK: "ok",
    wire.Status.E_DIAL_ERROR: "dial_error",
    wire.Status.E_DIAL_REFUSED: "refused",
    wire.Status.E_BAD_REQUEST: "bad_request",
    wire.Status.E_INTERNAL_ERROR: "internal_error",
}


class AutoNat:
    """Both roles. The server handler is installed at construction; run the client with
    ``await nursery.start(autonat.run, shutdown_requested)``."""

    def __init__(
        self,
        host: Host,
        config: NetworkSection,
        metrics: AutoNatMetrics | None = None,
    ) -> None:
        self._host = host
        self._config = config
        self._metrics = metrics if metrics is not None else AutoNatMetrics(None)
        self._results: dict[PeerId, bool] = {}
        """Latest countable answer per server peer: True = dialed us back."""
        self._answers = 0
        """Countable answers (OK or E_DIAL_ERROR) received so far."""
        self._confirmed: list[Multiaddr] = []
        self._checked_at: float | None = None
        self._status = Reachability.UNKNOWN
        self._dialbacks = trio.CapacityLimiter(config.autonat_max_dialbacks)
        self._serving: set[PeerId] = set()
        self._changed = trio.Event()
        host.set_handler(wire.PROTOCOL_ID, self.serve)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> AutoNatStatus:
        ok = sum(self._results.values())
        return AutoNatStatus(
            status=self._status,
            confirmed=tuple(str(a) for a in self._confirmed),
            ok_peers=ok,
            failed_peers=len(self._results) - ok,
            checked_at=self._checked_at,
        )

    def is_private(self) -> bool:
        """Whether peers agree that they cannot dial us (a relay would help)."""
        return self._status is Reachability.PRIVATE

    async def wait_status_changed(self) -> None:
        """Wait until the verdict or the confirmed addresses next change (tests)."""
        await self._changed.wait()

    def _record(self, peer: PeerId, *, reachable: bool, addr: Multiaddr | None) -> None:
        self._answers += 1
        self._results.pop(peer, None)
        self._results[peer] = reachable
        while len(self._results) > MAX_RESULTS:
            del self._results[next(iter(self._results))]
        self._checked_at = time.time()
        changed = False
        if reachable and addr is not None and addr not in self._confirmed:
            self._confirmed.append(addr)
            self._host.confirm_address(addr)
            changed = True
        ok = sum(self._results.values())
        failed = len(self._results) - ok
        need = self._config.autonat_confirmations
        status = (
            Reachability.PUBLIC
            if ok >= need
            else Reachability.PRIVATE
            if failed >= need
            else Reachability.UNKNOWN
        )
        if status is not self._status:
            log.info("reachability: %s (%d peers dialed us back, %d could not)", status, ok, failed)
            self._status = status
            self._metrics.set_status(status)
            changed = True
        if changed:
            self._changed.set()
            self._changed = trio.Event()

    # -- client ----------------------------------------------------------------------------

    async def run(
        self,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        loops = [(self._client_loop, "autonat")]
        owner = str(self._host.peer_id)
        await run_loops(owner, loops, shutdown_requested, task_status=task_status)

    async def _client_loop(self) -> None:
        config = self._config
        unanswered_wait = config.autonat_retry_interval
        while True:
            answers = self._answers
            asked = await self.check_once()
            if self._status is not Reachability.UNKNOWN:
                wait = config.autonat_interval
            elif asked and self._answers == answers:
                # Every server refused (or failed): they will not dial our addresses (private
                # ones, as on a LAN or a test network, unless they allow it), and asking them
                # again at the retry interval learns nothing. Each such round doubles the wait,
                # up to the interval of a known verdict; an answer that counts resets it.
                wait = unanswered_wait
                unanswered_wait = min(2 * unanswered_wait, config.autonat_interval)
            else:
                wait = unanswered_wait = config.autonat_retry_interval
            if not asked:
                with trio.move_on_after(wait):
                    await self._wait_for_server()
                continue
            await trio.sleep(wait)

    async def _wait_for_server(self) -> None:
        """Until a connected peer is identified as speaking AutoNAT."""
        while not self._servers():
            async with trio.open_nursery() as nursery:
                scope = nursery.cancel_scope
                nursery.start_soon(_cancel_after, self._host.wait_connection_changed, scope)
                for conn in list(self._host.connections.values()):
                    if not conn.identified.is_set():
                        nursery.start_soon(_cancel_after, conn.identified.wait, scope)

    def _servers(self) -> list[Connection]:
        return [
            conn
            for conn in self._host.connections.values()
            if not conn.closed and not conn.relayed and wire.PROTOCOL_ID in conn.protocols
        ][:MAX_SERVERS_PER_ROUND]

    def candidates(self) -> list[Multiaddr]:
        """Our advertised TCP addresses, then observed IPs with our listen ports."""
        out = [a for a in self._host.advertised_addrs if a.tcp_host_port() is not None]
        ports = sorted({hp[1] for a in self._host.listen_addrs if (hp := a.tcp_host_port())})
        for conn in list(self._host.connections.values()):
            observed = conn.observed_addr
            if observed is None or not observed.components:
                continue
            first = observed.components[0]
            if first.name not in {"ip4", "ip6"}:
                continue
            for port in ports:
                guess = Multiaddr((first, Multiaddr.from_tcp("127.0.0.1", port).components[1]))
                if is_dialable(guess):
                    out.append(guess)
        return list(dict.fromkeys(out))[: wire.MAX_ADDRS]

    async def check_once(self) -> int:
        """Ask every AutoNAT-speaking connected peer (up to a bound) once; return how many."""
        servers = self._servers()
        if not servers:
            return 0
        addrs = tuple(a.to_bytes() for a in self.candidates())
        if not addrs:
            return 0
        request = wire.DialRequest(peer_id=self._host.peer_id.multihash, addrs=addrs)
        async with trio.open_nursery() as nursery:
            for conn in servers:
                nursery.start_soon(self._ask, conn, request)
        return len(servers)

    async def _ask(self, conn: Connection, request: wire.DialRequest) -> None:
        # The server's dial-back gets the handshake timeout per address it tries.
        limit = self._config.negotiation_timeout + self._config.handshake_timeout * 2
        response: wire.DialResponse | None = None
        try:
            with trio.fail_after(limit):
                _, stream = await conn.new_stream(
                    [wire.PROTOCOL_ID], negotiation_timeout=self._config.negotiation_timeout
                )
                async with stream:
                    await stream.send_all(wire.encode_request(request))
                    response = await _read(stream, wire.decode_response_frame)
        except RemoteProtocolError as exc:
            self._metrics.probes.labels("failed").inc()
            self._host.metrics.protocol_errors.labels("autonat").inc()
            log.info("bad AutoNAT answer from %s: %s", conn.peer_id, exc)
            return
        except (
            PeerError,
            ProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            self._metrics.probes.labels("failed").inc()
            log.debug("AutoNAT request to %s failed: %r", conn.peer_id, exc)
            return
        self._metrics.probes.labels(_OUTCOME[response.status]).inc()
        if response.status is wire.Status.OK:
            addr = _decode(response.addr)
            asked = {bytes(a) for a in request.addrs}
            if addr is not None and addr.to_bytes() not in asked:
                addr = None  # it claims an address we never asked about: ignore the address
            self._record(conn.peer_id, reachable=True, addr=addr)
        elif response.status is wire.Status.E_DIAL_ERROR:
            self._record(conn.peer_id, reachable=False, addr=None)

    # -- server ----------------------------------------------------------------------------

    async def serve(self, stream: trio.abc.Stream, conn: Connection) -> None:
        with trio.fail_after(self._config.negotiation_timeout):
            request = await _read(stream, wire.decode_request_frame)
        response = await self._answer(request, conn)
        self._metrics.served.labels(_OUTCOME[response.status]).inc()
        await stream.send_all(wire.encode_response(response))
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()

    async def _answer(self, request: wire.DialRequest, conn: Connection) -> wire.DialResponse:
        if request.peer_id != conn.peer_id.multihash:
            return wire.DialResponse(wire.Status.E_BAD_REQUEST, "peer id is not yours")
        if conn.relayed:  # the observed IP would be the relay's
            return wire.DialResponse(wire.Status.E_DIAL_REFUSED, "not over a relayed connection")
        addrs = self._dialable_for(request, conn)
        if not addrs:
            return wire.DialResponse(wire.Status.E_DIAL_REFUSED, "no address I may dial")
        if conn.peer_id in self._serving:
            return wire.DialResponse(wire.Status.E_DIAL_REFUSED, "one request at a time")
        try:
            self._dialbacks.acquire_on_behalf_of_nowait(conn.peer_id)
        except trio.WouldBlock:
            return wire.DialResponse(wire.Status.E_DIAL_REFUSED, "too many dial-backs")
        self._serving.add(conn.peer_id)
        try:
            for addr in addrs:
                if await self._probe(addr, conn.peer_id):
                    return wire.DialResponse(wire.Status.OK, addr=addr.to_bytes())
        finally:
            self._serving.discard(conn.peer_id)
            self._dialbacks.release_on_behalf_of(conn.peer_id)
        return wire.DialResponse(wire.Status.E_DIAL_ERROR, "dial-back failed")

    def _dialable_for(self, request: wire.DialRequest, conn: Connection) -> list[Multiaddr]:
        observed = None if conn.remote_addr is None else _ip(conn.remote_addr)
        if observed is None:
            return []
        out: list[Multiaddr] = []
        for raw in request.addrs:
            addr = _decode(raw)
            if addr is None or addr.peer_id() not in (None, conn.peer_id):
                continue
            addr = addr.without_peer_id()
            ip = _ip(addr)
            if ip != observed or not is_dialable(addr):
                continue
            if not self._config.autonat_allow_private and not ip.is_global:
                continue
            out.append(addr)
            if len(out) == MAX_DIALBACK_ADDRS:
                break
        return out

    async def _probe(self, addr: Multiaddr, peer: PeerId) -> bool:
        """A fresh connection to ``addr`` that proves (Noise) it reaches ``peer``."""
        throwaway = PrivateKey.generate()
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self._config.handshake_timeout):
                stream = await self._host.transport.dial(addr)
                _, negotiated = await select_protocol(stream, [NOISE_PROTOCOL_ID])
                noise = await noise_handshake(
                    negotiated, throwaway, initiator=True, expected_peer_id=peer
                )
                # Finish the upgrade so the other side does not count a broken handshake.
                await select_protocol(noise, [YAMUX_PROTOCOL_ID])
        except (
            OSError,
            PeerError,
            ProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            log.debug("AutoNAT dial-back to %s at %s failed: %r", peer, addr, exc)
            return False
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)
        return True


async def _read(stream: trio.abc.Stream, decode: Callable[[bytearray], T | None]) -> T:
    """Read one whole frame (the decoder enforces the size limit as soon as it can)."""
    data = bytearray()
    while (message := decode(data)) is None:
        chunk = await stream.receive_some(wire.MAX_MESSAGE_SIZE)
        if not chunk:
            raise RemoteProtocolError("AutoNAT stream ended before a whole message")
        data += chunk
    return message


async def _cancel_after(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


def _decode(raw: bytes | None) -> Multiaddr | None:
    if raw is None:
        return None
    try:
        return Multiaddr.from_bytes(raw)
    except ProtocolError:
        return None


def _ip(addr: Multiaddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not addr.components or addr.components[0].name not in {"ip4", "ip6"}:
        return None
    text = addr.components[0].value_text()
    return None if text is None else ipaddress.ip_address(text)
