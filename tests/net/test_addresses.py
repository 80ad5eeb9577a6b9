"""What a node advertises: interface addresses for wildcards, `network.announce`, never 0.0.0.0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import given, strategies as st
from prometheus_client import CollectorRegistry

from trionode.errors import PeerError
from trionode.net.addresses import (
    advertised_addresses,
    expand_wildcards,
    interface_ips,
    is_unspecified,
)
from trionode.net.host import Host
from trionode.net.metrics import NetMetrics
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import Multiaddr

from .host_helpers import WildcardOnLoopback, network


def ma(text: str) -> Multiaddr:
    return Multiaddr.from_string(text)


def strs(addrs: Sequence[Multiaddr]) -> list[str]:
    return [str(a) for a in addrs]


IPS = ["127.0.0.1", "::1", "192.0.2.7", "10.1.2.3", "fe80::1", "169.254.3.4", "2001:db8::5"]


def test_ipv4_wildcard_becomes_every_non_loopback_ipv4() -> None:
    got = expand_wildcards([ma("/ip4/0.0.0.0/tcp/2428")], IPS)
    assert strs(got) == ["/ip4/192.0.2.7/tcp/2428", "/ip4/10.1.2.3/tcp/2428"]


def test_ipv6_wildcard_becomes_global_ipv6_without_link_local() -> None:
    got = expand_wildcards([ma("/ip6/::/tcp/2428")], IPS)
    assert strs(got) == ["/ip6/2001:db8::5/tcp/2428"]


def test_loopback_only_when_nothing_else() -> None:
    got = expand_wildcards([ma("/ip4/0.0.0.0/tcp/1"), ma("/ip6/::/tcp/2")], ["127.0.0.1", "::1"])
    assert strs(got) == ["/ip4/127.0.0.1/tcp/1", "/ip6/::1/tcp/2"]


def test_no_interfaces_means_no_address_rather_than_a_wildcard() -> None:
    assert advertised_addresses([ma("/ip4/0.0.0.0/tcp/1")], []) == []


def test_concrete_listen_addresses_stay_and_duplicates_go() -> None:
    listen = [ma("/ip4/10.1.2.3/tcp/9"), ma("/ip4/0.0.0.0/tcp/9"), ma("/dns/example.org/tcp/9")]
    got = advertised_addresses(listen, ["10.1.2.3", "127.0.0.1"])
    assert strs(got) == ["/ip4/10.1.2.3/tcp/9", "/dns/example.org/tcp/9"]


def test_announce_comes_first_or_replaces() -> None:
    listen = [ma("/ip4/0.0.0.0/tcp/2428")]
    announce = [ma("/dns/node.example.org/tcp/443"), ma("/ip4/203.0.113.9/tcp/2428")]
    added = advertised_addresses(listen, IPS, announce=announce)
    assert strs(added) == [
        "/dns/node.example.org/tcp/443",
        "/ip4/203.0.113.9/tcp/2428",
        "/ip4/192.0.2.7/tcp/2428",
        "/ip4/10.1.2.3/tcp/2428",
    ]
    replaced = advertised_addresses(listen, IPS, announce=announce, announce_replace=True)
    assert replaced == announce
    # Replace with nothing to replace by keeps the interface addresses.
    assert advertised_addresses(listen, IPS, announce_replace=True) == added[2:]


ip_texts = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.sampled_from(IPS)
)


@given(st.lists(ip_texts, max_size=8), st.sampled_from(["/ip4/0.0.0.0", "/ip6/::"]))
def test_nothing_advertised_is_a_wildcard(ips: list[str], wildcard: str) -> None:
    listen = [ma(f"{wildcard}/tcp/2428"), ma("/ip4/127.0.0.1/tcp/1")]
    for addr in advertised_addresses(listen, ips):
        assert not is_unspecified(addr)
        assert addr.tcp_host_port() is not None


def test_this_machine_has_interface_addresses() -> None:
    ips = interface_ips()
    assert "127.0.0.1" in ips or "::1" in ips
    assert all("%" not in ip for ip in ips)


@asynccontextmanager
async def _run(host: Host) -> AsyncIterator[Host]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, stop)
        yield host
        stop.set()


@pytest.mark.real_network
async def test_wildcard_host_advertises_interface_addresses_in_identify() -> None:
    wild = Host(
        PrivateKey.generate(),
        network(listen=["/ip4/0.0.0.0/tcp/0"], announce=["/dns/node.example.org/tcp/443"]),
        NetMetrics(CollectorRegistry()),
        transport=WildcardOnLoopback(),
        local_ips=lambda: ["127.0.0.1", "192.0.2.7", "fe80::1"],
    )
    other = Host(PrivateKey.generate(), network(), NetMetrics(CollectorRegistry()))
    async with _run(wild), _run(other):
        assert strs(wild.listen_addrs)[0].startswith("/ip4/0.0.0.0/tcp/")
        port = wild.listen_addrs[0].tcp_host_port()
        assert port is not None
        expected = ["/dns/node.example.org/tcp/443", f"/ip4/192.0.2.7/tcp/{port[1]}"]
        assert strs(wild.advertised_addrs) == expected
        assert wild.addresses() == [f"{a}/p2p/{wild.peer_id}" for a in expected]
        # What the other side learns through identify is the same list.
        await other.connect(ma(f"/ip4/127.0.0.1/tcp/{port[1]}/p2p/{wild.peer_id}"))
        seen = other.connections[wild.peer_id]
        with trio.fail_after(10):
            await seen.identified.wait()
        assert strs(seen.listen_addrs) == expected
        await wait_connected_pair(wild, other)


async def wait_connected_pair(a: Host, b: Host) -> None:
    # The inbound side registers its end too (no half-open leftovers).
    with trio.fail_after(10):
        while b.peer_id not in a.connections:
            await a.wait_connection_changed()


@pytest.mark.parametrize(
    ("announce", "message"),
    [
        (["/ip4/0.0.0.0/tcp/2428"], "not an address anyone can dial"),
        (["/ip6/::/tcp/2428"], "not an address anyone can dial"),
        (["not a multiaddr"], "is not a multiaddr"),
    ],
)
async def test_bad_announce_refuses_to_start(announce: list[str], message: str) -> None:
    host = Host(PrivateKey.generate(), network(announce=announce), NetMetrics(CollectorRegistry()))
    with pytest.raises(PeerError, match=message):
        await host.run(trio.Event())
