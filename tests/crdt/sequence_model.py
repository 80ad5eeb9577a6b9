"""The naive model: the per-element RGA `SequenceState` as it was before run-length
items, kept verbatim so `test_run_items.py` can prove the run-based state equivalent.

Original docstring follows.


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

Caching: the order without a floor lives in an `OrderIndex` (blocks of ids plus a Fenwick
tree of visible counts, see `order_index.py`), kept up to date while elements arrive in
causal order (`_place`, `hide`) and rebuilt from scratch otherwise (~1 µs per element). A
keystroke costs O(log n) to find its position and O(block) to place; nothing scans the
whole sequence. A range delete (a delta that only tombstones held elements) hides its
elements in one pass over the blocks they fall in (`_tombstone_all`), so the index and its
cached chunk digests survive it: O(deleted + blocks touched), not a rebuild. Elements are
still one dict entry each, so a delete still costs per element, not per run.

Full lists (`order()`, `visible_ids()`) are materialised on demand and cached until the
next change. The Merkle hash form is the list of digests of content-defined
chunks of the visible sequence (see "Hash chunks" in `order_index.py`); the index caches
them, so a keystroke rehashes one chunk of ~61 elements, not the whole text.

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
from bisect import bisect_left, insort
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from operator import itemgetter
from types import MappingProxyType
from typing import Final, Generic, NamedTuple, Self, TypeVar, cast

from trionode.crdt.canonical import canonical
from trionode.crdt.hlc import NTP64_MAX, Timestamp, latest, new_stamp
from trionode.crdt.order_index import OrderIndex, chunk_ends

V = TypeVar("V", str, bytes)

HEAD: Final = Timestamp(0, b"")
"""The virtual element before the first one. No real element can have this id."""

_AFTER: Final = itemgetter(0)
_VALUE: Final = itemgetter(1)
_UPDATED: Final = itemgetter(2)
_BULK_MERGE: Final = 64
"""Above this many incoming elements a full rebuild is cheaper than incremental placement."""


Group = tuple[int, int, int, int]
"""`(offset, count, time, writer#)`: a span of a run's elements sharing one stamp."""
WireRun = tuple[int, int, int, int, int, V | list[V], list[Group], list[Group]]
"""One run in the canonical form (see `SequenceState.wire`)."""


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


