"""An in-process network for test clusters: byte streams between Hosts, partitions, gossip faults.

```
MemoryNetwork ─ one per simulated network
   ├─ transport(ip) → MemoryTransport   a Host's Transport, bound to one virtual IP
   │    ├─ listen(/ip4/<ip or 0.0.0.0>/tcp/<port or 0>) → MemoryListener (port 0 → 4001, 4002 …)
   │    └─ dial(/ip4/<ip>/tcp/<port>) → MemoryStream; the other end is queued on the listener
   ├─ partition(a, b) / heal()          dials across fail with OSError; open streams across
   │                                    are aborted (both ends raise BrokenResourceError)
   ├─ set_nat(ip, NatKind)              put a host behind a NAT model (below)
   └─ close()                           refuse every new dial (cluster tear-down)
GossipFaults ─ consulted by PubSub for each *received* gossip message, before its router
```

Theory of operation:

* **Byte streams are reliable.** Noise and yamux assume an ordered, lossless byte stream (a
  lost or reordered byte is a MAC failure, not a delay), so a connection here behaves like TCP:
  :class:`MemoryStream` is ``trio.testing.memory_stream_pair`` (unbounded, data moves as soon as
  it is sent) with TCP-looking addresses. The only stream faults are the ones TCP has: a refused
  or unreachable dial (``OSError``) and an aborted connection (``BrokenResourceError`` on both
  ends, like a reset), which is what a partition does to the connections that cross it.
* **Message faults are one layer up.** Loss, duplication, delay and reordering of gossip are
  applied by :class:`GossipFaults` to each message a node's pubsub driver reads, before the
  router sees it: a dropped message is never seen by the router (so gossip repair, IHAVE/IWANT
  or sync, may still bring it), a duplicate reaches the router twice (which must drop the
  second copy), a delayed copy reaches it later than messages read after it (reordering).
  Control traffic (subscriptions, GRAFT/PRUNE, IHAVE/IWANT) is never faulted.
* **NAT models** (:class:`NatKind`), for relays and hole punching. A NATed host dials out
  from its listen port (SO_REUSEPORT, as ``TcpTransport`` does) through a mapping to a public
  port on its own IP, and accepts an inbound dial only on a mapped port and only from an
  (ip, port) it sent to through that mapping (port-restricted filtering). A filtered dial is
  a dropped SYN: it waits (TCP retransmits) until the filter opens or the dialer gives up.
  Two dials that each target the other's mapped port from their own are paired into one
  connection: a TCP simultaneous open. Endpoint-independent mapping keeps the port for every
  destination (a plain masquerade), so peers observe the address a punch must reach;
  endpoint-dependent mapping picks a new public port per destination (``masquerade random``),
  so nobody can predict it and a punch fails; no-inbound refuses every inbound dial.
* **Virtual time.** Nothing here blocks on anything but Trio primitives and every dial and
  accept happens on the Trio thread, so under ``autojump_clock`` a cluster is idle only when
  all of its work is done; delays are ``trio.sleep`` on the (mock) clock.
"""

from __future__ import annotations

import enum
import errno
import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Final, final

import attrs
import trio
import trio.testing

from trionode.errors import PeerError, RemoteProtocolError
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.pubsub_pb import RPC, PubsubMessage, decode_rpc
from trionode.wire.varint import BytesLike, decode_length_prefixed

if TYPE_CHECKING:
    from trionode.net.pubsub import PubSub

DEFAULT_SUBNET: Final = "10.42.0"
"""Virtual IPs handed out by :meth:`MemoryNetwork.transport` are ``10.42.0.1``, ``.2`` …"""
FIRST_LISTEN_PORT: Final = 4001
"""Port 0 in a listen address becomes the first free port from here (per IP)."""
FIRST_EPHEMERAL_PORT: Final = 49152
"""Local ports of dialed connections count up from here (per IP), as a kernel's would."""
LISTEN_BACKLOG: Final = 128
"""Dialed connections a listener holds before they are accepted; more are refused, like a
full SYN queue. Accepting is immediate in practice, so this is only a bound."""

