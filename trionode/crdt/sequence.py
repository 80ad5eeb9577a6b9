"""RGA sequence state, shared by `Text` (one element per character) and `Vector`.

Theory of operation
-------------------
The state is a set of elements keyed by a stable id, an HLC `Timestamp` (time, writer).
Each element names the element it was inserted after (`after`; `HEAD` for the front), so
the elements form a tree rooted at `HEAD`. The sequence is the pre-order walk of that tree
with siblings visited highest id first. That order is a pure function of the element set,
so every replica that holds the same elements shows the same sequence, whatever order they
arrived in. A local insert gets a stamp above every id the replica holds (the transaction
witnesses the tree's newest stamp), so it becomes its reference's first child and lands
exactly where the user asked; concurrent inserts at one place end up ordered by id, the
same way everywhere, and a run typed by one writer stays contiguous.

Elements are never removed by operations: deleting sets a tombstone stamp (`deleted`) and
drops the value. Only `gc` removes tombstones, and only leaves, so no live element loses
the element it is positioned after, and never a run guard (the tombstone just above a live
element of its writer), so no run takes an id twice (see `gc`). An element whose `after` is
unknown (it arrived before its reference) is kept but not shown until the reference arrives.

Removal floor: when this sequence is the value of a map entry that was removed at HLC
`floor`, elements with id <= floor are hidden, and an element positioned after such an
element is shown as if inserted at the front: the reference can never become visible
again, and every replica decides this the same way from the stamps alone.

Joining element versions (same id): `after` takes the minimum, a tombstone absorbs the
value, and otherwise the value with the higher (updated-or-id stamp, value) wins. Honest
writers never produce two versions of an id except by delete/update, so the minimum and
value tie-breaks only make the join total (commutative, associative, idempotent) against
forged data.

Items (run-length storage): elements are not stored one by one. An *item* holds a stretch
of consecutive ids of one writer, each inserted right after the previous one, that also
sits contiguously in the order (element k+1 is element k's highest child): its writer, first
time, length, the first element's reference, the values in one `str` (Text) or list
(Vector), and per-element tombstone and value stamps only once some element has one (a
list of stamps, not an interval list: a stamp is one pointer, and deletes inside an item
need no split, so the item and its place in the order survive any delete). An id resolves
to (item, offset) by bisecting its writer's sorted item starts. Items split when an element
is inserted inside one (the two halves stay in place, the new item goes between), are
extended in place when their writer types on at their end, and hold at most `ITEM_MAX`
elements (so extending a Text item copies a short string). Only elements whose reference is
not the id just below them (item starts) keep an entry in the explicit children map; the
child `id + 1` is implied by the items.

Order: the placed items, in order, are cut into blocks with a Fenwick tree of the blocks'
visible counts, so a visible position resolves in O(log blocks + block) and a keystroke
extends or splits one item. A keystroke remembers the place it wrote (`_cursor`): the next
one, typing on or a backspace, finds its position there without a search. Elements whose
reference is missing (or that sit on a forged cycle) are stored in unplaced items until it
arrives. Anything the incremental paths do not cover (bulk merges, out-of-order arrivals,
forged re-parenting, GC) drops the order,
which is rebuilt on the next read by a pre-order walk that also regroups the items (a
stretch of an item at a time, up to its next element with explicit children). Decoding
builds items straight from the wire runs (`from_runs`).
Floors, `wire`, `gc`, `elements` and `__eq__` still expand the items into elements (O(n)).

Hash chunks: the visible sequence is cut into chunks ending at cut ids (see "Hash chunks"
in `order_index.py`) and the hash form is the list of their digests, defined over element
ids exactly as before. Chunks are computed per block from the items' live id ranges
(arithmetic on times: no per-element objects) and each digest is cached under its ending
cut with the chunk's id ranges, so a keystroke rehashes one chunk.

Runs: a local insert right after the writer's own childless element X takes the id
`X.time + 1` (same writer) instead of a fresh clock stamp, when that id is free (GC keeps
the tombstone that could make a used id look free, see `gc`). X has no children, so the
new element is placed right after X whatever its id, and a later insert that knows it
gets a fresh stamp above it, as RGA requires. Consecutive typing therefore yields runs of
consecutive ids, which the canonical form stores as one row per run (see `wire`). The
caller makes the clock witness the ids it took (`Transaction.witness`), so no fresh stamp
can collide with them.
"""

from __future__ import annotations

import hashlib
import itertools
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from itertools import groupby
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Final, Generic, NamedTuple, Self, TypeVar, cast

from trionode.crdt.canonical import canonical
from trionode.crdt.hlc import NTP64_MAX, HybridClock, Timestamp, latest, new_stamp
from trionode.crdt.order_index import CUT_EVERY, chunk_ends, fenwick, fenwick_add, fenwick_find

V = TypeVar("V", str, bytes)

_new: Final = object.__new__
"""An instance of a class without calling the class (per keystroke: no `__init__`)."""

HEAD: Final = Timestamp(0, b"")
"""The virtual element before the first one. No real element can have this id."""

_BULK_MERGE: Final = 64
"""Above this many incoming elements a full rebuild is cheaper than incremental placement."""
ITEM_MAX: Final = 256
"""Most elements in one item (see "Items"): bounds the copy when a Text item grows."""
BLOCK_MAX: Final = 32
"""Most items in one block of the order."""
_BLOCK_FILL: Final = 16
"""Items per block after a rebuild (room to grow before the first split)."""


Group = tuple[int, int, int, int]
"""`(offset, count, time, writer#)`: a span of a run's elements sharing one stamp."""
WireRun = tuple[int, int, int, int, int, V | list[V], list[Group], list[Group]]
"""One run in the canonical form (see `SequenceState.wire`)."""
RunSpec = tuple[
    bytes, int, Timestamp, Any, list[Timestamp | None] | None, list[Timestamp | None] | None
]
"""`(writer, first time, reference, live values, deleted, updated)`: a checked wire run
(`SequenceState.from_runs`); `deleted`/`updated` are per element, None when none is set."""
Segment = tuple[bytes, int, int]
"""`(writer, first time, last time)`: consecutive visible ids of one writer, in order."""


class Element(NamedTuple, Generic[V]):
    after: Timestamp
    """Id of the element this one was inserted after (`HEAD` for the front)."""
    value: V | None
    """The value; None once deleted."""
    updated: Timestamp | None
    """Stamp of the current value if it was overwritten (Vector `set`); None: the id's."""
    deleted: Timestamp | None
    """Tombstone stamp; None while live."""


_element: Final = cast(
    "Callable[[tuple[Timestamp, V | None, Timestamp | None, Timestamp | None]], Element[V]]",
    partial(tuple.__new__, Element),
)
"""`Element` from a tuple without the NamedTuple's Python-level `__new__` (per keystroke)."""


def join_element(eid: Timestamp, a: Element[V], b: Element[V]) -> Element[V]:
    """Join two versions of element `eid` (see the module docstring)."""
    if a == b:
        return a
    after = min(a.after, b.after)
    deleted = latest(a.deleted, b.deleted)
    if deleted is not None:
        return Element(after, None, None, deleted)
    # The last field only separates an explicit value stamp equal to the id from none.
    a_key = (a.updated if a.updated is not None else eid, a.value, a.updated is not None)
    b_key = (b.updated if b.updated is not None else eid, b.value, b.updated is not None)
    winner = a if a_key >= b_key else b
    return Element(after, winner.value, winner.updated, None)


class _Block:
    __slots__ = ("carry_in", "carry_out", "chunks", "items", "live", "pos")

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.live = sum(item.live for item in items)
        self.pos = 0
        self.chunks: list[bytes] | None = None
        """Digests of the hash chunks ending in this block (None: stale)."""
        self.carry_in: list[Segment] = []
        self.carry_out: list[Segment] = []
        for item in items:
            item.block = self


