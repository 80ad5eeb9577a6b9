"""MemoryNetwork: TCP-like in-memory streams, listeners, partitions; a Host running on it."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from trionode.net.host import Host
from trionode.net.memory import (
    FIRST_NAT_PORT,
    MemoryListener,
    MemoryNetwork,
    MemoryStream,
    MemoryTransport,
    NatKind,
)
from trionode.net.metrics import NetMetrics
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import Multiaddr

from .host_helpers import network as network_section


def addr(text: str) -> Multiaddr:
    return Multiaddr.from_string(text)


async def connected_pair(net: MemoryNetwork) -> tuple[MemoryStream, MemoryStream]:
    a, b = net.transport(), net.transport()
    listeners, bound = await b.listen(addr("/ip4/0.0.0.0/tcp/0"))
    listener = listeners[0]
    assert isinstance(listener, MemoryListener)
    client = await a.dial(bound[0])
    server = await listener.accept()
    assert isinstance(client, MemoryStream)
    assert isinstance(server, MemoryStream)
    return client, server


async def test_streams_honour_the_half_closeable_contract() -> None:
    async def maker() -> tuple[MemoryStream, MemoryStream]:
        return await connected_pair(MemoryNetwork())

    await trio.testing.check_half_closeable_stream(maker, None)


async def test_addresses_ports_and_refusals() -> None:
    net = MemoryNetwork()
    a, b = net.transport(), net.transport()
    assert (a.host, b.host) == ("10.42.0.1", "10.42.0.2")
    _, first = await b.listen(addr("/ip4/0.0.0.0/tcp/0"))
    _, second = await b.listen(addr("/ip4/10.42.0.2/tcp/0"))
    assert [str(x) for x in first + second] == [
        "/ip4/10.42.0.2/tcp/4001",
        "/ip4/10.42.0.2/tcp/4002",
    ]
    with pytest.raises(OSError, match="in use") as in_use:
        await b.listen(addr("/ip4/10.42.0.2/tcp/4001"))
    assert in_use.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError, match="is not") as not_ours:
        await b.listen(addr("/ip4/10.42.0.1/tcp/5000"))
    assert not_ours.value.errno == errno.EADDRNOTAVAIL
    with pytest.raises(OSError, match="refused") as refused:
        await a.dial(addr("/ip4/10.42.0.2/tcp/9999"))
    assert refused.value.errno == errno.ECONNREFUSED
    client = await a.dial(first[0])
    assert isinstance(client, MemoryStream)
    assert str(client.local_address) == "/ip4/10.42.0.1/tcp/49152"
    assert client.remote_address == first[0]
    net.close()
    with pytest.raises(OSError, match="refused"):
        await a.dial(first[0])


async def test_closed_listener_resets_unaccepted_connections() -> None:
    net = MemoryNetwork()
    a, b = net.transport(), net.transport()
    listeners, bound = await b.listen(addr("/ip4/0.0.0.0/tcp/0"))
    client = await a.dial(bound[0])
    await listeners[0].aclose()
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some(10)
    with pytest.raises(OSError, match="refused"):
        await a.dial(bound[0])
    with pytest.raises(trio.ClosedResourceError):
        await listeners[0].accept()


async def test_partition_aborts_both_ends_and_blocks_dials() -> None:
    net = MemoryNetwork()
    client, server = await connected_pair(net)
    await client.send_all(b"before")
    assert await server.receive_some() == b"before"
    async with trio.open_nursery() as nursery:
        failures: list[type[BaseException]] = []

        async def receive(stream: MemoryStream) -> None:
            try:
                await stream.receive_some()
            except trio.BrokenResourceError as exc:
                failures.append(type(exc))

        nursery.start_soon(receive, client)
        nursery.start_soon(receive, server)
        await trio.testing.wait_all_tasks_blocked()
        assert net.partition(["10.42.0.1"], ["10.42.0.2"]) == 1
    assert failures == [trio.BrokenResourceError] * 2
    for stream in (client, server):
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"x")
        await stream.aclose()  # closing a broken stream is fine
    assert net.statistics().connections == 0
    with pytest.raises(OSError, match="unreachable") as unreachable:
        net.connect("10.42.0.1", addr("/ip4/10.42.0.2/tcp/4001"))
    assert unreachable.value.errno == errno.EHOSTUNREACH
    net.heal()
    assert net.reachable("10.42.0.1", "10.42.0.2")


@asynccontextmanager
async def running_host(net: MemoryNetwork) -> AsyncIterator[Host]:
    transport = net.transport()
    section = network_section(listen=[f"/ip4/{transport.host}/tcp/0"])
    host = Host(
        PrivateKey.generate(), section, NetMetrics(CollectorRegistry()), transport=transport
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, shutdown)
        yield host
        shutdown.set()


async def test_hosts_connect_and_ping_over_memory(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with running_host(net) as a, running_host(net) as b:
        conn = await a.connect(b.addresses()[0])
        assert conn.remote_addr == addr(b.addresses()[0])
        await trio.testing.wait_all_tasks_blocked()
        inbound = b.connections[a.peer_id]
        assert inbound.remote_addr == addr("/ip4/10.42.0.1/tcp/49152")
        assert inbound.identified.is_set()
        assert await a.ping(b.peer_id) == 0.0  # no virtual time passes in memory
        net.partition(["10.42.0.1"], ["10.42.0.2"])
        await trio.testing.wait_all_tasks_blocked()
        assert a.connections == b.connections == {}


# -- NAT models ------------------------------------------------------------------------------


async def _listening(net: MemoryNetwork, kind: NatKind | None) -> tuple[MemoryTransport, Multiaddr]:
    transport = net.transport()
    net.set_nat(transport, kind)
    _, bound = await transport.listen(addr("/ip4/0.0.0.0/tcp/0"))
    return transport, bound[0]


async def test_a_nat_maps_dials_and_filters_what_comes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    public, public_addr = await _listening(net, None)
    kept, kept_addr = await _listening(net, NatKind.ENDPOINT_INDEPENDENT)
    moved, moved_addr = await _listening(net, NatKind.ENDPOINT_DEPENDENT)
    # Dials leave from the listen port; endpoint-independent keeps it, dependent does not.
    assert (await kept.dial(public_addr)).local_address == kept_addr  # type: ignore[attr-defined]
    to_public = await moved.dial(public_addr)
    assert isinstance(to_public, MemoryStream)
    assert to_public.peer is not None
    seen_as = to_public.peer.remote_address
    assert seen_as.tcp_host_port() == (moved.host, FIRST_NAT_PORT)
    # Unsolicited inbound dials are dropped SYNs: they wait until the dialer gives up...
    for target in (kept_addr, moved_addr, seen_as):
        with pytest.raises(trio.TooSlowError), trio.fail_after(5):
            await public.dial(target)
    # ... and no-inbound refuses at once.
    net.set_nat(kept, NatKind.NO_INBOUND)
    with pytest.raises(OSError, match="no inbound"):
        await public.dial(kept_addr)


async def test_crossing_dials_through_two_nats_make_one_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    a, a_addr = await _listening(net, NatKind.ENDPOINT_INDEPENDENT)
    b, b_addr = await _listening(net, NatKind.ENDPOINT_INDEPENDENT)
    async with trio.open_nursery() as nursery:
        ends: list[trio.abc.Stream] = []

        async def dial(transport: MemoryTransport, target: Multiaddr) -> None:
            ends.append(await transport.dial(target))

        nursery.start_soon(dial, a, b_addr)
        await trio.testing.wait_all_tasks_blocked()
        assert not ends  # A's SYN is filtered by B's NAT: it waits
        nursery.start_soon(dial, b, a_addr)
    first, second = ends
    assert isinstance(first, MemoryStream)
    assert first.peer is second  # one connection between the two dialing sockets
    assert net.connections_between(a.host, b.host) == 1
    await first.send_all(b"x")
    assert await second.receive_some(1) == b"x"


async def test_disconnect_resets_every_connection_of_a_host_and_only_those() -> None:
    net = MemoryNetwork()
    client, server = await connected_pair(net)  # 10.42.0.1 -> 10.42.0.2
    other = net.transport()  # 10.42.0.3 -> 10.42.0.2
    listener = net.listen("10.42.0.2", addr("/ip4/10.42.0.2/tcp/5000"))
    bystander = await other.dial(addr("/ip4/10.42.0.2/tcp/5000"))
    bystander_server = await listener.accept()
    assert net.disconnect("10.42.0.1") == 1
    for stream in (client, server):
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"x")
    await bystander.send_all(b"still up")
    assert await bystander_server.receive_some() == b"still up"
    assert net.statistics().aborted == 1
    # Unlike a partition, nothing is blocked afterwards: the host may dial again.
    again = await other.dial(addr("/ip4/10.42.0.2/tcp/5000"))
    assert isinstance(again, MemoryStream)
