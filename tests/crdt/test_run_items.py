"""Run-length items are the same CRDT as the per-element state they replaced.

`tests/crdt/sequence_model.py` is the per-element `SequenceState` as it was before items
(one dict entry per element, `OrderIndex` over ids). Every test here drives the run-based
state and that model through the same history and insists on the same result after every
step: the same elements (`join_element` per id), order, visible ids and values, canonical
wire form, hash chunks (so the same root hashes), floors, stamps and GC. Histories are
random and concurrent: several replicas type, paste, delete ranges and overwrite, and
deltas (and whole states) reach the others in any order, more than once.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trionode.crdt import HEAD, Element, TextState, Timestamp, VectorState
from trionode.crdt.hlc import NTP64_MAX
from trionode.crdt.sequence import ITEM_MAX, SequenceState

from . import sequence_model as model

WRITERS = (b"a", b"b", b"c")
stamps = st.builds(
    Timestamp,
    st.integers(1, 12) | st.sampled_from([NTP64_MAX - 1, NTP64_MAX]),  # (ids at the edge)
    st.sampled_from(WRITERS),
)


def assert_same(run: SequenceState[Any], naive: Any, floors: list[Timestamp]) -> None:
    assert dict(run.elements) == dict(naive.elements)
    assert run.element_count() == len(naive.elements)
    assert run.order() == naive.order()
    assert run.visible_ids() == naive.visible_ids()
    assert run.values() == naive.values()
    assert len(run) == len(naive)
    assert run.hash_form(None) == naive.hash_form(None)
    assert run.wire() == naive.wire()
    assert run.canonical() == naive.canonical()
    assert run.max_stamp() == naive.max_stamp()
    assert run.max_id() == naive.max_id()
    for k in range(0, len(naive), 7):
        assert run.visible_at(k) == naive.visible_at(k)
    for floor in floors:
        assert run.order(floor) == naive.order(floor)
        assert run.visible_ids(floor) == naive.visible_ids(floor)
        assert run.values(floor) == naive.values(floor)
        assert run.hash_form(floor) == naive.hash_form(floor)


class Pair:
    """One replica: the run-based state and the model, fed the same deltas."""

    def __init__(self, text: bool) -> None:
        self.text = text
        self.run: SequenceState[Any] = TextState() if text else VectorState()
        self.naive: Any = model.TextState() if text else model.VectorState()

    def merge(self, delta: tuple[Any, Any]) -> None:
        run, naive = delta
        assert self.run.merge(run.copy()) == self.naive.merge(naive.copy())


class History:
    def __init__(self, text: bool) -> None:
        self.text = text
        self.pairs = [Pair(text) for _ in WRITERS]
        self.deltas: list[tuple[Any, Any]] = []
        self.clock = 100

    def stamp(self) -> Timestamp:
        self.clock += 1
        return Timestamp(self.clock, self.writer)

    def value(self, n: int) -> Any:
        return "xyzw"[n % 4] if self.text else bytes([n % 251])

    def local(self, r: int, kind: int, a: int, b: int) -> None:
        pair = self.pairs[r]
        self.writer = WRITERS[r]
        length = len(pair.naive)
        run: Any
        naive: Any
        if kind == 0 or not length:  # type one character
            pos = a % (length + 1)
            clock = self.clock
            naive, taken = pair.naive.insert_one(pos, self.value(b), self.stamp, self.writer)
            self.clock = clock
            run, taken_too = pair.run.insert_one(pos, self.value(b), self.stamp, self.writer)
            assert taken == taken_too
        elif kind == 1:  # paste
            pos = a % (length + 1)
            values = [self.value(b + k) for k in range(b % 5 + 1)]
            clock = self.clock
            naive = pair.naive.insert_delta(pos, values, self.stamp, writer=self.writer)
            self.clock = clock
            run = pair.run.insert_delta(pos, values, self.stamp, writer=self.writer)
        elif kind == 2:  # delete a range
            pos = a % length
            count = min(b % 9 + 1, length - pos)
            stamp = self.stamp()
            naive = pair.naive.delete_delta(pos, count, stamp)
            run = pair.run.delete_delta(pos, count, stamp)
        else:  # overwrite (Vector) or backspace (Text)
            pos = a % length
            stamp = self.stamp()
            if self.text:
                naive = pair.naive.delete_delta(pos, 1, stamp)
                run = pair.run.delete_delta(pos, 1, stamp)
            else:
                naive = pair.naive.set_delta(pos, self.value(b + 1), stamp)
                run = pair.run.set_delta(pos, self.value(b + 1), stamp)
        assert dict(run.elements) == dict(naive.elements)
        top = naive.max_stamp()
        if top is not None:
            self.clock = max(self.clock, top.time)
        self.deltas.append((run, naive))
        # The delta itself, as a transaction commits it (a range delete's delta then
        # takes the spans it was made from: `SequenceState._origin`).
        assert pair.run.merge(run) == pair.naive.merge(naive)


steps = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 2), st.integers(0, 200), st.integers(0, 200)),
    min_size=10,
    max_size=80,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(text=st.booleans(), history=steps, floor_at=st.integers(90, 200))
def test_concurrent_histories_match_the_per_element_model(
    text: bool, history: list[tuple[int, int, int, int]], floor_at: int
) -> None:
    h = History(text)
    floors = [Timestamp(floor_at, b"b")]
    for action, r, a, b in history:
        pair = h.pairs[r]
        if action <= 3:  # a local edit, applied locally
            h.local(r, action, a, b)
        elif action == 4 and h.deltas:  # deliver some delta (again, in any order)
            pair.merge(h.deltas[a % len(h.deltas)])
        elif action == 5:  # a whole replica's state (a snapshot join)
            other = h.pairs[a % len(h.pairs)]
            pair.merge((other.run, other.naive))
        else:  # GC with a horizon somewhere in the history
            assert pair.run.gc(a + 100) == pair.naive.gc(a + 100)
        assert_same(pair.run, pair.naive, floors)
        copy = pair.run.copy()  # a copy is independent and equal
        assert_same(copy, pair.naive, floors)
    for pair in h.pairs:  # everyone gets everything: all converge
        for delta in h.deltas:
            pair.merge(delta)
        assert_same(pair.run, pair.naive, floors)
    first = h.pairs[0].run
    for pair in h.pairs[1:]:
        assert pair.run.wire() == first.wire()
        assert pair.run.hash_form(None) == first.hash_form(None)


@st.composite
def forged(draw: st.DrawFn, text: bool) -> dict[Timestamp, Any]:
    """Arbitrary element sets: any references (cycles, missing ones), tombstones, values
    and value stamps."""
    ids = draw(st.lists(stamps, unique=True, max_size=10))
    elements: dict[Timestamp, Any] = {}
    for eid in ids:
        after = draw(st.sampled_from([HEAD, *ids, Timestamp(eid.time - 1, eid.node)]))
        if draw(st.booleans()):
            elements[eid] = (after, None, None, draw(stamps))
        else:
            value = draw(st.sampled_from("xyz")) if text else draw(st.binary(max_size=2))
            elements[eid] = (after, value, None if text else draw(st.none() | stamps), None)
    return elements


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(data=st.data(), text=st.booleans(), floor=st.none() | stamps)
def test_forged_states_join_exactly_as_the_model(
    data: st.DataObject, text: bool, floor: Timestamp | None
) -> None:
    parts = [data.draw(forged(text)) for _ in range(3)]
    runs: list[Any] = [
        (TextState if text else VectorState)({e: Element(*el) for e, el in p.items()})
        for p in parts
    ]
    naives: list[Any] = [
        (model.TextState if text else model.VectorState)(
            {e: model.Element(*el) for e, el in p.items()}
        )
        for p in parts
    ]
    floors = [] if floor is None else [floor]
    run = runs[0]
    naive = naives[0]
    run.visible_len()  # build the order, so the merges take the incremental paths
    for other, other_naive in zip(runs[1:], naives[1:], strict=True):
        assert run.merge(other) == naive.merge(other_naive)
        assert_same(run, naive, floors)
        assert run.merge(other) is False  # idempotent
    for other, other_naive in zip(runs, naives, strict=True):
        assert other.join(run) == run.join(other)
        assert_same(other.join(run), other_naive.join(naive), floors)


def test_typing_keeps_one_item_per_run_of_keystrokes() -> None:
    """Memory is per item, not per character: a 1,000-character run typed at its end is
    ceil(1000 / ITEM_MAX) items, and typing inside it splits just the one item."""
    state = TextState()
    clock = iter(range(1, 10**6))
    writer = b"w"
    for k in range(1_000):
        delta, _ = state.insert_one(k, "abc"[k % 3], lambda: Timestamp(next(clock), writer), writer)
        state.merge(delta)
    items = list(state._items())
    assert len(items) == -(-1_000 // ITEM_MAX)
    assert all(isinstance(item.values, str) for item in items)
    delta, _ = state.insert_one(500, "!", lambda: Timestamp(10**5, writer), writer)
    state.merge(delta)
    assert len(list(state._items())) == len(items) + 2  # one split + the new item
    typed = "".join("abc"[k % 3] for k in range(1_000))
    assert "".join(state.values()) == typed[:500] + "!" + typed[500:]


def to_model(state: SequenceState[Any]) -> Any:
    """The model state holding the same elements."""
    kind = model.TextState if isinstance(state, TextState) else model.VectorState
    return kind({e: model.Element(*el) for e, el in state.elements.items()})


def origin_of(delta: SequenceState[Any]) -> Any:
    return delta._origin


def _typed_text(writer: bytes, count: int, start: int = 1) -> TextState:
    state = TextState()
    time = iter(range(start, start + 10 * count))
    for k in range(count):
        delta, _ = state.insert_one(k, "abcd"[k % 4], lambda: Timestamp(next(time), writer), writer)
        state.merge(delta)
    return state


def test_a_range_delete_merged_into_its_source_touches_only_its_spans() -> None:
    """`delete_delta` remembers the live spans it covers; merged back into the unchanged
    state it came from, they are tombstoned without looking anything up, and the result is
    the general join's (a copy of the state takes the general path)."""
    state = _typed_text(b"w", 2_000)
    for k in range(0, 2_000, 97):  # split the run into many items (typing inside it)
        delta, _ = state.insert_one(k, "!", partial(Timestamp, 10**6 + k, b"v"), b"v")
        state.merge(delta)
    delta = state.delete_delta(150, 1_500, Timestamp(10**7, b"d"))
    assert origin_of(delta) is not None
    assert origin_of(delta)[0] is state
    general = state.copy()
    naive = to_model(state)
    assert general.merge(delta) == state.merge(delta) is True
    assert naive.merge(to_model(delta))
    assert origin_of(delta) is None  # used once: the state changed since
    for run in (state, general):
        assert_same(run, naive, [])
    assert state.merge(delta) is False  # again: the general join, idempotent


