"""The one-edit fast paths give what the general code gives.

A keystroke takes shortcuts the general code does not: a one-element delta computes its
newest stamp without building lists, top-level field paths are shared between
transactions, a delete looks the length up only for a negative index, and a keystroke
joined in place finds the next keystroke's position where it wrote. Each is checked
here against a naive model of the same thing. (The order index's cursor-hint path, typing
right after the element placed last, is in `test_order_index.py`.)
"""

from __future__ import annotations

import gc
from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from trionode.crdt import (
    HybridClock,
    StateTree,
    Timestamp,
    register,
    text,
    transaction,
    unordered_map,
    vector,
)
from trionode.crdt.entity import ROOT_ID, Kind, child_id
from trionode.crdt.hlc import latest
from trionode.crdt.sequence import Element, SequenceState, TextState, VectorState
from trionode.crdt.transaction import field_path

from . import sequence_model as model
from .crdt_helpers import T0
from .test_run_items import assert_same

stamps = st.builds(Timestamp, st.integers(0, 2**64 - 1), st.sampled_from([b"", b"a", b"b"]))


@settings(max_examples=300, deadline=None)
@given(
    eid=stamps,
    after=stamps,
    updated=st.none() | stamps,
    deleted=st.none() | stamps,
)
def test_a_one_element_max_stamp_is_the_newest_of_its_stamps(
    eid: Timestamp, after: Timestamp, updated: Timestamp | None, deleted: Timestamp | None
) -> None:
    """Forged `after`, value and tombstone stamps count too (the drift check relies on it)."""
    value = None if deleted is not None else b"\x01"
    state = VectorState({eid: Element(after, value, updated, deleted)})
    expected = latest(latest(eid, after), latest(updated, deleted))
    assert state.max_stamp() == expected
    # Two elements take the general path: the same definition.
    other = Timestamp(0, b"z")
    both = VectorState(
        {eid: Element(after, value, updated, deleted), other: Element(other, b"", None, None)}
    )
    assert expected is not None
    assert both.max_stamp() == max(expected, other)


@pytest.mark.parametrize(("state_type", "value"), [(TextState, "x"), (VectorState, b"\x01")])
def test_a_keystroke_delta_sets_every_slot_a_reset_sets(
    state_type: type[SequenceState[Any]], value: Any
) -> None:
    """`_one_typed` builds its state without `_reset`: a slot it forgot would raise on the
    first read of it, wherever the delta travels (a merge, an encoding, a hash)."""
    eid, after = Timestamp(T0 + 1, b"a"), Timestamp(T0, b"a")
    typed = state_type()._one_typed(eid, after, value)
    blank = state_type()
    for slot in SequenceState.__slots__:
        assert hasattr(typed, slot) == hasattr(blank, slot), slot
        if hasattr(blank, slot) and slot not in {"_runs", "_count", "_version"}:
            assert getattr(typed, slot) == getattr(blank, slot), slot
    assert typed == state_type()._one(eid, Element(after, value, None, None))
    assert dict(typed.elements) == {eid: Element(after, value, None, None)}
    assert typed.max_stamp() == eid


def test_field_paths_are_shared_and_name_the_field() -> None:
    path = field_path(b"body", Kind.TEXT)
    assert path is field_path(b"body", Kind.TEXT)
    assert path.id == child_id(ROOT_ID, b"body")
    assert field_path(b"body", Kind.VECTOR) is not path  # the kind is part of the path
    assert field_path(b"body", Kind.VECTOR).kind is Kind.VECTOR


def test_field_paths_past_the_cache_bound_are_still_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transaction, "_FIELD_PATHS", {})
    monkeypatch.setattr(transaction, "_FIELD_PATHS_MAX", 2)
    paths = [field_path(f"f{i}".encode(), Kind.REGISTER) for i in range(5)]
    assert [p.id for p in paths] == [child_id(ROOT_ID, f"f{i}".encode()) for i in range(5)]
    assert len(transaction._FIELD_PATHS) == 2


