"""The pubsub ``RPC`` protobuf (gossipsub v1.0/v1.1, floodsub) and StrictSign signatures.

Wire format (proto2, go-libp2p-pubsub ``pb/rpc.proto``)::

    RPC            { repeated SubOpts subscriptions = 1; repeated Message publish = 2;
                     optional ControlMessage control = 3; }
    SubOpts        { optional bool subscribe = 1; optional string topicid = 2; }
    Message        { optional bytes from = 1; optional bytes data = 2;
                     optional bytes seqno = 3; optional string topic = 4;
                     optional bytes signature = 5; optional bytes key = 6; }
    ControlMessage { repeated ControlIHave ihave = 1; repeated ControlIWant iwant = 2;
                     repeated ControlGraft graft = 3; repeated ControlPrune prune = 4;
                     repeated ControlIDontWant idontwant = 5; }
    ControlIHave   { optional string topicID = 1; repeated bytes messageIDs = 2; }
    ControlIWant   { repeated bytes messageIDs = 1; }
    ControlGraft   { optional string topicID = 1; }
    ControlPrune   { optional string topicID = 1; repeated PeerInfo peers = 2;
                     optional uint64 backoff = 3; }
    PeerInfo       { optional bytes peerID = 1; optional bytes signedPeerRecord = 2; }
    ControlIDontWant { repeated bytes messageIDs = 1; }

``from``, ``seqno``, message ids and signatures are raw bytes (never UTF-8 decoded); topics are
strings. Unknown fields are ignored when decoding. A decoded :class:`PubsubMessage` keeps its
exact wire bytes: forwarding re-sends them unchanged, and the signature is checked over them
with the ``signature`` and ``key`` spans cut out (the spec signs unknown fields too, and
re-encoding is not canonical across implementations).

Decoding is bounded by :class:`RpcLimits`. Every nested message is first walked by a cheap
counting scan that stops at its field budget, so a 1 MiB RPC of tiny fields costs
milliseconds, not the seconds a full decode into field objects would take. Any violation —
malformed protobuf, a limit exceeded, bad UTF-8 in a topic — raises
:class:`~trionode.errors.RemoteProtocolError` and nothing else.

StrictSign: ``signature = Ed25519(b"libp2p-pubsub:" || Message without fields 5 and 6)``;
``key`` carries the ``PublicKey`` protobuf only when it cannot be extracted from ``from``
(always extractable for Ed25519 PeerIds, so we omit it). The default message id is
``from || seqno``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TypeAlias

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.keys import PeerId, PrivateKey, PublicKey
from trionode.wire.varint import (
    MAX_PROTOBUF_VARINT_LEN,
    BytesLike,
    decode_uvarint,
)

__all__ = [
    "DEFAULT_RPC_LIMITS",
    "PUBSUB_SIGNING_PREFIX",
    "RPC",
    "SEQNO_LENGTH",
    "ControlGraft",
    "ControlIDontWant",
    "ControlIHave",
    "ControlIWant",
    "ControlMessage",
    "ControlPrune",
    "MessageRejectedError",
    "PeerInfo",
    "PubsubMessage",
    "RejectReason",
    "RpcLimits",
    "SubOpts",
    "decode_rpc",
    "default_message_id",
    "encode_rpc",
    "encode_rpc_split",
    "sign_message",
    "verify_message",
]

PUBSUB_SIGNING_PREFIX = b"libp2p-pubsub:"
SEQNO_LENGTH = 8
"""Seqnos are 8-byte big-endian integers in every implementation; others are rejected."""

# Field numbers.
_RPC_SUBSCRIPTIONS = 1
_RPC_PUBLISH = 2
_RPC_CONTROL = 3
_SUB_SUBSCRIBE = 1
_SUB_TOPIC = 2
_MSG_FROM = 1
_MSG_DATA = 2
_MSG_SEQNO = 3
_MSG_TOPIC = 4
_MSG_SIGNATURE = 5
_MSG_KEY = 6
_CTL_IHAVE = 1
_CTL_IWANT = 2
_CTL_GRAFT = 3
_CTL_PRUNE = 4
_CTL_IDONTWANT = 5
_IHAVE_TOPIC = 1
_IHAVE_IDS = 2
_IWANT_IDS = 1
_GRAFT_TOPIC = 1
_PRUNE_TOPIC = 1
_PRUNE_PEERS = 2
_PRUNE_BACKOFF = 3
_PEER_INFO_ID = 1
_PEER_INFO_RECORD = 2
_IDONTWANT_IDS = 1

_UNKNOWN_FIELD_SLACK = 16
"""Unknown fields tolerated per nested message on top of the known ones (forward compat)."""
_FIELD_OVERHEAD = 1 + MAX_PROTOBUF_VARINT_LEN
"""Upper bound of tag plus length prefix for the fields we emit (tags 1..6 take one byte)."""


# -- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcLimits:
    """Hard limits applied when decoding (and splitting) RPCs.

    The defaults accept anything go/js/py-libp2p send in practice (their RPC ceiling is
    1 MiB, IHAVE batches are capped at 5000 ids per topic).
    """

    max_rpc_size: int = 1 << 20
    """Largest RPC protobuf body, excluding the uvarint length prefix."""
    max_subscriptions: int = 1024
    """SubOpts entries per RPC."""
    max_messages: int = 1024
    """Published messages per RPC."""
    max_topic_length: int = 512
    """Bytes in one topic string."""
    max_control_entries: int = 1024
    """IHAVE + IWANT + GRAFT + PRUNE + IDONTWANT entries in one control message."""
    max_message_ids: int = 10_000
    """Message ids summed over every IHAVE, IWANT and IDONTWANT entry of one RPC."""
    max_message_id_length: int = 256
    """Bytes in one message id (the default ``from || seqno`` ids are at most 48)."""
    max_prune_peers: int = 64
    """PeerInfo entries in one PRUNE (go and js send at most 16)."""

    def __post_init__(self) -> None:
        for item in fields(self):
            if getattr(self, item.name) < 1:
                raise ValueError(f"RpcLimits.{item.name} must be positive")


DEFAULT_RPC_LIMITS = RpcLimits()


# -- messages ---------------------------------------------------------------------------------


class RejectReason(enum.StrEnum):
    """Why :func:`verify_message` refused a message (also used as a metrics label)."""

    MISSING_FROM = "missing_from"
    INVALID_FROM = "invalid_from"
    MISSING_SEQNO = "missing_seqno"
    INVALID_SEQNO = "invalid_seqno"
    MISSING_SIGNATURE = "missing_signature"
    INVALID_KEY = "invalid_key"
    KEY_MISMATCH = "key_mismatch"
    UNSUPPORTED_KEY = "unsupported_key"
    BAD_SIGNATURE = "bad_signature"


class MessageRejectedError(RemoteProtocolError):
    """A message failed StrictSign validation; :attr:`reason` says why."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"pubsub message rejected: {reason}{': ' + detail if detail else ''}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PubsubMessage:
    """One published message. ``None`` means the field is absent on the wire.

    A decoded message remembers its wire bytes, so :meth:`encode` returns exactly what was
    received (unknown fields included). ``dataclasses.replace`` builds a fresh message that
    is re-encoded from its fields.
    """

    from_peer: bytes | None = None
    """The author's PeerId (multihash bytes), not the forwarder's."""
    data: bytes | None = None
    seqno: bytes | None = None
    """8-byte big-endian sequence number, unique and increasing per author."""
    topic: str | None = None
    signature: bytes | None = None
    key: bytes | None = None
    """The author's ``PublicKey`` protobuf, only when ``from`` does not embed it."""
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _cuts: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)
    """Where the signature and key fields start and end in ``_wire`` (pairs), found while
    decoding: the signing payload is the wire bytes without them."""

    def encode(self) -> bytes:
        """The ``Message`` protobuf: the received bytes, or fields 1 to 6 in tag order."""
        wire = self._wire
        if wire is None:
            wire = self._encode_fields(with_signature=True)
            object.__setattr__(self, "_wire", wire)
        return wire

    def _encode_fields(self, *, with_signature: bool) -> bytes:
        out = bytearray()
        if self.from_peer is not None:
            out += protobuf.encode_bytes_field(_MSG_FROM, self.from_peer)
        if self.data is not None:
            out += protobuf.encode_bytes_field(_MSG_DATA, self.data)
        if self.seqno is not None:
            out += protobuf.encode_bytes_field(_MSG_SEQNO, self.seqno)
        if self.topic is not None:
            out += protobuf.encode_string_field(_MSG_TOPIC, self.topic)
        if with_signature:
            if self.signature is not None:
                out += protobuf.encode_bytes_field(_MSG_SIGNATURE, self.signature)
            if self.key is not None:
                out += protobuf.encode_bytes_field(_MSG_KEY, self.key)
        return bytes(out)

    def signing_payload(self) -> bytes:
        """``b"libp2p-pubsub:" || the message protobuf without fields 5 and 6``.

        For a decoded message the signature and key spans are cut out of the received bytes,
        so unknown fields stay signed; otherwise fields 1 to 4 are encoded in tag order.
        """
        wire = self._wire
        if wire is None:
            return PUBSUB_SIGNING_PREFIX + self._encode_fields(with_signature=False)
        cuts = self._cuts
        if cuts is None:
            cuts = tuple(
                offset
                for number, _, _, _, start, end in _fields(wire, len(wire), "pubsub message")
                if number in {_MSG_SIGNATURE, _MSG_KEY}
                for offset in (start, end)
            )
        if not cuts:
            return PUBSUB_SIGNING_PREFIX + wire
        out = bytearray(PUBSUB_SIGNING_PREFIX)
        position = 0
        for index in range(0, len(cuts), 2):
            out += wire[position : cuts[index]]
            position = cuts[index + 1]
        out += wire[position:]
        return bytes(out)

    @property
    def seqno_int(self) -> int | None:
        """The seqno as an integer, or ``None`` if absent."""
        return None if self.seqno is None else int.from_bytes(self.seqno, "big")


