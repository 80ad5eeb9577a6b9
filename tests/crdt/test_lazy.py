"""Records kept as their rows (`trionode.crdt.lazy`): the fast path accepts only rows the
decoder reads back byte for byte, hashes them as the decoded record hashes, and a record
held as bytes behaves as the decoded one from its first read on; a bad row is refused at
intake or, at the latest, to the one reader that touches it."""

from __future__ import annotations

import os
from collections.abc import Callable
from hashlib import sha256
from typing import Final

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trionode.crdt import (
    Entity,
    Kind,
    StateTree,
    Timestamp,
    decode_entity,
    encode_entity,
    lazy as lazy_module,
)
from trionode.crdt.encoding import own_form
from trionode.crdt.entity import CONTAINERS, ROOT_ID, child_id
from trionode.crdt.lazy import CorruptRecord, RowEntity, scan, take
from trionode.crdt.register import RegisterState
from trionode.errors import RemoteProtocolError

NOW = 0xE9_0000_0000_0000_00  # an NTP64 time of this century (past 2**32)
MAP = child_id(ROOT_ID, b"\xa7entries")

times = st.one_of(
    st.integers(min_value=NOW, max_value=NOW + 10**6),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32]),
)
stamps = st.builds(Timestamp, times, st.binary(min_size=0, max_size=64))
names = st.one_of(st.binary(max_size=300), st.text(max_size=20).map(msgspec.msgpack.encode))
values = st.one_of(st.binary(max_size=300), st.binary(min_size=65536, max_size=65540), st.just(b""))


@st.composite
def entities(draw: st.DrawFn) -> Entity:
    """Records of every shape the fast path may see: registers (their stamp `added` or
    not), bodiless containers, tombstones, and other kinds."""
    kind = draw(st.sampled_from(list(Kind)))
    added = draw(st.one_of(st.none(), stamps))
    removed = draw(st.one_of(st.none(), st.none(), stamps))
    body = None
    if kind is Kind.REGISTER and draw(st.booleans()):
        stamp = draw(stamps)
        if added is not None and draw(st.booleans()):  # `added`, or a stamp of its form
            stamp = Timestamp(draw(st.sampled_from([added.time, added.time ^ 1])), added.node)
        body = RegisterState(stamp, draw(values))
    parent = draw(st.one_of(st.just(MAP), st.just(ROOT_ID), st.binary(min_size=32, max_size=32)))
    return Entity(parent, draw(names), kind, added=added, removed=removed, body=body)


def _same(lazy: Entity, decoded: Entity) -> None:
    assert lazy.id == decoded.id
    assert lazy.parent == decoded.parent
    assert lazy.kind == decoded.kind
    assert lazy.max_stamp() == decoded.max_stamp()
    assert lazy.is_live() == decoded.is_live()
    if isinstance(lazy, RowEntity) and lazy.row is not None:
        assert lazy.form() == own_form(decoded, None)
        # A leaf's digest is hashed when it comes (a container's covers its children).
        leaf = None if lazy.kind in CONTAINERS else sha256(own_form(decoded, None)).digest()
        assert lazy.leaf == leaf
    assert lazy == decoded  # (reads the record: decodes the row)
    assert encode_entity(lazy) == encode_entity(decoded)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(entities())
def test_a_record_held_as_its_row_is_the_decoded_record(entity: Entity) -> None:
    row = encode_entity(entity)
    decoded = decode_entity(row)
    (lazy,), newest = take([row])
    assert newest == decoded.max_stamp()
    _same(lazy, decoded)


def test_the_common_records_stay_bytes_and_the_rest_are_decoded() -> None:
    stamp = Timestamp(NOW, os.urandom(32))
    entry = Entity(MAP, b"\xa3key", Kind.REGISTER, added=stamp, body=RegisterState(stamp, b"\x01"))
    container = Entity(ROOT_ID, b"\xa7entries", Kind.MAP, added=stamp)
    tombstone = Entity(MAP, b"\xa3old", Kind.REGISTER, added=stamp, removed=stamp)
    older = Timestamp(NOW - 1, stamp.node)
    rewritten = Entity(
        MAP, b"\xa3new", Kind.REGISTER, added=stamp, body=RegisterState(older, b"\x02")
    )
    got, _ = take([encode_entity(e) for e in (entry, container, tombstone, rewritten)])
    assert [type(e) for e in got] == [RowEntity, RowEntity, Entity, Entity]


