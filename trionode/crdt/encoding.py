"""Canonical bytes for entity records and values, and their validating decoders.

An encoded record is a msgpack array

    [FORMAT_VERSION, parent, name, kind, added, removed, body]

where a stamp is `[time, node]` and `body` is nil (⊥) or, by kind,
REGISTER `[stamp, value]`, COUNTER `[[writer, since, inc, dec], ...]` sorted by writer,
TEXT/VECTOR `[writers, [[time, w, after time, after w, length, live values, deleted,
updated], ...]]`: runs of consecutive ids sorted by first id, with writer ids interned and
deleted/overwritten spans as `[offset, count, time, w]` groups (see `SequenceState.wire`;
at most `MAX_SEQUENCE_ELEMENTS` elements per record). The entity id is
not encoded: it is derived from (parent, name), so a record cannot misplace itself.

Equal records encode to identical bytes (see `canonical.py`). `decode_entity` accepts only
that canonical shape (sorted, no duplicates, no empty body) and raises
`RemoteProtocolError` for anything else, so the store layer can persist
`entity_id -> encode_entity(record)` and a peer's bytes are checked the same way.

`own_form` is what an entity contributes to its Merkle hash: kind, name, `added` and the
body *as seen under the floor*, without tombstones. So GC, which only drops tombstones and
hidden data, never changes a hash.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, Final, Generic, TypeVar

import msgspec

from trionode.crdt.canonical import canonical
from trionode.crdt.counter import U64_MAX, CounterState, Slot
from trionode.crdt.entity import Body, Entity, Kind
from trionode.crdt.errors import SchemaError
from trionode.crdt.hlc import MAX_NODE_ID_BYTES, NTP64_MAX, Timestamp
from trionode.crdt.register import RegisterState
from trionode.crdt.sequence import (
    HEAD,
    Group,
    RunSpec,
    SequenceState,
    TextState,
    VectorState,
    WireRun,
)
from trionode.errors import RemoteProtocolError

FORMAT_VERSION: Final = 1
JOURNAL_VERSION: Final = 4
"""Journal rows of a Text/Vector (`rows.py`) are `[4, added time, added writer#, removed,
body]`: the record's parent, name and kind are its base row's, and the writer of `added`
is an index into the body's own writer list (a keystroke's delta names its writer there
already, so the row no longer holds that id twice: 32 bytes of a 32-byte member id). A
delta whose `added` writer is not in its body's list (or that has no body) is written as
version 2, `[2, added, removed, body]`, which still loads, as do version 1 rows (whole
records, `encode_entity`, which starts with FORMAT_VERSION 1). (Version 3 is the base
row's, `compact.ROW_VERSION`.)"""
_JOURNAL_V2: Final = 2
_JOURNAL_HEAD: Final = bytes([0x95, JOURNAL_VERSION])  # fixarray of 5, then the version
MAX_ENTITY_BYTES: Final = 4 * 1024 * 1024
"""Largest encoded record we accept: comfortably inside one 8 MiB frame."""
MAX_SEQUENCE_ELEMENTS: Final = MAX_ENTITY_BYTES // 8
"""Most elements one Text/Vector record may expand to. Runs store deleted elements as a
count, so without this a few bytes could claim millions of tombstones."""
MAX_BATCH_ELEMENTS: Final = 1 << 20
"""Most sequence elements the records of one delta or page may expand to together (about
what 8 MiB of records could hold one element per row before runs)."""

T = TypeVar("T")

_Stamp = Timestamp | None
_RecordWire = tuple[int, bytes, bytes, int, _Stamp, _Stamp, msgspec.Raw]
_RegisterWire = tuple[Timestamp, bytes] | None
_CounterWire = list[tuple[bytes, Timestamp, int, int]] | None
_Writers = list[Annotated[bytes, msgspec.Meta(max_length=MAX_NODE_ID_BYTES)]]
_Groups = list[tuple[int, int, int, int]]
_TextWire = tuple[_Writers, list[tuple[int, int, int, int, int, str, _Groups, _Groups]]]
_VectorWire = tuple[_Writers, list[tuple[int, int, int, int, int, list[bytes], _Groups, _Groups]]]

_JournalWire = tuple[int, _Stamp, _Stamp, msgspec.Raw]
_record_decoder: Final = msgspec.msgpack.Decoder(_RecordWire)
_KINDS: Final = {int(kind): kind for kind in Kind}
_journal_decoder: Final = msgspec.msgpack.Decoder(_JournalWire)
_journal4_decoder: Final = msgspec.msgpack.Decoder(tuple[int, int, int, _Stamp, msgspec.Raw])
_body_writers_decoder: Final = msgspec.msgpack.Decoder(tuple[_Writers, msgspec.Raw])
_register_decoder: Final = msgspec.msgpack.Decoder(_RegisterWire)
_plain_decoder: Final = msgspec.msgpack.Decoder(
    tuple[int, bytes, bytes, int, _Stamp, _Stamp, _RegisterWire]
)
"""A record whose body is a register's or nil, in one pass (`_decode_plain`)."""
_counter_decoder: Final = msgspec.msgpack.Decoder(_CounterWire)
_text_decoder: Final = msgspec.msgpack.Decoder(_TextWire | None)
_vector_decoder: Final = msgspec.msgpack.Decoder(_VectorWire | None)
_NIL: Final = b"\xc0"

ROOT_FORM: Final = canonical((int(Kind.OBJECT), b"", None, None))
"""The root entity's own hash form (it holds no state)."""


# -- records ---------------------------------------------------------------------------


def encode_entity(entity: Entity) -> bytes:
    """Canonical bytes of a record (the inverse of `decode_entity`)."""
    return canonical(
        (
            FORMAT_VERSION,
            entity.parent,
            entity.name,
            int(entity.kind),
            entity.added,
            entity.removed,
            msgspec.Raw(_body_wire(entity.body)),
        )
    )


def _body_wire(body: Body | None) -> bytes:
    if body is None:
        return _NIL
    return body.canonical()


def decode_entity(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = MAX_ENTITY_BYTES,
    max_elements: int = MAX_SEQUENCE_ELEMENTS,
) -> Entity:
    """Decode and validate one record (a Text/Vector of at most `max_elements`).

    Raises:
        RemoteProtocolError: oversized, malformed or non-canonical bytes.
    """
    if len(data) > max_size:
        raise RemoteProtocolError(f"entity record of {len(data)} bytes exceeds {max_size}")
    plain = _decode_plain(data)
    return plain if plain is not None else _decode_general(data, max_elements)


def _decode_general(data: bytes | bytearray | memoryview, max_elements: int) -> Entity:
    """Any record, or RemoteProtocolError (its size is checked already)."""
    try:
        version, parent, name, kind_value, added, removed, raw = _record_decoder.decode(data)
        _check_version(version)
        kind = _kind(kind_value)
        _check_stamp(added)
        _check_stamp(removed)
        body = _decode_body(kind, bytes(raw), min(max_elements, MAX_SEQUENCE_ELEMENTS))
        return Entity(parent, name, kind, added=added, removed=removed, body=body)
    except (msgspec.DecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"bad entity record: {exc}") from exc
    except RecursionError as exc:  # msgspec skipping a deeply nested body as Raw
        raise RemoteProtocolError("bad entity record: nested too deeply") from exc


def _decode_plain(data: bytes | bytearray | memoryview) -> Entity | None:
    """The record if it is a register or has no body (most records), in one decode and with
    the same checks as the general path; None for anything else (another body, or bytes
    that do not decode), which the general path then decodes or refuses with its own
    error. Half the time of the general path's two decodes for a `kv_store` entry."""
    try:
        version, parent, name, kind_value, added, removed, reg = _plain_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    kind = _KINDS.get(kind_value)
    if (
        version != FORMAT_VERSION
        or kind is None
        or (reg is not None and kind is not Kind.REGISTER)
        or (added is not None and not 0 <= added.time <= NTP64_MAX)
        or (removed is not None and not 0 <= removed.time <= NTP64_MAX)
        or (reg is not None and not 0 <= reg[0].time <= NTP64_MAX)
    ):
        return None
    try:
        return Entity(
            parent,
            name,
            kind,
            added=added,
            removed=removed,
            body=None if reg is None else RegisterState(reg[0], reg[1]),
        )
    except ValueError:
        return None


def encode_journal(delta: Entity) -> bytes:
    """A journal row: `delta`'s stamps and body, without what its base row already says
    (see `JOURNAL_VERSION`)."""
    added = delta.added
    body = delta.body
    if added is not None and isinstance(body, SequenceState) and not body.is_empty():
        writers, runs = body.wire()
        k = bisect_left(writers, added.node)
        if k < len(writers) and writers[k] == added.node:
            return canonical((JOURNAL_VERSION, added.time, k, delta.removed, (writers, runs)))
    return canonical((_JOURNAL_V2, added, delta.removed, msgspec.Raw(_body_wire(body))))


def decode_journal(
    data: bytes | bytearray | memoryview, base: Entity, *, max_size: int = MAX_ENTITY_BYTES
) -> Entity:
    """A journal row (any version) of the entity whose base record is `base`.

    Raises:
        RemoteProtocolError: oversized, malformed or non-canonical bytes.
        ValueError: a version 1 row that holds another entity's record.
    """
    if len(data) > max_size:
        raise RemoteProtocolError(f"journal row of {len(data)} bytes exceeds {max_size}")
    version2: tuple[int, Timestamp | None, Timestamp | None, msgspec.Raw] | None = None
    if data[:2] != _JOURNAL_HEAD:
        try:
            version2 = _journal_decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError):
            entity = decode_entity(data, max_size=max_size)  # version 1: a whole record
            if entity.id != base.id:
                raise ValueError("journal row holds another entity's record") from None
            return entity
    try:
        if version2 is None:  # version 4
            _, time, writer, removed, raw = _journal4_decoder.decode(data)
            writers, _ = _body_writers_decoder.decode(raw)  # (the body is checked below)
            added: Timestamp | None = Timestamp(time, _listed(writers, writer))
        else:
            version, added, removed, raw = version2
            _check_journal_version(version)
        _check_stamp(added)
        _check_stamp(removed)
        body = _decode_body(base.kind, bytes(raw), MAX_SEQUENCE_ELEMENTS)
        return Entity(
            base.parent,
            base.name,
            base.kind,
            added=added,
            removed=removed,
            body=body,
            known_id=base.id,
        )
    except (msgspec.DecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"bad journal row: {exc}") from exc
    except RecursionError as exc:
        raise RemoteProtocolError("bad journal row: nested too deeply") from exc


