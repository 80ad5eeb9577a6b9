"""The final state of a loaded context, kept current in memory (what snapshots and tree
comparison serve; DESIGN §8, issue 17).

Only final state travels unsigned (`SyncServing._boundary`): the base rows (folded
final deltas, and state that arrived as state) joined with the records of the context's
creation. A snapshot announces that state's root hash before its first page, so the
serving member needs the state as a tree. Building it from the base rows costs a decode
of every row, which is seconds per 100,000 entries: done per snapshot (as it was), a
large context could not even start one within the joiner's deadline between messages.

A snapshot served before that tree is built does not wait for it (`open_unbuilt_view`):
its pages are the rows anyway, and the root of the view it serves is hashed beside the
stream and sent with a later page (trionode/sync/snapshot.py, "Root last"). The tree is
still what tree comparison and a resumed snapshot need; the one such a stream hashed is
kept as it (`adopt_view_tree`, with the rows changed since its view opened joined in), so
only the first snapshot after a load hashes the state, not every one.

So the tree is built once per loaded replica, a read of `BUILD_ROWS` rows at a time with a
checkpoint between reads (the node keeps serving, and the snapshot stream sends keep-alives
meanwhile), and from then on every write of a base row joins the same
records into it (`note_base`): folding, a tree comparison's state, a snapshot batch.
Join is idempotent, so a record both read by the build and noted while it ran is
harmless; a build notes the writes made while it runs and joins them at its end. A
discard of the base (`reset`) drops the tree and voids a build that is running.

Pages do not come from the tree: they are the base rows *as stored*, read in key (= id)
order from the cursor, so serving a page decodes and re-encodes nothing. Only the few
entities the creation's records touch (`overlay`) differ from their stored row; their
pages carry the final tree's record instead (see `page`).

**One view per snapshot.** A snapshot announces its root before the first page, and
folding goes on while it streams: pages read from the rows as they are *now* would bring
records the announced root does not hold, the joiner's root check would fail, and the
snapshot would start over (every time, for a large state on a busy member). So a stream
serves a `SnapshotView`: the root, boundary and overlay as of its first page, and the
rows as they were then. Base rows only grow by join, and every write of one passes
`note_base` before it commits, which keeps, for each open view, the row's bytes from
before the first change since the view opened (None: the row did not exist). A page is
the rows read now with those kept bytes put back (`view_page`). Memory is what changed
during the stream, never a copy of the state; a view is closed when its stream ends.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import attrs
import trio

from trionode.context.records import DELTAS
from trionode.crdt import Entity, StateTree, decode_entity, encode_entity
from trionode.crdt.bulk import collector_paused
from trionode.crdt.compact import record_of_row
from trionode.crdt.lazy import take
from trionode.dag.delta import decode_delta, open_delta, stored_header
from trionode.errors import LocalProtocolError, ProtocolError
from trionode.store.lmdb_store import Column

if TYPE_CHECKING:
    from trionode.context.replicas import Replica, ReplicaStore
    from trionode.store.store import AsyncStore

log = logging.getLogger(__name__)

BASE_PREFIX: Final = b"base/"
"""base/ ‖ context ‖ entity id (the rows `replicas.BASE_PREFIX` names)."""
BASE_FILL: Final = (Column.STATE, len(BASE_PREFIX))
"""`fill` for a scan of base rows (`LmdbStore.scan`): a marker (see `replicas.BASE_PREFIX`)
takes its state row, whose key is the base key without its prefix, from the same read
transaction."""
STATE_BASE_PREFIX: Final = b"sbase/"
"""sbase/ ‖ context → b"1": the context's state rows are its base where it has no base row
(see `replicas.BASE_PREFIX`)."""
NO_BASE: Final = b"\xc1"
"""A base row that says "no base" (in a context with `STATE_BASE_PREFIX`: the entity
appeared after its snapshot). msgpack never uses the byte, so no record starts with it."""
BASE_IMPLICIT: Final = (32, NO_BASE)
"""`implicit` for a scan of base rows in a context whose state rows are its base
(`LmdbStore.scan_filled`): state rows of entities (ids of 32 bytes) without a base row
count, `NO_BASE` rows do not."""
BUILD_ROWS: Final = 4096
"""Base rows one read of the build takes (so it never holds them all as bytes at once)."""


@attrs.define
class FinalState:
    """The final state of one context: the tree (for its root, size and Merkle nodes) and
    the sorted ids whose final record is not their stored base row."""

    tree: StateTree
    overlay: list[bytes]
    """Ids of the creation's records, sorted: their record is the tree's, not the row's."""
    creations: frozenset[bytes]
    """The creation deltas whose records are in `tree` (another set means: rebuild)."""


