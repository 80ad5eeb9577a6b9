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
from trionode.wire.shared_batch import Parts, Shared

MAX_FRAME: Final = 8 * 1024 * 1024
MAX_GOSSIP: Final = 4 * 1024 * 1024
MAX_IDS: Final = 256
_LENGTH = struct.Struct(">I")

Id32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Ids = Annotated[list[Id32], msgspec.Meta(max_length=MAX_IDS)]


# -- gossip --------------------------------------------------------------------------------


class TopicDelta(msgspec.Struct, tag=1, array_like=True, frozen=True, forbid_unknown_fields=True):
    """A new delta of the topic's context, as its author published it: how one delta is
    gossiped (`DeltaGossip`, the map this replaced, is still decoded). A two-element
    array, the tag and the delta: no context id, because the topic names the context and
    the delta's own check binds it there (its signature, or in formats before 4 its
    header, names the context: a delta of another context published on this topic is
    rejected as invalid), and no field names. 5 bytes of framing around a ~400-byte delta
    where the map took 66 (issue #16)."""

    delta: bytes
    """SignedDelta wire bytes."""


class DeltaGossip(msgspec.Struct, tag="delta", frozen=True, forbid_unknown_fields=True):
    """A new delta, as nodes before `TopicDelta` publish it (decoded, no longer sent)."""

    context_id: Id32
    delta: bytes
    """SignedDelta wire bytes."""


MAX_GOSSIP_DELTAS: Final = 64
"""Deltas one `DeltaBatch` may carry."""


class DeltaBatch(msgspec.Struct, tag="deltas/1", frozen=True, forbid_unknown_fields=True):
    """Several new deltas of one context in one message, in the order they were committed:
    one pubsub signature (StrictSign) for all of them. Version 1 (in the tag: a changed
    layout gets a new tag, and nodes without it reject the message as malformed)."""

    context_id: Id32
    deltas: Annotated[list[bytes], msgspec.Meta(min_length=1, max_length=MAX_GOSSIP_DELTAS)]
    """SignedDelta wire bytes."""


class SharedDeltaBatch(msgspec.Struct, tag="deltas/2", frozen=True, forbid_unknown_fields=True):
    """A `DeltaBatch` whose deltas share the 32-byte values they repeat (their authors'
    keys, an earlier delta's id as a parent): `trionode/wire/shared_batch.py`. Nodes
    without this tag reject it as malformed, as with every changed layout."""

    context_id: Id32
    shared: Shared
    deltas: Annotated[list[Parts], msgspec.Meta(min_length=1, max_length=MAX_GOSSIP_DELTAS)]


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True, forbid_unknown_fields=True):
    """What a member has: lets peers that missed gossip notice and sync."""

    context_id: Id32
    heads: Ids
    root_hash: Id32


class AckGossip(msgspec.Struct, tag="ack", frozen=True, forbid_unknown_fields=True):
    """An admin's signed finality ack (trionode/auth/acks.py)."""

    context_id: Id32
    ack: bytes


_MapGossip = DeltaGossip | DeltaBatch | SharedDeltaBatch | Heartbeat | AckGossip
Gossip = TopicDelta | _MapGossip

_ENCODER = msgspec.msgpack.Encoder()
_GOSSIP = msgspec.msgpack.Decoder(_MapGossip)
_ARRAY_GOSSIP = msgspec.msgpack.Decoder(TopicDelta)
_ARRAY_HEADS: Final = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
"""First bytes of a msgpack array: the gossip messages encoded as arrays (`TopicDelta`);
every other one is a map. (msgspec takes array-like and map-like structs in separate
unions, so the first byte picks the decoder.)"""


def encode_gossip(message: Gossip) -> bytes:
    data = _ENCODER.encode(message)
    if len(data) > MAX_GOSSIP:
        raise LocalProtocolError(f"gossip message of {len(data)} bytes exceeds {MAX_GOSSIP}")
    return data


