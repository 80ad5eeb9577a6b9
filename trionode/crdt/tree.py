"""`StateTree`: a context's entities, their join, Merkle hashes, paging and GC.

The tree owns an in-memory `entity_id -> Entity` mapping plus derived indexes (children
by parent, cached hashes, sorted ids). Everything it holds can be rebuilt from the records
alone (`StateTree(records)`), so the store layer persists `id -> encode_entity(record)`
and reads them back; `drain_changes()` says which rows to write or delete.

Merkle hash of an entity = SHA-256(own_form ‖ hashes of its *visible* children in id
order); the root hash is the root's. Hidden entities (tombstoned, or reset by a removal
of an ancestor) and tombstoned sequence elements never enter a hash, so GC cannot change
one. Hashes are computed lazily and cached; a change invalidates the entity and its
ancestors, and a change of `removed` (the floor) also invalidates its subtree.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any, Final, NamedTuple, cast

from trionode.crdt.canonical import encode_form
from trionode.crdt.compact import SealedRow
from trionode.crdt.encoding import ROOT_FORM, own_form
from trionode.crdt.entity import CONTAINERS, MAX_DEPTH, ROOT_ID, Entity, Kind
from trionode.crdt.hlc import HybridClock, Timestamp, latest
from trionode.crdt.lazy import RowEntity
from trionode.crdt.register import RegisterState
from trionode.crdt.rows import JOURNAL_KINDS, Row, RowLog
from trionode.crdt.sequence import SequenceState
from trionode.crdt.transaction import Transaction

_new: Final = object.__new__
_leaf_of: Final = attrgetter("leaf")

BUCKETING_THRESHOLD = 64
"""Containers with more children than this hash them in 256 cached buckets."""


def _undecoded(record: Entity) -> bool:
    """A record still held as its row (`lazy.py`): live, with no removal of its own."""
    return record.__class__ is RowEntity and record.row is not None


class NodeInfo(NamedTuple):
    """What tree comparison needs about one entity."""

    entity: Entity | None
    """The record (None for the root, or an id we do not hold)."""
    hash: bytes | None
    """Its Merkle hash, or None if it is not visible (and so not part of the root hash)."""
    children: list[tuple[bytes, bytes | None]]
    """Every child id we hold, sorted, with its hash or None if hidden."""


class ChangeSet(NamedTuple):
    """Record ids changed since the last `drain_changes()`: rewrite or delete those rows."""

    updated: frozenset[bytes]
    deleted: frozenset[bytes]


class _Resolved(NamedTuple):
    visible: bool
    floor: Timestamp | None
    depth: int


_HIDDEN = _Resolved(visible=False, floor=None, depth=0)
_BUCKETS = 256
_LAST_BUCKET: Final = _BUCKETS - 1
_BUCKET_KEYS: Final = [bytes([b]) for b in range(_BUCKETS)]
"""The smallest id of each bucket (what a bucket's children are bisected by)."""
_BUCKET_TAGS: Final = [b"bucket" + bytes([b]) for b in range(_BUCKETS)]
"""What each bucket's digest starts with."""
_sha256: Final = hashlib.sha256
_FILL_MAX: Final = 8
"""A bucket with more children than this whose digests are not in the hash cache (a
loaded map's rows, whose digests sit on them: `RowEntity.leaf`) is hashed from those
leaves in one join, or child by child (`_bucket_digest`)."""


def _own_form(record: Entity, floor: Timestamp | None) -> bytes:
    """`own_form(record, floor)`, with a register's or an empty body's inline (a write
    rehashes its record, its map and the root)."""
    body = record.body
    if body is None:
        return encode_form((int(record.kind), record.name, record.added, None))
    if body.__class__ is RegisterState:
        stamp = body.stamp
        form = (stamp, body.value) if floor is None or stamp > floor else None
        return encode_form((int(record.kind), record.name, record.added, form))
    return own_form(record, floor)


class _Buckets:
    """A large container's cached bucket digests (b"" for a bucket without children) and
    the buckets whose digest is out of date."""

    __slots__ = ("digests", "stale")

    def __init__(self) -> None:
        self.digests = [b""] * _BUCKETS
        self.stale: set[int] = set(range(_BUCKETS))


class StateTree:
    """The entity tree of one context. Pure and synchronous; not thread-safe."""

    __slots__ = (
        "_buckets",
        "_children",
        "_deleted",
        "_hashes",
        "_log",
        "_records",
        "_sorted_ids",
        "_updated",
        "generation",
        "in_place",
        "max_stamp",
        "records",
    )

    def __init__(self, entities: Iterable[Entity] = ()) -> None:
        self._records: dict[bytes, Entity] = {}
        self._children: dict[bytes, list[bytes]] = {}
        self._hashes: dict[bytes, bytes] = {}
        self._buckets: dict[bytes, _Buckets] = {}
        self._sorted_ids: list[bytes] | None = None
        self.records: Mapping[bytes, Entity] = self._records
        """Every record by id (read-only, as are the next two: plain attributes, because a
        transaction reads them once per keystroke)."""
        self.max_stamp: Timestamp | None = None
        """The newest stamp in any record ever applied."""
        self._log = RowLog()
        self.generation = 0
        """Bumped by every local commit (guards against interleaved local transactions)."""
        self.in_place: Transaction | None = None
        """The open transaction whose sequence edits are joined into records in place
        (see `transaction.py`): every other join into the tree evicts it first."""
        self._updated: set[bytes] = set()
        self._deleted: set[bytes] = set()
        self.apply(entities)
        self.drain_changes()  # loading is not a change

    # -- records -------------------------------------------------------------------------

    def get(self, entity_id: bytes) -> Entity | None:
        """The record for `entity_id` (read-only), tombstones included."""
        return self._records.get(entity_id)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self._records

    def children(self, entity_id: bytes) -> Sequence[bytes]:
        """Ids of every record whose parent is `entity_id`, sorted (hidden ones too)."""
        return tuple(self._children.get(entity_id, ()))

    def entities(
        self, *, start_after: bytes | None = None, limit: int | None = None
    ) -> list[Entity]:
        """Records in id order, for snapshots: resume a page with the last id seen."""
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self._records)
        ids = self._sorted_ids
        start = 0 if start_after is None else bisect_right(ids, start_after)
        stop = len(ids) if limit is None else min(len(ids), start + limit)
        return [self._records[i] for i in ids[start:stop]]

    # -- joining -------------------------------------------------------------------------

    def apply(self, entities: Iterable[Entity], *, local: bool = False) -> list[bytes]:
        """Join records (delta-states or full states) into the tree.

        Idempotent, commutative and associative: any order, duplicates included, gives the
        same tree. The caller checks clock drift first (`entity.max_stamp`). Records are
        copied, never aliased. Returns the ids that changed.
        """
        if self.in_place is not None:
            self.in_place.evict()
        changed: list[bytes] = []
        records = self._records
        hashes = self._hashes
        all_buckets = self._buckets
        log = self._log
        for incoming in entities:
            eid = incoming.id
            mine = records.get(eid)
            if mine is None:
                records[eid] = incoming.copy()
                if eid in log.stored:  # (`log.rewrite`'s test, inline: per new record)
                    log.rewrite(eid)  # dropped by GC earlier, now back: no base to extend
                insort(self._children.setdefault(incoming.parent, []), eid)
                self._sorted_ids = None
                floor_changed = True  # earlier-arrived children may now be reachable
            else:
                result = mine.merge(incoming)
                if not result.changed:
                    continue
                if mine.kind in JOURNAL_KINDS:
                    log.applied(mine, incoming)
                floor_changed = result.floor_changed
            changed.append(eid)
            if incoming.__class__ is Entity:
                # (`incoming.max_stamp()`, inline: a map `set` applies two records)
                stamp = incoming.added
                removed = incoming.removed
                if removed is not None and (stamp is None or removed > stamp):
                    stamp = removed
                body = incoming.body
                if body is not None:
                    inner = body.stamp if body.__class__ is RegisterState else body.max_stamp()
                    if stamp is None or (inner is not None and inner > stamp):
                        stamp = inner
            else:  # (a record held as its row reads its stamp from the row: `lazy.py`)
                stamp = incoming.max_stamp()
            if stamp is not None and (self.max_stamp is None or stamp > self.max_stamp):
                self.max_stamp = stamp
            self._deleted.discard(eid)  # (`_mark_updated`, inlined: runs per write)
            self._updated.add(eid)
            # (`_invalidate_up`, inline, the root's hash popped once per batch: a map
            # `set` applies an entry and its map)
            cursor = eid
            for _ in range(MAX_DEPTH + 1):
                hashes.pop(cursor, None)
                record = records.get(cursor)
                if record is None:
                    break
                parent = record.parent
                buckets = all_buckets.get(parent)
                if buckets is not None:
                    buckets.stale.add(cursor[0])
                if parent == ROOT_ID:
                    break
                cursor = parent
            if floor_changed and (eid in self._children or eid in all_buckets):
                self._invalidate_down(eid)  # (nothing below a record without children)
        if changed:
            hashes.pop(ROOT_ID, None)
        if local:
            self.generation += 1
        return changed

    def applied_in_place(self, delta: Entity, newest: Timestamp | None) -> None:
        """A local commit's `delta` was joined into its record in place, changing it (a
        new or tombstoned element), and the commit's newest stamp is `newest`: what
        `apply([delta], local=True)` does besides the join. (Once per record.)"""
        entity_id = delta.id
        record = self._records[entity_id]
        log = self._log
        if entity_id in log.stored:  # (a sequence: journaled if stored; `applied`'s test)
            log.applied(record, delta)
        if self._deleted:
            self._deleted.discard(entity_id)
        self._updated.add(entity_id)
        if record.parent == ROOT_ID:  # (`_invalidate_up`, inline: a top-level field)
            hashes = self._hashes
            if hashes:
                hashes.pop(entity_id, None)
                hashes.pop(ROOT_ID, None)
            buckets = self._buckets.get(ROOT_ID)
            if buckets is not None:
                buckets.stale.add(entity_id[0])
        else:
            self._invalidate_up(entity_id)
        if newest is not None and (self.max_stamp is None or newest > self.max_stamp):
            self.max_stamp = newest
        self.generation += 1

    def restored(self, entity_id: bytes) -> None:
        """Record `entity_id` was put back as it was before in-place writes (an evicted
        transaction): hashes read meanwhile may hold them."""
        self._invalidate_up(entity_id)

    def add_new(
        self,
        entities: Sequence[Entity],
        *,
        newest: Timestamp | None = None,
        stored: bool = False,
    ) -> None:
        """Take records the caller owns (just decoded, or kept as their rows: `lazy.take`;
        kept, not copied), mostly new to the tree, as a snapshot's pages bring them; the
        same tree as `apply(entities)`, in bulk. New records are filed under their parents
        once per batch (one sort of runs, linear; appended when they come in id order) and
        each parent's ancestors' hashes are invalidated once, not once per record; one the
        tree holds is joined as usual. `newest`: the newest stamp in `entities`, when the
        caller knows it (`lazy.take` does), saves reading every record's stamps. `stored`:
        the caller writes the new records' rows itself, as they came (a snapshot's), and
        drains the changes at once: they are not marked for `drain_changes` (a set of every
        id, and its copy, for nothing)."""
        if self.in_place is not None:
            self.in_place.evict()
        records = self._records
        added: dict[bytes, list[bytes]] = {}
        known = newest is not None
        newest = latest(self.max_stamp, newest)
        held: list[Entity] = []
        last: bytes | None = None
        siblings: list[bytes] = []
        for incoming in entities:
            eid = incoming.id
            if eid in records:
                held.append(incoming)
                continue
            records[eid] = incoming
            parent = incoming.parent
            if parent != last:  # (a page's records mostly share their parent)
                last = parent
                siblings = added.setdefault(parent, [])
            siblings.append(eid)
            if not known:
                newest = latest(newest, incoming.max_stamp())
        # What changed, in bulk (`_mark_updated` and `RowLog.rewrite` of each new record).
        rows = self._log.stored
        for ids in added.values():
            if not stored:
                self._updated.update(ids)
            if self._deleted:
                self._deleted.difference_update(ids)
            if rows:
                for eid in rows.keys() & ids:
                    self._log.rewrite(eid)
        children = self._children
        for parent, ids in added.items():
            ids.sort()
            siblings = children.setdefault(parent, [])
            in_order = not siblings or siblings[-1] < ids[0]
            siblings.extend(ids)
            if not in_order:
                siblings.sort()  # two sorted runs: timsort merges them in linear time
            self._invalidate_up(parent)
            cache = self._buckets.get(parent)
            if cache is not None:
                # Only the buckets with a new child change (a snapshot's page of records
                # in id order fills a few): the others keep their digests.
                cache.stale.update({eid[0] for eid in ids})
        for ids in added.values():
            for eid in children.keys() & ids:
                self._invalidate_down(eid)  # earlier-arrived children may be reachable
        if added:
            self._sorted_ids = None
            self.max_stamp = newest
        if held:
            self.apply(held)

    # -- hashes --------------------------------------------------------------------------

    def root_hash(self) -> bytes:
        """The context's root hash."""
        cached = self._hashes.get(ROOT_ID)  # (asked again per call once computed)
        return cached if cached is not None else self._hash(ROOT_ID, None, 0)

    def entity_hash(self, entity_id: bytes) -> bytes | None:
        """The Merkle hash of a visible entity, or None if hidden or unknown."""
        where = self._resolve(entity_id)
        if not where.visible:
            return None
        return self._hash(entity_id, where.floor, where.depth)

    def node(self, entity_id: bytes) -> NodeInfo:
        """Record, hash and child hashes of one entity (tree comparison walks these)."""
        where = self._resolve(entity_id)
        record = self._records.get(entity_id)
        kind = Kind.OBJECT if entity_id == ROOT_ID else (record.kind if record else None)
        own = self._hash(entity_id, where.floor, where.depth) if where.visible else None
        descend = where.visible and kind in CONTAINERS and where.depth < MAX_DEPTH
        children: list[tuple[bytes, bytes | None]] = []
        for cid in self._children.get(entity_id, ()):
            child = self._records[cid]
            if descend and child.is_live(where.floor):
                floor = where.floor if _undecoded(child) else latest(where.floor, child.removed)
                children.append((cid, self._hash(cid, floor, where.depth + 1)))
            else:
                children.append((cid, None))
        return NodeInfo(record, own, children)

    def _resolve(self, entity_id: bytes) -> _Resolved:
        """Is the entity visible from the root, and under which floor?"""
        if entity_id == ROOT_ID:
            return _Resolved(visible=True, floor=None, depth=0)
        chain: list[Entity] = []
        cursor = entity_id
        while cursor != ROOT_ID:
            record = self._records.get(cursor)
            if record is None or len(chain) >= MAX_DEPTH:
                return _HIDDEN
            chain.append(record)
            cursor = record.parent
        floor: Timestamp | None = None
        parent_kind = Kind.OBJECT
        for record in reversed(chain):
            if parent_kind not in CONTAINERS or not record.is_live(floor):
                return _HIDDEN
            if not _undecoded(record):  # (one held as its row has no removal of its own)
                floor = latest(floor, record.removed)
            parent_kind = record.kind
        return _Resolved(visible=True, floor=floor, depth=len(chain))

    def _hash(self, entity_id: bytes, floor: Timestamp | None, depth: int) -> bytes:
        cached = self._hashes.get(entity_id)
        if cached is not None:
            return cached
        if entity_id == ROOT_ID:
            hasher = hashlib.sha256(ROOT_FORM)
            kind = Kind.OBJECT
        else:
            record = self._records[entity_id]
            # A record still held as its row (`lazy.py`) is hashed from the row's bytes.
            if floor is None and record.__class__ is RowEntity and record.row is not None:
                if record.leaf is not None:  # (a leaf: hashed when it came)
                    return record.leaf
                hasher = _sha256(record.form())
            else:
                hasher = _sha256(_own_form(record, floor))
            kind = record.kind
        if kind in CONTAINERS and depth < MAX_DEPTH:
            children = self._children.get(entity_id, ())
            if len(children) <= BUCKETING_THRESHOLD:
                self._hash_children(hasher, children, floor, depth)
            else:
                # A large container hashes its children in 256 buckets by the first byte of
                # their ids, each cached: one changed child rehashes its bucket (~1/256 of
                # the children), not all of them. Same state, same hash, on every node.
                cache = self._buckets.get(entity_id)
                if cache is None:
                    cache = self._buckets[entity_id] = _Buckets()
                stale = cache.stale
                if len(stale) == 1:  # (one write since: `_hash_buckets`' loop, inline)
                    (bucket,) = stale
                    start = bisect_left(children, _BUCKET_KEYS[bucket])
                    end = (
                        bisect_left(children, _BUCKET_KEYS[bucket + 1], start)
                        if bucket < _LAST_BUCKET
                        else len(children)
                    )
                    if start < end:
                        cache.digests[bucket] = self._bucket_digest(
                            bucket, children[start:end], floor, depth
                        )
                    else:
                        cache.digests[bucket] = b""
                    stale.clear()
                elif stale:
                    self._hash_buckets(cache, children, floor, depth)
                # (An empty bucket's slot is b"": the digests of the non-empty ones, in
                # order, without a loop over 256 buckets per write.)
                hasher.update(b"".join(cache.digests))
        digest = hasher.digest()
        self._hashes[entity_id] = digest
        return digest

    def _hash_buckets(
        self, cache: _Buckets, children: Sequence[bytes], floor: Timestamp | None, depth: int
    ) -> None:
        """Hash the stale buckets of a large container (all of them: one pass over the
        children; a few: a bisection each)."""
        digests = cache.digests
        if len(cache.stale) == _BUCKETS:
            digests[:] = [b""] * _BUCKETS
            start = 0
            while start < len(children):
                bucket = children[start][0]
                end = (
                    bisect_left(children, _BUCKET_KEYS[bucket + 1], start)
                    if bucket < _LAST_BUCKET
                    else len(children)
                )
                digests[bucket] = self._bucket_digest(bucket, children[start:end], floor, depth)
                start = end
        else:
            for bucket in cache.stale:
                start = bisect_left(children, _BUCKET_KEYS[bucket])
                end = (
                    bisect_left(children, _BUCKET_KEYS[bucket + 1], start)
                    if bucket < _LAST_BUCKET
                    else len(children)
                )
                digests[bucket] = (
                    self._bucket_digest(bucket, children[start:end], floor, depth)
                    if start < end
                    else b""
                )
        cache.stale.clear()

    def _bucket_digest(
        self, bucket: int, children: Sequence[bytes], floor: Timestamp | None, depth: int
    ) -> bytes:
        if floor is None:
            # The common bucket after a write: its children's digests are cached but for
            # the one just written (and any tombstone, which joins nothing): those few are
            # filled in, the rest read and joined in C, not a Python step per child (a
            # write to a map of 4,500 entries rehashed ~18 children one at a time, ~370
            # bytecodes of a sequential kv set's ~9,100, issue #16). A cached digest is
            # always a visible record's: every change to a record, or to the removal
            # above it, drops its digest (`apply`, `_invalidate_down`).
            digests: list[bytes | None] = list(map(self._hashes.get, children))
            missing = digests.count(None)
            if missing <= _FILL_MAX:
                at = 0
                for _ in range(missing):
                    at = digests.index(None, at)
                    digests[at] = self._live_digest(children[at], depth)
                joined = b"".join(cast("list[bytes]", digests))  # (none is None now)
                return _sha256(_BUCKET_TAGS[bucket] + joined).digest()
            # A bucket of leaves held as their rows (a snapshot's, a loaded state's): their
            # digests came with them (`RowEntity.leaf`), joined in one step. Any other child
            # (a container or a decoded record: None, or no such slot) hashes the bucket
            # child by child.
            try:
                # (In C: no Python step per child.)
                joined = b"".join(map(_leaf_of, map(self._records.__getitem__, children)))
            except (AttributeError, TypeError):
                pass
            else:
                return _sha256(_BUCKET_TAGS[bucket] + joined).digest()
        inner = _sha256(_BUCKET_TAGS[bucket])
        self._hash_children(inner, children, floor, depth)
        return inner.digest()

    def _live_digest(self, cid: bytes, depth: int) -> bytes:
        """The digest a child at `depth` + 1 adds to its parent's hash under no removal
        above it, b"" if it is not live: one step of `_hash_children`'s loop."""
        child = self._records[cid]
        if child.__class__ is RowEntity and child.row is not None:
            digest = child.leaf
            if digest is None:  # (a container)
                digest = self._hashes.get(cid)
                if digest is None:
                    digest = self._hash(cid, None, depth + 1)
            return digest
        added = child.added
        removed = child.removed
        if added is None or (removed is not None and not added > removed):
            return b""
        digest = self._hashes.get(cid)
        if digest is None:
            if child.kind in CONTAINERS:
                digest = self._hash(cid, removed, depth + 1)
            else:
                digest = self._hashes[cid] = _sha256(_own_form(child, removed)).digest()
        return digest

    def _hash_children(
        self, hasher: Any, children: Sequence[bytes], floor: Timestamp | None, depth: int
    ) -> None:
        records = self._records
        hashes = self._hashes
        for cid in children:
            child = records[cid]
            if floor is None and child.__class__ is RowEntity and child.row is not None:
                # Live, with no removal of its own (`lazy.scan`): a leaf's digest was
                # hashed from its row when it came (`RowEntity.leaf`, by `lazy.take`).
                digest = child.leaf
                if digest is None:  # (a container)
                    digest = hashes.get(cid)
                    if digest is None:
                        digest = self._hash(cid, None, depth + 1)
                hasher.update(digest)
            elif floor is None:
                # (`is_live` and `_hash`'s cache lookup inline: every write rehashes all
                # children of a container of up to BUCKETING_THRESHOLD, issue #16)
                added = child.added
                removed = child.removed
                if added is None or (removed is not None and not added > removed):
                    continue
                digest = hashes.get(cid)
                if digest is None:
                    if child.kind in CONTAINERS:
                        digest = self._hash(cid, removed, depth + 1)
                    else:  # (a leaf: `_hash`'s work, inline)
                        digest = hashes[cid] = _sha256(_own_form(child, removed)).digest()
                hasher.update(digest)
            elif child.is_live(floor):
                digest = hashes.get(cid)
                if digest is None:
                    digest = self._hash(cid, latest(floor, child.removed), depth + 1)
                hasher.update(digest)

    def _invalidate_up(self, entity_id: bytes) -> None:
        # Always walk to the root: a newly visible child has no cached hash of its own,
        # yet its ancestors' cached hashes are stale. Deeper than MAX_DEPTH never counts.
        cursor = entity_id
        for _ in range(MAX_DEPTH + 1):
            self._hashes.pop(cursor, None)
            record = self._records.get(cursor)
            if record is None:
                break
            buckets = self._buckets.get(record.parent)
            if buckets is not None:
                buckets.stale.add(cursor[0])
            cursor = record.parent
        self._hashes.pop(ROOT_ID, None)

    def _invalidate_down(self, entity_id: bytes) -> None:
        # Level by level, each in C: what of a level is cached (its hashes, its buckets)
        # and which of it has children (the next level) are intersections, not a Python
        # step per descendant (a map that arrives after its 50,000 entries: every one).
        hashes = self._hashes
        buckets = self._buckets
        children = self._children
        buckets.pop(entity_id, None)  # its children's liveness may have changed
        level: Sequence[bytes] = children.get(entity_id, ())
        for _ in range(MAX_DEPTH):
            if not level:
                return
            if hashes:
                for cid in hashes.keys() & level:
                    del hashes[cid]
            if buckets:
                for cid in buckets.keys() & level:
                    del buckets[cid]
            level = [c for parent in children.keys() & level for c in children[parent]]

    # -- garbage collection ------------------------------------------------------------

    def gc(self, horizon: int) -> int:
        """Remove tombstones older than NTP64 time `horizon`; returns how many went.

        Drops removed entities (whole subtrees) whose removal is older than the horizon,
        and leaf tombstones of sequences deleted before it. Neither is part of any hash, so
        the root hash is unchanged. Safe only if nothing stamped before the horizon can
        still arrive (the node's GC horizon, default 1 day, bounds that).
        """
        if self.in_place is not None:
            self.in_place.evict()
        dropped = 0
        for eid in list(self._records):
            record = self._records.get(eid)
            if (
                record is not None
                and not _undecoded(record)  # (no removal, no sequence: nothing to collect)
                and record.removed is not None
                and record.removed.time < horizon
                and not record.is_live()
            ):
                dropped += self._drop_subtree(eid)
        for eid, record in self._records.items():
            if _undecoded(record):
                continue
            body = record.body
            if isinstance(body, SequenceState) and (count := body.gc(horizon)):
                dropped += count
                if body.is_empty():
                    record.body = None
                self._mark_updated(eid)
                self._log.rewrite(eid)
                self._invalidate_up(eid)
        return dropped

    def _drop_subtree(self, entity_id: bytes) -> int:
        doomed = [entity_id]
        index = 0
        while index < len(doomed):
            doomed.extend(self._children.get(doomed[index], ()))
            index += 1
        top = self._records[entity_id]
        siblings = self._children[top.parent]
        del siblings[bisect_left(siblings, entity_id)]
        if not siblings:
            del self._children[top.parent]
        self._invalidate_up(top.parent)
        parent_buckets = self._buckets.get(top.parent)
        if parent_buckets is not None:
            parent_buckets.stale.add(entity_id[0])
        for eid in doomed:
            del self._records[eid]
            self._children.pop(eid, None)
            self._hashes.pop(eid, None)
            self._buckets.pop(eid, None)
            self._updated.discard(eid)
            self._deleted.add(eid)
            self._log.rewrite(eid)
        self._sorted_ids = None
        return len(doomed)

    # -- persistence seam ----------------------------------------------------------------

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[bytes, bytes]]) -> StateTree:
        """The tree persisted as `rows` (keys relative to the context; see `rows.py`).

        Raises:
            RemoteProtocolError: a record that does not decode.
            ValueError: a row key that is neither an entity id nor a journal key.
        """
        entities, log = RowLog.load(rows)
        tree = cls()
        tree.add_new(entities)  # decoded here: kept, not copied
        tree.restore_log(log)
        return tree

    def restore_log(self, log: RowLog) -> None:
        """Take the log of the rows this tree's records were loaded from (`RowLog.load`,
        `RowLoad`): loading is not a change."""
        self.drain_changes()
        self._log = log

    @property
    def sealed_rows(self) -> dict[bytes, SealedRow]:
        """Where a local write's sealing leaves the rows of its records (`RowLog.sealed`):
        the next `drain_rows` takes a record's if the record still holds what was sealed."""
        return self._log.sealed

    def drain_rows(self) -> list[Row]:
        """The rows to write or delete (keys relative to the context) for every change
        since the last drain: whole records, or for a Text/Vector just the delta-states
        applied to it (see `rows.py`)."""
        updated, deleted = self._updated, self._deleted
        self._updated, self._deleted = set(), set()  # (the drained sets go as they are)
        return self._log.rows(updated, deleted, self._records.get)

    def rows_replacing(self, old: StateTree) -> list[Row]:
        """Rows that replace every row `old` stored (records and Text/Vector journal rows)
        with this tree's records, written whole; later drains journal against them."""
        self.drain_changes()
        return self._log.replacing(old._log, self._records.values(), old._records)

    def drain_changes(self) -> ChangeSet:
        """Ids updated or deleted since the last call, to write whole (see `drain_rows`)."""
        changes = ChangeSet(frozenset(self._updated), frozenset(self._deleted))
        self._updated.clear()
        self._deleted.clear()
        self._log.forget_pending()
        return changes

    def _mark_updated(self, entity_id: bytes) -> None:
        self._deleted.discard(entity_id)
        self._updated.add(entity_id)

    # -- transactions --------------------------------------------------------------------

    def begin(self, clock: HybridClock, physical: int) -> Transaction:
        """Open a writable transaction stamping with `clock` at NTP64 time `physical`.

        The clock first witnesses the newest stamp in the tree, so every local write orders
        after everything this replica holds. Run one writable transaction at a time.
        """
        # (`Transaction(self, clock, physical)` without calling the class: a call of a class
        # with a Python `__init__` goes through C and a fresh interpreter frame, ~1,000
        # machine instructions, and a transaction is opened per keystroke)
        tx: Transaction = _new(Transaction)
        return tx._open(self, clock, physical)  # noqa: SLF001  # (its initialiser)

    def reader(self) -> Transaction:
        """A read-only transaction (handles bound to it raise on writes)."""
        return Transaction(self, None, 0)
