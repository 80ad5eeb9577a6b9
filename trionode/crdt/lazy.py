"""Records kept as their row bytes until something reads them (issue 17: joins at
transport speed).

A snapshot brings a context's records as encoded bytes, and a join of a large context
mostly stores them and checks that they add up to the announced root: decoding each into
an `Entity` (five Python objects, a validating constructor) cost about as much as all the
rest of the joiner's work, and the cyclic collector then traversed those objects again and
again. Most records are never read afterwards, or only much later.

So a record on the *fast path* stays bytes: a `RowEntity` holds its row, and only what the
tree needs to file and hash it is read from those bytes (id, parent, kind). The fast path
is the canonical shape of the common records, checked byte for byte here (`scan`):

    97 01 c4 20 <parent: 32>  c4 <n> <name: n>  <kind>  <added: 92 <uint> c4 <m> <node>>
    c0 (removed: nil)  and a body that is nil, or (a register) 92 <added again> <value bin>

Every header has its shortest form (as the canonical encoder writes it), the register's
stamp is the record's `added` (what a write of it gives), and the row ends exactly after
its body. Such a row decodes (`decode_entity`) to a record whose `encode_entity` is the
row itself, and its Merkle leaf form (`encoding.own_form` under no removal above it) is
cut from the row's bytes: `[kind, name, added, body]`, a register's hash form being its
wire form. `tests/crdt/test_lazy.py` checks both against the decoder on valid, mutated and
random bytes. Anything else (a tombstone, a counter, a sequence, a longer name, any other
encoding) is decoded at once, as before, and refused there if it is bad.

A `RowEntity` is an `Entity`: the first read of anything but its id, parent and kind
decodes the row (the same checks as any record; a failure is a `CorruptRecord`, raised to
that reader alone, never a wrong value) and from then on it is an ordinary record. A write
to it decodes it first, so its row never disagrees with its state. Only the tree's hashing
and a liveness check under no removal use the row directly (`form`, `is_live`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from hashlib import sha256
from itertools import repeat
from operator import add, getitem
from typing import Any, Final, NoReturn, cast

from trionode.crdt import digests
from trionode.crdt.digests import Part
from trionode.crdt.encoding import MAX_ENTITY_BYTES, decode_entity, encode_entity
from trionode.crdt.entity import CONTAINERS, ID_DOMAIN, Entity, Kind
from trionode.crdt.hlc import MAX_NODE_ID_BYTES, Timestamp, latest
from trionode.errors import RemoteProtocolError

_HEAD: Final = b"\x97\x01\xc4\x20"
"""fixarray of 7, version 1, a 32-byte bin: the parent."""
_NAME: Final = 36
_KINDS: Final = {int(kind): kind for kind in Kind}
_REGISTER: Final = int(Kind.REGISTER)
_ID_DOMAIN: Final = ID_DOMAIN
_CONTAINER_BYTES: Final = frozenset(int(kind) for kind in CONTAINERS)
_FORM_HEADS: Final = [b"\x94" + bytes([kind]) for kind in range(256)]
"""The first two bytes of a leaf's hash form (`RowEntity.form`) by its row's kind byte."""
_sha256: Final = sha256
_digest: Final = type(sha256()).digest
_cut: Final = cast("Callable[[bytes, slice], bytes]", getitem)
"""`row[a slice]`, in `map` (a run's names and bodies, `take`)."""
_join: Final = b"".join
_native: Final = digests.native
_WHOLE: Final[tuple[Part, ...]] = ((0, -1),)
"""`digests.native`'s parts of an input hashed whole."""
_each: Final[Callable[[Iterable[object]], None]] = deque[object](maxlen=0).extend
"""Runs an iterator to its end in C (the bulk setters of `take`)."""


class CorruptRecord(RemoteProtocolError):
    """A record kept as bytes does not decode to what its row says (raised to the reader
    that first needs it; the other records are unaffected)."""


def scan(row: bytes) -> tuple[int, int] | None:
    """(offset of the kind, offset of `removed`) if `row` is on the fast path (module doc),
    else None (decode it). Written for speed: a snapshot scans every record. A stamp's time
    is an NTP64 time past 2**32 (any real clock's), so its shortest form is always `cf`
    and eight bytes."""
    try:
        if row[:4] != _HEAD or row[_NAME] != 0xC4 or len(row) > MAX_ENTITY_BYTES:
            return None
        kind_at = _NAME + 2 + row[_NAME + 1]
        node = row[kind_at + 12]
        if (
            row[kind_at + 1 : kind_at + 3] != b"\x92\xcf"
            or row[kind_at] not in _KINDS
            or row[kind_at + 3 : kind_at + 7] == b"\0\0\0\0"  # (a shorter form fits)
            or row[kind_at + 11] != 0xC4
            or node > MAX_NODE_ID_BYTES
        ):
            return None
        removed_at = kind_at + 13 + node
        tail = row[removed_at:]
        if tail == b"\xc0\xc0":  # no removal, no body
            return kind_at, removed_at
        # A register's body: [its stamp, which is `added`, value as bin].
        stamp = row[kind_at + 1 : removed_at]
        value = removed_at + 2 + len(stamp)
        if (
            row[kind_at] != _REGISTER
            or tail[:2] != b"\xc0\x92"
            or row[removed_at + 2 : value] != stamp
        ):
            return None
        head = row[value]
        if head == 0xC4:
            end = value + 2 + row[value + 1]
        elif head == 0xC5:
            length = int.from_bytes(row[value + 1 : value + 3])
            end = value + 3 + length if length >= 0x100 else -1
        elif head == 0xC6:
            length = int.from_bytes(row[value + 1 : value + 5])
            end = value + 5 + length if length >= 0x10000 else -1
        else:
            return None
    except IndexError:  # (shorter than its headers say)
        return None
    return (kind_at, removed_at) if end == len(row) else None


def _lazy(name: str) -> Any:
    """A property over `Entity`'s slot `name` that decodes a record held as its row first
    (`RowEntity._load`): a read gets the decoded value, a write joins into the record, never
    beside its row."""
    slot = Entity.__dict__[name]
    get, put = slot.__get__, slot.__set__

    def read(self: RowEntity) -> Any:
        if self.row is not None:
            self._load()
        return get(self)

    def write(self: RowEntity, value: object) -> None:
        if self.row is not None:
            self._load()
        put(self, value)

    return property(read, write, doc=slot.__doc__)


class RowEntity(Entity):
    """A record held as its row until first read (module doc). Made by `take`."""

    __slots__ = ("leaf", "row")

    row: bytes | None
    """The record's bytes while undecoded (None once decoded)."""
    leaf: bytes | None
    """While `row` is set: the Merkle hash of a leaf under no removal above it, the SHA-256
    of its `form` (hashed by `take`, in bulk); None for a container (its hash covers its
    children: the tree's) and once decoded."""

    # The parts of the record still in the row (name, added, removed, body) are read and
    # written through `_lazy`'s properties, which decode it first; everything else is a
    # plain slot. (Not `__getattr__`: a class with it pays for it on every attribute, a
    # lookup through a hook three times as slow as a slot's, and the tree reads a record's
    # id, parent, kind, row and leaf many times over.)
    name = _lazy("name")
    added = _lazy("added")
    removed = _lazy("removed")
    body = _lazy("body")

    def __setattr__(self, name: str, value: object) -> None:
        # `kind` is read as a plain slot, but a join may write it (the lower kind wins, its
        # body with it: `Entity.merge`): decoded first, as any write, or the row would say
        # one kind and the record another (and the body's write would refuse the row as
        # corrupt). Writes to a record held as its row are rare (a join into it, after which
        # it is decoded); `take` and `_load` set slots without this hook.
        if name == "kind" and self.row is not None:
            self._load()
        object.__setattr__(self, name, value)

    def _load(self) -> None:
        row = self.row
        assert row is not None
        try:
            entity = decode_entity(row)
        except RemoteProtocolError as exc:
            raise CorruptRecord(f"record {self.id.hex()[:12]} does not decode: {exc}") from None
        if entity.id != self.id or entity.kind != self.kind or encode_entity(entity) != row:
            raise CorruptRecord(f"record {self.id.hex()[:12]} is not what its row said")
        _set_name(self, entity.name)
        _set_added(self, entity.added)
        _set_removed(self, entity.removed)
        _set_body(self, entity.body)
        _set_leaf(self, None)
        _set_row(self, None)

    def form(self) -> bytes:
        """The row's Merkle leaf form under no removal above it (`encoding.own_form`): its
        kind, name, added and body, cut from the row (call only while `row` is set)."""
        row = self.row
        assert row is not None
        kind_at = _NAME + 2 + row[_NAME + 1]
        removed_at = kind_at + 13 + row[kind_at + 12]
        return (
            b"\x94"
            + row[kind_at : kind_at + 1]
            + row[_NAME:kind_at]
            + row[kind_at + 1 : removed_at]
            + row[removed_at + 1 :]
        )

    def is_live(self, floor: Timestamp | None = None) -> bool:
        if floor is None and self.row is not None:
            return True  # (the fast path has an `added` and no `removed`)
        return Entity.is_live(self, floor)

    def max_stamp(self) -> Timestamp | None:
        if self.row is None:
            return Entity.max_stamp(self)
        row = self.row
        return _added(row, _NAME + 2 + row[_NAME + 1])  # (a register's stamp is `added`)


def _setter(cls: type, name: str) -> Any:
    """A slot's own setter (bypasses `RowEntity`'s properties, which would decode)."""
    return cls.__dict__[name].__set__


_set_name = _setter(Entity, "name")
_set_added = _setter(Entity, "added")
_set_removed = _setter(Entity, "removed")
_set_body = _setter(Entity, "body")
_set_id = _setter(Entity, "id")
_set_parent = _setter(Entity, "parent")
_set_kind = _setter(Entity, "kind")
_set_row = _setter(RowEntity, "row")
_set_leaf = _setter(RowEntity, "leaf")
_new = object.__new__


def _added(row: bytes, kind_at: int) -> Timestamp:
    """The `added` stamp of a fast-path row."""
    return Timestamp(
        int.from_bytes(row[kind_at + 3 : kind_at + 11]),
        row[kind_at + 13 : kind_at + 13 + row[kind_at + 12]],
    )


def _decline() -> NoReturn:
    """A row is not on the fast path (`take` decodes it)."""
    raise IndexError


def take(
    records: Sequence[bytes], ids: Sequence[bytes] | None = None
) -> tuple[list[Entity], Timestamp | None]:
    """The records of a page or a read as entities, fast-path rows kept as bytes
    (`RowEntity`), and the newest stamp among them (for the clock-drift check).

    `ids`: the records' ids, when the caller holds them from a source it trusts (the keys
    of our own rows): a fast-path row then takes its id instead of hashing it (a SHA-256
    per record, a third of this function's time). Never for records from a peer.

    A fast-path leaf's Merkle digest is hashed here too (`RowEntity.leaf`), and both
    digests are hashed in bulk, after the loop: the loop collects what each hashes (an id's
    input is the domain and the parent, one bytes object per run of rows of one parent,
    then the name), and `map` hashes them and sets the slots without a Python step per row
    (a run of rows of one shape, below, is hashed as it is made, by `_made`).
    The rows of a run of one parent share its bytes object (32 bytes and a header per
    record less: a million records kept 65 MB of parents that were all the same).

    The fast path is `scan`'s, checked inline, and what consecutive rows share is checked
    once: a row that starts with the previous fast-path row's head (its parent) or carries
    its stamp (`added`, and a register's stamp again in its body) is compared with those
    bytes in one step, never parsed again (the rows of one write share both). Whatever
    differs from them is checked field by field as `scan` does; `test_lazy.py` holds the two
    to the same verdict on every row of any page.

    A row of the previous fast-path row's *shape* (its length, its bytes up to its name's,
    and its bytes from its kind to its value's, header included: the same parent, name
    length, kind, stamp and value length) differs from it only inside its name and its
    value, which the fast path reads as bytes of any value: it has that row's verdict and
    offsets, and the loop only counts it. Each run of such rows is made in bulk (`_made`):
    its records, their id inputs and leaf forms by `map` in C, no Python step per row (the
    rows of one write to a map of fixed-width keys and values: a joiner's common page).

    Raises:
        RemoteProtocolError: a record that is not on the fast path and does not decode.
    """
    out: list[Entity] = []
    append = out.append
    newest: Timestamp | None = None
    best = b""
    best_stamps: set[bytes] = set()
    """The stamps of the newest time (one per writer: the records of one write share it)."""
    kinds = _KINDS
    containers = _CONTAINER_BYTES
    heads = _FORM_HEADS
    join = b"".join
    keyed: list[Entity] = []
    keys: list[bytes] = []
    key = keys.append
    leafed: list[Entity] = []
    forms: list[bytes] = []
    form = forms.append
    parent = b""
    id_head = b""
    head = b"-"
    """The previous fast-path row's first bytes: its fixed head, parent and name's bin."""
    stamp = b"-"
    """The previous fast-path row's `added` (`92 cf <time> c4 <n> <node>`), checked."""
    body_head = b"-"
    """`removed` (nil) and a register's body head with that stamp: `c0 92 <stamp>`."""
    counted = b""
    """The last stamp counted for `newest` (by identity: a new one is a new object)."""
    most = MAX_ENTITY_BYTES
    shape_size = -1
    """The previous fast-path row's length (-1: no shape, the previous row was decoded)."""
    shape = b""
    """That row."""
    shape_head = b""
    """Its bytes up to its name's (the fixed head, the parent, the name's bin header); empty
    until a row of its length comes."""
    shape_mid = b""
    """Its bytes from its kind to its value's (the whole tail of a row with no body)."""
    kind_at = removed_at = kind = value = 0
    run = 0
    """Where the run of rows of the previous fast-path row's shape starts (after it)."""

    for at, row in enumerate(records):
        if len(row) == shape_size:
            if not shape_head:  # (cut once a row of its length follows)
                shape_head = shape[: _NAME + 2]
                shape_mid = shape[kind_at:value]
            # (Compared as slices: a slice and `==` cost less than `startswith`, whose
            # arguments are parsed from a tuple, on every row of a run.)
            if row[: _NAME + 2] == shape_head and row[kind_at:value] == shape_mid:
                continue  # (the previous fast-path row's shape: made with its run)
        if run < at:
            _made(
                records[run:at],
                None if ids is None else ids[run:at],
                out,
                shape=(parent, id_head, kind, kind_at, removed_at, stamp),
            )
        try:
            if not row.startswith(head):
                if row[:4] != _HEAD or row[_NAME] != 0xC4:
                    _decline()  # (not the fast path's head: decoded)
                head = row[: _NAME + 1]
                parent = row[4:_NAME]
                id_head = _ID_DOMAIN + parent
            kind_at = _NAME + 2 + row[_NAME + 1]
            if row.startswith(stamp, kind_at + 1):
                removed_at = kind_at + 1 + len(stamp)
            else:
                node = row[kind_at + 12]
                if (
                    row[kind_at + 1 : kind_at + 3] != b"\x92\xcf"
                    or row[kind_at + 3 : kind_at + 7] == b"\0\0\0\0"  # (a shorter form fits)
                    or row[kind_at + 11] != 0xC4
                    or node > MAX_NODE_ID_BYTES
                ):
                    _decline()
                removed_at = kind_at + 13 + node
                stamp = row[kind_at + 1 : removed_at]
                if len(stamp) != removed_at - kind_at - 1:
                    _decline()  # (cut inside the node id)
                body_head = b"\xc0\x92" + stamp
            kind = row[kind_at]
            size = len(row)
            if kind not in kinds or size > most:
                _decline()
            if size == removed_at + 2 and row.startswith(b"\xc0\xc0", removed_at):
                value = size  # no removal, no body
            elif kind != _REGISTER or not row.startswith(body_head, removed_at):
                _decline()
            else:
                # A register's body: [its stamp, which is `added`, value as bin].
                value = removed_at + len(body_head)
                bin_head = row[value]
                if bin_head == 0xC4:
                    value += 2
                    end = value + row[value - 1]
                elif bin_head == 0xC5:
                    length = int.from_bytes(row[value + 1 : value + 3])
                    value += 3
                    end = value + length if length >= 0x100 else -1
                elif bin_head == 0xC6:
                    length = int.from_bytes(row[value + 1 : value + 5])
                    value += 5
                    end = value + length if length >= 0x10000 else -1
                else:
                    end = -1
                if end != size:
                    _decline()
        except IndexError:  # (declined, or shorter than its headers say)
            shape_size, run = -1, at + 1
            entity = decode_entity(row)
            newest = latest(newest, entity.max_stamp())
            append(entity)
            continue
        shape, shape_size, shape_head, run = row, size, b"", at + 1
        if stamp is not counted:  # (a run of rows of one stamp counts it once)
            counted = stamp
            # The newest `added` by time alone (its eight big-endian bytes order as the
            # time does); the stamps of that time are kept, one per writer.
            time = stamp[2:10]
            if time >= best:
                if time > best:
                    best, best_stamps = time, set()
                best_stamps.add(stamp)
        record = _new(RowEntity)
        _set_row(record, row)
        _set_parent(record, parent)
        _set_kind(record, kinds[kind])
        if ids is None:
            keyed.append(record)
            key(id_head + row[_NAME + 2 : kind_at])
        else:
            _set_id(record, ids[at])
        if kind in containers:
            _set_leaf(record, None)  # (its hash covers its children: the tree's)
        else:
            # The leaf's form as `RowEntity.form` cuts it, in one join (its head per kind
            # made once, its stamp the one checked).
            leafed.append(record)
            form(join((heads[kind], row[_NAME:kind_at], stamp, row[removed_at + 1 :])))
        append(record)
    if run < len(records):
        _made(
            records[run:],
            None if ids is None else ids[run:],
            out,
            shape=(parent, id_head, kind, kind_at, removed_at, stamp),
        )
    if keys:
        _each(map(_set_id, keyed, _hash_all(keys)))
    if forms:
        _each(map(_set_leaf, leafed, _hash_all(forms)))
    for checked in best_stamps:
        newest = latest(newest, Timestamp(int.from_bytes(checked[2:10]), checked[12:]))
    return out, newest


def _hash_all(inputs: list[bytes]) -> Iterable[bytes]:
    """The SHA-256 of each of `inputs` (in C when built: `crdt/digests.py`)."""
    if _native is not None:
        return _native(inputs, _WHOLE)
    return map(_digest, map(_sha256, inputs))


def _made(
    rows: Sequence[bytes],
    ids: Sequence[bytes] | None,
    out: list[Entity],
    *,
    shape: tuple[bytes, bytes, int, int, int, bytes],
) -> None:
    """A run of fast-path rows of one `shape` (`take`: the parent, the id's input up to the
    name, the kind byte, the offsets of the kind and of `removed`, and the stamp, of the
    row before the run), made in bulk as `take`'s loop makes a row, appended to `out`: the
    records, their ids (hashed, unless given) and their leaves' digests. Each id's input
    and leaf form is made, hashed and dropped in one pipeline of `map`s, never held in a
    list (a page's forms were a second copy of its rows, written out to memory and read
    back to be hashed: now each is hashed while in the cache, its memory reused by the
    next)."""
    parent, id_head, kind, kind_at, removed_at, stamp = shape
    count = len(rows)
    records = list(map(_new, repeat(RowEntity, count)))
    _each(map(_set_row, records, rows))
    _each(map(_set_parent, records, repeat(parent, count)))
    _each(map(_set_kind, records, repeat(_KINDS[kind], count)))
    native = _native
    if ids is None:
        if native is not None:  # (hashed in C, its inputs never made: `crdt/digests.py`)
            _each(map(_set_id, records, native(rows, (id_head, (_NAME + 2, kind_at)))))
        else:
            name = slice(_NAME + 2, kind_at)
            keys = map(add, repeat(id_head, count), map(_cut, rows, repeat(name)))
            _each(map(_set_id, records, map(_digest, map(_sha256, keys))))
    else:
        _each(map(_set_id, records, ids))
    if kind in _CONTAINER_BYTES:
        _each(map(_set_leaf, records, repeat(None, count)))
    elif native is not None:
        form = (_FORM_HEADS[kind], (_NAME, kind_at), stamp, (removed_at + 1, -1))
        _each(map(_set_leaf, records, native(rows, form)))
    else:
        name_bin, body = slice(_NAME, kind_at), slice(removed_at + 1, None)
        parts = zip(
            repeat(_FORM_HEADS[kind], count),
            map(_cut, rows, repeat(name_bin)),
            repeat(stamp, count),
            map(_cut, rows, repeat(body)),
            strict=True,
        )
        _each(map(_set_leaf, records, map(_digest, map(_sha256, map(_join, parts)))))
    out.extend(records)
