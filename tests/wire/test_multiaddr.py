from __future__ import annotations

import contextlib
import ipaddress

import multiaddr as oracle
import pytest
from hypothesis import given, strategies as st

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multiaddr import MAX_VARIABLE_VALUE_SIZE, PROTOCOLS, Component, Multiaddr

PEER = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"

EXAMPLES = [
    "/ip4/127.0.0.1/tcp/4001",
    "/ip6/::1/tcp/0",
    "/ip6/2001:db8::8a2e:370:7334/tcp/65535",
    f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}",
    "/dns4/example.com/tcp/443/wss",
    "/dns6/example.com/tcp/443/tls/ws",
    "/dns/example.com/tcp/1/tls/sni/example.com/http",
    "/dnsaddr/bootstrap.libp2p.io",
    "/ip4/1.2.3.4/udp/4001/quic-v1",
    "/ip4/1.2.3.4/udp/4001/quic-v1/webtransport",
    "/ip4/1.2.3.4/udp/4001/webrtc-direct",
    f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}/p2p-circuit/p2p/{PEER}",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_text_and_binary_round_trip_against_oracle(text: str) -> None:
    address = Multiaddr.from_string(text)
    assert str(address) == text
    binary = address.to_bytes()
    assert binary == oracle.Multiaddr(text).to_bytes()
    assert Multiaddr.from_bytes(binary) == address


def test_binary_vectors() -> None:
    assert Multiaddr.from_string("/ip4/127.0.0.1/tcp/4001").to_bytes() == bytes.fromhex(
        "047f000001060fa1"
    )
    peer_id = PeerId.from_string(PEER)
    assert Multiaddr.from_string(f"/p2p/{PEER}").to_bytes() == (
        bytes.fromhex("a50326") + peer_id.multihash
    )


def test_ipfs_alias_and_cid_peer_id() -> None:
    peer_id = PeerId.from_string(PEER)
    address = Multiaddr.from_string(f"/ip4/10.0.0.1/tcp/1/ipfs/{peer_id.to_cid_string()}/")
    assert str(address) == f"/ip4/10.0.0.1/tcp/1/p2p/{PEER}"


def test_helpers() -> None:
    peer_id = PeerId.from_string(PEER)
    base = Multiaddr.from_tcp("127.0.0.1", 4001)
    assert str(base) == "/ip4/127.0.0.1/tcp/4001"
    assert str(Multiaddr.from_tcp("::1", 1)) == "/ip6/::1/tcp/1"
    assert str(Multiaddr.from_tcp("example.com", 2)) == "/dns/example.com/tcp/2"
    with pytest.raises(LocalProtocolError):
        Multiaddr.from_tcp("127.0.0.1", 70000)
    full = base.with_peer_id(peer_id)
    assert str(full) == f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
    assert full.peer_id() == peer_id
    assert base.peer_id() is None
    assert full.without_peer_id() == base
    assert base.without_peer_id() is base
    other = PrivateKey.generate().peer_id()
    assert full.with_peer_id(other).peer_id() == other
    assert full.tcp_host_port() == ("127.0.0.1", 4001)
    assert Multiaddr.from_string("/dns4/a.b/tcp/9/ws").tcp_host_port() == ("a.b", 9)
    assert Multiaddr.from_string("/ip4/1.2.3.4/udp/9").tcp_host_port() is None
    assert Multiaddr.from_string("/dnsaddr/x").tcp_host_port() is None
    assert full.value_for("tcp") == "4001"
    assert full.value_for("udp") is None
    combined = base / Multiaddr.from_string(f"/p2p/{PEER}")
    assert combined == full
    assert repr(base) == "Multiaddr('/ip4/127.0.0.1/tcp/4001')"
    relayed = base.circuit_through(peer_id)
    assert str(relayed) == f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}/p2p-circuit"
    assert relayed.is_circuit()
    assert not full.is_circuit()
    assert relayed.with_peer_id(other).peer_id() == other


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "ip4/1.2.3.4",
        "/ip4",
        "/ip4/256.0.0.1",
        "/ip4/01.2.3.4",
        "/ip6/::g",
        "/tcp/65536",
        "/tcp/-1",
        "/tcp/\uff11",  # non-ASCII digit
        "/tcp/",
        "/foo/1",
        "/ip4/1.2.3.4//tcp/1",
        "/p2p/notapeerid",
        "/dns4/",
        "/dns4/" + "a" * 256,
        "/dns4/a b",
        "/tcp/+1",  # int() would take these three
        "/tcp/ 1",
        "/tcp/1_000",
        "//",
        "/ip4/1.2.3.4//",
        "/ip6zone/eth0/ip6/fe80::1",  # not in our table: the package splits it wrongly
        "/unix/tmp/x",
        "/memory/1",
    ],
)
def test_text_rejects(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        Multiaddr.from_string(text)


@pytest.mark.parametrize(
    "hex_",
    [
        "",
        "04",  # ip4 without value
        "047f0000",  # short ip4
        "06",  # tcp without port
        "ff",  # truncated code
        "e703",  # unknown code 0x1e7
        "3605",  # dns4, length 5, no value
        "3601ff",  # dns4, not UTF-8
        "36012f",  # dns4 containing '/'
        "a50303000000",  # p2p with invalid multihash
        "36ff02" + "61" * 300,  # too-long dns
        "047f000001060fa1ff",  # trailing byte
        "047f000001060f",  # short port
        "84007f000001",  # ip4 code as a non-minimal varint
        "2a046574683029" + "00" * 16,  # ip6zone
        "3603612062",  # dns4 "a b": not a domain name
        "90030161",  # unix: not in our table
    ],
)
def test_binary_rejects(hex_: str) -> None:
    with pytest.raises(RemoteProtocolError):
        Multiaddr.from_bytes(bytes.fromhex(hex_))


def test_international_domain_name() -> None:
    address = Multiaddr.from_string("/dns4/bücher.example/tcp/1")
    assert address.to_bytes() == bytes.fromhex("360f") + "bücher.example".encode() + bytes(
        [0x06, 0x00, 0x01]
    )
    assert str(Multiaddr.from_bytes(address.to_bytes())) == "/dns4/bücher.example/tcp/1"


def test_from_tcp_refuses_a_host_that_would_add_components() -> None:
    with pytest.raises(RemoteProtocolError):
        Multiaddr.from_tcp(f"evil/tcp/1/p2p/{PEER}", 2)
    assert str(Multiaddr.from_tcp("fe80::1%lo", 1)) == "/ip6/fe80::1/tcp/1"


def test_binary_size_limit() -> None:
    with pytest.raises(RemoteProtocolError, match="too long"):
        Multiaddr.from_bytes(bytes.fromhex("01dd") * 600)


_SIZES = {
    "ip4": 4,
    "ip6": 16,
    "tcp": 2,
    "udp": 2,
    "dccp": 2,
    "sctp": 2,
    "p2p": -1,
    "dns": -1,
    "dns4": -1,
    "dns6": -1,
    "dnsaddr": -1,
    "sni": -1,
}
# (Hyphens in a label's 3rd and 4th places mark a reserved "xn--"-style label, which IDNA
# refuses unless it is a valid A-label: "00--0" is no host name, so it is left out.)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"
)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)


