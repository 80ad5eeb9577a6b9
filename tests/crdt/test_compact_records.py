"""Compact records (format 4 delta bodies, version 3 state rows): round trips of real
records, old formats still loading, and hostile input."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, strategies as st

from trionode.crdt import (
    HEAD,
    CounterState,
    Element,
    Entity,
    Kind,
    RegisterState,
    Slot,
    StateTree,
    TextState,
    Timestamp,
    VectorState,
    decode_entities,
    decode_entity,
    encode_entity,
)
from trionode.crdt.compact import (
    EXT_AUTHOR,
    EXT_HLC,
    EXT_RECORD,
    EXT_STAMP,
    ROW_VERSION,
    compact_entities,
    compact_records,
    encode_row,
    entity_row,
    expand_records,
    record_of_row,
    sealed_row,
)
from trionode.crdt.entity import ROOT_ID, child_id
from trionode.dag.delta import (
    GENESIS,
    AppEvent,
    DeltaBody,
    decode_compact_body,
    decode_delta,
    encode_compact_body,
    open_delta,
    seal_delta,
    verify_delta,
)
from trionode.errors import RemoteProtocolError

AUTHOR = Ed25519PrivateKey.generate()
AUTHOR_KEY = AUTHOR.public_key().public_bytes_raw()
OTHER = os.urandom(32)
HLC = 7_716_128_034_823_536_640
CONTEXT = os.urandom(32)
KEY = os.urandom(32)

nodes = st.sampled_from([AUTHOR_KEY, OTHER, b"a"])
times = st.one_of(st.integers(HLC - 300, HLC), st.integers(0, 70_000), st.just(HLC + 1))
stamps = st.builds(Timestamp, times, nodes)
maybe_stamps = st.none() | stamps
values = st.one_of(st.binary(max_size=40), st.just(AUTHOR_KEY), st.just(ROOT_ID))


@st.composite
def sequences(draw: st.DrawFn, *, text: bool) -> TextState | VectorState:
    ids = draw(st.lists(stamps, unique=True, max_size=6))
    elements: dict[Timestamp, Element[Any]] = {}
    for eid in ids:
        after = draw(st.sampled_from([HEAD, *ids]))
        if draw(st.booleans()):
            elements[eid] = Element(after, None, None, draw(stamps))
        elif text:
            elements[eid] = Element(after, draw(st.sampled_from("xyz")), None, None)
        else:
            elements[eid] = Element(after, draw(values), draw(maybe_stamps), None)
    return TextState(elements) if text else VectorState(elements)


BODIES: dict[Kind, st.SearchStrategy[Any]] = {
    Kind.REGISTER: st.builds(RegisterState, stamps, values),
    Kind.COUNTER: st.dictionaries(
        nodes, st.builds(Slot, stamps, st.integers(0, 2**64 - 1), st.integers(0, 4))
    ).map(CounterState),
    Kind.TEXT: sequences(text=True),
    Kind.VECTOR: sequences(text=False),
}


@st.composite
def bodies_of_records(draw: st.DrawFn) -> list[Entity]:
    """Records as a delta holds them: parents are the root, another record of the same
    delta (drawn before or after it), or some entity elsewhere."""
    out: list[Entity] = []
    for _ in range(draw(st.integers(0, 6))):
        parents = [ROOT_ID, bytes(range(32)), *(e.id for e in out)]
        kind = draw(st.sampled_from(list(Kind)))
        body = draw(st.none() | BODIES[kind]) if kind in BODIES else None
        out.append(
            Entity(
                draw(st.sampled_from(parents)),
                draw(st.binary(max_size=12)),
                kind,
                added=draw(maybe_stamps),
                removed=draw(maybe_stamps),
                body=body,
            )
        )
    return draw(st.permutations(out))


def _canonical(records: list[Entity]) -> list[bytes]:
    return [encode_entity(r) for r in records]


@given(bodies_of_records())
def test_compact_records_round_trip(records: list[Entity]) -> None:
    encoded = _canonical(records)
    items = compact_records(encoded, author=AUTHOR_KEY, hlc=HLC)
    expanded = expand_records([bytes(i) for i in items], author=AUTHOR_KEY, hlc=HLC)
    assert sorted(expanded) == sorted(encoded)
    # A local write passes the ids its entities hold: the same bytes, without hashing.
    given_ids = compact_records(encoded, author=AUTHOR_KEY, hlc=HLC, ids=[r.id for r in records])
    assert [bytes(i) for i in given_ids] == [bytes(i) for i in items]
    # Parents come before their children, so every reference points backwards.
    position = {child_id(e.parent, e.name): i for i, e in enumerate(decode_entities(expanded))}
    for i, entity in enumerate(decode_entities(expanded)):
        assert position.get(entity.parent, -1) < i


@given(bodies_of_records(), st.lists(st.binary(max_size=30), max_size=3), st.sampled_from([4, 5]))
def test_a_format_4_or_5_delta_round_trips(
    records: list[Entity], payloads: list[bytes], version: int
) -> None:
    body = DeltaBody(records=_canonical(records), events=[AppEvent("E", p) for p in payloads])
    delta = seal_delta(
        context_id=CONTEXT,
        parents=[GENESIS],
        author=AUTHOR,
        hlc=HLC,
        key_id=7,
        context_key=KEY,
        body=body,
        version=version,
    )
    received = decode_delta(delta.encode())
    header = verify_delta(received, context_id=CONTEXT, expected_id=delta.id)
    assert (header.version, header.context_id, header.hlc) == (version, CONTEXT, HLC)
    assert header.vv == [(AUTHOR_KEY[:8], 1)]
    opened = open_delta(received, header, KEY)
    assert sorted(opened.records) == sorted(body.records)
    assert opened.events == body.events


def test_a_kv_set_shrinks() -> None:
    """The records of one kv `set` (the map's stamp and the entry), author stamps at the
    delta's HLC: references replace every key, id and time the delta already holds."""
    stamp = Timestamp(HLC, AUTHOR_KEY)
    items = Entity(ROOT_ID, b"items", Kind.MAP, added=stamp)
    entry = Entity(
        items.id,
        b"\xad" + b"user:00000001",
        Kind.REGISTER,
        added=stamp,
        body=RegisterState(stamp, b"\xd9\x64" + b"v" * 100),
    )
    encoded = _canonical([entry, items])
    compacted = [bytes(i) for i in compact_records(encoded, author=AUTHOR_KEY, hlc=HLC)]
    assert sum(map(len, encoded)) == 337
    assert sum(map(len, compacted)) == 18 + 134
    assert expand_records(compacted, author=AUTHOR_KEY, hlc=HLC) == [encoded[1], encoded[0]]


def test_records_that_are_not_msgpack_arrays_travel_as_they_are() -> None:
    items = compact_records([b"r1", b"\x05"], author=AUTHOR_KEY, hlc=HLC)
    assert expand_records([bytes(i) for i in items], author=AUTHOR_KEY, hlc=HLC) == [
        b"r1",
        b"\x05",
    ]


# -- hostile -------------------------------------------------------------------------------


def _item(tree: object) -> bytes:
    return msgspec.msgpack.encode(tree)


def ext(code: int, data: bytes = b"") -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(code, data)


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ([b"\x92\x01"], "malformed"),  # truncated array
        ([b"\x91\x81\x80\x01"], "malformed"),  # a map keyed by a map (unhashable)
        ([b"\x91\xa2\x80\x80"], "malformed"),  # a string that is not UTF-8
        ([_item([1, ext(9)])], "unknown compact reference 9"),
        ([_item([1, ext(EXT_AUTHOR, b"x")])], "unknown compact reference 1"),
        ([_item([1, ext(EXT_HLC)])], "unknown compact reference 3"),
        ([_item([1, ext(EXT_RECORD, b"\x00")])], "later record"),
        ([_item([1, ext(EXT_RECORD, b"\x00\x00\x00\x01")])], "unknown compact reference 4"),
        ([_item(b"raw"), _item([1, ext(EXT_RECORD, b"\x00")])], "without id"),
        ([_item([1, {"a": 1}])], "no maps"),
        ([_item(5)], "an array or a byte string"),
        ([_item([[[[[[[[[[1]]]]]]]]]])], "nested too deeply"),
    ],
)
def test_hostile_compact_records_are_refused(items: list[bytes], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        expand_records(items, author=AUTHOR_KEY, hlc=HLC)


def test_times_below_zero_are_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="below zero"):
        expand_records([_item([ext(EXT_STAMP, b"\x09")])], author=AUTHOR_KEY, hlc=5)


