"""AutoNAT v1 messages (``/libp2p/autonat/1.0.0``): "dial me back at these addresses".

```
Message      { optional MessageType type=1;  /* DIAL=0 DIAL_RESPONSE=1 */
               optional Dial dial=2;  optional DialResponse dialResponse=3; }
Dial         { optional PeerInfo peer=1; }
PeerInfo     { optional bytes id=1; repeated bytes addrs=2; }
DialResponse { optional ResponseStatus status=1; optional string statusText=2;
               optional bytes addr=3; }
ResponseStatus: OK=0 E_DIAL_ERROR=100 E_DIAL_REFUSED=101 E_BAD_REQUEST=200 E_INTERNAL_ERROR=300
```

One request and one response per stream, each one ``uvarint(len) || protobuf`` frame.
``type`` is always written, even when it is 0 (DIAL): the fields are proto2 ``optional`` and
presence matters to other implementations. Decoding is strict about what we use and ignores
unknown fields; every failure is a RemoteProtocolError.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final, TypeVar

from trionode.errors import RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.varint import BytesLike, decode_length_prefixed, encode_length_prefixed

PROTOCOL_ID: Final = "/libp2p/autonat/1.0.0"
MAX_MESSAGE_SIZE: Final = 8192
"""Largest frame accepted (what js-libp2p's server accepts)."""
MAX_ADDRS: Final = 32
"""Addresses accepted in one request."""

T = TypeVar("T")

_DIAL: Final = 0
_DIAL_RESPONSE: Final = 1


class Status(IntEnum):
    OK = 0
    E_DIAL_ERROR = 100
    E_DIAL_REFUSED = 101
    E_BAD_REQUEST = 200
    E_INTERNAL_ERROR = 300


@dataclass(frozen=True, slots=True)
class DialRequest:
    peer_id: bytes
    """The requester's PeerId multihash bytes."""
    addrs: tuple[bytes, ...]
    """Binary multiaddrs to dial back."""


@dataclass(frozen=True, slots=True)
class DialResponse:
    status: Status
    text: str = ""
    addr: bytes | None = None
    """The address that worked (on OK)."""


def encode_request(request: DialRequest) -> bytes:
    peer = protobuf.encode_bytes_field(1, request.peer_id)
    for addr in request.addrs:
        peer += protobuf.encode_bytes_field(2, addr)
    dial = protobuf.encode_bytes_field(1, peer)
    body = protobuf.encode_varint_field(1, _DIAL) + protobuf.encode_bytes_field(2, dial)
    return encode_length_prefixed(body, max_size=MAX_MESSAGE_SIZE)


def encode_response(response: DialResponse) -> bytes:
    inner = protobuf.encode_varint_field(1, int(response.status))
    if response.text:
        inner += protobuf.encode_string_field(2, response.text[:256])
    if response.addr is not None:
        inner += protobuf.encode_bytes_field(3, response.addr)
    body = protobuf.encode_varint_field(1, _DIAL_RESPONSE) + protobuf.encode_bytes_field(3, inner)
    return encode_length_prefixed(body, max_size=MAX_MESSAGE_SIZE)


def decode_request_frame(data: BytesLike) -> DialRequest | None:
    """The request at the front of ``data``; ``None`` until a whole frame has arrived.

    Raises:
        RemoteProtocolError: malformed, too large, not a DIAL, or without a peer id.
    """
    message = _frame(data)
    if message is None:
        return None
    if message.get_uint(1) != _DIAL:
        raise RemoteProtocolError("AutoNAT request is not a DIAL")
    dial = protobuf.decode_message(
        _required(message.get_bytes(2), "dial"), max_size=MAX_MESSAGE_SIZE
    )
    peer = protobuf.decode_message(
        _required(dial.get_bytes(1), "dial.peer"), max_size=MAX_MESSAGE_SIZE
    )
    peer_id = _required(peer.get_bytes(1), "dial.peer.id")
    addrs = tuple(peer.get_repeated_bytes(2, max_count=MAX_ADDRS))
    return DialRequest(peer_id=peer_id, addrs=addrs)


def decode_response_frame(data: BytesLike) -> DialResponse | None:
    """The response at the front of ``data``; ``None`` until a whole frame has arrived.

    Raises:
        RemoteProtocolError: malformed, too large, not a DIAL_RESPONSE, or an unknown status.
    """
    message = _frame(data)
    if message is None:
        return None
    if message.get_uint(1) != _DIAL_RESPONSE:
        raise RemoteProtocolError("AutoNAT response is not a DIAL_RESPONSE")
    inner = protobuf.decode_message(
        _required(message.get_bytes(3), "dialResponse"), max_size=MAX_MESSAGE_SIZE
    )
    raw_status = inner.get_uint(1)
    try:
        status = Status(_required(raw_status, "dialResponse.status"))
    except ValueError:
        raise RemoteProtocolError(f"unknown AutoNAT status {raw_status}") from None
    return DialResponse(status=status, text=inner.get_str(2) or "", addr=inner.get_bytes(3))


def _frame(data: BytesLike) -> protobuf.Message | None:
    framed = decode_length_prefixed(data, max_size=MAX_MESSAGE_SIZE)
    if framed is None:
        return None
    return protobuf.decode_message(framed[0], max_size=MAX_MESSAGE_SIZE)


def _required(value: T | None, what: str) -> T:
    if value is None:
        raise RemoteProtocolError(f"AutoNAT message lacks {what}")
    return value
