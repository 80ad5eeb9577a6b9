"""What a streamed snapshot reads from and writes to a replica (trionode/sync/snapshot.py is
the protocol, trionode/context/snapshot.py runs it).

Serving: the first page comes with the boundary, the number of records, and the finality
certificate — for each AckSet member, the newest thing it signed whose version vector
reaches every boundary checkpoint: its stored signed ack, or (our own) an ack signed now,
or its latest membership operation, or its latest delta whose body we still hold. A
member for which we hold none is left out; the joiner then refuses the snapshot as stale.

Taking: pages arrive as large batches (`store_batch`), each one LMDB write with the
progress marker. Records new to the replica are written as the bytes that came (no
decode/re-encode), once: into an empty replica, the first batch makes its state rows its
base, so they need no base row (`replicas.BASE_PREFIX`: a Text or Vector keeps a copy),
else their base row is a marker for the state row; only a record the replica already held
(a resumed snapshot that restarted over what it has) is joined and re-encoded. The tree's hashes are
built batch by batch, each batch's after its write (only the buckets of a large container
that a batch filled are hashed again: `StateTree.add_new`), so `check_root` at the end
hashes the last batch alone; the record's root is refreshed when the boundary is adopted.
A snapshot that fails its checks is discarded whole (`discard`): state rows, base rows and
the in-memory tree, so the next attempt starts clean.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Final

import attrs
import trio

from trionode.auth.acks import open_ack, sign_ack
from trionode.auth.finality import within
from trionode.auth.model import tag
from trionode.context import join_timeline
from trionode.context.authority import AuthRejected, ContextAuthority, decode_vv
from trionode.context.events import EventHub
from trionode.context.final_state import (
    BASE_PREFIX,
    BUILD_ROWS,
    STATE_BASE_PREFIX,
    SnapshotView,
    adopt_view_tree,
    reset,
)
from trionode.context.notices import publish_change
from trionode.context.processing import ReplicationMetrics
from trionode.context.records import DELTAS, STATE
from trionode.context.replicas import (
    ACK_PREFIX,
    AUX,
    Replica,
    ReplicaStore,
    stage_fresh_bases,
    stage_rows,
    stage_state_base,
)
from trionode.context.serving import StateAheadError, SyncServing
from trionode.crdt import Entity, StateTree, max_stamp
from trionode.crdt.bulk import collector_paused
from trionode.crdt.hlc import Timestamp, ntp64_seconds
from trionode.crdt.lazy import take
from trionode.dag.delta import DeltaHeader, decode_delta, verify_delta
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.store.lmdb_store import Column, PutRun
from trionode.store.store import WriteBatch
from trionode.sync.snapshot import (
    RootMismatch,
    StaleCertificate,
    check_certificate,
    open_certificate,
)
from trionode.wire.messages import MAX_CERTIFICATE, MAX_IDS, MAX_PAGE_RECORDS, SnapshotBegin

log = logging.getLogger(__name__)

Page = tuple[list[bytes], bytes | None]
_id_of: Final = attrgetter("id")


AHEAD_RECORDS: Final = 2 * MAX_PAGE_RECORDS
AHEAD_BYTES: Final = 8 * 1024 * 1024
"""How far the hashing read of a stream (`SnapshotState.hash_view`) may run ahead of the
pages sent from it: records and bytes read and not sent yet. Each is at least what one page
may hold, so a page waiting for its records never waits on a read that waits for it."""


@attrs.define
class SnapshotStream:
    """The view one served snapshot stream reads its pages from (opened by its first page,
    closed when the stream ends, however it ends), and, when that view has no root (the
    final state was not built: `final_state.open_unbuilt_view`) and the stream must send
    one (it resumed after a cursor), the read that hashes the view's state beside the
    stream (`SnapshotState.hash_view`): its root once known, and the records it read that
    the stream has not sent yet, which are the stream's next pages (the rows are read
    once, not once to hash and once to send)."""

    view: SnapshotView | None = None
    root: bytes | None = None
    hashed: trio.Event = attrs.field(factory=trio.Event)
    """Set once `root` is known (at once for a view that has one)."""
    first: list[bytes] = attrs.field(factory=list)
    """The first page's records (sent already: the hashing read starts with them)."""
    after_first: bytes | None = None
    """Where the first page ended (None: it was the last)."""
    read: deque[tuple[bytes, bytes]] = attrs.field(factory=deque)
    """Records (with their ids, in id order) the hashing read read and no page sent yet."""
    read_bytes: int = 0
    read_ended: bool = False
    """The hashing read reached the view's end (what is left to send is in `read`)."""
    sent_to: bytes | None = None
    """The id of the last record a page from `read` took."""
    resumed: bool = False
    """The first page continued an earlier stream after its cursor (cut before its root
    came): the hashing read starts from the first record, and sends what follows the
    first page."""
    hashing: bool = False
    """The view has no root and the stream must send one (it resumed after a cursor
    without its root): `SnapshotState.hash_view` reads and hashes it beside the stream."""
    _moved: trio.Event = attrs.field(factory=trio.Event)

    def open(
        self,
        view: SnapshotView,
        records: list[bytes],
        after: bytes | None,
        *,
        resumed: bool = False,
    ) -> None:
        """Serve from `view`, whose first page held `records` and ended at `after`
        (`resumed`: it started after an earlier stream's cursor)."""
        self.close()
        self.view = view
        self.root = view.root
        if view.root is not None:
            self.hashed.set()
        elif resumed:
            # Only a stream resumed after a cursor without its root is hashed: its root
            # proves that its pages continue the view of those before the cut. A fresh one
            # sends its pages unhashed (see "Root last, or none" in trionode/sync/snapshot.py).
            self.hashing = True
            self.first = []
            self.after_first = self.sent_to = after
            self.resumed = resumed

    @property
    def needs_hashing(self) -> bool:
        return self.view is not None and self.hashing and self.root is None

    @property
    def shared(self) -> bool:
        """The pages after the first come from the hashing read."""
        return self.view is not None and self.hashing

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None

    def _notify(self) -> None:
        self._moved.set()
        self._moved = trio.Event()

    async def push(self, ids: Sequence[bytes], records: Sequence[bytes], *, last: bool) -> None:
        """The hashing read read `records` (`last`: the view ends there); waits first while
        it is as far ahead of the stream as it may be."""
        while len(self.read) >= AHEAD_RECORDS or self.read_bytes >= AHEAD_BYTES:
            await self._moved.wait()
        self.read.extend(zip(ids, records, strict=True))
        self.read_bytes += sum(len(r) for r in records)
        self.read_ended = last
        self._notify()

    async def page(
        self, cursor: bytes | None, max_records: int, max_bytes: int
    ) -> tuple[list[bytes], bytes | None]:
        """The next page from the hashing read: (records, next cursor or None at the end),
        at least one record and then up to `max_records`/`max_bytes` (a whole one unless
        the view ends first)."""
        if cursor is None or cursor != self.sent_to:
            raise LocalProtocolError("the pages of a hashed stream go in order")
        want_records = min(max_records, AHEAD_RECORDS)
        want_bytes = min(max_bytes, AHEAD_BYTES)
        while not self.read_ended and (
            len(self.read) < want_records and self.read_bytes < want_bytes
        ):
            await self._moved.wait()
        records: list[bytes] = []
        size = 0
        last = cursor
        read = self.read
        while read and len(records) < max_records:
            entity_id, value = read[0]
            if records and size + len(value) > max_bytes:
                break
            read.popleft()
            records.append(value)
            size += len(value)
            last = entity_id
        self.read_bytes -= size
        self.sent_to = last
        self._notify()
        return records, last if read or not self.read_ended else None


