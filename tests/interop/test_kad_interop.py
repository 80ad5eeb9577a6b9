"""Kademlia against py-libp2p 0.8.1's DHT (`libp2p.kad_dht.KadDHT`, server mode), on loopback.

Ours runs with ``[network.kad] protocol = "/ipfs/kad/1.0.0"`` (py's wire id is fixed). Both
roles: our lookups (FIND_NODE for peer routing, ADD_PROVIDER then GET_PROVIDERS) answered by
their node, and their lookups answered by ours. py drops our signed-record field (100) when it
stores a provider, so a provider learned through py is an ordinary, unsigned one; readers
that insist on signatures (context rendezvous) ignore it, which the last assertion shows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service
from prometheus_client import CollectorRegistry

from trionode.config import KadSection, NetworkSection
from trionode.net.host import Host
from trionode.net.kad import Kademlia, KadMetrics
from trionode.net.metrics import NetMetrics
from trionode.wire.kad import IPFS_PROTOCOL_ID, sha256_multihash
from trionode.wire.keys import PeerId, PrivateKey

from .libp2p_peer import Libp2pPeer, open_libp2p_peer

pytestmark = [pytest.mark.interop, pytest.mark.real_network]


@asynccontextmanager
async def _our_dht(*, server: bool = True) -> AsyncIterator[tuple[Host, Kademlia]]:
    config = NetworkSection(
        listen=["/ip4/127.0.0.1/tcp/0"],
        ping_interval=3600,
        kad=KadSection(protocol=IPFS_PROTOCOL_ID, server=server),
    )
    host = Host(PrivateKey.generate(), config, NetMetrics(CollectorRegistry()))
    kad = Kademlia(host, config, KadMetrics(None))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, stop)
        yield host, kad
        stop.set()


@asynccontextmanager
async def _py_dht() -> AsyncIterator[tuple[Libp2pPeer, KadDHT]]:
    async with open_libp2p_peer() as peer:
        dht = KadDHT(peer.host, DHTMode.SERVER)
        async with background_trio_service(dht):
            yield peer, dht


async def _connect(host: Host, address: str) -> None:
    conn = await host.connect(address)
    await conn.identified.wait()


async def test_our_lookups_through_a_py_libp2p_dht_node() -> None:
    with trio.fail_after(60):
        async with (
            _py_dht() as (py, _dht),
            _our_dht() as (a, a_kad),
            _our_dht(server=False) as (b, b_kad),
        ):
            # b is known to py only: it opened a DHT stream to it (py then admits it). b is a
            # client, so what a learns of b's providing comes from py alone.
            await _connect(b, py.p2p_addr)
            key = sha256_multihash(b"interop")
            assert await b_kad.provide(key) == 1
            # a knows py only; py answers a's FIND_NODE for b with b's address.
            await _connect(a, py.p2p_addr)
            assert b.peer_id not in a.connections
            addrs = await a_kad.find_peer(b.peer_id)
            assert b.listen_addrs[0] in addrs
            # ... and GET_PROVIDERS with b, as an ordinary (unsigned) provider.
            providers = await a_kad.find_providers(key)
            assert [(p.peer_id, p.signed) for p in providers] == [(b.peer_id, False)]
            assert b.listen_addrs[0] in providers[0].addrs
            assert await a_kad.find_providers(key, signed_only=True) == []


async def test_py_libp2p_lookups_through_our_dht_node() -> None:
    with trio.fail_after(60):
        async with _our_dht() as (server, server_kad), _our_dht() as (b, b_kad):
            await _connect(b, server.addresses()[0])
            key = sha256_multihash(b"interop the other way")
            assert await b_kad.provide(key) == 1
            assert b.peer_id in server_kad.table
            async with _py_dht() as (py, dht):
                await py.connect(server.addresses()[0])
                await dht.add_peer(ID.from_base58(str(server.peer_id)))
                info = await dht.find_peer(ID.from_base58(str(b.peer_id)))
                assert info is not None
                assert multiaddr.Multiaddr(str(b.listen_addrs[0])) in info.addrs
                providers = await dht.find_providers(key.hex())
                # (py may list a provider twice: once per DHT node that named it.)
                assert {str(p.peer_id) for p in providers} == {str(b.peer_id)}
                # py announcing through us: we store it (unsigned) and give it out.
                py_key = sha256_multihash(b"provided by py")
                assert await dht.provide(py_key.hex())
                found = await server_kad.find_providers(py_key)
                assert [p.peer_id for p in found] == [PeerId.from_string(py.peer_id)]