def test_a_field_bound_by_name_has_the_shared_path_past_the_cache_bound_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`Transaction.field` looks paths up by the str name in the spec's `field_paths`: the
    same path `field_path` gives for the encoded name, cached or not, and shared between
    specs of one kind."""
    monkeypatch.setattr(transaction, "_FIELD_PATHS", {})
    monkeypatch.setattr(transaction, "_FIELD_PATHS_MAX", 2)
    names = ("body", "é", "f2", "f3")
    doc = text()
    with StateTree().reader() as tx:
        first = [tx.field(name, doc).path for name in names]
        again = [tx.field(name, doc).path for name in names]
        other_spec = [tx.field(name, text()).path for name in names]
        vectors = [tx.field(name, vector(int)).path for name in names]
    for name, path, later, same, other in zip(
        names, first, again, other_spec, vectors, strict=True
    ):
        assert (path.name, path.kind) == (name.encode(), Kind.TEXT)
        assert path.id == later.id == same.id == other.id == child_id(ROOT_ID, name.encode())
        assert other.kind is Kind.VECTOR
    cached = [True, True, False, False]
    assert [a is b for a, b in zip(first, again, strict=True)] == cached
    assert [a is b for a, b in zip(first, other_spec, strict=True)] == cached
    assert list(doc.field_paths) == ["body", "é"]


@settings(max_examples=60, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 1_000), st.booleans()), max_size=80))
def test_one_transaction_per_edit_matches_a_list(edits: list[tuple[int, bool]]) -> None:
    """Vector and Text edited one call per transaction (the fast paths' case) against a
    plain list, and against the same edits replayed as one remote state."""
    tree = StateTree()
    clock = HybridClock(b"w")
    model: list[int] = []
    for step, (a, delete) in enumerate(edits):
        with tree.begin(clock, T0 + step) as tx:
            items = tx.field("items", vector(int))
            body = tx.field("body", text())
            if delete and model:
                k = a % len(model)
                del model[k]
                items.delete(k)
                body.delete(k, 1)
            else:
                k = a % (len(model) + 1)
                model.insert(k, step)
                items.insert(k, step)
                body.insert(k, chr(0x61 + step % 26))
            tx.commit()
    with tree.reader() as tx:
        assert tx.field("items", vector(int)).to_list() == model
        assert len(tx.field("body", text()).value()) == len(model)
    copy = StateTree([e.copy() for e in tree.entities()])
    assert copy.root_hash() == tree.root_hash()


def test_vector_delete_takes_python_indices() -> None:
    """`delete` looks the length up only for a negative index; both kinds still work and
    an index out of range on either side raises."""
    tree = StateTree()
    clock = HybridClock(b"w")
    with tree.begin(clock, T0) as tx:
        items = tx.field("items", vector(int))
        for value in range(5):
            items.append(value)
        items.delete(-1)
        items.delete(0)
        del items[-2]
        assert items.to_list() == [1, 3]
        for bad in (2, -3):
            with pytest.raises(IndexError):
                items.delete(bad)
        assert items.to_list() == [1, 3]


def test_paths_chain_root_most_first_without_reference_cycles() -> None:
    """A map entry's path is built per access: it must not hold itself (a cycle only the
    cyclic GC frees, two objects per write before)."""
    outer = field_path(b"m", Kind.MAP)
    inner = outer.child(b"k", Kind.MAP)
    leaf = inner.child(b"x", Kind.REGISTER)
    assert leaf.chain() == [outer, inner, leaf]
    assert transaction.ROOT_PATH.chain() == []
    tree = StateTree()
    clock = HybridClock(b"w")
    spec = unordered_map(str, unordered_map(str, register(int)))
    gc.collect()
    gc.disable()
    try:
        for step in range(200):
            with tree.begin(clock, T0 + step) as tx:
                tx.field("m", spec)[f"k{step % 7}"][f"x{step}"].set(step)
                tx.commit()
        garbage = gc.collect()
    finally:
        gc.enable()
    assert garbage == 0
    with tree.reader() as tx:
        assert tx.field("m", spec)["k3"]["x3"].get() == 3


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from([b"a", b"b"]), st.integers(0, 400), st.integers(0, 99)),
        max_size=40,
    ),
    pos=st.integers(0, 99),
    writer=st.sampled_from([b"a", b"b", b"c"]),
)
def test_a_keystroke_takes_the_ids_and_places_of_the_general_code(
    ops: list[tuple[bytes, int, int]], pos: int, writer: bytes
) -> None:
    """`insert_one` (one value, no floor) builds the delta `insert_delta` builds, a
    one-element delete builds the general delete's, and a one-element merge (`_add_one`,
    or a tombstone) puts every element where a rebuilt order does. Ids are
    drawn, not increasing, so an incoming element is often not the highest child of its
    reference (the shortcut's own case) and often is (the other placement)."""
    used: set[int] = set()

    def stamp_for(node: bytes, time: int) -> Timestamp:
        while time in used:
            time += 1
        used.add(time)
        return Timestamp(T0 + time, node)

    state = VectorState()
    assert state.visible_len() == 0  # builds the index: merges below update it in place
    for node, time, where in ops:
        if where % 4 == 0 and len(state):
            delta = state.delete_delta(where % len(state), 1, stamp_for(node, time))
        else:
            at = where % (len(state) + 1)
            delta = state.insert_delta(
                at, [bytes([where])], partial(stamp_for, node, time), writer=node
            )
        assert state.merge(delta)
        used.update(e.time - T0 for e in delta.elements)  # a run's ids skip the stamps
        rebuilt = VectorState(state.elements)
        assert state.order() == rebuilt.order()
        assert state.visible_ids() == rebuilt.visible_ids()
    at = pos % (len(state) + 1)
    fresh = [stamp_for(writer, 1_000 + k) for k in range(2)]
    general = state.insert_delta(at, [b"x"], iter(fresh).__next__, writer=writer)
    one, run = state.insert_one(at, b"x", iter(fresh).__next__, writer)
    assert one == general
    [eid] = one.elements
    assert (run == eid) if eid not in fresh else run is None
    with pytest.raises(IndexError):
        state.insert_one(len(state) + 1, b"x", iter(fresh).__next__, writer)
    with pytest.raises(IndexError):
        state.insert_one(-1, b"x", iter(fresh).__next__, writer)
    if len(state):  # a backspace's delta: the general code's, one element
        at = pos % len(state)
        gone = state.visible_ids()[at]
        expected = VectorState({gone: Element(state.elements[gone].after, None, None, fresh[0])})
        assert state.delete_delta(at, 1, fresh[0]) == expected
    for bad in (-1, len(state)):
        with pytest.raises(IndexError):
            state.delete_delta(bad, 1, fresh[0])


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 10_000)), max_size=60),
    text_state=st.booleans(),
)
def test_in_place_keystrokes_give_the_general_delta_and_state(
    ops: list[tuple[int, int]], text_state: bool
) -> None:
    """`insert_in_place` and `delete_in_place` (one position lookup, the last keystroke's
    place remembered for the next one) give the delta the general code builds, and leave
    the state `merge` of that delta leaves, checked against the per-element model and a
    plain list after every keystroke. Keystrokes mostly go on where the last one was
    (typing on, backspaces), sometimes elsewhere, and another writer's edits arrive in
    between (merged the general way), so the remembered place is often stale."""
    state_type = TextState if text_state else VectorState
    fast: SequenceState[Any] = state_type()
    naive: Any = (model.TextState if text_state else model.VectorState)()
    expected: list[Any] = []
    clock = HybridClock(b"a", drift_tolerance=3600.0)
    other = HybridClock(b"b", drift_tolerance=3600.0)
    physical = T0
    cursor = 0
    for kind, where in ops:
        physical += 1 << 20
        value: Any = "xyzw"[where % 4] if text_state else bytes([where % 251])
        if kind <= 1:  # typing at the cursor, or somewhere else
            at = cursor if kind == 0 else where % (len(expected) + 1)
            at = min(at, len(expected))
            twin = HybridClock(b"a", drift_tolerance=3600.0, last=clock.last)
            general, general_run = fast.copy().insert_one(
                at, value, partial(twin.now, physical), b"a"
            )
            delta, eid, continues = fast.insert_in_place(at, value, clock, physical)
            assert dict(delta.elements) == dict(general.elements)
            assert list(delta.elements) == [eid]
            assert (eid if continues else None) == general_run
            if continues:
                clock.witness(eid, physical)
            expected.insert(at, value)
            cursor = at + 1
        elif kind <= 3 and expected:  # backspace at the cursor, or a delete elsewhere
            at = cursor - 1 if kind == 2 and cursor else where % len(expected)
            at = min(at, len(expected) - 1)
            stamp = clock.now(physical)
            general = fast.delete_delta(at, 1, stamp)
            delta, eid, before = fast.delete_in_place(at, stamp)
            assert list(delta.elements) == [eid]
            assert before == naive.elements[eid]
            assert dict(delta.elements) == dict(general.elements)
            del expected[at]
            cursor = at
        elif kind == 4:  # another writer types somewhere (the general merge)
            at = where % (len(expected) + 1)
            delta = fast.insert_delta(at, [value], partial(other.now, physical))
            fast.merge(delta)
            expected.insert(at, value)
        else:
            continue
        naive.merge(type(naive)(dict(delta.elements)))
        assert_same(fast, naive, [])
        assert fast.values() == expected