class SnapshotState:
    def __init__(
        self,
        replicas: ReplicaStore,
        serving: SyncServing,
        hub: EventHub,
        metrics: ReplicationMetrics,
    ) -> None:
        self._replicas = replicas
        self._serving = serving
        self._hub = hub
        self._metrics = metrics

    # -- serving -------------------------------------------------------------------------------

    async def first_page(
        self,
        context_id: bytes,
        cursor: bytes | None,
        resume_root: bytes | None,
        max_records: int,
        max_bytes: int,
        *,
        stream: SnapshotStream | None = None,
        resume_heads: Sequence[bytes] | None = None,
    ) -> tuple[list[bytes], bytes | None, SnapshotBegin]:
        """The first page of a streamed snapshot and its `SnapshotBegin`: from `cursor` if
        the final state still has `resume_root` (or, without one, the boundary is still
        `resume_heads`), else from the first record. The stream's later pages come from
        the view opened here (`stream.view`: see final_state.py); without a `stream`, the
        view serves this page alone."""
        serving = self._serving
        # A stream does not wait for the final state to be built unless it must compare
        # its root: that root comes last.
        by_heads = stream is not None and cursor is not None and resume_root is None
        unbuilt = stream is not None and (cursor is None or by_heads)
        view, boundary = await serving.open_snapshot_view(context_id, unbuilt=unbuilt)
        try:
            if by_heads:
                if resume_heads is None or sorted(resume_heads) != sorted(boundary):
                    cursor = None
            elif cursor is not None and view.root != resume_root:
                cursor = None
            records, next_cursor = await serving.snapshot_view_page(
                context_id, view, cursor, max_records, max_bytes
            )
            certificate = await self.certificate(context_id, boundary)
        except BaseException:
            view.close()
            raise
        if stream is None:
            view.close()
        else:
            stream.open(view, records, next_cursor, resumed=cursor is not None)
        begin = SnapshotBegin(
            heads=boundary[:MAX_IDS],
            root_hash=view.root,
            entries=view.entries,
            certificate=certificate,
            cursor=cursor,
        )
        return records, next_cursor, begin

    async def next_page(
        self,
        context_id: bytes,
        stream: SnapshotStream,
        cursor: bytes | None,
        max_records: int,
        max_bytes: int,
    ) -> tuple[list[bytes], bytes | None]:
        """A later page of the stream whose first page opened `stream`'s view."""
        if stream.view is None:
            raise LocalProtocolError("no snapshot view: the first page opens it")
        if stream.shared:
            return await stream.page(cursor, max_records, max_bytes)
        return await self._serving.snapshot_view_page(
            context_id, stream.view, cursor, max_records, max_bytes
        )

    async def hash_view(self, context_id: bytes, stream: SnapshotStream) -> None:
        """The root of `stream`'s view (one with none: the final state was not built), read
        through the view a read at a time beside the stream, as a build reads the rows; what
        it reads after the first page is what the stream sends next (`SnapshotStream.page`).
        A fresh stream's first page is the start of that read; a resumed one's started
        after an earlier stream's cursor, so the read starts from the first record and
        sends what follows that page."""
        view = stream.view
        if view is None or stream.root is not None:
            raise LocalProtocolError("no view without a root to hash")
        tree = StateTree()

        def hashed(records: list[bytes], ids: list[bytes] | None) -> None:
            with collector_paused():  # a read of records, every one kept (crdt/bulk.py)
                # (Our own rows: their keys are their ids, no hash of each record's.)
                entities, newest = take(records, ids)
                tree.add_new(entities, newest=newest)
            # Hashed read by read (the buckets this read filled: `StateTree.add_new`), never
            # all at once at the end: that was one synchronous step of the whole state (14 s
            # for a million entries under load), the node's event loop stalled and the
            # stream's pages held back meanwhile.
            tree.root_hash()

        sends = stream.after_first is not None  # (else the first page was the last)
        skip = stream.after_first if stream.resumed else None
        hashed(stream.first, None)
        cursor = None if stream.resumed else stream.after_first
        stream.first = []
        more = stream.resumed or cursor is not None
        while more:
            ids: list[bytes] = []
            records, cursor = await self._serving.snapshot_view_page(
                context_id, view, cursor, BUILD_ROWS, 1 << 30, ids=ids
            )
            if sends:
                # Sent before they are hashed: the joiner's work on them overlaps ours.
                if skip is None:
                    await stream.push(ids, records, last=cursor is None)
                else:
                    pairs = [(i, r) for i, r in zip(ids, records, strict=True) if i > skip]
                    await stream.push(
                        [i for i, _ in pairs], [r for _, r in pairs], last=cursor is None
                    )
            hashed(records, ids)
            del records, ids
            more = cursor is not None
        tree.drain_changes()
        root = tree.root_hash()
        # That was a build of the final state, read by read: kept, the next snapshot
        # announces its root at once and hashes nothing (final_state.adopt_view_tree).
        # Before the root goes out with the last page, so the stream never ends first.
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            adopt_view_tree(replica, view, tree)
        stream.root = root
        stream.hashed.set()
        join_timeline.mark("root_hashed")

    async def certificate(self, context_id: bytes, boundary: Sequence[bytes]) -> list[bytes]:
        """The finality certificate of `boundary`."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            authority = replica.authority
            vvs = [vv for vv in (authority.vv_of(h) for h in boundary) if vv]

            def covers(vv: object) -> bool:
                return isinstance(vv, dict) and all(within(b, vv) for b in vvs)

            me = replica.member_key.public_key().public_bytes_raw()
            out: list[bytes] = []
            for member in sorted(authority.finality().ack_set)[:MAX_CERTIFICATE]:
                entry = await self._entry(replica, member, me, covers)
                if entry is not None:
                    out.append(entry)
                else:
                    log.info("no signed ack of %s to certify a snapshot", member.hex()[:12])
            return out

    async def _entry(
        self, replica: Replica, member: bytes, me: bytes, covers: Callable[[object], bool]
    ) -> bytes | None:
        """What `member` signed that reaches the boundary (see the module doc), or None."""
        context_id = replica.context_id
        store = self._replicas.store
        authority = replica.authority
        stored = await store.get(AUX, ACK_PREFIX + context_id + tag(member))
        if stored:
            try:
                ack = open_ack(stored, context_id)
            except RemoteProtocolError:
                ack = None
            if ack is not None and ack.author == member and covers(dict(ack.vv)):
                return stored
        if member == me:
            # The clock is read, not ticked: an ack's hlc only orders one author's acks,
            # and serving a snapshot must not move the stamps of our next writes.
            return sign_ack(
                replica.member_key, context_id, authority.frontier(), replica.clock.last
            )
        ops = [o for o in authority.graph.ops.values() if o.author == member]
        for op in sorted(ops, key=lambda o: o.seq, reverse=True):
            if covers(dict(op.vv)):
                wire = await store.get(DELTAS, context_id + op.id)
                if wire:
                    return wire
            break
        return None

    # -- taking ---------------------------------------------------------------------------------

    async def store_batch(
        self,
        context_id: bytes,
        entities: Sequence[Entity],
        records: Sequence[bytes],
        *,
        only_if_empty: bool = False,
        extra: Callable[[WriteBatch], None] | None = None,
        newest: Timestamp | None = None,
    ) -> int | None:
        """Join a batch of snapshot records (`records` are their wire bytes) and persist them
        with whatever `extra` adds, in one write. Returns how many were new; None, having
        changed nothing, if `only_if_empty` and the context already has state. Raises
        StateAheadError (nothing joined) for stamps beyond the clock drift. `newest`: the
        newest stamp in `entities` if the caller knows it (`lazy.take`)."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            tree = replica.tree
            if only_if_empty and len(tree):
                return None
            physical = self._replicas.physical_now()
            known = newest is not None
            if not known:
                newest = max_stamp(list(entities))
            excess = 0 if newest is None else replica.clock.excess(newest.time, physical)
            if excess > 0:
                self._metrics.outcome("refused_state_ahead")
                raise StateAheadError(ntp64_seconds(excess))
            held_ids = tree.records  # (a dict: no method call per record)
            # The batch's ids, read once (in C) for all that needs them; a join's batches
            # hold none of the tree's, found in one pass in C too.
            ids = list(map(_id_of, entities))
            fresh: Sequence[int]
            held: list[Entity] = []
            if held_ids.keys().isdisjoint(ids):
                fresh = range(len(ids))
            else:
                fresh = [i for i, entity_id in enumerate(ids) if entity_id not in held_ids]
                held = [
                    e for e, entity_id in zip(entities, ids, strict=True) if entity_id in held_ids
                ]
            batch = WriteBatch()
            if fresh:
                if not replica.state_base and not len(tree):
                    # A first batch into an empty replica: its state rows are its base from
                    # now on, and the records new to it write no base row each (half the
                    # rows a join puts: `replicas.BASE_PREFIX`).
                    stage_state_base(self._replicas.store, replica, batch)
                with collector_paused():  # many rows, every one kept (crdt/bulk.py)
                    taken = _take_new(
                        replica, batch, entities, records, fresh, newest=newest if known else None
                    )
                    fresh_ids = [ids[i] for i in fresh] if held else ids
                    stage_fresh_bases(self._replicas.store, replica, batch, *taken, ids=fresh_ids)
            if held:
                tree.apply(held)
                stage_rows(replica, batch, tree.drain_rows())
                self._replicas.stage_base(replica, batch, held)
            replica.clock.witness(tree.max_stamp, physical)
            if extra is not None:
                extra(batch)
            await self._replicas.write(replica, batch)
            if fresh:
                # Hash what this batch brought now, while the next pages are on their way
                # (the buckets it filled: `StateTree.add_new`), so the root check after the
                # last page has only that page to hash, not the whole state.
                tree.root_hash()
        return len(fresh)

    async def check_root(self, context_id: bytes, root: bytes) -> None:
        """Raise RootMismatch unless the replica's state hashes to `root` (the hashes of
        all but the last batch's records were built as they were stored)."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            ours = replica.tree.root_hash()
        if ours != root:
            raise RootMismatch(
                f"the snapshot's records hash to {ours.hex()[:12]}, not {root.hex()[:12]}"
            )

    def check_certificate(
        self,
        context_id: bytes,
        certificate: Sequence[bytes],
        ops: Sequence[bytes],
        vvs: Sequence[tuple[bytes, bytes]],
        boundary: Sequence[bytes],
    ) -> dict[bytes, dict[bytes, int]]:
        """Check the certificate before anything of the responder's auth answer (`ops`,
        the checkpoints' `vvs`) touches the replica: our own resolution of those signed ops
        must find every AckSet member acknowledging every checkpoint of `boundary`. Returns
        the acks (member → vector); raises ForgedCertificate or StaleCertificate."""
        acks = open_certificate(certificate, context_id)
        scratch = ContextAuthority()
        for head, encoded in vvs:
            scratch.checkpoint_vv[head] = decode_vv(encoded)
        received: list[tuple[bytes, DeltaHeader]] = []
        for wire in ops:
            delta = decode_delta(wire)
            header = verify_delta(delta, context_id=context_id)
            if header.context_id != context_id or header.auth is None:
                raise RemoteProtocolError("not a membership operation of this context")
            received.append((delta.id, header))
        received.sort(key=lambda item: (sum(v for _, v in item[1].vv), item[0]))
        for delta_id, header in received:
            try:
                scratch.add_op(delta_id, header)
            except AuthRejected:
                continue  # adopt_auth refuses it too; the resolution goes on without it
        checkpoints: dict[bytes, dict[bytes, int]] = {}
        for head in boundary:
            vv = scratch.vv_of(head)
            if vv is None:
                raise StaleCertificate(f"no version vector for checkpoint {head.hex()[:12]}")
            checkpoints[head] = dict(vv)
        check_certificate(scratch.resolution(), acks, checkpoints)
        return acks

    async def note_acks(self, context_id: bytes, acks: dict[bytes, dict[bytes, int]]) -> None:
        """Count a checked certificate's acks here (finality moves before any gossip)."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            for member, vv in acks.items():
                replica.authority.note_ack(member, vv)

    async def announce(self, context_id: bytes) -> None:
        """Tell subscribers the state a snapshot brought is in (one change event, origin
        "sync", once it is adopted: the batches themselves announce nothing)."""
        replica = await self._replicas.load(context_id)
        publish_change(self._hub, replica, delta_id=None, events=[], origin="sync")

    async def discard(self, context_id: bytes) -> bool:
        """Drop what snapshots brought (state rows, base rows, the in-memory tree) if the
        replica holds nothing else (no delta applied); whether it did."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            meta = replica.authority.meta
            if any(i not in meta or not meta[i].op for i in replica.dag.applied):
                return False  # it holds data deltas: not only what snapshots brought
            store = self._replicas.store
            batch = WriteBatch()
            for key, _ in await store.raw_scan(Column.STATE, prefix=context_id):
                batch.delete(STATE, key)
            for key, _ in await store.scan(AUX, prefix=BASE_PREFIX + context_id):
                batch.delete(AUX, key)
            batch.delete(AUX, STATE_BASE_PREFIX + context_id)
            replica.state_base = False
            replica.tree = StateTree()
            reset(replica)
            await self._replicas.write(replica, batch)
        publish_change(self._hub, replica, delta_id=None, events=[], origin="sync")
        return True


def _take_new(
    replica: Replica,
    batch: WriteBatch,
    entities: Sequence[Entity],
    records: Sequence[bytes],
    fresh: Sequence[int],
    *,
    newest: Timestamp | None,
) -> tuple[Sequence[Entity], Sequence[bytes]]:
    """File the records at `fresh` (new to the replica) into its tree and stage their rows;
    returns those records (entities and bytes)."""
    context_id = replica.context_id
    tree = replica.tree
    if len(fresh) < len(entities):
        entities = [entities[i] for i in fresh]
        records = [records[i] for i in fresh]
    # Made for this batch alone (most kept as their rows: crdt/lazy.py): the tree keeps
    # them without a copy. Their rows are the bytes that came: nothing to drain or
    # re-encode (`stored`). (Every earlier change was drained by its own commit.)
    tree.add_new(entities, newest=newest, stored=True)
    tree.drain_changes()
    # The bytes that came, in key order, as one op (no object per row): the store writes
    # them in one putmulti. (Their base rows: `stage_fresh_bases`, by the caller.)
    batch.ops.append(PutRun(STATE.column, context_id, list(map(_id_of, entities)), records))
    return entities, records
