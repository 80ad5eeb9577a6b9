"""The synchronous LMDB datastore: one named sub-database per column.

Every public method is one LMDB transaction, so a batch of writes across columns commits
whole or not at all, and readers (MVCC snapshots) never block the writer. Methods block;
the async façade in `store.py` runs them in worker threads.

The delta column is stored in two B-trees (`_DeltaLog`): an index from each key (context ‖
delta id: random, as ids are hashes) to the value itself, if it is small (`INLINE_MAX`), or
else to an 8-byte sequence number, and the large values under those numbers in the order
they were first written. A B-tree that takes ~500-byte values at random keys keeps its pages
about 60% full (each split leaves two half pages); values appended in key order fill their
pages, so a log takes ~30% fewer pages (see `make bench --only bytes`), but a commit that
adds a delta then dirties two trees' paths instead of one: small values, a call's, stay
in the index. The rest of the node sees one column as before; a store written with one tree
is moved to two when opened (`_convert`, in one transaction).

An empty value is stored as it is, never sealed, in every column (there is nothing in it
to hide, and a sealed value is never empty, so the two cannot be confused). An empty delta
value (a folded delta or a checkpoint: its id stays, its body is gone) has no log row:
its index row holds an empty sequence number instead. Folding empties
most rows of an old context; replacing a value in place never merges LMDB pages, so empty
log rows kept the pages of the bodies they replaced (515 B per folded delta). Deleting
the row lets LMDB merge and reuse them.

Context ids in keys are stored as local numbers (`_ContextNumbers`): every state, delta,
base and checkpoint row's key starts with the 32-byte id of its context, which the store
keeps as a one-byte tag (a 4-byte number after a tag byte past 127 contexts) instead: 31
bytes less in each of the four rows a kv entry takes. Callers see the keys as they wrote them.

State values name 32-byte ids by short store-wide numbers (`_ValueRefs`): a state row
repeats its writer's key and its record's parent id, 68 of a kv entry's ~210 bytes; stored,
they take ~4. Callers read back the bytes they wrote.

Layouts (`store-layout` in the meta column): 1, one delta tree; 2, the index and the log
(`delta-layout` = 2 records this too, as builds before layout 3 read only that key); 3,
empty values as index markers; 4, context numbers in keys, in trees named `<column>@4`
(the conversion reads the old tree and writes the new one, then drops the old); 5, state
values with ids as numbers (every state value rewritten in place); 6, one-byte tags for
the first 127 contexts' numbers, in trees `<column>@6` (moved as for 4), and checkpoint
rows in the delta index (`_DeltaLog`); 7, delta values of up to `INLINE_MAX` bytes in their
index rows (`_DeltaLog`: rows of older layouts stay as they are, so moving a store from 6
to 7 writes the layout's number alone; a build of layout 6 would read an inline value as a
log number, hence the new number). Opening
converts an older store in one transaction; a store of a layout newer than
`STORE_LAYOUT` is refused with one line, so a build never misreads rows written by a
newer one.

Map growth: LMDB fails a write with MapFullError when the memory map is full. We then abort
that transaction, double the map (up to the configured maximum) and retry. Resizing needs
every other transaction of this process to be finished, so reads hold a shared lock and the
resize holds it exclusively.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, NamedTuple

import attrs
import lmdb

from trionode.errors import StorageError
from trionode.store import gil_free
from trionode.store.encryption import KdfParams, ValueCipher, create_verifier, open_verifier

_VERIFIER_KEY: Final = b"encryption-verifier"
_DELTA_LAYOUT_KEY: Final = b"delta-layout"
_DELTA_LAYOUT: Final = b"2"
"""1 (no record): the delta column is one B-tree; 2: an index and an append-ordered log.
Kept at 2 from layout 3 on: a build of layout 2 moves any other value to the log again."""
_STORE_LAYOUT_KEY: Final = b"store-layout"
STORE_LAYOUT: Final = 7
"""The newest layout this build reads and writes (see the module docstring)."""
_DELTA_LOG_DB: Final = b"delta-log"
_SEQ_BYTES: Final = 8
_MAX_KEY_SIZE: Final = 511  # LMDB's default compile-time limit
_CONTEXT_BYTES: Final = 32
_NUMBER_BYTES: Final = 4
_SHORT: Final = b"\x00"
"""Stored-key tag of a key too short to hold a context id after its prefix."""
_NUMBERED_TAG: Final = b"\x01"
"""Stored-key tag of a key whose context id is said by its number, in the next 4 bytes."""
_SMALL_TAG: Final = 0x80
"""Stored-key tags from here on say a context's number themselves (layout 6)."""
_SMALL_NUMBERS: Final = 0x80
_NUMBER_KEY: Final = b"context-number/"
"""meta: context-number/ ‖ context id → its number (4 bytes, big-endian)."""
_REF_KEY: Final = b"value-ref/"
"""meta: value-ref/ ‖ number (4 bytes) → a 32-byte id that state values refer to by that
number (sealed, bound to its key, in an encrypted store)."""
_PACKED: Final = 0xC1
"""First byte of every stored state value from layout 5 on that is not empty (msgpack
never uses it, so no row of an older layout starts with it: see `_ValueRefs`)."""
_ID_TOKEN: Final = b"\xc4\x20"
"""msgpack's header of a 32-byte byte string."""
_ID_BYTES: Final = 32
_TOKEN_BYTES: Final = len(_ID_TOKEN) + _ID_BYTES
DEFAULT_MAX_VALUE_REFS: Final = 65_536
"""Ids `_ValueRefs` numbers at most (see `store.max_value_refs`)."""