def test_expansion_is_bounded() -> None:
    """Each 3-byte reference stands for 34 bytes: a small body cannot claim a huge one."""
    bomb = _item([ext(EXT_AUTHOR)] * 1000)
    assert len(expand_records([bomb], author=AUTHOR_KEY, hlc=HLC)[0]) > 30_000
    with pytest.raises(RemoteProtocolError, match="budget"):
        expand_records([bomb], author=AUTHOR_KEY, hlc=HLC, budget=10_000)
    with pytest.raises(RemoteProtocolError, match="budget"):
        expand_records([bomb] * 3, author=AUTHOR_KEY, hlc=HLC, budget=80_000)


@given(st.binary(max_size=300))
def test_garbage_bodies_only_raise_the_typed_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_compact_body(data, author=AUTHOR_KEY, hlc=HLC)


@given(st.lists(st.binary(max_size=60), max_size=4))
def test_garbage_records_only_raise_the_typed_error(items: list[bytes]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        expand_records(items, author=AUTHOR_KEY, hlc=HLC)


@pytest.mark.parametrize("version", [4, 5])
def test_a_body_with_a_root_hash_is_not_format_4_or_5(version: int) -> None:
    """Format 4/5 bodies have two fields; a format 2/3 body under a format 4/5 header fails."""
    old = msgspec.msgpack.encode(DeltaBody(records=[], events=[], root_hash=bytes(32)))
    with pytest.raises(RemoteProtocolError, match="malformed delta body"):
        decode_compact_body(old, author=AUTHOR_KEY, hlc=HLC, version=version)
    plain = encode_compact_body(
        DeltaBody(records=[], events=[]), author=AUTHOR_KEY, hlc=HLC, version=version
    )
    opened = decode_compact_body(plain, author=AUTHOR_KEY, hlc=HLC, version=version)
    assert opened == DeltaBody([], [])


# -- state rows (version 3) ------------------------------------------------------------------


def _row_of(entity: Entity) -> bytes:
    added = entity.added
    return encode_row(encode_entity(entity), None if added is None else (added.time, added.node))


@given(bodies_of_records())
def test_state_rows_round_trip_and_old_rows_still_load(records: list[Entity]) -> None:
    for entity in records:
        row = _row_of(entity)
        assert record_of_row(row) == encode_entity(entity)
        assert record_of_row(encode_entity(entity)) == encode_entity(entity)  # version 1
    tree = StateTree()
    tree.apply(records)
    rows = [(e.id, _row_of(e)) for e in tree.entities()]
    old = [(e.id, encode_entity(e)) for e in tree.entities()]
    mixed = [new if i % 2 else was for i, (new, was) in enumerate(zip(rows, old, strict=True))]
    for stored in (rows, old, mixed):
        loaded = StateTree.from_rows(stored)
        assert loaded.root_hash() == tree.root_hash()
        assert sorted(map(encode_entity, loaded.entities())) == sorted(
            map(encode_entity, tree.entities())
        )


def test_a_kv_entry_row_says_its_writer_and_time_once() -> None:
    stamp = Timestamp(HLC, AUTHOR_KEY)
    entry = Entity(
        child_id(ROOT_ID, b"items"),
        b"\xad" + b"user:00000001",
        Kind.REGISTER,
        added=stamp,
        body=RegisterState(stamp, b"\xd9\x64" + b"v" * 100),
    )
    assert len(encode_entity(entry)) == 247
    assert len(_row_of(entry)) == 210
    assert _row_of(entry)[:2] == bytes([0x94, ROW_VERSION])
    never_added = Entity(ROOT_ID, b"gone", Kind.MAP, removed=stamp)
    assert _row_of(never_added) == encode_entity(never_added)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (b"\x94\x03", "malformed state row"),  # truncated
        (b"\x94\x03\x81\x80\x01\x01\x01\x01", "malformed state row"),  # map key: a map
        (_item([3, -1, AUTHOR_KEY, [1]]), "bad stamp"),
        (_item([3, 5, "writer", [1]]), "bad stamp"),
        (_item([3, 5, AUTHOR_KEY, 7]), "no record"),
        (_item([3, 5, AUTHOR_KEY, [[[[[[[[[1]]]]]]]]]]), "nested too deeply"),
        (_item([3, 5, AUTHOR_KEY, [ext(EXT_RECORD, b"\x00")]]), "later record"),
        (_item([3, 5, AUTHOR_KEY, [ext(EXT_STAMP, b"\x09")]]), "below zero"),
        (_item([3, 5, AUTHOR_KEY, [{"a": 1}]]), "no maps"),
    ],
)
def test_hostile_state_rows_are_refused(row: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        record_of_row(row)


def test_state_row_expansion_is_bounded() -> None:
    bomb = _item([3, 5, AUTHOR_KEY, [ext(EXT_AUTHOR)] * 1000])
    assert len(record_of_row(bomb)) > 30_000
    with pytest.raises(RemoteProtocolError, match="budget"):
        record_of_row(bomb, budget=10_000)


@given(st.binary(max_size=200))
def test_garbage_state_rows_only_raise_the_typed_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_entity(record_of_row(b"\x94\x03" + data))


@given(bodies_of_records(), st.booleans())
def test_compacting_the_records_themselves_gives_the_same_bytes(
    records: list[Entity], with_leaves: bool
) -> None:
    """A local write compacts its records from the entities it holds (`compact_entities`),
    not from their encodings: the same bytes and the same leaves, whatever they hold."""
    leaves: list[bytes] | None = [] if with_leaves else None
    expected_leaves: list[bytes] | None = [] if with_leaves else None
    direct = compact_entities(records, author=AUTHOR_KEY, hlc=HLC, leaves=leaves)
    via_bytes = compact_records(
        _canonical(records), author=AUTHOR_KEY, hlc=HLC, leaves=expected_leaves
    )
    assert [bytes(i) for i in direct] == [bytes(i) for i in via_bytes]
    assert leaves == expected_leaves
    for entity in records:
        assert entity_row(entity) == _row_of(entity)


@given(bodies_of_records(), st.lists(st.binary(max_size=120), max_size=3))
def test_a_body_sealed_from_its_records_alone_is_the_same(
    records: list[Entity], payloads: list[bytes]
) -> None:
    """A local write hands sealing its records without their encodings (`records` left
    empty): the same body bytes, its payloads' references included."""
    events = [AppEvent("E", p) for p in payloads]
    canonical = _canonical(records)
    # (Payloads that repeat what the records hold, so that references are made.)
    events += [AppEvent("F", r) for r in canonical[:2]]
    whole = DeltaBody(records=canonical, events=events)
    alone = DeltaBody(records=[], events=events)
    for version in (4, 5):
        expected = encode_compact_body(whole, author=AUTHOR_KEY, hlc=HLC, version=version)
        assert (
            encode_compact_body(
                alone, author=AUTHOR_KEY, hlc=HLC, version=version, entities=records
            )
            == expected
        )


@st.composite
def local_writes(draw: st.DrawFn) -> list[Entity]:
    """Records as a local write seals them: most added by the author at the delta's HLC,
    some naming, or holding, the id of another record of the body."""
    out: list[Entity] = []
    for _ in range(draw(st.integers(1, 5))):
        ids = [e.id for e in out]
        parent = draw(st.sampled_from([ROOT_ID, AUTHOR_KEY, bytes(range(32)), *ids]))
        name = draw(st.binary(max_size=12) | st.sampled_from([ROOT_ID, *ids]))
        kind = draw(st.sampled_from([Kind.MAP, Kind.REGISTER, Kind.TEXT, Kind.COUNTER]))
        added = draw(st.just(Timestamp(HLC, AUTHOR_KEY)) | maybe_stamps)
        body: Any = None
        if kind is Kind.REGISTER:
            value = draw(values | st.sampled_from([AUTHOR_KEY, *ids]))
            body = draw(st.none() | st.just(RegisterState(draw(stamps), value)))
        elif kind in BODIES:
            body = draw(st.none() | BODIES[kind])
        removed = draw(st.none() | maybe_stamps)
        out.append(Entity(parent, name, kind, added=added, removed=removed, body=body))
    return draw(st.permutations(out))


@given(local_writes(), st.booleans())
def test_the_rows_made_while_sealing_are_the_records_rows(
    records: list[Entity], with_leaves: bool
) -> None:
    """A local write's sealing leaves the state rows of its records (`compact_entities`'s
    `rows`): each is the record's own row, and the body is the same as without them."""
    rows: dict[bytes, Any] = {}
    leaves: list[bytes] | None = [] if with_leaves else None
    made = compact_entities(records, author=AUTHOR_KEY, hlc=HLC, leaves=leaves, rows=rows)
    alone = compact_entities(records, author=AUTHOR_KEY, hlc=HLC, leaves=None)
    assert [bytes(i) for i in made] == [bytes(i) for i in alone]
    last = {e.id: e for e in records}  # (a body may name an id twice: the later is kept)
    for entity in last.values():
        row = sealed_row(entity, rows.get(entity.id))
        assert row is None or row == entity_row(entity)
    assert set(rows) <= set(last)


def test_a_kv_set_leaves_both_rows_and_a_changed_record_is_rowed_afresh() -> None:
    added = Timestamp(HLC, AUTHOR_KEY)
    items = Entity(ROOT_ID, b"items", Kind.MAP, added=added)
    entry = Entity(
        items.id, b"\xa3key", Kind.REGISTER, added=added, body=RegisterState(added, b"\xa1v")
    )
    rows: dict[bytes, Any] = {}
    compact_entities([entry, items], author=AUTHOR_KEY, hlc=HLC, leaves=[], rows=rows)
    assert set(rows) == {items.id, entry.id}
    for entity in (items, entry):
        assert sealed_row(entity.copy(), rows[entity.id]) == entity_row(entity)
    later = Timestamp(HLC + 1, AUTHOR_KEY)
    rewritten = entry.copy()
    rewritten.body = RegisterState(later, b"\xa1w")
    assert sealed_row(rewritten, rows[entry.id]) is None
    # Another writer's record, or one added before the delta's time, is not rowed here.
    elsewhere = Entity(ROOT_ID, b"x", Kind.MAP, added=Timestamp(HLC, OTHER))
    earlier = Entity(ROOT_ID, b"y", Kind.MAP, added=Timestamp(HLC - 1, AUTHOR_KEY))
    rows.clear()
    compact_entities([elsewhere, earlier], author=AUTHOR_KEY, hlc=HLC, rows=rows)
    assert rows == {}


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.binary(max_size=8)), max_size=8))
def test_a_tree_drains_the_rows_sealed_with_its_records_as_it_would_make_them(
    writes: list[tuple[bytes, bytes]],
) -> None:
    """`StateTree.sealed_rows`: rows made as records were sealed are drained only for the
    records that still hold what was sealed; the rows are those made without them."""
    tree, plain = StateTree(), StateTree()
    items = Entity(ROOT_ID, b"items", Kind.MAP, added=Timestamp(1, AUTHOR_KEY))
    for t in (tree, plain):
        t.apply([items.copy()])
        t.drain_rows()
    for n, (key, value) in enumerate(writes):
        stamp = Timestamp(HLC + n, AUTHOR_KEY)
        touched = Entity(ROOT_ID, b"items", Kind.MAP, added=stamp)
        entry = Entity(items.id, key, Kind.REGISTER, added=stamp, body=RegisterState(stamp, value))
        records = [entry, touched]
        compact_entities(records, author=AUTHOR_KEY, hlc=HLC + n, rows=tree.sealed_rows)
        tree.apply([r.copy() for r in records])
        plain.apply([r.copy() for r in records])
        if n % 2:  # (some writes drained one by one, others together, as a batch does)
            assert tree.drain_rows() == plain.drain_rows()
    assert tree.drain_rows() == plain.drain_rows()