class SequenceState(Generic[V]):
    """An RGA element set plus caches of its order. See the module docstring."""

    __slots__ = ("_children", "_elements", "_floored", "_index", "_lists")

    def __init__(self, elements: Mapping[Timestamp, Element[V]] | None = None) -> None:
        self._elements: dict[Timestamp, Element[V]] = dict(elements) if elements else {}
        self._children: dict[Timestamp, list[Timestamp]] = {}
        if len(self._elements) == 1:  # a one-edit delta: no sort
            [(eid, el)] = self._elements.items()
            self._children[el.after] = [eid]
        else:
            for eid in sorted(self._elements):
                self._children.setdefault(self._elements[eid].after, []).append(eid)
        self._index: OrderIndex | None = None
        """The order without a floor (None: rebuild on the next read)."""
        self._lists: tuple[list[Timestamp], list[Timestamp]] | None = None
        """Materialised (order, visible ids) without a floor, until the next change."""
        self._floored: tuple[Timestamp, list[Timestamp], list[Timestamp]] | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def elements(self) -> Mapping[Timestamp, Element[V]]:
        return MappingProxyType(self._elements)

    def is_empty(self) -> bool:
        return not self._elements

    def copy(self) -> Self:
        new: Self = type(self)()
        new._elements = dict(self._elements)
        new._children = {k: list(v) for k, v in self._children.items()}
        if self._index is not None:  # updated in place, so never shared
            new._index = self._index.copy()
        new._lists = self._lists  # replaced, never mutated
        new._floored = self._floored
        return new

    def merge(self, other: SequenceState[V]) -> bool:
        """Join `other` into self; returns whether anything changed."""
        if other is self or not other._elements:
            return False
        theirs = other._elements
        if len(theirs) == 1:
            [(eid, incoming)] = theirs.items()
            mine = self._elements.get(eid)
            if mine is None:
                self._add_one(eid, incoming)
                return True
            if (  # a one-element delete (a backspace): `join_element`'s result, inline
                mine[3] is None and incoming[3] is not None and incoming[0] == mine[0]
            ):
                self._elements[eid] = _element((mine[0], None, None, incoming[3]))
                index = self._index
                if index is not None and eid in index:
                    index.hide(eid)
                self._lists = None
                self._floored = None
                return True
        if self._index is not None:
            deleted = self._tombstone_all(theirs)
            if deleted is not None:
                return deleted
        bulk = len(theirs) > _BULK_MERGE
        if bulk:
            self._index = None
        changed = False
        # Ascending ids put references before the elements inserted after them (HLC
        # causality), so incremental placement covers the common case.
        for eid in sorted(theirs) if len(theirs) > 1 else theirs:
            incoming = theirs[eid]
            mine = self._elements.get(eid)
            if mine is None:
                self._elements[eid] = incoming
                insort(self._children.setdefault(incoming.after, []), eid)
                self._place(eid)
            else:
                joined = join_element(eid, mine, incoming)
                if joined == mine:
                    continue
                if joined.after != mine.after:  # forged data: re-parent, rebuild later
                    self._unlink(eid, mine.after)
                    insort(self._children.setdefault(joined.after, []), eid)
                    self._index = None
                elif mine.deleted is None and joined.deleted is not None:
                    self._elements[eid] = joined
                    if self._index is not None and eid in self._index:
                        self._index.hide(eid)
                elif joined.deleted is None:  # a new value (Vector `set`): rehash its chunk
                    self._elements[eid] = joined
                    if self._index is not None and eid in self._index:
                        self._index.touch(eid)
                self._elements[eid] = joined
            changed = True
        if changed:
            self._lists = None
            self._floored = None
        return changed

    def _tombstone_all(self, theirs: Mapping[Timestamp, Element[V]]) -> bool | None:
        """`merge` of a delta that only deletes elements this state holds (a range
        delete): each element becomes `join_element`'s result and the index hides them
        in one pass (`OrderIndex.hide_many`), keeping its blocks and cached chunk digests,
        instead of the rebuild a large general merge takes. None, changing nothing, when
        the delta is anything else (new elements, values, a different reference)."""
        elements = self._elements
        for eid, incoming in theirs.items():
            mine = elements.get(eid)
            if (
                mine is None
                or incoming[3] is None
                or incoming[1] is not None
                or incoming[2] is not None
                or incoming[0] != mine[0]
            ):
                return None
        hidden: list[Timestamp] = []
        changed = False
        for eid, incoming in theirs.items():
            mine = elements[eid]
            gone = mine[3]
            if gone is None:  # (`join_element`'s result for a live element, inline)
                elements[eid] = _element((mine[0], None, None, incoming[3]))
                hidden.append(eid)
                changed = True
                continue
            joined: Element[V] = _element((mine[0], None, None, latest(gone, incoming[3])))
            if joined != mine:
                elements[eid] = joined
                changed = True
        if hidden:
            index = self._index
            assert index is not None  # (checked by the caller)
            index.hide_many(hidden)
        if changed:
            self._lists = None
            self._floored = None
        return changed

    def _add_one(self, eid: Timestamp, incoming: Element[V]) -> None:
        """`merge` of one element this state lacks (every keystroke's delta), with
        `_place` inline. A local insert's id is above every id here, so it is the highest
        child of its reference: appended to the siblings and placed right after the
        reference, the index's cursor hint finding it when typing."""
        self._elements[eid] = incoming
        after = incoming[0]
        children = self._children
        siblings = children.get(after)
        if siblings is None:
            children[after] = [eid]
        elif siblings[-1] < eid:
            siblings.append(eid)
        else:
            insort(siblings, eid)
        self._lists = None
        self._floored = None
        index = self._index
        if index is None:
            return
        if eid in children:  # it is the missing reference of earlier arrivals
            self._index = None
        elif siblings is None or siblings[-1] is eid:  # (reference not placed: stays out)
            anchor = None if after == HEAD else after
            index.insert_after(anchor, eid, self._is_live, live=incoming[3] is None)
        else:
            self._place(eid)

    def join(self, other: SequenceState[V]) -> Self:
        result = self.copy()
        result.merge(other)
        return result

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
        elements = self._elements
        return [elements[e].value for e in self.visible_ids(floor)]  # type: ignore[misc]

    def visible_len(self, floor: Timestamp | None = None) -> int:
        """Number of visible elements under `floor` (O(1) without a floor)."""
        if floor is None:
            return self._ordered().live_len()
        return len(self._floor_view(floor)[1])

    def visible_at(self, position: int, floor: Timestamp | None = None) -> Timestamp:
        """The id of the visible element at `position` (O(log n) without a floor).

        Raises:
            IndexError: `position` is not in 0..visible_len(floor) - 1.
        """
        if floor is None:
            return self._ordered().live_at(position)
        visible = self._floor_view(floor)[1]
        if not 0 <= position < len(visible):
            raise IndexError(position)
        return visible[position]

    def visible_slice(
        self, position: int, count: int, floor: Timestamp | None = None
    ) -> list[Timestamp]:
        """Ids of `count` visible elements from `position` (the range must fit)."""
        if floor is None:
            return self._ordered().live_slice(position, count)
        visible = self._floor_view(floor)[1]
        if position < 0 or count < 0 or position + count > len(visible):
            raise IndexError(position)
        return visible[position : position + count]

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
        if floor is None:  # the common case, without the general lookups' calls
            index = self._ordered()
            length = index.live_len()
            if not 0 <= pos <= length:
                raise IndexError(f"insert position {pos} out of range 0..{length}")
            after = index.live_at(pos - 1) if pos else HEAD
        else:
            length = self.visible_len(floor)
            if not 0 <= pos <= length:
                raise IndexError(f"insert position {pos} out of range 0..{length}")
            after = self.visible_at(pos - 1, floor) if pos else HEAD
        new: dict[Timestamp, Element[V]] = {}
        elements = self._elements
        node = after[1]
        extend = (
            writer is not None
            and node == writer
            and after not in self._children
            and after[0] + len(values) <= NTP64_MAX
        )
        for value in values:
            if extend:
                eid = new_stamp((after[0] + 1, node))
                if eid in elements:
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
        index = self._index
        if index is None:
            index = self._ordered()
        after = index.live_before(pos) or HEAD  # (IndexError outside 0..len)
        run: Timestamp | None = None
        if after[1] == writer and after not in self._children and after[0] < NTP64_MAX:
            run = new_stamp((after[0] + 1, writer))
            if run in self._elements:
                run = None
        eid = stamp() if run is None else run
        return self._one(eid, _element((after, value, None, None))), run

    def _one(self, eid: Timestamp, element: Element[V]) -> Self:
        """A one-element state of this type (a keystroke's delta), without `__init__`'s
        general work."""
        new: Self = type(self).__new__(type(self))
        new._elements = {eid: element}
        new._children = {element[0]: [eid]}
        new._index = None
        new._lists = None
        new._floored = None
        return new

    def max_id(self) -> Timestamp | None:
        """The highest element id (None when empty)."""
        return max(self._elements, default=None)

    def delete_delta(
        self, pos: int, count: int, stamp: Timestamp, floor: Timestamp | None = None
    ) -> Self:
        """Tombstone `count` visible elements starting at `pos`."""
        if floor is None and count == 1:  # a backspace, without the general lookups' calls
            index = self._ordered()
            length = index.live_len()
            if not 0 <= pos < length:
                raise IndexError(f"delete range {pos}+1 out of range 0..{length}")
            eid = index.live_at(pos)
            return self._one(eid, _element((self._elements[eid][0], None, None, stamp)))
        length = self.visible_len(floor)
        if pos < 0 or count < 0 or pos + count > length:
            raise IndexError(f"delete range {pos}+{count} out of range 0..{length}")
        elements = self._elements
        return type(self)(
            {
                e: _element((elements[e][0], None, None, stamp))
                for e in self.visible_slice(pos, count, floor)
            }
        )

    def set_delta(
        self, index: int, value: V, stamp: Timestamp, floor: Timestamp | None = None
    ) -> Self:
        """Overwrite the value at visible `index` (last writer wins per element)."""
        length = self.visible_len(floor)
        if not 0 <= index < length:
            raise IndexError(f"index {index} out of range 0..{length - 1}")
        eid = self.visible_at(index, floor)
        return type(self)({eid: Element(self._elements[eid].after, value, stamp, None)})

    # -- maintenance ---------------------------------------------------------------------

    def gc(self, horizon: int) -> int:
        """Drop tombstones deleted before NTP64 time `horizon` that no element is positioned
        after (repeatedly, so dead runs unwind), except run guards. Visible order is
        unchanged.

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
        guards: set[Timestamp] = set()

        def collectible(eid: Timestamp) -> bool:
            el = self._elements.get(eid)
            return (
                el is not None
                and el.deleted is not None
                and el.deleted.time < horizon
                and not self._children.get(eid)
                and eid not in guards
            )

        pending = [eid for eid in self._elements if collectible(eid)]
        if pending:  # the guards cost a sort: only when something could go
            guards = self._run_guards()
            pending = [eid for eid in pending if eid not in guards]
        dropped = 0
        while pending:
            eid = pending.pop()
            if not collectible(eid):
                continue
            after = self._elements.pop(eid).after
            self._unlink(eid, after)
            dropped += 1
            if after != HEAD and collectible(after):
                pending.append(after)
        if dropped:
            self._index = None
            self._lists = None
            self._floored = None
        return dropped

    def _run_guards(self) -> set[Timestamp]:
        """Tombstones whose next lower present id of the same writer is live (see `gc`)."""
        elements = self._elements
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
        elements = self._elements
        runs: list[list[Timestamp]] = []
        open_runs: dict[Timestamp, list[Timestamp]] = {}
        used: set[bytes] = set()
        for eid in sorted(elements):
            el = elements[eid]
            before = Timestamp(eid.time - 1, eid.node)
            run = open_runs.pop(before, None) if el.after == before else None
            if run is None:
                run = [eid]
                runs.append(run)
                used.add(eid.node)
                used.add(el.after.node)
            else:
                run.append(eid)
            open_runs[eid] = run
            if el.updated is not None:
                used.add(el.updated.node)
            if el.deleted is not None:
                used.add(el.deleted.node)
        writers = sorted(used)
        index = {w: i for i, w in enumerate(writers)}
        out: list[WireRun[V]] = []
        for run in runs:
            first = run[0]
            after = elements[first].after
            items = [elements[e] for e in run]
            live = [el.value for el in items if el.value is not None]
            out.append(
                (
                    first.time,
                    index[first.node],
                    after.time,
                    index[after.node],
                    len(run),
                    self._pack(live),
                    _groups([el.deleted for el in items], index),
                    _groups([el.updated for el in items], index),
                )
            )
        return writers, out

    def _pack(self, live: list[V]) -> V | list[V]:
        """A run's live values in the canonical form (Text joins them into a string)."""
        return live

    def hash_form(self, floor: Timestamp | None) -> list[bytes] | None:
        """What enters the Merkle hash: the digests of the visible sequence's hash chunks in
        order (see "Hash chunks" in `order_index.py`), tombstones left out; None when
        nothing is visible. Each chunk digest is SHA-256 over the canonical (ids, values,
        value stamps) lists of its elements. Without a floor the index caches the digests,
        so an edit rehashes one chunk, not the whole sequence."""
        if floor is None:
            digests = self._ordered().chunk_digests(self._chunk_digest)
        else:
            digests = chunk_digests(self.visible_ids(floor), self._chunk_digest)
        return digests or None

    def _chunk_digest(self, ids: list[Timestamp]) -> bytes:
        # C-level map/itemgetter: a long chunk (forged ids without cuts) stays cheap.
        live = list(map(self._elements.__getitem__, ids))
        form = (ids, list(map(_VALUE, live)), list(map(_UPDATED, live)))
        return hashlib.sha256(canonical(form)).digest()

    def canonical(self) -> bytes:
        return canonical(self.wire())

    def max_stamp(self) -> Timestamp | None:
        elements = self._elements
        if len(elements) == 1:  # a one-edit delta (committed once per keystroke)
            [(top, (after, _, updated, deleted))] = elements.items()
            top = max(top, after)
            if updated is not None and updated > top:
                top = updated
            if deleted is not None and deleted > top:
                top = deleted
            return top
        if not elements:
            return None
        # `after` too: an honest one is older than its element, a forged one must not slip
        # a far-future stamp past the drift check. (C-level max: runs once per edit.)
        best: Timestamp = max(elements)
        afters: Timestamp = max(map(_AFTER, elements.values()))
        stamps = [s for el in elements.values() for s in (el.updated, el.deleted) if s is not None]
        return max(best, afters, *stamps)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SequenceState)
            and type(other) is type(self)
            and self._elements == other._elements
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._elements!r})"

    # -- internals -----------------------------------------------------------------------

    def _unlink(self, eid: Timestamp, after: Timestamp) -> None:
        siblings = self._children[after]
        del siblings[bisect_left(siblings, eid)]
        if not siblings:
            del self._children[after]

    def _linearize(self, floor: Timestamp | None) -> list[Timestamp]:
        """Pre-order walk from HEAD, highest id first among siblings; see module docstring.

        Each element has one `after`, so nothing is visited twice; cycles (forged data)
        are not reachable from HEAD and simply stay invisible.
        """
        children = self._children
        if floor is None:
            stack = list(children.get(HEAD, ()))
        else:
            stack = sorted(e for e, el in self._elements.items() if e > floor and el.after <= floor)
        out: list[Timestamp] = []
        while stack:
            eid = stack.pop()  # ascending lists: pop() takes the highest id first
            out.append(eid)
            kids = children.get(eid)
            if kids:
                stack.extend(kids if floor is None else [k for k in kids if k > floor])
        return out

    def _floor_view(self, floor: Timestamp) -> tuple[list[Timestamp], list[Timestamp]]:
        cached = self._floored
        if cached is None or cached[0] != floor:
            order = self._linearize(floor)
            elements = self._elements
            visible = [e for e in order if elements[e].deleted is None]
            cached = self._floored = (floor, order, visible)
        return cached[1], cached[2]

    def _is_live(self, eid: Timestamp) -> bool:
        return self._elements[eid].deleted is None

    def _ordered(self) -> OrderIndex:
        index = self._index
        if index is None:
            index = self._index = OrderIndex(self._linearize(None), self._is_live)
        return index

    def _materialised(self) -> tuple[list[Timestamp], list[Timestamp]]:
        lists = self._lists
        if lists is None:
            index = self._ordered()
            lists = self._lists = (index.order(), index.live())
        return lists

    def _place(self, eid: Timestamp) -> None:
        """Put a just-added element into the index, if it can be done locally."""
        index = self._index
        if index is None:
            return
        if eid in self._children:  # it is the missing reference of earlier arrivals
            self._index = None
            return
        parent = self._elements[eid].after
        if parent != HEAD and parent not in index:
            return  # reference not here yet: stays out of the order until it arrives
        siblings = self._children[parent]
        k = bisect_left(siblings, eid)
        if k > 0:
            # The next lower sibling follows us: go right before it.
            index.insert_before(siblings[k - 1], eid, self._is_live)
        elif len(siblings) > 1:
            # Lowest sibling: go after the subtree of the next higher one, which ends at
            # its last (lowest-id) descendant chain.
            last = siblings[1]
            while kids := self._children.get(last):
                last = kids[0]
            index.insert_after(last, eid, self._is_live)
        else:
            index.insert_after(None if parent == HEAD else parent, eid, self._is_live)


