"""`OrderIndex`: a sequence's element order with O(log n) position lookup.

Theory of operation
-------------------
A Text of 100,000 characters edited one keystroke per transaction must find "the element at
visible position p" and "put this element right after that one" without touching the other
99,999. The index keeps the pre-order of the placed elements (tombstones included) cut into
blocks of at most `BLOCK_MAX` ids. Each block also keeps its live (visible) ids, in order, and
a Fenwick tree over the blocks' live counts turns a visible position into (block, offset) in
O(log blocks). An element id maps to the serial number of its block, so locating a neighbour
is a dict lookup plus a scan of one short block (`list.index`, in C), tried first at the
position of the previous edit because edits cluster at a cursor.

Blocks only split (elements are never removed: deletion hides, GC rebuilds the owner's
index), so a block's position in the list changes only on a split, which renumbers the
blocks after it and rebuilds the Fenwick tree: O(blocks) once every `BLOCK_MAX / 2` inserts.

The index is a cache: its owner (`SequenceState`) rebuilds it from scratch whenever an
incremental update would be hard (bulk merges, out-of-order arrivals, GC, forged data).

Hash chunks
-----------
A sequence's Merkle hash must not cost O(length) per keystroke, and it must be a function of
the visible elements alone (blocks depend on edit history, so they cannot be the unit).
The visible sequence is therefore cut into *chunks* by content: a chunk ends at every
visible element whose id is a *cut* (`is_cut`: its time is a multiple of `CUT_EVERY`, about
one element in 61) and at the end of the sequence. The owner hashes each chunk and the
sequence's hash form is the list of chunk digests (`chunk_digests`). An edit changes the
chunk it falls in (and, when it adds or hides a cut, splits or merges two chunks); every
other digest stays.

Edits cost nothing here beyond marking their block stale (`chunks = None`): the work is
done when the hash is read. Each block keeps the digests of the chunks that *end* in it (the
last block also holds the chunk that ends at the end of the sequence), the visible ids it
received from earlier blocks when those were computed (`carry_in`: the start of its first
chunk) and those it passes on (`carry_out`: what follows its last cut). Reading walks the
blocks; a fresh block whose `carry_in` is still what the blocks before it pass on is reused
as is, any other is re-cut, and each of its chunks reuses the digest cached under the id of
its ending cut (None: the trailing chunk) when its ids are the ones hashed then. So a
keystroke costs one re-cut block and one or two chunk digests at the next read, plus
O(blocks) list concatenation. A new value for an element with the same id (Vector `set`,
`touch`) is the one change ids cannot show; touched ids are remembered until the next read.
A writer can choose ids without cuts and so make one chunk as long as the sequence; the
hash then costs what it always did, O(length), and stays correct.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, chain
from operator import itemgetter
from typing import Final, Self

from trionode.crdt.hlc import Timestamp

BLOCK_MAX: Final = 256
"""Most ids in one block. A miss of the cursor hint scans one block (~100 ns per 32 ids)."""
CUT_EVERY: Final = 61
"""Mean visible elements per hash chunk (see "Hash chunks"): a prime, so ids whose times
share a stride (a clock that ticks in steps) still cut about this often."""


_TIME: Final = itemgetter(0)  # faster than the NamedTuple's `.time` property


def is_cut(eid: Timestamp) -> bool:
    """Does a hash chunk end at this element? A pure function of the id's time: one element
    in `CUT_EVERY` of a typed run (consecutive times), about one in `CUT_EVERY` otherwise."""
    return eid.time % CUT_EVERY == 0


def chunk_ends(ids: Sequence[Timestamp]) -> list[int]:
    """Offsets in `ids` of the elements that end a chunk (cuts), ascending."""
    return [i for i, time in enumerate(map(_TIME, ids)) if not time % CUT_EVERY]


class _Block:
    __slots__ = ("carry_in", "carry_out", "chunks", "ids", "live", "pos", "serial")

    def __init__(self, ids: list[Timestamp], live: list[Timestamp], serial: int) -> None:
        self.ids = ids
        """Placed element ids in order, tombstones included."""
        self.live = live
        """The visible ones among them, in the same order."""
        self.pos = 0
        """Index of this block in `OrderIndex._blocks` (renumbered on splits)."""
        self.serial = serial
        """Stable name of the block (`OrderIndex._where` maps ids to it)."""
        self.chunks: list[bytes] | None = None
        """Digests of the hash chunks ending in this block (None: stale). This and the
        carries are replaced, never mutated, so copies share them."""
        self.carry_in: list[Timestamp] = []
        self.carry_out: list[Timestamp] = []


class OrderIndex:
    """Placed element ids in order, with visible-position lookup. See the module docstring."""

    __slots__ = (
        "_block_max",
        "_blocks",
        "_by_serial",
        "_digests",
        "_fenwick",
        "_hint",
        "_live_hint",
        "_live_total",
        "_serials",
        "_touched",
        "_where",
    )

    def __init__(
        self,
        order: Iterable[Timestamp],
        is_live: Callable[[Timestamp], bool],
        *,
        block_max: int = BLOCK_MAX,
    ) -> None:
        ids = list(order)
        self._block_max = max(block_max, 2)
        fill = self._block_max // 2  # room to grow before the first split
        self._blocks: list[_Block] = []
        self._by_serial: dict[int, _Block] = {}
        self._where: dict[Timestamp, int] = {}
        self._serials = 0
        for start in range(0, max(len(ids), 1), fill):
            chunk = ids[start : start + fill]
            block = self._new_block(chunk, [e for e in chunk if is_live(e)])
            self._blocks.append(block)
            self._where.update(dict.fromkeys(chunk, block.serial))
        self._hint = (self._blocks[0], 0)
        self._live_hint = 0
        """Offset in its block's live list of the live element placed last."""
        self._live_total = 0
        self._fenwick: list[int] = []
        self._digests: dict[Timestamp | None, tuple[list[Timestamp], bytes]] = {}
        """(ids, digest) of chunks by the cut ending them (None: the trailing chunk)."""
        self._touched: set[Timestamp] = set()
        """Ids whose value changed since the last `chunk_digests`."""
        self._reindex()

    def copy(self) -> Self:
        new: Self = type(self).__new__(type(self))
        new._blocks = []
        new._by_serial = {}
        for block in self._blocks:
            clone = _Block(list(block.ids), [], block.serial)
            clone.live = list(block.live)
            clone.carry_in = block.carry_in
            clone.carry_out = block.carry_out
            clone.pos = block.pos
            clone.chunks = block.chunks
            new._blocks.append(clone)
            new._by_serial[clone.serial] = clone
        new._where = self._where.copy()  # serials, not blocks: shared names stay valid
        new._serials = self._serials
        new._block_max = self._block_max
        new._hint = (new._blocks[0], 0)
        new._live_hint = 0
        new._live_total = self._live_total
        new._fenwick = list(self._fenwick)
        new._digests = self._digests.copy()
        new._touched = self._touched.copy()
        return new

    # -- reading -------------------------------------------------------------------------

    def __contains__(self, eid: Timestamp) -> bool:
        return eid in self._where

    def live_len(self) -> int:
        return self._live_total

    def live_at(self, position: int) -> Timestamp:
        """The visible id at `position` (0 <= position < live_len())."""
        if not 0 <= position < self._live_total:
            raise IndexError(position)
        block, offset = self._find(position)
        return block.live[offset]

    def live_before(self, position: int) -> Timestamp | None:
        """The visible id just before visible `position` (0 <= position <= live_len()),
        None at the front: where an insert at `position` goes."""
        if not 0 <= position <= self._live_total:
            raise IndexError(f"insert position {position} out of range 0..{self._live_total}")
        if not position:
            return None
        block, offset = self._find(position - 1)
        return block.live[offset]

    def live_slice(self, position: int, count: int) -> list[Timestamp]:
        """`count` visible ids from `position` (the range must be inside live_len())."""
        if position < 0 or count < 0 or position + count > self._live_total:
            raise IndexError(position)
        if not count:
            return []
        block, offset = self._find(position)
        out = block.live[offset : offset + count]
        pos = block.pos
        while len(out) < count:
            pos += 1
            out += self._blocks[pos].live[: count - len(out)]
        return out

    def order(self) -> list[Timestamp]:
        return list(chain.from_iterable(b.ids for b in self._blocks))

    def live(self) -> list[Timestamp]:
        return list(chain.from_iterable(b.live for b in self._blocks))

    def chunk_digests(self, digest: Callable[[list[Timestamp]], bytes]) -> list[bytes]:
        """The digest of every hash chunk of the visible sequence, in order (see "Hash
        chunks"); `digest` hashes one chunk's ids, called only for chunks an edit changed."""
        out: list[bytes] = []
        cache = self._digests
        touched = self._touched
        carry: list[Timestamp] = []
        """Visible ids since the last cut."""
        last = self._blocks[-1]
        for block in self._blocks:
            chunks = block.chunks
            if (
                chunks is None
                or (block.carry_in is not carry and block.carry_in != carry)
                or (touched and not touched.isdisjoint(carry))
            ):
                live = block.live
                block.carry_in = carry
                chunks = []
                start = 0
                for end in chunk_ends(live):
                    key = live[end]
                    ids = carry + live[start : end + 1]
                    chunks.append(self._digest(cache, key, ids, digest))
                    carry = []
                    start = end + 1
                carry = carry + live[start:]
                if block is last and carry:
                    chunks.append(self._digest(cache, None, carry, digest))
                block.chunks = chunks
                block.carry_out = carry
            else:
                carry = block.carry_out
            out += chunks
        if not carry:
            # No trailing chunk now: its cached entry is orphaned. Unlike a cut's entry (a
            # hidden cut never shows again) it can come back — delete the last cut and the
            # same ids trail again — and a touch made while it was orphaned is cleared by
            # this read, so the entry could no longer be seen to be stale. Drop it.
            cache.pop(None, None)
        touched.clear()
        return out

    def _digest(
        self,
        cache: dict[Timestamp | None, tuple[list[Timestamp], bytes]],
        key: Timestamp | None,
        ids: list[Timestamp],
        digest: Callable[[list[Timestamp]], bytes],
    ) -> bytes:
        known = cache.get(key)
        if known is not None and known[0] == ids and self._touched.isdisjoint(ids):
            return known[1]
        value = digest(ids)
        cache[key] = (ids, value)
        return value

    # -- updating ------------------------------------------------------------------------

    def insert_after(
        self,
        anchor: Timestamp | None,
        eid: Timestamp,
        is_live: Callable[[Timestamp], bool],
        *,
        live: bool | None = None,
    ) -> bool:
        """Place `eid` right after `anchor` (None: at the front) and return True; False,
        placing nothing, when `anchor` is not placed (then `eid` stays out of the order, as
        its reference does). `live`: whether `eid` is visible, when the caller knows (None:
        ask `is_live`)."""
        if anchor is None:
            block, index = self._blocks[0], 0
        else:
            block, index = self._hint
            ids = block.ids
            # Typing: the anchor is the element placed last (`_locate`'s first guess, inline).
            if index < len(ids) and ids[index] == anchor:
                index += 1
            elif anchor in self._where:
                block, index = self._locate(anchor)
                index += 1
            else:
                return False
        self._insert(block, index, eid, is_live, live_known=live)
        return True

    def insert_before(
        self, anchor: Timestamp, eid: Timestamp, is_live: Callable[[Timestamp], bool]
    ) -> None:
        """Place `eid` right before `anchor`."""
        block, index = self._locate(anchor)
        self._insert(block, index, eid, is_live)

    def hide(self, eid: Timestamp) -> None:
        """`eid` (placed, visible) was just deleted."""
        block = self._by_serial[self._where[eid]]
        live = block.live
        at = live.index(eid)
        del live[at]
        self._live_total -= 1
        self._add(block.pos, -1)
        block.chunks = None

    def hide_many(self, ids: Iterable[Timestamp]) -> None:
        """The ids in `ids` that are placed here (all visible) were just deleted: a range
        delete; ids not placed are skipped (they are out of the order, like their
        reference). Costs O(len(ids)) dict lookups plus one filter of each block they fall
        in and one Fenwick update per such block, whatever the sequence's length (`hide`
        per id would scan its block's live list once per id)."""
        by_block: dict[int, set[Timestamp]] = {}
        where = self._where.get
        for eid in ids:
            serial = where(eid)
            if serial is None:
                continue
            gone = by_block.get(serial)
            if gone is None:
                by_block[serial] = {eid}
            else:
                gone.add(eid)
        by_serial = self._by_serial
        for serial, gone in by_block.items():
            block = by_serial[serial]
            live = block.live
            kept = [e for e in live if e not in gone]
            removed = len(live) - len(kept)
            block.live = kept
            self._live_total -= removed
            self._add(block.pos, -removed)
            block.chunks = None
        self._live_hint = 0  # (offsets into live lists moved)

    def touch(self, eid: Timestamp) -> None:
        """The value of `eid` (placed, visible) changed: its hash chunk is stale."""
        block = self._by_serial[self._where[eid]]
        block.chunks = None
        self._touched.add(eid)

    # -- internals -----------------------------------------------------------------------

    def _new_block(self, ids: list[Timestamp], live: list[Timestamp]) -> _Block:
        self._serials += 1
        block = _Block(ids, live, self._serials)
        self._by_serial[block.serial] = block
        return block

    def _locate(self, eid: Timestamp) -> tuple[_Block, int]:
        block = self._by_serial[self._where[eid]]
        ids = block.ids
        hinted, hint = self._hint
        if hinted is block:
            for guess in (hint, hint + 1, hint - 1):
                if 0 <= guess < len(ids) and ids[guess] == eid:
                    return block, guess
        return block, ids.index(eid)

    def _insert(
        self,
        block: _Block,
        index: int,
        eid: Timestamp,
        is_live: Callable[[Timestamp], bool],
        *,
        live_known: bool | None = None,
    ) -> None:
        ids = block.ids
        ids.insert(index, eid)
        self._where[eid] = block.serial
        self._hint = (block, index)
        if is_live(eid) if live_known is None else live_known:
            live = block.live
            guess = self._live_hint
            # Typing: the live predecessor is usually the element placed last, right before.
            if index and guess < len(live) and live[guess] == ids[index - 1]:
                at = guess + 1
            else:
                back = index - 1
                while back >= 0 and not is_live(ids[back]):
                    back -= 1
                at = live.index(ids[back]) + 1 if back >= 0 else 0
            live.insert(at, eid)
            self._live_hint = at
            self._live_total += 1
            tree = self._fenwick  # (`_add(block.pos, 1)`, inline: once per keystroke)
            i = block.pos + 1
            n = len(tree)
            while i < n:
                tree[i] += 1
                i += i & -i
            block.chunks = None
        if len(ids) > self._block_max:
            self._split(block)

    def _split(self, block: _Block) -> None:
        half = len(block.ids) // 2
        moved = block.ids[half:]
        del block.ids[half:]
        keep = set(block.ids)
        live = block.live
        cut = 0
        while cut < len(live) and live[cut] in keep:
            cut += 1
        tail = self._new_block(moved, live[cut:])
        del live[cut:]
        block.chunks = None  # (the tail starts stale)
        self._blocks.insert(block.pos + 1, tail)
        self._where.update(dict.fromkeys(moved, tail.serial))
        self._hint = (block, 0)
        self._reindex()

    def _reindex(self) -> None:
        """Renumber the blocks and rebuild the Fenwick tree of their live counts."""
        blocks = self._blocks
        for pos, block in enumerate(blocks):
            block.pos = pos
        self._fenwick, self._live_total = fenwick([len(block.live) for block in blocks])

    def _add(self, pos: int, delta: int) -> None:
        fenwick_add(self._fenwick, pos, delta)

    def _find(self, position: int) -> tuple[_Block, int]:
        """The block holding visible `position`, and the offset in its live list."""
        pos, rest = fenwick_find(self._fenwick, position)
        return self._blocks[pos], rest


def fenwick(counts: list[int]) -> tuple[list[int], int]:
    """A Fenwick tree (1-based) over `counts`, and their total."""
    # Entry i sums the counts (i - lowbit(i), i]: a difference of two prefix sums, and
    # i - lowbit(i) is i & (i - 1). (A list comprehension: a split rebuilds it per block.)
    prefix = [0, *accumulate(counts)]
    return [0, *[prefix[i] - prefix[i & (i - 1)] for i in range(1, len(prefix))]], prefix[-1]


def fenwick_add(tree: list[int], pos: int, delta: int) -> None:
    """Add `delta` to the count at index `pos` (0-based)."""
    i = pos + 1
    n = len(tree)
    while i < n:
        tree[i] += delta
        i += i & -i


def fenwick_find(tree: list[int], position: int) -> tuple[int, int]:
    """(index, rest): the index whose span of the running total holds `position`
    (0 <= position < total), and `position`'s offset inside that index's count."""
    n = len(tree) - 1
    pos = 0
    rest = position
    step = 1 << (n.bit_length() - 1) if n else 0
    while step:
        nxt = pos + step
        if nxt <= n and tree[nxt] <= rest:
            pos = nxt
            rest -= tree[nxt]
        step >>= 1
    return pos, rest
