"""A peer's message carrying a malformed or huge address: the address is skipped or the
message refused as our RemoteProtocolError, never decoded wrongly and never an exception
from inside the `multiaddr` package (which, alone, reads ``04`` as ``/ip4/0.0.0.0``)."""

from __future__ import annotations

import pytest

from trionode.errors import RemoteProtocolError
from trionode.wire import kad, peer_exchange
from trionode.wire.dcutr import usable_addresses
from trionode.wire.identify import IdentifyMessage
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import MAX_MULTIADDR_SIZE, Multiaddr

PEER = PrivateKey.generate().peer_id()
GOOD = Multiaddr.from_string("/ip4/198.18.0.9/tcp/4001")

HOSTILE = {
    "short ip4 (the package reads 0.0.0.0)": bytes.fromhex("04"),
    "short ip4 (the package reads 0.127.0.0)": bytes.fromhex("047f0000"),
    "truncated varint": bytes.fromhex("ff"),
    "tcp without a port": bytes.fromhex("06"),
    "dns length past the end": bytes.fromhex("3605") + b"ab",
    "dns not a name": bytes.fromhex("3603") + b"a b",
    "p2p not a peer id": bytes.fromhex("a50303000000"),
    "unknown code": bytes.fromhex("e703"),
    "non-minimal code": bytes.fromhex("84007f000001"),
    "trailing byte": GOOD.to_bytes() + b"\x00",
    "huge": bytes.fromhex("01dd") * 600,
    "huge varint": b"\xff" * 900 + b"\x01",
}


@pytest.mark.parametrize("bad", HOSTILE.values(), ids=HOSTILE.keys())
def test_identify_skips_a_bad_listen_address(bad: bytes) -> None:
    message = IdentifyMessage(listen_addrs=(bad, GOOD.to_bytes()), observed_addr=bad)
    decoded, _ = IdentifyMessage.decode_framed(message.encode_framed()) or (None, 0)
    assert decoded is not None
    assert decoded.decoded_listen_addrs() == [GOOD]
    assert decoded.decoded_observed_addr() is None


@pytest.mark.parametrize("bad", HOSTILE.values(), ids=HOSTILE.keys())
def test_kad_peer_skips_a_bad_address(bad: bytes) -> None:
    message = kad.KadMessage(
        kad.MessageType.FIND_NODE,
        b"k" * 32,
        closer=(kad.KadPeer(PEER.multihash, (bad, GOOD.to_bytes())),),
    )
    frame = kad.encode_message(message)
    if len(bad) > kad.MAX_ADDR_SIZE:  # the decoder refuses the whole message up front
        with pytest.raises(RemoteProtocolError, match="too long"):
            kad.decode_frame(frame)
        return
    decoded = kad.decode_frame(frame)
    assert decoded is not None
    assert decoded[0].closer[0].multiaddrs() == [GOOD]


@pytest.mark.parametrize("bad", HOSTILE.values(), ids=HOSTILE.keys())
def test_dcutr_skips_a_bad_address(bad: bytes) -> None:
    assert usable_addresses([bad, GOOD.to_bytes()], PEER) == [GOOD]


@pytest.mark.parametrize("bad", HOSTILE.values(), ids=HOSTILE.keys())
def test_peer_exchange_refuses_a_bad_address(bad: bytes) -> None:
    entry = peer_exchange._PeerWire(PEER.multihash, [GOOD.to_bytes(), bad])
    body = peer_exchange._ENCODER.encode([entry])
    with pytest.raises(RemoteProtocolError):
        peer_exchange.decode_response_body(body)


def test_size_limit_is_checked_before_the_package_sees_the_bytes() -> None:
    with pytest.raises(RemoteProtocolError, match="too long"):
        Multiaddr.from_bytes(GOOD.to_bytes() * (MAX_MULTIADDR_SIZE // len(GOOD.to_bytes()) + 1))
    with pytest.raises(RemoteProtocolError, match="too long"):
        Multiaddr.from_string("/ws" * 5000)
