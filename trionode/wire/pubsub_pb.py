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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields

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
        out = bytearray(PUBSUB_SIGNING_PREFIX)
        position = 0
        for item in protobuf.iter_fields(wire, max_size=len(wire)):
            if item.number in {_MSG_SIGNATURE, _MSG_KEY}:
                out += wire[position : item.start]
                position = item.end
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
    embed = include_key or peer_id.extract_public_key() is None
    return PubsubMessage(
        from_peer=message.from_peer,
        data=message.data,
        seqno=message.seqno,
        topic=message.topic,
        signature=signature,
        key=key.public_key.to_protobuf() if embed else None,
    )


def _author_key(author: PeerId, key: bytes | None) -> PublicKey:
    try:
        public_key = author.extract_public_key() if key is None else PublicKey.from_protobuf(key)
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
        author = PeerId.from_bytes(message.from_peer)
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


def _scan(data: bytes, max_fields: int, what: str) -> None:
    """Walk the fields of ``data`` without materialising them; stop past ``max_fields``.

    This bounds the work :func:`protobuf.decode_message` does afterwards (it builds one
    object per field, about 2 µs each).

    Raises:
        RemoteProtocolError: too many fields, or malformed framing.
    """
    size = len(data)
    offset = 0
    count = 0
    while offset < size:
        count += 1
        if count > max_fields:
            raise RemoteProtocolError(f"{what} has more than {max_fields} fields")
        decoded = decode_uvarint(
            data, offset, max_len=MAX_PROTOBUF_VARINT_LEN, require_minimal=False
        )
        if decoded is None:
            raise RemoteProtocolError("truncated protobuf tag")
        key, used = decoded
        offset += used
        wire_type = key & 7
        if wire_type in {protobuf.WIRE_VARINT, protobuf.WIRE_LEN}:
            decoded = decode_uvarint(
                data, offset, max_len=MAX_PROTOBUF_VARINT_LEN, require_minimal=False
            )
            if decoded is None:
                raise RemoteProtocolError("truncated protobuf varint")
            value, used = decoded
            offset += used
            if wire_type == protobuf.WIRE_LEN:
                offset += value
        elif wire_type == protobuf.WIRE_FIXED64:
            offset += 8
        elif wire_type == protobuf.WIRE_FIXED32:
            offset += 4
        else:
            raise RemoteProtocolError(f"unsupported protobuf wire type {wire_type}")
    if offset > size:
        raise RemoteProtocolError(f"truncated {what}")


def _decode(data: bytes, max_fields: int, what: str) -> protobuf.Message:
    _scan(data, max_fields, what)
    return protobuf.decode_message(data, max_size=len(data))


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


def _ids(
    message: protobuf.Message, number: int, limits: RpcLimits, budget: _Budget
) -> tuple[bytes, ...]:
    ids = message.get_repeated_bytes(number)
    if len(ids) > budget.ids:
        raise RemoteProtocolError(f"RPC carries more than {limits.max_message_ids} message ids")
    budget.ids -= len(ids)
    for message_id in ids:
        if len(message_id) > limits.max_message_id_length:
            raise RemoteProtocolError(f"message id of {len(message_id)} bytes")
    return tuple(ids)


def _decode_id_list(data: bytes, what: str, budget: _Budget) -> protobuf.Message:
    # Each id is a field of its own, so the remaining id budget bounds the field count.
    return _decode(data, budget.ids + _UNKNOWN_FIELD_SLACK, what)


def _decode_ihave(data: bytes, limits: RpcLimits, budget: _Budget) -> ControlIHave:
    message = _decode_id_list(data, "IHAVE", budget)
    ids = _ids(message, _IHAVE_IDS, limits, budget)
    return ControlIHave(_topic(message.get_bytes(_IHAVE_TOPIC), limits, _IHAVE_TOPIC), ids)


def _decode_iwant(data: bytes, limits: RpcLimits, budget: _Budget) -> ControlIWant:
    message = _decode_id_list(data, "IWANT", budget)
    return ControlIWant(_ids(message, _IWANT_IDS, limits, budget))


def _decode_idontwant(data: bytes, limits: RpcLimits, budget: _Budget) -> ControlIDontWant:
    message = _decode_id_list(data, "IDONTWANT", budget)
    return ControlIDontWant(_ids(message, _IDONTWANT_IDS, limits, budget))