def decode_gossip(data: bytes) -> Gossip:
    if len(data) > MAX_GOSSIP:
        raise RemoteProtocolError(f"gossip message of {len(data)} bytes exceeds {MAX_GOSSIP}")
    try:
        message: Gossip = (
            _ARRAY_GOSSIP.decode(data)
            if data[:1] and data[0] in _ARRAY_HEADS
            else _GOSSIP.decode(data)
        )
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:  # (bad UTF-8)
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

    heads: Ids = []
    """The requester's heads: the answer says which of them the responder has applied."""


class HeadsResponse(msgspec.Struct, tag="heads", frozen=True, forbid_unknown_fields=True):
    heads: Ids
    root_hash: Id32
    known: Ids = []
    """Those of the request's heads the responder has applied (read with `heads`): one that
    is not among `heads` lies below them, so it is no head of the union."""


MAX_ANCESTORS: Final = 4096
"""Ancestors one delta answer may carry besides the deltas asked for (`/trionode/sync/2`)."""

MAX_HAVE: Final = 4096
"""Authors in a request's version vector (as many as one delta's may name)."""

Tag8 = Annotated[bytes, msgspec.Meta(min_length=8, max_length=8)]
Vv = Annotated[
    list[tuple[Tag8, Annotated[int, msgspec.Meta(ge=1, le=(1 << 63) - 1)]]],
    msgspec.Meta(max_length=MAX_HAVE),
]
"""A version vector: (author tag, highest seq)."""


class DeltaRequest(
    msgspec.Struct, tag="get_deltas", frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    ids: Ids
    ancestors: Annotated[int, msgspec.Meta(ge=0, le=MAX_ANCESTORS)] = 0
    """`/trionode/sync/2`: also send up to this many ancestors of the deltas asked for that
    `have` does not cover, parents first, so a chain travels in one answer, not one round
    trip per delta. (Omitted when 0: the frame is then the one sync/1 peers know.)"""
    have: Vv = []
    """The requester's version vector (of its heads): an ancestor whose author's seq it
    covers is not sent. A hint only; what still lacks a parent is asked for again."""


class DeltaResponse(
    msgspec.Struct, tag="deltas", frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    deltas: Annotated[list[bytes], msgspec.Meta(max_length=MAX_IDS)]
    missing: Ids
    """Requested ids the responder does not have (it says so instead of staying silent)."""
    later: Ids = []
    """Requested ids the responder has but left out so the answer fits one frame: ask
    again. (Omitted when empty, so the frame is the same as before the field existed.)"""
    folded: Ids = []
    """Requested ids the responder folded into its final state (final there, bodies gone:
    context/folding.py): no peer that folded them can send them; their effects travel as
    final state. A claim, not proof: the requester believes only its own finality."""
    ancestors: Annotated[list[bytes], msgspec.Meta(max_length=MAX_ANCESTORS)] = []
    """Ancestors of the deltas sent that the request's `have` does not cover, each before
    its children (SignedDelta wire bytes): applied before `deltas`."""


class SyncError(msgspec.Struct, tag="error", frozen=True, forbid_unknown_fields=True):
    message: Annotated[str, msgspec.Meta(max_length=1024)]


# -- state-based sync: snapshot and tree comparison (trionode.context.snapshot / treecmp) --

MAX_RECORD: Final = 4 * 1024 * 1024
"""Largest entity record on the wire (`trionode.crdt.MAX_ENTITY_BYTES`)."""
MAX_PAGE_RECORDS: Final = 4096
MAX_NODE_CHILDREN: Final = 16384
"""Children listed per node in one reply (a bigger node is listed in pages)."""

Record = Annotated[bytes, msgspec.Meta(max_length=MAX_RECORD)]
Records = Annotated[list[Record], msgspec.Meta(max_length=MAX_PAGE_RECORDS)]


class ProofRequest(msgspec.Struct, tag="get_proof", frozen=True, forbid_unknown_fields=True):
    """Before trusting state from the responder, the requester asks who it is."""


class PeerProof(msgspec.Struct, tag="proof", frozen=True, forbid_unknown_fields=True):
    """The responder's member key signs the Noise handshake hash under its own domain
    (so a requester's `SyncAuth` cannot be reflected back as a proof)."""

    member: Id32
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


class SnapshotRequest(msgspec.Struct, tag="get_snapshot", frozen=True, forbid_unknown_fields=True):
    """The next page of entity records, in id order, after `cursor` (None: from the start)."""

    cursor: Id32 | None
    max_records: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE_RECORDS)]
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_FRAME // 2)]


