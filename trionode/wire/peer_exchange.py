"""`/trionode/peers/1`: ask a connected peer which peers *it* is connected to.

libp2p's identify tells us a peer's own listen addresses, never anyone else's, so peer
exchange is a protocol of its own. The exchange is one stream:

```
requester                                  responder
  open stream, negotiate /trionode/peers/1
  send EOF (the request is empty)  ───────▶
                                   ◀───────  one frame: u32 BE length || msgpack body
                                             send EOF
```

The body is a msgpack array of ``[peer_id: bin, addrs: [bin, ...]]`` pairs (binary PeerId
multihash, binary multiaddrs without ``/p2p``), at most :data:`MAX_PEERS` of them, each with
at most :data:`MAX_ADDRS_PER_PEER` addresses, the whole frame at most
:data:`MAX_RESPONSE_SIZE` bytes. The encoder drops whatever does not fit; the decoder
rejects anything beyond the limits, malformed msgpack, invalid PeerIds or multiaddrs and
duplicate peers with RemoteProtocolError. The responder only sends addresses it parsed
itself, so an address this codebase cannot parse is a protocol error, not something to skip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from trionode.errors import RemoteProtocolError
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import MAX_MULTIADDR_SIZE, Multiaddr
from trionode.wire.varint import BytesLike

PEER_EXCHANGE_PROTOCOL_ID: Final = "/trionode/peers/1"

MAX_RESPONSE_SIZE: Final = 64 * 1024
"""Largest response frame (header included)."""

MAX_PEERS: Final = 256
"""Most peers one response may carry (the `network.peer_exchange_max_peers` bound)."""

MAX_ADDRS_PER_PEER: Final = 16
"""Most addresses one peer entry may carry."""

MAX_PEER_ID_SIZE: Final = 128
"""Longest binary PeerId accepted (Ed25519: 38 bytes, SHA-256: 34)."""

FRAME_HEADER_SIZE: Final = 4
_ARRAY_HEADER_MAX: Final = 5  # msgpack array32 header; the encoder's size estimate uses it


@dataclass(frozen=True, slots=True)
class PeerAddrs:
    """One entry of a response: a peer and the addresses it can be dialed at."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]


class _PeerWire(msgspec.Struct, array_like=True, frozen=True):
    peer_id: Annotated[bytes, msgspec.Meta(max_length=MAX_PEER_ID_SIZE)]
    addrs: Annotated[
        list[Annotated[bytes, msgspec.Meta(max_length=MAX_MULTIADDR_SIZE)]],
        msgspec.Meta(max_length=MAX_ADDRS_PER_PEER),
    ]


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(
    Annotated[list[_PeerWire], msgspec.Meta(max_length=MAX_PEERS)]
)


def encode_response(peers: Iterable[PeerAddrs], *, max_size: int = MAX_RESPONSE_SIZE) -> bytes:
    """Frame a response, keeping peers in order while they fit.

    Peers beyond :data:`MAX_PEERS`, addresses beyond :data:`MAX_ADDRS_PER_PEER` and any peer
    that would push the frame past ``max_size`` are left out (never an error: a response is
    advice, and a shorter one is still valid).
    """
    max_size = min(max_size, MAX_RESPONSE_SIZE)
    budget = max_size - FRAME_HEADER_SIZE - _ARRAY_HEADER_MAX
    entries: list[_PeerWire] = []
    for peer in peers:
        if len(entries) == MAX_PEERS:
            break
        entry = _PeerWire(
            peer.peer_id.multihash,
            [a.without_peer_id().to_bytes() for a in peer.addrs[:MAX_ADDRS_PER_PEER]],
        )
        size = len(_ENCODER.encode(entry))
        if size > budget:
            continue
        budget -= size
        entries.append(entry)
    body = _ENCODER.encode(entries)
    return len(body).to_bytes(FRAME_HEADER_SIZE, "big") + body


def decode_response_frame(data: BytesLike) -> list[PeerAddrs] | None:
    """Decode the response frame in ``data`` (everything received so far).

    Returns:
        The peers, or ``None`` while the frame is incomplete.

    Raises:
        RemoteProtocolError: the declared length exceeds :data:`MAX_RESPONSE_SIZE` (checked
            as soon as the header is in, before the body arrives), bytes follow the frame,
            or the body is invalid (see :func:`decode_response_body`).
    """
    if len(data) < FRAME_HEADER_SIZE:
        return None
    length = int.from_bytes(data[:FRAME_HEADER_SIZE], "big")
    if length > MAX_RESPONSE_SIZE - FRAME_HEADER_SIZE:
        raise RemoteProtocolError(f"peer exchange response of {length} bytes is too large")
    end = FRAME_HEADER_SIZE + length
    if len(data) < end:
        return None
    if len(data) > end:
        raise RemoteProtocolError("bytes after the peer exchange response")
    return decode_response_body(data[FRAME_HEADER_SIZE:end])


def decode_response_body(body: BytesLike) -> list[PeerAddrs]:
    """Decode and validate a response body.

    Raises:
        RemoteProtocolError: malformed msgpack, limits exceeded, an invalid PeerId or
            multiaddr, a ``/p2p`` address naming another peer, or a peer listed twice.
    """
    try:
        entries = _DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"malformed peer exchange response: {exc}") from None
    result: list[PeerAddrs] = []
    seen: set[PeerId] = set()
    for entry in entries:
        peer_id = PeerId.from_bytes(entry.peer_id)
        if peer_id in seen:
            raise RemoteProtocolError(f"peer {peer_id} listed twice")
        seen.add(peer_id)
        addrs: list[Multiaddr] = []
        for raw in entry.addrs:
            addr = Multiaddr.from_bytes(raw)
            named = addr.peer_id()
            if named is not None and named != peer_id:
                raise RemoteProtocolError(f"address {addr} of {peer_id} names another peer")
            addrs.append(addr.without_peer_id())
        result.append(PeerAddrs(peer_id, tuple(addrs)))
    return result