class SnapshotViewLost(LocalProtocolError):
    """The base rows a snapshot view stands on were discarded (or the replica reloaded):
    its stream ends, and the joiner's next session starts a new one."""


@attrs.define(eq=False)
class SnapshotView:
    """The final state as one snapshot's first page saw it (see the module doc)."""

    slot: FinalSlot
    read_base: Callable[[bytes], bytes | None]
    """The stored base row of an id, as it is now."""
    root: bytes | None
    """None: the state was not built when the view opened (`open_unbuilt_view`)."""
    entries: int
    overlay: dict[bytes, bytes]
    """The creation's records (id → encoded final record) as of the first page."""
    creations: frozenset[bytes] = frozenset()
    """The creation deltas whose records are in `overlay`."""
    kept: dict[bytes, bytes | None] = attrs.field(factory=dict)
    """Base rows changed since: their bytes at the first page (None: there was none)."""
    lost: bool = False

    def keep(self, records: Sequence[Entity]) -> None:
        """`records` are about to be joined into their base rows: keep those rows first."""
        kept = self.kept
        for record in records:
            if record.id not in kept:
                kept[record.id] = self.read_base(record.id)

    def close(self) -> None:
        self.slot.views.discard(self)


@attrs.define
class FinalSlot:
    """Per replica: the final state once built, and a build under way."""

    state: FinalState | None = None
    building: trio.Event | None = None
    noted: list[Entity] | None = None
    """Records written to the base while a build runs (joined at its end)."""
    epoch: int = 0
    """Bumped by `reset`: a build started in an older epoch is void."""
    builds: int = 0
    """Builds finished (how often the rows were decoded whole: a test counter)."""
    views: set[SnapshotView] = attrs.field(factory=set)
    """Open snapshot views (each keeps the rows changed under it)."""


def note_base(replica: Replica, records: Sequence[Entity]) -> None:
    """`records` were joined into the base rows (call under the replica's lock, with the
    write): the final state, built or being built, takes them too, and staging the
    replica's state rows looks for markers from now on (`Replica.markers`)."""
    replica.markers = True
    slot = replica.final
    for view in slot.views:
        view.keep(records)
    if slot.state is not None and records:
        tree = slot.state.tree
        tree.apply(records)
        tree.drain_changes()  # a view: nothing of it is ever written
    if slot.noted is not None:
        slot.noted.extend(records)


def reset(replica: Replica) -> None:
    """The base rows were discarded (call under the lock): build again when next needed."""
    slot = replica.final
    slot.state = None
    slot.epoch += 1
    for view in slot.views:
        view.lost = True
    slot.views.clear()


async def final_state(replicas: ReplicaStore, replica: Replica) -> FinalState:
    """The replica's final state, built first if it is not (call *without* its lock: the
    build reads the rows a page at a time while writes go on, and takes the lock only to
    start and to finish)."""
    slot = replica.final
    while True:
        async with replica.lock:
            creations = frozenset(replica.authority.creations)
            if slot.state is not None and slot.state.creations == creations:
                return slot.state
            waiting = slot.building
            start: tuple[list[Entity], frozenset[bytes], int] | None = None
            if waiting is None:
                slot.building = trio.Event()
                slot.noted = []
                overlay = _creation_records(replicas, replica, creations)
                start = (overlay, creations, slot.epoch)
        if start is not None:
            await _build_into(replicas, replica, *start)
        elif waiting is not None:
            await waiting.wait()


