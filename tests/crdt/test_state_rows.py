"""State rows: a Text keystroke writes its delta, and the rows always read back as the tree."""

from __future__ import annotations

import contextlib
from unittest.mock import patch

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trionode.crdt import Entity, HybridClock, StateTree, encode_entity, text
from trionode.crdt.canonical import canonical
from trionode.crdt.encoding import decode_journal, encode_journal
from trionode.crdt.rows import Row, RowLoad
from trionode.errors import RemoteProtocolError

from .crdt_helpers import SECOND, T0, Replica, perform, records, snapshot, wire


def _write(store: dict[bytes, bytes], rows: list[Row]) -> int:
    """Apply rows like one LMDB batch; returns the bytes put."""
    written = 0
    for key, value in rows:
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
            written += len(key) + len(value)
    return written


def test_a_keystroke_writes_its_delta_not_the_whole_text() -> None:
    tree = StateTree()
    clock = HybridClock(b"a" * 32)
    store: dict[bytes, bytes] = {}
    per_keystroke: list[int] = []
    for i in range(3000):
        with tree.begin(clock, T0 + i * 1000) as tx:
            body = tx.field("t", text())
            if i % 7 == 6:
                body.delete(len(body) // 2, 1)
            else:
                body.insert(len(body) // 3, "x")
            tx.commit()
        per_keystroke.append(_write(store, tree.drain_rows()))
    whole = sum(len(encode_entity(e)) for e in tree.entities())
    assert whole > 20_000  # the Text record itself
    # A keystroke writes a few hundred bytes (its delta); now and then the journal is
    # folded into a rewritten base, so the whole run wrote ~13 times the final Text,
    # where rewriting the Text per keystroke would write ~1,500 times it.
    assert sorted(per_keystroke)[len(per_keystroke) // 2] < 400
    assert sum(per_keystroke) < 20 * whole
    assert StateTree.from_rows(store.items()).root_hash() == tree.root_hash()
    assert records(StateTree.from_rows(store.items())) == records(tree)


def test_the_journal_is_folded_into_the_base_once_it_outgrows_it() -> None:
    tree = StateTree()
    clock = HybridClock(b"a")
    store: dict[bytes, bytes] = {}
    with patch("trionode.crdt.rows.JOURNAL_MIN_BYTES", 0):
        for i in range(200):
            with tree.begin(clock, T0 + i) as tx:
                tx.field("t", text()).insert(0, "y")
                tx.commit()
            _write(store, tree.drain_rows())
            bases = [v for k, v in store.items() if len(k) == 32]
            journal = sum(len(v) for k, v in store.items() if len(k) == 36)
            assert journal <= max(len(v) for v in bases)  # bounded by the base's size
    loaded = StateTree.from_rows(store.items())
    assert records(loaded) == records(tree)
    # The loaded tree knows its journal rows: the next fold deletes every one of them.
    with patch("trionode.crdt.rows.JOURNAL_MIN_BYTES", 0):
        for i in range(300):
            with loaded.begin(clock, T0 + 1000 + i) as tx:
                tx.field("t", text()).insert(0, "z")
                tx.commit()
            _write(store, loaded.drain_rows())
    assert records(StateTree.from_rows(store.items())) == records(loaded)
    assert sum(len(k) == 36 for k in store) < 300


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(st.data())
def test_rows_read_back_as_the_tree_whatever_happens(data: st.DataObject) -> None:
    """Local writes, remote deltas, GC and folds (tiny journal limit): after every drain,
    the rows rebuild the very same records."""
    a, b = Replica(b"A" * 32), Replica(b"B" * 32)
    store: dict[bytes, bytes] = {}
    limit = data.draw(st.sampled_from([0, 300, 1 << 20]), label="journal limit")
    with patch("trionode.crdt.rows.JOURNAL_MIN_BYTES", limit):
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            action = data.draw(st.integers(0, 5), label="action")
            if action == 5:
                a.tree.gc(max(a.physical, b.physical) + SECOND)
            else:
                replica = a if action < 3 else b
                with replica.begin() as tx:
                    perform(data.draw, tx)
                    deltas = tx.commit()
                if replica is b and deltas:
                    a.receive(wire(deltas))
            if data.draw(st.booleans(), label="drain"):
                _write(store, a.tree.drain_rows())
                loaded = StateTree.from_rows(store.items())
                assert records(loaded) == records(a.tree)
                assert snapshot(loaded) == snapshot(a.tree)
                # Read in key order a few rows at a time, as a restart reads them (a
                # Text's journal rows may come in a later read than its base).
                cut = data.draw(st.integers(1, 4), label="rows per read")
                rows = sorted(store.items())
                loading = RowLoad()
                for at in range(0, len(rows), cut):
                    loading.feed(rows[at : at + cut])
                entities, log = loading.finish()
                paged = StateTree()
                paged.add_new(entities)
                paged.restore_log(log)
                assert records(paged) == records(a.tree)
                assert snapshot(paged) == snapshot(a.tree)


def test_damaged_rows_are_refused() -> None:
    tree = StateTree()
    with tree.begin(HybridClock(b"a"), T0) as tx:
        tx.field("t", text()).insert(0, "hi")
        tx.commit()
    key, value = next((k, v) for k, v in tree.drain_rows() if v is not None)
    with pytest.raises(ValueError, match="key"):
        StateTree.from_rows([(key + b"\x00", value)])
    with pytest.raises(ValueError, match="another entity"):
        StateTree.from_rows([(bytes(32), value)])
    with pytest.raises(RemoteProtocolError):
        StateTree.from_rows([(key, value[:-1])])


def test_replacing_the_state_drops_every_journal_row() -> None:
    """A rebuilt state (reverted deltas left out) replaces the stored rows: no journal row
    of the old state may survive to be joined back in on the next load."""
    old = StateTree()
    clock = HybridClock(b"a")
    store: dict[bytes, bytes] = {}
    for i in range(5):
        with old.begin(clock, T0 + i) as tx:
            tx.field("t", text()).insert(0, "x")
            tx.field("gone", text()).insert(0, "y")
            tx.commit()
        _write(store, old.drain_rows())
    assert any(len(k) == 36 for k in store)  # journal rows exist
    rebuilt = StateTree()
    with rebuilt.begin(HybridClock(b"b"), T0) as tx:
        tx.field("t", text()).insert(0, "kept")
        tx.commit()
    _write(store, rebuilt.rows_replacing(old))
    assert records(StateTree.from_rows(store.items())) == records(rebuilt)
    # ... and later keystrokes journal against the rebuilt base.
    with rebuilt.begin(HybridClock(b"b"), T0 + 100) as tx:
        tx.field("t", text()).insert(4, "!")
        tx.commit()
    _write(store, rebuilt.drain_rows())
    assert any(len(k) == 36 for k in store)
    loaded = StateTree.from_rows(store.items())
    assert records(loaded) == records(rebuilt)
    with loaded.reader() as tx:
        assert tx.field("t", text()).value() == "kept!"


def _keystrokes(
    on: StateTree, clock: HybridClock, store: dict[bytes, bytes], start: int, count: int
) -> list[bytes]:
    """`count` keystrokes on the Text "t" (every fifth a backspace), each drained into
    `store` as a call's batch; returns the journal rows written."""
    journal = []
    for i in range(start, start + count):
        with on.begin(clock, T0 + i) as tx:
            body = tx.field("t", text())
            if i % 5 == 4:
                body.delete(len(body) // 2, 1)
            else:
                body.insert(len(body) // 2, "v")
            tx.commit()
        rows = on.drain_rows()
        journal += [v for k, v in rows if len(k) == 36 and v is not None]
        _write(store, rows)
    return journal


def test_version_1_journal_rows_still_load_and_new_rows_follow_them() -> None:
    """Journal rows written before `JOURNAL_VERSION` 2 are whole records. A store that
    holds them loads, keeps journaling (now compact rows) and loads again as the tree."""
    tree = StateTree()
    clock = HybridClock(b"a" * 32)
    store: dict[bytes, bytes] = {}

    def keystrokes(on: StateTree, start: int, count: int) -> None:
        _keystrokes(on, clock, store, start, count)

    keystrokes(tree, 0, 1)  # (the first write is a base row)
    with patch("trionode.crdt.rows.encode_journal", encode_entity):  # as version 1 wrote
        keystrokes(tree, 1, 40)
    old_rows = [v for k, v in store.items() if len(k) == 36]
    assert len(old_rows) == 40
    assert all(v[1] == 1 for v in old_rows)  # [1, parent, name, ...]: whole records
    loaded = StateTree.from_rows(store.items())
    assert records(loaded) == records(tree)
    keystrokes(loaded, 41, 40)
    new_rows = [v for k, v in store.items() if len(k) == 36 and v not in old_rows]
    assert len(new_rows) == 40
    assert all(v[1] == 4 for v in new_rows)  # [4, added time, added writer#, removed, body]
    assert sum(map(len, new_rows)) < sum(map(len, old_rows)) - 32 * 40  # no parent, name
    again = StateTree.from_rows(store.items())
    assert records(again) == records(loaded)
    assert again.root_hash() == loaded.root_hash()


def test_damaged_journal_rows_are_refused() -> None:
    tree = StateTree()
    clock = HybridClock(b"a")
    store: dict[bytes, bytes] = {}
    for i in range(2):
        with tree.begin(clock, T0 + i) as tx:
            tx.field("t", text()).insert(0, "x")
            tx.commit()
        _write(store, tree.drain_rows())
    ((key, row),) = ((k, v) for k, v in store.items() if len(k) == 36)
    base = next(k for k in store if len(k) == 32)
    assert row[:3] == b"\x95\x04\xcf"  # [4, added time (u64), added writer#, ...]
    writer_at = 11  # after the version and the 9-byte time: the writer index, a fixint
    assert row[writer_at] == 1  # the body lists HEAD's empty writer first, then b"a"
    for bad in (
        row[:1] + b"\x03" + row[2:],  # an unknown version
        row[:1] + b"\x02" + row[2:],  # version 2's tag on version 4's shape
        row[:-1],  # cut short
        row[:-1] + b"\xc3",  # a body that is not a Text's
        row[:writer_at] + b"\x02" + row[writer_at + 1 :],  # a writer the body does not list
        row[:writer_at] + b"\xff" + row[writer_at + 1 :],  # a negative writer index
        row[: writer_at + 2] + b"\xc0",  # no body: no writer list to refer to
    ):
        with pytest.raises(RemoteProtocolError):
            StateTree.from_rows([(base, store[base]), (key, bad)])
    with pytest.raises(RemoteProtocolError):  # a compact row cannot stand without its base
        StateTree.from_rows([(key, row)])


def test_version_2_journal_rows_still_load_and_version_4_rows_say_the_writer_once() -> None:
    """Journal rows of version 2 (`[2, added, removed, body]`, the writer id in `added`
    and again in the body) load beside version 4 rows, which refer to the body's writer
    list instead: 32 bytes less per keystroke for a 32-byte member id, same records."""
    writer = b"w" * 32
    clock = HybridClock(writer)
    store: dict[bytes, bytes] = {}
    tree = StateTree()

    def keystrokes(on: StateTree, start: int, count: int) -> list[bytes]:
        return _keystrokes(on, clock, store, start, count)

    keystrokes(tree, 0, 1)
    with patch("trionode.crdt.rows.encode_journal", _encode_journal_v2):
        old = keystrokes(tree, 1, 40)
    assert all(v[1] == 2 for k, v in store.items() if len(k) == 36)
    loaded = StateTree.from_rows(store.items())
    assert records(loaded) == records(tree)
    new = keystrokes(loaded, 41, 40)
    assert len(old) == len(new) == 40
    assert all(row.count(writer) == 2 for row in old)
    assert all(row[1] == 4 and row.count(writer) == 1 for row in new)
    [base] = loaded.entities()
    for row in new:  # the same delta as version 2 wrote it: the id twice
        assert len(_encode_journal_v2(decode_journal(row, base))) >= len(row) + 32
    again = StateTree.from_rows(store.items())
    assert records(again) == records(loaded)
    assert again.root_hash() == loaded.root_hash()


def _encode_journal_v2(delta: Entity) -> bytes:
    """A journal row as version 2 wrote it."""
    body = _NIL if delta.body is None else delta.body.canonical()
    return canonical((2, delta.added, delta.removed, msgspec.Raw(body)))


_NIL = b"\xc0"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), head=st.sampled_from([b"\x95\x04", b"\x94\x02", b""]))
def test_hostile_journal_rows_are_typed_errors(data: bytes, head: bytes) -> None:
    """Whatever a journal row holds, decoding it gives a record or `RemoteProtocolError`
    (a version 1 row naming another entity: `ValueError`), never anything else."""
    tree = StateTree()
    with tree.begin(HybridClock(b"a"), T0) as tx:
        tx.field("t", text()).insert(0, "x")
        tx.commit()
    [base] = tree.entities()
    with contextlib.suppress(RemoteProtocolError, ValueError):
        decode_journal(head + data, base)


def test_a_journal_delta_whose_writer_its_body_does_not_list_is_a_version_2_row() -> None:
    """`added` by one writer over elements of another (a remote insert joined with a local
    write before a drain) cannot refer to the body's writer list: it is written as
    version 2 and reads back as the same record."""
    tree = StateTree()
    with tree.begin(HybridClock(b"a"), T0) as tx:
        tx.field("t", text()).insert(0, "x")
        tx.commit()
    [base] = tree.entities()
    assert base.body is not None
    assert base.added is not None
    other = Entity(
        base.parent, base.name, base.kind, added=base.added._replace(node=b"b"), body=base.body
    )
    for delta, version in ((base, 4), (other, 2)):
        row = encode_journal(delta)
        assert row[1] == version
        assert decode_journal(row, base) == delta
