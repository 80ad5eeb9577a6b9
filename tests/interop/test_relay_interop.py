"""Circuit Relay v2 against py-libp2p 0.8.1's relay (`libp2p.relay.circuit_v2`), on loopback.

py-libp2p is the relay (hop server, `allow_hop=True`); two trionode hosts are the clients:
A reserves a slot on it, B dials A through it. What py does that we must cope with
(reference §1): a py relay keeps the hop stream open after answering; it may answer RESERVE
with an empty `reservation.addrs` when it listens on a wildcard (we fall back to the address
we dialed); it counts the spliced bytes of both directions against one budget.
The other way round, a py-libp2p dialer (`CircuitV2Transport.dial`) reaches a trionode peer
through a trionode relay. Not covered: a py-libp2p peer *reserving* on our relay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.relay.circuit_v2.config import RelayConfig
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from prometheus_client import CollectorRegistry

from trionode.config import NetworkSection, RelaySection
from trionode.net.host import Host
from trionode.net.metrics import NetMetrics
from trionode.net.relay import RelayClient, RelayServer
from trionode.wire.keys import PeerId, PrivateKey

from .libp2p_peer import open_libp2p_peer

pytestmark = [pytest.mark.interop, pytest.mark.real_network]


@asynccontextmanager
async def _our_host(
    **settings: object,
) -> AsyncIterator[tuple[Host, RelayClient, RelayServer | None]]:
    config = NetworkSection(listen=["/ip4/127.0.0.1/tcp/0"], ping_interval=3600, **settings)  # type: ignore[arg-type]
    host = Host(PrivateKey.generate(), config, NetMetrics(CollectorRegistry()))
    client = RelayClient(host, config)
    server = RelayServer(host, config) if config.relay.serve else None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, stop)
        await nursery.start(client.run, stop)
        yield host, client, server
        stop.set()


async def test_trionode_peers_meet_through_a_py_libp2p_relay() -> None:
    with trio.fail_after(60):
        async with open_libp2p_peer() as relay:
            protocol = CircuitV2Protocol(relay.host, allow_hop=True)
            async with background_trio_service(protocol):
                await protocol.event_started.wait()
                async with (
                    _our_host(relays=[relay.p2p_addr]) as (a, a_client, _),
                    _our_host() as (b, _, _),
                ):
                    while not a_client.circuit_addrs:
                        await a_client.wait_changed()
                    circuits = [str(c) for c in next(iter(a_client.circuit_addrs.values()))]
                    assert circuits
                    assert all(c.endswith(f"/p2p/{relay.peer_id}/p2p-circuit") for c in circuits)
                    conn = await b.connect(f"{circuits[0]}/p2p/{a.peer_id}")
                    assert conn.relayed
                    assert conn.peer_id == a.peer_id
                    await conn.identified.wait()
                    assert await b.ping(a.peer_id) >= 0
                    assert a.connections[b.peer_id].relayed


async def test_py_libp2p_dials_a_trionode_peer_through_a_trionode_relay() -> None:
    with trio.fail_after(60):
        async with (
            _our_host(relay=RelaySection(serve=True)) as (r, _, server),
            open_libp2p_peer() as py,
        ):
            assert server is not None
            async with _our_host(relays=[r.addresses()[0]]) as (a, a_client, _):
                while not a_client.circuit_addrs:
                    await a_client.wait_changed()
                circuit = f"{a_client.circuit_addrs[r.peer_id][0]}/p2p/{a.peer_id}"
                protocol = CircuitV2Protocol(py.host, allow_hop=False)
                async with background_trio_service(protocol):
                    await protocol.event_started.wait()
                    transport = CircuitV2Transport(py.host, protocol, RelayConfig())
                    await transport.dial(multiaddr.Multiaddr(circuit))
                    py_id = PeerId.from_string(py.peer_id)
                    while py_id not in a.connections:
                        await a.wait_connection_changed()
                    assert a.connections[py_id].relayed
                    assert await a.ping(py_id) >= 0
                    assert server.circuits_opened == 1
