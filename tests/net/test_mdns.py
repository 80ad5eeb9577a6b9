"""The mDNS driver on this machine's loopback interface.

Two services find each other through real multicast: both join 224.0.0.251 on 127.0.0.1
(`network.mdns_interface`), on a free port instead of 5353 so the test neither hears nor
disturbs the real link. That needs the kernel to loop multicast back on `lo`, which it does
here; where it does not, that test is skipped (the check is `_multicast_loops_back`). The other
tests send unicast datagrams to the service's port, which works everywhere: garbage is counted
and dropped, a legacy (unicast) query still gets its answer, and a response from a stranger
puts that peer in the store.

Real clock, every wait bounded by fail_after and made on events or sockets, never on sleeps.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from msgspec.structs import replace

from trionode.net.discovery import DiscoveryMetrics, serve_discovery
from trionode.net.mdns import make_peer_name, serve_mdns
from trionode.net.peerstore import PeerStore
from trionode.wire.keys import PrivateKey
from trionode.wire.mdns import (
    MDNS_ADDRESS,
    decode_message,
    encode_query,
    encode_response,
    find_peers,
)
from trionode.wire.multiaddr import Multiaddr

from .host_helpers import RunningHost, open_host, wait_for

pytestmark = pytest.mark.real_network


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _multicast_loops_back(port: int) -> bool:
    """Whether a datagram sent to the mDNS group on `lo` reaches a member socket."""
    group, lo = socket.inet_aton(MDNS_ADDRESS), socket.inet_aton("127.0.0.1")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        try:
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            receiver.bind(("", port))
            receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group + lo)
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, lo)
            sender.sendto(b"probe", (MDNS_ADDRESS, port))
            receiver.settimeout(2.0)
            return receiver.recv(16) == b"probe"
        except OSError:
            return False


def _overrides(port: int) -> dict[str, Any]:
    return {"mdns_port": port, "mdns_interface": "127.0.0.1", "mdns_interval": 60.0}


@asynccontextmanager
async def _mdns(
    running: RunningHost, *, discovery: bool, **overrides: Any
) -> AsyncIterator[tuple[PeerStore, int | None]]:
    host = running.host
    config = replace(host.config, **overrides)
    store = PeerStore.from_config(config, local_peer=host.peer_id)
    metrics = DiscoveryMetrics(running.registry)
    metrics.bind(store)
    async with trio.open_nursery() as nursery:
        if discovery:
            await nursery.start(serve_discovery, host, store, config, metrics)
        port: int | None = await nursery.start(serve_mdns, host, store, config, metrics)
        yield store, port
        nursery.cancel_scope.cancel()


async def test_two_services_find_each_other_and_connect() -> None:
    port = _free_udp_port()
    if not _multicast_loops_back(port):
        pytest.skip("this kernel does not loop multicast back on lo")
    with trio.fail_after(10):
        async with (
            open_host() as a,
            open_host() as b,
            _mdns(a, discovery=True, **_overrides(port)) as (a_store, a_port),
            _mdns(b, discovery=True, **_overrides(port)) as (b_store, b_port),
        ):
            assert a_port == b_port == port
            a_id, b_id = a.host.peer_id, b.host.peer_id
            await wait_for(lambda: b_id in a.host.connections and a_id in b.host.connections, a, b)
            # Whoever heard the other first dialed; the other may know it from identify.
            while b_id not in a_store:
                await a_store.wait_changed()
            while a_id not in b_store:
                await b_store.wait_changed()
            found = "trionode_discovery_peers_discovered_total"
            assert a.sample(found, source="mdns") + b.sample(found, source="mdns") >= 1
            for running in (a, b):
                assert running.sample("trionode_mdns_packets_total", kind="invalid") == 0
                assert running.sample("trionode_mdns_packets_total", kind="query") >= 1


async def test_garbage_is_counted_and_the_service_keeps_answering() -> None:
    stranger = PrivateKey.generate().peer_id()
    garbage = [
        b"",
        b"\x00" * 11,
        b"\xff" * 40,
        encode_response(make_peer_name(), [])[:-3],  # truncated
        bytes.fromhex("0000 0000 0001 0000 0000 0000") + b"\xc0\x0c\x00\x0c\x00\x01",  # loop
        b"\x00" * 10_000,  # oversized
    ]
    with trio.fail_after(10):
        async with open_host() as a, _mdns(a, discovery=False, **_overrides(0)) as (store, port):
            assert port is not None
            with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as client:
                await client.bind(("127.0.0.1", 0))
                target = ("127.0.0.1", port)
                for packet in garbage:
                    await client.sendto(packet, target)
                # A one-shot (legacy) querier gets a unicast answer echoing its id; the
                # service handles datagrams in order, so all the garbage came first.
                await client.sendto(encode_query(query_id=0x4242), target)
                message = decode_message(await client.recv(65536))
                assert message.id == 0x4242
                assert len(message.questions) == 1
                (peer,) = find_peers(message)
                assert peer.peer_id == a.host.peer_id
                assert list(peer.addrs) == a.host.listen_addrs
                assert peer.ttl <= 10
                invalid = a.sample("trionode_mdns_packets_total", kind="invalid")
                assert invalid == len(garbage)
                # A stranger's response lands in the store; its 0.0.0.0 address is made
                # concrete with the IP the packet came from.
                wildcard = f"/ip4/0.0.0.0/tcp/4001/p2p/{stranger}"
                await client.sendto(encode_response(make_peer_name(), [wildcard]), target)
                while stranger not in store:
                    await store.wait_changed()
                assert store.addresses(stranger) == (Multiaddr.from_tcp("127.0.0.1", 4001),)
                assert a.sample("trionode_discovery_peers_discovered_total", source="mdns") == 1


async def test_unusable_settings_turn_mdns_off_without_failing() -> None:
    with trio.fail_after(5):
        async with (
            open_host() as a,
            _mdns(a, discovery=False, mdns_address="300.1.1.1") as (_, port),
        ):
            assert port is None
