"""Circuit Relay v2 messages (``/libp2p/circuit/relay/0.2.0/hop`` and ``…/stop``).

```
HopMessage  { optional Type type=1; /* RESERVE=0 CONNECT=1 STATUS=2 */ optional Peer peer=2;
              optional Reservation reservation=3; optional Limit limit=4;
              optional Status status=5; }
StopMessage { optional Type type=1; /* CONNECT=0 STATUS=1 */ optional Peer peer=2;
              optional Limit limit=3; optional Status status=4; }
Peer        { optional bytes id=1; repeated bytes addrs=2; }
Reservation { optional uint64 expire=1; repeated bytes addrs=2; optional bytes voucher=3; }
Limit       { optional uint32 duration=1; optional uint64 data=2; }   // 0 / absent: unlimited
```

Every message is one ``uvarint(len) || protobuf`` frame on its own stream. ``type`` and
``status`` are always written, even when 0: presence matters to js (a missing type is
MALFORMED_MESSAGE) and py (a missing status reads as OK). We send no voucher (vouchers are
advisory and a malformed one fails a js client's whole reservation); we ignore the ones we
receive. Unknown fields (py's ``senderRecord``) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final, TypeVar

from trionode.errors import RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.varint import BytesLike, decode_length_prefixed, encode_length_prefixed

HOP_PROTOCOL: Final = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL: Final = "/libp2p/circuit/relay/0.2.0/stop"
MAX_MESSAGE_SIZE: Final = 4096
"""Largest frame accepted: ours are far smaller (py accepts 64 KiB, js has no limit)."""
MAX_ADDRS: Final = 16


class HopType(IntEnum):
    RESERVE = 0
    CONNECT = 1
    STATUS = 2


class StopType(IntEnum):
    CONNECT = 0
    STATUS = 1


class Status(IntEnum):
    UNUSED = 0
    OK = 100
    RESERVATION_REFUSED = 200
    RESOURCE_LIMIT_EXCEEDED = 201
    PERMISSION_DENIED = 202
    CONNECTION_FAILED = 203
    NO_RESERVATION = 204
    MALFORMED_MESSAGE = 400
    UNEXPECTED_MESSAGE = 401


@dataclass(frozen=True, slots=True)
class Peer:
    id: bytes
    """PeerId multihash bytes."""
    addrs: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Reservation:
    expire: int
    """UNIX seconds."""
    addrs: tuple[bytes, ...] = ()
    """The relay's addresses, with /p2p/<relay> and without /p2p-circuit."""


@dataclass(frozen=True, slots=True)
class Limit:
    duration: int = 0
    """Seconds; 0 is unlimited."""
    data: int = 0
    """Bytes (both directions together, as js and py count them); 0 is unlimited."""


@dataclass(frozen=True, slots=True)
class HopMessage:
    type: HopType
    peer: Peer | None = None
    reservation: Reservation | None = None
    limit: Limit | None = None
    status: Status | None = None


@dataclass(frozen=True, slots=True)
class StopMessage:
    type: StopType
    peer: Peer | None = None
    limit: Limit | None = None
    status: Status | None = None


def _encode_peer(peer: Peer) -> bytes:
    out = protobuf.encode_bytes_field(1, peer.id)
    for addr in peer.addrs:
        out += protobuf.encode_bytes_field(2, addr)
    return out


def _encode_limit(limit: Limit) -> bytes:
    out = b""
    if limit.duration:
        out += protobuf.encode_varint_field(1, limit.duration)
    if limit.data:
        out += protobuf.encode_varint_field(2, limit.data)
    return out


