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

Digests are cached by the id of the cut that ends their chunk (None: the chunk that ends
at the end of the sequence), and each block caches the list of digests of the chunks that
end in it (the last block also holds the trailing chunk). An edit at live offset `i` of a
block drops the digest of the chunk ending at the first cut from `i` on and marks stale
that block and every block up to the one holding that cut. Reading walks the blocks,
re-listing only stale ones and hashing only chunks without a cached digest: O(blocks) list
concatenation plus one or two chunks per edit. A writer can choose ids without cuts and so
make one chunk as long as the sequence; the hash then costs what it always did, O(length),
and stays correct.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Final, Self

from trionode.crdt.hlc import Timestamp

BLOCK_MAX: Final = 256
"""Most ids in one block. A miss of the cursor hint scans one block (~100 ns per 32 ids)."""
CUT_EVERY: Final = 61
"""Mean visible elements per hash chunk (see "Hash chunks"): a prime, so ids whose times
share a stride (a clock that ticks in steps) still cut about this often."""


def is_cut(eid: Timestamp) -> bool:
    """Does a hash chunk end at this element? A pure function of the id's time: one element
    in `CUT_EVERY` of a typed run (consecutive times), about one in `CUT_EVERY` otherwise."""
    return eid.time % CUT_EVERY == 0


def _ends(block: _Block) -> list[int]:
    """Offsets in `block.live` of its cuts, ascending (`list.index` runs in C)."""
    return sorted(map(block.live.index, block.cuts))


def _first_cut(block: _Block, start: int) -> Timestamp | None:
    """The first cut in `block.live` from offset `start` on."""
    after = [i for i in map(block.live.index, block.cuts) if i >= start]
    return block.live[min(after)] if after else None


def chunk_ends(ids: Sequence[Timestamp]) -> list[int]:
    """Offsets in `ids` of the elements that end a chunk (cuts), ascending."""
    return [i for i, e in enumerate(ids) if not e.time % CUT_EVERY]


class _Block:
    __slots__ = ("chunks", "cuts", "ids", "live", "pos", "serial")

    def __init__(self, ids: list[Timestamp], live: list[Timestamp], serial: int) -> None:
        self.ids = ids
        """Placed element ids in order, tombstones included."""
        self.live = live
        """The visible ones among them, in the same order."""
        self.pos = 0
        """Index of this block in `OrderIndex._blocks` (renumbered on splits)."""
        self.serial = serial
        """Stable name of the block (`OrderIndex._where` maps ids to it)."""
        self.cuts = [e for e in live if not e.time % CUT_EVERY]
        """The cuts among `live`, in no particular order (a few per block)."""
        self.chunks: list[bytes] | None = None
        """Digests of the hash chunks ending in this block (None: stale). Replaced, never
        mutated, so copies may share it."""