def test_a_range_delete_made_before_another_change_takes_the_general_join() -> None:
    state = _typed_text(b"w", 500)
    delta = state.delete_delta(100, 300, Timestamp(10**7, b"d"))
    naive = to_model(state)
    insert, _ = state.insert_one(200, "!", lambda: Timestamp(10**6, b"v"), b"v")
    state.merge(insert)  # splits the item the delta's spans point into
    naive.merge(to_model(insert))
    assert state.merge(delta)
    assert naive.merge(to_model(delta))
    assert_same(state, naive, [])
    assert "".join(state.values()).count("!") == 1


def test_a_range_delete_over_overwritten_items_drops_their_value_stamps() -> None:
    state = VectorState()
    naive: Any = model.VectorState()
    states: tuple[Any, ...] = (state, naive)
    for k in range(10):
        stamp = Timestamp(100 + k, b"w")
        for s in states:
            delta, _ = s.insert_one(k, bytes([k]), lambda stamp=stamp: stamp, b"w")
            s.merge(delta)
    for s in states:
        s.merge(s.set_delta(3, b"z", Timestamp(5_000, b"w")))
        assert s.merge(s.delete_delta(2, 4, Timestamp(6_000, b"w")))
    gone: Element[bytes] = Element(state.order()[2], None, None, Timestamp(6_000, b"w"))
    assert state.element(state.order()[3]) == gone
    assert_same(state, naive, [])


def test_out_of_range_edits_are_index_errors_without_allocating() -> None:
    state = _typed_text(b"w", 100)
    for pos, count in ((0, 10**9), (99, 2), (-1, 1), (5, -1)):
        with pytest.raises(IndexError):
            state.delete_delta(pos, count, Timestamp(10**7, b"d"))
    with pytest.raises(IndexError):
        state.insert_one(101, "x", partial(Timestamp, 10**7, b"w"), b"w")
    with pytest.raises(IndexError):
        state.visible_slice(50, 10**9)
