"""Shared test helpers: replicas over one schema, random operations, visible snapshots."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from trionode.crdt import (
    Entity,
    HybridClock,
    StateTree,
    Timestamp,
    Transaction,
    counter,
    decode_entity,
    encode_entity,
    max_stamp,
    ntp64_from_unix,
    register,
    text,
    unordered_map,
    unordered_set,
    vector,
)
from trionode.crdt.order_index import OrderIndex

T0 = ntp64_from_unix(1_700_000_000.0)
SECOND = 1 << 32

REG = register(int)
COUNT = counter()
KV = unordered_map(str, register(str))
VOTES = unordered_map(str, counter())
NESTED = unordered_map(str, unordered_map(str, register(int)))
TAGS = unordered_set(str)
DOC = text()
LIST = vector(int)
NOTES = unordered_map(str, text())

KEYS = ("a", "b", "c")


class Replica:
    """One node's state: a tree, a clock and a physical time the test moves."""

    def __init__(self, name: bytes, *, skew: int = 0) -> None:
        self.name = name
        self.tree = StateTree()
        self.clock = HybridClock(name, drift_tolerance=3600.0)
        self.physical = T0 + skew

    def begin(self) -> Transaction:
        self.physical += 1 << 20  # ~0.25 ms per transaction
        return self.tree.begin(self.clock, self.physical)

    def receive(self, wire: list[bytes]) -> None:
        """What a node does with a delta: decode, advance the clock, join."""
        entities = [decode_entity(b) for b in wire]
        stamp = max_stamp(entities)
        if stamp is not None:
            self.clock.update(stamp, self.physical)
        self.tree.apply(entities)


def wire(deltas: list[Entity]) -> list[bytes]:
    return [encode_entity(d) for d in deltas]


def snapshot(tree: StateTree) -> dict[str, Any]:
    """Every visible value of the schema, as plain Python data."""
    tx = tree.reader()
    kv = tx.field("kv", KV)
    votes = tx.field("votes", VOTES)
    nested = tx.field("nested", NESTED)
    notes = tx.field("notes", NOTES)
    return {
        "reg": tx.field("reg", REG).get(),
        "count": tx.field("count", COUNT).value(),
        "kv": {k: v.get() for k, v in kv.items()},
        "votes": {k: c.value() for k, c in votes.items()},
        "nested": {k: {k2: r.get() for k2, r in m.items()} for k, m in nested.items()},
        "tags": sorted(tx.field("tags", TAGS)),
        "doc": tx.field("doc", DOC).value(),
        "list": tx.field("list", LIST).to_list(),
        "notes": {k: t.value() for k, t in notes.items()},
    }


def records(tree: StateTree) -> list[bytes]:
    """The full state, canonically: every record's bytes in id order."""
    return [encode_entity(e) for e in tree.entities()]


keys = st.sampled_from(KEYS)
small_text = st.text(alphabet="xyz", min_size=1, max_size=4)


Draw = Callable[[st.SearchStrategy[Any]], Any]


def perform(draw: Draw, tx: Transaction) -> None:
    """Draw and perform one mutation through `tx`."""
    choice = draw(st.integers(0, 15))
    if choice == 0:
        tx.field("reg", REG).set(draw(st.integers(-5, 5)))
    elif choice == 1:
        c = tx.field("count", COUNT)
        if draw(st.booleans()):
            c.increment(draw(st.integers(1, 3)))
        else:
            c.decrement()
    elif choice == 2:
        tx.field("kv", KV)[draw(keys)].set(draw(small_text))
    elif choice == 3:
        tx.field("kv", KV).remove(draw(keys))
    elif choice == 4:
        tx.field("votes", VOTES)[draw(keys)].increment()
    elif choice == 5:
        tx.field("votes", VOTES).remove(draw(keys))
    elif choice == 6:
        tx.field("nested", NESTED)[draw(keys)][draw(keys)].set(draw(st.integers(0, 9)))
    elif choice == 7:
        tx.field("nested", NESTED)[draw(keys)].remove(draw(keys))
    elif choice == 8:
        tx.field("nested", NESTED).remove(draw(keys))
    elif choice == 9:
        tags = tx.field("tags", TAGS)
        if draw(st.booleans()):
            tags.add(draw(keys))
        else:
            tags.remove(draw(keys))
    elif choice in (10, 11):
        _text_op(draw, tx.field("doc", DOC))
    elif choice == 12:
        _vector_op(draw, tx)
    elif choice == 13:
        _text_op(draw, tx.field("notes", NOTES)[draw(keys)])
    elif choice == 14:
        tx.field("notes", NOTES).remove(draw(keys))
    else:
        tx.field("kv", KV).clear()


def _text_op(draw: Draw, doc: Any) -> None:
    length = len(doc)
    if length and draw(st.booleans()):
        pos = draw(st.integers(0, length - 1))
        doc.delete(pos, draw(st.integers(1, length - pos)))
    else:
        doc.insert(draw(st.integers(0, length)), draw(small_text))


def _vector_op(draw: Draw, tx: Transaction) -> None:
    items = tx.field("list", LIST)
    length = len(items)
    choice = draw(st.integers(0, 3))
    if choice == 0 or not length:
        items.insert(draw(st.integers(0, length)), draw(st.integers(0, 99)))
    elif choice == 1:
        items.append(draw(st.integers(0, 99)))
    elif choice == 2:
        items[draw(st.integers(0, length - 1))] = draw(st.integers(0, 99))
    else:
        del items[draw(st.integers(0, length - 1))]


def place(
    model: list[Timestamp],
    index: OrderIndex,
    eid: Timestamp,
    a: int,
    *,
    before: bool,
    is_live: Callable[[Timestamp], bool],
) -> bool:
    """Put `eid` into a plain-list `model` and its `index` alike: after the a-th placed id
    (a == 0: at the front), or before the a-th with `before`. False: nothing to put it
    before."""
    if not before and (not model or a % (len(model) + 1) == 0):
        model.insert(0, eid)
        index.insert_after(None, eid, is_live)
    elif not before:
        anchor = model[a % (len(model) + 1) - 1]
        model.insert(model.index(anchor) + 1, eid)
        index.insert_after(anchor, eid, is_live)
    elif model:
        anchor = model[a % len(model)]
        model.insert(model.index(anchor), eid)
        index.insert_before(anchor, eid, is_live)
    else:
        return False
    return True
