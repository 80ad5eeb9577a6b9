from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.protobuf import (
    WIRE_FIXED32,
    WIRE_FIXED64,
    WIRE_LEN,
    WIRE_VARINT,
    Field,
    decode_message,
    encode_bytes_field,
    encode_string_field,
    encode_varint_field,
    iter_fields,
)


def test_encoding_vectors() -> None:
    assert encode_varint_field(1, 1) == bytes.fromhex("0801")
    assert encode_bytes_field(2, b"\x01\x02") == bytes.fromhex("12020102")
    assert encode_string_field(5, "ab") == bytes.fromhex("2a026162")
    assert encode_varint_field(16, 300) == bytes.fromhex("8001ac02")


@pytest.mark.parametrize("number", [0, 1 << 29])
def test_invalid_field_number(number: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_varint_field(number, 1)


def test_decode_fields_with_spans_and_unknowns() -> None:
    data = (
        encode_varint_field(1, 7)
        + bytes.fromhex("1d")
        + b"\x01\x02\x03\x04"  # field 3, fixed32
        + bytes.fromhex("21")
        + b"\x00" * 8  # field 4, fixed64
        + encode_bytes_field(2, b"hello")
        + encode_bytes_field(2, b"world")
    )
    fields = iter_fields(data)
    assert [(f.number, f.wire_type) for f in fields] == [
        (1, WIRE_VARINT),
        (3, WIRE_FIXED32),
        (4, WIRE_FIXED64),
        (2, WIRE_LEN),
        (2, WIRE_LEN),
    ]
    assert fields[1].value == b"\x01\x02\x03\x04"
    assert all(data[f.start : f.end] for f in fields)
    assert b"".join(data[f.start : f.end] for f in fields) == data
    message = decode_message(data)
    assert message.get_uint(1) == 7
    assert message.get_bytes(2) == b"world"  # last one wins
    assert message.get_repeated_bytes(2) == [b"hello", b"world"]
    assert message.get_bytes(9) is None
    assert message.get_uint(9) is None
    assert message.get_str(9) is None
    assert message.has(3)
    assert not message.has(9)


def test_non_minimal_varints_tolerated() -> None:
    # protobuf decoders accept padded varints (tag 0x08 written as 88 00)
    assert decode_message(b"\x88\x00\x81\x00").get_uint(1) == 1


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x08", "truncated"),
        (b"\x12\x05abc", "truncated"),
        (b"\x12", "truncated"),
        (b"\x1d\x01", "truncated"),
        (b"\x0b", "wire type"),  # start group
        (b"\x0c", "wire type"),  # end group
        (b"\x0e", "wire type"),  # 6 is reserved
        (b"\x00\x01", "field number"),
        (b"\x80", "truncated"),
    ],
)
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(data)


def test_size_limit() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_message(encode_bytes_field(1, b"x" * 20), max_size=10)


def test_getter_type_checks() -> None:
    message = decode_message(encode_varint_field(1, 5) + encode_bytes_field(2, b"\xff"))
    with pytest.raises(RemoteProtocolError, match="wire type"):
        message.get_bytes(1)
    with pytest.raises(RemoteProtocolError, match="wire type"):
        message.get_uint(2)
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        message.get_str(2)
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        message.get_repeated_str(2)
    many = decode_message(encode_bytes_field(3, b"a") * 3)
    with pytest.raises(RemoteProtocolError, match="more than 2"):
        many.get_repeated_bytes(3, max_count=2)
    assert many.get_repeated_str(3, max_count=3) == ["a", "a", "a"]


fields_strategy = st.lists(
    st.tuples(
        st.integers(1, (1 << 29) - 1),
        st.one_of(st.integers(0, (1 << 64) - 1), st.binary(max_size=40)),
    ),
    max_size=10,
)


@given(fields_strategy)
def test_round_trip(fields: list[tuple[int, int | bytes]]) -> None:
    data = b"".join(
        encode_varint_field(n, v) if isinstance(v, int) else encode_bytes_field(n, v)
        for n, v in fields
    )
    decoded = iter_fields(data)
    assert [(f.number, f.value) for f in decoded] == fields
    assert all(isinstance(f, Field) for f in decoded)


@given(st.binary(max_size=64))
def test_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        message = decode_message(data, max_size=48)
        for number in range(1, 6):
            message.get_uint(number) if number % 2 else message.get_str(number)
            message.get_repeated_str(number, max_count=4)
    except RemoteProtocolError:
        pass
