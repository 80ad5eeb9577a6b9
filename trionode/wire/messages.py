"""Our own message schemas: gossip payloads on context topics and `/trionode/sync/1` frames.

Bodies are msgpack from msgspec tagged unions, decoded with validation, so every malformed,
mistyped or oversized input is a RemoteProtocolError. Stream frames are a 4-byte big-endian
length and a body of at most `MAX_FRAME` bytes (DESIGN §4).
"""

from __future__ import annotations

import struct
from typing import Annotated, Final

import msgspec

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.buffer import ReceiveBuffer

MAX_FRAME: Final = 8 * 1024 * 1024
MAX_GOSSIP: Final = 4 * 1024 * 1024
MAX_IDS: Final = 256
_LENGTH = struct.Struct(">I")

Id32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Ids = Annotated[list[Id32], msgspec.Meta(max_length=MAX_IDS)]


# -- gossip --------------------------------------------------------------------------------


class DeltaGossip(msgspec.Struct, tag="delta", frozen=True, forbid_unknown_fields=True):
    """A new delta, as its author (or a relay) published it."""

    context_id: Id32
    delta: bytes
    """SignedDelta wire bytes."""


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True, forbid_unknown_fields=True):
    """What a member has: lets peers that missed gossip notice and sync."""

    context_id: Id32
    heads: Ids
    root_hash: Id32


Gossip = DeltaGossip | Heartbeat

_ENCODER = msgspec.msgpack.Encoder()
_GOSSIP = msgspec.msgpack.Decoder(Gossip)


def encode_gossip(message: Gossip) -> bytes:
    data = _ENCODER.encode(message)
    if len(data) > MAX_GOSSIP:
        raise LocalProtocolError(f"gossip message of {len(data)} bytes exceeds {MAX_GOSSIP}")
    return data


def decode_gossip(data: bytes) -> Gossip:
    if len(data) > MAX_GOSSIP:
        raise RemoteProtocolError(f"gossip message of {len(data)} bytes exceeds {MAX_GOSSIP}")
    try:
        message: Gossip = _GOSSIP.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed gossip message: {exc}") from None
    return message


# -- /trionode/sync/1 ----------------------------------------------------------------------


class SyncAuth(msgspec.Struct, tag="auth", frozen=True, forbid_unknown_fields=True):
    """The requester proves it is a member of `context_id`: its member key signs the
    connection's Noise handshake hash, so the proof cannot be replayed on another
    connection."""

    context_id: Id32
    member: Id32
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


class HeadsRequest(msgspec.Struct, tag="get_heads", frozen=True, forbid_unknown_fields=True):
    """Open a session: what are your heads and root hash?"""


class HeadsResponse(msgspec.Struct, tag="heads", frozen=True, forbid_unknown_fields=True):
    heads: Ids
    root_hash: Id32


class DeltaRequest(msgspec.Struct, tag="get_deltas", frozen=True, forbid_unknown_fields=True):
    ids: Ids


class DeltaResponse(msgspec.Struct, tag="deltas", frozen=True, forbid_unknown_fields=True):
    deltas: Annotated[list[bytes], msgspec.Meta(max_length=MAX_IDS)]
    missing: Ids
    """Requested ids the responder does not have (it says so instead of staying silent)."""


class SyncError(msgspec.Struct, tag="error", frozen=True, forbid_unknown_fields=True):
    message: Annotated[str, msgspec.Meta(max_length=1024)]


SyncMessage = SyncAuth | HeadsRequest | HeadsResponse | DeltaRequest | DeltaResponse | SyncError

_SYNC = msgspec.msgpack.Decoder(SyncMessage)


def frame(message: SyncMessage) -> bytes:
    body = _ENCODER.encode(message)
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Sans-IO reader of length-prefixed sync frames."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._max = max_frame
        self._buffer = ReceiveBuffer(max_frame + _LENGTH.size)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.feed(data)

    def next_message(self) -> SyncMessage | None:
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack(self._buffer.peek(_LENGTH.size))
        if length > self._max:
            raise RemoteProtocolError(f"sync frame of {length} bytes exceeds {self._max}")
        whole = self._buffer.consume_exactly(_LENGTH.size + length)
        if whole is None:
            return None
        try:
            message: SyncMessage = _SYNC.decode(whole[_LENGTH.size :])
        except (msgspec.DecodeError, RecursionError) as exc:
            raise RemoteProtocolError(f"malformed sync message: {exc}") from None
        return message
