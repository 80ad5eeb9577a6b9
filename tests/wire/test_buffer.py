from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from tests.wire.strategies import chunkings
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.buffer import ReceiveBuffer
from trionode.wire.varint import encode_length_prefixed, encode_uvarint


def test_consume_exactly_and_len() -> None:
    buffer = ReceiveBuffer(100)
    assert len(buffer) == 0
    assert not buffer
    assert buffer.consume_exactly(1) is None
    buffer.feed(b"abc")
    buffer.feed(bytearray(b"def"))
    assert len(buffer) == 6
    assert buffer
    assert buffer.consume_exactly(7) is None
    assert len(buffer) == 6  # nothing consumed on failure
    assert buffer.peek(2) == b"ab"
    assert buffer.consume_exactly(2) == b"ab"
    assert buffer.consume_at_most(10) == b"cdef"
    assert buffer.consume_at_most(10) == b""
    assert buffer.consume_exactly(0) == b""


def test_overflow_is_remote_error() -> None:
    buffer = ReceiveBuffer(4)
    buffer.feed(b"abcd")
    with pytest.raises(RemoteProtocolError, match="overflow"):
        buffer.feed(b"e")
    assert buffer.consume_all() == b"abcd"
    buffer.feed(b"e")
    assert buffer.max_size == 4


def test_invalid_size() -> None:
    with pytest.raises(LocalProtocolError):
        ReceiveBuffer(0)


def test_consume_uvarint() -> None:
    buffer = ReceiveBuffer(100)
    buffer.feed(b"\xac")
    assert buffer.consume_uvarint() is None
    assert len(buffer) == 1
    buffer.feed(b"\x02\x07")
    assert buffer.consume_uvarint() == 300
    assert buffer.consume_uvarint() == 7
    buffer.feed(b"\x80\x00")
    with pytest.raises(RemoteProtocolError):
        buffer.consume_uvarint()


def test_length_prefixed_too_large_before_body() -> None:
    buffer = ReceiveBuffer(100)
    buffer.feed(encode_uvarint(1000))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        buffer.consume_length_prefixed(max_size=50)


@given(st.data(), st.lists(st.binary(max_size=70), max_size=6))
def test_length_prefixed_under_arbitrary_chunking(
    data: st.DataObject, messages: list[bytes]
) -> None:
    wire = b"".join(encode_length_prefixed(m, max_size=100) for m in messages)
    chunks = data.draw(chunkings(wire))
    buffer = ReceiveBuffer(len(wire) + 1)
    received: list[bytes] = []
    for chunk in chunks:
        buffer.feed(chunk)
        while (message := buffer.consume_length_prefixed(max_size=100)) is not None:
            received.append(message)
    assert received == messages
    assert len(buffer) == 0


@given(st.lists(st.binary(max_size=30), max_size=8))
def test_garbage_only_raises_remote_protocol_error(chunks: list[bytes]) -> None:
    buffer = ReceiveBuffer(64)
    try:
        for chunk in chunks:
            buffer.feed(chunk)
            while buffer.consume_length_prefixed(max_size=16) is not None:
                pass
    except RemoteProtocolError:
        pass
    assert len(buffer) <= 64
