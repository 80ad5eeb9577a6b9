"""The /trionode/peers/1 response codec: round trips, framing in any chunking, limits, garbage."""

from __future__ import annotations

from contextlib import suppress

import msgspec
import pytest
from hypothesis import given, strategies as st

from trionode.errors import RemoteProtocolError
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.peer_exchange import (
    FRAME_HEADER_SIZE,
    MAX_ADDRS_PER_PEER,
    MAX_PEERS,
    MAX_RESPONSE_SIZE,
    PeerAddrs,
    decode_response_body,
    decode_response_frame,
    encode_response,
)

from .strategies import chunkings

_KEYS = [PrivateKey(bytes([i]) * 32).peer_id() for i in range(1, 9)]


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


addresses = st.builds(
    lambda a, b, c, d, port: Multiaddr.from_string(f"/ip4/{a}.{b}.{c}.{d}/tcp/{port}"),
    *[st.integers(0, 255)] * 4,
    st.integers(1, 65535),
)
entries = st.lists(
    st.builds(
        PeerAddrs,
        st.sampled_from(_KEYS),
        st.lists(addresses, max_size=4, unique=True).map(tuple),
    ),
    max_size=len(_KEYS),
    unique_by=lambda e: e.peer_id,
)


@given(entries)
def test_round_trip(peers: list[PeerAddrs]) -> None:
    assert decode_response_frame(encode_response(peers)) == peers


@given(st.data())
def test_any_chunking_decodes_once_complete(data: st.DataObject) -> None:
    peers = data.draw(entries)
    frame = encode_response(peers)
    received = bytearray()
    chunks = data.draw(chunkings(frame))
    for i, chunk in enumerate(chunks):
        received += chunk
        result = decode_response_frame(received)
        if i < len(chunks) - 1:
            assert result is None
        else:
            assert result == peers


def test_p2p_suffix_is_stripped_and_checked() -> None:
    peer = _KEYS[0]
    addr = Multiaddr.from_string("/ip4/10.0.0.1/tcp/1").with_peer_id(peer)
    (decoded,) = decode_response_frame(encode_response([PeerAddrs(peer, (addr,))])) or []
    assert decoded.addrs == (addr.without_peer_id(),)
    # A /p2p naming another peer is a lie.
    body = msgspec.msgpack.encode([[peer.multihash, [addr.with_peer_id(_KEYS[1]).to_bytes()]]])
    with pytest.raises(RemoteProtocolError, match="names another peer"):
        decode_response_body(body)


def test_encoder_respects_limits() -> None:
    many = [PrivateKey.generate().peer_id() for _ in range(MAX_PEERS + 10)]
    addrs = tuple(Multiaddr.from_tcp("10.0.0.1", port) for port in range(1, 40))
    frame = encode_response([PeerAddrs(p, addrs) for p in many])
    assert len(frame) <= MAX_RESPONSE_SIZE
    decoded = decode_response_frame(frame)
    assert decoded is not None
    assert 0 < len(decoded) <= MAX_PEERS
    assert all(len(p.addrs) == MAX_ADDRS_PER_PEER for p in decoded)
    small = encode_response([PeerAddrs(p, addrs) for p in many], max_size=1000)
    assert len(small) <= 1000
    assert decode_response_frame(small)


def test_oversized_length_is_rejected_before_the_body() -> None:
    header = (MAX_RESPONSE_SIZE).to_bytes(FRAME_HEADER_SIZE, "big")
    with pytest.raises(RemoteProtocolError, match="too large"):
        decode_response_frame(header)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xc1", "malformed"),
        (msgspec.msgpack.encode({"a": 1}), "malformed"),
        (msgspec.msgpack.encode([[b"\x00", []]]), "PeerId"),
        (msgspec.msgpack.encode([[_KEYS[0].multihash, [b""]]]), "empty multiaddr"),
        (msgspec.msgpack.encode([[_KEYS[0].multihash, [b"\xff\xff\x03"]]]), "multiaddr"),
        (msgspec.msgpack.encode([[_KEYS[0].multihash, []]] * 2), "listed twice"),
        (msgspec.msgpack.encode([[_KEYS[0].multihash, [b"\x04"] * 17]]), "malformed"),
        (msgspec.msgpack.encode([[b"x" * 200, []]]), "malformed"),
        (msgspec.msgpack.encode([[_KEYS[i % 8].multihash, []] for i in range(257)]), "malformed"),
    ],
)
def test_bad_bodies(body: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_response_frame(_frame(body))


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="after"):
        decode_response_frame(encode_response([]) + b"\x00")


@given(st.binary(max_size=600))
def test_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        result = decode_response_frame(data)
    except RemoteProtocolError:
        return
    assert result is None or all(isinstance(p.peer_id, PeerId) for p in result)


@given(st.binary(max_size=600))
def test_garbage_body_only_raises_remote_protocol_error(body: bytes) -> None:
    with suppress(RemoteProtocolError):
        decode_response_body(body)


@given(entries, st.data())
def test_mutated_frames_only_raise_remote_protocol_error(
    peers: list[PeerAddrs], data: st.DataObject
) -> None:
    frame = bytearray(encode_response(peers))
    index = data.draw(st.integers(FRAME_HEADER_SIZE, max(FRAME_HEADER_SIZE, len(frame) - 1)))
    if index < len(frame):
        frame[index] ^= data.draw(st.integers(1, 255))
    with suppress(RemoteProtocolError):
        decode_response_frame(frame)