class _Item:
    """Consecutive elements of one writer, contiguous in the order (see "Items").

    Made by `_item` (or `_Item()` and every slot set): the class has no `__init__` of its
    own, so calling it runs no Python (a class with a Python `__init__` is called through C
    and a fresh interpreter frame; items are made per keystroke and per decoded run)."""

    __slots__ = ("after", "block", "deleted", "live", "n", "node", "start", "updated", "values")

    node: bytes
    start: int
    n: int
    after: Timestamp
    """Reference of the first element (the others follow the one before them)."""
    values: Any
    """One value per element (a str for Text); a deleted element's entry is filler."""
    deleted: list[Timestamp | None] | None
    """Tombstone stamp per element, or None while none is deleted."""
    updated: list[Timestamp | None] | None
    """Value stamp per element, or None while no value was overwritten."""
    live: int
    block: _Block | None
    """The block holding it (None: not placed)."""

    def element(self, k: int) -> Element[Any]:
        deleted = None if self.deleted is None else self.deleted[k]
        return _element(
            (
                self.after if not k else new_stamp((self.start + k - 1, self.node)),
                None if deleted is not None else self.values[k],
                None if self.updated is None else self.updated[k],
                deleted,
            )
        )

    def clone(self) -> _Item:
        new = _Item()
        new.node = self.node
        new.start = self.start
        new.n = self.n
        new.after = self.after
        new.values = self.values if isinstance(self.values, str) else list(self.values)
        new.deleted = None if self.deleted is None else list(self.deleted)
        new.updated = None if self.updated is None else list(self.updated)
        new.live = self.live
        new.block = None
        return new

    def cut(self, k: int) -> _Item:
        """Split off elements k.. (0 < k < n) as a new item (same block), returned."""
        tail = _Item()
        tail.node = self.node
        tail.start = self.start + k
        tail.n = self.n - k
        tail.after = new_stamp((self.start + k - 1, self.node))
        tail.values = self.values[k:]
        self.values = self.values[:k]
        tail.deleted = None
        tail.updated = None
        if self.deleted is not None:
            tail.deleted = self.deleted[k:]
            del self.deleted[k:]
        if self.updated is not None:
            tail.updated = self.updated[k:]
            del self.updated[k:]
        self.n = k
        tail.live = tail.n if tail.deleted is None else tail.deleted.count(None)
        self.live -= tail.live
        tail.block = self.block
        return tail

    def live_offset(self, rank: int) -> int:
        """Offset of the live element with this rank among the item's live ones."""
        deleted = self.deleted
        if deleted is None:
            return rank
        for k, stamp in enumerate(deleted):
            if stamp is None:
                if not rank:
                    return k
                rank -= 1
        raise IndexError(rank)

    def live_ranges(self) -> Iterator[tuple[int, int]]:
        """(first offset, end offset) of each stretch of live elements."""
        deleted = self.deleted
        if deleted is None:
            if self.n:
                yield 0, self.n
            return
        k = 0
        n = self.n
        while k < n:
            while k < n and deleted[k] is not None:
                k += 1
            first = k
            while k < n and deleted[k] is None:
                k += 1
            if k > first:
                yield first, k


def _item(  # noqa: PLR0917  (made in a few hot places, positionally)
    node: bytes,
    start: int,
    after: Timestamp,
    values: Any,
    deleted: list[Timestamp | None] | None,
    updated: list[Timestamp | None] | None,
) -> _Item:
    """An unplaced item of `values` (see `_Item`)."""
    item = _Item()
    item.node = node
    item.start = start
    item.n = n = len(values)
    item.after = after
    item.values = values
    item.deleted = deleted
    item.updated = updated
    item.live = n if deleted is None else deleted.count(None)
    item.block = None
    return item


_Origin = tuple["SequenceState[Any]", int, list[tuple[_Item, int, int]], Timestamp]
"""(source state, its version, live spans, stamp): see `SequenceState._origin`."""