FIRST_NAT_PORT: Final = 20000
"""Public ports an endpoint-dependent NAT picks count up from here (per IP)."""

Host = str
"""A virtual IP address such as ``10.42.0.3``."""


class NatKind(enum.Enum):
    """How a host's NAT treats its connections (see the module docstring)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"
    NO_INBOUND = "no-inbound"


@final
class _PendingDial:
    """A dial whose SYN a NAT filter dropped, waiting for the filter to open or for the
    other side's dial to meet it (simultaneous open)."""

    def __init__(self) -> None:
        self.stream: MemoryStream | None = None


# -- streams ----------------------------------------------------------------------------------


@final
class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection: ``memory_stream_pair`` with addresses and abort.

    Behaves like a TCP socket stream: ``send_eof`` is a FIN (the other end reads ``b""``),
    sending after the other end closed raises ``BrokenResourceError``, and after
    :meth:`abort` (a partition) every operation on either end raises ``BrokenResourceError``.
    """

    def __init__(
        self,
        inner: trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream],
        local_address: Multiaddr,
        remote_address: Multiaddr,
        on_close: Callable[[], None] | None = None,
        on_send: Callable[[int], None] | None = None,
    ) -> None:
        self._inner = inner
        self._on_send = on_send
        self.local_address = local_address
        """Where this end is (the dialer's ephemeral port on the dialing side)."""
        self.remote_address = remote_address
        """Where the other end is."""
        self._aborted = False
        self._closed = False
        self._on_close = on_close
        self.peer: MemoryStream | None = None
        """The other end (set by the network when it pairs them)."""
        self.link: _Link | None = None

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """Reset the connection at once (synchronous), as a partition or a closing
        listener does: pending and later operations on *both* ends raise
        ``BrokenResourceError`` (an end already closed stays closed)."""
        self._reset()
        if self.peer is not None:
            self.peer._reset()  # noqa: SLF001 - same class: a reset reaches both ends

    def _reset(self) -> None:
        if self._aborted or self._closed:
            return
        self._aborted = True
        # Closing the receive half wipes what was buffered and wakes a pending receive_some,
        # which then sees the abort (nothing runs before both ends are reset: no checkpoint).
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._inner.send_stream.close()
        self._inner.receive_stream.close()
        self._closed_now()

    def _closed_now(self) -> None:
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()

    def _broken(self) -> trio.BrokenResourceError | None:
        """What a ClosedResourceError from the inner stream means: ours (None) or an abort."""
        if self._aborted and not self._closed:
            return trio.BrokenResourceError("connection aborted (network partition)")
        return None

    async def _check_aborted(self) -> None:
        if self._aborted and not self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("connection aborted (network partition)")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._check_aborted()
        if self._on_send is not None:
            self._on_send(len(data))
        try:
            await self._inner.send_all(data)
        except trio.ClosedResourceError:
            broken = self._broken()
            if broken is not None:
                raise broken from None
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._check_aborted()
        try:
            await self._inner.wait_send_all_might_not_block()
        except trio.ClosedResourceError:
            broken = self._broken()
            if broken is not None:
                raise broken from None
            raise

    async def send_eof(self) -> None:
        await self._check_aborted()
        await self._inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self._check_aborted()
        try:
            return await self._inner.receive_some(max_bytes)
        except trio.ClosedResourceError:
            broken = self._broken()
            if broken is not None:
                raise broken from None
            raise

    async def aclose(self) -> None:
        self._closed = True
        try:
            # The other end may be gone already: closing never fails for that reason.
            with suppress(trio.BrokenResourceError):
                await self._inner.aclose()
        finally:
            self._closed_now()


class _Link:
    """Both ends of one connection, for partitions and statistics."""

    __slots__ = ("ends", "hosts", "on_gone", "open_ends")

    def __init__(self, hosts: tuple[Host, Host], on_gone: Callable[[_Link], None]) -> None:
        self.hosts = hosts
        self.ends: tuple[MemoryStream, ...] = ()
        self.open_ends = 2
        self.on_gone = on_gone

    def end_closed(self) -> None:
        self.open_ends -= 1
        if self.open_ends == 0:
            self.on_gone(self)

    def abort(self) -> None:
        for end in self.ends:
            end.abort()


# -- listeners and transports -----------------------------------------------------------------


@final
class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Accepts the connections dialed to one (virtual IP, port); made by a MemoryTransport."""

    def __init__(self, address: Multiaddr, on_close: Callable[[MemoryListener], None]) -> None:
        self.address = address
        # Bounded (LISTEN_BACKLOG): a full backlog refuses the dial.
        self._send, self._receive = trio.open_memory_channel[MemoryStream](LISTEN_BACKLOG)
        self._on_close = on_close
        self.closed = False

    def enqueue(self, stream: MemoryStream) -> bool:
        """Queue a dialed connection's server end; False if the backlog is full or closed."""
        try:
            self._send.send_nowait(stream)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def accept(self) -> MemoryStream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener is closed") from None

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_close(self)
            # Connections dialed but never accepted are reset, as a closing socket does.
            while True:
                try:
                    self._receive.receive_nowait().abort()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            self._send.close()
            self._receive.close()
        await trio.lowlevel.checkpoint()


@final
class MemoryTransport:
    """A Host's :class:`~trionode.net.transport.Transport` on a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, host: Host) -> None:
        self.network = network
        self.host = host
        """This transport's virtual IP: where it listens and where its dials come from."""

    async def listen(
        self, addr: Multiaddr
    ) -> tuple[Sequence[trio.abc.Listener[trio.abc.Stream]], list[Multiaddr]]:
        await trio.lowlevel.checkpoint()
        listener = self.network.listen(self.host, addr)
        return [listener], [listener.address]

    async def dial(self, addr: Multiaddr) -> trio.abc.Stream:
        return await self.network.dial(self.host, addr)

    def remote_address(self, stream: trio.abc.Stream) -> Multiaddr | None:
        return stream.remote_address if isinstance(stream, MemoryStream) else None


@attrs.frozen
class MemoryNetworkStatistics:
    hosts: int
    listeners: int
    connections: int
    """Connections with at least one end open."""
    dials: int
    refused: int
    """Dials that found no listener (or a full backlog)."""
    unreachable: int
    """Dials refused because a partition separates the two hosts."""
    aborted: int
    """Connections aborted by partitions."""
    bytes_sent: int = 0
    """Bytes written into every connection so far (both directions, closed ones included)."""


# -- the network ------------------------------------------------------------------------------


class MemoryNetwork:
    """Virtual IPs, listeners and connections for Hosts running in one Trio run.

    Usage: ``Host(key, network_section, transport=network.transport())``; the host's
    ``network.listen`` entries are TCP multiaddrs on its IP or on ``0.0.0.0`` (port 0 is
    allowed) and it dials other hosts' ``/ip4/<ip>/tcp/<port>`` addresses.
    """

    def __init__(self, subnet: str = DEFAULT_SUBNET) -> None:
        self.subnet = subnet
        self._transports: dict[Host, MemoryTransport] = {}
        self._listeners: dict[tuple[Host, int], MemoryListener] = {}
        self._next_ephemeral: dict[Host, int] = {}
        self._links: set[_Link] = set()
        self._bytes_sent = 0
        self._blocked: set[frozenset[Host]] = set()
        self._no_inbound: set[Host] = set()
        self._nat: dict[Host, NatKind] = {}
        self._mappings: dict[tuple[Host, int, Host, int], int] = {}
        """(host, local port, destination ip, destination port) → public port."""
        self._filters: dict[tuple[Host, int], tuple[int, set[tuple[Host, int]]]] = {}
        """(host, public port) → (local port, the (ip, port)s it sent to from there)."""
        self._next_nat_port: dict[Host, int] = {}
        self._pending: dict[tuple[Host, int, Host, int], _PendingDial] = {}
        """(dialer, its public port, target ip, target port) → a dial waiting at a filter."""
        self._nat_changed = trio.Event()
        self._closed = False
        self._dials = 0
        self._refused = 0
        self._unreachable = 0
        self._aborted = 0

    # -- hosts -----------------------------------------------------------------------------

    def transport(self, host: Host | None = None) -> MemoryTransport:
        """A transport on virtual IP ``host`` (default: the next free ``<subnet>.<n>``)."""
        if host is None:
            n = len(self._transports) + 1
            while f"{self.subnet}.{n}" in self._transports:
                n += 1
            host = f"{self.subnet}.{n}"
        if host in self._transports:
            raise ValueError(f"{host} already has a transport")
        transport = MemoryTransport(self, host)
        self._transports[host] = transport
        return transport

    def hosts(self) -> list[Host]:
        return list(self._transports)

    # -- faults ----------------------------------------------------------------------------

    def partition(
        self, group_a: Iterable[Host | MemoryTransport], group_b: Iterable[Host | MemoryTransport]
    ) -> int:
        """Separate two groups of hosts until :meth:`heal`. Synchronous; returns how many
        open connections it aborted.

        Dials from one group to the other fail with ``OSError`` (EHOSTUNREACH) at once, and
        the connections between them are aborted: both ends raise ``BrokenResourceError``.
        Traffic inside each group is untouched. Partitions add up until healed.
        """
        a = [_host_of(h) for h in group_a]
        b = [_host_of(h) for h in group_b]
        if set(a) & set(b):
            raise ValueError(f"a host cannot be on both sides of a partition: {set(a) & set(b)}")
        for x in a:
            for y in b:
                self._blocked.add(frozenset((x, y)))
        cut = [link for link in self._links if not self.reachable(*link.hosts)]
        for link in cut:
            link.abort()
        self._aborted += len(cut)
        return len(cut)

    def disconnect(self, host: Host | MemoryTransport) -> int:
        """Abort every open connection of ``host`` at once, as the kernel resets them when
        its process is killed (a crashing cluster node). Returns how many it aborted."""
        ip = _host_of(host)
        cut = [link for link in self._links if ip in link.hosts]
        for link in cut:
            link.abort()
        self._aborted += len(cut)
        return len(cut)

    def heal(self) -> None:
        """Lift every partition. Connections they aborted stay closed: hosts redial."""
        self._blocked.clear()

    def reachable(self, a: Host, b: Host) -> bool:
        """Whether no partition separates ``a`` and ``b``."""
        return a == b or frozenset((a, b)) not in self._blocked

    def block_inbound(self, host: Host, *, blocked: bool = True) -> None:
        """The "no inbound" NAT model: ``host`` dials out as usual (its connections work
        both ways) but nobody can dial it, as behind a home router without port forwards."""
        if blocked:
            self._no_inbound.add(host)
        else:
            self._no_inbound.discard(host)

    def set_nat(self, host: Host | MemoryTransport, kind: NatKind | None) -> None:
        """Put ``host`` behind a NAT of ``kind`` (None: none). Affects new connections."""
        host = _host_of(host)
        self.block_inbound(host, blocked=kind is NatKind.NO_INBOUND)
        if kind is None or kind is NatKind.NO_INBOUND:
            self._nat.pop(host, None)
        else:
            self._nat[host] = kind

    def close(self) -> None:
        """Refuse every dial from now on (open connections keep working): used when a
        cluster shuts down, so that nodes do not redial peers that are stopping."""
        self._closed = True

    # -- used by MemoryTransport -----------------------------------------------------------

    def listen(self, host: Host, addr: Multiaddr) -> MemoryListener:
        """Bind ``addr`` for ``host``. Synchronous; see :meth:`MemoryTransport.listen`."""
        ip, port = _host_port(addr)
        if ip not in {host, "0.0.0.0"}:  # noqa: S104 - an address, not a bind
            raise OSError(errno.EADDRNOTAVAIL, f"{ip} is not {host}'s address")
        if port == 0:
            port = FIRST_LISTEN_PORT
            while (host, port) in self._listeners:
                port += 1
        elif (host, port) in self._listeners:
            raise OSError(errno.EADDRINUSE, f"{host}:{port} is already in use")
        listener = MemoryListener(Multiaddr.from_tcp(host, port), self._unlisten)
        self._listeners[host, port] = listener
        return listener

    def _unlisten(self, listener: MemoryListener) -> None:
        hp = listener.address.tcp_host_port()
        if hp is not None and self._listeners.get(hp) is listener:
            del self._listeners[hp]

    async def dial(self, host: Host, addr: Multiaddr) -> MemoryStream:
        """Open a connection from ``host`` to ``addr``: :meth:`connect`, except that between
        NATed hosts a filtered dial waits (see the module docstring). Cancel it to give up.

        Raises:
            OSError: as :meth:`connect`.
        """
        await trio.lowlevel.checkpoint()
        ip, port = _host_port(addr)
        if host not in self._nat and ip not in self._nat:
            return self.connect(host, addr)
        if not self.reachable(host, ip):
            self._unreachable += 1
            raise OSError(errno.EHOSTUNREACH, f"{ip} is unreachable from {host} (partition)")
        # Only a NATed host dials from its listen port: a public dialer's ephemeral port
        # keeps port-restricted filters closed to dial-backs, as AutoNAT expects.
        local_port = self._source_port(host) if host in self._nat else self._ephemeral_port(host)
        public_port = self._map(host, local_port, ip, port)
        key = (host, public_port, ip, port)
        if key in self._pending:
            raise OSError(errno.EADDRNOTAVAIL, f"{host}:{public_port} → {ip}:{port} in use")
        pending = _PendingDial()
        self._pending[key] = pending
        self._nat_changed_now()
        try:
            while True:
                if pending.stream is not None:
                    return pending.stream  # the other side's dial met ours
                target = self._inbound_port(ip, port, (host, public_port))
                if target is not None:
                    break
                await self._nat_changed.wait()
        finally:
            del self._pending[key]
        self._dials += 1
        local = Multiaddr.from_tcp(host, local_port)
        seen_as = Multiaddr.from_tcp(host, public_port)
        crossing = self._pending.get((ip, port, host, public_port))
        if crossing is not None and crossing.stream is None:
            # Both SYNs crossed: one connection between the two dialing sockets.
            client, server = self._pair(host, ip, local, seen_as, Multiaddr.from_tcp(ip, port))
            crossing.stream = server
            self._nat_changed_now()
            return client
        return self._deliver(
            host, ip, target, local=local, seen_as=seen_as, remote=Multiaddr.from_tcp(ip, port)
        )

    def _source_port(self, host: Host) -> int:
        """A NATed host dials from its listen port (SO_REUSEPORT) when it has one."""
        ports = sorted(p for h, p in self._listeners if h == host)
        return ports[0] if ports else self._ephemeral_port(host)

    def _map(self, host: Host, local_port: int, ip: Host, port: int) -> int:
        """The public port of a dial from ``host:local_port`` to ``ip:port``; the filter of
        that public port opens for ``ip:port``."""
        kind = self._nat.get(host)
        if kind is None:
            return local_port
        key = (host, local_port, ip, port)
        public = self._mappings.get(key)
        if public is None:
            if kind is NatKind.ENDPOINT_INDEPENDENT:
                public = local_port  # port-keeping, as masquerade does when it can
            else:
                public = self._next_nat_port.get(host, FIRST_NAT_PORT)
                self._next_nat_port[host] = public + 1
            self._mappings[key] = public
        _, allowed = self._filters.setdefault((host, public), (local_port, set()))
        allowed.add((ip, port))
        return public

    def _inbound_port(self, ip: Host, port: int, source: tuple[Host, int]) -> int | None:
        """The local port a dial from ``source`` to ``ip:port`` reaches, None if filtered."""
        if ip not in self._nat:
            return port
        entry = self._filters.get((ip, port))
        if entry is None or source not in entry[1]:
            return None
        return entry[0]

    def _nat_changed_now(self) -> None:
        self._nat_changed.set()
        self._nat_changed = trio.Event()

    def connect(self, host: Host, addr: Multiaddr) -> MemoryStream:
        """Open a connection from ``host`` to ``addr``. Synchronous: the dialer's end comes
        back at once and the other end waits in the listener's backlog.

        Raises:
            OSError: nobody listens there (ECONNREFUSED), or a partition is in the way
                (EHOSTUNREACH).
        """
        self._dials += 1
        ip, port = _host_port(addr)
        if not self.reachable(host, ip):
            self._unreachable += 1
            raise OSError(errno.EHOSTUNREACH, f"{ip} is unreachable from {host} (partition)")
        if ip in self._no_inbound and ip != host:
            self._unreachable += 1
            raise OSError(errno.EHOSTUNREACH, f"{ip} accepts no inbound connections (NAT)")
        if (ip, port) not in self._listeners or self._closed:
            self._refused += 1
            raise OSError(errno.ECONNREFUSED, f"connection to {ip}:{port} refused")
        local = Multiaddr.from_tcp(host, self._ephemeral_port(host))
        return self._deliver(
            host, ip, port, local=local, seen_as=local, remote=Multiaddr.from_tcp(ip, port)
        )

    def _deliver(
        self,
        host: Host,
        ip: Host,
        port: int,
        *,
        local: Multiaddr,
        seen_as: Multiaddr,
        remote: Multiaddr,
    ) -> MemoryStream:
        """Queue a connection from ``host`` (``local``, seen by the other end as ``seen_as``)
        on the listener of ``ip:port``; ``remote`` is what the dialer sees it connect to."""
        listener = self._listeners.get((ip, port))
        if listener is None or self._closed:
            self._refused += 1
            raise OSError(errno.ECONNREFUSED, f"connection to {ip}:{port} refused")
        client, server = self._pair(host, ip, local, seen_as, remote)
        if not listener.enqueue(server):
            self._refused += 1
            self._links.discard(server.link)
            raise OSError(errno.ECONNREFUSED, f"connection to {ip}:{port} refused (backlog)")
        return client

    def _pair(
        self, host: Host, ip: Host, local: Multiaddr, seen_as: Multiaddr, remote: Multiaddr
    ) -> tuple[MemoryStream, MemoryStream]:
        """Both ends of a new connection between ``host`` and ``ip``."""
        link = _Link((host, ip), self._links.discard)
        client_inner, server_inner = trio.testing.memory_stream_pair()
        client = MemoryStream(client_inner, local, remote, link.end_closed, self._count_sent)
        server = MemoryStream(server_inner, remote, seen_as, link.end_closed, self._count_sent)
        link.ends = (client, server)
        client.peer, server.peer = server, client
        server.link = link
        self._links.add(link)
        return client, server

    def _ephemeral_port(self, host: Host) -> int:
        port = self._next_ephemeral.get(host, FIRST_EPHEMERAL_PORT)
        self._next_ephemeral[host] = port + 1 if port < 0xFFFF else FIRST_EPHEMERAL_PORT
        return port

    # -- introspection ---------------------------------------------------------------------

    def connections_between(self, a: Host, b: Host) -> int:
        """Open connections between hosts ``a`` and ``b`` (either direction)."""
        pair = {a, b}
        return sum(1 for link in self._links if set(link.hosts) == pair)

    def statistics(self) -> MemoryNetworkStatistics:
        return MemoryNetworkStatistics(
            hosts=len(self._transports),
            listeners=len(self._listeners),
            connections=len(self._links),
            dials=self._dials,
            refused=self._refused,
            unreachable=self._unreachable,
            aborted=self._aborted,
            bytes_sent=self._bytes_sent,
        )

    def _count_sent(self, n: int) -> None:
        self._bytes_sent += n


def _host_of(host: Host | MemoryTransport) -> Host:
    return host.host if isinstance(host, MemoryTransport) else host


def _host_port(addr: Multiaddr) -> tuple[str, int]:
    hp = addr.tcp_host_port()
    if hp is None:
        raise PeerError(f"{addr} is not a TCP multiaddr")
    return hp


# -- gossip faults ----------------------------------------------------------------------------

MessageFilter = Callable[[PeerId, PeerId, PubsubMessage], bool]
"""``(receiver, sender, message) -> bool``: whether the faults apply to this message."""
Feed = Callable[[PeerId, BytesLike, float], None]
"""What a pubsub reader hands its bytes to: ``GossipRouter.receive_data``'s signature."""


@attrs.frozen
class GossipFaultStatistics:
    considered: int
    """Received messages the policy decided on (those ``applies`` selected)."""
    dropped: int
    """Messages the router never saw."""
    duplicated: int
    """Messages handed to the router twice."""
    delayed: int
    """Copies handed to the router later than they were read (delay > 0)."""


class GossipFaults:
    """Loss, duplication, delay (and so reordering) of received gossip messages; seeded.

    Give one to every node of a cluster (``open_cluster(..., faults=...)``, or
    ``PubSub(..., faults=...)``): each node's pubsub driver then consults it for every gossip
    message it reads from a peer, before the router sees it. For each message, in order:

    * with probability ``drop`` it is dropped (the router never sees it);
    * else with probability ``duplicate`` it is handed to the router twice;
    * each copy is delayed by ``uniform(0, max_delay)`` seconds of Trio time (``max_delay``
      0: no delay); copies delayed differently arrive out of order.

    Control traffic and subscriptions pass untouched, at once. ``drop``, ``duplicate``,
    ``max_delay`` and ``applies`` are plain attributes: a test may change them between phases.
    Decisions come from one ``random.Random(seed)`` in the order messages are read, so a run
    is reproducible as far as Trio's scheduling order is.
    """

    def __init__(
        self,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        max_delay: float = 0.0,
        seed: int = 0,
        applies: MessageFilter | None = None,
    ) -> None:
        """Args:
        drop: probability that a message is dropped.
        duplicate: probability that a (not dropped) message is delivered twice.
        max_delay: upper bound of each copy's delay, in seconds.
        seed: seeds the decisions.
        applies: restricts the faults to the messages it returns True for (e.g. only those
            received by one node); others pass untouched and are not counted.
        """
        for name, p in (("drop", drop), ("duplicate", duplicate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, not {p}")
        if max_delay < 0:
            raise ValueError("max_delay must not be negative")
        self.drop = drop
        self.duplicate = duplicate
        self.max_delay = max_delay
        self.applies = applies
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not security
        self._considered = 0
        self._dropped = 0
        self._duplicated = 0
        self._delayed = 0
        self._nurseries: dict[PubSub, trio.Nursery] = {}

    def decide(self, receiver: PeerId, sender: PeerId, message: PubsubMessage) -> list[float]:
        """The delays of the copies of ``message`` to deliver: ``[]`` drops it, ``[0.0]``
        passes it unchanged, two entries duplicate it."""
        if self.applies is not None and not self.applies(receiver, sender, message):
            return [0.0]
        rng = self.rng
        self._considered += 1
        if self.drop > 0 and rng.random() < self.drop:
            self._dropped += 1
            return []
        copies = 1
        if self.duplicate > 0 and rng.random() < self.duplicate:
            self._duplicated += 1
            copies = 2
        if self.max_delay <= 0:
            return [0.0] * copies
        delays = [rng.uniform(0.0, self.max_delay) for _ in range(copies)]
        self._delayed += sum(1 for delay in delays if delay > 0)
        return delays

    def statistics(self) -> GossipFaultStatistics:
        return GossipFaultStatistics(
            considered=self._considered,
            dropped=self._dropped,
            duplicated=self._duplicated,
            delayed=self._delayed,
        )

    # -- the PubSub side -------------------------------------------------------------------

    async def run(
        self, pubsub: PubSub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold ``pubsub``'s delayed deliveries (each a task sleeping on the Trio clock).

        ``PubSub.run`` starts this when it has faults; the delayed copies die with it.
        """
        async with trio.open_nursery() as nursery:
            self._nurseries[pubsub] = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                del self._nurseries[pubsub]

    def reader(self, pubsub: PubSub) -> Feed:
        """A replacement for ``pubsub.router.receive_data`` for one inbound stream."""
        return _FaultyFeed(self, pubsub).feed

    def deliver(self, pubsub: PubSub, peer: PeerId, rpc: RPC, delay: float, now: float) -> None:
        """Hand ``rpc`` from ``peer`` to ``pubsub``'s router now, or after ``delay`` seconds
        (at once if ``pubsub`` does not run this policy's :meth:`run` task)."""
        nursery = self._nurseries.get(pubsub)
        if delay <= 0 or nursery is None:
            # The reader that called us moves the router's output on (PubSub._pump).
            pubsub.router.receive_rpc(peer, rpc, now)
        else:
            nursery.start_soon(_deliver_later, pubsub, peer, rpc, delay)


async def _deliver_later(pubsub: PubSub, peer: PeerId, rpc: RPC, delay: float) -> None:
    await trio.sleep(delay)
    pubsub.receive_rpc(peer, rpc)  # a peer gone meanwhile is counted as such by the router


class _FaultyFeed:
    """Splits one inbound pubsub stream into RPCs and each RPC into its messages.

    Frames that cannot be split (a garbled prefix, an oversized or undecodable RPC) go to the
    router as they are, so it judges and counts them exactly as it would without faults.
    """

    def __init__(self, faults: GossipFaults, pubsub: PubSub) -> None:
        self._faults = faults
        self._pubsub = pubsub
        self._buffer = bytearray()
        self._passthrough = False

    def feed(self, peer: PeerId, data: BytesLike, now: float) -> None:
        router = self._pubsub.router
        if self._passthrough:
            router.receive_data(peer, data, now)
            return
        buffer = self._buffer
        buffer += data
        limits = router.config.rpc_limits
        offset = 0
        while offset < len(buffer):
            try:
                framed = decode_length_prefixed(buffer, offset, max_size=limits.max_rpc_size)
            except RemoteProtocolError:
                # From here on the router reads the raw stream (and reports the problem).
                self._passthrough = True
                rest = bytes(buffer[offset:])
                buffer.clear()
                router.receive_data(peer, rest, now)
                return
            if framed is None:
                break
            body, used = framed
            offset += used
            self._receive_body(peer, body, now)
        del buffer[:offset]

    def _receive_body(self, peer: PeerId, body: bytes, now: float) -> None:
        router = self._pubsub.router
        try:
            rpc = decode_rpc(body, router.config.rpc_limits)
        except RemoteProtocolError:
            router.receive_rpc(peer, body, now)  # counted as invalid by the router
            return
        if not rpc.publish:
            router.receive_rpc(peer, body, now)
            return
        if rpc.subscriptions or rpc.control is not None:
            router.receive_rpc(peer, RPC(subscriptions=rpc.subscriptions, control=rpc.control), now)
        receiver = router.local_peer_id
        for message in rpc.publish:
            for delay in self._faults.decide(receiver, peer, message):
                self._faults.deliver(self._pubsub, peer, RPC(publish=(message,)), delay, now)
