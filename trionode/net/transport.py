"""The transport seam: how a Host gets raw byte streams (before multistream, Noise and yamux).

A :class:`Transport` turns a listen multiaddr into listeners (plus the addresses they really
bound, port 0 made concrete) and a dial multiaddr into a connected :class:`trio.abc.Stream`.
:class:`TcpTransport` is what a node uses; ``trionode.net.memory.MemoryNetwork`` provides an
in-process one for test clusters. Everything above the raw stream (upgrade, identify, ping,
connection management) is the Host's and does not know which transport it runs on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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


class TcpTransport:
    """Plain TCP through Trio's socket layer (the default)."""

    async def listen(
        self, addr: Multiaddr
    ) -> tuple[Sequence[trio.abc.Listener[trio.abc.Stream]], list[Multiaddr]]:
        host, port = _host_port(addr)
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = [
            Multiaddr.from_tcp(host, listener.socket.getsockname()[1]) for listener in listeners
        ]
        return listeners, bound

    async def dial(self, addr: Multiaddr) -> trio.abc.Stream:
        return await trio.open_tcp_stream(*_host_port(addr))

    def remote_address(self, stream: trio.abc.Stream) -> Multiaddr | None:
        if not isinstance(stream, trio.SocketStream):
            return None
        try:
            host, port = stream.socket.getpeername()[:2]
            return Multiaddr.from_tcp(host, port)
        except (OSError, ProtocolError, ValueError):
            return None


def _host_port(addr: Multiaddr) -> tuple[str, int]:
    hp = addr.tcp_host_port()
    if hp is None:
        raise PeerError(f"{addr} is not a TCP multiaddr")
    return hp