class SnapshotPage(msgspec.Struct, tag="snapshot", frozen=True, forbid_unknown_fields=True):
    records: Records
    next_cursor: Id32 | None
    """Where the next page starts (None: this was the last page)."""
    heads: Ids
    root_hash: Id32
    """The responder's heads and root when it read this page (under its context lock)."""


MAX_SNAPSHOT_WINDOW: Final = 64
"""Pages a streamed snapshot may have in flight (sent, not yet credited back)."""
MAX_CERTIFICATE: Final = 256
"""Entries in a snapshot's finality certificate (one per AckSet member)."""
MAX_CERTIFICATE_ENTRY: Final = 512 * 1024
"""A signed ack (`trionode.auth.acks.MAX_ACK_BYTES`) or a signed membership operation."""


class SnapshotOpen(msgspec.Struct, tag="open_snapshot", frozen=True, forbid_unknown_fields=True):
    """Stream the final state from `cursor` (None: from the start): the responder sends a
    `SnapshotBegin`, then `SnapshotChunk`s ahead of the requester, at most `window` of them
    not yet credited back (`SnapshotCredit`), until the last; then the requester closes the
    stream of pages (`SnapshotClose`) and the session goes on (trionode.sync.snapshot)."""

    cursor: Id32 | None
    window: Annotated[int, msgspec.Meta(ge=1, le=MAX_SNAPSHOT_WINDOW)]
    max_records: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE_RECORDS)]
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_FRAME // 2)]
    root_hash: Id32 | None = None
    """The root of the state `cursor` was read from: if the responder's has moved on since,
    it starts from the first record instead (and `SnapshotBegin.cursor` says so)."""
    heads: Ids | None = None
    """With a cursor and no root (the stream was cut before its late root came): the
    boundary the pages up to `cursor` stood for. A responder whose boundary is still that
    continues after the cursor, with the root of the whole state last again."""


class SnapshotBegin(msgspec.Struct, tag="snapshot_begin", frozen=True, forbid_unknown_fields=True):
    """The boundary the pages stand for, read with the first page."""

    heads: Ids
    """The checkpoints the requester adopts (each final where the responder is)."""
    root_hash: Id32 | None
    """The root hash of the final state the pages add up to; None: it comes with the last
    page (`SnapshotChunk.root_hash`), as the responder streams while it builds that state."""
    entries: Annotated[int, msgspec.Meta(ge=0)]
    """Records in that state (for progress: the pages carry them in id order; an estimate
    when the root comes last)."""
    certificate: Annotated[
        list[Annotated[bytes, msgspec.Meta(max_length=MAX_CERTIFICATE_ENTRY)]],
        msgspec.Meta(max_length=MAX_CERTIFICATE),
    ] = []
    """Finality certificate: each AckSet member's latest signed ack, or its latest signed
    membership operation (whose version vector acknowledges its past)."""
    cursor: Id32 | None = None
    """Where the pages start: the requested cursor, or None (from the first record)."""


class SnapshotWait(msgspec.Struct, tag="snapshot_wait", frozen=True, forbid_unknown_fields=True):
    """The responder is still preparing the snapshot (its final state, before the first
    page): the requester keeps waiting. Sent every `sync.snapshot_keepalive` seconds until
    `SnapshotBegin`, so a large state never trips the deadline between messages; the
    requester bounds the whole wait (`sync.snapshot_prepare_timeout`)."""


class SnapshotChunk(msgspec.Struct, tag="snapshot_chunk", frozen=True, forbid_unknown_fields=True):
    records: Records
    next_cursor: Id32 | None
    """The id of this page's last record (None: this was the last page)."""
    root_hash: Id32 | None = None
    """On the last page of a stream whose `SnapshotBegin` had no root, and only there: the
    root hash of every record the stream carried."""


class SnapshotCredit(
    msgspec.Struct, tag="snapshot_credit", frozen=True, forbid_unknown_fields=True
):
    """The requester stored (or dropped) `pages` more pages: the responder may send as many."""

    pages: Annotated[int, msgspec.Meta(ge=1, le=MAX_SNAPSHOT_WINDOW)]