def _mutations(row: bytes, data: st.DataObject) -> bytes:
    how = data.draw(st.sampled_from(["flip", "cut", "grow", "splice"]))
    at = data.draw(st.integers(0, len(row) - 1))
    if how == "flip":
        return row[:at] + bytes([data.draw(st.integers(0, 255))]) + row[at + 1 :]
    if how == "cut":
        return row[:at]
    if how == "grow":
        return row[:at] + data.draw(st.binary(min_size=1, max_size=4)) + row[at:]
    return row[:at] + row[at + 1 :]


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(entities(), st.data())
def test_any_row_the_fast_path_takes_decodes_back_to_itself(
    entity: Entity, data: st.DataObject
) -> None:
    """Mutated and random rows: whatever `scan` accepts, the decoder accepts too and
    re-encodes to the same bytes (so the hash cut from the row is the record's); whatever
    it declines, `take` treats as the decoder does."""
    row = data.draw(
        st.one_of(st.just(encode_entity(entity)), st.binary(max_size=200)).map(
            lambda r: _mutations(r, data) if r and data.draw(st.booleans()) else r
        )
    )
    try:
        decoded: Entity | None = decode_entity(row)
    except RemoteProtocolError:
        decoded = None
    if scan(row) is not None:
        assert decoded is not None
        assert encode_entity(decoded) == row
    if decoded is None:
        with pytest.raises(RemoteProtocolError):
            take([row])
    else:
        (lazy,), _ = take([row])
        _same(lazy, decoded)


def _taken_alone(row: bytes) -> tuple[type, bytes, bytes | None] | None:
    """What `take` makes of `row` on a page of its own: (type, id, leaf), or None if it is
    refused."""
    try:
        (got,), _ = take([row])
    except RemoteProtocolError:
        return None
    return type(got), got.id, got.leaf if isinstance(got, RowEntity) else None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entities(), min_size=1, max_size=6), st.data())
def test_a_page_takes_each_row_as_that_row_alone(
    records: list[Entity], data: st.DataObject
) -> None:
    """`take` checks once what consecutive rows share (the head with their parent, the
    stamp): a page of rows of a few records, their mutations (a byte of the shared parts
    changed, cut inside them, one shared part with the next one's), in any order, makes
    of every row what `take` and `scan` make of it alone, and the newest stamp of those
    that decode."""
    rows = [encode_entity(e) for e in records]
    for _ in range(data.draw(st.integers(0, 12), label="mutants")):
        base = data.draw(st.sampled_from(rows))
        if not base:
            continue
        how = data.draw(st.sampled_from(["flip", "cut", "swap", "same"]))
        at = data.draw(st.integers(0, min(len(base), 120) - 1))
        if how == "flip":
            rows.append(base[:at] + bytes([data.draw(st.integers(0, 255))]) + base[at + 1 :])
        elif how == "cut":
            rows.append(base[:at])
        elif how == "swap":  # the start of one row, the rest of another
            other = data.draw(st.sampled_from(rows))
            rows.append(base[:at] + other[at:])
        else:
            rows.append(base)
    _takes_each_row_as_alone(data.draw(st.permutations(rows)), keyed=False)


def _takes_each_row_as_alone(page: list[bytes], *, keyed: bool) -> None:
    """`take` of `page` refuses it if any row alone is refused, and otherwise makes every
    row as `take` and `scan` make it alone (with our own ids given when `keyed`), with the
    newest stamp of the rows that decode."""
    alone = [_taken_alone(row) for row in page]
    if None in alone:
        with pytest.raises(RemoteProtocolError):
            take(page)
        return
    ids = [got[1] for got in alone if got is not None] if keyed else None
    got, newest = take(page, ids)
    assert [(type(e), e.id, e.leaf if isinstance(e, RowEntity) else None) for e in got] == alone
    assert [type(e) is RowEntity for e in got] == [scan(row) is not None for row in page]
    decoded = [decode_entity(row) for row in page]
    assert newest == max((s for s in (e.max_stamp() for e in decoded) if s), default=None)
    for lazy, eager in zip(got, decoded, strict=True):
        _same(lazy, eager)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(entities(), max_size=40), st.data())
