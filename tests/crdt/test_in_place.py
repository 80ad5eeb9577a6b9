"""Sequence keystrokes joined into the tree in place, with an undo log (`transaction.py`).

Each history runs twice from the same clocks: on a tree whose transactions write
one-element inserts and deletes of top-level Text and Vector fields in place, and on a
twin whose transactions stage every write (`edit_in_place` refuses), the path that
existed before. Transactions are random: keystrokes, pastes and range deletes (staged
even in place), Vector overwrites, reads of their own writes, readers and other writers
opened in the middle, remote deltas and GC arriving in the middle (each evicts the
in-place writes), and an end by commit, abort or an exception. After every transaction
both trees must return the same deltas, hold the same records, root hash and rows to
write, the committed text must be the plain-list replay of the committed edits, and each
sequence must equal the naive per-element model (`sequence_model.py`) fed the committed
deltas. An abort must leave the tree exactly as it was: same records, root hash, rows.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trionode.crdt import (
    Entity,
    HybridClock,
    StateTree,
    TextState,
    Transaction,
    VectorState,
    text,
    vector,
)
from trionode.crdt.entity import Kind
from trionode.crdt.errors import TransactionError

from . import sequence_model as model
from .crdt_helpers import T0
from .test_run_items import assert_same

DOC = text()
ITEMS = vector(int)
ME = b"\x07" * 32
OTHER = b"\x08" * 32


class _Refused(Transaction):
    """A transaction that stages everything (the path before in-place writes)."""

    __slots__ = ()

    def edit_in_place(self, *_: object) -> bool:
        return False


class _Failed(Exception):
    """The app call raised: the `with` block ends without a commit."""


def _fail() -> None:
    raise _Failed


class Side:
    def __init__(self, *, in_place: bool) -> None:
        self.tree = StateTree()
        self.clock = HybridClock(ME, drift_tolerance=3600.0)
        self.physical = T0
        self.in_place = in_place

    def begin(self) -> Transaction:
        self.physical += 1 << 20
        if self.in_place:
            return self.tree.begin(self.clock, self.physical)
        return _Refused(self.tree, self.clock, self.physical)

    def state(self) -> tuple[list[Entity], bytes]:
        return [e.copy() for e in self.tree.entities()], self.tree.root_hash()


def _remote_delta(physical: int, n: int) -> list[Entity]:
    """A delta of another writer typing one character at the front of both fields."""
    other = StateTree()
    with other.begin(HybridClock(OTHER, drift_tolerance=3600.0), physical + n) as tx:
        tx.field("doc", DOC).insert(0, "R")
        tx.field("items", ITEMS).insert(0, -n)
        return tx.commit()


op = st.tuples(st.integers(0, 11), st.integers(0, 10_000), st.integers(0, 10_000))
txn = st.tuples(st.lists(op, max_size=8), st.sampled_from(["commit", "abort", "raise"]))


def _run(
    side: Side, ops: list[tuple[int, int, int]], end: str, expected: dict[str, list[Any]]
) -> tuple[list[Entity] | None, dict[str, list[Any]]]:
    """One transaction on `side`; returns its deltas (None: not committed) and the lists
    the fields hold inside it at the end (the transaction's reads of its own writes)."""
    local = {name: list(values) for name, values in expected.items()}
    tx = side.begin()
    deltas: list[Entity] | None = None
    try:
        with tx:
            for kind, a, b in ops:
                doc = tx.field("doc", DOC)
                items = tx.field("items", ITEMS)
                chars, values = local["doc"], local["items"]
                if kind <= 3:  # type a character
                    pos = a % (len(chars) + 1)
                    doc.insert(pos, "abcd"[b % 4])
                    chars.insert(pos, "abcd"[b % 4])
                elif kind == 4 and chars:  # backspace
                    pos = a % len(chars)
                    doc.delete(pos, 1)
                    del chars[pos]
                elif kind == 5:  # an item
                    pos = a % (len(values) + 1)
                    items.insert(pos, b)
                    values.insert(pos, b)
                elif kind == 6 and values:  # delete an item
                    pos = a % len(values)
                    items.delete(pos)
                    del values[pos]
                elif kind == 7:  # paste (staged)
                    pos = a % (len(chars) + 1)
                    doc.insert(pos, "xyz"[: b % 3 + 1])
                    chars[pos:pos] = "xyz"[: b % 3 + 1]
                elif kind == 8 and len(chars) > 1:  # a range delete (staged)
                    pos = a % (len(chars) - 1)
                    doc.delete(pos, 2)
                    del chars[pos : pos + 2]
                elif kind == 9 and values:  # overwrite (staged)
                    pos = a % len(values)
                    items.set(pos, -b)
                    values[pos] = -b
                elif kind == 10:  # another transaction opens (and reads) meanwhile
                    reader = side.tree.reader()
                    assert reader.field("doc", DOC).value() == "".join(expected["doc"])
                    assert reader.field("items", ITEMS).to_list() == expected["items"]
                assert doc.value() == "".join(chars)  # reads its own writes
                assert items.to_list() == values
            if end == "raise":
                _fail()
            if end == "commit":
                deltas = tx.commit()
    except _Failed:
        pass
    return deltas, local


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(txn, min_size=1, max_size=12), st.sets(st.integers(0, 11), max_size=3))
def test_in_place_writes_match_staged_writes_and_undo_on_abort(
    transactions: list[tuple[list[tuple[int, int, int]], str]], remote_at: set[int]
) -> None:
    fast, slow = Side(in_place=True), Side(in_place=False)
    expected: dict[str, list[Any]] = {"doc": [], "items": []}
    naive = {"doc": model.TextState(), "items": model.VectorState()}
    for n, (ops, end) in enumerate(transactions):
        before = fast.state()
        outcomes = [_run(side, ops, end, expected) for side in (fast, slow)]
        (fast_deltas, local), (slow_deltas, _) = outcomes
        assert fast_deltas == slow_deltas
        if fast_deltas is None:  # aborted: exactly as before
            assert fast.state() == before
        else:
            expected = local
            for delta in fast_deltas:
                _naive_merge(naive, delta)
        assert fast.state() == slow.state()
        assert fast.tree.drain_rows() == slow.tree.drain_rows()
        if n in remote_at:  # another writer's delta (both trees take it)
            remote = _remote_delta(fast.physical, n)
            for side in (fast, slow):
                side.tree.apply([e.copy() for e in remote])
            for delta in remote:
                _naive_merge(naive, delta)
            with fast.tree.reader() as tx:
                expected = {
                    "doc": list(tx.field("doc", DOC).value()),
                    "items": tx.field("items", ITEMS).to_list(),
                }
        with fast.tree.reader() as tx:
            assert tx.field("doc", DOC).value() == "".join(expected["doc"])
            assert tx.field("items", ITEMS).to_list() == expected["items"]
        for name, spec_type in (("doc", TextState), ("items", VectorState)):
            record = next((e for e in fast.tree.entities() if e.name == name.encode()), None)
            if record is not None and record.body is not None:
                assert type(record.body) is spec_type
                assert_same(record.body, naive[name], [])