def default_message_id(message: PubsubMessage) -> bytes:
    """The default gossipsub message id: ``from || seqno`` (go, py; see wire spec §7.4).

    Raises:
        MessageRejectedError: ``from`` or ``seqno`` is missing.
    """
    if message.from_peer is None:
        raise MessageRejectedError(RejectReason.MISSING_FROM)
    if message.seqno is None:
        raise MessageRejectedError(RejectReason.MISSING_SEQNO)
    return message.from_peer + message.seqno


def sign_message(
    key: PrivateKey, message: PubsubMessage, *, include_key: bool = False
) -> PubsubMessage:
    """Return ``message`` with its StrictSign signature (and ``key`` if asked or needed).

    ``message.from_peer`` must be ``key``'s PeerId; any existing signature/key is replaced.

    Raises:
        LocalProtocolError: ``from_peer`` is not this key's PeerId.
    """
    peer_id = key.peer_id()
    if message.from_peer != peer_id.multihash:
        raise LocalProtocolError("a message must be signed by its author (from != key)")
    unsigned = PubsubMessage(
        from_peer=message.from_peer, data=message.data, seqno=message.seqno, topic=message.topic
    )
    signature = key.sign(unsigned.signing_payload())
    # (Whether our PeerId embeds our key is parsed once: `_embedded_key` keeps it.)
    embed = include_key or _embedded_key(peer_id) is None
    return PubsubMessage(
        from_peer=message.from_peer,
        data=message.data,
        seqno=message.seqno,
        topic=message.topic,
        signature=signature,
        key=key.public_key.to_protobuf() if embed else None,
    )