def _check_journal_version(version: int) -> None:
    if version != _JOURNAL_V2:  # (version 4 rows are told apart by their first bytes)
        raise ValueError(f"unknown journal row version {version}")


def _listed(writers: list[bytes], index: int) -> bytes:
    if not 0 <= index < len(writers):
        raise ValueError("journal row names a writer its body does not list")
    return writers[index]


def decode_entities(
    records: Iterable[bytes | bytearray | memoryview], *, max_elements: int = MAX_BATCH_ELEMENTS
) -> list[Entity]:
    """Decode the records of one delta or page, all their Text/Vector elements together
    within `max_elements` (so many tiny records cannot each claim a huge tombstone run).

    Raises:
        RemoteProtocolError: a bad record, or the batch expands beyond the budget.
    """
    out: list[Entity] = []
    left = max_elements
    for data in records:
        entity = decode_entity(data, max_elements=left)
        if isinstance(entity.body, SequenceState):
            left -= entity.body.element_count()
        out.append(entity)
    return out


def _not_nil(value: T | None) -> T:
    if value is None:  # only reachable through a non-canonical nil
        raise ValueError("body must be nil or a value")
    return value


def _kind(value: int) -> Kind:
    """A dict lookup: an enum call per record costs more (a snapshot decodes millions)."""
    kind = _KINDS.get(value)
    if kind is None:
        raise ValueError(f"{value} is not a valid Kind")
    return kind