def _decode_graft(data: bytes, limits: RpcLimits) -> ControlGraft:
    message = _decode(data, 1 + _UNKNOWN_FIELD_SLACK, "GRAFT")
    return ControlGraft(_topic(message.get_bytes(_GRAFT_TOPIC), limits, _GRAFT_TOPIC))


def _decode_prune(data: bytes, limits: RpcLimits) -> ControlPrune:
    message = _decode(data, limits.max_prune_peers + _UNKNOWN_FIELD_SLACK, "PRUNE")
    raw_peers = message.get_repeated_bytes(_PRUNE_PEERS, max_count=limits.max_prune_peers)
    peers: list[PeerInfo] = []
    for raw in raw_peers:
        info = _decode(raw, _UNKNOWN_FIELD_SLACK, "PeerInfo")
        peers.append(PeerInfo(info.get_bytes(_PEER_INFO_ID), info.get_bytes(_PEER_INFO_RECORD)))
    return ControlPrune(
        _topic(message.get_bytes(_PRUNE_TOPIC), limits, _PRUNE_TOPIC),
        tuple(peers),
        message.get_uint(_PRUNE_BACKOFF),
    )


def _decode_control(data: bytes, limits: RpcLimits) -> ControlMessage:
    message = _decode(data, limits.max_control_entries, "control message")
    budget = _Budget(limits.max_message_ids)
    return ControlMessage(
        ihave=tuple(
            _decode_ihave(raw, limits, budget) for raw in message.get_repeated_bytes(_CTL_IHAVE)
        ),
        iwant=tuple(
            _decode_iwant(raw, limits, budget) for raw in message.get_repeated_bytes(_CTL_IWANT)
        ),
        graft=tuple(_decode_graft(raw, limits) for raw in message.get_repeated_bytes(_CTL_GRAFT)),
        prune=tuple(_decode_prune(raw, limits) for raw in message.get_repeated_bytes(_CTL_PRUNE)),
        idontwant=tuple(
            _decode_idontwant(raw, limits, budget)
            for raw in message.get_repeated_bytes(_CTL_IDONTWANT)
        ),
    )


def _decode_message(data: bytes, limits: RpcLimits) -> PubsubMessage:
    message = _decode(data, 6 + _UNKNOWN_FIELD_SLACK, "pubsub message")
    topic_raw = message.get_bytes(_MSG_TOPIC)
    decoded = PubsubMessage(
        from_peer=message.get_bytes(_MSG_FROM),
        data=message.get_bytes(_MSG_DATA),
        seqno=message.get_bytes(_MSG_SEQNO),
        topic=None if topic_raw is None else _topic(topic_raw, limits, _MSG_TOPIC),
        signature=message.get_bytes(_MSG_SIGNATURE),
        key=message.get_bytes(_MSG_KEY),
    )
    object.__setattr__(decoded, "_wire", data)
    return decoded


def _decode_subopts(data: bytes, limits: RpcLimits) -> SubOpts:
    message = _decode(data, 2 + _UNKNOWN_FIELD_SLACK, "SubOpts")
    return SubOpts(
        bool(message.get_uint(_SUB_SUBSCRIBE)),
        _topic(message.get_bytes(_SUB_TOPIC), limits, _SUB_TOPIC),
    )


def decode_rpc(data: BytesLike, limits: RpcLimits = DEFAULT_RPC_LIMITS) -> RPC:
    """Decode one RPC protobuf body (without its length prefix).

    Raises:
        RemoteProtocolError: malformed, or any of ``limits`` exceeded.
    """
    if len(data) > limits.max_rpc_size:
        raise RemoteProtocolError(f"RPC of {len(data)} bytes exceeds {limits.max_rpc_size}")
    raw = bytes(data)
    max_fields = limits.max_subscriptions + limits.max_messages + 1 + _UNKNOWN_FIELD_SLACK
    message = _decode(raw, max_fields, "RPC")
    subscriptions = tuple(
        _decode_subopts(item, limits)
        for item in message.get_repeated_bytes(
            _RPC_SUBSCRIPTIONS, max_count=limits.max_subscriptions
        )
    )
    publish = tuple(
        _decode_message(item, limits)
        for item in message.get_repeated_bytes(_RPC_PUBLISH, max_count=limits.max_messages)
    )
    control_raw = message.get_bytes(_RPC_CONTROL)
    control = None if control_raw is None else _decode_control(control_raw, limits)
    return RPC(subscriptions, publish, control)