_AUTHOR_CACHE_SIZE = 4096
"""Authors whose PeerId and embedded key are kept parsed: a node hears the same few
hundred authors over and over, and parsing both was a third of checking a message."""


@functools.lru_cache(maxsize=_AUTHOR_CACHE_SIZE)
def _peer_id_of(from_peer: bytes) -> PeerId:
    return PeerId.from_bytes(from_peer)  # (an error is raised each time, never cached)


@functools.lru_cache(maxsize=_AUTHOR_CACHE_SIZE)
def _embedded_key(author: PeerId) -> PublicKey | None:
    return author.extract_public_key()


def _author_key(author: PeerId, key: bytes | None) -> PublicKey:
    try:
        public_key = _embedded_key(author) if key is None else PublicKey.from_protobuf(key)
    except RemoteProtocolError as exc:
        raise MessageRejectedError(RejectReason.INVALID_KEY, str(exc)) from None
    if public_key is None:
        raise MessageRejectedError(RejectReason.INVALID_KEY, "no key for a hashed PeerId")
    if key is not None and not author.matches(public_key):
        raise MessageRejectedError(RejectReason.KEY_MISMATCH)
    return public_key


def verify_message(message: PubsubMessage) -> PeerId:
    """Check a message under StrictSign and return its author.

    ``from``, ``seqno`` (8 bytes) and ``signature`` must be present; the key is ``key`` (which
    must match ``from``) or else the one embedded in an identity-multihash ``from``.

    Raises:
        MessageRejectedError: with the :class:`RejectReason`.
    """
    if message.from_peer is None:
        raise MessageRejectedError(RejectReason.MISSING_FROM)
    try:
        author = _peer_id_of(message.from_peer)
    except RemoteProtocolError as exc:
        raise MessageRejectedError(RejectReason.INVALID_FROM, str(exc)) from None
    if message.seqno is None:
        raise MessageRejectedError(RejectReason.MISSING_SEQNO)
    if len(message.seqno) != SEQNO_LENGTH:
        raise MessageRejectedError(RejectReason.INVALID_SEQNO, f"{len(message.seqno)} bytes")
    if message.signature is None:
        raise MessageRejectedError(RejectReason.MISSING_SIGNATURE)
    public_key = _author_key(author, message.key)
    payload = message.signing_payload()
    try:
        valid = public_key.verify(message.signature, payload)
    except RemoteProtocolError as exc:
        raise MessageRejectedError(RejectReason.UNSUPPORTED_KEY, str(exc)) from None
    if not valid:
        raise MessageRejectedError(RejectReason.BAD_SIGNATURE)
    return author


