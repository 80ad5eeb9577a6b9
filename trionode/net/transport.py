"""The transport seam: how a Host gets raw byte streams (before multistream, Noise and yamux).

A :class:`Transport` turns a listen multiaddr into listeners (plus the addresses they really
bound, port 0 made concrete) and a dial multiaddr into a connected :class:`trio.abc.Stream`.
:class:`TcpTransport` is what a node uses; ``trionode.net.memory.MemoryNetwork`` provides an
in-process one for test clusters. Everything above the raw stream (upgrade, identify, ping,
connection management) is the Host's and does not know which transport it runs on.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence
from typing import Final, Protocol

import trio

from trionode.errors import PeerError, ProtocolError
from trionode.wire.multiaddr import Multiaddr


class Transport(Protocol):
    """Where a Host's raw connections come from."""

    async def listen(
        self, addr: Multiaddr
    ) -> tuple[Sequence[trio.abc.Listener[trio.abc.Stream]], list[Multiaddr]]:
        """Start listening on ``addr``; return the listeners and the addresses they bound.

        A port of 0 is replaced by the port actually bound. The caller serves the listeners
        (``trio.serve_listeners``) and closes them.

        Raises:
            OSError: the address cannot be bound.
            PeerError: ``addr`` is not an address this transport can listen on.
        """
        ...

    async def dial(self, addr: Multiaddr) -> trio.abc.Stream:
        """Connect to ``addr`` (any /p2p/ suffix is ignored here). The caller bounds the time.

        Raises:
            OSError: the connection was refused or the address is unreachable.
            PeerError: ``addr`` is not an address this transport can dial.
        """
        ...

    def remote_address(self, stream: trio.abc.Stream) -> Multiaddr | None:
        """The address the other end of an accepted ``stream`` connects from, if known."""
        ...


LISTEN_BACKLOG: Final = 128
_SOURCE_PORT_TAKEN: Final = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})
"""What bind/connect say when the listen port cannot be the source of this dial: another
connection from it to the same address still exists (or lingers in TIME_WAIT)."""


class TcpTransport:
    """Plain TCP through Trio's socket layer (the default).

    With ``reuse_port`` (``network.tcp_reuse_port``) listeners and outbound dials share the
    listen port (SO_REUSEADDR + SO_REUSEPORT): a dial leaves from the port we advertise, so a
    NAT that keeps ports (a plain masquerade) maps it to our advertised port, peers observe
    the address they can dial back, and a simultaneous dial (DCUtR hole punching) meets the
    mapping the other side's packets open. A dial that cannot use the listen port (a
    connection from it to the same address exists) falls back to an ephemeral port.
    """

    def __init__(self, *, reuse_port: bool = False) -> None:
        self.reuse_port = reuse_port and hasattr(socket, "SO_REUSEPORT")
        self._sources: dict[int, tuple[str, int]] = {}
        """Per address family, the (ip, port) our dials leave from: the first listener's."""
        self.source_port_dials = 0
        """Dials that left from the listen port (tests, metrics)."""

    async def listen(
        self, addr: Multiaddr
    ) -> tuple[Sequence[trio.abc.Listener[trio.abc.Stream]], list[Multiaddr]]:
        host, port = _host_port(addr)
        if self.reuse_port and _is_ip(host):
            listeners = [await self._reusable_listener(host, port)]
        else:
            listeners = await trio.open_tcp_listeners(port, host=host)
        bound = [
            Multiaddr.from_tcp(host, listener.socket.getsockname()[1]) for listener in listeners
        ]
        return listeners, bound

    async def _reusable_listener(self, host: str, port: int) -> trio.SocketListener:
        family = _family(host)
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind((host, port))
            # SO_REUSEPORT only after the bind: a second node on this port (its listener
            # binds without it) still gets EADDRINUSE, while our dial sockets, which set it
            # before binding, may share the port with this listener.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._sources.setdefault(family, (host, sock.getsockname()[1]))
        return trio.SocketListener(sock)

    async def dial(self, addr: Multiaddr) -> trio.abc.Stream:
        host, port = _host_port(addr)
        source = self._sources.get(_family(host)) if _is_ip(host) else None
        if source is not None:
            try:
                return await self._dial_from(source, host, port)
            except OSError as exc:
                if exc.errno not in _SOURCE_PORT_TAKEN:
                    raise
        return await trio.open_tcp_stream(host, port)

    async def _dial_from(self, source: tuple[str, int], host: str, port: int) -> trio.SocketStream:
        sock = trio.socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            _set_reuse(sock)
            await sock.bind(source)
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        self.source_port_dials += 1
        return trio.SocketStream(sock)

    def remote_address(self, stream: trio.abc.Stream) -> Multiaddr | None:
        if not isinstance(stream, trio.SocketStream):
            return None
        try:
            host, port = stream.socket.getpeername()[:2]
            return Multiaddr.from_tcp(host, port)
        except (OSError, ProtocolError, ValueError):
            return None


def _set_reuse(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _host_port(addr: Multiaddr) -> tuple[str, int]:
    hp = addr.tcp_host_port()
    if hp is None:
        raise PeerError(f"{addr} is not a TCP multiaddr")
    return hp