def test_a_tree_of_rows_hashes_and_reads_as_the_decoded_tree(
    records: list[Entity], data: st.DataObject
) -> None:
    """Containers, removals above rows (a floor: the row is decoded to be hashed),
    records read, written and joined at random: the same roots and records throughout."""
    top = Entity(ROOT_ID, b"\xa7entries", Kind.MAP, added=Timestamp(NOW, b"w"))
    rows = [encode_entity(e) for e in [top, *records]]
    lazy_tree, eager_tree = StateTree(), StateTree()
    entities_, newest = take(rows)
    lazy_tree.add_new(entities_, newest=newest)
    eager_tree.apply(decode_entity(r) for r in rows)
    assert lazy_tree.root_hash() == eager_tree.root_hash()
    assert lazy_tree.max_stamp == eager_tree.max_stamp
    ids = sorted({decode_entity(r).id for r in rows})
    for _ in range(data.draw(st.integers(0, 4))):
        eid = data.draw(st.sampled_from(ids))
        if data.draw(st.booleans()):
            assert lazy_tree.node(eid) == eager_tree.node(eid)
        else:  # another write of that record, or of a removal of the container
            update = data.draw(entities())
            mine = eager_tree.get(eid)
            assert mine is not None
            joined = Entity(mine.parent, mine.name, mine.kind, added=update.added)
            lazy_tree.apply([joined])
            eager_tree.apply([joined])
        assert lazy_tree.root_hash() == eager_tree.root_hash()
    assert lazy_tree.entities() == eager_tree.entities()


def test_a_write_to_a_record_held_as_its_row_decodes_it_first() -> None:
    stamp = Timestamp(NOW, b"w")
    row = encode_entity(
        Entity(MAP, b"\xa1k", Kind.REGISTER, added=stamp, body=RegisterState(stamp, b"\x07"))
    )
    (lazy,), _ = take([row])
    assert isinstance(lazy, RowEntity)
    lazy.removed = Timestamp(NOW + 1, b"w")
    assert lazy.row is None
    assert lazy.body == RegisterState(stamp, b"\x07")
    assert not lazy.is_live()


@pytest.mark.parametrize("merged", ["no stamps", "a newer added"])
def test_a_join_that_lowers_the_kind_of_a_record_held_as_its_row_decodes_it_first(
    merged: str,
) -> None:
    """Two records of one id and different kinds (concurrent writes of one name): the lower
    kind wins with its body (`Entity.merge`). Into a record held as its row, that wrote its
    kind slot and then refused its own row as corrupt, as no longer of its kind."""
    stamp = Timestamp(NOW, b"w")
    counter = Entity(MAP, b"\xa1k", Kind.COUNTER, added=stamp)
    added = None if merged == "no stamps" else Timestamp(NOW + 1, b"v")
    other = Entity(MAP, b"\xa1k", Kind.OBJECT, added=added)
    (lazy,), _ = take([encode_entity(counter)])
    assert isinstance(lazy, RowEntity)
    eager = decode_entity(encode_entity(counter))
    assert lazy.merge(other.copy()) == eager.merge(other.copy())
    assert lazy.row is None
    assert lazy == eager
    assert encode_entity(lazy) == encode_entity(eager)
    tree_lazy, tree_eager = StateTree(), StateTree()
    tree_lazy.add_new(take([encode_entity(counter), encode_entity(other)])[0])
    tree_eager.apply([counter.copy(), other.copy()])
    assert tree_lazy.root_hash() == tree_eager.root_hash()
    assert tree_lazy.entities() == tree_eager.entities()


def _unchecked(row: bytes, like: Entity) -> RowEntity:
    """A RowEntity over `row` that never went through `scan` (what a bug there, or a row
    changed in memory, would leave): `take` of a good row, its bytes then swapped."""
    (lazy,), _ = take([encode_entity(like)])
    assert isinstance(lazy, RowEntity)
    object.__setattr__(lazy, "row", row)
    return lazy


def test_a_bad_row_is_refused_to_its_reader_alone() -> None:
    stamp = Timestamp(NOW, b"w")
    good = [
        Entity(MAP, f"k{i}".encode(), Kind.REGISTER, added=stamp, body=RegisterState(stamp, b"1"))
        for i in range(3)
    ]
    bad_like = Entity(MAP, b"bad", Kind.REGISTER, added=stamp, body=RegisterState(stamp, b"1"))
    other = Entity(MAP, b"other", Kind.REGISTER, added=stamp)
    bad = _unchecked(encode_entity(other), bad_like)  # another record's row
    worse = _unchecked(b"\x97\x01\xc4 " + bytes(40), bad_like)  # no record at all
    tree = StateTree()
    items, _ = take([encode_entity(e) for e in good])
    tree.add_new([*items, bad])
    readers: list[Callable[[], object]] = [
        lambda: bad.body,
        lambda: bad.added,
        lambda: tree.get(bad.id).copy(),  # type: ignore[union-attr]
    ]
    for reader in readers:
        with pytest.raises(CorruptRecord):
            reader()
    with pytest.raises(CorruptRecord):
        _ = worse.name
    assert isinstance(bad.row, bytes)  # still refused on the next read, never half-decoded
    for record in good:
        held = tree.get(record.id)
        assert held == record


