"""Unsigned LEB128 varints (multiformats `uvarint`) and uvarint-length-prefixed messages.

A uvarint stores 7 bits per byte, least significant group first; the high bit of each byte
says "more bytes follow". 300 is ``ac 02``. Multiformats requires *minimal* encodings (no
trailing ``0x80 ... 0x00`` padding) and caps a uvarint at 9 bytes (63 bits); protobuf allows
10 bytes (64 bits) and tolerates padding, so both knobs are parameters.

Decoders never raise on short input: they return ``None`` ("need more bytes") so a caller can
feed more and retry. Malformed input (too long, padded, too large) raises
:class:`~trionode.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from typing import TypeAlias

from trionode.errors import LocalProtocolError, RemoteProtocolError

MAX_UVARINT_LEN = 9
"""Longest uvarint multiformats allows (9 bytes = 63 bits of value)."""

MAX_PROTOBUF_VARINT_LEN = 10
"""Longest protobuf varint (10 bytes, enough for a uint64)."""

_UINT64_LIMIT = 1 << 64

BytesLike: TypeAlias = bytes | bytearray | memoryview
"""What decoders accept: ``receive_some`` returns ``bytes | bytearray``."""


def encode_uvarint(value: int) -> bytes:
    """Encode a non-negative integer as a minimal uvarint.

    Raises:
        LocalProtocolError: ``value`` is negative or does not fit in 64 bits.
    """
    if value < 0 or value >= _UINT64_LIMIT:
        raise LocalProtocolError(f"uvarint out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_uvarint(
    data: BytesLike,
    offset: int = 0,
    *,
    max_len: int = MAX_UVARINT_LEN,
    require_minimal: bool = True,
) -> tuple[int, int] | None:
    """Decode a uvarint starting at ``data[offset]``.

    Args:
        data: the bytes to read from.
        offset: where the varint starts.
        max_len: the longest encoding accepted, in bytes.
        require_minimal: reject encodings with redundant trailing zero groups.

    Returns:
        ``(value, consumed)``, where ``consumed`` counts the varint's bytes, or ``None`` when
        ``data`` ends before the varint does (and is still shorter than ``max_len``).

    Raises:
        RemoteProtocolError: the varint is longer than ``max_len`` bytes, is not minimally
            encoded while ``require_minimal`` is set, or exceeds 64 bits.
    """
    value = 0
    shift = 0
    end = len(data)
    index = offset
    while True:
        if index - offset >= max_len:
            raise RemoteProtocolError(f"varint longer than {max_len} bytes")
        if index >= end:
            return None
        byte = data[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            consumed = index - offset
            if require_minimal and byte == 0 and consumed > 1:
                raise RemoteProtocolError("varint is not minimally encoded")
            if value >= _UINT64_LIMIT:
                raise RemoteProtocolError("varint exceeds 64 bits")
            return value, consumed
        shift += 7


def encode_length_prefixed(payload: BytesLike, *, max_size: int) -> bytes:
    """Return ``uvarint(len(payload)) || payload``.

    Raises:
        LocalProtocolError: ``payload`` is longer than ``max_size``.
    """
    if len(payload) > max_size:
        raise LocalProtocolError(f"message of {len(payload)} bytes exceeds limit {max_size}")
    return encode_uvarint(len(payload)) + bytes(payload)


def decode_length_prefixed(
    data: BytesLike, offset: int = 0, *, max_size: int
) -> tuple[bytes, int] | None:
    """Decode one uvarint-length-prefixed message starting at ``data[offset]``.

    The declared length is checked against ``max_size`` as soon as the prefix is complete,
    before the body arrives, so a peer cannot make us buffer an oversized body.

    Returns:
        ``(body, consumed)``, where ``consumed`` counts prefix and body, or ``None`` if more
        bytes are needed.

    Raises:
        RemoteProtocolError: the prefix is malformed or declares more than ``max_size`` bytes.
    """
    decoded = decode_uvarint(data, offset)
    if decoded is None:
        return None
    length, prefix_len = decoded
    if length > max_size:
        raise RemoteProtocolError(f"message of {length} bytes exceeds limit {max_size}")
    start = offset + prefix_len
    stop = start + length
    if stop > len(data):
        return None
    return bytes(data[start:stop]), prefix_len + length
