"""Kademlia DHT messages (libp2p ``kad-dht``) and our signed provider records.

```
Message { MessageType type=1;  bytes key=2;  Record record=3;  repeated Peer closerPeers=8;
          repeated Peer providerPeers=9;  int32 clusterLevelRaw=10; }
          PUT_VALUE=0 GET_VALUE=1 ADD_PROVIDER=2 GET_PROVIDERS=3 FIND_NODE=4 PING=5
Peer    { bytes id=1;  repeated bytes addrs=2;  ConnectionType connection=3;
          bytes trionodeProviderRecord=100;   // ours: see ProviderRecord }
```

Every message is one ``uvarint(len) || protobuf`` frame. ``type`` is always written, even
when it is 0, because presence matters to other implementations. Records (PUT/GET_VALUE) are
not implemented: field 3 is never written and is ignored on receipt; a server answers those
types by resetting the stream, which is what libp2p servers do for a request they reject.

Decoding is strict where we use a value (sizes, counts, peer ids, multiaddrs are checked
before anything else sees them) and skips unknown fields (py-libp2p adds ``senderRecord=11``
and ``Peer.signedRecord=4``; we ignore both). Every failure is a RemoteProtocolError.

*Provider records* are signed envelopes (libp2p RFC 0002 layout, our own domain and payload
type) carried in field 100 of a provider ``Peer``: ``{key=1, peer_id=2, addrs=3 (repeated),
expires=4 (UNIX seconds)}``, signed by the provider's peer key. A DHT node that relays it
cannot change the addresses, the key or the expiry, nor invent a provider; a reader checks
the signature, that the signer is the peer named, the key it asked for and the expiry.
Other implementations skip field 100 and see an ordinary provider.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from trionode.errors import ProtocolError, RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.keys import PeerId, PrivateKey, PublicKey
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.varint import (
    BytesLike,
    decode_length_prefixed,
    encode_length_prefixed,
    encode_uvarint,
)

IPFS_PROTOCOL_ID: Final = "/ipfs/kad/1.0.0"
"""The public libp2p DHT's id (interop); trionode's default is a private one (config)."""

MAX_MESSAGE_SIZE: Final = 64 * 1024
"""Largest frame accepted or sent (20 peers with a few addresses each fit many times)."""
MAX_KEY_SIZE: Final = 128
"""Largest ``key`` (py-libp2p's own limit for value keys; provider keys are 34 bytes)."""
MAX_PEERS: Final = 40
"""Peers accepted per list (``closerPeers``, ``providerPeers``): twice k, so an honest node's
k=20 always fits and a node sending endless peers is refused."""
MAX_ADDRS_PER_PEER: Final = 16
MAX_ADDR_SIZE: Final = 256
MAX_PEER_ID_SIZE: Final = 64
MAX_RECORD_SIZE: Final = 4096
"""Largest signed provider record (an Ed25519 key, 16 addresses and a signature fit)."""

PROVIDER_RECORD_DOMAIN: Final = b"trionode-kad-provider"
PROVIDER_RECORD_TYPE: Final = b"\x03\x7f"
"""Envelope payload type of a provider record (libp2p's registered ones are 0x0301/0x0302)."""
_PEER_RECORD_FIELD: Final = 100


class MessageType(IntEnum):
    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


class Connectedness(IntEnum):
    NOT_CONNECTED = 0
    CONNECTED = 1
    CAN_CONNECT = 2
    CANNOT_CONNECT = 3


@dataclass(frozen=True, slots=True)
class KadPeer:
    """A peer in a message: its id (PeerId multihash bytes) and binary multiaddrs."""

    id: bytes
    addrs: tuple[bytes, ...] = ()
    connection: Connectedness = Connectedness.NOT_CONNECTED
    provider_record: bytes | None = None
    """A signed provider record (providerPeers only; ours, field 100)."""

    def peer_id(self) -> PeerId:
        """The peer id (the decoder checked it already)."""
        return PeerId.from_bytes(self.id)

    def multiaddrs(self) -> list[Multiaddr]:
        """The addresses that parse, without any ``/p2p`` suffix; others are skipped."""
        out: list[Multiaddr] = []
        for raw in self.addrs:
            try:
                out.append(Multiaddr.from_bytes(raw).without_peer_id())
            except ProtocolError:
                continue
        return out


@dataclass(frozen=True, slots=True)
class KadMessage:
    type: MessageType
    key: bytes = b""
    closer: tuple[KadPeer, ...] = ()
    providers: tuple[KadPeer, ...] = ()
    cluster_level: int | None = field(default=None, compare=False)


# -- keys and distance ------------------------------------------------------------------------


def kad_id(key: bytes) -> int:
    """A key's position in the 256-bit keyspace: SHA-256 of its bytes, big-endian.

    Peers are placed by their PeerId multihash bytes, provider keys by their raw bytes, as in
    libp2p."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


def sha256_multihash(data: bytes) -> bytes:
    """``12 20 || sha256(data)``: the provider key form every libp2p DHT accepts."""
    return b"\x12\x20" + hashlib.sha256(data).digest()


# -- encoding ---------------------------------------------------------------------------------


def _encode_peer(peer: KadPeer) -> bytes:
    out = protobuf.encode_bytes_field(1, peer.id)
    for addr in peer.addrs:
        out += protobuf.encode_bytes_field(2, addr)
    if peer.connection:
        out += protobuf.encode_varint_field(3, int(peer.connection))
    if peer.provider_record is not None:
        out += protobuf.encode_bytes_field(_PEER_RECORD_FIELD, peer.provider_record)
    return out


def encode_message(message: KadMessage) -> bytes:
    """One frame. Raises LocalProtocolError if it would exceed MAX_MESSAGE_SIZE."""
    body = protobuf.encode_varint_field(1, int(message.type))
    if message.key:
        body += protobuf.encode_bytes_field(2, message.key)
    for peer in message.closer:
        body += protobuf.encode_bytes_field(8, _encode_peer(peer))
    for peer in message.providers:
        body += protobuf.encode_bytes_field(9, _encode_peer(peer))
    if message.cluster_level is not None:
        body += protobuf.encode_varint_field(10, message.cluster_level)
    return encode_length_prefixed(body, max_size=MAX_MESSAGE_SIZE)


# -- decoding ---------------------------------------------------------------------------------


def decode_frame(data: BytesLike) -> tuple[KadMessage, int] | None:
    """The message at the front of ``data`` and the bytes it used; ``None`` until whole.

    Raises:
        RemoteProtocolError: too large (checked from the length prefix, before the body
            arrives), malformed, an unknown type, or a field outside its limits.
    """
    framed = decode_length_prefixed(data, max_size=MAX_MESSAGE_SIZE)
    if framed is None:
        return None
    body, used = framed
    return decode_message(body), used


def decode_message(body: BytesLike) -> KadMessage:
    """Decode one message body (no length prefix); see :func:`decode_frame`."""
    message = protobuf.decode_message(body, max_size=MAX_MESSAGE_SIZE)
    raw_type = message.get_uint(1)
    if raw_type is None:
        raise RemoteProtocolError("Kademlia message has no type")
    try:
        kind = MessageType(raw_type)
    except ValueError:
        raise RemoteProtocolError(f"unknown Kademlia message type {raw_type}") from None
    key = message.get_bytes(2) or b""
    if len(key) > MAX_KEY_SIZE:
        raise RemoteProtocolError(f"Kademlia key of {len(key)} bytes exceeds {MAX_KEY_SIZE}")
    closer = tuple(_decode_peer(raw) for raw in message.get_repeated_bytes(8, max_count=MAX_PEERS))
    providers = tuple(
        _decode_peer(raw) for raw in message.get_repeated_bytes(9, max_count=MAX_PEERS)
    )
    level = message.get_uint(10)
    return KadMessage(kind, key, closer, providers, level)


def _decode_peer(raw: bytes) -> KadPeer:
    peer = protobuf.decode_message(raw, max_size=MAX_MESSAGE_SIZE)
    peer_id = peer.get_bytes(1)
    if peer_id is None:
        raise RemoteProtocolError("Kademlia peer has no id")
    if len(peer_id) > MAX_PEER_ID_SIZE:
        raise RemoteProtocolError("Kademlia peer id too long")
    PeerId.from_bytes(peer_id)  # RemoteProtocolError if it is not a valid PeerId multihash
    addrs = peer.get_repeated_bytes(2, max_count=MAX_ADDRS_PER_PEER)
    for addr in addrs:
        if len(addr) > MAX_ADDR_SIZE:
            raise RemoteProtocolError("Kademlia peer address too long")
    raw_connection = peer.get_uint(3) or 0
    try:
        connection = Connectedness(raw_connection)
    except ValueError:
        connection = Connectedness.NOT_CONNECTED  # advisory only
    record = peer.get_bytes(_PEER_RECORD_FIELD)
    if record is not None and len(record) > MAX_RECORD_SIZE:
        raise RemoteProtocolError("Kademlia provider record too large")
    return KadPeer(peer_id, tuple(addrs), connection, record)


# -- signed provider records ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """ "``peer_id`` provides ``key`` at ``addrs`` until ``expires`` (UNIX seconds)"."""

    key: bytes
    peer_id: PeerId
    addrs: tuple[bytes, ...]
    expires: int


def _signed_data(payload: bytes) -> bytes:
    # RFC 0002: each part with its uvarint length, the domain included.
    out = b""
    for part in (PROVIDER_RECORD_DOMAIN, PROVIDER_RECORD_TYPE, payload):
        out += encode_uvarint(len(part)) + part
    return out


def sign_provider_record(key: PrivateKey, record: ProviderRecord) -> bytes:
    """The signed envelope of ``record`` (which must name ``key``'s peer id)."""
    payload = protobuf.encode_bytes_field(1, record.key)
    payload += protobuf.encode_bytes_field(2, record.peer_id.multihash)
    for addr in record.addrs[:MAX_ADDRS_PER_PEER]:
        payload += protobuf.encode_bytes_field(3, addr)
    payload += protobuf.encode_varint_field(4, record.expires)
    envelope = protobuf.encode_bytes_field(1, key.public_key.to_protobuf())
    envelope += protobuf.encode_bytes_field(2, PROVIDER_RECORD_TYPE)
    envelope += protobuf.encode_bytes_field(3, payload)
    envelope += protobuf.encode_bytes_field(5, key.sign(_signed_data(payload)))
    return envelope


def verify_provider_record(envelope: bytes) -> ProviderRecord:
    """Check an envelope's signature and that its signer is the peer the record names.

    Expiry and key are the caller's to check (they depend on the clock and the question).

    Raises:
        RemoteProtocolError: malformed, a wrong domain or type, a bad signature, or signed
            by another key than the named peer's.
    """
    outer = protobuf.decode_message(envelope, max_size=MAX_RECORD_SIZE)
    public_raw = outer.get_bytes(1)
    payload = outer.get_bytes(3)
    signature = outer.get_bytes(5)
    if public_raw is None or payload is None or signature is None:
        raise RemoteProtocolError("provider record envelope is incomplete")
    if outer.get_bytes(2) != PROVIDER_RECORD_TYPE:
        raise RemoteProtocolError("not a provider record")
    public = PublicKey.from_protobuf(public_raw)
    if not public.verify(signature, _signed_data(payload)):
        raise RemoteProtocolError("provider record signature does not verify")
    inner = protobuf.decode_message(payload, max_size=MAX_RECORD_SIZE)
    key = inner.get_bytes(1)
    raw_peer = inner.get_bytes(2)
    expires = inner.get_uint(4)
    if key is None or raw_peer is None or expires is None:
        raise RemoteProtocolError("provider record is incomplete")
    peer_id = PeerId.from_bytes(raw_peer)
    if not peer_id.matches(public):
        raise RemoteProtocolError("provider record is signed by another peer")
    addrs = tuple(inner.get_repeated_bytes(3, max_count=MAX_ADDRS_PER_PEER))
    return ProviderRecord(key, peer_id, addrs, expires)