def _check_version(version: int) -> None:
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown entity format version {version}")


def _decode_body(kind: Kind, raw: bytes, max_elements: int) -> Body | None:
    if raw == _NIL:
        return None
    if kind is Kind.REGISTER:
        reg = _not_nil(_register_decoder.decode(raw))
        _check_stamp(reg[0])
        return RegisterState(reg[0], reg[1])
    if kind is Kind.COUNTER:
        return _decode_counter(raw)
    if kind is Kind.TEXT:
        return _decode_text(raw, max_elements)
    if kind is Kind.VECTOR:
        return _decode_vector(raw, max_elements)
    raise ValueError(f"{kind.name} entity cannot have a body")


def _decode_counter(raw: bytes) -> CounterState:
    rows = _counter_decoder.decode(raw)
    if not rows:
        raise ValueError("empty counter body must be nil")
    slots: dict[bytes, Slot] = {}
    previous = b""
    for writer, since, inc, dec in rows:
        if not writer or writer <= previous:
            raise ValueError("counter slots must be sorted by non-empty writer, no repeats")
        _check_stamp(since)
        if not (0 <= inc <= U64_MAX and 0 <= dec <= U64_MAX):
            raise ValueError("counter slot out of range")
        slots[writer] = Slot(since, inc, dec)
        previous = writer
    return CounterState(slots)


