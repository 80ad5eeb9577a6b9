"""A minimal protobuf (proto2/proto3 wire format) codec for small, flat libp2p messages.

Only what libp2p needs: varint fields (wire type 0) and length-delimited fields (wire type
2) are decoded to values; fixed64/fixed32 fields (types 1 and 5) are decoded to their raw
bytes so unknown ones can be skipped; groups (types 3 and 4) are refused. Messages are
decoded into a :class:`Message` of fields; typed getters raise RemoteProtocolError when a
field has the wrong wire type or an invalid value, so callers never see IndexError,
ValueError or UnicodeDecodeError. Unknown fields are simply never asked for.

Each field keeps its byte span (:attr:`Field.start`, :attr:`Field.end`), which lets callers
re-serialise a message with some fields removed (gossipsub signature checks do this).

Encoding helpers write fields in the order they are called; callers write them in field
number order to get the deterministic encoding libp2p requires (keys, signatures).
"""

from __future__ import annotations

from dataclasses import dataclass

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.varint import MAX_PROTOBUF_VARINT_LEN, BytesLike, decode_uvarint, encode_uvarint

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5

MAX_FIELD_NUMBER = (1 << 29) - 1

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
"""Default cap for :func:`decode_message`; callers usually pass something much smaller."""


# -- encoding ---------------------------------------------------------------------------------


def _tag(number: int, wire_type: int) -> bytes:
    if not 1 <= number <= MAX_FIELD_NUMBER:
        raise LocalProtocolError(f"invalid protobuf field number {number}")
    return encode_uvarint((number << 3) | wire_type)


def encode_varint_field(number: int, value: int) -> bytes:
    """Encode a uint64/enum/bool field (wire type 0)."""
    return _tag(number, WIRE_VARINT) + encode_uvarint(value)


def encode_bytes_field(number: int, value: BytesLike) -> bytes:
    """Encode a bytes or embedded-message field (wire type 2)."""
    return _tag(number, WIRE_LEN) + encode_uvarint(len(value)) + bytes(value)


def encode_string_field(number: int, value: str) -> bytes:
    """Encode a string field (wire type 2, UTF-8)."""
    return encode_bytes_field(number, value.encode())


# -- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One decoded field occurrence."""

    number: int
    wire_type: int
    value: int | bytes
    """``int`` for varints; ``bytes`` for length-delimited and fixed-width fields."""
    start: int
    """Offset of the field's tag in the message."""
    end: int
    """Offset just past the field's value."""


def iter_fields(data: BytesLike, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> list[Field]:
    """Decode every field of a message, in wire order.

    Raises:
        RemoteProtocolError: the message is larger than ``max_size``, truncated, uses groups
            or a reserved wire type, or has field number 0.
    """
    size = len(data)
    if size > max_size:
        raise RemoteProtocolError(f"protobuf message of {size} bytes exceeds limit {max_size}")
    fields: list[Field] = []
    offset = 0
    while offset < size:
        start = offset
        decoded = decode_uvarint(
            data, offset, max_len=MAX_PROTOBUF_VARINT_LEN, require_minimal=False
        )
        if decoded is None:
            raise RemoteProtocolError("truncated protobuf tag")
        key, used = decoded
        offset += used
        number, wire_type = key >> 3, key & 7
        if not 1 <= number <= MAX_FIELD_NUMBER:
            raise RemoteProtocolError(f"invalid protobuf field number {number}")
        value: int | bytes
        if wire_type == WIRE_VARINT:
            decoded = decode_uvarint(
                data, offset, max_len=MAX_PROTOBUF_VARINT_LEN, require_minimal=False
            )
            if decoded is None:
                raise RemoteProtocolError("truncated protobuf varint")
            value, used = decoded
            offset += used
        elif wire_type == WIRE_LEN:
            decoded = decode_uvarint(
                data, offset, max_len=MAX_PROTOBUF_VARINT_LEN, require_minimal=False
            )
            if decoded is None:
                raise RemoteProtocolError("truncated protobuf length")
            length, used = decoded
            offset += used
            if length > size - offset:
                raise RemoteProtocolError("truncated protobuf length-delimited field")
            value = bytes(data[offset : offset + length])
            offset += length
        elif wire_type in {WIRE_FIXED64, WIRE_FIXED32}:
            width = 8 if wire_type == WIRE_FIXED64 else 4
            if width > size - offset:
                raise RemoteProtocolError("truncated protobuf fixed-width field")
            value = bytes(data[offset : offset + width])
            offset += width
        else:
            raise RemoteProtocolError(f"unsupported protobuf wire type {wire_type}")
        fields.append(Field(number, wire_type, value, start, offset))
    return fields


class Message:
    """A decoded message: fields grouped by number, with typed, validating getters.

    For a non-repeated field, the last occurrence wins (protobuf merge semantics).
    """

    __slots__ = ("_by_number", "fields")

    def __init__(self, fields: list[Field]) -> None:
        """Group ``fields`` (from :func:`iter_fields`) by field number."""
        self.fields = fields
        """All fields in wire order, including unknown ones."""
        self._by_number: dict[int, list[Field]] = {}
        for field in fields:
            self._by_number.setdefault(field.number, []).append(field)

    def has(self, number: int) -> bool:
        """Whether field ``number`` occurs at least once."""
        return number in self._by_number

    def _typed(self, number: int, wire_type: int) -> list[Field]:
        found = self._by_number.get(number, [])
        for field in found:
            if field.wire_type != wire_type:
                raise RemoteProtocolError(
                    f"protobuf field {number} has wire type {field.wire_type}, expected {wire_type}"
                )
        return found

    def get_uint(self, number: int) -> int | None:
        """The last varint value of field ``number``, or ``None`` if absent."""
        found = self._typed(number, WIRE_VARINT)
        if not found:
            return None
        value = found[-1].value
        assert isinstance(value, int)
        return value

    def get_bytes(self, number: int) -> bytes | None:
        """The last bytes value of field ``number``, or ``None`` if absent."""
        found = self._typed(number, WIRE_LEN)
        if not found:
            return None
        value = found[-1].value
        assert isinstance(value, bytes)
        return value

    def get_str(self, number: int) -> str | None:
        """The last string value of field ``number``, or ``None`` if absent."""
        raw = self.get_bytes(number)
        return None if raw is None else _utf8(raw, number)

    def get_repeated_bytes(self, number: int, *, max_count: int | None = None) -> list[bytes]:
        """Every bytes value of repeated field ``number``, in order.

        Raises:
            RemoteProtocolError: more than ``max_count`` values, or a wrong wire type.
        """
        found = self._typed(number, WIRE_LEN)
        if max_count is not None and len(found) > max_count:
            raise RemoteProtocolError(f"protobuf field {number} repeated more than {max_count}")
        out: list[bytes] = []
        for field in found:
            assert isinstance(field.value, bytes)
            out.append(field.value)
        return out

    def get_repeated_str(self, number: int, *, max_count: int | None = None) -> list[str]:
        """Every string value of repeated field ``number``, in order."""
        return [_utf8(raw, number) for raw in self.get_repeated_bytes(number, max_count=max_count)]


def _utf8(raw: bytes, number: int) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"protobuf field {number} is not valid UTF-8") from None


def decode_message(data: BytesLike, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Message:
    """Decode ``data`` into a :class:`Message`.

    Raises:
        RemoteProtocolError: see :func:`iter_fields`.
    """
    return Message(iter_fields(data, max_size=max_size))
