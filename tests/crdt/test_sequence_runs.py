"""Consecutive typing continues its writer's run of ids; nothing else does."""

from __future__ import annotations

from hypothesis import given, strategies as st

from trionode.crdt import HybridClock, StateTree, Timestamp, text, vector
from trionode.crdt.sequence import HEAD, Element, TextState

from .crdt_helpers import T0 as NOW


def _ids(tree: StateTree) -> list[Timestamp]:
    with tree.reader() as tx:
        body = tx.field("t", text())
        record = tx.get(body.entity_id)
        assert record is not None
        state = record.body
        assert state is not None
        return state.order()  # type: ignore[union-attr]


def test_typing_at_the_end_of_ones_own_run_takes_consecutive_ids() -> None:
    tree = StateTree()
    clock = HybridClock(b"a")
    for i, char in enumerate("hello"):
        with tree.begin(clock, NOW + i * 1_000_000) as tx:
            tx.field("t", text()).insert(i, char)
            tx.commit()
    ids = _ids(tree)
    assert [e.time - ids[0].time for e in ids] == [0, 1, 2, 3, 4]
    # The clock moved past the run, so a fresh stamp never reuses one of its ids.
    assert clock.now(NOW).time > ids[-1].time


def test_a_run_is_not_continued_from_another_writer_or_a_parent() -> None:
    tree = StateTree()
    a, b = HybridClock(b"a"), HybridClock(b"b")
    with tree.begin(a, NOW) as tx:
        tx.field("t", text()).insert(0, "xy")
        tx.commit()
    with tree.begin(a, NOW) as tx:
        tx.field("t", text()).insert(1, "M")  # after x, which already has a child (y)
        tx.commit()
    with tree.begin(b, NOW) as tx:
        tx.field("t", text()).insert(3, "z")  # after a's y: b starts its own ids
        tx.commit()
    with tree.reader() as tx:
        assert tx.field("t", text()).value() == "xMyz"
    x, m, y, z = _ids(tree)
    assert y.time == x.time + 1  # one insert call: one run
    assert m.time > y.time  # a fresh stamp: it must sort before y among x's children
    assert z.node == b"b"
    assert z.time > m.time


def test_one_transaction_typing_twice_and_inserting_elsewhere_keeps_ids_unique() -> None:
    tree = StateTree()
    clock = HybridClock(b"a")
    with tree.begin(clock, NOW) as tx:
        body = tx.field("t", text())
        body.insert(0, "ab")
        body.insert(2, "c")  # continues the run
        body.insert(0, "Z")  # a fresh stamp: must not collide with the run's ids
        body.insert(4, "d")
        tx.commit()
    ids = _ids(tree)
    assert len(set(ids)) == 5
    with tree.reader() as tx:
        assert tx.field("t", text()).value() == "Zabcd"


def test_vector_appends_continue_runs_too() -> None:
    tree = StateTree()
    clock = HybridClock(b"a")
    for i in range(3):
        with tree.begin(clock, NOW) as tx:
            tx.field("v", vector(int)).append(i)
            tx.commit()
    with tree.reader() as tx:
        handle = tx.field("v", vector(int))
        assert handle.to_list() == [0, 1, 2]
        assert handle[-1] == 2
        assert len(handle) == 3


def test_gc_keeps_the_tombstone_a_run_would_continue_into() -> None:
    w, v = b"w", b"v"
    x = Timestamp(100, w)
    elements = {
        x: Element(HEAD, "x", None, None),
        # 101 of w never existed: a run typed after x takes it, then must stop before 102
        Timestamp(102, w): Element(HEAD, None, None, Timestamp(110, w)),
        Timestamp(103, w): Element(Timestamp(102, w), None, None, Timestamp(110, w)),
        Timestamp(101, v): Element(HEAD, None, None, Timestamp(110, v)),
    }
    state = TextState(elements)
    assert state.gc(1 << 40) == 2  # w's 103 and v's 101: no live id of their writer below
    assert set(state.elements) == {x, Timestamp(102, w)}
    fresh = iter([Timestamp(200, w), Timestamp(201, w)])
    delta = state.insert_delta(1, ["a", "b", "c"], lambda: next(fresh), writer=w)
    assert sorted(delta.elements) == [Timestamp(101, w), Timestamp(200, w), Timestamp(201, w)]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20), st.integers(1, 3)), max_size=40))
def test_typing_and_gc_never_take_an_id_twice(steps: list[tuple[bool, int, int]]) -> None:
    # One writer typing, deleting and collecting everything it may after every call: every
    # id it ever takes is new, or a replica still holding the old tombstone would hide it.
    tree = StateTree()
    clock = HybridClock(b"a")
    taken: set[Timestamp] = set()
    for i, (delete, pos, count) in enumerate(steps):
        physical = NOW + i * 1_000_000
        with tree.begin(clock, physical) as tx:
            body = tx.field("t", text())
            length = len(body)
            if delete and length:
                body.delete(pos % length, min(count, length - pos % length))
            else:
                body.insert(pos % (length + 1), "xyz"[:count])
            deltas = tx.commit()
        for delta in deltas:
            if isinstance(delta.body, TextState):
                new = {e for e, el in delta.body.elements.items() if el.deleted is None}
                assert not new & taken
                taken |= new
        tree.gc(physical + 1)
