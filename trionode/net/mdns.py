"""The mDNS driver: one UDP socket in the multicast group, a querier and a responder.

```
serve_mdns ── mdns nursery
   ├─ _receive_loop   every datagram → wire.mdns.decode_message; a malformed one is counted
   │                  (kind="invalid") and dropped, nothing else happens
   │                  query for _p2p._udp.local → wake the responder (or, for a legacy
   │                  querier on another port, answer it directly by unicast)
   │                  response → peers into the peer store (source "mdns"); discovery dials
   ├─ _respond_loop   multicasts our response, at most once a second (RFC 6762 §6): queries
   │                  arriving within a second of the last answer share the next one
   └─ _query_loop     multicasts a query at start and then every `network.mdns_interval`
```

We answer our own query too (the multicast loops back), which is how the spec lets peers
discover a newcomer passively. The advertised addresses are the host's listen addresses;
an unspecified one (0.0.0.0) is replaced by the address of the interface mDNS uses.
Received addresses with an unspecified host get the packet's source IP instead.

mDNS is best effort: if the socket cannot be set up (port taken without SO_REUSEADDR, no
multicast route), the service logs a warning and reports ready without running, and the
node carries on without it.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import string
from typing import Final

import trio

from trionode.config import NetworkSection
from trionode.errors import RemoteProtocolError
from trionode.net.discovery import DiscoveryMetrics
from trionode.net.host import Host
from trionode.net.peerstore import PeerStore, is_dialable, resolve_unspecified
from trionode.wire.mdns import (
    DEFAULT_TTL,
    Message,
    decode_message,
    encode_query,
    encode_response,
    find_peers,
    is_peer_query,
)
from trionode.wire.multiaddr import Multiaddr

log = logging.getLogger(__name__)

MIN_MULTICAST_INTERVAL: Final = 1.0
"""RFC 6762 §6: a record is not multicast again within a second."""

MAX_UNICAST_ANSWERS_PER_SECOND: Final = 10
"""Legacy (unicast) answers per second; more are dropped, so spoofed queries cannot turn us
into a packet cannon."""

LEGACY_TTL: Final = 10
"""RFC 6762 §6.7: TTLs in answers to legacy unicast queries are at most 10 s."""

RECEIVE_BUFFER: Final = 65536
"""Bigger than any datagram, so an oversized one is seen whole and rejected, not truncated."""

_PEER_NAME_ALPHABET: Final = string.ascii_lowercase + string.digits


def make_peer_name() -> str:
    """A random mDNS instance label: 32-63 lower-case alphanumerics (libp2p spec)."""
    length = 32 + secrets.randbelow(32)
    return "".join(secrets.choice(_PEER_NAME_ALPHABET) for _ in range(length))


async def serve_mdns(
    host: Host,
    peerstore: PeerStore,
    config: NetworkSection,
    metrics: DiscoveryMetrics | None = None,
    *,
    shutdown_requested: trio.Event | None = None,
    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Discover peers on the local link and answer for ourselves.

    Reports the bound UDP port when ready, or ``None`` if mDNS could not start (logged).
    Returns when `shutdown_requested` is set; runs forever without it.
    """
    try:
        sock = await _open_socket(config)
    except (OSError, ValueError) as exc:
        log.warning(
            "mDNS off: cannot join %s:%d on %s: %s",
            config.mdns_address,
            config.mdns_port,
            config.mdns_interface,
            exc,
        )
        task_status.started(None)
        return
    with sock:
        local_ip = await _local_ipv4(config)
        service = _Mdns(host, peerstore, config, metrics or DiscoveryMetrics(None), sock, local_ip)
        name = f"{host.peer_id}:mdns"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.receive_loop, name=f"{name}:receive")
            nursery.start_soon(service.respond_loop, name=f"{name}:respond")
            nursery.start_soon(service.query_loop, name=f"{name}:query")
            port: int = sock.getsockname()[1]
            task_status.started(port)
            if shutdown_requested is not None:
                await shutdown_requested.wait()
                nursery.cancel_scope.cancel(reason="node shutting down")


async def _open_socket(config: NetworkSection) -> trio.socket.SocketType:
    group = ipaddress.IPv4Address(config.mdns_address)
    interface = trio.socket.inet_aton(str(ipaddress.IPv4Address(config.mdns_interface)))
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    try:
        # Other mDNS responders (avahi, a second node) share the port.
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        if hasattr(trio.socket, "SO_REUSEPORT"):
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind(("", config.mdns_port))
        if group.is_multicast:
            membership = group.packed + interface
            sock.setsockopt(trio.socket.IPPROTO_IP, trio.socket.IP_ADD_MEMBERSHIP, membership)
            sock.setsockopt(trio.socket.IPPROTO_IP, trio.socket.IP_MULTICAST_IF, interface)
            sock.setsockopt(trio.socket.IPPROTO_IP, trio.socket.IP_MULTICAST_LOOP, 1)
            sock.setsockopt(trio.socket.IPPROTO_IP, trio.socket.IP_MULTICAST_TTL, 255)
    except BaseException:
        sock.close()
        raise
    return sock


