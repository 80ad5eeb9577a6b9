"""The mDNS DNS codec: queries and responses round trip, foreign layouts are read, and any
malformed packet (size, labels, pointers, truncation) raises only RemoteProtocolError."""

from __future__ import annotations

import struct
from contextlib import suppress

import pytest
from hypothesis import given, strategies as st

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.keys import PrivateKey
from trionode.wire.mdns import (
    CLASS_IN,
    MAX_MESSAGE_SIZE,
    SERVICE_NAME,
    TYPE_A,
    TYPE_PTR,
    TYPE_TXT,
    decode_message,
    encode_query,
    encode_response,
    find_peers,
    is_peer_query,
    name_from_text,
)
from trionode.wire.multiaddr import Multiaddr

PEER = PrivateKey(b"\x07" * 32).peer_id()
OTHER = PrivateKey(b"\x08" * 32).peer_id()
NAME = "a" * 40


def _addr(text: str, peer: object = PEER) -> str:
    return f"{text}/p2p/{peer}"


# -- hand-built messages, to read layouts other implementations produce ----------------------


def _name(text: str) -> bytes:
    return b"".join(bytes((len(p),)) + p for p in name_from_text(text)) + b"\x00"


def _record(name: bytes, rtype: int, rdata: bytes, *, ttl: int = 120, rclass: int = 1) -> bytes:
    return name + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def _message(
    *, flags: int = 0x8400, questions: int = 0, answers: list[bytes], additionals: list[bytes]
) -> bytes:
    header = struct.pack("!HHHHHH", 0, flags, questions, len(answers), 0, len(additionals))
    return header + b"".join(answers) + b"".join(additionals)


def _txt(*strings: bytes) -> bytes:
    return b"".join(bytes((len(s),)) + s for s in strings)


# -- round trips -----------------------------------------------------------------------------


def test_query_round_trip() -> None:
    message = decode_message(encode_query())
    assert not message.is_response
    (question,) = message.questions
    assert question.name == name_from_text(SERVICE_NAME)
    assert question.qtype == TYPE_PTR
    assert question.qclass == CLASS_IN
    assert not question.unicast_response
    assert is_peer_query(message)
    assert find_peers(message) == []


def test_response_round_trip_with_compression() -> None:
    addrs = [_addr("/ip4/192.168.1.5/tcp/2428"), _addr("/ip6/fe80::1/tcp/2428")]
    packet = encode_response(NAME, addrs, ttl=77)
    message = decode_message(packet)
    assert message.is_response
    assert not is_peer_query(message)
    (ptr,) = message.answers
    assert ptr.rtype == TYPE_PTR
    assert ptr.target == (NAME.encode(), *name_from_text(SERVICE_NAME))
    assert [r.rtype for r in message.additionals] == [TYPE_TXT, TYPE_TXT]
    assert all(r.cache_flush for r in message.additionals)
    # The service name is written once; the rest are pointers.
    assert packet.count(b"_p2p") == 1
    (peer,) = find_peers(message)
    assert peer.peer_id == PEER
    assert peer.ttl == 77
    assert [str(a) for a in peer.addrs] == ["/ip4/192.168.1.5/tcp/2428", "/ip6/fe80::1/tcp/2428"]


def test_legacy_answer_repeats_the_question() -> None:
    message = decode_message(encode_response(NAME, [], query_id=0x1234, include_question=True))
    assert message.id == 0x1234
    assert len(message.questions) == 1
    assert find_peers(message) == []  # no usable address: not a peer


def test_response_stays_under_max_size() -> None:
    addrs = [_addr(f"/ip4/10.0.0.{i}/tcp/{1000 + i}") for i in range(100)]
    packet = encode_response(NAME, addrs, max_size=1400)
    assert len(packet) <= 1400
    (peer,) = find_peers(decode_message(packet))
    assert 5 < len(peer.addrs) < 100


def test_bad_peer_name_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_response("x" * 64, [])
    with pytest.raises(LocalProtocolError):
        encode_response("", [])


# -- reading what others write ---------------------------------------------------------------


def test_reads_go_style_single_txt_with_many_strings_in_answers() -> None:
    instance = _name(f"Peer-Name.{SERVICE_NAME}")
    packet = _message(
        answers=[
            _record(_name(SERVICE_NAME.upper()), TYPE_PTR, instance),
            _record(
                _name(f"peer-name.{SERVICE_NAME}"),
                TYPE_TXT,
                _txt(
                    b"dnsaddr=" + _addr("/ip4/10.1.1.1/tcp/4001").encode(),
                    b"dnsaddr=" + _addr("/ip4/10.1.1.1/udp/4001/quic-v1").encode(),
                    b"dnsaddr=/ip4/10.1.1.1/tcp/1/webtransport/certhash/uEi",  # not understood
                    b"dnsaddr=" + _addr("/ip4/10.9.9.9/tcp/1", OTHER).encode(),  # another peer
                    b"dnsaddr=/ip4/10.1.1.2/tcp/9",  # no /p2p
                    b"other=thing",
                ),
            ),
        ],
        additionals=[_record(_name("host.local"), TYPE_A, bytes([10, 1, 1, 1]))],
    )
    (peer,) = find_peers(decode_message(packet))
    assert peer.peer_id == PEER
    assert [str(a) for a in peer.addrs] == [
        "/ip4/10.1.1.1/tcp/4001",
        "/ip4/10.1.1.1/udp/4001/quic-v1",
    ]