def _naive_merge(naive: dict[str, Any], delta: Entity) -> None:
    body = delta.body
    if isinstance(body, TextState | VectorState):
        name = "doc" if isinstance(body, TextState) else "items"
        naive[name].merge(type(naive[name])(dict(body.elements)))


def _in_place(tree: StateTree) -> Transaction | None:
    return tree.in_place


def _typed(side: Side, chars: str) -> None:
    for char in chars:
        with side.begin() as tx:
            tx.field("doc", DOC).insert(len(tx.field("doc", DOC)), char)
            tx.commit()


def test_a_keystroke_is_joined_in_place_and_undone_on_abort() -> None:
    side = Side(in_place=True)
    _typed(side, "ab")
    side.tree.drain_rows()
    [record] = side.tree.entities()
    body = record.body
    hashed = side.tree.root_hash()
    tx = side.begin()
    tx.field("doc", DOC).insert(2, "c")
    tx.field("doc", DOC).delete(0, 1)
    assert side.tree.in_place is tx
    assert record.body is body  # written into the tree's own record, not a copy
    assert tx.field("doc", DOC).value() == "bc"
    tx.abort()
    assert _in_place(side.tree) is None
    assert side.tree.root_hash() == hashed
    with side.tree.reader() as reader:
        assert reader.field("doc", DOC).value() == "ab"
    assert side.tree.drain_rows() == []


def test_another_transaction_evicts_the_in_place_writes_and_they_stay_pending() -> None:
    side = Side(in_place=True)
    _typed(side, "ab")
    first = side.begin()
    first.field("doc", DOC).insert(2, "c")
    second = side.begin()  # sees only committed state
    assert second.field("doc", DOC).value() == "ab"
    assert side.tree.in_place is None
    assert first.field("doc", DOC).value() == "abc"  # still its own writes (staged now)
    second.field("doc", DOC).insert(0, "z")
    assert second.commit()
    with pytest.raises(TransactionError, match="another local transaction"):
        first.commit()
    with side.tree.reader() as reader:
        assert reader.field("doc", DOC).value() == "zab"


def test_a_remote_delta_mid_transaction_keeps_both() -> None:
    side = Side(in_place=True)
    _typed(side, "ab")
    tx = side.begin()
    tx.field("doc", DOC).insert(2, "c")
    side.tree.apply(_remote_delta(side.physical, 1))  # evicts, then joins
    assert tx.field("doc", DOC).value() == "Rabc"
    deltas = tx.commit()
    assert [d.kind for d in deltas] == [Kind.TEXT]
    with side.tree.reader() as reader:
        assert reader.field("doc", DOC).value() == "Rabc"