def _row_with(**parts: bytes) -> bytes:
    """A register row of `MAP`, field by field (each a msgpack encoding), canonical unless a
    part is given in another form."""
    node = b"\xc4\x20" + bytes(range(32))
    stamp = parts.get("stamp", b"\x92\xcf" + NOW.to_bytes(8, "big") + node)
    return (
        b"\x97\x01\xc4\x20"
        + MAP
        + parts.get("name", b"\xc4\x03key")
        + parts.get("kind", b"\x02")
        + stamp
        + parts.get("removed", b"\xc0")
        + b"\x92"
        + parts.get("body_stamp", stamp)
        + parts.get("value", b"\xc4\x01\x07")
        + parts.get("tail", b"")
    )


@pytest.mark.parametrize(
    "parts",
    [
        {"stamp": b"\x92\xcf" + (5).to_bytes(8, "big") + b"\xc4\x01w"},  # time in a long form
        {"name": b"\xc5\x00\x03key"},  # name in a long form
        {"value": b"\xc5\x00\x01\x07"},  # value in a long form
        {"value": b"\xc4\x02\x07"},  # value shorter than it says
        {"tail": b"\xc0"},  # a byte after the record
        {"kind": b"\x09"},  # no such kind
        {"kind": b"\x04"},  # a map with a register's body
        {"stamp": b"\x92\xcf" + NOW.to_bytes(8, "big") + b"\xc4\x41" + bytes(65)},  # node > 64
    ],
)
def test_rows_in_any_other_form_are_decoded_and_refused_there(parts: dict[str, bytes]) -> None:
    row = _row_with(**parts)
    assert scan(row) is None
    try:
        decoded = decode_entity(row)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            take([row])
        return
    (got,), _ = take([row])  # a form the decoder reads: decoded now, hashed as decoded
    assert type(got) is Entity
    assert got == decoded


def test_the_canonical_row_is_on_the_fast_path() -> None:
    row = _row_with()
    assert scan(row) is not None
    assert encode_entity(decode_entity(row)) == row
    node = b"\xc4\x20" + bytes(range(32))
    future = _row_with(body_stamp=b"\x92\xcf" + (NOW + 1).to_bytes(8, "big") + node)
    assert scan(future) is None  # its body's stamp is not `added`: decoded, drift-checked


@st.composite
def shaped(draw: st.DrawFn) -> list[bytes]:
    """Rows of a few shapes (one parent, kind, stamp and name and value lengths each: the
    rows of one write of fixed-width keys and values), with names and values of any bytes,
    and one-byte mutants of them (the same length: maybe of the same shape), most in what
    a shape holds (the bytes outside the name and the value), most next to their row; in
    runs, or mixed with each other and with rows of every other form."""
    rows: list[bytes] = []
    for _ in range(draw(st.integers(1, 3), label="shapes")):
        parent = draw(st.sampled_from([MAP, ROOT_ID, b"\x01" * 32]))
        kind = draw(st.sampled_from(list(Kind)))
        stamp = draw(stamps)
        width = draw(st.integers(0, 40))
        size = draw(st.sampled_from([0, 1, 80, 255, 256, 300])) if kind is Kind.REGISTER else -1
        for _ in range(draw(st.integers(1, 10), label="rows of the shape")):
            name = draw(st.binary(min_size=width, max_size=width))
            body = None
            if size >= 0:
                body = RegisterState(stamp, draw(st.binary(min_size=size, max_size=size)))
            rows.append(encode_entity(Entity(parent, name, kind, added=stamp, body=body)))
    for _ in range(draw(st.integers(0, 8), label="mutants")):
        where = draw(st.integers(0, len(rows) - 1))
        base = rows[where]
        cut = scan(base)
        skeleton = list(range(min(len(base), _NAME_AT)))
        if cut is not None:
            skeleton += range(cut[0], len(base) - len(_value_of(base)))
        at = draw(st.one_of(st.sampled_from(skeleton), st.integers(0, len(base) - 1)))
        mutant = base[:at] + bytes([draw(st.integers(0, 255))]) + base[at + 1 :]
        rows.insert(draw(st.sampled_from([where + 1, where + 1, where, len(rows)])), mutant)
    rows += [encode_entity(e) for e in draw(st.lists(entities(), max_size=3))]
    if draw(st.integers(0, 3)) == 0:
        rows = draw(st.permutations(rows))
    return rows