class SequenceState(Generic[V]):
    """An RGA element set stored as run-length items. See the module docstring."""

    __slots__ = (
        "_blocks",
        "_count",
        "_cursor",
        "_digests",
        "_expanded",
        "_extra",
        "_fenwick",
        "_floored",
        "_lag",
        "_lag_at",
        "_lists",
        "_live_total",
        "_newest",
        "_origin",
        "_runs",
        "_touched",
        "_typing",
        "_version",
    )
    _text: bool = False
    _filler: Any = None
    # Set with the order (`_rebuild`), read only while it is held (`_blocks`), so a state
    # without one (a keystroke's delta) never allocates them:
    _fenwick: list[int]
    """Fenwick tree of the blocks' visible counts, but for `_lag` (see `_settle`)."""
    _lag_at: int
    """The block position whose visible count the Fenwick tree lacks `_lag` of (-1: none):
    a keystroke counts its block here, so typing on in one block pays one Fenwick update
    per run of keystrokes, not one per keystroke. Adds commute, so only a lookup
    (`_locate`) and a copy need the tree up to date; a rebuild (`_reindex`) drops it."""
    _lag: int
    _digests: dict[tuple[int, bytes] | None, tuple[list[Segment], bytes]]
    """(segments, digest) of hash chunks by the cut ending them (None: the trailing one)."""
    _touched: set[Timestamp]
    """Ids whose value changed since the last hash read."""

    def __init__(self, elements: Mapping[Timestamp, Element[V]] | None = None) -> None:
        self._reset()
        if elements:
            for eid in sorted(elements):
                self._store_new(eid, elements[eid])

    @classmethod
    def from_runs(cls, runs: Sequence[RunSpec]) -> Self:
        """The state holding the elements of `runs` (sorted by first id, disjoint, each a
        chain of consecutive ids inserted one after another: `encoding._runs` checks
        them), built item by item: a run becomes its items as they are, never one element
        at a time unless it holds deletes or value stamps."""
        new: Self = cls.__new__(cls)
        new._reset()
        text = cls._text
        filler = cls._filler
        by_writer = new._runs
        extra = new._extra
        count = 0
        for node, time, after, values, deleted, updated in runs:
            length = len(values) if deleted is None else len(deleted)
            if deleted is not None and None not in deleted:
                full: Any = filler * length if text and type(values) is str else [filler] * length
            elif deleted is not None:
                live = iter(values)
                full = [filler if gone is not None else next(live) for gone in deleted]
                if text and type(values) is str:
                    full = "".join(full)
            else:
                full = values if type(values) is str else list(values)
            if not _implied(new_stamp((time, node)), after):
                insort(extra.setdefault(after, []), new_stamp((time, node)))
            runs_of = by_writer.get(node)
            if runs_of is None:
                runs_of = by_writer[node] = ([], [])
            starts, items = runs_of
            for offset in range(0, length, ITEM_MAX):
                stop = min(length, offset + ITEM_MAX)
                item = _item(
                    node,
                    time + offset,
                    after if not offset else new_stamp((time + offset - 1, node)),
                    full[offset:stop] if offset or stop < length else full,
                    None if deleted is None else deleted[offset:stop],
                    None if updated is None else updated[offset:stop],
                )
                starts.append(item.start)
                items.append(item)
            count += length
        new._count = count
        return new

    def _reset(self) -> None:
        self._runs: dict[bytes, tuple[list[int], list[_Item]]] = {}
        """Per writer: sorted item starts and the items."""
        self._extra: dict[Timestamp, list[Timestamp]] = {}
        """Sorted children of each element, apart from the implied child `id + 1`."""
        self._count: int = 0
        self._blocks: list[_Block] | None = None
        """The placed items in order (None: rebuild on the next read)."""
        self._live_total: int = 0
        self._lists: tuple[list[Timestamp], list[Timestamp]] | None = None
        self._floored: tuple[Timestamp, list[Timestamp], list[Timestamp]] | None = None
        self._expanded: dict[Timestamp, Element[V]] | None = None
        self._version = next(_VERSIONS)
        """Changes on every change (unique across states): see `_origin`."""
        self._origin: _Origin | None = None
        """For a range delete's delta: the state it was made from, that state's version
        then and the live spans it tombstones, so merging it back into that unchanged state
        costs O(spans), not a lookup per item (`_tombstone_all`)."""
        self._newest: tuple[int, Timestamp] | None = None
        """(version, newest stamp) from `delete_delta`: `max_stamp` while the version is
        unchanged, without reading every tombstone stamp of a range delete."""
        self._cursor: tuple[int, int, _Item, int, Timestamp | None] | None = None
        """(version, visible position, item, offset, id or None) of the element a
        keystroke just wrote or the one before the element it just deleted: `_locate` of
        the next keystroke's position (and the id it goes after) without a search, valid
        while the version is unchanged."""
        self._typing: tuple[int, _Item, Timestamp] | None = None
        """(version, item, id) from `insert_one`: the id continues the item's run, the
        item is placed and ends with its writer's childless element; valid while the
        version is unchanged, so `merge` of that keystroke appends without lookups."""

    # -- storage -------------------------------------------------------------------------

    def _find(self, eid: Timestamp) -> tuple[_Item, int] | None:
        """The item holding `eid` and its offset there (None: not held)."""
        runs = self._runs.get(eid[1])
        if runs is None:
            return None
        starts, items = runs
        i = bisect_right(starts, eid[0]) - 1
        if i < 0:
            return None
        item = items[i]
        k = eid[0] - item.start
        return (item, k) if k < item.n else None

    def element(self, eid: Timestamp) -> Element[V] | None:
        """The element with id `eid` (None: not held)."""
        found = self._find(eid)
        return None if found is None else found[0].element(found[1])

    def _after(self, item: _Item, k: int) -> Timestamp:
        return item.after if not k else new_stamp((item.start + k - 1, item.node))

    def _kids(self, parent: Timestamp) -> list[Timestamp]:
        """The children of `parent`, ascending (a new list)."""
        kids = list(self._extra.get(parent, ()))
        if parent != HEAD:
            child = new_stamp((parent[0] + 1, parent[1]))
            found = self._find(child)
            if found is not None and self._after(*found) == parent:
                insort(kids, child)
        return kids

    def _has_kids(self, parent: Timestamp) -> bool:
        if parent in self._extra:
            return True
        found = self._find(new_stamp((parent[0] + 1, parent[1])))
        if found is None:
            return False
        item, k = found
        return k > 0 or item.after == parent

    def _add_item(self, item: _Item) -> None:
        runs = self._runs.get(item.node)
        if runs is None:
            self._runs[item.node] = ([item.start], [item])
            return
        starts, items = runs
        i = bisect_left(starts, item.start)
        starts.insert(i, item.start)
        items.insert(i, item)

    def _split(self, item: _Item, k: int) -> _Item:
        """Cut `item` before offset k (0 < k < n), in storage and in its block."""
        tail = item.cut(k)
        starts, items = self._runs[item.node]
        i = bisect_left(starts, tail.start)
        starts.insert(i, tail.start)
        items.insert(i, tail)
        block = item.block
        if block is not None:
            at = block.items.index(item)
            block.items.insert(at + 1, tail)
            block.chunks = None
            if len(block.items) > BLOCK_MAX:
                self._split_block(block)
        return tail

    def _store_new(self, eid: Timestamp, el: Element[V]) -> _Item:
        """Store an element this state lacks (not placed); returns its item."""
        time, node = eid
        after = el[0]
        value = el[1]
        if value is None and el[3] is not None:
            value = self._filler
        self._count += 1
        self._changed()
        if after[1] == node and after[0] == time - 1 and after != HEAD:
            found = self._find(after)
            if found is not None:
                item, k = found
                if k == item.n - 1 and item.n < ITEM_MAX and item.block is None:
                    self._append(item, value, el[2], el[3])
                    return item
        else:
            insort(self._extra.setdefault(after, []), eid)
        item = _item(
            node,
            time,
            after,
            self._pack_one(value),
            None if el[3] is None else [el[3]],
            None if el[2] is None else [el[2]],
        )
        self._add_item(item)
        return item

    def _pack_one(self, value: Any) -> Any:
        """One element's values container: a one-character str for Text (a list only for
        a value that is not one character: forged or hand-built states)."""
        if self._text and type(value) is str and len(value) == 1:
            return value
        return [value]

    def _append(
        self, item: _Item, value: Any, updated: Timestamp | None, deleted: Timestamp | None
    ) -> None:
        n = item.n
        values: Any = item.values
        if type(values) is not str:
            values.append(value)
        elif type(value) is str and len(value) == 1:
            item.values = values + value
        else:
            item.values = [*values, value]
        if deleted is not None:
            if item.deleted is None:
                item.deleted = [None] * n
            item.deleted.append(deleted)
        elif item.deleted is not None:
            item.deleted.append(None)
        if updated is not None:
            if item.updated is None:
                item.updated = [None] * n
            item.updated.append(updated)
        elif item.updated is not None:
            item.updated.append(None)
        item.n = n + 1
        if deleted is None:
            item.live += 1

    def _write(self, item: _Item, k: int, eid: Timestamp, old: Element[V], new: Element[V]) -> None:
        """Replace element k of `item` (id `eid`) by its joined version `new`."""
        if new[0] != old[0]:  # forged data: re-parent (the caller drops the order)
            if k:
                item = self._split(item, k)
                k = 0
            if not _implied(eid, old[0]):
                siblings = self._extra[old[0]]
                del siblings[bisect_left(siblings, eid)]
                if not siblings:
                    del self._extra[old[0]]
            item.after = new[0]
            if not _implied(eid, new[0]):
                insort(self._extra.setdefault(new[0], []), eid)
        if new[3] != old[3]:
            if item.deleted is None:
                item.deleted = [None] * item.n
            item.deleted[k] = new[3]
            if old[3] is None:
                item.live -= 1
                if item.block is not None:
                    item.block.live -= 1
        if new[2] != old[2]:
            if item.updated is None:
                item.updated = [None] * item.n
            item.updated[k] = new[2]
        if new[3] is None and new[1] != old[1]:
            values: Any = item.values
            value = new[1]
            if type(values) is not str:
                values[k] = value
            elif type(value) is str and len(value) == 1:
                item.values = values[:k] + value + values[k + 1 :]
            else:
                item.values = [*values[:k], value, *values[k + 1 :]]
        self._changed()

    def _changed(self) -> None:
        self._version = next(_VERSIONS)
        self._lists = None
        self._floored = None
        self._expanded = None

    def _items(self) -> Iterator[_Item]:
        for _starts, items in self._runs.values():
            yield from items

    def _iter_elements(self) -> Iterator[tuple[Timestamp, Element[V]]]:
        for item in self._items():
            node = item.node
            start = item.start
            for k in range(item.n):
                yield new_stamp((start + k, node)), item.element(k)

    # -- state ---------------------------------------------------------------------------

    @property
    def elements(self) -> Mapping[Timestamp, Element[V]]:
        """Every element by id (expanded from the items, O(n); cached until a change)."""
        expanded = self._expanded
        if expanded is None:
            expanded = self._expanded = dict(sorted(self._iter_elements()))
        return MappingProxyType(expanded)

    def element_count(self) -> int:
        """How many elements (tombstones included) this state holds."""
        return self._count

    def is_empty(self) -> bool:
        return not self._count

    def copy(self) -> Self:
        new: Self = type(self).__new__(type(self))
        new._reset()
        clones: dict[int, _Item] = {}
        for node, (starts, items) in self._runs.items():
            copied = [item.clone() for item in items]
            for old, clone in zip(items, copied, strict=True):
                clones[id(old)] = clone
            new._runs[node] = (list(starts), copied)
        new._extra = {k: list(v) for k, v in self._extra.items()}
        new._count = self._count
        if self._blocks is not None:
            copied_blocks: list[_Block] = []
            for block in self._blocks:
                twin = _Block([clones[id(item)] for item in block.items])
                twin.pos = block.pos
                twin.chunks = block.chunks
                twin.carry_in = block.carry_in
                twin.carry_out = block.carry_out
                copied_blocks.append(twin)
            new._blocks = copied_blocks
            new._fenwick = list(self._fenwick)
            new._lag_at = self._lag_at
            new._lag = self._lag
            new._live_total = self._live_total
            new._digests = self._digests.copy()
            new._touched = self._touched.copy()
        new._lists = self._lists  # replaced, never mutated
        new._floored = self._floored
        return new

    def merge(self, other: SequenceState[V]) -> bool:
        """Join `other` into self; returns whether anything changed."""
        if other is self or not other._count:
            return False
        # A range delete's delta joined with more (a transaction's later edits) no longer
        # tombstones exactly the spans it was made for: merged back through `_origin`, it
        # would drop the rest.
        self._origin = None
        if self._blocks is not None:
            if other._count == 1:  # a keystroke
                [(_, [single])] = other._runs.values()
                eid = new_stamp((single.start, single.node))
                typing = self._typing
                if (
                    typing is not None
                    and typing[2] == eid
                    and typing[0] == self._version
                    and single.after[0] + 1 == eid[0]
                    and single.after[1] == eid[1]
                ):  # `insert_one` just checked the run goes on at the end of this item
                    item = typing[1]
                    if (
                        item.block is not None
                        and item.n < ITEM_MAX
                        and item.start + item.n == eid[0]
                        and not self._has_kids(eid)
                    ):
                        self._grow(item, single.element(0))
                        return True
                if self._find(eid) is None and self._insert_placed(eid, single.element(0)):
                    return True
            else:
                done = self._tombstone_all(other)
                if done is not None:
                    return done
                if other._count > _BULK_MERGE:
                    self._drop_order()
        changed = False
        for eid, incoming in (
            sorted(other._iter_elements()) if other._count > 1 else (other._iter_elements())
        ):
            found = self._find(eid)
            if found is None:
                if self._blocks is None or not self._insert_placed(eid, incoming):
                    item = self._store_new(eid, incoming)
                    if self._blocks is not None and (
                        item.block is not None or self._has_kids(eid) or self._placed(incoming[0])
                    ):
                        self._drop_order()  # (placed parent: `_insert_placed` refused it)
                changed = True
                continue
            item, k = found
            mine = item.element(k)
            joined = join_element(eid, mine, incoming)
            if joined == mine:
                continue
            changed = True
            placed = self._blocks is not None and item.block is not None
            self._write(item, k, eid, mine, joined)
            if not placed:
                if joined[0] != mine[0]:
                    self._drop_order()
                continue
            if joined[0] != mine[0]:
                self._drop_order()
                continue
            if mine[3] is None and joined[3] is not None:
                self._hidden(item)
            elif joined[3] is None:  # a new value (Vector `set`): rehash its chunk
                assert item.block is not None
                item.block.chunks = None
                self._touched.add(eid)
        return changed

    def _tombstone_all(self, other: SequenceState[V]) -> bool | None:
        """`merge` of a delta that only deletes elements this state holds (a range
        delete), item range by item range: each element becomes `join_element`'s result
        and each placed item's block and count are updated once, keeping the order and its
        cached chunk digests. None, changing nothing, when the delta is anything else
        (new elements, values, a different reference)."""
        origin = other._origin
        if origin is not None and origin[0] is self and origin[1] == self._version:
            return self._tombstone_spans(origin[2], origin[3], other)
        pieces = list(other._items())
        spans: list[tuple[_Item, int, int, list[Timestamp | None], int]] = []
        for piece in pieces:
            stamps = piece.deleted
            if stamps is None or piece.updated is not None or stamps.count(None):
                return None
            node = piece.node
            time = piece.start
            end = time + piece.n
            while time < end:
                found = self._find(new_stamp((time, node)))
                if found is None:
                    return None
                item, k = found
                theirs = piece.after if time == piece.start else new_stamp((time - 1, node))
                if (not k or time == piece.start) and self._after(item, k) != theirs:
                    return None
                take = min(item.n - k, end - time)
                spans.append((item, k, take, stamps, time - piece.start))
                time += take
        changed = False
        per_block: dict[int, int] = {}
        for item, k, take, stamps, at in spans:
            deleted = item.deleted
            if deleted is None:
                deleted = item.deleted = [None] * item.n
            window = deleted[k : k + take]
            if window.count(None) == take:  # all live: the common range delete
                deleted[k : k + take] = stamps[at : at + take]
                hidden = take
            else:
                hidden = 0
                for j in range(take):
                    mine = window[j]
                    incoming = stamps[at + j]
                    if mine is None:
                        deleted[k + j] = incoming
                        hidden += 1
                    elif incoming is not None and incoming > mine:
                        deleted[k + j] = incoming
                        changed = True
            if hidden:
                changed = True
                if item.updated is not None:  # (a tombstone keeps no value stamp)
                    for j in range(k, k + take):
                        item.updated[j] = None
                item.live -= hidden
                block = item.block
                if block is not None:
                    block.live -= hidden
                    block.chunks = None
                    per_block[block.pos] = per_block.get(block.pos, 0) + hidden
        self._uncount(per_block)
        if changed:
            self._changed()
        return changed

    def _tombstone_spans(
        self, spans: list[tuple[_Item, int, int]], gone: Timestamp, delta: SequenceState[V]
    ) -> bool:
        """`_tombstone_all` of `delta`, made by `delete_delta` from this very state with
        nothing changed since: `spans` are live stretches of this state's items and
        `delta` tombstones exactly them, all at one stamp."""
        if not spans:
            return False
        per_block: dict[int, int] = {}
        for item, begin, end in spans:
            take = end - begin
            if item.deleted is None:
                item.deleted = [None] * item.n
            item.deleted[begin:end] = [gone] * take
            if item.updated is not None:
                item.updated[begin:end] = [None] * take
            item.live -= take
            block = item.block
            if block is not None:
                block.live -= take
                block.chunks = None
                per_block[block.pos] = per_block.get(block.pos, 0) + take
        self._uncount(per_block)
        delta._origin = None  # (used: the state has changed since)
        self._changed()
        return True

    def _placed(self, eid: Timestamp) -> bool:
        if eid == HEAD:
            return True
        found = self._find(eid)
        return found is not None and found[0].block is not None

    def _hidden(self, item: _Item) -> None:
        """An element of placed `item` was just deleted (its counts already updated)."""
        block = item.block
        assert block is not None
        self._live_total -= 1
        self._add(block.pos, -1)
        block.chunks = None

    def join(self, other: SequenceState[V]) -> Self:
        result = self.copy()
        result.merge(other)
        return result

    # -- order ---------------------------------------------------------------------------

    def _drop_order(self) -> None:
        if self._blocks is not None:
            for item in self._items():
                item.block = None
            self._blocks = None
            self._digests = {}
            self._touched = set()
        self._changed()

    def _ordered(self) -> list[_Block]:
        blocks = self._blocks
        if blocks is None:
            blocks = self._rebuild()
        return blocks

    def _rebuild(self) -> list[_Block]:
        """Walk the tree in pre-order (siblings highest id first), regroup the items by it
        and cut them into blocks."""
        extra = self._extra
        find = self._find
        placed: list[_Item] = []
        current: _Item | None = None
        seen: set[int] = set()
        # Per writer, the sorted times of its elements with explicit children: an item's
        # stretch up to the next of them is copied whole (the walk is per stretch, not
        # per element: a typed run has none inside).
        parents: dict[bytes, list[int]] = {}
        for parent in extra:
            if parent != HEAD:
                parents.setdefault(parent[1], []).append(parent[0])
        for times in parents.values():
            times.sort()
        stack = list(extra.get(HEAD, ()))
        while stack:
            found = find(stack.pop())
            assert found is not None
            item, k = found
            seen.add(id(item))
            node = item.node
            start = item.start
            n = item.n
            times = parents.get(node) or []
            while True:  # along the item while its next element is the highest child
                i = bisect_left(times, start + k)
                j = min(n - 1, times[i] - start) if i < len(times) else n - 1
                after = item.after if not k else new_stamp((start + k - 1, node))
                current = self._place_stretch(current, placed, item, k, j + 1, after)
                eid = new_stamp((start + j, node))
                if j + 1 < n:
                    others = extra[eid]
                    implied = new_stamp((start + j + 1, node))
                    if others[-1] > implied:  # a higher child goes first
                        kids = list(others)
                        insort(kids, implied)
                        stack += kids
                        break
                    stack += others
                    k = j + 1
                    continue
                stack += self._kids(eid)
                break
        # Storage: the regrouped placed items, and the unreachable ones as they were.
        unplaced = [item for item in self._items() if id(item) not in seen]
        self._runs = {}
        for item in unplaced:
            item.block = None
            self._add_item(item)
        for item in placed:
            self._add_item(item)
        blocks = [
            _Block(placed[i : i + _BLOCK_FILL]) for i in range(0, max(len(placed), 1), _BLOCK_FILL)
        ]
        self._blocks = blocks
        self._digests = {}
        self._touched = set()
        self._reindex()
        return blocks

    def _place_stretch(  # noqa: PLR0917  (one call per stretch of `_rebuild`)
        self,
        current: _Item | None,
        placed: list[_Item],
        item: _Item,
        k: int,
        stop: int,
        after: Timestamp,
    ) -> _Item:
        """Elements k..stop-1 of `item` (the first after `after`) follow `current` in the
        order: appended to it when they continue its run, else new items in `placed`
        (at most `ITEM_MAX` elements each). Returns the last item."""
        node = item.node
        time = item.start + k
        while k < stop:
            if (
                current is not None
                and after[1] == node
                and after[0] == time - 1
                and current.node == node
                and current.start + current.n == time
                and current.n < ITEM_MAX
            ):
                take = min(stop - k, ITEM_MAX - current.n)
                _extend_item(current, item, k, take)
            else:
                take = min(stop - k, ITEM_MAX)
                current = _item(
                    node,
                    time,
                    after,
                    item.values[k : k + take],
                    None if item.deleted is None else item.deleted[k : k + take],
                    None if item.updated is None else item.updated[k : k + take],
                )
                placed.append(current)
            k += take
            time += take
            after = new_stamp((time - 1, node))
        assert current is not None  # (stop > k on entry)
        return current

    def _reindex(self, start: int = 0) -> None:
        """Renumber the blocks (from `start`: those before it kept their places) and
        rebuild the Fenwick tree of their live counts."""
        blocks = self._blocks
        assert blocks is not None
        for pos in range(start, len(blocks)):
            blocks[pos].pos = pos
        self._fenwick, self._live_total = fenwick([block.live for block in blocks])
        self._lag_at = -1  # (built from the blocks' counts, which never lag)
        self._lag = 0

    def _settle(self) -> None:
        """Bring the Fenwick tree up to date with the blocks' counts (see `_lag_at`)."""
        if self._lag_at >= 0:
            fenwick_add(self._fenwick, self._lag_at, self._lag)
            self._lag_at = -1
            self._lag = 0

    def _add(self, pos: int, delta: int) -> None:
        fenwick_add(self._fenwick, pos, delta)  # (adds commute: a lag may stay)

    def _uncount(self, hidden_per_block: dict[int, int]) -> None:
        """Elements were hidden in placed blocks (by block position): the totals."""
        for pos, hidden in hidden_per_block.items():
            self._live_total -= hidden
            fenwick_add(self._fenwick, pos, -hidden)

    def _locate(self, position: int) -> tuple[_Item, int]:
        """The item holding visible `position` and the element's offset in it."""
        cursor = self._cursor
        if cursor is not None and cursor[1] == position and cursor[0] == self._version:
            return cursor[2], cursor[3]
        blocks = self._ordered()
        if self._lag_at >= 0:
            self._settle()
        pos, rest = fenwick_find(self._fenwick, position)
        for item in blocks[pos].items:
            live = item.live
            if rest < live:
                return item, item.live_offset(rest)
            rest -= live
        raise IndexError(position)

    def _visible_id(self, position: int) -> Timestamp:
        self._ordered()
        if not 0 <= position < self._live_total:
            raise IndexError(position)
        item, k = self._locate(position)
        return new_stamp((item.start + k, item.node))

    def _insert_placed(self, eid: Timestamp, el: Element[V]) -> bool:
        """Store and place a new element whose reference is placed (or HEAD) and that no
        held element names as its reference; False, changing nothing, otherwise."""
        parent = el[0]
        if parent[0] + 1 == eid[0] and parent[1] == eid[1] and parent not in self._extra:
            # Typing on: the parent's only other possible child is `eid` itself, absent.
            found = self._find(parent)
            if found is not None:
                item, k = found
                if (
                    item.block is not None
                    and k == item.n - 1
                    and item.n < ITEM_MAX
                    and parent != HEAD
                    and not self._has_kids(eid)
                ):
                    self._grow(item, el)
                    return True
        if self._has_kids(eid) or not self._placed(parent):
            return False
        siblings = self._kids(parent)
        k = bisect_left(siblings, eid)
        if k:  # the next lower sibling follows the new element: go right before it
            found = self._find(siblings[k - 1])
            assert found is not None
            item, offset = found
            if offset:
                item = self._split(item, offset)
            block = item.block
            assert block is not None
            self._place_new(block, block.items.index(item), eid, el)
        elif siblings:  # lowest: after the subtree of the next higher sibling
            last = siblings[0]
            while kids := self._kids(last):
                last = kids[0]
            self._place_after(last, eid, el)
        else:
            self._place_after(parent, eid, el)
        if not _implied(eid, parent):
            insort(self._extra.setdefault(parent, []), eid)
        return True

    def _place_after(self, anchor: Timestamp, eid: Timestamp, el: Element[V]) -> None:
        blocks = self._blocks
        assert blocks is not None
        if anchor == HEAD:
            self._place_new(blocks[0], 0, eid, el)
            return
        found = self._find(anchor)
        assert found is not None
        item, k = found
        if k + 1 < item.n:
            self._split(item, k + 1)
        block = item.block
        assert block is not None
        if (
            el[0] == anchor
            and anchor[1] == eid[1]
            and anchor[0] + 1 == eid[0]
            and item.n < ITEM_MAX
        ):  # typing on at the end of the writer's own item
            self._grow(item, el)
            return
        self._place_new(block, block.items.index(item) + 1, eid, el)

    def _grow(self, item: _Item, el: Element[V]) -> None:
        """Append the next element of its writer to placed `item` (typing on)."""
        block = item.block
        assert block is not None
        value = self._filler if el[1] is None and el[3] is not None else el[1]
        self._append(item, value, el[2], el[3])
        self._count += 1
        self._changed()
        block.chunks = None
        if el[3] is None:
            block.live += 1
            self._live_total += 1
            self._add(block.pos, 1)

    def _place_new(self, block: _Block, at: int, eid: Timestamp, el: Element[V]) -> None:
        """A new one-element item at index `at` of `block`."""
        value = self._filler if el[1] is None and el[3] is not None else el[1]
        item = _item(
            eid[1],
            eid[0],
            el[0],
            self._pack_one(value),
            None if el[3] is None else [el[3]],
            None if el[2] is None else [el[2]],
        )
        self._add_item(item)
        self._count += 1
        self._changed()
        item.block = block
        block.items.insert(at, item)
        block.chunks = None
        if item.live:
            block.live += 1
            self._live_total += 1
            self._add(block.pos, 1)
        if len(block.items) > BLOCK_MAX:
            self._split_block(block)

    def _split_block(self, block: _Block) -> None:
        blocks = self._blocks
        assert blocks is not None
        half = len(block.items) // 2
        tail = _Block(block.items[half:])
        del block.items[half:]
        block.live -= tail.live
        block.chunks = None
        blocks.insert(block.pos + 1, tail)
        self._reindex(block.pos + 1)

    # -- reading -------------------------------------------------------------------------

    def order(self, floor: Timestamp | None = None) -> list[Timestamp]:
        """All reachable element ids in sequence order, tombstones included (do not mutate;
        valid until the next change)."""
        if floor is None:
            return self._materialised()[0]
        return self._floor_view(floor)[0]

    def visible_ids(self, floor: Timestamp | None = None) -> list[Timestamp]:
        """Ids of the live elements, in order (do not mutate; valid until the next change)."""
        if floor is None:
            return self._materialised()[1]
        return self._floor_view(floor)[1]

    def values(self, floor: Timestamp | None = None) -> list[V]:
        if floor is not None:
            elements = self.elements
            return [elements[e].value for e in self.visible_ids(floor)]  # type: ignore[misc]
        out: list[V] = []
        for block in self._ordered():
            for item in block.items:
                if item.deleted is None:
                    out += item.values
                else:
                    values = item.values
                    out += [values[k] for k, d in enumerate(item.deleted) if d is None]
        return out

    def visible_len(self, floor: Timestamp | None = None) -> int:
        """Number of visible elements under `floor` (O(1) without a floor)."""
        if floor is None:
            self._ordered()
            return self._live_total
        return len(self._floor_view(floor)[1])

    def visible_at(self, position: int, floor: Timestamp | None = None) -> Timestamp:
        """The id of the visible element at `position` (O(log n) without a floor).

        Raises:
            IndexError: `position` is not in 0..visible_len(floor) - 1.
        """
        if floor is None:
            return self._visible_id(position)
        visible = self._floor_view(floor)[1]
        if not 0 <= position < len(visible):
            raise IndexError(position)
        return visible[position]

    def visible_slice(
        self, position: int, count: int, floor: Timestamp | None = None
    ) -> list[Timestamp]:
        """Ids of `count` visible elements from `position` (the range must fit)."""
        if floor is not None:
            visible = self._floor_view(floor)[1]
            if position < 0 or count < 0 or position + count > len(visible):
                raise IndexError(position)
            return visible[position : position + count]
        self._ordered()
        if position < 0 or count < 0 or position + count > self._live_total:
            raise IndexError(position)
        out: list[Timestamp] = []
        for item, first, end in self._live_spans(position, count):
            node = item.node
            start = item.start
            out += [new_stamp((start + k, node)) for k in range(first, end)]
        return out

    def _live_spans(self, position: int, count: int) -> list[tuple[_Item, int, int]]:
        """(item, first offset, end offset) of the live stretches covering `count` visible
        elements from `position` (inside the visible length): O(log n + items)."""
        out: list[tuple[_Item, int, int]] = []
        if not count:
            return out
        blocks = self._ordered()
        item, k = self._locate(position)
        block = item.block
        assert block is not None
        b = block.pos
        items = block.items
        i = items.index(item)
        while True:
            if item.live:
                if item.deleted is None:
                    take = min(item.n - k, count)
                    out.append((item, k, k + take))
                    count -= take
                else:
                    for first, end in item.live_ranges():
                        if end <= k:
                            continue
                        begin = max(first, k)
                        take = min(end - begin, count)
                        out.append((item, begin, begin + take))
                        count -= take
                        if not count:
                            break
                if not count:
                    return out
            k = 0
            i += 1
            while i >= len(items):
                b += 1
                while not blocks[b].live:  # (nothing visible in it)
                    b += 1
                items = blocks[b].items
                i = 0
            item = items[i]

    def __len__(self) -> int:
        """Number of visible elements (no floor)."""
        return self.visible_len()

    # -- local operations: each returns the delta-state --------------------------------

    def insert_delta(
        self,
        pos: int,
        values: Sequence[V],
        stamp: Callable[[], Timestamp],
        floor: Timestamp | None = None,
        *,
        writer: bytes | None = None,
    ) -> Self:
        """Insert `values` before visible position `pos`, one element each, chained.

        `stamp` yields fresh ids. With `writer` (the transaction's node id), an insert
        right after that writer's own childless element continues its run of ids (see the
        module docstring); the caller must witness the ids of the returned delta.
        """
        length = self.visible_len(floor)
        if not 0 <= pos <= length:
            raise IndexError(f"insert position {pos} out of range 0..{length}")
        after = self.visible_at(pos - 1, floor) if pos else HEAD
        new: dict[Timestamp, Element[V]] = {}
        node = after[1]
        extend = (
            writer is not None
            and node == writer
            and not self._has_kids(after)
            and after[0] + len(values) <= NTP64_MAX
        )
        for value in values:
            if extend:
                eid = new_stamp((after[0] + 1, node))
                if self._find(eid) is not None:
                    extend = False
                    eid = stamp()
            else:
                eid = stamp()
            new[eid] = _element((after, value, None, None))
            after = eid
        return type(self)(new)

    def insert_one(
        self, pos: int, value: V, stamp: Callable[[], Timestamp], writer: bytes | None
    ) -> tuple[Self, Timestamp | None]:
        """`insert_delta(pos, [value], stamp, writer=writer)` without a floor (a keystroke),
        with the id the caller must witness: the new id if it continues a run, else None
        (a clock stamp needs no witnessing)."""
        self._ordered()
        length = self._live_total
        if not 0 <= pos <= length:
            raise IndexError(f"insert position {pos} out of range 0..{length}")
        if not pos:
            return self._one(stamp(), _element((HEAD, value, None, None))), None
        item, k = self._locate(pos - 1)
        after = new_stamp((item.start + k, item.node))
        run: Timestamp | None = None
        # A run goes on only after the writer's childless element: the last of its item
        # (the next one is its child), not an explicit parent, and `id + 1` free.
        if (
            after[1] == writer
            and k == item.n - 1
            and after[0] < NTP64_MAX
            and after not in self._extra
        ):
            run = new_stamp((after[0] + 1, writer))
            if self._find(run) is not None:
                run = None
            else:
                self._typing = (self._version, item, run)
        eid = stamp() if run is None else run
        return self._one(eid, _element((after, value, None, None))), run

    def insert_in_place(
        self, pos: int, value: V, clock: HybridClock, physical: int
    ) -> tuple[Self, Timestamp, bool]:
        """`insert_one(pos, value, partial(clock.now, physical), clock.node_id)`, joined
        into this state as it is made (`Transaction.edit_in_place`): the same delta, its
        element's id and whether that id continues a run (the caller must witness it), and
        the same state as `merge` of that delta, without looking the position up twice.
        Typing on at the end of the writer's own item appends to it."""
        if self._blocks is None:  # (`_ordered`, inline)
            self._rebuild()
        length = self._live_total
        if not 0 <= pos <= length:
            raise IndexError(f"insert position {pos} out of range 0..{length}")
        if pos:
            cursor = self._cursor
            if cursor is not None and cursor[1] == pos - 1 and cursor[0] == self._version:
                item = cursor[2]  # (`_locate`, inline: the last keystroke's place)
                k = cursor[3]
                after = cursor[4] or new_stamp((item.start + k, item.node))
            else:
                item, k = self._locate(pos - 1)
                after = new_stamp((item.start + k, item.node))
            # A run goes on only after the writer's childless element: the last of its
            # item (the next one is its child), not an explicit parent, and `id + 1` free.
            writer = clock.node_id
            if (
                after[1] == writer
                and k == item.n - 1
                and after[0] < NTP64_MAX
                and after not in self._extra
            ):
                time = after[0] + 1
                run = new_stamp((time, writer))
                # `_find(run)` and `_has_kids(run)` with one bisection at most: the
                # writer's items are disjoint and `item` ends at `after`, so an item
                # holding `run` (or, `run` absent, `run + 1`) is the next one and starts
                # there; after the writer's last item (typing at its newest text) neither
                # is held.
                starts, items = self._runs[writer]
                if items[-1] is item:
                    taken = kids = False
                else:
                    i = bisect_right(starts, after[0])
                    following = starts[i]  # (`item` is not the last)
                    taken = following == time
                    kids = following == time + 1 and items[i].after == run
                if taken:
                    pass  # (a fresh stamp)
                elif item.n < ITEM_MAX and not kids and run not in self._extra:
                    # Typing on: `_grow(item, _element((after, value, None, None)))`,
                    # inline (per keystroke).
                    values: Any = item.values  # (`_append`)
                    if type(values) is not str:
                        values.append(value)
                    elif type(value) is str and len(value) == 1:
                        item.values = values + value
                    else:
                        item.values = [*values, value]
                    if item.deleted is not None:
                        item.deleted.append(None)
                    if item.updated is not None:
                        item.updated.append(None)
                    n = item.n = item.n + 1
                    item.live += 1
                    self._count += 1
                    version = self._version = next(_VERSIONS)  # (`_changed`)
                    self._lists = None
                    self._floored = None
                    self._expanded = None
                    block = item.block
                    assert block is not None  # (placed: `_locate` found it)
                    block.chunks = None
                    block.live += 1
                    self._live_total = length + 1
                    if self._lag_at == block.pos:  # (`_add(block.pos, 1)`, deferred)
                        self._lag += 1
                    else:
                        if self._lag_at >= 0:
                            self._settle()
                        self._lag_at = block.pos
                        self._lag = 1
                    self._cursor = (version, pos, item, n - 1, run)
                    return self._one_typed(run, after, value), run, True
                else:
                    return self._insert_new(pos, run, after, value), run, True
        else:
            after = HEAD
        eid = clock.now(physical)
        return self._insert_new(pos, eid, after, value), eid, False

    def _insert_new(self, pos: int, eid: Timestamp, after: Timestamp, value: V) -> Self:
        """`insert_in_place` of element `eid` after `after` other than by typing on."""
        element = _element((after, value, None, None))
        delta = self._one(eid, element)
        if self._insert_placed(eid, element):
            placed = self._find(eid)
            assert placed is not None  # (just placed)
            self._cursor = (self._version, pos, placed[0], placed[1], eid)
        else:
            self.merge(delta)  # (forged elements already name the new id)
        return delta

    def delete_in_place(self, pos: int, stamp: Timestamp) -> tuple[Self, Timestamp, Element[V]]:
        """`delete_delta(pos, 1, stamp)` joined into this state as it is made
        (`Transaction.edit_in_place`): the same delta and the same state as `merge` of it,
        with one position lookup and no general join; with the element's id and its version
        before (for the undo log)."""
        if self._blocks is None:  # (`_ordered`, inline)
            self._rebuild()
        length = self._live_total
        if not 0 <= pos < length:
            raise IndexError(f"delete range {pos}+1 out of range 0..{length}")
        item, k = self._locate(pos)
        eid = new_stamp((item.start + k, item.node))
        old = item.element(k)
        # `join_element(eid, old, gone)` of a live `old` is `gone` itself.
        gone: Element[V] = _element((old[0], None, None, stamp))
        self._origin = None  # (`merge`)
        # `_write(item, k, eid, old, gone)` and `_hidden(item)`, inline (per keystroke):
        deleted = item.deleted
        if deleted is None:
            deleted = item.deleted = [None] * item.n
        deleted[k] = stamp
        if item.updated is not None:
            item.updated[k] = None
        item.live -= 1
        block = item.block
        assert block is not None  # (placed: `_locate` found it)
        block.live -= 1
        block.chunks = None
        version = self._version = next(_VERSIONS)  # (`_changed`)
        self._lists = None
        self._floored = None
        self._expanded = None
        self._live_total = length - 1
        if self._lag_at == block.pos:  # (`_add(block.pos, -1)`, deferred)
            self._lag -= 1
        else:
            if self._lag_at >= 0:
                self._settle()
            self._lag_at = block.pos
            self._lag = -1
        if k and deleted[k - 1] is None:  # (a backspace next)
            self._cursor = (version, pos - 1, item, k - 1, None)
        return self._one(eid, gone), eid, old

    def _one_typed(self, eid: Timestamp, after: Timestamp, value: Any) -> Self:
        """`_one(eid, _element((after, value, None, None)))` where `after` is the id just
        below `eid` (implied: no explicit child entry)."""
        item = _Item()  # (`_item(...)` of one live element, inline)
        item.node = node = eid[1]
        item.start = time = eid[0]
        item.n = item.live = 1
        item.after = after
        # (`_pack_one`: `_text`, a class attribute, is read last: not for a Vector's bytes)
        item.values = value if type(value) is str and len(value) == 1 and self._text else [value]
        item.deleted = item.updated = item.block = None
        new: Self = _new(type(self))
        # `_reset`, inline (per keystroke), but for the one item: every slot it sets
        # (`test_a_keystroke_delta_sets_every_slot_a_reset_sets`).
        new._runs = {node: ([time], [item])}
        new._extra = {}
        new._count = 1
        new._live_total = 0
        new._version = next(_VERSIONS)
        new._blocks = new._lists = new._floored = new._expanded = new._origin = None
        new._newest = new._cursor = new._typing = None
        return new

    def _one(self, eid: Timestamp, element: Element[V]) -> Self:
        """A one-element state of this type (a keystroke's delta)."""
        new: Self = type(self).__new__(type(self))
        new._reset()
        value = element[1]
        if value is None and element[3] is not None:
            value = self._filler
        item = _item(
            eid[1],
            eid[0],
            element[0],
            self._pack_one(value),
            None if element[3] is None else [element[3]],
            None if element[2] is None else [element[2]],
        )
        new._runs[eid[1]] = ([eid[0]], [item])
        if not _implied(eid, element[0]):
            new._extra[element[0]] = [eid]
        new._count = 1
        return new

    def restored(self, versions: Mapping[Timestamp, Element[Any] | None]) -> Self:
        """A new state of these elements with `versions` put back (None: without that
        element): an undo (`Transaction.evict`), O(n)."""
        elements = dict(self.elements)
        for eid, version in versions.items():
            if version is None:
                elements.pop(eid, None)
            else:
                elements[eid] = version
        return type(self)(elements)

    def max_id(self) -> Timestamp | None:
        """The highest element id (None when empty)."""
        best: Timestamp | None = None
        for node, (_starts, items) in self._runs.items():
            last = items[-1]
            top = new_stamp((last.start + last.n - 1, node))
            if best is None or top > best:
                best = top
        return best

    def delete_delta(
        self, pos: int, count: int, stamp: Timestamp, floor: Timestamp | None = None
    ) -> Self:
        """Tombstone `count` visible elements starting at `pos`."""
        length = self.visible_len(floor)
        if pos < 0 or count < 0 or pos + count > length:
            raise IndexError(f"delete range {pos}+{count} out of range 0..{length}")
        if floor is not None:
            elements = self.elements
            return type(self)(
                {
                    e: _element((elements[e][0], None, None, stamp))
                    for e in self.visible_slice(pos, count, floor)
                }
            )
        new: Self = type(self).__new__(type(self))
        new._reset()
        filler = self._filler
        spans = self._live_spans(pos, count)
        new._origin = (self, self._version, spans, stamp)
        text = self._text
        extra = new._extra
        by_writer: dict[bytes, list[_Item]] = {}
        newest_after = HEAD
        for item, first, end in spans:
            take = end - first
            piece = _Item()
            piece.node = node = item.node
            piece.start = start = item.start + first
            piece.n = take
            piece.after = after = item.after if not first else new_stamp((start - 1, node))
            newest_after = max(newest_after, after)
            piece.values = filler * take if text else [filler] * take
            piece.deleted = [stamp] * take
            piece.updated = None
            piece.live = 0
            piece.block = None
            pieces = by_writer.get(node)
            if pieces is None:
                by_writer[node] = [piece]
            else:
                pieces.append(piece)
            if not first and not _implied(new_stamp((start, node)), after):
                insort(extra.setdefault(after, []), new_stamp((start, node)))
            new._count += take
        newest = max(stamp, newest_after)
        for node, pieces in by_writer.items():
            pieces.sort(key=_START)
            new._runs[node] = ([piece.start for piece in pieces], pieces)
            last = pieces[-1]
            newest = max(newest, new_stamp((last.start + last.n - 1, node)))
        if by_writer:
            new._newest = (new._version, newest)
        return new

    def set_delta(
        self, index: int, value: V, stamp: Timestamp, floor: Timestamp | None = None
    ) -> Self:
        """Overwrite the value at visible `index` (last writer wins per element)."""
        length = self.visible_len(floor)
        if not 0 <= index < length:
            raise IndexError(f"index {index} out of range 0..{length - 1}")
        eid = self.visible_at(index, floor)
        found = self._find(eid)
        assert found is not None
        return type(self)({eid: Element(self._after(*found), value, stamp, None)})

    # -- maintenance ---------------------------------------------------------------------

    def gc(self, horizon: int) -> int:
        """Drop tombstones deleted before NTP64 time `horizon` that no element is positioned
        after (repeatedly, so dead runs unwind), except run guards. Visible order is
        unchanged. (Runs on the expanded elements, O(n).)

        A run guard is a tombstone whose next lower id of the same writer is live. A local
        insert after a live element continues its writer's run with the next ids, taken
        without the clock and only while they are absent here (see "Runs"); if GC dropped
        the id just above a live element, or the first present one above a gap, its writer
        would take that id again, and a replica still holding the tombstone would absorb
        the new value into it. Only the writer continues its runs, and it holds all its own
        elements; keeping the guards keeps a present tombstone there between every live
        element and every collected id above it of the same writer (a run stops below the
        first present id, fresh clock stamps are above everything), so no id is ever
        reused. At most one guard per live element stays; a dead run goes entirely.
        """
        elements = dict(self.elements)
        children: dict[Timestamp, list[Timestamp]] = {}
        for eid in sorted(elements):
            children.setdefault(elements[eid].after, []).append(eid)
        guards: set[Timestamp] = set()

        def collectible(eid: Timestamp) -> bool:
            el = elements.get(eid)
            return (
                el is not None
                and el.deleted is not None
                and el.deleted.time < horizon
                and not children.get(eid)
                and eid not in guards
            )

        pending = [eid for eid in elements if collectible(eid)]
        if pending:  # the guards cost a sort: only when something could go
            guards = _run_guards(elements)
            pending = [eid for eid in pending if eid not in guards]
        dropped = 0
        while pending:
            eid = pending.pop()
            if not collectible(eid):
                continue
            after = elements.pop(eid).after
            siblings = children[after]
            del siblings[bisect_left(siblings, eid)]
            if not siblings:
                del children[after]
            dropped += 1
            if after != HEAD and collectible(after):
                pending.append(after)
        if dropped:
            self._reset()
            for eid in sorted(elements):
                self._store_new(eid, elements[eid])
        return dropped

    # -- canonical forms -----------------------------------------------------------------

    def wire(self) -> tuple[list[bytes], list[WireRun[V]]]:
        """Canonical form: every element, tombstones included, as runs sorted by first id.

        A run is a maximal chain of elements with consecutive ids of one writer, each
        inserted after the previous one (what typing produces, see the module docstring):
        an element starts a run unless the id just below it (same writer) exists and is its
        reference. Writer ids (up to 64 bytes each) are interned: `(writers, runs)` where
        `writers` is the sorted list of every node id used and each run is
        `(first time, writer#, after time, after writer#, length, live values, deleted,
        updated)`. `live values` are the values of the run's live elements in order (a
        string for Text); `deleted` and `updated` are sorted, non-overlapping, maximal
        groups `(offset, count, time, writer#)`: elements `offset..offset+count-1` of the
        run were deleted (their value overwritten) at that one stamp.
        """
        # Items of one writer that continue each other form one run: join them.
        chains: list[list[_Item]] = []
        used: set[bytes] = set()
        for node, (_starts, items) in self._runs.items():
            used.add(node)
            previous: _Item | None = None
            for item in items:
                if (
                    previous is not None
                    and previous.start + previous.n == item.start
                    and item.after == new_stamp((item.start - 1, node))
                ):
                    chains[-1].append(item)
                else:
                    chains.append([item])
                    used.add(item.after[1])
                previous = item
        chains.sort(key=lambda chain: (chain[0].start, chain[0].node))
        # Per run: its live values and its stamp groups, with the stamps themselves until
        # every writer is known (one entry per stretch of equal stamps, not per element).
        runs: list[tuple[_Item, int, list[V], list[_Stretch], list[_Stretch]]] = []
        for chain in chains:
            live: list[V] = []
            deleted: list[Timestamp | None] = []
            updated: list[Timestamp | None] = []
            for item in chain:
                n = item.n
                values: Any = item.values
                if item.deleted is None:
                    kept: Any = (
                        values if type(values) is str else [v for v in values if v is not None]
                    )
                    live += kept
                    deleted += [None] * n
                else:
                    live += [
                        values[k]
                        for k, d in enumerate(item.deleted)
                        if d is None and values[k] is not None
                    ]
                    deleted += item.deleted
                updated += [None] * n if item.updated is None else item.updated
            gone = _stretches(deleted)
            new = _stretches(updated)
            used.update(stamp[1] for _, _, stamp in gone)
            used.update(stamp[1] for _, _, stamp in new)
            runs.append((chain[0], len(deleted), live, gone, new))
        writers = sorted(used)
        index = {w: i for i, w in enumerate(writers)}
        out: list[WireRun[V]] = [
            (
                first.start,
                index[first.node],
                first.after[0],
                index[first.after[1]],
                length,
                self._pack(live),
                [(offset, count, stamp[0], index[stamp[1]]) for offset, count, stamp in gone],
                [(offset, count, stamp[0], index[stamp[1]]) for offset, count, stamp in new],
            )
            for first, length, live, gone, new in runs
        ]
        return writers, out

    def _pack(self, live: list[V]) -> V | list[V]:
        """A run's live values in the canonical form (Text joins them into a string)."""
        return live

    def hash_form(self, floor: Timestamp | None) -> list[bytes] | None:
        """What enters the Merkle hash: the digests of the visible sequence's hash chunks in
        order (see "Hash chunks" in `order_index.py`), tombstones left out; None when
        nothing is visible. Each chunk digest is SHA-256 over the canonical (ids, values,
        value stamps) lists of its elements. Without a floor the blocks cache the digests,
        so an edit rehashes one chunk, not the whole sequence."""
        if floor is None:
            digests = self._chunk_digests()
        else:
            digests = chunk_digests(self.visible_ids(floor), self._ids_digest)
        return digests or None

    def _ids_digest(self, ids: list[Timestamp]) -> bytes:
        elements = self.elements
        live = [elements[e] for e in ids]
        form = (ids, [el[1] for el in live], [el[2] for el in live])
        return hashlib.sha256(canonical(form)).digest()

    def _segments_digest(self, segments: list[Segment]) -> bytes:
        """The chunk digest (as `_ids_digest`) of the ids in `segments`."""
        ids: list[tuple[int, bytes]] = []
        values: list[Any] = []
        updated: list[Timestamp | None] = []
        for node, first, last in segments:
            time = first
            while time <= last:
                found = self._find(new_stamp((time, node)))
                assert found is not None
                item, k = found
                end = min(item.n, k + last - time + 1)
                ids += [(t, node) for t in range(time, time + end - k)]
                values += item.values[k:end]
                updated += [None] * (end - k) if item.updated is None else item.updated[k:end]
                time += end - k
        return hashlib.sha256(canonical((ids, values, updated))).digest()

    def _chunk_digests(self) -> list[bytes]:
        """Every hash chunk's digest in order (see "Hash chunks" in `order_index.py`): a
        block whose items did not change and whose incoming carry is the same is reused;
        any other is re-cut from its items' live ranges, reusing cached digests."""
        blocks = self._ordered()
        out: list[bytes] = []
        touched = self._touched
        carry: list[Segment] = []
        last = blocks[-1]
        for block in blocks:
            if (
                block.chunks is None
                or block.carry_in != carry
                or (touched and _touches(touched, carry))
            ):
                block.carry_in = carry
                chunks: list[bytes] = []
                segments = list(carry)
                for item in block.items:
                    node = item.node
                    for first, end in item.live_ranges():
                        t0 = item.start + first
                        t1 = item.start + end - 1
                        cut = t0 + (-t0) % CUT_EVERY
                        while cut <= t1:
                            _extend(segments, node, t0, cut)
                            chunks.append(self._digest((cut, node), segments))
                            segments = []
                            t0 = cut + 1
                            cut += CUT_EVERY
                        if t0 <= t1:
                            _extend(segments, node, t0, t1)
                if block is last and segments:
                    chunks.append(self._digest(None, segments))
                block.chunks = chunks
                block.carry_out = segments
                carry = segments
            else:
                carry = block.carry_out
            out += block.chunks
        if not carry:
            self._digests.pop(None, None)  # (see `OrderIndex.chunk_digests`)
        touched.clear()
        return out

    def _digest(self, key: tuple[int, bytes] | None, segments: list[Segment]) -> bytes:
        cache = self._digests
        known = cache.get(key)
        if known is not None and known[0] == segments and not _touches(self._touched, segments):
            return known[1]
        value = self._segments_digest(segments)
        cache[key] = (segments, value)
        return value

    def canonical(self) -> bytes:
        return canonical(self.wire())

    def max_stamp(self) -> Timestamp | None:
        if self._count == 1:  # a one-edit delta (committed once per keystroke)
            [(_, [single])] = self._runs.values()
            top = max(new_stamp((single.start, single.node)), single.after)
            for stamps in (single.deleted, single.updated):
                if stamps is not None and stamps[0] is not None and stamps[0] > top:
                    top = stamps[0]
            return top
        newest = self._newest
        if newest is not None and newest[0] == self._version:  # a range delete's delta
            return newest[1]
        best: Timestamp | None = None
        for item in self._items():
            top = max(new_stamp((item.start + item.n - 1, item.node)), item.after)
            for stamps in (item.deleted, item.updated):
                if stamps is not None:
                    top = max(top, max(filter(None, stamps), default=top))
            if best is None or top > best:
                best = top
        return best

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SequenceState)
            and type(other) is type(self)
            and self.elements == other.elements
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.elements)!r})"

    # -- internals -----------------------------------------------------------------------

    def _floor_view(self, floor: Timestamp) -> tuple[list[Timestamp], list[Timestamp]]:
        cached = self._floored
        if cached is None or cached[0] != floor:
            elements = self.elements
            children: dict[Timestamp, list[Timestamp]] = {}
            for eid in elements:  # (ascending: `elements` is sorted)
                children.setdefault(elements[eid].after, []).append(eid)
            stack = sorted(e for e, el in elements.items() if e > floor and el.after <= floor)
            order: list[Timestamp] = []
            while stack:
                eid = stack.pop()
                order.append(eid)
                kids = children.get(eid)
                if kids:
                    stack.extend(k for k in kids if k > floor)
            visible = [e for e in order if elements[e].deleted is None]
            cached = self._floored = (floor, order, visible)
        return cached[1], cached[2]

    def _materialised(self) -> tuple[list[Timestamp], list[Timestamp]]:
        lists = self._lists
        if lists is None:
            order: list[Timestamp] = []
            live: list[Timestamp] = []
            for block in self._ordered():
                for item in block.items:
                    node = item.node
                    start = item.start
                    ids = [new_stamp((start + k, node)) for k in range(item.n)]
                    order += ids
                    if item.deleted is None:
                        live += ids
                    else:
                        live += [e for e, d in zip(ids, item.deleted, strict=True) if d is None]
            lists = self._lists = (order, live)
        return lists


