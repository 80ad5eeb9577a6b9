from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.varint import (
    MAX_PROTOBUF_VARINT_LEN,
    decode_length_prefixed,
    decode_uvarint,
    encode_length_prefixed,
    encode_uvarint,
)

MAX_MULTIFORMATS = (1 << 63) - 1


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8001"),
        (255, "ff01"),
        (300, "ac02"),
        (16384, "808001"),
        (MAX_MULTIFORMATS, "ffffffffffffffff7f"),
    ],
)
def test_known_vectors(value: int, encoded: str) -> None:
    raw = bytes.fromhex(encoded)
    assert encode_uvarint(value) == raw
    assert decode_uvarint(raw) == (value, len(raw))


@given(st.integers(0, MAX_MULTIFORMATS), st.binary(max_size=8))
def test_round_trip_with_trailing_bytes(value: int, tail: bytes) -> None:
    raw = encode_uvarint(value)
    assert decode_uvarint(raw + tail) == (value, len(raw))
    for cut in range(len(raw)):
        assert decode_uvarint(raw[:cut]) is None


@given(st.binary(max_size=4), st.integers(0, MAX_MULTIFORMATS))
def test_decode_at_offset(head: bytes, value: int) -> None:
    assert decode_uvarint(head + encode_uvarint(value), len(head)) == (
        value,
        len(encode_uvarint(value)),
    )


def test_rejects_non_minimal() -> None:
    with pytest.raises(RemoteProtocolError, match="minimal"):
        decode_uvarint(b"\x80\x00")
    with pytest.raises(RemoteProtocolError, match="minimal"):
        decode_uvarint(b"\xac\x82\x00")
    assert decode_uvarint(b"\x80\x00", require_minimal=False) == (0, 2)


def test_rejects_too_long() -> None:
    with pytest.raises(RemoteProtocolError, match="longer"):
        decode_uvarint(b"\xff" * 9 + b"\x01")
    # nine continuation bytes are already too long, even before the end arrives
    with pytest.raises(RemoteProtocolError):
        decode_uvarint(b"\xff" * 9)
    assert decode_uvarint(b"\xff" * 8) is None


def test_protobuf_length_and_64_bit_limit() -> None:
    max64 = (1 << 64) - 1
    raw = encode_uvarint(max64)
    assert len(raw) == 10
    assert decode_uvarint(raw, max_len=MAX_PROTOBUF_VARINT_LEN) == (max64, 10)
    with pytest.raises(RemoteProtocolError, match="64 bits"):
        decode_uvarint(b"\xff" * 9 + b"\x7f", max_len=MAX_PROTOBUF_VARINT_LEN)


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_encode_out_of_range(value: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_uvarint(value)


@given(st.binary(max_size=20), st.integers(1, 12), st.booleans())
def test_garbage_only_raises_remote_protocol_error(
    data: bytes, max_len: int, require_minimal: bool
) -> None:
    try:
        result = decode_uvarint(data, max_len=max_len, require_minimal=require_minimal)
    except RemoteProtocolError:
        return
    if result is not None:
        value, consumed = result
        assert 1 <= consumed <= min(len(data), max_len)
        assert 0 <= value < 1 << 64


@given(st.binary(max_size=300), st.binary(max_size=4))
def test_length_prefixed_round_trip(payload: bytes, tail: bytes) -> None:
    framed = encode_length_prefixed(payload, max_size=300)
    assert decode_length_prefixed(framed + tail, max_size=300) == (payload, len(framed))
    for cut in range(len(framed)):
        assert decode_length_prefixed(framed[:cut], max_size=300) is None


def test_length_prefixed_limits() -> None:
    with pytest.raises(LocalProtocolError):
        encode_length_prefixed(b"x" * 11, max_size=10)
    # the declared length is refused before the body arrives
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_length_prefixed(encode_uvarint(11), max_size=10)
    assert decode_length_prefixed(encode_uvarint(10), max_size=10) is None


@given(st.binary(max_size=40), st.integers(0, 64))
def test_length_prefixed_garbage(data: bytes, max_size: int) -> None:
    try:
        result = decode_length_prefixed(data, max_size=max_size)
    except RemoteProtocolError:
        return
    if result is not None:
        body, consumed = result
        assert len(body) <= max_size
        assert consumed <= len(data)