async def _local_ipv4(config: NetworkSection) -> str | None:
    """The IPv4 address others reach us at on the mDNS link (for 0.0.0.0 listeners)."""
    if not ipaddress.IPv4Address(config.mdns_interface).is_unspecified:
        return config.mdns_interface
    # Connecting a UDP socket sends nothing; it only asks the kernel for the route's source.
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as probe:
        try:
            await probe.connect((config.mdns_address, config.mdns_port))
        except OSError:
            return None
        ip: str = probe.getsockname()[0]
        return ip


class _Mdns:
    def __init__(  # noqa: PLR0917 - private, built in one place
        self,
        host: Host,
        store: PeerStore,
        config: NetworkSection,
        metrics: DiscoveryMetrics,
        sock: trio.socket.SocketType,
        local_ip: str | None,
    ) -> None:
        self._host = host
        self._store = store
        self._config = config
        self._metrics = metrics
        self._sock = sock
        self._local_ip = local_ip
        self._group = (config.mdns_address, config.mdns_port)
        self._peer_name = make_peer_name()
        self._response_wanted = trio.Event()
        self._unicast_window = float("-inf")
        self._unicast_count = 0

    def _advertised(self) -> list[Multiaddr]:
        addrs: list[Multiaddr] = []
        for addr in self._host.listen_addrs:
            if self._local_ip is not None:
                addr = resolve_unspecified(addr, Multiaddr.from_tcp(self._local_ip, 0))  # noqa: PLW2901
            if is_dialable(addr):
                addrs.append(addr.with_peer_id(self._host.peer_id))
        return addrs

    async def _send(self, data: bytes, destination: tuple[str, int]) -> None:
        try:
            await self._sock.sendto(data, destination)
        except OSError as exc:
            log.debug("mDNS send to %s failed: %s", destination, exc)

    async def query_loop(self) -> None:
        while True:
            await self._send(encode_query(), self._group)
            await trio.sleep(self._config.mdns_interval)

    async def respond_loop(self) -> None:
        last = float("-inf")
        while True:
            await self._response_wanted.wait()
            await trio.sleep_until(last + MIN_MULTICAST_INTERVAL)
            # Reset only now: queries that arrived while we waited share this answer.
            self._response_wanted = trio.Event()
            await self._send(encode_response(self._peer_name, self._advertised()), self._group)
            last = trio.current_time()

    async def receive_loop(self) -> None:
        while True:
            data, source = await self._sock.recvfrom(RECEIVE_BUFFER)
            try:
                message = decode_message(data)
            except RemoteProtocolError as exc:
                self._metrics.mdns_packets.labels("invalid").inc()
                log.debug("malformed mDNS packet from %s: %s", source, exc)
                continue
            if is_peer_query(message):
                self._metrics.mdns_packets.labels("query").inc()
                if source[1] == self._config.mdns_port:
                    self._response_wanted.set()
                else:
                    await self._answer_legacy(message.id, source)
            elif message.is_response:
                self._metrics.mdns_packets.labels("response").inc()
                self._learn(message, source[0])
            else:
                self._metrics.mdns_packets.labels("other").inc()
            await trio.lowlevel.checkpoint()

    async def _answer_legacy(self, query_id: int, source: tuple[str, int]) -> None:
        """A one-shot querier (not on the mDNS port) gets a unicast answer (RFC 6762 §6.7)."""
        now = trio.current_time()
        if now - self._unicast_window >= 1.0:
            self._unicast_window, self._unicast_count = now, 0
        if self._unicast_count >= MAX_UNICAST_ANSWERS_PER_SECOND:
            return
        self._unicast_count += 1
        response = encode_response(
            self._peer_name,
            self._advertised(),
            query_id=query_id,
            ttl=min(DEFAULT_TTL, LEGACY_TTL),
            include_question=True,
        )
        await self._send(response, source)

    def _learn(self, message: Message, source_ip: str) -> None:
        observed = Multiaddr.from_tcp(source_ip, 0)
        for peer in find_peers(message):
            if peer.peer_id == self._host.peer_id or peer.ttl == 0:
                continue
            addrs = [resolve_unspecified(a, observed) for a in peer.addrs]
            if self._store.add(peer.peer_id, addrs, source="mdns"):
                self._metrics.record_discovered("mdns")
                # DEBUG: foreign libp2p nodes on the LAN answer too; a peer that turns out to
                # be ours logs its connection at INFO.
                log.debug("mDNS: found %s at %s", peer.peer_id, [str(a) for a in addrs])