_VERSIONS: Final = itertools.count()
_START: Final = attrgetter("start")


def _extend_item(item: _Item, source: _Item, k: int, take: int) -> None:
    """Append elements k..k+take-1 of `source` to `item` (its writer's next ids)."""
    n = item.n
    values: Any = item.values
    more: Any = source.values[k : k + take]
    if type(values) is str and type(more) is str:
        item.values = values + more
    elif type(values) is str:
        item.values = [*values, *more]
    else:
        values += more
    for name in ("deleted", "updated"):
        mine: list[Timestamp | None] | None = getattr(item, name)
        theirs: list[Timestamp | None] | None = getattr(source, name)
        if theirs is not None:
            if mine is None:
                mine = [None] * n
                setattr(item, name, mine)
            mine += theirs[k : k + take]
        elif mine is not None:
            mine += [None] * take
    item.n = n + take
    deleted = source.deleted
    item.live += take if deleted is None else deleted[k : k + take].count(None)


def _implied(eid: Timestamp, after: Timestamp) -> bool:
    """Is `after` the id just below `eid` (the child `id + 1` the items imply)?"""
    return after[0] + 1 == eid[0] and after[1] == eid[1] and after != HEAD


def _extend(segments: list[Segment], node: bytes, first: int, last: int) -> None:
    """Append ids `first..last` of `node`, joining the last segment when they continue it
    (so equal id lists give equal segment lists, whatever the items)."""
    if segments:
        tail = segments[-1]
        if tail[0] == node and tail[2] + 1 == first:
            segments[-1] = (node, tail[1], last)
            return
    segments.append((node, first, last))