def encode_hop(message: HopMessage) -> bytes:
    out = protobuf.encode_varint_field(1, int(message.type))
    if message.peer is not None:
        out += protobuf.encode_bytes_field(2, _encode_peer(message.peer))
    if message.reservation is not None:
        inner = protobuf.encode_varint_field(1, message.reservation.expire)
        for addr in message.reservation.addrs:
            inner += protobuf.encode_bytes_field(2, addr)
        out += protobuf.encode_bytes_field(3, inner)
    if message.limit is not None:
        out += protobuf.encode_bytes_field(4, _encode_limit(message.limit))
    if message.status is not None:
        out += protobuf.encode_varint_field(5, int(message.status))
    return encode_length_prefixed(out, max_size=MAX_MESSAGE_SIZE)


def encode_stop(message: StopMessage) -> bytes:
    out = protobuf.encode_varint_field(1, int(message.type))
    if message.peer is not None:
        out += protobuf.encode_bytes_field(2, _encode_peer(message.peer))
    if message.limit is not None:
        out += protobuf.encode_bytes_field(3, _encode_limit(message.limit))
    if message.status is not None:
        out += protobuf.encode_varint_field(4, int(message.status))
    return encode_length_prefixed(out, max_size=MAX_MESSAGE_SIZE)


def decode_hop_frame(data: BytesLike) -> tuple[HopMessage, int] | None:
    """The hop message at the front of ``data`` and the bytes it used; ``None`` if incomplete.

    Raises:
        RemoteProtocolError: malformed, too large, no or unknown ``type``/``status``.
    """
    framed = decode_length_prefixed(data, max_size=MAX_MESSAGE_SIZE)
    if framed is None:
        return None
    message = protobuf.decode_message(framed[0], max_size=MAX_MESSAGE_SIZE)
    kind = _enum(HopType, message.get_uint(1), "hop type")
    reservation = None
    raw = message.get_bytes(3)
    if raw is not None:
        inner = protobuf.decode_message(raw, max_size=MAX_MESSAGE_SIZE)
        reservation = Reservation(
            expire=inner.get_uint(1) or 0,
            addrs=tuple(inner.get_repeated_bytes(2, max_count=MAX_ADDRS)),
        )
    hop = HopMessage(
        type=kind,
        peer=_decode_peer(message.get_bytes(2)),
        reservation=reservation,
        limit=_decode_limit(message.get_bytes(4)),
        status=_status(message.get_uint(5)),
    )
    return hop, framed[1]


def decode_stop_frame(data: BytesLike) -> tuple[StopMessage, int] | None:
    """As :func:`decode_hop_frame`, for the stop protocol."""
    framed = decode_length_prefixed(data, max_size=MAX_MESSAGE_SIZE)
    if framed is None:
        return None
    message = protobuf.decode_message(framed[0], max_size=MAX_MESSAGE_SIZE)
    stop = StopMessage(
        type=_enum(StopType, message.get_uint(1), "stop type"),
        peer=_decode_peer(message.get_bytes(2)),
        limit=_decode_limit(message.get_bytes(3)),
        status=_status(message.get_uint(4)),
    )
    return stop, framed[1]


def _decode_peer(raw: bytes | None) -> Peer | None:
    if raw is None:
        return None
    message = protobuf.decode_message(raw, max_size=MAX_MESSAGE_SIZE)
    peer_id = message.get_bytes(1)
    if peer_id is None:
        raise RemoteProtocolError("relay message: peer without an id")
    return Peer(peer_id, tuple(message.get_repeated_bytes(2, max_count=MAX_ADDRS)))


def _decode_limit(raw: bytes | None) -> Limit | None:
    if raw is None:
        return None
    message = protobuf.decode_message(raw, max_size=MAX_MESSAGE_SIZE)
    return Limit(duration=message.get_uint(1) or 0, data=message.get_uint(2) or 0)


def _status(raw: int | None) -> Status | None:
    return None if raw is None else _enum(Status, raw, "status")


E = TypeVar("E", HopType, StopType, Status)


def _enum(kind: type[E], raw: int | None, what: str) -> E:
    if raw is None:
        raise RemoteProtocolError(f"relay message lacks its {what}")
    try:
        return kind(raw)
    except ValueError:
        raise RemoteProtocolError(f"unknown relay {what} {raw}") from None