async def _build_into(
    replicas: ReplicaStore,
    replica: Replica,
    overlay: list[Entity],
    creations: frozenset[bytes],
    epoch: int,
) -> None:
    slot = replica.final
    building = slot.building
    assert building is not None
    try:
        tree = await _build(replicas, replica.context_id)
        async with replica.lock:
            if slot.epoch != epoch:
                return  # the base was discarded meanwhile: what we read is void
            assert slot.noted is not None
            tree.apply(slot.noted)
            tree.apply(overlay)
            tree.drain_changes()
            slot.state = FinalState(tree, sorted({e.id for e in overlay}), creations)
            slot.builds += 1
    finally:
        slot.building = None
        slot.noted = None
        building.set()


@asynccontextmanager
async def locked_final(replicas: ReplicaStore, replica: Replica) -> AsyncIterator[FinalState]:
    """Hold the replica's lock with its final state current (built first if need be)."""
    while True:
        state = await final_state(replicas, replica)
        async with replica.lock:
            if replica.final.state is state:
                yield state
                return


async def _build(replicas: ReplicaStore, context_id: bytes) -> StateTree:
    """The base rows of `context_id` as a tree. The records are decoded here, so the tree
    keeps them as they are (`add_new`, no copy each), filed one read at a time: the rows
    come in id order, so each read extends the sorted child lists.

    On the event loop, one read at a time with a checkpoint between reads (tens of
    milliseconds each), as a restart loads a replica: in a worker thread the loop sat idle
    while the thread worked, and a test's autojump clock ran virtual time on meanwhile, so
    session deadlines passed during a build of a few dozen rows (two flaky tests)."""
    tree = StateTree()
    store = replicas.store
    for rows in base_pages(store, context_id, state_base=is_state_base(store, context_id)):
        with collector_paused():
            # Most stay their rows' bytes (crdt/lazy.py): the root hashes from those, and
            # pages are served from the rows anyway. Our own rows: their keys are their ids.
            records = [record_of_row(value) for _, value in rows]
            entities, newest = take(records, [entity_id for entity_id, _ in rows])
            tree.add_new(entities, newest=newest)
        # Hashed read by read (the buckets it filled), not in one synchronous step of the
        # whole state when the root is first asked for.
        tree.root_hash()
        del rows, records, entities
        await trio.lowlevel.checkpoint()
    tree.drain_changes()
    return tree


def is_state_base(store: AsyncStore, context_id: bytes) -> bool:
    """Whether the context's state rows are its base where it has no base row (as stored:
    `Replica.state_base` says the same of a loaded replica)."""
    return store.raw.get(Column.GENERIC, STATE_BASE_PREFIX + context_id) is not None


def base_rows(
    store: AsyncStore,
    context_id: bytes,
    after: bytes | None,
    limit: int,
    *,
    state_base: bool,
) -> list[tuple[bytes, bytes]]:
    """Up to `limit` of the context's base records (entity id, record or the state row
    that holds it) in id order, after the id `after` if given: its base rows, a marker as
    its state row, and where the state rows are the base (`state_base`), the state rows of
    entities without a base row, and no `NO_BASE` row (see `replicas.BASE_PREFIX`), read in
    one transaction."""
    prefix = BASE_PREFIX + context_id
    start = None if after is None else prefix + after + b"\x00"
    return store.raw.scan_filled(
        Column.GENERIC,
        prefix=prefix,
        start=start,
        limit=limit,
        fill=BASE_FILL,
        implicit=BASE_IMPLICIT if state_base else None,
    )


def base_pages(
    store: AsyncStore, context_id: bytes, *, state_base: bool
) -> Iterator[list[tuple[bytes, bytes]]]:
    """The base records of `context_id` (`base_rows`), `BUILD_ROWS` at a time."""
    after: bytes | None = None
    while True:
        rows = base_rows(store, context_id, after, BUILD_ROWS, state_base=state_base)
        if rows:
            yield rows
        if len(rows) < BUILD_ROWS:
            return
        after = rows[-1][0]


