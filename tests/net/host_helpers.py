"""Running real Hosts on loopback inside one test, and waiting on them without sleeping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from prometheus_client import CollectorRegistry

from trionode.config import NetworkSection
from trionode.net.host import Connection, Host
from trionode.net.metrics import NetMetrics
from trionode.net.multistream import PrefixedStream
from trionode.net.transport import TcpTransport
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import Multiaddr

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@attrs.frozen
class RunningHost:
    """A Host running in its own nursery, its metrics registry and its shutdown switch."""

    host: Host
    registry: CollectorRegistry
    shutdown: trio.Event
    done: trio.Event

    @property
    def address(self) -> str:
        """The first listen address, with /p2p/<peer id>."""
        return self.host.addresses()[0]

    def sample(self, name: str, **labels: str) -> float:
        """A metric sample's value; 0 if it was never touched."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def open_connections(self) -> float:
        return sum(
            self.sample("trionode_p2p_connections", direction=d) for d in ("inbound", "outbound")
        )


def network(**overrides: Any) -> NetworkSection:
    """A loopback-only network section; keepalive pings far apart so tests stay quiet."""
    settings: dict[str, Any] = {"listen": [LOOPBACK], "ping_interval": 60.0}
    settings.update(overrides)
    return NetworkSection(**settings)


@asynccontextmanager
async def open_host(key: PrivateKey | None = None, **overrides: Any) -> AsyncIterator[RunningHost]:
    """Run a Host until the block ends; then shut it down the way the node does (the event)."""
    registry = CollectorRegistry()
    host = Host(key or PrivateKey.generate(), network(**overrides), NetMetrics(registry))
    running = RunningHost(host, registry, trio.Event(), trio.Event())

    async def run(
        *, task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await host.run(running.shutdown, task_status=task_status)
        finally:
            running.done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        yield running
        running.shutdown.set()


async def wait_for(predicate: Callable[[], bool], *hosts: RunningHost) -> None:
    """Wait until `predicate()` holds, re-checking whenever a connection of `hosts` changes."""
    while not predicate():
        async with trio.open_nursery() as nursery:
            for running in hosts:
                await nursery.start(_changed_then_cancel, running.host, nursery.cancel_scope)
            # A change may have happened before the waiters were parked: look again.
            if predicate():
                nursery.cancel_scope.cancel()


async def _changed_then_cancel(
    host: Host, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
) -> None:
    task_status.started()
    # No checkpoint between started() and parking on the current event: nothing is missed.
    await host.wait_connection_changed()
    scope.cancel()


async def wait_connected(a: RunningHost, b: RunningHost) -> tuple[Connection, Connection]:
    """Wait until each host holds a connection to the other; return (a's, b's)."""
    a_id, b_id = a.host.peer_id, b.host.peer_id
    await wait_for(lambda: b_id in a.host.connections and a_id in b.host.connections, a, b)
    return a.host.connections[b_id], b.host.connections[a_id]


def socket_of(conn: Connection) -> trio.SocketStream:
    """The TCP stream under a connection's Noise layer."""
    stream: trio.abc.Stream = conn.noise.transport_stream
    while isinstance(stream, PrefixedStream):
        stream = stream.inner
    assert isinstance(stream, trio.SocketStream)
    return stream


def endpoints(conn: Connection) -> tuple[object, object]:
    """(local, remote) socket addresses of a connection."""
    sock = socket_of(conn).socket
    return sock.getsockname(), sock.getpeername()


class WildcardOnLoopback(TcpTransport):
    """Binds loopback but reports the wildcard, as a `0.0.0.0` listener would: the test
    exercises the wildcard path without opening a port on the machine's real interfaces."""

    async def listen(
        self, addr: Multiaddr
    ) -> tuple[Sequence[trio.abc.Listener[trio.abc.Stream]], list[Multiaddr]]:
        assert str(addr).startswith("/ip4/0.0.0.0/")
        listeners, bound = await super().listen(Multiaddr.from_string(LOOPBACK))
        port = bound[0].tcp_host_port()
        assert port is not None
        return listeners, [Multiaddr.from_string(f"/ip4/0.0.0.0/tcp/{port[1]}")]


def tcp_target(target: RunningHost) -> tuple[str, int]:
    """(host, port) of a running host's first listener, for raw TCP clients."""
    hp = target.host.listen_addrs[0].tcp_host_port()
    assert hp is not None
    return hp


async def read_until_eof(stream: trio.abc.ReceiveStream) -> None:
    """Read and drop everything until the peer closes (or resets) the stream."""
    while True:
        try:
            if not await stream.receive_some():
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
