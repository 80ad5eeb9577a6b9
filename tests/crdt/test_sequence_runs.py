"""Consecutive typing continues its writer's run of ids; nothing else does."""

from __future__ import annotations

from trionode.crdt import HybridClock, StateTree, Timestamp, text, vector

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