_NAME_AT: Final = 38
"""Where a fast-path row's name starts (after the head, the parent and the name's bin)."""


def _value_of(row: bytes) -> bytes:
    """A register row's value (empty for other rows)."""
    body = decode_entity(row).body
    return body.value if isinstance(body, RegisterState) else b""


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(shaped(), st.booleans())
def test_a_run_of_rows_of_one_shape_takes_each_row_as_that_row_alone(
    page: list[bytes], keyed: bool
) -> None:
    """A row of the previous fast-path row's shape is made in bulk with its run, unparsed
    (`take`): every row of any page of such runs, their one-byte mutants and other rows,
    is made as `take` and `scan` make it alone, with our own ids given or hashed."""
    _takes_each_row_as_alone(page, keyed=keyed)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(shaped(), st.booleans())
def test_a_page_takes_the_same_records_with_its_digests_hashed_by_hashlib(
    page: list[bytes], keyed: bool
) -> None:
    """The digests hashed in C (`crdt/digests.py`, when built) or through hashlib: any page
    of runs, mutants and other rows is taken to the same records, ids and leaves (or
    refused by both)."""
    ids = None
    if keyed:
        alone = [_taken_alone(row) for row in page]
        ids = [got[1] for got in alone if got is not None]
        if len(ids) < len(page):
            return  # (refused: the run test checks that)
    taken: list[tuple[list[tuple[type, bytes, bytes | None]], Timestamp | None] | None] = []
    for native in (lazy_module._native, None):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lazy_module, "_native", native)
            try:
                got, newest = take(page, ids)
            except RemoteProtocolError:
                taken.append(None)
                continue
        made = [(type(e), e.id, e.leaf if isinstance(e, RowEntity) else None) for e in got]
        taken.append((made, newest))
    assert taken[0] == taken[1]


@pytest.mark.parametrize("size", [0, 3, 300])
def test_a_row_that_differs_from_its_shape_in_any_byte_of_it_is_taken_as_alone(
    size: int,
) -> None:
    """Every byte of a shape (outside the name and the value), changed in a row of one
    like it that follows it: the row is made as it would be alone (or the page refused)."""
    stamp = Timestamp(NOW, b"node")
    body = RegisterState(stamp, bytes(range(size % 256)) * (size // 256 + 1))
    rows = [
        encode_entity(Entity(MAP, name, Kind.REGISTER, added=stamp, body=body))
        for name in (b"\xa4key1", b"\xa4key2")
    ]
    cut = scan(rows[0])
    assert cut is not None
    value = len(rows[0]) - len(_value_of(rows[0]))
    for at in [*range(_NAME_AT), *range(cut[0], value)]:
        for byte in {rows[1][at] ^ 1, rows[1][at] + 1 & 0xFF, 0xC0, 0}:
            page = [rows[0], rows[1], rows[1][:at] + bytes([byte]) + rows[1][at + 1 :]]
            alone = [_taken_alone(row) for row in page]
            if None in alone:
                with pytest.raises(RemoteProtocolError):
                    take(page)
                continue
            got, _ = take(page)
            assert [
                (type(e), e.id, e.leaf if isinstance(e, RowEntity) else None) for e in got
            ] == alone


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entities(), max_size=30), st.data())
def test_the_newest_stamp_of_a_page_is_its_records_newest(
    records: list[Entity], data: st.DataObject
) -> None:
    """Many rows of one write share a stamp; rows of one time may differ by writer."""
    rows = [encode_entity(e) for e in records]
    rows += [rows[data.draw(st.integers(0, len(rows) - 1))] for _ in rows[:5]]
    _, newest = take(rows)
    stamps = [s for s in (decode_entity(r).max_stamp() for r in rows) if s is not None]
    assert newest == max(stamps, default=None)


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.integers(65, 400),
    st.lists(st.integers(1, 300), min_size=1, max_size=8),
    st.sampled_from(["ids", "shuffled", "reversed"]),
    st.data(),
)
def test_a_large_container_filled_batch_by_batch_hashes_as_one_built_at_once(
    size: int, cuts: list[int], order: str, data: st.DataObject
) -> None:
    """A map past the bucketing threshold, its records (some removed, some held already,
    the map itself somewhere among them) added in batches with the root asked for after
    each: only the buckets a batch fills are hashed again, and every root is the root of
    a tree built from those records at once."""
    stamp = Timestamp(NOW, b"w")
    top = Entity(ROOT_ID, b"\xa7entries", Kind.MAP, added=stamp)
    records: list[Entity] = [top]
    every = data.draw(st.integers(2, 20), label="one removed in")
    for i in range(size):
        removed = stamp if i % every == 0 else None
        body = RegisterState(stamp, i.to_bytes(2, "big"))
        name = msgspec.msgpack.encode(f"key:{i}")
        records.append(Entity(top.id, name, Kind.REGISTER, added=stamp, removed=removed, body=body))
    if order == "ids":
        records.sort(key=lambda e: e.id)
    elif order == "reversed":
        records.sort(key=lambda e: e.id, reverse=True)
    else:
        records = data.draw(st.permutations(records))
    rows = [encode_entity(e) for e in records]
    tree = StateTree()
    start = 0
    for cut in [*cuts, len(rows)]:
        end = min(len(rows), start + cut)
        again = data.draw(st.integers(0, min(3, start)))  # some held already (not past the first)
        batch, newest = take(rows[start - again : end])
        tree.add_new(batch, newest=newest)
        built = StateTree(decode_entity(r) for r in rows[:end])
        assert tree.root_hash() == built.root_hash()
        start = end
        if start == len(rows):
            break