_ONE_BYTE: Final = tuple(bytes([i]) for i in range(0x80))
"""`_uvarint(i)` of each i below 0x80."""


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_uvarint(data: bytes, at: int) -> tuple[int, int]:
    """(value, next offset) of the varint at `at` (at most 4 bytes: StorageError past it)."""
    value = shift = 0
    for i in range(at, min(at + 4, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise StorageError("a stored state value is damaged (bad number)")


def _id_cuts(value: bytes) -> list[int]:
    """Offsets of the 32-byte ids a state value repeats from row to row: a version 3 row
    (`crdt/compact.py`: `[3, time, writer, [1, parent, ...]]`) names its writer and its
    record's parent (unless the root), a version 1 record (`[1, parent, ...]`, a joined
    record as received) its parent. Anything else (journal rows, odd bytes): none."""
    if value[_U64_WRITER : _U64_WRITER + 2] == _ID_TOKEN and value[:3] == _V3_U64_HEAD:
        # (Most rows: a local write's, its time a uint64. The same cuts as below, found
        # with no walk: every local write packs its state rows, issue #16.)
        head = value[_U64_RECORD] if len(value) > _U64_RECORD else 0
        if 0x90 <= head <= 0x9F:
            parent = _U64_RECORD + 2
            if value[parent - 1 : parent + 2] == _V1_PARENT and len(value) >= parent + _TOKEN_BYTES:
                return [_U64_WRITER, parent]
            return [_U64_WRITER]
    cuts: list[int] = []
    at = 0
    if value[:2] == b"\x94\x03":  # a version 3 row: the time, then the writer
        head = value[2] if len(value) > 2 else 0
        at = 3 + _INT_EXTRA.get(head, 0 if head <= 0x7F else -1)
        if at < 3 or value[at : at + 2] != _ID_TOKEN:
            return cuts
        cuts.append(at)
        at += _TOKEN_BYTES
    head = value[at] if len(value) > at else 0
    if 0x90 <= head <= 0x9F:  # the record: its version, then its parent
        at += 1
    elif head == 0xDC:
        at += 3
    else:
        return cuts
    if (
        value[at : at + 1] == b"\x01"
        and value[at + 1 : at + 3] == _ID_TOKEN
        and len(value) >= at + 1 + _TOKEN_BYTES
    ):
        cuts.append(at + 1)
    return cuts


_RECORD_HEAD: Final = b"\x97\x01" + _ID_TOKEN
"""A joined record as received (`crdt/encoding.py`: fixarray of 7, version 1) with its
parent's id next: `_id_cuts` finds that id, and only it, at offset 2."""
_RECORD_ID_END: Final = len(_RECORD_HEAD) + _ID_BYTES
_PACKED_HEADS: Final = tuple(bytes([_PACKED, n]) for n in range(3))
"""A packed value's head by its count of ids (`_id_cuts` finds at most two)."""
_UNSEEN: Final = b"-"
"""(`pack_many`: a parent not looked up yet; no packed head is this.)"""

_INT_EXTRA: Final = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
"""Bytes after the header of a msgpack unsigned integer, by header."""
_V3_U64_HEAD: Final = b"\x94\x03\xcf"
"""A version 3 row whose time is a uint64 (`_id_cuts`' quick case)."""
_U64_WRITER: Final = 3 + 8
"""Where such a row's writer token starts..."""
_U64_RECORD: Final = _U64_WRITER + _TOKEN_BYTES
"""...and its record's array header."""
_V1_PARENT: Final = b"\x01" + _ID_TOKEN
"""A record's version, then its parent's id token."""
_U64_PARENT: Final = _U64_RECORD + 2
"""Where such a row's record's parent token starts (after the array header and version)..."""
_U64_REST: Final = _U64_PARENT + _TOKEN_BYTES
"""...and what follows it."""
_U64_ONE_HEAD: Final = bytes([_PACKED, 1, _U64_WRITER])
_U64_TWO_HEAD: Final = bytes([_PACKED, 2, _U64_WRITER])
"""`pack`'s head of such a row, its writer's id cut (and its parent's): the count, then
the writer's gap."""
_U64_PARENT_GAP: Final = bytes([_U64_PARENT - _U64_RECORD])
"""The parent's gap in it: the array header and version, between the two ids."""


class _ValueRefs:
    """Short numbers for the 32-byte ids state values repeat (layout 5): a state value is
    stored as `_PACKED` ‖ count ‖ count times (gap, number) ‖ the value less those ids, where
    each gap (a varint) is the bytes of the rest to copy before the next id goes back in,
    with its header, and each number (a varint) names an id in the meta column. A kv entry's
    row repeats its writer's key and its map's id (68 bytes); stored, they take ~4.

    Reading puts back the very bytes written, so callers, hashes and sealing (bound to the
    key, over the stored form) see nothing of it. A value that has nothing to cut and
    starts with `_PACKED` anyway is stored with a count of 0, so every stored value that
    starts with it is packed.

    Numbers are store-wide, given in memory as ids are first met (at most `limit`: past
    it, ids stay in the values) and written to the meta column by every transaction that
    stores a value using a number not yet committed (`persist`), so a value never names a
    number its transaction did not make durable. A number given in memory by a
    transaction that aborted is written by the next one to use it, or never (a gap)."""

    def __init__(self, meta: Any, limit: int) -> None:
        self._meta = meta
        self._limit = limit
        self.ids: dict[int, bytes] = {}
        self.numbers: dict[bytes, int] = {}
        self._durable: set[int] = set()
        self._next = 1
        self._lock = threading.Lock()

    def load(self, txn: lmdb.Transaction, unseal: Callable[[bytes, bytes], bytes]) -> None:
        self.ids.clear()
        self.numbers.clear()
        for key, stored in _raw_scan(txn, _REF_KEY, None, None, None, db=self._meta):
            number = key[len(_REF_KEY) :]
            value = unseal(key, stored)
            if len(number) != _NUMBER_BYTES or len(value) != _ID_BYTES:
                raise StorageError("a stored value reference is damaged")
            n = int.from_bytes(number, "big")
            self.ids[n] = value
            self.numbers[value] = n
        self._durable = set(self.ids)
        self._next = max(self.ids, default=0) + 1

    def _number(self, value_id: bytes, *, give: bool = True) -> int | None:
        number = self.numbers.get(value_id)
        if number is not None or not give:
            return number
        with self._lock:
            number = self.numbers.get(value_id)
            if number is None and len(self.ids) < self._limit:
                number = self._next
                self._next += 1
                self.ids[number] = value_id
                self.numbers[value_id] = number
            return number

    def pack(self, value: bytes, fresh: set[int], *, give: bool = True) -> bytes:
        """The stored form of a state value (numbers not yet durable added to `fresh`;
        without `give`, ids without a number stay whole)."""
        if not value:
            return value
        numbers, durable = self.numbers, self._durable
        if (
            value[_U64_WRITER : _U64_WRITER + 2] == _ID_TOKEN
            and value[:3] == _V3_U64_HEAD
            and len(value) > _U64_RECORD
            and 0x90 <= value[_U64_RECORD] <= 0x9F
        ):
            # A local write's state row (`_id_cuts`' quick case): with its ids numbered
            # below 0x80, the general form below with no walk and no call but the lookups
            # and the join (every local write packs its rows, issue #16).
            writer = numbers.get(value[_U64_WRITER + 2 : _U64_RECORD])
            if writer is not None and writer < 0x80:
                if value[_U64_PARENT - 1 : _U64_PARENT + 2] != _V1_PARENT or len(value) < _U64_REST:
                    if writer not in durable:
                        fresh.add(writer)
                    return b"".join(
                        (_U64_ONE_HEAD, _ONE_BYTE[writer], value[:_U64_WRITER], value[_U64_RECORD:])
                    )
                parent = numbers.get(value[_U64_PARENT + 2 : _U64_REST])
                if parent is not None and parent < 0x80:
                    if writer not in durable:
                        fresh.add(writer)
                    if parent not in durable:
                        fresh.add(parent)
                    return b"".join(
                        (
                            _U64_TWO_HEAD,
                            _ONE_BYTE[writer],
                            _U64_PARENT_GAP,
                            _ONE_BYTE[parent],
                            value[:_U64_WRITER],
                            value[_U64_RECORD:_U64_PARENT],
                            value[_U64_REST:],
                        )
                    )
        parts: list[bytes] = []
        refs: list[bytes] = []
        at = 0
        for cut in _id_cuts(value):
            value_id = value[cut + len(_ID_TOKEN) : cut + _TOKEN_BYTES]
            number = numbers.get(value_id)  # (`_number`'s first look, inline)
            if number is None:
                number = self._number(value_id, give=give)
                if number is None:
                    continue
            if number not in durable:
                fresh.add(number)
            # (Both numbers mostly fit one byte: no call. Every local write packs its
            # state rows here, issue #16.)
            gap = cut - at
            refs.append(
                (_ONE_BYTE[gap] if gap < 0x80 else _uvarint(gap))
                + (_ONE_BYTE[number] if number < 0x80 else _uvarint(number))
            )
            parts.append(value[at:cut])
            at = cut + _TOKEN_BYTES
        if not refs:
            return value if value[0] != _PACKED else bytes([_PACKED, 0]) + value
        parts.append(value[at:])
        return b"".join([_PACKED_HEADS[len(refs)], *refs, *parts])

    def pack_many(self, values: Sequence[bytes], fresh: set[int]) -> list[bytes]:
        """`pack` of each of `values` (a snapshot batch's rows). A joined record as received
        (`[1, parent, ...]`: `_RECORD_HEAD`) has one id to number, its parent, at a fixed
        place: its stored form is the parent's packed head and the rest, made once per
        parent, not once per row. Anything else goes through `pack`.

        Runs in the writer thread, holding the GIL the event loop wants meanwhile (issue
        #17): a row of the same parent as the row before (a snapshot's rows come by id,
        mostly one map's entries) is known by one `startswith` of that row's head."""
        pack = self.pack
        heads: dict[bytes, bytes | None] = {}
        out: list[bytes] = []
        append = out.append
        same: tuple[bytes, ...] = ()  # (the head and parent of the last row packed by them)
        same_head = b""
        for value in values:
            if value.startswith(same):
                append(same_head + value[_RECORD_ID_END:])
                continue
            if not value.startswith(_RECORD_HEAD) or len(value) < _RECORD_ID_END:
                append(pack(value, fresh))
                continue
            head = self.head_of(value[len(_RECORD_HEAD) : _RECORD_ID_END], fresh, heads)
            if head is None:
                append(value)
            else:
                same, same_head = (value[:_RECORD_ID_END],), head
                append(head + value[_RECORD_ID_END:])
        return out

    def head_of(
        self, parent: bytes, fresh: set[int], heads: dict[bytes, bytes | None]
    ) -> bytes | None:
        """The stored head of a joined record of `parent` (`pack_many`; the rest of the
        record follows it), None if the parent gets no number; `heads` keeps them for one
        batch (a number not yet durable goes to `fresh` once)."""
        head = heads.get(parent, _UNSEEN)
        if head is _UNSEEN:
            number = self._number(parent)
            if number is None:
                head = None
            else:
                if number not in self._durable:
                    fresh.add(number)
                # (`pack`'s form: one ref, 2 bytes of the value before the id.)
                head = bytes([_PACKED, 1]) + _uvarint(2) + _uvarint(number) + _RECORD_HEAD[:2]
            heads[parent] = head
        return head

    def packer(self, fresh: set[int]) -> gil_free.Packer:
        """How `gil_free` packs a batch's state values as `pack_many` does (numbers not
        yet durable going to `fresh`)."""
        heads: dict[bytes, bytes | None] = {}
        return (
            _RECORD_HEAD,
            _RECORD_ID_END,
            functools.partial(self.head_of, fresh=fresh, heads=heads),
            functools.partial(self.pack, fresh=fresh),
        )

    def unpack(self, stored: bytes) -> bytes:
        """A state value from its stored form (StorageError if damaged)."""
        if not stored or stored[0] != _PACKED:
            return stored
        if stored[1:3] == b"\x01\x02" and len(stored) > 5 and stored[3] < 0x80:
            # A joined record (`pack_many`): one id, after 2 bytes, of a one-byte number.
            value_id = self.ids.get(stored[3])
            if value_id is not None:
                return stored[4:6] + _ID_TOKEN + value_id + stored[6:]
        if len(stored) < 2:
            raise StorageError("a stored state value is damaged (no count)")
        cuts: list[tuple[int, bytes]] = []
        at = 2
        for _ in range(stored[1]):
            gap, at = _read_uvarint(stored, at)
            number, at = _read_uvarint(stored, at)
            value_id = self.ids.get(number)
            if value_id is None:
                raise StorageError("a stored state value names an unknown reference")
            cuts.append((gap, value_id))
        parts: list[bytes] = []
        for gap, value_id in cuts:
            if at + gap > len(stored):
                raise StorageError("a stored state value is damaged (past its end)")
            parts += (stored[at : at + gap], _ID_TOKEN, value_id)
            at += gap
        parts.append(stored[at:])
        return b"".join(parts)

    def persist(
        self, txn: lmdb.Transaction, fresh: set[int], seal: Callable[[bytes, bytes], bytes]
    ) -> None:
        """Write the numbers `fresh` names in `txn` (before it commits)."""
        for number in sorted(fresh):
            key = _REF_KEY + number.to_bytes(_NUMBER_BYTES, "big")
            txn.put(key, seal(key, self.ids[number]), db=self._meta)

    def committed(self, fresh: set[int]) -> None:
        self._durable |= fresh


class Column(StrEnum):
    """Named sub-databases (DESIGN §9)."""

    META = "meta"
    CONFIG = "config"
    IDENTITY = "identity"
    STATE = "state"
    DELTA = "delta"
    PENDING = "pending"
    APPLICATION = "application"
    BLOB_META = "blob_meta"
    GENERIC = "generic"


NUMBERED: Final[dict[Column, tuple[bytes, ...]]] = {
    Column.STATE: (b"",),
    Column.DELTA: (b"",),
    Column.GENERIC: (b"base/", b"ckvv/"),
}
"""Where keys are prefix ‖ context id (32 bytes) ‖ rest: stored with a local number of 4
bytes for the context id (see the module docstring)."""


def _db_name(column: Column) -> bytes:
    """Columns whose keys are numbered live in new trees from layout 6 on (`_convert`;
    layouts 4 and 5 named them `<column>@4`, before that `<column>`)."""
    return f"{column.value}@6".encode() if column in NUMBERED else column.value.encode()


class Put(NamedTuple):
    """(Named tuples, not attrs classes: every delta stages several; a frozen attrs
    instance took twice as long to build, issue #16.)"""

    column: Column
    key: bytes
    value: bytes


class Delete(NamedTuple):
    column: Column
    key: bytes


@attrs.frozen
class PutMany:
    """Puts of many rows to one column, as one op (a snapshot batch writes 100,000s of
    rows: no object per row)."""

    column: Column
    rows: Sequence[tuple[bytes, bytes]]


@attrs.frozen
class PutRun:
    """Puts of many rows to one column whose keys share a prefix (a snapshot batch: one
    context's rows): row i is `prefix + keys[i]` → `values[i]`, without a tuple or a key
    per row, and a prefix naming a context (`NUMBERED`) is mapped to its stored form once,
    not once per key."""

    column: Column
    prefix: bytes
    keys: Sequence[bytes]
    values: Sequence[bytes]


WriteOp = Put | Delete | PutMany | PutRun


class _Many:
    """A `PutMany` or `PutRun` as `LmdbStore.write` prepared it: its keys as given (after
    `prefix`), values as stored (state values maybe still to pack: `packed`)."""

    __slots__ = ("column", "keys", "packed", "prefix", "values")

    def __init__(
        self,
        column: Column,
        keys: Sequence[bytes],
        values: Sequence[bytes],
        prefix: bytes = b"",
        *,
        packed: bool = True,
    ) -> None:
        self.column = column
        self.keys = keys
        self.values = values
        self.prefix = prefix
        self.packed = packed
        """False: state values not packed yet (`gil_free` packs them as it puts them)."""


class _Stored:
    """Rows of one column as stored: `prefix + keys[i]` -> `values[i]`, put together (one
    `LmdbStore._put_stored`)."""

    __slots__ = ("column", "keys", "packed", "prefix", "values")

    def __init__(
        self,
        column: Column,
        prefix: bytes,
        keys: Sequence[bytes],
        values: Sequence[bytes],
        *,
        packed: bool = True,
    ) -> None:
        self.column = column
        self.prefix = prefix
        self.keys = keys
        self.values = values
        self.packed = packed
        """As `_Many.packed`."""


Prepared = tuple[Column, bytes, bytes | None]
"""One put (a value as stored) or delete (None) of `LmdbStore.write`, its key as given."""
_STATE: Final = Column.STATE
_DELTA: Final = Column.DELTA
_GENERIC: Final = Column.GENERIC
"""(Module constants: a column looked up on `Column` costs an attribute lookup per op.)"""
_PUTS_ONLY: Final = {Put}
"""The op types of a batch of puts alone (`LmdbStore._write_puts`)."""


def _singles(
    prepared: Sequence[Prepared | _Many],
    keys: _ContextNumbers,
    txn: lmdb.Transaction,
    added: list[bytes],
    pack: Callable[[Sequence[bytes]], list[bytes]],
) -> Iterator[Prepared | _Stored]:
    """`prepared` in order, a `_Many` whose keys all name one context as one `_Stored` (its
    number found once, `_ContextNumbers.stored_many`), any other as its single puts (values
    not packed yet packed by `pack`)."""
    for item in prepared:
        if not isinstance(item, _Many):
            yield item
            continue
        given = item.keys
        if item.prefix:
            tag = keys.stored_prefix(item.column, item.prefix, txn=txn, added=added)
            if tag is not None:
                yield _Stored(item.column, tag, given, item.values, packed=item.packed)
                continue
            given = [item.prefix + k for k in given]
        stored = keys.stored_many(item.column, given, txn=txn, added=added)
        if stored is None:
            values = item.values if item.packed else pack(item.values)
            for key, value in zip(given, values, strict=True):
                yield (item.column, key, value)
        else:
            yield _Stored(item.column, b"", stored, item.values, packed=item.packed)


@attrs.define
class BulkTimes:
    """Where a store's bulk writes spent their time (seconds summed since it opened): every
    write that is not `Put`s alone (a snapshot batch's `PutRun`s, a folding pass). Timed in
    the thread that writes, so a wait for the GIL counts in the step it interrupted: py-lmdb
    lets go of it around every put, and takes it back only when the other thread's Python
    lets it (issue #17). The common write of `Put`s alone is not timed (issue #16)."""

    writes: int = 0
    preparing: float = 0.0
    """Before the transaction: keys checked, values packed and sealed."""
    putting: float = 0.0
    """The puts, in the transaction."""
    committing: float = 0.0
    """The commit: pages written and synced to disk."""

    def since(self, earlier: BulkTimes) -> BulkTimes:
        return BulkTimes(
            self.writes - earlier.writes,
            self.preparing - earlier.preparing,
            self.putting - earlier.putting,
            self.committing - earlier.committing,
        )


@attrs.frozen
class StoreStats:
    map_size: int
    used_bytes: int
    entries: dict[str, int]
    tree_bytes: dict[str, int] = attrs.field(factory=dict)
    """Per column: bytes of the pages its B-tree holds now (branch, leaf and overflow
    pages; `used_bytes` also counts freed pages not yet reused and LMDB's own)."""


class _SharedExclusiveLock:
    """Many readers or one resizer. Writers are already serialised by LMDB itself."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False
        self._shared = _Shared(self)

    def shared(self) -> _Shared:
        """Held by every transaction, each write's too: a plain context manager, not a
        generator's, and no wake-up unless a resizer waits (issue #16)."""
        return self._shared

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        # (Readers wait only for a resizer, which wakes them: the last reader out wakes
        # the waiters only if a resizer waits for it.)
        with self._cond:
            self._readers -= 1
            if not self._readers and self._exclusive:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _Shared:
    """`_SharedExclusiveLock.shared`: one object for every holder (it keeps no state)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: _SharedExclusiveLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_shared()

    def __exit__(self, *exc: object) -> None:
        self._lock.release_shared()


def _check_key(key: bytes) -> None:
    if not key:
        raise StorageError("empty keys are not allowed")
    if len(key) > _MAX_KEY_SIZE:
        raise StorageError(f"key of {len(key)} bytes exceeds LMDB's {_MAX_KEY_SIZE}-byte limit")


def _raw_scan(
    txn: lmdb.Transaction,
    prefix: bytes,
    start: bytes | None,
    end: bytes | None,
    limit: int | None,
    *,
    select: Callable[[bytes], bytes | None] | None = None,
    db: Any = None,
) -> list[tuple[bytes, bytes]]:
    """Rows of the transaction's tree (or `db`) with `prefix`, in [start, end), at most
    `limit`; with `select`, its value of each row's (rows it gives None for are left out)."""
    lower = max(prefix, start) if start is not None else prefix
    out: list[tuple[bytes, bytes]] = []
    cursor = txn.cursor() if db is None else txn.cursor(db=db)
    if lower and not cursor.set_range(lower):
        return []
    for key, raw in cursor.iternext():
        if (prefix and not key.startswith(prefix)) or (end is not None and key >= end):
            break
        value = raw if select is None else select(raw)
        if value is None:
            continue
        out.append((key, value))
        if limit is not None and len(out) >= limit:
            break
    return out


_WITH_CHECKPOINT: Final = 0xFF
"""First byte of a delta index value that holds a checkpoint row too (`_DeltaLog`); a
sequence number's is 0 (numbers stay below 2^56)."""
_INLINE: Final = 0x01
"""First byte of a delta index value that holds the delta's value itself (layout 7)."""
_INLINE_HEAD: Final = bytes([_INLINE])
INLINE_MAX: Final = 1024
"""Delta values (as stored: sealed, in an encrypted store) of at most this many bytes are
kept in their index row, larger ones in the log (`_DeltaLog`)."""
_HAS_DELTA: Final = 1
_HAS_BODY: Final = 2
CHECKPOINT_PREFIX: Final = b"ckvv/"
"""Generic rows `ckvv/` ‖ context ‖ delta id (context/replicas.py's checkpoint rows) live
in the delta index row of the same context and id (`_DeltaLog`)."""
_CHECKPOINT_KEY_BYTES: Final = len(CHECKPOINT_PREFIX) + 2 * _ID_BYTES


def _is_checkpoint(column: Column, key: bytes) -> bool:
    return (
        column is Column.GENERIC
        and len(key) == _CHECKPOINT_KEY_BYTES
        and key.startswith(CHECKPOINT_PREFIX)
    )


def _index_parts(raw: bytes | None) -> tuple[bytes | None, bytes | None]:
    """(the delta's part: None for no delta row, b"" for an empty value, `_INLINE` ‖ the
    value for a value kept in the row, else its log sequence number; the checkpoint row's
    value or None) of a delta index value."""
    if raw is None:
        return None, None
    if not raw or raw[0] != _WITH_CHECKPOINT:
        return raw, None
    if len(raw) < 2:
        raise StorageError("a stored delta index row is damaged")
    flags = raw[1]
    if not flags & _HAS_DELTA:
        return None, raw[2:]
    if not flags & _HAS_BODY:
        return b"", raw[2:]
    if len(raw) < 2 + _SEQ_BYTES:
        raise StorageError("a stored delta index row is damaged")
    return raw[2 : 2 + _SEQ_BYTES], raw[2 + _SEQ_BYTES :]


def _index_value(delta: bytes | None, checkpoint: bytes | None) -> bytes | None:
    """`_index_parts`'s inverse (None: no row). A row with a checkpoint keeps its delta's
    value in the log (`_DeltaLog.put_checkpoint`), so `delta` is not an inline one then."""
    if checkpoint is None:
        return delta
    flags = (0 if delta is None else _HAS_DELTA) | (_HAS_BODY if delta else 0)
    return bytes([_WITH_CHECKPOINT, flags]) + (delta or b"") + checkpoint


def _delta_part(raw: bytes) -> bytes | None:
    return _index_parts(raw)[0]


def _checkpoint_part(raw: bytes) -> bytes | None:
    return _index_parts(raw)[1]


class _DeltaLog:
    """The delta column's two trees (see the module docstring): `index` maps a key to its
    value (`_INLINE` ‖ the value, sealed if the store is) or to the sequence number of its
    value in `log`. All methods work inside a transaction the caller holds.

    A value of at most `INLINE_MAX` bytes is kept in its index row (layout 7): a call's
    commit then dirties one tree's path, not two (the log's leaf and branches were ~2 of
    the ~13 pages a sequential `kv_store.set` commits, ~5 % of its time, issue #16), for
    ~85 bytes more per kv entry than in the log, whose appended pages fill (a random-keyed
    tree's splits leave them ~60 % full). Larger values go to the log, where a few bytes of
    index row and full pages matter more than one tree's path. Rows of layouts 2-6, values
    in the log, stay there and are read as before.

    An index row also holds the checkpoint row (`CHECKPOINT_PREFIX`) of its context and
    delta id, if there is one: every delta folded here has both, and one row instead of two
    saves a 38-byte key, a node header and their share of half-empty pages (~60 bytes per
    folded delta). Such a value is `_WITH_CHECKPOINT` ‖ flags ‖ the sequence number (if
    the delta has a body, which is then always in the log) ‖ the checkpoint value (sealed
    as a generic row); an index value without a checkpoint is as before (empty, inline,
    or the number)."""

    def __init__(self, index: Any, log: Any) -> None:
        self.index = index
        self.log = log

    def get(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        part = _index_parts(txn.get(key, db=self.index))[0]
        if not part:
            return part  # (None: no row; b"": an empty value)
        if part[0] == _INLINE:
            return part[1:]
        value: bytes | None = txn.get(part, db=self.log)
        return value

    def put(self, txn: lmdb.Transaction, key: bytes, value: bytes) -> None:
        """`value` as stored (sealed if the store is); an empty one takes no log row."""
        index = self.index
        raw = txn.get(key, db=index)
        if not raw or raw[0] == _INLINE:
            # (No log row to replace, no checkpoint: a new delta's row, the common write.)
            if len(value) <= INLINE_MAX:
                stored = _INLINE_HEAD + value if value else b""
            else:
                stored = self._next(txn)
                txn.put(stored, value, db=self.log)
            if raw and len(stored) < len(raw):
                # A row that shrinks (a folded delta's body emptied) is deleted first:
                # replacing a value in place never merges pages, deleting does.
                txn.delete(key, db=index)
            txn.put(key, stored, db=index)
            return
        seq, checkpoint = _index_parts(raw)
        if seq and checkpoint is None and (not value or len(value) <= INLINE_MAX):
            txn.delete(seq, db=self.log)
            seq = None
        if not value:
            if seq:
                txn.delete(seq, db=self.log)
            txn.put(key, _index_value(b"", checkpoint), db=index)
            return
        if seq is None and checkpoint is None:
            txn.put(key, _INLINE_HEAD + value, db=index)
            return
        if not seq:
            seq = self._next(txn)
            txn.put(key, _index_value(seq, checkpoint), db=index)
        txn.put(seq, value, db=self.log)

    def delete(self, txn: lmdb.Transaction, key: bytes) -> None:
        seq, checkpoint = _index_parts(txn.get(key, db=self.index))
        if seq and seq[0] != _INLINE:
            txn.delete(seq, db=self.log)
        self._set(txn, key, None, checkpoint)

    def _set(
        self, txn: lmdb.Transaction, key: bytes, seq: bytes | None, checkpoint: bytes | None
    ) -> None:
        value = _index_value(seq, checkpoint)
        if value is None:
            txn.delete(key, db=self.index)
        else:
            txn.put(key, value, db=self.index)

    def get_checkpoint(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        return _index_parts(txn.get(key, db=self.index))[1]

    def put_checkpoint(self, txn: lmdb.Transaction, key: bytes, value: bytes | None) -> None:
        """Set (None: remove) the checkpoint row of `key`'s index row (a value kept in the
        row moves to the log first: a row with a checkpoint names its value by number)."""
        seq, checkpoint = _index_parts(txn.get(key, db=self.index))
        if checkpoint is None and value is None:
            return
        if seq and seq[0] == _INLINE and value is not None:
            body, seq = seq[1:], self._next(txn)
            txn.put(seq, body, db=self.log)
        self._set(txn, key, seq, value)

    def scan(self, txn: lmdb.Transaction, rows: list[tuple[bytes, bytes]]) -> None:
        """Replace each (key, delta part) of an index scan (its values through
        `_delta_part`) by (key, value), in place."""
        for i, (key, part) in enumerate(rows):
            if not part:
                continue  # an empty value: (key, b"") already
            if part[0] == _INLINE:
                rows[i] = (key, part[1:])
                continue
            value = txn.get(part, db=self.log)
            if value is None:
                raise StorageError(f"the delta log lost the value of {key.hex()[:16]}")
            rows[i] = (key, value)

    def _next(self, txn: lmdb.Transaction) -> bytes:
        cursor = txn.cursor(db=self.log)
        last = int.from_bytes(cursor.key(), "big") if cursor.last() else 0
        return (last + 1).to_bytes(_SEQ_BYTES, "big")

    def to_log(self, txn: lmdb.Transaction) -> None:
        """Layout 1 → 2: move a one-tree delta column to the index and the log."""
        cursor = txn.cursor(db=self.index)
        for seq, (key, value) in enumerate(cursor.iternext(), start=1):
            number = seq.to_bytes(_SEQ_BYTES, "big")
            txn.put(number, value, db=self.log)
            cursor.put(key, number)  # (replaces the value under the cursor's key)

    def drop_empty(self, txn: lmdb.Transaction, is_empty: Callable[[bytes, bytes], bool]) -> None:
        """Layout 2 → 3: the log rows of empty values (`is_empty(key, stored value)`: it may
        be sealed) go; their index rows hold the empty marker."""
        cursor = txn.cursor(db=self.index)
        for key, seq in cursor.iternext():
            if not seq:
                continue
            value = txn.get(seq, db=self.log)
            if value is not None and is_empty(key, value):
                txn.delete(seq, db=self.log)
                cursor.put(key, b"")


class _ContextNumbers:
    """Local numbers for context ids in the keys of `NUMBERED` columns: a stored key is
    prefix ‖ tag ‖ rest instead of prefix ‖ context id ‖ rest, where the tag is one byte,
    `_SMALL_TAG` | number, for the first `_SMALL_NUMBERS` contexts (31 bytes less in every
    state, delta, base and checkpoint row), else `_NUMBERED_TAG` ‖ number (4 bytes), or
    `_SHORT` for a key too short to name a context. Keys of other columns, and of the
    generic column outside its numbered prefixes, are stored as they are. (Layouts 4 and 5
    wrote every number in 5 bytes; `key` reads both.)

    Within one context the stored keys keep the order of the keys (the tag is a fixed
    prefix); across contexts they follow no order. Numbers are given in a write
    transaction (`stored(..., txn=)`), recorded in the meta column in that transaction, and
    taken back if it aborts (`rollback`)."""

    def __init__(self, meta: Any) -> None:
        self._meta = meta
        self.numbers: dict[bytes, bytes] = {}
        """context id → its tag in stored keys."""
        self.ids: dict[int, bytes] = {}
        """number → context id."""
        self._next = 1

    def load(self, txn: lmdb.Transaction) -> None:
        self.numbers.clear()
        self.ids.clear()
        for key, number in _raw_scan(txn, _NUMBER_KEY, None, None, None, db=self._meta):
            context = key[len(_NUMBER_KEY) :]
            if len(context) != _CONTEXT_BYTES or len(number) != _NUMBER_BYTES:
                raise StorageError("a stored context number is damaged")
            self._note(context, int.from_bytes(number, "big"))
        self._next = max(self.ids, default=0) + 1

    def _note(self, context: bytes, number: int) -> None:
        self.numbers[context] = (
            bytes([_SMALL_TAG | number])
            if number < _SMALL_NUMBERS
            else _NUMBERED_TAG + number.to_bytes(_NUMBER_BYTES, "big")
        )
        self.ids[number] = context

    def stored(
        self,
        column: Column,
        key: bytes,
        *,
        txn: lmdb.Transaction | None = None,
        added: list[bytes] | None = None,
    ) -> bytes | None:
        """The stored form of `key`; None when it names a context without a number and no
        write transaction (`txn`, noting new contexts in `added`) may give it one."""
        prefixes = NUMBERED.get(column)
        if prefixes is None:
            return key
        for prefix in prefixes:
            if not key.startswith(prefix):
                continue
            cut = len(prefix)
            if len(key) < cut + _CONTEXT_BYTES:
                return prefix + _SHORT + key[cut:]
            context = key[cut : cut + _CONTEXT_BYTES]
            tag = self.numbers.get(context)
            if tag is None:
                if txn is None or added is None:
                    return None
                tag = self._give(context, txn)
                added.append(context)
            return prefix + tag + key[cut + _CONTEXT_BYTES :]
        return key

    def stored_many(
        self, column: Column, keys: Sequence[bytes], *, txn: lmdb.Transaction, added: list[bytes]
    ) -> list[bytes] | None:
        """`stored` of every key of `keys` in a write transaction, when they all name one
        context under one prefix (a snapshot batch's rows): its number is found once. None
        if they do not (or are checkpoint rows, or delta rows): store them one by one."""
        prefixes = NUMBERED.get(column)
        if prefixes is None:
            return list(keys)
        if not keys or column is Column.DELTA:
            return None
        first = keys[0]
        for prefix in prefixes:
            if first.startswith(prefix):
                break
        else:
            return None
        if prefix == CHECKPOINT_PREFIX:
            return None
        cut = len(prefix) + _CONTEXT_BYTES
        head = first[:cut]
        if len(first) < cut or not all(k.startswith(head) for k in keys):
            return None
        tag = self.stored(column, head, txn=txn, added=added)
        assert tag is not None  # (a write transaction gives numbers)
        return [tag + k[cut:] for k in keys]

    def stored_prefix(
        self, column: Column, head: bytes, *, txn: lmdb.Transaction, added: list[bytes]
    ) -> bytes | None:
        """The stored form of `head` in a write transaction, when `head` is exactly a prefix
        of `column` and a context id (a `PutRun`'s prefix): every key `head + k` is stored
        as that + `k`. None if it is not (or names checkpoint or delta rows): map each key."""
        prefixes = NUMBERED.get(column)
        if prefixes is None:
            return head
        if column is Column.DELTA:
            return None
        for prefix in prefixes:
            if head.startswith(prefix) and len(head) == len(prefix) + _CONTEXT_BYTES:
                break
        else:
            return None
        if prefix == CHECKPOINT_PREFIX:
            return None
        return self.stored(column, head, txn=txn, added=added)

    def _give(self, context: bytes, txn: lmdb.Transaction) -> bytes:
        if self._next >= 1 << (8 * _NUMBER_BYTES):
            raise StorageError("the datastore ran out of context numbers")
        number = self._next
        self._next += 1
        txn.put(_NUMBER_KEY + context, number.to_bytes(_NUMBER_BYTES, "big"), db=self._meta)
        self._note(context, number)
        return self.numbers[context]

    def rollback(self, added: list[bytes]) -> None:
        """The transaction that gave numbers to `added` aborted."""
        for context in added:
            del self.numbers[context]
        self.ids = {n: c for n, c in self.ids.items() if c in self.numbers}
        self._next = max(self.ids, default=0) + 1
        added.clear()

    def key(self, column: Column, stored: bytes) -> bytes:
        """The key of a stored key (`stored`'s inverse; a 5-byte tag of a small number,
        as layouts 4 and 5 wrote it, too)."""
        prefixes = NUMBERED.get(column)
        if prefixes is None:
            return stored
        for prefix in prefixes:
            if not stored.startswith(prefix):
                continue
            cut = len(prefix)
            tag = stored[cut] if len(stored) > cut else -1
            if tag == _SHORT[0]:
                return prefix + stored[cut + 1 :]
            if tag >= _SMALL_TAG:
                number, rest = tag & ~_SMALL_TAG, cut + 1
            elif tag == _NUMBERED_TAG[0] and len(stored) >= cut + 1 + _NUMBER_BYTES:
                number = int.from_bytes(stored[cut + 1 : cut + 1 + _NUMBER_BYTES], "big")
                rest = cut + 1 + _NUMBER_BYTES
            else:
                number, rest = -1, 0
            context = self.ids.get(number)
            if context is None:
                raise StorageError(f"a stored {column.value} key names no known context")
            return prefix + context + stored[rest:]
        return stored

    def pinned(self, column: Column, prefix: bytes) -> bool | None:
        """How a scan of `prefix` maps to stored keys: True, to one range (the prefix names
        a context, or no numbered key starts with it); None, the prefix names a context
        without a number (no rows); False, to keys of many contexts (`_scan_all`)."""
        prefixes = NUMBERED.get(column)
        if prefixes is None:
            return True
        for p in prefixes:
            if prefix.startswith(p) and len(prefix) >= len(p) + _CONTEXT_BYTES:
                return True if prefix[len(p) : len(p) + _CONTEXT_BYTES] in self.numbers else None
            if p.startswith(prefix) or prefix.startswith(p):
                return False
        return True


class LmdbStore:
    """A blocking datastore. Use `LmdbStore.open(...)`; close with `close()`."""

    def __init__(
        self,
        env: lmdb.Environment,
        dbs: dict[Column, Any],
        cipher: ValueCipher | None,
        max_map_size: int,
        max_value_refs: int = DEFAULT_MAX_VALUE_REFS,
        *,
        gil_free_puts: bool = True,
    ) -> None:
        self._env = env
        self._dbs = dbs
        self._names = {column: _db_name(column) for column in dbs}
        """(The trees' names: `gil_free` finds a tree by its name.)"""
        self._bulk_put = gil_free.putter(env) if gil_free_puts else None
        """How a snapshot batch's rows are put (`_put_stored`)."""
        self._log_db = env.open_db(_DELTA_LOG_DB)
        self._deltas = _DeltaLog(dbs[Column.DELTA], self._log_db)
        self._keys = _ContextNumbers(dbs[Column.META])
        self._refs = _ValueRefs(dbs[Column.META], max_value_refs)
        self._cipher = cipher
        self._max_map_size = max_map_size
        self._lock = _SharedExclusiveLock()
        self._closed = False
        self.bulk = BulkTimes()
        """Where the bulk writes spent their time (`BulkTimes`)."""
        while True:
            try:
                self._convert(dbs[Column.META])
                break
            except lmdb.MapFullError:
                self._grow()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        initial_map_size: int = 64 * 1024 * 1024,
        max_map_size: int = 1 << 40,
        passphrase: str | None = None,
        kdf: KdfParams | None = None,
        max_readers: int = 126,
        max_value_refs: int = DEFAULT_MAX_VALUE_REFS,
        gil_free_puts: bool = True,
    ) -> LmdbStore:
        """Open (creating if needed) the store at `path`. `gil_free_puts=False`: bulk rows
        are put with py-lmdb's `putmulti` even when `gil_free` could put them.

        With a passphrase the store is encrypted: an existing store must have been created
        encrypted with the same passphrase (WrongPassphraseError otherwise, nothing written);
        a new one gets a verifier. Without one, an encrypted store is refused.
        """
        path.mkdir(parents=True, exist_ok=True)
        try:
            env = lmdb.open(
                str(path),
                map_size=initial_map_size,
                # (the delta log's second tree, and the trees layout 4 moved from)
                max_dbs=len(Column) + 2 + len(NUMBERED),
                max_readers=max_readers,
                subdir=True,
                readahead=False,
            )
        except lmdb.Error as exc:
            raise StorageError(f"cannot open datastore at {path}: {exc}") from None
        try:
            # If the file was grown earlier its map is larger than `initial_map_size`.
            map_size = max(env.info()["map_size"], initial_map_size)
            env.set_mapsize(map_size)
            cipher = cls._open_cipher(env, passphrase, kdf or KdfParams(), path)
            dbs = {col: env.open_db(_db_name(col)) for col in Column}
            # (converts an older layout)
            return cls(env, dbs, cipher, max_map_size, max_value_refs, gil_free_puts=gil_free_puts)
        except BaseException:
            env.close()
            raise

    @staticmethod
    def _open_cipher(
        env: lmdb.Environment, passphrase: str | None, kdf: KdfParams, path: Path
    ) -> ValueCipher | None:
        # Read before creating anything so that a refused open writes nothing.
        with env.begin() as txn:
            names = [k for k, _ in txn.cursor()]
            record = None
            if Column.META.value.encode() in names:
                meta = env.open_db(Column.META.value.encode(), txn=txn, create=False)
                record = txn.get(_VERIFIER_KEY, db=meta)
        if record is not None:
            if passphrase is None:
                raise StorageError(
                    f"datastore at {path} is encrypted: set store.encrypted = true "
                    "and $TRIONODE_PASSPHRASE"
                )
            return open_verifier(passphrase, record)
        if passphrase is None:
            return None
        if names:
            raise StorageError(
                f"datastore at {path} was created without encryption; "
                "it cannot be opened as an encrypted store"
            )
        cipher, record = create_verifier(passphrase, kdf)
        meta = env.open_db(Column.META.value.encode())
        with env.begin(write=True) as txn:
            txn.put(_VERIFIER_KEY, record, db=meta)
        return cipher

    def _convert(self, meta: Any) -> None:
        """Bring an older store to `STORE_LAYOUT` in one transaction (a crash leaves it as
        it was); refuse a newer one, writing nothing."""
        fresh: set[int] = set()
        with self._env.begin(write=True) as txn:
            self._keys.load(txn)
            self._refs.load(txn, self._meta_unseal)
            stored = txn.get(_STORE_LAYOUT_KEY, db=meta)
            if stored is not None:
                layout = int(stored) if stored.isdigit() else -1
                if layout == STORE_LAYOUT:
                    return
                if not 0 < layout < STORE_LAYOUT:
                    path = self._env.path()
                    raise StorageError(
                        f"the datastore at {path} has layout {stored.decode(errors='replace')}, "
                        f"which this trionode (layout {STORE_LAYOUT}) cannot read: "
                        "use the trionode that wrote it, or a newer one"
                    )
            elif txn.get(_DELTA_LAYOUT_KEY, db=meta) == _DELTA_LAYOUT:
                layout = 2
            else:
                layout = 1
            old = self._old_trees(txn, "" if layout < 4 else "@4")
            deltas = _DeltaLog(old.get(Column.DELTA, self._dbs[Column.DELTA]), self._log_db)
            if layout < 2:
                deltas.to_log(txn)
                txn.put(_DELTA_LAYOUT_KEY, _DELTA_LAYOUT, db=meta)
            if layout < 3:
                deltas.drop_empty(txn, self._holds_empty)
            if layout < 6:
                self._number_contexts(txn, old, numbered=layout >= 4)
                self._merge_checkpoints(txn)
            if layout < 5:
                self._pack_state(txn, fresh)
            # (6 -> 7 moves no row: delta values already in the log stay there, read as
            # before; new small ones go to their index rows, `_DeltaLog`.)
            txn.put(_STORE_LAYOUT_KEY, str(STORE_LAYOUT).encode(), db=meta)
        self._refs.committed(fresh)

    def _old_trees(self, txn: lmdb.Transaction, suffix: str) -> dict[Column, Any]:
        """The trees of `NUMBERED` columns as an older layout named them (`<column>` before
        layout 4, `<column>@4` in 4 and 5), those there are."""
        names = {key for key, _ in txn.cursor()}
        return {
            column: self._env.open_db(name, txn=txn)
            for column in NUMBERED
            if (name := f"{column.value}{suffix}".encode()) in names
        }

    def _number_contexts(
        self, txn: lmdb.Transaction, old: dict[Column, Any], *, numbered: bool
    ) -> None:
        """Layouts 3 → 6 and 4, 5 → 6: every row of a numbered column moves to its new tree
        under its stored key (values as they are: sealing binds them to the key, not its
        stored form); the old trees go. Keys of layouts 4 and 5 (`numbered`) are read as
        stored keys; before, as they are."""
        added: list[bytes] = []
        keys = self._keys
        for column, tree in old.items():
            new = self._dbs[column]
            for key, value in txn.cursor(db=tree).iternext():
                plain = keys.key(column, key) if numbered else key
                txn.put(keys.stored(column, plain, txn=txn, added=added), value, db=new)
            txn.drop(tree, delete=True)

    def _merge_checkpoints(self, txn: lmdb.Transaction) -> None:
        """Layouts before 6: checkpoint rows move from the generic tree into the delta
        index rows of their context and id (`_DeltaLog`), values as they are."""
        keys, added = self._keys, list[bytes]()
        generic = self._dbs[Column.GENERIC]
        moved: list[bytes] = []
        for stored_key, value in _raw_scan(txn, CHECKPOINT_PREFIX, None, None, None, db=generic):
            key = keys.key(Column.GENERIC, stored_key)
            if _is_checkpoint(Column.GENERIC, key):
                within = key[len(CHECKPOINT_PREFIX) :]
                index_key = keys.stored(Column.DELTA, within, txn=txn, added=added)
                assert index_key is not None  # (a write transaction gives numbers)
                self._deltas.put_checkpoint(txn, index_key, value)
                moved.append(stored_key)
        for stored_key in moved:
            txn.delete(stored_key, db=generic)

    def _pack_state(self, txn: lmdb.Transaction, fresh: set[int]) -> None:
        """Layout 4 → 5: every state value takes its stored form (`_ValueRefs`), sealed
        anew under the key it was sealed to."""
        cursor = txn.cursor(db=self._dbs[Column.STATE])
        refs, keys = self._refs, self._keys
        for stored_key, stored in cursor.iternext():
            if not stored:
                continue
            key = keys.key(Column.STATE, stored_key)
            value = self._unseal(Column.STATE, key, stored)
            packed = refs.pack(value, fresh)
            if packed is not value:
                cursor.put(stored_key, self._seal(Column.STATE, key, packed))
        refs.persist(txn, fresh, self._meta_seal)

    def _meta_seal(self, key: bytes, value: bytes) -> bytes:
        return self._seal(Column.META, key, value)

    def _meta_unseal(self, key: bytes, stored: bytes) -> bytes:
        return self._unseal(Column.META, key, stored)

    def _holds_empty(self, key: bytes, stored: bytes) -> bool:
        """Whether a delta value as a layout-2 store kept it is empty (sealed or not)."""
        if self._cipher is None or not stored:
            return not stored
        if len(stored) != len(self._cipher.seal(Column.DELTA.value, key, b"")):
            return False
        try:
            return not self._unseal(Column.DELTA, key, stored)
        except StorageError:
            return False  # damaged: left as it is, to fail where it is read

    @property
    def encrypted(self) -> bool:
        return self._cipher is not None

    @property
    def cipher(self) -> ValueCipher | None:
        """The at-rest cipher (None when unencrypted): the blob store derives its keys from it."""
        return self._cipher

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("datastore is closed")

    # -- values ----------------------------------------------------------------------------

    def _seal(self, column: Column, key: bytes, value: bytes) -> bytes:
        if self._cipher is None or not value:
            return value  # (an empty value is stored as it is: see the module docstring)
        return self._cipher.seal(column.value, key, value)

    def _unseal(self, column: Column, key: bytes, stored: bytes) -> bytes:
        if self._cipher is None or not stored:
            return stored
        return self._cipher.open(column.value, key, stored)

    def _value(self, column: Column, key: bytes, stored: bytes) -> bytes:
        """What a caller wrote, from what the store holds."""
        value = self._unseal(column, key, stored)
        return self._refs.unpack(value) if column is Column.STATE else value

    # -- reads -----------------------------------------------------------------------------

    def get(self, column: Column, key: bytes) -> bytes | None:
        self._check_open()
        with self._lock.shared(), self._env.begin(buffers=False) as txn:
            stored = self._get_in(txn, column, key)
        return None if stored is None else self._value(column, key, stored)

    def get_many(self, column: Column, keys: Sequence[bytes]) -> list[bytes | None]:
        self._check_open()
        with self._lock.shared(), self._env.begin() as txn:
            stored = [self._get_in(txn, column, k) for k in keys]
        return [
            None if s is None else self._value(column, k, s)
            for k, s in zip(keys, stored, strict=True)
        ]

    def scan(
        self,
        column: Column,
        *,
        prefix: bytes = b"",
        start: bytes | None = None,
        end: bytes | None = None,
        limit: int | None = None,
        fill: tuple[Column, int] | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Keys in order: those with `prefix`, from `start` (inclusive) to `end` (exclusive).

        With `fill` = (column, n), a row whose value is empty takes instead the value of
        its key less its first n bytes in that column (if there is one), read in the same
        transaction: rows that defer to another column's (context/replicas.py's base
        rows) come back consistent with it."""
        self._check_open()
        with self._lock.shared(), self._env.begin(db=self._dbs[column]) as txn:
            out = self._scan(txn, column, prefix, start=start, end=end, limit=limit)
            if column is Column.DELTA:
                self._deltas.scan(txn, out)
            filled: set[int] = set()
            if fill is not None:
                other, cut = fill
                self._fill(txn, out, other, cut, filled)
        if self._cipher is None and column is not Column.STATE and not filled:
            return out
        if fill is not None and filled:
            other, cut = fill
            return [
                (k, self._value(other, k[cut:], v) if i in filled else self._value(column, k, v))
                for i, (k, v) in enumerate(out)
            ]
        return [(k, self._value(column, k, v)) for k, v in out]

    def scan_filled(
        self,
        column: Column,
        *,
        prefix: bytes,
        start: bytes | None = None,
        limit: int,
        fill: tuple[Column, int],
        implicit: tuple[int, bytes] | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """`scan(column, prefix=prefix, start=start, limit=limit, fill=fill)` with each key
        less `prefix` (a page of one context's base rows, by entity id).

        With `implicit` = (id length, absent): a state row of the context whose key is the
        context and an id of that length, and which has no row here, counts as a row here
        holding its value (context/replicas.py's contexts whose state rows are their base:
        `STATE_BASE_PREFIX`); a row here whose value is `absent` is left out (it says
        "none", overriding the state row). Only for one context's base rows.

        When `prefix` names one context of a numbered column and its empty rows defer to
        that context's rows of the state column (`fill` cuts exactly the column's prefix
        off: context/replicas.py's base markers), the two trees are walked side by side,
        both in id order, instead of a lookup from the top of the state tree per marker;
        anything else goes through `scan`."""
        self._check_open()
        other, cut = fill
        stored_prefix = self._keys.stored(column, prefix)
        if implicit is not None:
            if (
                column is not Column.GENERIC
                or other is not Column.STATE
                or len(prefix) != cut + _CONTEXT_BYTES
                or (start is not None and not start.startswith(prefix))
            ):
                raise ValueError("an implicit scan reads one context's base rows")
            if stored_prefix is None or limit <= 0:
                return []  # (no number: the context has no rows)
            rest = b"" if start is None else start[len(prefix) :]
            return self._scan_implicit(prefix, stored_prefix, rest, limit, implicit)
        if (
            column is not Column.GENERIC
            or other is not Column.STATE
            or len(prefix) != cut + _CONTEXT_BYTES
            or stored_prefix is None
            or stored_prefix == prefix  # (no context number: not one context's rows)
            or (start is not None and not start.startswith(prefix))
        ):
            rows = self.scan(column, prefix=prefix, start=start, limit=limit, fill=fill)
            n = len(prefix)
            return [(k[n:], v) for k, v in rows]
        context = prefix[cut:]
        out: list[tuple[bytes, bytes]] = []
        with self._lock.shared(), self._env.begin() as txn:
            state_head = self._keys.stored(other, context)
            lower = stored_prefix if start is None else stored_prefix + start[len(prefix) :]
            base = txn.cursor(db=self._dbs[column])
            if limit <= 0 or not base.set_range(lower):
                return out
            state = txn.cursor(db=self._dbs[other])
            state_rows: Iterator[tuple[bytes, bytes]] | None = None
            here: tuple[bytes, bytes] | None = None
            """The state row the walk is at (None: before the first, or past the last)."""
            n = len(stored_prefix)
            sealed = self._cipher is not None
            unpack = self._refs.unpack
            for key, value in base.iternext():
                if not key.startswith(stored_prefix):
                    break
                entity_id = key[n:]
                if value:
                    out.append((entity_id, self._value(column, prefix + entity_id, value)))
                elif state_head is None:
                    out.append((entity_id, value))
                else:
                    want = state_head + entity_id
                    if state_rows is not None and here is not None and here[0] < want:
                        here = next(state_rows, None)  # (the next marker's row, mostly)
                    if state_rows is None or (here is not None and here[0] < want):
                        state_rows = state.iternext() if state.set_range(want) else iter(())
                        here = next(state_rows, None)
                    if here is not None and here[0] == want:
                        stored = here[1]
                        if sealed:
                            stored = self._unseal(other, context + entity_id, stored)
                        out.append((entity_id, unpack(stored)))
                    else:
                        out.append((entity_id, value))  # (no state row: stays a marker)
                if len(out) >= limit:
                    break
        return out

    def _scan_implicit(
        self,
        prefix: bytes,
        stored_prefix: bytes,
        rest: bytes,
        limit: int,
        implicit: tuple[int, bytes],
    ) -> list[tuple[bytes, bytes]]:
        """`scan_filled` with `implicit`: the context's base rows and its state rows walked
        side by side from `rest` (the first id, or a part of one), both in id order."""
        id_bytes, absent = implicit
        context = prefix[-_CONTEXT_BYTES:]
        out: list[tuple[bytes, bytes]] = []
        value_of = self._value
        unpack = self._refs.unpack
        sealed = self._cipher is not None
        with self._lock.shared(), self._env.begin() as txn:
            n = len(stored_prefix)
            base = txn.cursor(db=self._dbs[Column.GENERIC])
            base_rows = base.iternext() if base.set_range(stored_prefix + rest) else iter(())
            state_head = self._keys.stored(Column.STATE, context)
            m = 0 if state_head is None else len(state_head)
            state = txn.cursor(db=self._dbs[Column.STATE])
            state_rows = (
                state.iternext()
                if state_head is not None and state.set_range(state_head + rest)
                else iter(())
            )

            def next_base() -> tuple[bytes, bytes] | None:
                for key, value in base_rows:
                    return (key[n:], value) if key.startswith(stored_prefix) else None
                return None

            def next_state() -> tuple[bytes, bytes] | None:
                assert state_head is not None
                for key, value in state_rows:
                    if not key.startswith(state_head):
                        return None
                    if len(key) - m == id_bytes:  # (not a Text's journal row, say)
                        return key[m:], value
                return None

            b = next_base()
            s = None if state_head is None else next_state()
            while (b is not None or s is not None) and len(out) < limit:
                if s is None or (b is not None and b[0] <= s[0]):
                    assert b is not None
                    entity_id, stored = b
                    held = None
                    if s is not None and s[0] == entity_id:
                        held = s[1]
                        s = next_state()
                    b = next_base()
                    value = value_of(Column.GENERIC, prefix + entity_id, stored)
                    if value == absent:
                        continue
                    if value or held is None:
                        out.append((entity_id, value))
                        continue
                else:
                    entity_id, held = s
                    s = next_state()
                if sealed:
                    held = self._unseal(Column.STATE, context + entity_id, held)
                out.append((entity_id, unpack(held)))
        return out

    def _fill(
        self,
        txn: lmdb.Transaction,
        out: list[tuple[bytes, bytes]],
        other: Column,
        cut: int,
        filled: set[int],
    ) -> None:
        """`scan`'s `fill`: each empty value of `out` takes that of its key less `cut` bytes
        in `other` (the rows that do: `filled`). State rows of one context (a snapshot's
        page of base markers) find their stored key from the context's, once."""
        heads: dict[bytes, bytes | None] = {}
        state = other is Column.STATE
        db = self._dbs[other]
        for i, (key, value) in enumerate(out):
            if value:
                continue
            within = key[cut:]
            if state and len(within) >= _CONTEXT_BYTES:
                context = within[:_CONTEXT_BYTES]
                if context in heads:
                    head = heads[context]
                else:
                    head = heads[context] = self._keys.stored(other, context)
                found = None if head is None else txn.get(head + within[_CONTEXT_BYTES:], db=db)
            else:
                found = self._get_in(txn, other, within)
            if found is not None:
                out[i] = (key, found)
                filled.add(i)

    def _get_in(self, txn: lmdb.Transaction, column: Column, key: bytes) -> bytes | None:
        """The value of `key` as stored (sealed), read in `txn`."""
        if _is_checkpoint(column, key):
            index_key = self._keys.stored(Column.DELTA, key[len(CHECKPOINT_PREFIX) :])
            return None if index_key is None else self._deltas.get_checkpoint(txn, index_key)
        stored_key = self._keys.stored(column, key)
        if stored_key is None:
            return None
        if column is Column.DELTA:
            return self._deltas.get(txn, stored_key)
        found: bytes | None = txn.get(stored_key, db=self._dbs[column])
        return found

    def _scan(
        self,
        txn: lmdb.Transaction,
        column: Column,
        prefix: bytes,
        *,
        start: bytes | None,
        end: bytes | None,
        limit: int | None,
    ) -> list[tuple[bytes, bytes]]:
        """`scan`'s rows as stored (values sealed, delta values as log numbers), keys as
        they are."""
        rows = self._scan_tree(txn, column, prefix, start=start, end=end, limit=limit)
        if column is Column.GENERIC and (
            prefix.startswith(CHECKPOINT_PREFIX) or CHECKPOINT_PREFIX.startswith(prefix)
        ):
            more = self._scan_checkpoints(txn, prefix, start=start, end=end)
            if more:
                rows = sorted(rows + more)
                if limit is not None:
                    rows = rows[:limit]
        return rows

    def _scan_checkpoints(
        self, txn: lmdb.Transaction, prefix: bytes, *, start: bytes | None, end: bytes | None
    ) -> list[tuple[bytes, bytes]]:
        """Checkpoint rows (kept in delta index rows: `_DeltaLog`) with `prefix`, in
        [start, end), in key order."""
        within = prefix[len(CHECKPOINT_PREFIX) :]
        rows = self._scan_tree(
            txn, Column.DELTA, within, start=None, end=None, limit=None, select=_checkpoint_part
        )
        keyed = ((CHECKPOINT_PREFIX + k, v) for k, v in rows if len(k) == 2 * _ID_BYTES)
        return [
            (k, v)
            for k, v in keyed
            if k.startswith(prefix) and (start is None or k >= start) and (end is None or k < end)
        ]

    def _scan_tree(
        self,
        txn: lmdb.Transaction,
        column: Column,
        prefix: bytes,
        *,
        start: bytes | None,
        end: bytes | None,
        limit: int | None,
        select: Callable[[bytes], bytes | None] | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """The rows of `column`'s own tree (its index for the delta column: values through
        `select`, by default each row's delta part)."""
        if column is Column.DELTA and select is None:
            select = _delta_part
        db = self._dbs[column]
        pinned = self._keys.pinned(column, prefix)
        if pinned is None:
            return []
        if not pinned:
            return self._scan_all(
                txn, column, prefix, start=start, end=end, limit=limit, select=select
            )
        stored_prefix = self._keys.stored(column, prefix)
        if stored_prefix is None:
            return []
        if stored_prefix != prefix:  # one context's keys: their bounds map to stored ones
            if start is not None:
                if start.startswith(prefix):
                    start = self._keys.stored(column, start)
                elif start > prefix:
                    return []  # (after every key with the prefix)
                else:
                    start = None
            if end is not None:
                if end <= prefix:
                    return []
                end = self._keys.stored(column, end) if end.startswith(prefix) else None
        rows = _raw_scan(txn, stored_prefix, start, end, limit, select=select, db=db)
        if stored_prefix == prefix and column not in NUMBERED:
            return rows
        if stored_prefix != prefix:
            # One context's rows: every stored key is the stored prefix and the rest, so
            # its key is the prefix and that rest (what `key` gives, without a call a row).
            cut = len(stored_prefix)
            return [(prefix + k[cut:], v) for k, v in rows]
        return [(self._keys.key(column, k), v) for k, v in rows]

    def _scan_all(
        self,
        txn: lmdb.Transaction,
        column: Column,
        prefix: bytes,
        *,
        start: bytes | None,
        end: bytes | None,
        limit: int | None,
        select: Callable[[bytes], bytes | None] | None,
    ) -> list[tuple[bytes, bytes]]:
        """A scan whose keys span contexts (a whole column, a short prefix): every row of
        the column is read and put in key order. Rare (tests, tools), so not paged."""
        cursor = txn.cursor(db=self._dbs[column])
        rows = sorted(
            (key, value)
            for key, value in (
                (self._keys.key(column, k), v if select is None else select(v))
                for k, v in cursor.iternext()
            )
            if value is not None
            and key.startswith(prefix)
            and (start is None or key >= start)
            and (end is None or key < end)
        )
        return rows if limit is None else rows[:limit]

    def stored_key(self, column: Column, key: bytes) -> bytes | None:
        """`key` as the store keeps it (see `_ContextNumbers`; None: its context has no
        number yet). For measurements."""
        return self._keys.stored(column, key)

    def stored_size(self, column: Column, value: bytes) -> int:
        """Bytes `value` takes as this column stores it, before sealing (state values name
        ids by number: `_ValueRefs`). For measurements: gives no number."""
        if column is not Column.STATE:
            return len(value)
        return len(self._refs.pack(value, set(), give=False))

    def count(self, column: Column) -> int:
        """Rows in `column` (for the delta and generic columns, by reading the delta
        index: some of its rows are checkpoint rows, some both)."""
        self._check_open()
        with self._lock.shared(), self._env.begin() as txn:
            entries = int(txn.stat(self._dbs[column])["entries"])
            if column not in (Column.DELTA, Column.GENERIC):
                return entries
            index = txn.cursor(db=self._dbs[Column.DELTA]).iternext(values=True)
            parts = [_index_parts(v) for _, v in index]
        if column is Column.DELTA:
            return sum(delta is not None for delta, _ in parts)
        return entries + sum(checkpoint is not None for _, checkpoint in parts)

    def stats(self) -> StoreStats:
        self._check_open()
        with self._lock.shared():
            info = self._env.info()
            stat = self._env.stat()
            with self._env.begin() as txn:
                stats = {col.value: txn.stat(db) for col, db in self._dbs.items()}
                log = txn.stat(self._deltas.log)
        pages = ("branch_pages", "leaf_pages", "overflow_pages")
        delta = stats[Column.DELTA.value]
        stats[Column.DELTA.value] = {
            **delta,
            **{k: int(delta[k]) + int(log[k]) for k in pages},  # (both trees' pages)
        }
        page = int(stat["psize"])
        used = (int(info["last_pgno"]) + 1) * page
        return StoreStats(
            map_size=int(info["map_size"]),
            used_bytes=used,
            entries={col: int(s["entries"]) for col, s in stats.items()},
            tree_bytes={col: page * sum(int(s[k]) for k in pages) for col, s in stats.items()},
        )

    # -- writes ----------------------------------------------------------------------------

    def write(self, ops: Sequence[WriteOp]) -> None:
        """Apply every op in one transaction: all of them commit, or none."""
        self._check_open()
        if not ops:
            return
        prepared: list[Prepared | _Many] = []
        fresh: set[int] = set()
        pack = self._refs.pack
        sealed = self._cipher is not None
        # (Every op a `Put`, as a delta's batch: checked, packed and put in one pass in the
        # transaction, `_write_puts`.)
        puts = set(map(type, ops)) == _PUTS_ONLY
        began = putting = committing = 0.0  # (a bulk write's: `BulkTimes`)
        for op in () if puts else ops:
            if type(op) is Put:  # (most ops: checked and packed with no call but `pack`)
                key, column = op.key, op.column
                if not key or len(key) > _MAX_KEY_SIZE:
                    _check_key(key)  # (raises)
                stored = pack(op.value, fresh) if column is _STATE else op.value
                if sealed:
                    stored = self._seal(column, key, stored)
                prepared.append((column, key, stored))
                continue
            if not began:
                began = time.perf_counter()
            if isinstance(op, PutMany):
                if not op.rows:
                    continue
                column = op.column
                keys = [key for key, _ in op.rows]
                if not min(map(len, keys)) or max(map(len, keys)) > _MAX_KEY_SIZE:
                    for key in keys:
                        _check_key(key)  # (raises for the bad one)
                values = [value for _, value in op.rows]
                if column is Column.STATE:
                    values = self._refs.pack_many(values, fresh)
                if self._cipher is not None:
                    values = [self._seal(column, k, v) for k, v in zip(keys, values, strict=True)]
                prepared.append(_Many(column, keys, values))
                continue
            if isinstance(op, PutRun):
                if op.keys:
                    prepared.append(self._prepare_run(op, fresh))
                continue
            _check_key(op.key)
            if isinstance(op, Put):
                stored = pack(op.value, fresh) if op.column is Column.STATE else op.value
                prepared.append((op.column, op.key, self._seal(op.column, op.key, stored)))
            else:
                prepared.append((op.column, op.key, None))
        while True:
            added: list[bytes] = []
            try:
                with self._lock.shared(), self._env.begin(write=True) as txn:
                    if puts:
                        self._write_puts(txn, ops, fresh, added)  # type: ignore[arg-type]
                    else:
                        putting = time.perf_counter()
                        self._write_in(txn, prepared, added, fresh)
                    if fresh:
                        self._refs.persist(txn, fresh, self._meta_seal)
                    if not puts:
                        committing = time.perf_counter()
                if not puts:
                    self._note_bulk(began, putting, committing)
                self._refs.committed(fresh)
                return
            except lmdb.MapFullError:
                self._keys.rollback(added)
                self._grow()
            except lmdb.Error as exc:
                self._keys.rollback(added)
                raise StorageError(f"datastore write failed: {exc}") from None
            except BaseException:
                self._keys.rollback(added)
                raise

    def _note_bulk(self, began: float, putting: float, committing: float) -> None:
        """Count a bulk write that committed (`BulkTimes`; one writer at a time)."""
        bulk = self.bulk
        bulk.writes += 1
        bulk.preparing += putting - began
        bulk.putting += committing - putting
        bulk.committing += time.perf_counter() - committing

    def _prepare_run(self, op: PutRun, fresh: set[int]) -> _Many:
        """`write`'s preparation of a `PutRun`: its keys checked, values as stored."""
        column, head, keys = op.column, op.prefix, op.keys
        if len(op.values) != len(keys):
            raise ValueError("a PutRun needs one value per key")
        if not len(head) + min(map(len, keys)) or len(head) + max(map(len, keys)) > _MAX_KEY_SIZE:
            for key in keys:
                _check_key(head + key)  # (raises for the bad one)
        if column is not Column.STATE:
            values = list(op.values)
        elif self._bulk_put is not None and self._cipher is None:
            # (Packed as they are put, by `gil_free` without the GIL the event loop wants;
            # issue #17. Sealed values are packed first: sealing is Python.)
            return _Many(column, keys, op.values, head, packed=False)
        else:
            values = self._refs.pack_many(op.values, fresh)
        if self._cipher is not None:
            values = [self._seal(column, head + k, v) for k, v in zip(keys, values, strict=True)]
        return _Many(column, keys, values, head)

    def _write_puts(
        self, txn: lmdb.Transaction, ops: Sequence[Put], fresh: set[int], added: list[bytes]
    ) -> None:
        """`write` of puts alone (no delete, no `PutMany` or `PutRun`): a delta's batch, the
        common write. Each op is checked, packed (numbers not yet durable go to `fresh`) and
        put as it comes, in one pass: `putmulti` saves nothing on a few rows, and the runs
        `_write_in` gathers for it were ~400 of the ~1,500 bytecodes of a sequential call's
        write, a pass to prepare the ops before the transaction ~150 more (issue #16). A
        retry after the map grew packs them again: the same rows, the same numbers."""
        deltas, keys, dbs = self._deltas, self._keys, self._dbs
        numbers = keys.numbers
        put = txn.put
        pack = self._refs.pack
        sealed = self._cipher is not None
        for column, key, value in ops:
            if not key or len(key) > _MAX_KEY_SIZE:
                _check_key(key)  # (raises)
            stored = pack(value, fresh) if column is _STATE else value
            if sealed:
                stored = self._seal(column, key, stored)
            if column is _STATE or column is _DELTA:
                # (`keys.stored` inline for the common key: the context id, then the rest;
                # a shorter key is not in `numbers`.)
                tag = numbers.get(key[:_CONTEXT_BYTES])
                if tag is None:
                    stored_key = keys.stored(column, key, txn=txn, added=added)
                    assert stored_key is not None  # (a write transaction gives numbers)
                else:
                    stored_key = tag + key[_CONTEXT_BYTES:]
                if column is _DELTA:
                    deltas.put(txn, stored_key, stored)
                    continue
            elif column is _GENERIC:
                if len(key) == _CHECKPOINT_KEY_BYTES and key.startswith(CHECKPOINT_PREFIX):
                    index_key = keys.stored(
                        Column.DELTA, key[len(CHECKPOINT_PREFIX) :], txn=txn, added=added
                    )
                    assert index_key is not None
                    deltas.put_checkpoint(txn, index_key, stored)
                    continue
                stored_key = keys.stored(column, key, txn=txn, added=added)
                assert stored_key is not None
            else:  # (a column whose keys are stored as they are)
                stored_key = key
            put(stored_key, stored, db=dbs[column])

    def _write_in(
        self,
        txn: lmdb.Transaction,
        prepared: list[Prepared | _Many],
        added: list[bytes],
        fresh: set[int],
    ) -> None:
        """`write`'s ops in `txn` (contexts given numbers noted in `added`, value numbers
        not yet durable in `fresh`)."""
        deltas, keys = self._deltas, self._keys
        numbers = keys.numbers
        # Consecutive puts to one column go in one `putmulti` (a snapshot batch is
        # 100,000s of them: one C call instead of one put each).
        run: list[tuple[bytes, bytes]] = []
        run_column = Column.DELTA  # (no run yet)
        pack = functools.partial(self._refs.pack_many, fresh=fresh)
        for item in _singles(prepared, keys, txn, added, pack):
            if isinstance(item, _Stored):
                if run:
                    txn.cursor(db=self._dbs[run_column]).putmulti(run)
                    run = []
                self._put_stored(txn, item, fresh)
                continue
            column, key, stored = item
            checkpoint = (  # (`_is_checkpoint`, inline: it ran for every op)
                column is _GENERIC
                and len(key) == _CHECKPOINT_KEY_BYTES
                and key.startswith(CHECKPOINT_PREFIX)
            )
            if run and (column is not run_column or stored is None or checkpoint):
                txn.cursor(db=self._dbs[run_column]).putmulti(run)
                run = []
            if checkpoint:
                within = key[len(CHECKPOINT_PREFIX) :]
                index_key = (
                    keys.stored(Column.DELTA, within)
                    if stored is None
                    else keys.stored(Column.DELTA, within, txn=txn, added=added)
                )
                if index_key is not None:
                    deltas.put_checkpoint(txn, index_key, stored)
                continue
            if stored is None:
                stored_key = keys.stored(column, key)
                if stored_key is None:
                    continue  # (a context without a number has no rows to delete)
            elif (column is _STATE or column is _DELTA) and len(key) >= _CONTEXT_BYTES:
                # (`keys.stored` of a state or delta row, inline: the key is the context id
                # and the rest. Every local write puts both, issue #16.)
                tag = numbers.get(key[:_CONTEXT_BYTES])
                if tag is None:
                    stored_key = keys.stored(column, key, txn=txn, added=added)
                    assert stored_key is not None
                else:
                    stored_key = tag + key[_CONTEXT_BYTES:]
            elif column not in NUMBERED:  # (keys as they are: a context record's, say)
                stored_key = key
            else:
                stored_key = keys.stored(column, key, txn=txn, added=added)
                assert stored_key is not None  # (a write transaction gives numbers)
            if column is Column.DELTA:
                if stored is None:
                    deltas.delete(txn, stored_key)
                else:
                    deltas.put(txn, stored_key, stored)
            elif stored is None:
                txn.delete(stored_key, db=self._dbs[column])
            else:
                run.append((stored_key, stored))
                run_column = column
        if run:
            txn.cursor(db=self._dbs[run_column]).putmulti(run)

    def _put_stored(self, txn: lmdb.Transaction, rows: _Stored, fresh: set[int]) -> None:
        """Put a `_Stored`'s rows: with the GIL released once for them all when the
        extension is there (`gil_free`: py-lmdb takes the GIL back after every row, and
        waits for it while the event loop runs Python, issue #17), packing the values not
        packed yet as it goes; else with `putmulti`."""
        if self._bulk_put is not None:
            packer = None if rows.packed else self._refs.packer(fresh)
            name = self._names[rows.column]
            self._bulk_put(txn, name, rows.prefix, rows.keys, rows.values, packer=packer)
            return
        assert rows.packed  # (values are left unpacked only for `gil_free`)
        prefix = rows.prefix
        keys = [prefix + k for k in rows.keys] if prefix else rows.keys
        txn.cursor(db=self._dbs[rows.column]).putmulti(zip(keys, rows.values, strict=True))

    def put(self, column: Column, key: bytes, value: bytes) -> None:
        self.write([Put(column, key, value)])

    def delete(self, column: Column, key: bytes) -> None:
        self.write([Delete(column, key)])

    def _grow(self) -> None:
        with self._lock.exclusive():
            current = int(self._env.info()["map_size"])
            if current >= self._max_map_size:
                raise StorageError(
                    f"datastore is full: map size {current} bytes reached store.max_map_size"
                )
            self._env.set_mapsize(min(current * 2, self._max_map_size))