def _decode_text(raw: bytes, max_elements: int) -> TextState:
    writers, rows = _not_nil(_text_decoder.decode(raw))
    return TextState.from_runs(_runs(writers, rows, text=True, budget=max_elements))


def _decode_vector(raw: bytes, max_elements: int) -> VectorState:
    writers, rows = _not_nil(_vector_decoder.decode(raw))
    return VectorState.from_runs(_runs(writers, rows, text=False, budget=max_elements))


def _runs(
    writers: list[bytes], runs: Sequence[WireRun[Any]], *, text: bool, budget: int
) -> list[RunSpec]:
    """Check the run form (see `SequenceState.wire`) run by run, insisting on the
    canonical shape and on at most `budget` elements; the runs for
    `SequenceState.from_runs`. Element by element only inside a run with deletes or
    value stamps."""
    if not runs:
        raise ValueError("empty sequence body must be nil")
    if any(a >= b for a, b in itertools.pairwise(writers)):
        raise ValueError("sequence writers must be sorted, no repeats")
    used = [False] * len(writers)

    def unpack(time: int, writer: int) -> Timestamp:
        if not 0 <= writer < len(writers):
            raise ValueError("writer index out of range")
        used[writer] = True
        stamp = Timestamp(time, writers[writer])
        _check_stamp(stamp)
        return stamp

    out: list[RunSpec] = []
    ends: dict[bytes, int] = {}
    """Per writer, the id time just past its last run (runs come sorted by first id)."""
    previous = HEAD
    for time, writer, after_time, after_writer, length, values, deleted, updated in runs:
        first = unpack(time, writer)
        if first <= previous:
            raise ValueError("runs must be sorted by first id, no repeats, none is HEAD")
        previous = first
        if not 1 <= length <= budget:
            raise ValueError(f"run length {length} out of range (at most {budget} elements left)")
        budget -= length
        _check_stamp(Timestamp(time + length - 1, b""))
        gone = _spans(deleted, length, unpack) if deleted else None
        if text and updated:
            raise ValueError("text elements carry no value stamps")
        changed = _spans(updated, length, unpack) if updated else None
        if (
            gone is not None
            and changed is not None
            and any(gone[k] is not None and changed[k] is not None for k in range(length))
        ):
            raise ValueError("a deleted element keeps no value stamp")
        dead = 0 if gone is None else length - gone.count(None)
        if len(values) != length - dead:
            raise ValueError("a run holds one value per live element")
        after = unpack(after_time, after_writer)
        node = first.node
        end = ends.get(node)
        if end is not None:  # this writer's runs so far end below `end`, in order
            if time < end:
                raise ValueError("runs overlap")
            if end == time and after == Timestamp(time - 1, node):
                raise ValueError("a run continues another one: runs must be maximal")
        ends[node] = time + length
        out.append((node, time, after, values, gone, changed))
    if not all(used):
        raise ValueError("sequence lists a writer it does not use")
    return out


