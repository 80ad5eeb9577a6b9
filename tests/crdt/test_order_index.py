"""`OrderIndex` against a plain list: same order, same visible ids, same lookups.

Tiny blocks (3..6 ids) make every operation cross block boundaries, split and renumber.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from trionode.crdt import Timestamp
from trionode.crdt.order_index import OrderIndex

from .crdt_helpers import place

# (kind, a, b): kind 0 insert after the a-th placed id (a == 0: at the front), 1 insert
# before the a-th, 2 delete the a-th visible one, 3 copy and continue on the copy, 4 type:
# insert right after the id placed last (the index's cursor hint, its one-keystroke path),
# 5 delete a range of visible ones at once (`hide_many`, a range delete): from the a-th,
# a // 7 % 9 + 1 of them (fewer at the end).
ops = st.lists(
    st.tuples(st.sampled_from([0, 1, 2, 3, 4, 4, 4, 5]), st.integers(0, 10_000), st.booleans()),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    initial=st.integers(0, 20),
    dead=st.sets(st.integers(0, 19)),
    block_max=st.integers(2, 6),
    operations=ops,
)
def test_index_matches_a_plain_list(
    initial: int, dead: set[int], block_max: int, operations: list[tuple[int, int, bool]]
) -> None:
    model = [Timestamp(i + 1, b"n") for i in range(initial)]
    deleted = {model[i] for i in dead if i < initial}

    def is_live(eid: Timestamp) -> bool:
        return eid not in deleted

    index = OrderIndex(model, is_live, block_max=block_max)
    serial = initial + 1
    last: Timestamp | None = None
    for kind, a, born_dead in operations:
        if kind in (0, 1, 4):
            eid = Timestamp(serial, b"n")
            serial += 1
            if born_dead:
                deleted.add(eid)
            if kind == 4:  # (half the time telling the index whether `eid` is visible)
                model.insert(0 if last is None else model.index(last) + 1, eid)
                told = None if a % 2 else not born_dead
                assert index.insert_after(last, eid, is_live, live=told)
            elif not place(model, index, eid, a, before=kind == 1, is_live=is_live):
                deleted.discard(eid)
                continue
            last = eid
        elif kind == 2:
            live = [e for e in model if is_live(e)]
            if live:
                victim = live[a % len(live)]
                deleted.add(victim)
                index.hide(victim)
        elif kind == 5:
            live = [e for e in model if is_live(e)]
            if live:
                start = a % len(live)
                victims = live[start : start + a // 7 % 9 + 1]
                deleted.update(victims)
                index.hide_many(reversed(victims) if born_dead else victims)
        else:
            index = index.copy()
        live = [e for e in model if is_live(e)]
        assert index.order() == model
        assert index.live() == live
        assert index.live_len() == len(live)
        if live:
            k = a % len(live)
            assert index.live_at(k) == live[k]
            count = a % (len(live) - k + 1)
            assert index.live_slice(k, count) == live[k : k + count]
        assert all(e in index for e in model)
        k = a % (len(live) + 1)
        assert index.live_before(k) == (live[k - 1] if k else None)
        stray = Timestamp(0, b"not placed")
        assert not index.insert_after(stray, Timestamp(serial, b"n"), is_live)
        assert index.order() == model
    for position in range(index.live_len()):
        assert index.live_at(position) == [e for e in model if is_live(e)][position]


def test_out_of_range_lookups_raise_index_error() -> None:
    index = OrderIndex([Timestamp(1, b"n")], lambda _: True)
    for bad in (-1, 1):
        try:
            index.live_at(bad)
        except IndexError:
            pass
        else:
            raise AssertionError(f"live_at({bad}) did not raise")
    try:
        index.live_slice(0, 2)
    except IndexError:
        pass
    else:
        raise AssertionError("an overlong slice did not raise")
    assert index.live_slice(1, 0) == []


def test_live_before_takes_insert_positions() -> None:
    """`live_before(p)`: the visible id an insert at `p` goes after; 0..len, not beyond."""
    ids = [Timestamp(i, b"n") for i in range(1, 4)]
    index = OrderIndex(ids, lambda e: e != ids[1])
    assert [index.live_before(p) for p in range(3)] == [None, ids[0], ids[2]]
    for bad in (-1, 3):
        with pytest.raises(IndexError):
            index.live_before(bad)