def _creation_records(
    replicas: ReplicaStore, replica: Replica, creations: frozenset[bytes]
) -> list[Entity]:
    """The records of the context's creation (final, never folded: it is a membership
    operation), read from the bodies held."""
    context_id = replica.context_id
    out: list[Entity] = []
    for delta_id in sorted(creations):
        wire = replicas.store.get_sync(DELTAS, context_id + delta_id)
        if not wire:
            continue
        try:
            delta = decode_delta(wire)
            header = stored_header(delta, context_id=context_id)
            body = open_delta(delta, header, replica.keys[header.key_id])
            out.extend(decode_entity(r) for r in body.records)
        except (KeyError, ProtocolError):
            log.warning("creation %s of %s does not open", delta_id.hex()[:12], context_id.hex())
    return out


def page(
    replicas: ReplicaStore,
    state: FinalState,
    context_id: bytes,
    cursor: bytes | None,
    *,
    max_records: int,
    max_bytes: int,
) -> tuple[list[bytes], bytes | None]:
    """(records, next cursor or None at the end): the final state's records after `cursor`
    in id order, at least one and then up to `max_records`/`max_bytes`. The base rows as
    stored, with the overlay's records (encoded from the tree) merged in their place.
    Read under the replica's lock, with `state` current."""
    store = replicas.store
    rows = base_rows(
        store,
        context_id,
        cursor,
        max_records + 1,
        state_base=is_state_base(store, context_id),
    )
    # A marker row came as its state row: served as the record that holds.
    stored = [(entity_id, record_of_row(value)) for entity_id, value in rows]
    # The overlay's ids up to where the stored rows read reach (all of them after the last
    # row if the rows ran out).
    overlay = state.overlay
    low = 0 if cursor is None else bisect_right(overlay, cursor)
    high = len(overlay) if len(stored) <= max_records else bisect_left(overlay, stored[-1][0])
    merged: list[tuple[bytes, bytes | None]] = [*stored]
    extra = overlay[low:high]
    if extra:
        taken = {entity_id for entity_id, _ in stored}
        merged.extend((entity_id, None) for entity_id in extra if entity_id not in taken)
        merged.sort(key=lambda item: item[0])
    records: list[bytes] = []
    last: bytes | None = None
    size = 0
    overlaid = set(extra)
    for entity_id, stored_value in merged[:max_records]:
        value = stored_value
        if entity_id in overlaid or value is None:
            record = state.tree.get(entity_id)
            assert record is not None
            value = encode_entity(record)
        if records and size + len(value) > max_bytes:
            break
        records.append(value)
        size += len(value)
        last = entity_id
    more = len(records) < len(merged)
    return records, last if more else None


def _base_reader(replicas: ReplicaStore, replica: Replica) -> Callable[[bytes], bytes | None]:
    context_id = replica.context_id
    prefix = BASE_PREFIX + context_id
    get = replicas.store.raw.get

    def read_base(entity_id: bytes) -> bytes | None:
        # The record the row holds now; a marker's (or, where the state rows are the base,
        # no row's) is its state row's (`replicas.BASE_PREFIX`: under the lock, before a
        # write, the two agree).
        stored = get(Column.GENERIC, prefix + entity_id)
        if stored == NO_BASE:
            return None
        if stored == b"" or (stored is None and replica.state_base):
            stored = get(Column.STATE, context_id + entity_id)
        return None if stored is None else record_of_row(stored)

    return read_base


def open_view(replicas: ReplicaStore, replica: Replica, state: FinalState) -> SnapshotView:
    """A view of `state` as it is now (call under the replica's lock, `state` current);
    close it when the stream ends."""
    overlay: dict[bytes, bytes] = {}
    for entity_id in state.overlay:
        record = state.tree.get(entity_id)
        assert record is not None
        overlay[entity_id] = encode_entity(record)
    read_base = _base_reader(replicas, replica)
    root = state.tree.root_hash()
    view = SnapshotView(
        replica.final, read_base, root, len(state.tree), overlay, creations=state.creations
    )
    replica.final.views.add(view)
    return view


