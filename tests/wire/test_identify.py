from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from tests.wire.strategies import chunkings
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.identify import (
    MAX_IDENTIFY_MESSAGE_SIZE,
    PING_PAYLOAD_LENGTH,
    IdentifyMessage,
    check_ping_response,
    make_ping_payload,
)
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.varint import encode_uvarint

KEY = PrivateKey(bytes(range(32)))
LISTEN = [
    Multiaddr.from_string("/ip4/127.0.0.1/tcp/4001"),
    Multiaddr.from_string("/ip6/::1/tcp/4001"),
]
OBSERVED = Multiaddr.from_string("/ip4/10.0.0.2/tcp/51234")
PROTOCOLS = ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/meshsub/1.1.0", "/meshsub/1.0.0"]


def full_message() -> IdentifyMessage:
    return IdentifyMessage.create(
        protocol_version="ipfs/0.1.0",
        agent_version="trionode/0.1.0",
        public_key=KEY.public_key,
        listen_addrs=LISTEN,
        observed_addr=OBSERVED,
        protocols=PROTOCOLS,
    )


def test_round_trip() -> None:
    message = full_message()
    decoded = IdentifyMessage.decode(message.encode())
    assert decoded == message
    assert decoded.decoded_public_key() == KEY.public_key
    assert decoded.decoded_listen_addrs() == LISTEN
    assert decoded.decoded_observed_addr() == OBSERVED
    assert IdentifyMessage.decode(b"") == IdentifyMessage()
    assert IdentifyMessage().decoded_public_key() is None
    assert IdentifyMessage().decoded_observed_addr() is None


def test_field_numbers() -> None:
    fields = protobuf.decode_message(full_message().encode())
    assert fields.get_bytes(1) == KEY.public_key.to_protobuf()
    assert fields.get_repeated_bytes(2) == [a.to_bytes() for a in LISTEN]
    assert fields.get_repeated_str(3) == PROTOCOLS
    assert fields.get_bytes(4) == OBSERVED.to_bytes()
    assert fields.get_str(5) == "ipfs/0.1.0"
    assert fields.get_str(6) == "trionode/0.1.0"


def test_against_py_libp2p_protobuf() -> None:
    identify_pb2 = pytest.importorskip("libp2p.identity.identify.pb.identify_pb2")
    ours = full_message()
    theirs = identify_pb2.Identify()
    theirs.ParseFromString(ours.encode())
    assert theirs.protocol_version == "ipfs/0.1.0"
    assert theirs.agent_version == "trionode/0.1.0"
    assert theirs.public_key == KEY.public_key.to_protobuf()
    assert list(theirs.listen_addrs) == [a.to_bytes() for a in LISTEN]
    assert theirs.observed_addr == OBSERVED.to_bytes()
    assert list(theirs.protocols) == PROTOCOLS
    theirs.signedPeerRecord = b"envelope"
    decoded = IdentifyMessage.decode(theirs.SerializeToString())
    assert decoded.signed_peer_record == b"envelope"
    assert decoded.protocols == tuple(PROTOCOLS)
    assert decoded.decoded_listen_addrs() == LISTEN


def test_unknown_fields_and_addresses_skipped() -> None:
    unknown_addr = bytes.fromhex("e703")  # unknown multiaddr protocol code
    data = (
        IdentifyMessage(listen_addrs=(unknown_addr, LISTEN[0].to_bytes())).encode()
        + protobuf.encode_varint_field(99, 1)
        + protobuf.encode_bytes_field(4, unknown_addr)
    )
    message = IdentifyMessage.decode(data)
    assert message.decoded_listen_addrs() == [LISTEN[0]]
    assert message.decoded_observed_addr() is None


def test_framed_under_chunking_prefixes() -> None:
    wire = full_message().encode_framed()
    for cut in range(len(wire)):
        assert IdentifyMessage.decode_framed(wire[:cut]) is None
    assert IdentifyMessage.decode_framed(wire + b"x") == (full_message(), len(wire))


@given(st.data())
def test_framed_arbitrary_chunking(data: st.DataObject) -> None:
    wire = full_message().encode_framed()
    received = b""
    result = None
    for chunk in data.draw(chunkings(wire)):
        received += chunk
        result = IdentifyMessage.decode_framed(received)
    assert result == (full_message(), len(wire))


def test_size_limits() -> None:
    too_big = IdentifyMessage(agent_version="x" * MAX_IDENTIFY_MESSAGE_SIZE)
    with pytest.raises(LocalProtocolError):
        too_big.encode()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        IdentifyMessage.decode_framed(encode_uvarint(MAX_IDENTIFY_MESSAGE_SIZE + 1))
    many = b"".join(protobuf.encode_bytes_field(2, b"\x04") for _ in range(129))
    with pytest.raises(RemoteProtocolError, match="repeated"):
        IdentifyMessage.decode(many)


@pytest.mark.parametrize(
    "data",
    [
        b"\x2a\x01\xff",  # protocolVersion not UTF-8
        b"\x08\x01",  # publicKey with varint wire type
        b"\x1a\x05ab",  # truncated
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        IdentifyMessage.decode(data)


@given(st.binary(max_size=80))
def test_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        message = IdentifyMessage.decode(data)
        message.decoded_listen_addrs()
        message.decoded_observed_addr()
        message.decoded_public_key()
    except RemoteProtocolError:
        pass


def test_ping_helpers() -> None:
    payload = make_ping_payload()
    assert len(payload) == PING_PAYLOAD_LENGTH
    assert make_ping_payload(bytes) == bytes(32)
    check_ping_response(payload, payload)
    with pytest.raises(RemoteProtocolError):
        check_ping_response(payload, payload[:-1])
    with pytest.raises(LocalProtocolError):
        make_ping_payload(lambda n: bytes(n - 1))