def test_our_own_rows_take_their_ids_from_their_keys() -> None:
    """`take(rows, ids)`: the ids given, not hashed (the rows' keys); the same records."""
    stamp = Timestamp(NOW, b"w")
    rows = [
        encode_entity(
            Entity(
                MAP, f"k{i}".encode(), Kind.REGISTER, added=stamp, body=RegisterState(stamp, b"v")
            )
        )
        for i in range(5)
    ]
    hashed, newest = take(rows)
    keyed, keyed_newest = take(rows, [e.id for e in hashed])
    assert [e.id for e in keyed] == [e.id for e in hashed]
    assert keyed == hashed
    assert keyed_newest == newest


def test_a_bucket_of_rows_with_records_read_and_written_hashes_as_the_decoded_one() -> None:
    """The digests a large map's bucket joins at once (`RowEntity.leaf`) are dropped with
    the row: a record read (decoded), written, removed or a container among them hashes
    the bucket child by child, to the root of the same records decoded."""
    stamp = Timestamp(NOW, b"w")
    later = Timestamp(NOW + 1, b"w")
    top = Entity(ROOT_ID, b"\xa7entries", Kind.MAP, added=stamp)
    records = [top] + [
        Entity(
            top.id,
            msgspec.msgpack.encode(f"key:{i}"),
            Kind.REGISTER,
            added=stamp,
            body=RegisterState(stamp, i.to_bytes(2, "big")),
        )
        for i in range(600)
    ]
    records.append(Entity(top.id, b"\xa3sub", Kind.MAP, added=stamp))
    rows = [encode_entity(e) for e in sorted(records, key=lambda e: e.id)]
    lazy_tree = StateTree()
    taken, newest = take(rows)
    lazy_tree.add_new(taken, newest=newest)
    eager_tree = StateTree(decode_entity(r) for r in rows)
    assert lazy_tree.root_hash() == eager_tree.root_hash()
    entries = [e for e in taken if e.kind is Kind.REGISTER]
    read, written, removed = entries[0], entries[300], entries[599]
    assert isinstance(read, RowEntity)
    assert read.body is not None  # (read: decoded, its digest dropped)
    assert read.row is None
    assert read.leaf is None
    for tree in (lazy_tree, eager_tree):
        tree.apply(
            [
                Entity(top.id, written.name, Kind.REGISTER, added=later),
                Entity(top.id, removed.name, Kind.REGISTER, removed=later),
            ]
        )
        tree.entity_hash(read.id)  # (a hash asked alone is cached)
    assert lazy_tree.root_hash() == eager_tree.root_hash()
    assert lazy_tree.node(top.id) == eager_tree.node(top.id)