# -- control messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubOpts:
    """A subscription change announced by the sender."""

    subscribe: bool
    topic: str


@dataclass(frozen=True, slots=True)
class ControlIHave:
    """Gossip: the sender has these message ids in ``topic``."""

    topic: str
    message_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ControlIWant:
    """A request for the messages with these ids."""

    message_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ControlGraft:
    """The sender added us to its mesh for ``topic`` and asks us to do the same."""

    topic: str


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer-exchange record in a PRUNE (we decode these but do not use them)."""

    peer_id: bytes | None = None
    signed_peer_record: bytes | None = None


@dataclass(frozen=True, slots=True)
class ControlPrune:
    """The sender removed us from its mesh for ``topic``; v1.1 adds peer exchange and backoff."""

    topic: str
    peers: tuple[PeerInfo, ...] = ()
    backoff: int | None = None
    """Seconds the pruned peer must wait before grafting again (v1.1)."""


@dataclass(frozen=True, slots=True)
class ControlIDontWant:
    """v1.2: do not send these messages (decoded for completeness, ignored by the router)."""

    message_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """The control part of an RPC; entries of each kind in wire order."""

    ihave: tuple[ControlIHave, ...] = ()
    iwant: tuple[ControlIWant, ...] = ()
    graft: tuple[ControlGraft, ...] = ()
    prune: tuple[ControlPrune, ...] = ()
    idontwant: tuple[ControlIDontWant, ...] = ()

    def is_empty(self) -> bool:
        """Whether there are no entries at all."""
        return not (self.ihave or self.iwant or self.graft or self.prune or self.idontwant)


@dataclass(frozen=True, slots=True)
class RPC:
    """One pubsub RPC, as framed on a ``/meshsub`` or ``/floodsub`` stream."""

    subscriptions: tuple[SubOpts, ...] = ()
    publish: tuple[PubsubMessage, ...] = ()
    control: ControlMessage | None = None

    def encode(self) -> bytes:
        """The ``RPC`` protobuf (no length prefix, no limit checks)."""
        return encode_rpc(self)


# -- encoding ---------------------------------------------------------------------------------


def _encode_subopts(sub: SubOpts) -> bytes:
    return protobuf.encode_varint_field(_SUB_SUBSCRIBE, int(sub.subscribe)) + (
        protobuf.encode_string_field(_SUB_TOPIC, sub.topic)
    )


def _encode_ids(number: int, ids: Iterable[bytes]) -> bytes:
    return b"".join(protobuf.encode_bytes_field(number, i) for i in ids)


def _encode_ihave(entry: ControlIHave) -> bytes:
    return protobuf.encode_string_field(_IHAVE_TOPIC, entry.topic) + _encode_ids(
        _IHAVE_IDS, entry.message_ids
    )


def _encode_prune(entry: ControlPrune) -> bytes:
    out = bytearray(protobuf.encode_string_field(_PRUNE_TOPIC, entry.topic))
    for info in entry.peers:
        body = bytearray()
        if info.peer_id is not None:
            body += protobuf.encode_bytes_field(_PEER_INFO_ID, info.peer_id)
        if info.signed_peer_record is not None:
            body += protobuf.encode_bytes_field(_PEER_INFO_RECORD, info.signed_peer_record)
        out += protobuf.encode_bytes_field(_PRUNE_PEERS, body)
    if entry.backoff is not None:
        out += protobuf.encode_varint_field(_PRUNE_BACKOFF, entry.backoff)
    return bytes(out)


def _control_fields(control: ControlMessage) -> Iterator[tuple[bytes, int]]:
    """Each control entry as an encoded ``ControlMessage`` field, with its id count."""
    for ihave in control.ihave:
        yield protobuf.encode_bytes_field(_CTL_IHAVE, _encode_ihave(ihave)), len(ihave.message_ids)
    for iwant in control.iwant:
        body = _encode_ids(_IWANT_IDS, iwant.message_ids)
        yield protobuf.encode_bytes_field(_CTL_IWANT, body), len(iwant.message_ids)
    for graft in control.graft:
        body = protobuf.encode_string_field(_GRAFT_TOPIC, graft.topic)
        yield protobuf.encode_bytes_field(_CTL_GRAFT, body), 0
    for prune in control.prune:
        yield protobuf.encode_bytes_field(_CTL_PRUNE, _encode_prune(prune)), 0
    for dont in control.idontwant:
        body = _encode_ids(_IDONTWANT_IDS, dont.message_ids)
        yield protobuf.encode_bytes_field(_CTL_IDONTWANT, body), len(dont.message_ids)


def encode_rpc(rpc: RPC) -> bytes:
    """Encode ``rpc`` as one protobuf (fields in tag order, no limit checks)."""
    out = bytearray()
    for sub in rpc.subscriptions:
        out += protobuf.encode_bytes_field(_RPC_SUBSCRIPTIONS, _encode_subopts(sub))
    for message in rpc.publish:
        out += protobuf.encode_bytes_field(_RPC_PUBLISH, message.encode())
    if rpc.control is not None:
        body = b"".join(piece for piece, _ in _control_fields(rpc.control))
        out += protobuf.encode_bytes_field(_RPC_CONTROL, body)
    return bytes(out)


def _chunk_ids(ids: Sequence[bytes], max_count: int, max_bytes: int) -> Iterator[tuple[bytes, ...]]:
    chunk: list[bytes] = []
    size = 0
    for message_id in ids:
        cost = len(message_id) + _FIELD_OVERHEAD
        if chunk and (len(chunk) >= max_count or size + cost > max_bytes):
            yield tuple(chunk)
            chunk, size = [], 0
        chunk.append(message_id)
        size += cost
    if chunk:
        yield tuple(chunk)


def _split_control(control: ControlMessage, limits: RpcLimits) -> ControlMessage:
    """Cut IHAVE/IWANT/IDONTWANT entries whose ids would not fit in one RPC."""
    max_ids = limits.max_message_ids
    max_bytes = limits.max_rpc_size - limits.max_topic_length - 4 * _FIELD_OVERHEAD
    ihave = tuple(
        ControlIHave(entry.topic, chunk)
        for entry in control.ihave
        for chunk in _chunk_ids(entry.message_ids, max_ids, max_bytes)
    )
    iwant = tuple(
        ControlIWant(chunk)
        for entry in control.iwant
        for chunk in _chunk_ids(entry.message_ids, max_ids, max_bytes)
    )
    idontwant = tuple(
        ControlIDontWant(chunk)
        for entry in control.idontwant
        for chunk in _chunk_ids(entry.message_ids, max_ids, max_bytes)
    )
    return ControlMessage(ihave, iwant, control.graft, control.prune, idontwant)


def encode_rpc_split(rpc: RPC, limits: RpcLimits = DEFAULT_RPC_LIMITS) -> list[bytes]:
    """Encode ``rpc`` as as few RPC protobufs as ``limits`` allow (none if it is empty).

    Subscriptions come first, then messages, then control entries, so a receiver processing
    the RPCs in order sees the same sequence as if they were one. Each RPC respects every
    count limit and ``max_rpc_size``.

    Raises:
        LocalProtocolError: a single subscription, message or control entry cannot fit.
    """
    out: list[bytes] = []
    body = bytearray()
    control = bytearray()
    counts = {"subs": 0, "msgs": 0, "entries": 0, "ids": 0}
    max_size = limits.max_rpc_size

    def flush() -> None:
        nonlocal body, control
        if control:
            body += protobuf.encode_bytes_field(_RPC_CONTROL, control)
        if body:
            out.append(bytes(body))
        body, control = bytearray(), bytearray()
        for name in counts:
            counts[name] = 0

    def add_top(piece: bytes, kind: str, limit: int) -> None:
        nonlocal body
        if len(piece) > max_size:
            raise LocalProtocolError(f"RPC field of {len(piece)} bytes exceeds {max_size}")
        if len(body) + len(piece) > max_size or counts[kind] >= limit:
            flush()
        body += piece
        counts[kind] += 1

    for sub in rpc.subscriptions:
        piece = protobuf.encode_bytes_field(_RPC_SUBSCRIPTIONS, _encode_subopts(sub))
        add_top(piece, "subs", limits.max_subscriptions)
    for message in rpc.publish:
        piece = protobuf.encode_bytes_field(_RPC_PUBLISH, message.encode())
        add_top(piece, "msgs", limits.max_messages)
    if rpc.control is not None:
        for piece, ids in _control_fields(_split_control(rpc.control, limits)):
            if len(piece) + _FIELD_OVERHEAD > max_size:
                raise LocalProtocolError(f"control entry of {len(piece)} bytes is too large")
            projected = len(body) + len(control) + len(piece) + _FIELD_OVERHEAD
            if (
                projected > max_size
                or counts["entries"] >= limits.max_control_entries
                or counts["ids"] + ids > limits.max_message_ids
            ):
                flush()
            control += piece
            counts["entries"] += 1
            counts["ids"] += ids
    flush()
    return out


# -- decoding ---------------------------------------------------------------------------------

_Field: TypeAlias = tuple[int, int, int, bytes, int, int]
"""One field: number, wire type, varint value (0 otherwise), bytes value (``b""`` for a
varint), offset of its tag, offset just past its value."""


def _varint(data: bytes, offset: int, what: str) -> tuple[int, int]:
    decoded = decode_uvarint(data, offset, max_len=MAX_PROTOBUF_VARINT_LEN, require_minimal=False)
    if decoded is None:
        raise RemoteProtocolError(f"truncated protobuf {what}")
    return decoded[0], offset + decoded[1]


def _fields(data: bytes, max_fields: int, what: str) -> list[_Field]:
    """Every field of ``data`` in wire order, in one pass; more than ``max_fields`` is an error.

    Bounded before anything is built: the count is checked before each field, so a 1 MiB
    RPC of tiny fields stops at its budget. Tags and lengths under 128 (every tag we know,
    most lengths) are read inline. This replaced a counting scan followed by a full decode
    into one object per field: each gossip RPC walked every byte twice, and decoding was a
    larger share of a 60-node simulation's CPU than checking the messages' signatures.

    Raises:
        RemoteProtocolError: too many fields, field number 0, a group or reserved wire type,
            or framing that runs past the end.
    """
    out: list[_Field] = []
    size = len(data)
    offset = 0
    while offset < size:
        if len(out) >= max_fields:
            raise RemoteProtocolError(f"{what} has more than {max_fields} fields")
        start = offset
        key = data[offset]
        if key < 0x80:
            offset += 1
        else:
            key, offset = _varint(data, offset, "tag")
        number = key >> 3
        wire_type = key & 7
        if not 1 <= number <= protobuf.MAX_FIELD_NUMBER:
            raise RemoteProtocolError(f"invalid protobuf field number {number}")
        if wire_type == protobuf.WIRE_LEN:
            if offset >= size:
                raise RemoteProtocolError("truncated protobuf length")
            length = data[offset]
            if length < 0x80:
                offset += 1
            else:
                length, offset = _varint(data, offset, "length")
            end = offset + length
            if end > size:
                raise RemoteProtocolError(
                    f"truncated {what}: a length-delimited field runs past it"
                )
            out.append((number, wire_type, 0, data[offset:end], start, end))
            offset = end
        elif wire_type == protobuf.WIRE_VARINT:
            value, offset = _varint(data, offset, "varint")
            out.append((number, wire_type, value, b"", start, offset))
        elif wire_type in {protobuf.WIRE_FIXED64, protobuf.WIRE_FIXED32}:
            end = offset + (8 if wire_type == protobuf.WIRE_FIXED64 else 4)
            if end > size:
                raise RemoteProtocolError(f"truncated {what}: a fixed-width field runs past it")
            out.append((number, wire_type, 0, data[offset:end], start, end))
            offset = end
        else:
            raise RemoteProtocolError(f"unsupported protobuf wire type {wire_type}")
    return out


def _wrong_type(number: int, wire_type: int, expected: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"protobuf field {number} has wire type {wire_type}, expected {expected}"
    )


def _too_many(number: int, limit: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"protobuf field {number} repeated more than {limit}")


class _Budget:
    """Message ids left for the rest of the RPC."""

    __slots__ = ("ids",)

    def __init__(self, ids: int) -> None:
        self.ids = ids


def _topic(raw: bytes | None, limits: RpcLimits, field_number: int) -> str:
    if raw is None:
        return ""
    if len(raw) > limits.max_topic_length:
        raise RemoteProtocolError(f"topic of {len(raw)} bytes exceeds {limits.max_topic_length}")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"topic in field {field_number} is not UTF-8") from None


def _id_list(
    data: bytes,
    ids_number: int,
    topic_number: int | None,
    what: str,
    *,
    limits: RpcLimits,
    budget: _Budget,
) -> tuple[bytes | None, tuple[bytes, ...]]:
    """The topic (if the entry has one) and the message ids of an IHAVE, IWANT or IDONTWANT.

    Each id is a field of its own, so the remaining id budget bounds the field count."""
    topic: bytes | None = None
    ids: list[bytes] = []
    max_length = limits.max_message_id_length
    for number, wire_type, _, value, _, _ in _fields(data, budget.ids + _UNKNOWN_FIELD_SLACK, what):
        if number == ids_number:
            if wire_type != protobuf.WIRE_LEN:
                raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
            if len(value) > max_length:
                raise RemoteProtocolError(f"message id of {len(value)} bytes")
            ids.append(value)
        elif number == topic_number:
            if wire_type != protobuf.WIRE_LEN:
                raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
            topic = value
    if len(ids) > budget.ids:
        raise RemoteProtocolError(f"RPC carries more than {limits.max_message_ids} message ids")
    budget.ids -= len(ids)
    return topic, tuple(ids)


def _one_string(data: bytes, number: int, max_fields: int, what: str) -> bytes | None:
    """The last value of length-delimited field ``number`` (protobuf: the last one wins)."""
    found: bytes | None = None
    for field_number, wire_type, _, value, _, _ in _fields(data, max_fields, what):
        if field_number == number:
            if wire_type != protobuf.WIRE_LEN:
                raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
            found = value
    return found


def _decode_prune(data: bytes, limits: RpcLimits) -> ControlPrune:
    max_peers = limits.max_prune_peers
    topic: bytes | None = None
    raw_peers: list[bytes] = []
    backoff: int | None = None
    for number, wire_type, value, raw, _, _ in _fields(
        data, max_peers + _UNKNOWN_FIELD_SLACK, "PRUNE"
    ):
        if number == _PRUNE_BACKOFF:
            if wire_type != protobuf.WIRE_VARINT:
                raise _wrong_type(number, wire_type, protobuf.WIRE_VARINT)
            backoff = value
        elif number in {_PRUNE_TOPIC, _PRUNE_PEERS}:
            if wire_type != protobuf.WIRE_LEN:
                raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
            if number == _PRUNE_TOPIC:
                topic = raw
            else:
                raw_peers.append(raw)
    if len(raw_peers) > max_peers:
        raise _too_many(_PRUNE_PEERS, max_peers)
    peers: list[PeerInfo] = []
    for item in raw_peers:
        peer_id: bytes | None = None
        record: bytes | None = None
        for number, wire_type, _, raw, _, _ in _fields(item, _UNKNOWN_FIELD_SLACK, "PeerInfo"):
            if number in {_PEER_INFO_ID, _PEER_INFO_RECORD}:
                if wire_type != protobuf.WIRE_LEN:
                    raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
                if number == _PEER_INFO_ID:
                    peer_id = raw
                else:
                    record = raw
        peers.append(PeerInfo(peer_id, record))
    return ControlPrune(_topic(topic, limits, _PRUNE_TOPIC), tuple(peers), backoff)


def _decode_control(data: bytes, limits: RpcLimits) -> ControlMessage:
    budget = _Budget(limits.max_message_ids)
    ihave: list[ControlIHave] = []
    iwant: list[ControlIWant] = []
    graft: list[ControlGraft] = []
    prune: list[ControlPrune] = []
    idontwant: list[ControlIDontWant] = []
    entries = _fields(data, limits.max_control_entries, "control message")
    for number, wire_type, _, _, _, _ in entries:
        if _CTL_IHAVE <= number <= _CTL_IDONTWANT and wire_type != protobuf.WIRE_LEN:
            raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
    # Kinds are decoded in field-number order (IHAVE first), whatever their wire order: the
    # id budget is spent in the same order the old decoder spent it.
    for number, _, _, raw, _, _ in entries:
        if number == _CTL_IHAVE:
            topic, ids = _id_list(
                raw, _IHAVE_IDS, _IHAVE_TOPIC, "IHAVE", limits=limits, budget=budget
            )
            ihave.append(ControlIHave(_topic(topic, limits, _IHAVE_TOPIC), ids))
    for number, _, _, raw, _, _ in entries:
        if number == _CTL_IWANT:
            iwant.append(
                ControlIWant(
                    _id_list(raw, _IWANT_IDS, None, "IWANT", limits=limits, budget=budget)[1]
                )
            )
        elif number == _CTL_GRAFT:
            found = _one_string(raw, _GRAFT_TOPIC, 1 + _UNKNOWN_FIELD_SLACK, "GRAFT")
            graft.append(ControlGraft(_topic(found, limits, _GRAFT_TOPIC)))
        elif number == _CTL_PRUNE:
            prune.append(_decode_prune(raw, limits))
    for number, _, _, raw, _, _ in entries:
        if number == _CTL_IDONTWANT:
            _, ids = _id_list(raw, _IDONTWANT_IDS, None, "IDONTWANT", limits=limits, budget=budget)
            idontwant.append(ControlIDontWant(ids))
    return ControlMessage(tuple(ihave), tuple(iwant), tuple(graft), tuple(prune), tuple(idontwant))


def _decode_message(data: bytes, limits: RpcLimits) -> PubsubMessage:
    values: list[bytes | None] = [None] * 7  # by field number; 0 unused
    cuts: list[int] = []
    for number, wire_type, _, raw, start, end in _fields(
        data, 6 + _UNKNOWN_FIELD_SLACK, "pubsub message"
    ):
        if number > _MSG_KEY:
            continue  # unknown: ignored, but still signed over
        if wire_type != protobuf.WIRE_LEN:
            raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
        values[number] = raw
        if number >= _MSG_SIGNATURE:
            cuts += (start, end)
    topic_raw = values[_MSG_TOPIC]
    decoded = PubsubMessage(
        from_peer=values[_MSG_FROM],
        data=values[_MSG_DATA],
        seqno=values[_MSG_SEQNO],
        topic=None if topic_raw is None else _topic(topic_raw, limits, _MSG_TOPIC),
        signature=values[_MSG_SIGNATURE],
        key=values[_MSG_KEY],
    )
    object.__setattr__(decoded, "_wire", data)
    object.__setattr__(decoded, "_cuts", tuple(cuts))
    return decoded


def _decode_subopts(data: bytes, limits: RpcLimits) -> SubOpts:
    subscribe = 0
    topic: bytes | None = None
    for number, wire_type, value, raw, _, _ in _fields(data, 2 + _UNKNOWN_FIELD_SLACK, "SubOpts"):
        if number == _SUB_SUBSCRIBE:
            if wire_type != protobuf.WIRE_VARINT:
                raise _wrong_type(number, wire_type, protobuf.WIRE_VARINT)
            subscribe = value
        elif number == _SUB_TOPIC:
            if wire_type != protobuf.WIRE_LEN:
                raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
            topic = raw
    return SubOpts(bool(subscribe), _topic(topic, limits, _SUB_TOPIC))


def decode_rpc(data: BytesLike, limits: RpcLimits = DEFAULT_RPC_LIMITS) -> RPC:
    """Decode one RPC protobuf body (without its length prefix).

    Raises:
        RemoteProtocolError: malformed, or any of ``limits`` exceeded.
    """
    if len(data) > limits.max_rpc_size:
        raise RemoteProtocolError(f"RPC of {len(data)} bytes exceeds {limits.max_rpc_size}")
    raw = bytes(data)
    max_fields = limits.max_subscriptions + limits.max_messages + 1 + _UNKNOWN_FIELD_SLACK
    subscriptions: list[bytes] = []
    publish: list[bytes] = []
    control: bytes | None = None
    for number, wire_type, _, value, _, _ in _fields(raw, max_fields, "RPC"):
        if number > _RPC_CONTROL:
            continue
        if wire_type != protobuf.WIRE_LEN:
            raise _wrong_type(number, wire_type, protobuf.WIRE_LEN)
        if number == _RPC_PUBLISH:
            publish.append(value)
        elif number == _RPC_SUBSCRIPTIONS:
            subscriptions.append(value)
        else:
            control = value
    if len(subscriptions) > limits.max_subscriptions:
        raise _too_many(_RPC_SUBSCRIPTIONS, limits.max_subscriptions)
    if len(publish) > limits.max_messages:
        raise _too_many(_RPC_PUBLISH, limits.max_messages)
    return RPC(
        tuple(_decode_subopts(item, limits) for item in subscriptions),
        tuple(_decode_message(item, limits) for item in publish),
        None if control is None else _decode_control(control, limits),
    )