class SnapshotClose(msgspec.Struct, tag="snapshot_close", frozen=True, forbid_unknown_fields=True):
    """The requester wants no more pages (it has the last, or gives up): back to requests."""


Frontier = Annotated[
    list[tuple[Annotated[bytes, msgspec.Meta(max_length=64)], Annotated[int, msgspec.Meta(ge=0)]]],
    msgspec.Meta(max_length=4096),
]
"""A final frontier (FF): (author tag, highest final sequence number), by tag."""
Acks = Annotated[
    list[Annotated[bytes, msgspec.Meta(max_length=128 * 1024)]], msgspec.Meta(max_length=MAX_IDS)
]
"""Signed finality acks (`trionode.auth.acks`), exchanged when two final frontiers differ."""


class TreeStart(msgspec.Struct, tag="tree_start", frozen=True, forbid_unknown_fields=True):
    """Open a tree comparison of final state (`trionode.sync.treecmp`): the requester's
    final boundary (the checkpoints its final state stands for: the responder adopts them
    at the end), and its final frontier."""

    heads: Ids
    known: Ids
    frontier: Frontier = []
    acks: Acks = []
    """The requester's signed acks: the responder takes them if the frontiers differ."""


class TreeStarted(msgspec.Struct, tag="tree_started", frozen=True, forbid_unknown_fields=True):
    """The responder's final boundary, which of the requester's it has applied, its final
    root and final frontier, read together."""

    heads: Ids
    known: Ids
    root_hash: Id32
    frontier: Frontier = []
    acks: Acks = []
    """The responder's signed acks, when the frontiers differ (none when they are equal)."""