def test_ignores_other_services_and_error_responses() -> None:
    other = _message(
        answers=[_record(_name("_http._tcp.local"), TYPE_PTR, _name("x._http._tcp.local"))],
        additionals=[
            _record(
                _name("x._http._tcp.local"),
                TYPE_TXT,
                _txt(b"dnsaddr=" + _addr("/ip4/1.2.3.4/tcp/1").encode()),
            )
        ],
    )
    assert find_peers(decode_message(other)) == []
    ours = encode_response(NAME, [_addr("/ip4/1.2.3.4/tcp/1")])
    failed = ours[:3] + bytes((ours[3] | 0x03,)) + ours[4:]  # rcode 3
    assert find_peers(decode_message(failed)) == []


def test_query_detection() -> None:
    qu = bytearray(encode_query())
    qu[-2] |= 0x80  # QU bit
    message = decode_message(bytes(qu))
    assert message.questions[0].unicast_response
    assert is_peer_query(message)
    any_query = bytearray(encode_query())
    any_query[-4:-2] = b"\x00\xff"
    assert is_peer_query(decode_message(bytes(any_query)))
    other = struct.pack("!HHHHHH", 0, 0, 1, 0, 0, 0) + _name("printer.local") + b"\x00\x01\x00\x01"
    assert not is_peer_query(decode_message(other))


# -- strictness ------------------------------------------------------------------------------


def _question_at(name: bytes) -> bytes:
    return struct.pack("!HHHHHH", 0, 0, 1, 0, 0, 0) + name + b"\x00\x0c\x00\x01"


@pytest.mark.parametrize(
    ("packet", "match"),
    [
        (b"", "shorter than its header"),
        (b"\x00" * 11, "shorter than its header"),
        (b"\x00" * (MAX_MESSAGE_SIZE + 1), "too large"),
        (struct.pack("!HHHHHH", 0, 0, 200, 100, 0, 0), "too many records"),
        (struct.pack("!HHHHHH", 0, 0, 1, 0, 0, 0), "truncated"),
        (_question_at(b"\x05ab"), "truncated"),
        (_question_at(b"\x40" + b"a" * 64 + b"\x00"), "reserved DNS label type"),
        (_question_at(b"\x80\x00"), "reserved DNS label type"),
        (_question_at(b"\x3f" + b"a" * 63) * 1, "truncated"),
        (_question_at((b"\x3f" + b"a" * 63) * 4 + b"\x00"), "longer than 255"),
        (_question_at(b"\xc0\x0c"), "does not point backwards"),  # points at itself
        (_question_at(b"\xc0\x20"), "does not point backwards"),  # forward
        (_question_at(b"\xc0"), "truncated"),
        (encode_query() + b"\x00", "bytes after"),
    ],
)
def test_malformed(packet: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(packet)


def test_pointer_loops_cannot_happen() -> None:
    # Two names pointing at each other: the second one's pointer goes back to the first,
    # whose pointer goes forward into the second: rejected, never a loop.
    header = struct.pack("!HHHHHH", 0, 0, 2, 0, 0, 0)
    first = b"\x01a\xc0\x12" + b"\x00\x0c\x00\x01"  # at offset 12; points to 18
    second = b"\x01b\xc0\x0c" + b"\x00\x0c\x00\x01"  # at offset 20 (…) points to 12
    with pytest.raises(RemoteProtocolError, match="backwards"):
        decode_message(header + first + second)


def test_long_pointer_chains_are_bounded() -> None:
    # name i = one label + pointer to name i-1: legal, but more than 32 jumps is refused.
    header = struct.pack("!HHHHHH", 0, 0, 40, 0, 0, 0)
    body = bytearray(b"\x00" + b"\x00\x0c\x00\x01")
    offsets = [12]
    for _ in range(39):
        offsets.append(12 + len(body))
        body += b"\xc0" + bytes((offsets[-2],)) + b"\x00\x0c\x00\x01"
    with pytest.raises(RemoteProtocolError, match="too many DNS name pointers"):
        decode_message(header + bytes(body))


def test_ptr_and_txt_rdata_must_be_exact() -> None:
    instance = _name(f"x.{SERVICE_NAME}")
    ptr = _record(_name(SERVICE_NAME), TYPE_PTR, instance + b"\x00")
    with pytest.raises(RemoteProtocolError, match="PTR record data length"):
        decode_message(_message(answers=[ptr], additionals=[]))
    txt = _record(instance, TYPE_TXT, b"\x05abc")
    with pytest.raises(RemoteProtocolError, match="TXT"):
        decode_message(_message(answers=[txt], additionals=[]))
    long_rdata = _name(SERVICE_NAME) + struct.pack("!HHIH", TYPE_A, 1, 1, 100) + b"\x00" * 4
    with pytest.raises(RemoteProtocolError, match="truncated DNS record data"):
        decode_message(_message(answers=[long_rdata], additionals=[]))


@given(st.binary(max_size=700))
def test_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        message = decode_message(data)
    except RemoteProtocolError:
        return
    find_peers(message)
    is_peer_query(message)


@given(st.binary(min_size=12, max_size=400))
def test_garbage_after_a_plausible_header(tail: bytes) -> None:
    packet = struct.pack("!HHHHHH", 0, 0x8400, 1, 2, 1, 2) + tail
    with suppress(RemoteProtocolError):
        find_peers(decode_message(packet))


@given(st.data())
def test_mutated_responses_only_raise_remote_protocol_error(data: st.DataObject) -> None:
    packet = bytearray(
        encode_response(NAME, [_addr("/ip4/10.0.0.1/tcp/1"), _addr("/ip4/10.0.0.2/tcp/2")])
    )
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(packet) - 1))
        packet[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(packet)))
    try:
        message = decode_message(bytes(packet[:cut]))
    except RemoteProtocolError:
        return
    for peer in find_peers(message):
        assert all(isinstance(a, Multiaddr) for a in peer.addrs)