def _value_strategy(name: str) -> st.SearchStrategy[bytes]:
    size = _SIZES.get(name, 0)
    if size == 0:
        return st.just(b"")
    if name == "ip4":
        return st.ip_addresses(v=4).map(lambda a: a.packed)
    if name == "ip6":
        return st.ip_addresses(v=6).map(lambda a: ipaddress.IPv6Address(a).packed)
    if size == 2:
        return st.integers(0, 0xFFFF).map(lambda p: p.to_bytes(2, "big"))
    if name == "p2p":
        return st.binary(min_size=32, max_size=32).map(lambda s: PrivateKey(s).peer_id().multihash)
    return _DOMAIN.map(str.encode)


components = st.sampled_from(PROTOCOLS).flatmap(
    lambda p: _value_strategy(p).map(lambda v: Component(p, v))
)


@given(st.lists(components, min_size=1, max_size=6))
def test_round_trip_random(parts: list[Component]) -> None:
    address = Multiaddr(tuple(parts))
    assert Multiaddr.from_bytes(address.to_bytes()) == address
    assert Multiaddr.from_string(str(address)) == address


@given(st.binary(max_size=60))
def test_binary_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        address = Multiaddr.from_bytes(data)
    except RemoteProtocolError:
        return
    assert address.to_bytes() == data
    assert Multiaddr.from_string(str(address)) == address


@given(st.text(max_size=60))
def test_text_garbage_only_raises_remote_protocol_error(text: str) -> None:
    with contextlib.suppress(RemoteProtocolError):
        Multiaddr.from_string(text)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(PROTOCOLS),
            st.integers(0, MAX_VARIABLE_VALUE_SIZE + 2),
            st.binary(max_size=40),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_shaped_binary_only_raises_remote_protocol_error(
    parts: list[tuple[str, int, bytes]],
) -> None:
    """Known codes with lying lengths and random values: accepted only if exact."""
    wire = b""
    for name, length, value in parts:
        code = Multiaddr((Component(name, b""),)).to_bytes()
        wire += code + bytes([length & 0x7F]) + value
    try:
        address = Multiaddr.from_bytes(wire)
    except RemoteProtocolError:
        return
    assert address.to_bytes() == wire
    assert Multiaddr.from_string(str(address)) == address


@given(st.data())
def test_mutated_binary(data: st.DataObject) -> None:
    wire = bytearray(Multiaddr.from_string(EXAMPLES[3]).to_bytes())
    index = data.draw(st.integers(0, len(wire) - 1))
    wire[index] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RemoteProtocolError):
        Multiaddr.from_bytes(bytes(wire))