class OrderIndex:
    """Placed element ids in order, with visible-position lookup. See the module docstring."""

    __slots__ = (
        "_block_max",
        "_blocks",
        "_digests",
        "_by_serial",
        "_fenwick",
        "_hint",
        "_live_hint",
        "_live_total",
        "_serials",
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
        self._digests: dict[Timestamp | None, bytes] = {}
        """Chunk digests by the cut ending the chunk (None: the trailing chunk)."""
        self._reindex()

    def copy(self) -> Self:
        new: Self = type(self).__new__(type(self))
        new._blocks = []
        new._by_serial = {}
        for block in self._blocks:
            clone = _Block(list(block.ids), [], block.serial)
            clone.live = list(block.live)
            clone.cuts = list(block.cuts)
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
        blocks = self._blocks
        cache = self._digests
        last = len(blocks) - 1
        carry: list[Timestamp] | None = []
        """Visible ids since the last cut (None: not gathered while blocks are fresh)."""
        for pos, block in enumerate(blocks):
            chunks = block.chunks
            if chunks is None:
                if carry is None:
                    carry = self._carry_before(pos)
                live = block.live
                chunks = []
                start = 0
                for end in _ends(block):
                    key = live[end]
                    known = cache.get(key)
                    if known is None:
                        known = cache[key] = digest(carry + live[start : end + 1])
                    chunks.append(known)
                    carry = []
                    start = end + 1
                carry += live[start:]
                if pos == last and carry:
                    known = cache.get(None)
                    if known is None:
                        known = cache[None] = digest(carry)
                    chunks.append(known)
                block.chunks = chunks
            else:
                carry = None
            out += chunks
        return out

    # -- updating ------------------------------------------------------------------------

    def insert_after(
        self, anchor: Timestamp | None, eid: Timestamp, is_live: Callable[[Timestamp], bool]
    ) -> None:
        """Place `eid` right after `anchor` (None: at the front)."""
        if anchor is None:
            block, index = self._blocks[0], 0
        else:
            block, index = self._locate(anchor)
            index += 1
        self._insert(block, index, eid, is_live)

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
        if not eid.time % CUT_EVERY:
            block.cuts.remove(eid)
        self._live_total -= 1
        self._add(block.pos, -1)
        self._stale(block, at)

    def touch(self, eid: Timestamp) -> None:
        """The value of `eid` (placed, visible) changed: its hash chunk is stale."""
        block = self._by_serial[self._where[eid]]
        self._stale(block, block.live.index(eid))

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
        self, block: _Block, index: int, eid: Timestamp, is_live: Callable[[Timestamp], bool]
    ) -> None:
        ids = block.ids
        ids.insert(index, eid)
        self._where[eid] = block.serial
        self._hint = (block, index)
        if is_live(eid):
            back = index - 1
            while back >= 0 and not is_live(ids[back]):
                back -= 1
            live = block.live
            at = 0
            if back >= 0:
                before = ids[back]
                # Typing: the live predecessor is usually the element placed last.
                guess = self._live_hint
                at = (
                    guess if guess < len(live) and live[guess] == before else live.index(before)
                ) + 1
            live.insert(at, eid)
            if not eid.time % CUT_EVERY:
                block.cuts.append(eid)
            self._live_hint = at
            self._live_total += 1
            self._add(block.pos, 1)
            self._stale(block, at + 1)  # what follows the new element: its chunk's end
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
        block.cuts = [c for c in block.cuts if c in keep]
        block.chunks = None  # (the tail starts stale)
        self._blocks.insert(block.pos + 1, tail)
        self._where.update(dict.fromkeys(moved, tail.serial))
        self._hint = (block, 0)
        self._reindex()

    def _stale(self, block: _Block, at: int) -> None:
        """Visible content of `block` changed just before live offset `at` (or at it, for a
        new value): the changed chunk ends at the first cut from `at` on, here or later."""
        block.chunks = None
        end = _first_cut(block, at)
        blocks = self._blocks
        pos = block.pos
        while end is None and pos < len(blocks) - 1:
            pos += 1
            following = blocks[pos]
            following.chunks = None
            end = _first_cut(following, 0)
        self._digests.pop(end, None)

    def _carry_before(self, pos: int) -> list[Timestamp]:
        """The visible ids after the last cut before block `pos` (the start of its first
        chunk)."""
        parts: list[list[Timestamp]] = []
        for block in reversed(self._blocks[:pos]):
            live = block.live
            ends = _ends(block)
            if ends:
                parts.append(live[ends[-1] + 1 :])
                break
            parts.append(live)
        return list(chain.from_iterable(reversed(parts)))

    def _reindex(self) -> None:
        """Renumber the blocks and rebuild the Fenwick tree of their live counts."""
        blocks = self._blocks
        tree = [0] * (len(blocks) + 1)
        total = 0
        for pos, block in enumerate(blocks):
            block.pos = pos
            count = len(block.live)
            total += count
            i = pos + 1
            tree[i] += count
            parent = i + (i & -i)
            if parent < len(tree):
                tree[parent] += tree[i]
        self._fenwick = tree
        self._live_total = total

    def _add(self, pos: int, delta: int) -> None:
        tree = self._fenwick
        i = pos + 1
        n = len(tree)
        while i < n:
            tree[i] += delta
            i += i & -i

    def _find(self, position: int) -> tuple[_Block, int]:
        """The block holding visible `position`, and the offset in its live list."""
        tree = self._fenwick
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
        return self._blocks[pos], rest