def open_unbuilt_view(replicas: ReplicaStore, replica: Replica) -> SnapshotView:
    """A view of the final state as it is now, without building it (call under the
    replica's lock): pages are the base rows anyway, and the few records of the creation
    are joined with their rows here. It has no root (the stream hashes what it serves:
    snapshot_state.SnapshotStream) and its size is the replica's, an estimate."""
    read_base = _base_reader(replicas, replica)
    creations = frozenset(replica.authority.creations)
    creation = _creation_records(replicas, replica, creations)
    joined = StateTree()
    for entity_id in sorted({e.id for e in creation}):
        stored = read_base(entity_id)
        if stored is not None:
            joined.apply([decode_entity(stored)])
    joined.apply(creation)
    overlay: dict[bytes, bytes] = {}
    for entity_id in {e.id for e in creation}:
        record = joined.get(entity_id)
        assert record is not None
        overlay[entity_id] = encode_entity(record)
    view = SnapshotView(
        replica.final, read_base, None, len(replica.tree), overlay, creations=creations
    )
    replica.final.views.add(view)
    return view


def adopt_view_tree(replica: Replica, view: SnapshotView, tree: StateTree) -> bool:
    """`tree` holds every record of `view` (an unbuilt one: its stream hashed it, read by
    read): keep it as the replica's final state, brought up to date with the base rows
    changed since the view opened, so the next snapshot is served from a built state (its
    root with the first page, nothing hashed again) instead of hashing the whole state
    once more. Call under the replica's lock. Not if the view's rows were discarded, the
    context's creation changed, or a final state was built (or is being built) meanwhile:
    whether it was kept."""
    slot = replica.final
    if (
        view.lost
        or slot is not view.slot
        or slot.state is not None
        or slot.building is not None
        or frozenset(replica.authority.creations) != view.creations
    ):
        return False
    # A base row only grows by join (note_base): its record now joins over the one read.
    changed = [view.read_base(entity_id) for entity_id in view.kept]
    tree.apply(decode_entity(record) for record in changed if record is not None)
    tree.drain_changes()  # a view: nothing of it is ever written
    slot.state = FinalState(tree, sorted(view.overlay), view.creations)
    return True


def view_page(
    replicas: ReplicaStore,
    replica: Replica,
    view: SnapshotView,
    cursor: bytes | None,
    *,
    max_records: int,
    max_bytes: int,
    ids: list[bytes] | None = None,
) -> tuple[list[bytes], bytes | None]:
    """Like `page`, from `view`: the rows as they were when it opened (call under the
    replica's lock); the records' ids (their rows' keys) are appended to `ids` if given.
    Raises SnapshotViewLost if its rows were discarded meanwhile."""
    if view.lost or replica.final is not view.slot:
        raise SnapshotViewLost("the state this snapshot serves was discarded")
    kept = view.kept
    stored: list[tuple[bytes, bytes]] = []
    after = cursor
    ended = False
    # Rows new since the view opened are skipped, so a read may bring fewer than it asks
    # for: read on until one row more than a page is known (or the rows end).
    while len(stored) <= max_records and not ended:
        # (A marker row takes its state row, read in the same transaction.)
        rows = base_rows(
            replicas.store,
            replica.context_id,
            after,
            max_records + 1,
            state_base=replica.state_base,
        )
        ended = len(rows) <= max_records
        if kept:
            for entity_id, now in rows:
                value = kept[entity_id] if entity_id in kept else record_of_row(now)
                if value is not None:  # (None: a row new since the view opened)
                    stored.append((entity_id, value))
        else:
            stored += [(entity_id, record_of_row(now)) for entity_id, now in rows]
        if rows:
            after = rows[-1][0]
    overlay = sorted(view.overlay)
    low = 0 if cursor is None else bisect_right(overlay, cursor)
    high = len(overlay) if ended else bisect_left(overlay, stored[-1][0])
    merged = dict(stored)
    for entity_id in overlay[low:high]:
        merged[entity_id] = view.overlay[entity_id]
    ordered = sorted(merged.items()) if high > low else stored
    records: list[bytes] = []
    last: bytes | None = None
    size = 0
    for entity_id, value in ordered[:max_records]:
        if records and size + len(value) > max_bytes:
            break
        records.append(value)
        size += len(value)
        last = entity_id
    if ids is not None:
        ids += [entity_id for entity_id, _ in ordered[: len(records)]]
    more = len(records) < len(ordered) or not ended
    return records, last if more else None