class NodeQuery(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    id: Id32
    after: Id32 | None = None
    """List only children with ids above this one (the next page of a big node)."""


class NodeRequest(msgspec.Struct, tag="get_nodes", frozen=True, forbid_unknown_fields=True):
    queries: Annotated[list[NodeQuery], msgspec.Meta(min_length=1, max_length=MAX_IDS)]


class TreeNode(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    id: Id32
    record: Record | None
    """The entity record (None for the root, or an id the responder does not hold)."""
    hash: Id32 | None
    """Its Merkle hash (None: hidden, so not part of the root hash)."""
    children: Annotated[list[tuple[Id32, Id32 | None]], msgspec.Meta(max_length=MAX_NODE_CHILDREN)]
    """(child id, hash or None if hidden), in id order."""
    more: bool
    """More children follow: ask again with `after` = the last child listed."""


class NodeResponse(msgspec.Struct, tag="nodes", frozen=True, forbid_unknown_fields=True):
    """Answers to a prefix of the queries, in order (ask again for the rest)."""

    nodes: Annotated[list[TreeNode], msgspec.Meta(max_length=MAX_IDS)]


class EntityPush(msgspec.Struct, tag="push", frozen=True, forbid_unknown_fields=True):
    """Records the requester holds and the responder lacks (or holds older versions of)."""

    records: Records


class PushAck(msgspec.Struct, tag="pushed", frozen=True, forbid_unknown_fields=True):
    changed: Annotated[int, msgspec.Meta(ge=0)]
    refused: Annotated[int, msgspec.Meta(ge=0)]


MAX_AUTH_OPS: Final = 4096
VvEntry = tuple[Id32, Annotated[bytes, msgspec.Meta(max_length=128 * 1024)]]
AuthOps = Annotated[
    list[Annotated[bytes, msgspec.Meta(max_length=256 * 1024)]],
    msgspec.Meta(max_length=MAX_AUTH_OPS),
]
VvEntries = Annotated[list[VvEntry], msgspec.Meta(max_length=MAX_IDS)]


class AuthRequest(msgspec.Struct, tag="get_auth", frozen=True, forbid_unknown_fields=True):
    """Before adopting the responder's `heads` as checkpoints (state arrived without their
    deltas), the requester asks for every membership operation in their past, as signed
    deltas it verifies itself, and for the heads' version vectors."""

    heads: Ids


class AuthResponse(msgspec.Struct, tag="auth_ops", frozen=True, forbid_unknown_fields=True):
    ops: AuthOps
    vvs: VvEntries
    """(head, encoded version vector) for the requested heads the responder knows."""


class TreeDone(msgspec.Struct, tag="tree_done", frozen=True, forbid_unknown_fields=True):
    """The requester walked the whole tree and pushed everything it had to; with the
    membership operations in the past of its heads and their version vectors (so the
    responder can adopt those heads, as `AuthResponse` does the other way)."""

    ops: AuthOps = []
    vvs: VvEntries = []


class TreeDoneAck(msgspec.Struct, tag="tree_done_ack", frozen=True, forbid_unknown_fields=True):
    adopted: bool
    """Whether the responder recorded the requester's heads (False if it refused records)."""
    heads: Ids
    root_hash: Id32


SyncMessage = (
    SyncAuth
    | HeadsRequest
    | HeadsResponse
    | DeltaRequest
    | DeltaResponse
    | SyncError
    | ProofRequest
    | PeerProof
    | SnapshotRequest
    | SnapshotPage
    | TreeStart
    | TreeStarted
    | NodeRequest
    | NodeResponse
    | EntityPush
    | PushAck
    | TreeDone
    | TreeDoneAck
    | AuthRequest
    | AuthResponse
    | SnapshotOpen
    | SnapshotBegin
    | SnapshotWait
    | SnapshotChunk
    | SnapshotCredit
    | SnapshotClose
)

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
        return decode_sync(whole[_LENGTH.size :])


def decode_sync(body: bytes | bytearray | memoryview) -> SyncMessage:
    """One sync frame's body (without its length prefix)."""
    try:
        message: SyncMessage = _SYNC.decode(body)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:  # (bad UTF-8)
        raise RemoteProtocolError(f"malformed sync message: {exc}") from None
    return message


# -- /trionode/heartbeat/1 -----------------------------------------------------------------

MAX_HEARTBEAT_FRAME: Final = 1024 * 1024
"""Largest heartbeat frame (a node with more contexts sends several frames)."""
MAX_HEARTBEAT_BEATS: Final = 4096
"""Contexts named in one heartbeat frame."""


class Beat(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One context's (heads, root) in a `HeartbeatBatch`: what a `Heartbeat` says."""

    context_id: Id32
    heads: Ids
    root_hash: Id32


class HeartbeatBatch(msgspec.Struct, tag="heartbeats/1", frozen=True, forbid_unknown_fields=True):
    """Every context a node shares with one peer, in one frame per heartbeat interval
    instead of one gossip message (and one StrictSign signature) per context."""

    beats: Annotated[list[Beat], msgspec.Meta(min_length=1, max_length=MAX_HEARTBEAT_BEATS)]


_HEARTBEATS = msgspec.msgpack.Decoder(HeartbeatBatch)


def encode_heartbeats(beats: list[Beat], *, max_frame: int = MAX_HEARTBEAT_FRAME) -> list[bytes]:
    """Frame bodies holding `beats`, each at most `max_frame` bytes and MAX_HEARTBEAT_BEATS
    beats (split where they would not fit)."""
    bodies: list[bytes] = []
    current: list[Beat] = []
    size = 16  # the batch's own tag and array header, generously
    for beat in beats:
        length = len(_ENCODER.encode(beat))
        if current and (size + length > max_frame or len(current) == MAX_HEARTBEAT_BEATS):
            bodies.append(_ENCODER.encode(HeartbeatBatch(current)))
            current, size = [], 16
        current.append(beat)
        size += length
    if current:
        bodies.append(_ENCODER.encode(HeartbeatBatch(current)))
    return bodies


def decode_heartbeats(body: bytes | bytearray | memoryview) -> HeartbeatBatch:
    """One heartbeat frame's body (RemoteProtocolError if it is not one)."""
    if len(body) > MAX_HEARTBEAT_FRAME:
        raise RemoteProtocolError(f"heartbeat frame of {len(body)} bytes exceeds the limit")
    try:
        return _HEARTBEATS.decode(body)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:  # (bad UTF-8)
        raise RemoteProtocolError(f"malformed heartbeats: {exc}") from None
