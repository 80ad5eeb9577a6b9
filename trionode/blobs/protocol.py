"""`/trionode/blob/1`: messages, framing and the fetch plan. Pure code, no I/O.

A fetcher opens one stream per serving peer:

```
fetcher → BlobOpen{context, member, signature, blob_id}   signature: the member key over
                                                           domain ‖ Noise handshake hash ‖ context
server  → BlobManifest{manifest} | BlobRefused{"not available"}
fetcher → ChunkRequest{index}, `window` of them, then one more per reply
server  → ChunkReply{index, data} (in request order) | BlobRefused
```
An invitee that is not a member yet may fetch one blob only: the bundle of the context's
app, so that `context join` can check and install the app before it joins. It opens with
`InvitedOpen{invitation, member, proof, blob_id}` instead: the signed invitation (with its
one-time secret, if any) and a proof of possession of the member key it will join with,
bound to the Noise session like the member proof; the server checks the invitation as the
join would (signature, admin inviter, expiry, invitee or secret) without spending it.

The server answers the same `BlobRefused("not available")` to a non-member, a bad proof, an
unknown context and a blob it does not have for that context, so a stranger learns nothing,
not even whether the blob exists. The fetcher checks the manifest against the blob id and
every chunk against its hash before it keeps anything.

`FetchPlan` decides which chunk each peer fetches next: the missing chunks are handed out
one at a time, in order, to whichever peer asks; a chunk whose peer failed goes back to the
front, so any peer can finish a transfer another started.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Annotated, Final

import msgspec

from trionode.blobs.manifest import MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.buffer import ReceiveBuffer

BLOB_PROTOCOL: Final = "/trionode/blob/1"
AUTH_DOMAIN: Final = b"trionode/blob-auth/v1"
MAX_BLOB_FRAME: Final = max(MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES) + 1024
NOT_AVAILABLE: Final = "not available"
_LENGTH = struct.Struct(">I")

Id32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Index = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]


class BlobOpen(msgspec.Struct, tag="open", frozen=True, forbid_unknown_fields=True):
    context_id: Id32
    member: Id32
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
    blob_id: Id32


MAX_INVITED_INVITATION: Final = 16 * 1024
"""Largest encoded signed invitation an `InvitedOpen` may carry (the invitation string's
own limit)."""


class InvitedOpen(msgspec.Struct, tag="open-invited", frozen=True, forbid_unknown_fields=True):
    invitation: Annotated[bytes, msgspec.Meta(max_length=MAX_INVITED_INVITATION)]
    """A msgpack `SignedInvitation` (trionode.context.invitations), secret included."""
    member: Id32
    proof: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
    blob_id: Id32


class BlobManifest(msgspec.Struct, tag="manifest", frozen=True, forbid_unknown_fields=True):
    manifest: Annotated[bytes, msgspec.Meta(max_length=MAX_MANIFEST_BYTES)]


class ChunkRequest(msgspec.Struct, tag="get", frozen=True, forbid_unknown_fields=True):
    index: Index


class ChunkReply(msgspec.Struct, tag="chunk", frozen=True, forbid_unknown_fields=True):
    index: Index
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_CHUNK_SIZE)]


class BlobRefused(msgspec.Struct, tag="refused", frozen=True, forbid_unknown_fields=True):
    message: Annotated[str, msgspec.Meta(max_length=256)]


BlobMessage = BlobOpen | InvitedOpen | BlobManifest | ChunkRequest | ChunkReply | BlobRefused

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(BlobMessage)


def auth_message(handshake_hash: bytes, context_id: bytes) -> bytes:
    return AUTH_DOMAIN + handshake_hash + context_id


def encode_frame(message: BlobMessage) -> bytes:
    body = _ENCODER.encode(message)
    if len(body) > MAX_BLOB_FRAME:
        raise LocalProtocolError(f"blob frame of {len(body)} bytes exceeds {MAX_BLOB_FRAME}")
    return _LENGTH.pack(len(body)) + body


class BlobFrameReader:
    """Sans-IO reader of length-prefixed blob frames (RemoteProtocolError on bad input)."""

    def __init__(self) -> None:
        self._buffer = ReceiveBuffer(MAX_BLOB_FRAME + _LENGTH.size)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.feed(data)

    def next_message(self) -> BlobMessage | None:
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack(self._buffer.peek(_LENGTH.size))
        if length > MAX_BLOB_FRAME:
            raise RemoteProtocolError(f"blob frame of {length} bytes exceeds {MAX_BLOB_FRAME}")
        whole = self._buffer.consume_exactly(_LENGTH.size + length)
        if whole is None:
            return None
        try:
            message: BlobMessage = _DECODER.decode(whole[_LENGTH.size :])
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise RemoteProtocolError(f"malformed blob message: {exc}") from None
        return message


class FetchPlan:
    """Which chunk indices are still needed, and which are out with some peer."""

    def __init__(self, missing: list[int]) -> None:
        self._queue: deque[int] = deque(missing)
        self._out: dict[int, object] = {}
        self.total = len(missing)
        self.received = 0

    @property
    def complete(self) -> bool:
        return not self._queue and not self._out

    @property
    def idle(self) -> bool:
        """Nothing left to hand out (some chunks may still be in flight)."""
        return not self._queue

    def take(self, peer: object) -> int | None:
        """The next chunk for `peer` to fetch, or None if every chunk is handed out."""
        if not self._queue:
            return None
        index = self._queue.popleft()
        self._out[index] = peer
        return index

    def received_chunk(self, index: int, peer: object) -> None:
        if self._out.get(index) is not peer:
            raise RemoteProtocolError(f"chunk {index} was not asked of this peer")
        del self._out[index]
        self.received += 1

    def give_back(self, peer: object) -> list[int]:
        """Return `peer`'s chunks in flight to the front of the queue (it failed)."""
        mine = sorted(i for i, p in self._out.items() if p is peer)
        for index in mine:
            del self._out[index]
        self._queue.extendleft(reversed(mine))
        return mine