def _touches(touched: set[Timestamp], segments: list[Segment]) -> bool:
    return any(
        node == eid[1] and first <= eid[0] <= last
        for eid in touched
        for node, first, last in segments
    )


def _run_guards(elements: Mapping[Timestamp, Element[Any]]) -> set[Timestamp]:
    """Tombstones whose next lower present id of the same writer is live (see `gc`)."""
    guards: set[Timestamp] = set()
    previous: Timestamp | None = None
    # Timestamps sort by time first: order by writer, then time, to walk each writer's ids.
    for eid in sorted(elements, key=lambda e: (e.node, e.time)):
        if (
            previous is not None
            and previous.node == eid.node
            and elements[previous].deleted is None
            and elements[eid].deleted is not None
        ):
            guards.add(eid)
        previous = eid
    return guards


def chunk_digests(
    visible: list[Timestamp], digest: Callable[[list[Timestamp]], bytes]
) -> list[bytes]:
    """The chunk digests of a visible sequence given whole (the definition the blocks
    cache): a chunk ends at each cut and at the end."""
    out: list[bytes] = []
    start = 0
    for end in chunk_ends(visible):
        out.append(digest(visible[start : end + 1]))
        start = end + 1
    if start < len(visible):
        out.append(digest(visible[start:]))
    return out


_Stretch = tuple[int, int, Timestamp]
"""`(offset, count, stamp)`: a span of a run's elements sharing one stamp (see `wire`)."""


def _stretches(stamps: list[Timestamp | None]) -> list[_Stretch]:
    """Maximal spans of equal non-None stamps: one step per span (the scan runs in C)."""
    first = stamps[0] if stamps else None
    if stamps.count(first) == len(stamps):  # one stamp, or none at all: the common cases
        return [] if first is None else [(0, len(stamps), first)]
    out: list[_Stretch] = []
    offset = 0
    for stamp, group in groupby(stamps):
        count = len(list(group))
        if stamp is not None:
            out.append((offset, count, stamp))
        offset += count
    return out


class TextState(SequenceState[str]):
    """A `Text`: one element per character, an item's characters in one string."""

    __slots__ = ()
    _text = True
    _filler = "\0"

    def _pack(self, live: list[str]) -> str | list[str]:
        return "".join(live)


class VectorState(SequenceState[bytes]):
    """A `Vector`: one element per item, values are canonical encodings."""

    __slots__ = ()