def chunk_digests(
    visible: list[Timestamp], digest: Callable[[list[Timestamp]], bytes]
) -> list[bytes]:
    """The chunk digests of a visible sequence given whole (the definition `OrderIndex.
    chunk_digests` caches): a chunk ends at each cut and at the end."""
    out: list[bytes] = []
    start = 0
    for end in chunk_ends(visible):
        out.append(digest(visible[start : end + 1]))
        start = end + 1
    if start < len(visible):
        out.append(digest(visible[start:]))
    return out


def _groups(stamps: list[Timestamp | None], index: dict[bytes, int]) -> list[Group]:
    """Maximal spans of equal non-None stamps, as `(offset, count, time, writer#)`."""
    out: list[Group] = []
    previous: Timestamp | None = None
    for offset, stamp in enumerate(stamps):
        if stamp is None:
            previous = None
        elif stamp == previous:
            start, count, time, writer = out[-1]
            out[-1] = (start, count + 1, time, writer)
        else:
            out.append((offset, 1, stamp.time, index[stamp.node]))
            previous = stamp
    return out


class TextState(SequenceState[str]):
    """A `Text`: one element per character."""

    __slots__ = ()

    def _pack(self, live: list[str]) -> str | list[str]:
        return "".join(live)


class VectorState(SequenceState[bytes]):
    """A `Vector`: one element per item, values are canonical encodings."""

    __slots__ = ()