def _spans(
    groups: Sequence[Group], length: int, unpack: Callable[[int, int], Timestamp]
) -> list[Timestamp | None]:
    """Per-element stamps from sorted, non-overlapping, maximal `(offset, count, time,
    writer#)` groups over a run of `length` elements."""
    stamps: list[Timestamp | None] = [None] * length
    end = 0
    last: tuple[int, Timestamp] | None = None
    for offset, count, time, writer in groups:
        if offset < end or count < 1 or offset + count > length:
            raise ValueError("stamp groups must be sorted, non-overlapping and inside the run")
        stamp = unpack(time, writer)
        if last is not None and last == (offset, stamp):
            raise ValueError("adjacent stamp groups with one stamp must be merged")
        stamps[offset : offset + count] = [stamp] * count
        end = offset + count
        last = (end, stamp)
    return stamps


def _check_stamp(stamp: Timestamp | None) -> None:
    if stamp is not None and not 0 <= stamp.time <= NTP64_MAX:
        raise ValueError("stamp time out of range")


# -- hash forms ------------------------------------------------------------------------


def own_form(entity: Entity, floor: Timestamp | None) -> bytes:
    """The bytes an entity's own state contributes to its Merkle hash, seen under `floor`
    (its own and its ancestors' latest removal)."""
    body = entity.body
    form: object = None
    if isinstance(body, RegisterState | SequenceState):
        form = body.hash_form(floor)
    elif isinstance(body, CounterState):
        form = body.hash_form(floor) or None
    return canonical((int(entity.kind), entity.name, entity.added, form))


# -- values ----------------------------------------------------------------------------


_SCALARS: Final = (int, str, bytes, float, bool)
_ENCODER: Final = msgspec.msgpack.Encoder(order="deterministic")
"""Canonical msgpack (`ValueCodec`)."""
_encode: Final[Callable[[object], bytes]] = _ENCODER.encode


class ValueCodec(Generic[T]):
    """Canonical msgpack for user values and keys of one declared type.

    `encode` checks the value round-trips as the declared type, so nothing is stored that a
    reader of that type could not decode, and dict keys are sorted so equal values give
    equal bytes (and equal map keys give equal entity ids).
    """

    __slots__ = ("_decoder", "_scalar", "type")

    _encoder: Final = _ENCODER

    def __init__(self, tp: type[T] | Any) -> None:
        self.type: Any = tp
        self._decoder: Callable[[bytes], T] = msgspec.msgpack.Decoder(tp).decode
        self._scalar: type | None = tp if tp in _SCALARS else None
        """The declared type when it is a scalar: a value of exactly that type that
        encodes always decodes as it (no round trip to check)."""

    def encode(self, value: T) -> bytes:
        if type(value) is self._scalar:
            # (the module's encoder, not `self._encoder`: a class attribute read through an
            # instance is not specialised on Python 3.11, and this runs per write)
            return _encode(value)  # (raises as below: no decode error)
        try:
            data = self._encoder.encode(value)
            self._decoder(data)
        except (msgspec.DecodeError, UnicodeDecodeError, TypeError) as exc:
            raise TypeError(f"{value!r} is not a valid {self.type!r}: {exc}") from exc
        return data

    def decode(self, data: bytes) -> T:
        try:
            return self._decoder(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise SchemaError(f"stored value is not a valid {self.type!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"ValueCodec({self.type!r})"
