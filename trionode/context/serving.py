"""State-based sync on a replica: what snapshot and tree-comparison sessions read from it
(pages, Merkle nodes, membership operations) and how they change it (state joined, a
peer's heads adopted as checkpoints).

Records that arrive as state (a snapshot page, a tree comparison's pulls and pushes) are
joined like delta records but belong to no delta. What they cover is told to the DAG by
`adopt_heads`: the source's heads become *checkpoints*, ids applied here whose bodies we do
not hold (an empty row in the delta column, so they survive restarts and are counted
applied on load; `read_delta` answers None, so a peer asking hears "missing"). Every read
here happens under the context lock, so nothing a peer receives can be a change still
being written (and possibly rolled back).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence

import attrs

from trionode.auth.finality import maximal
from trionode.auth.model import WRITERS, Verdict
from trionode.context.authority import AuthRejected, decode_vv, encode_vv
from trionode.context.errors import AlreadyExists
from trionode.context.events import EventHub
from trionode.context.final_state import (
    SnapshotView,
    locked_final,
    open_unbuilt_view,
    open_view,
    page,
    view_page,
)
from trionode.context.notices import publish_change, publish_verdicts
from trionode.context.processing import Applying, DeltaProcessor, ReplicationMetrics
from trionode.context.records import DELTAS, PENDING
from trionode.context.replicas import (
    ACK_PREFIX,
    AUX,
    CHECKPOINT_VV_PREFIX,
    Replica,
    ReplicaStore,
    learn_keys,
    stage_record,
)
from trionode.crdt import Entity, StateTree, encode_entity, max_stamp
from trionode.crdt.hlc import ntp64_seconds
from trionode.dag.delta import (
    GENESIS,
    DeltaHeader,
    SignedDelta,
    decode_delta,
    stored_header,
    verify_delta,
)
from trionode.errors import ProtocolError, RemoteProtocolError
from trionode.store.store import WriteBatch
from trionode.sync.treecmp import FinalSide
from trionode.wire.messages import MAX_IDS

log = logging.getLogger(__name__)

TreeNode = tuple[bytes | None, bytes | None, list[tuple[bytes, bytes | None]], bool]
"""(encoded record, Merkle hash, [(child id, hash)], more children follow)."""


MAX_ACKS_BYTES = 1024 * 1024
"""Signed acks a tree comparison offers at most (well within a frame)."""


class StateAheadError(ProtocolError):
    """Records that arrived as state (a snapshot page, a tree comparison) carry a stamp
    more than `sync.max_clock_drift` ahead of our clock: none of them was joined.

    State cannot wait like a delta (it is not signed by its writers), so it is refused;
    the session fails and a later one, once clocks agree, brings it again."""

    def __init__(self, seconds_ahead: float) -> None:
        super().__init__(f"state stamped {seconds_ahead:.3f}s beyond the allowed clock drift")
        self.seconds_ahead = seconds_ahead


class SyncServing:
    def __init__(
        self,
        replicas: ReplicaStore,
        processor: DeltaProcessor,
        hub: EventHub,
        metrics: ReplicationMetrics,
    ) -> None:
        self._replicas = replicas
        self._processor = processor
        self._hub = hub
        self._metrics = metrics
        self._snapshots_running: set[bytes] = set()
        self._boundaries: dict[bytes, tuple[tuple[int, int], list[bytes]]] = {}

    # -- reading -----------------------------------------------------------------------------

    async def is_fresh(self, context_id: bytes) -> bool:
        """No state at all yet (a joiner before its first sync)."""
        replica = await self._replicas.load(context_id)
        return len(replica.tree) == 0 and not replica.dag.applied

    def snapshot_running(self, context_id: bytes) -> bool:
        return context_id in self._snapshots_running

    def snapshot_guard(self, context_id: bytes) -> _SnapshotGuard:
        """Held while a snapshot is taken for `context_id` (one at a time)."""
        return _SnapshotGuard(self._snapshots_running, context_id)

    async def unknown(self, context_id: bytes, ids: Iterable[bytes]) -> set[bytes]:
        """Those of `ids` neither applied nor pending here."""
        replica = await self._replicas.load(context_id)
        return {i for i in ids if i != GENESIS and not replica.dag.knows(i)}

    async def applied(self, context_id: bytes, ids: Iterable[bytes]) -> set[bytes]:
        """Those of `ids` applied here (checkpoints included)."""
        replica = await self._replicas.load(context_id)
        return {i for i in ids if i in replica.dag.applied}

    async def heads_vv(self, context_id: bytes) -> dict[bytes, int]:
        """The version vector of our heads (what a delta request's `have` tells the peer)."""
        replica = await self._replicas.load(context_id)
        vv, _ = replica.authority.merged_vv(replica.dag.heads)
        return vv

    async def capture(
        self, context_id: bytes, peer_heads: Iterable[bytes]
    ) -> tuple[list[bytes], list[bytes], bytes]:
        """(our heads, which of `peer_heads` we have applied, root hash), read together."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            known = sorted({h for h in peer_heads if h in replica.dag.applied})
            return sorted(replica.dag.heads), known, replica.tree.root_hash()

    async def peer_rights(self, context_id: bytes, member: bytes) -> tuple[bool, bool]:
        """(may write, may change members) for state pushed or served by `member`."""
        replica = await self._replicas.load(context_id)
        role = replica.authority.role(member)
        return role in WRITERS, role == "admin"

    async def snapshot_page(
        self, context_id: bytes, cursor: bytes | None, max_records: int, max_bytes: int
    ) -> tuple[list[bytes], bytes | None, list[bytes], bytes]:
        """(records, next cursor or None at the end, boundary, final root hash): records of
        the *final* state in id order after `cursor`, at least one and then up to
        `max_records`/`max_bytes` (see `_boundary`), as stored (final_state.page)."""
        replica = await self._replicas.load(context_id)
        async with locked_final(self._replicas, replica) as state:
            records, next_cursor = page(
                self._replicas,
                state,
                context_id,
                cursor,
                max_records=max_records,
                max_bytes=max_bytes,
            )
            return records, next_cursor, self._boundary(replica), state.tree.root_hash()

    async def open_snapshot_view(
        self, context_id: bytes, *, unbuilt: bool = False
    ) -> tuple[SnapshotView, list[bytes]]:
        """A view of the final state as of now, for one snapshot stream, and its boundary
        (`_boundary`), read together (close the view when the stream ends). With `unbuilt`,
        a final state not built yet is not waited for: the view has no root
        (`final_state.open_unbuilt_view`)."""
        replica = await self._replicas.load(context_id)
        if unbuilt:
            async with replica.lock:
                state = replica.final.state
                creations = frozenset(replica.authority.creations)
                if state is None or state.creations != creations:
                    view = open_unbuilt_view(self._replicas, replica)
                    return view, self._boundary(replica)
        async with locked_final(self._replicas, replica) as state:
            return open_view(self._replicas, replica, state), self._boundary(replica)

    async def snapshot_view_page(
        self,
        context_id: bytes,
        view: SnapshotView,
        cursor: bytes | None,
        max_records: int,
        max_bytes: int,
        *,
        ids: list[bytes] | None = None,
    ) -> tuple[list[bytes], bytes | None]:
        """(records, next cursor or None at the end) after `cursor`, as `view` saw them;
        their ids are appended to `ids` if given."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            return view_page(
                self._replicas,
                replica,
                view,
                cursor,
                max_records=max_records,
                max_bytes=max_bytes,
                ids=ids,
            )

    async def final_view(self, replica: Replica) -> tuple[StateTree, list[bytes]]:
        """The state a snapshot serves and its boundary (`_boundary`), as of now."""
        async with locked_final(self._replicas, replica) as state:
            return state.tree, self._boundary(replica)

    def _boundary(self, replica: Replica) -> list[bytes]:
        """The checkpoints a snapshot of the final state stands for (§5.5).

        Only *final* state travels unsigned (the final tree, final_state.py: the base rows,
        which hold folded final deltas and state that arrived as state, and the creation's
        records). Every delta whose body we hold — every non-final one among them — is left
        to the joiner's delta sync, signed and encrypted, so it judges them itself; a
        verdict the serving peer would apply under its own (possibly stale) view never
        reaches it.

        The boundary is the checkpoints the joiner adopts: the maximal ones, and those a
        held delta names as parent (so each non-final delta finds its parents applied).
        Built once per change of the held deltas or of the checkpoints (cached); hold the
        lock."""
        context_id = replica.context_id
        authority = replica.authority
        stamp = (len(authority.checkpoint_vv), len(authority.meta))
        cached = self._boundaries.get(context_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        store = self._replicas.store
        parents: set[bytes] = set()
        for delta_id in authority.meta:
            wire = store.get_sync(DELTAS, context_id + delta_id)
            if wire:
                parents.update(stored_header(decode_delta(wire), context_id=context_id).parents)
        checkpoints = authority.checkpoint_vv
        boundary = sorted(maximal(checkpoints) | (parents & set(checkpoints)))
        if len(self._boundaries) > 64:
            self._boundaries.clear()
        self._boundaries[context_id] = (stamp, boundary)
        return boundary

    async def final_start(
        self, context_id: bytes, peer_boundary: Iterable[bytes]
    ) -> tuple[FinalSide, list[bytes]]:
        """Our final side for a tree comparison (final root, FF, boundary: see
        `_boundary`) and which of `peer_boundary` we have applied, read together."""
        replica = await self._replicas.load(context_id)
        acks: list[bytes] = []
        size = 0
        for _, wire in await self._replicas.store.scan(AUX, prefix=ACK_PREFIX + context_id):
            if len(acks) >= MAX_IDS or size + len(wire) > MAX_ACKS_BYTES:
                break
            acks.append(wire)
            size += len(wire)
        async with locked_final(self._replicas, replica) as state:
            tree, boundary = state.tree, self._boundary(replica)
            known = sorted({h for h in peer_boundary if h in replica.dag.applied})
            frontier = dict(replica.authority.finality().final)
            side = FinalSide(tree.root_hash(), frontier, tuple(boundary), tuple(acks))
            return side, known

    async def tree_nodes(
        self,
        context_id: bytes,
        queries: Sequence[tuple[bytes, bytes | None]],
        *,
        max_children: int | None = None,
        max_bytes: int | None = None,
    ) -> list[TreeNode]:
        """For a prefix of `queries` (entity id, list children after this id), in the
        *final* state (final_state.py: only final state is compared unsigned): (encoded
        record, Merkle hash, [(child id, hash)], more children follow). The first query is
        always answered; later ones only within `max_children` and `max_bytes` in total."""
        replica = await self._replicas.load(context_id)
        out: list[TreeNode] = []
        children_left = max_children
        bytes_left = max_bytes
        async with locked_final(self._replicas, replica) as state:
            tree = state.tree
            for entity_id, after in queries:
                info = tree.node(entity_id)
                record = None if info.entity is None else encode_entity(info.entity)
                children = info.children
                if after is not None:
                    children = children[bisect_right(children, after, key=lambda c: c[0]) :]
                if out and (
                    (bytes_left is not None and len(record or b"") > bytes_left)
                    or (children_left is not None and len(children) > children_left)
                ):
                    break
                more = children_left is not None and len(children) > children_left
                if more and children_left is not None:
                    children = children[:children_left]
                out.append((record, info.hash, children, more))
                if children_left is not None:
                    children_left -= len(children)
                if bytes_left is not None:
                    bytes_left -= len(record or b"")
        return out

    async def subtree_records(
        self, context_id: bytes, roots: Iterable[bytes], limit: int
    ) -> tuple[list[bytes], bool]:
        """Encoded final records of `roots` and everything below them (at most `limit`;
        the flag says whether that was all)."""
        replica = await self._replicas.load(context_id)
        records: list[bytes] = []
        async with locked_final(self._replicas, replica) as state:
            tree = state.tree
            work = [r for r in roots if r in tree]
            while work:
                if len(records) >= limit:
                    return records, False
                entity_id = work.pop()
                entity = tree.get(entity_id)
                if entity is not None:
                    records.append(encode_entity(entity))
                work.extend(tree.children(entity_id))
        return records, True

    async def auth_export(
        self, context_id: bytes, heads: Iterable[bytes]
    ) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
        """The signed membership operations in the past of `heads` and the heads' version
        vectors (for a peer about to adopt them as checkpoints)."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            authority = replica.authority
            vvs = [(h, authority.vv_of(h)) for h in heads]
            known = [(h, vv) for h, vv in vvs if vv is not None]
            ops: list[bytes] = []
            for op in sorted(authority.graph.ops.values(), key=lambda o: o.order_key):
                if any(op.in_past_of(vv) for _, vv in known):
                    wire = await self._replicas.store.get(DELTAS, context_id + op.id)
                    if wire:
                        ops.append(wire)
            return ops, [(h, encode_vv(vv)) for h, vv in known]

    # -- changing ----------------------------------------------------------------------------

    async def merge_state(
        self,
        context_id: bytes,
        records: Sequence[Entity],
        *,
        only_if_empty: bool = False,
        extra: Callable[[WriteBatch], None] | None = None,
    ) -> int | None:
        """Join records that arrived as state and persist them (with whatever `extra` adds to
        the batch) in one write. Returns how many entities changed; None, having changed
        nothing, if `only_if_empty` and the context already has state."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            if only_if_empty and len(replica.tree):
                return None
            physical = self._replicas.physical_now()
            newest = max_stamp(list(records))
            excess = 0 if newest is None else replica.clock.excess(newest.time, physical)
            if excess > 0:
                self._metrics.outcome("refused_state_ahead")
                raise StateAheadError(ntp64_seconds(excess))
            changed = replica.tree.apply(records)
            replica.clock.witness(replica.tree.max_stamp, physical)
            batch = WriteBatch()
            self._replicas.stage_base(replica, batch, records)
            stage_record(replica, batch)
            if extra is not None:
                extra(batch)
            await self._replicas.write(replica, batch)
        if changed:
            publish_change(self._hub, replica, delta_id=None, events=[], origin="sync")
        return len(changed)

    async def adopt_auth(
        self, context_id: bytes, ops: Sequence[bytes], vvs: Sequence[tuple[bytes, bytes]]
    ) -> int:
        """Take a peer's membership operations and checkpoint version vectors before adopting
        its heads (see `auth_export`): each op is verified and checked here, in causal
        order, as if it had arrived by gossip. Returns how many ops were new."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            authority = replica.authority
            batch = WriteBatch()
            applying = Applying(replica, batch)
            for head, encoded in vvs:
                if authority.vv_of(head) is None:
                    authority.checkpoint_vv[head] = decode_vv(encoded)
                    batch.put(AUX, CHECKPOINT_VV_PREFIX + context_id + head, encoded)
            received: list[tuple[SignedDelta, DeltaHeader]] = []
            for wire in ops:
                delta = decode_delta(wire)
                header = verify_delta(delta, context_id=context_id)
                if header.auth is None:
                    raise RemoteProtocolError("not a membership operation of this context")
                received.append((delta, header))
            received.sort(key=lambda item: (sum(v for _, v in item[1].vv), item[0].id))
            heads = {head for head, _ in vvs}
            added = 0
            for delta, header in received:
                delta_id = delta.id
                if delta_id in authority.meta:
                    continue
                try:
                    authority.add_op(delta_id, header)
                except AuthRejected as exc:
                    log.warning("refused operation %s: %s", delta_id.hex()[:16], exc)
                    continue
                assert header.auth is not None
                authority.record(delta_id, header)
                if delta_id not in heads:  # the heads themselves: `adopt_heads` marks them
                    # One pending here (it came by gossip, its parents did not) is taken
                    # too: the ops after it in the export build on it.
                    if replica.dag.is_pending(delta_id):
                        batch.delete(PENDING, context_id + delta_id)
                    replica.dag.settle(delta_id)
                batch.put(DELTAS, context_id + delta_id, delta.encode())
                learn_keys(replica, batch, header.auth)
                applying.auth_changed = True
                added += 1
            reverted = self._processor.settle(applying)
            stage_record(replica, batch)
            await self._replicas.write(replica, batch)
        if reverted:
            publish_verdicts(self._hub, replica, reverted)
        return added

    async def adopt_heads(
        self,
        context_id: bytes,
        heads: Sequence[bytes],
        superseded: Iterable[bytes] = (),
        *,
        extra: Callable[[WriteBatch], None] | None = None,
    ) -> tuple[bytes, list[bytes]]:
        """Record a peer's `heads` as checkpoints once this node holds the peer's state as
        of those heads (see `CausalDag.checkpoint`); `superseded` are our heads the peer had
        applied. Pending deltas they cover become applied (their bodies kept, their events
        not run: their effects came as state); pending deltas they unblock apply now.
        Returns the new (root hash, heads)."""
        replica = await self._replicas.load(context_id)
        processor = self._processor
        async with replica.lock:
            batch = WriteBatch()
            applying = Applying(replica, batch)
            marked = [h for h in heads if h != GENESIS and h not in replica.dag.applied]

            def cover(covered: list[tuple[bytes, SignedDelta]]) -> None:
                # Before any delta they unblock is judged: those may stand on the
                # authority these carry. Ops go in causal order (a version vector's sum
                # grows along every causal path).
                judged = [
                    (delta_id, delta, verify_delta(delta, context_id=context_id))
                    for delta_id, delta in covered
                ]
                judged.sort(key=lambda item: (sum(v for _, v in item[2].vv), item[0]))
                for delta_id, delta, header in judged:
                    batch.delete(PENDING, context_id + delta_id)
                    batch.put(DELTAS, context_id + delta_id, delta.encode())
                    if header.auth is not None:
                        try:
                            replica.authority.add_op(delta_id, header)
                        except AuthRejected as exc:
                            log.warning(
                                "covered operation %s refused: %s", delta_id.hex()[:16], exc
                            )
                        applying.auth_changed = True
                        learn_keys(replica, batch, header.auth)
                    replica.authority.record(delta_id, header)
                    applying.fresh[delta_id] = delta  # a rebuild in this batch reads it here
                    if header.auth is None:
                        # Taken as accepted (its effects came as state, if the source had
                        # accepted it), then judged like any delta once every covered op is
                        # in: the source may have filtered it (its records are then not in
                        # the state), and assumed accepted for good, the next rebuild here
                        # would join its records, which no other member holds.
                        replica.authority.verdicts[delta_id] = Verdict.ACCEPTED
                        replica.authority.recheck(header.author)
                        applying.auth_changed = True

            released, covered = replica.dag.checkpoint(
                heads,
                superseded=superseded,
                apply=lambda delta_id, item: processor.apply_one(applying, delta_id, item),
                cover=cover,
            )
            bodies = dict(covered)
            for delta_id in marked:
                if delta_id not in bodies and delta_id not in replica.authority.meta:
                    batch.put(DELTAS, context_id + delta_id, b"")
            reverted = processor.settle(applying)
            stage_record(replica, batch)
            if extra is not None:
                extra(batch)
            await self._replicas.write(replica, batch)
            self._replicas.note_deferred(replica)
        if reverted:
            publish_verdicts(self._hub, replica, reverted)
        processor.after_received(applying, len(released), "cascaded")
        return replica.record.root_hash, list(replica.record.heads)


@attrs.define
class _SnapshotGuard:
    running: set[bytes]
    context_id: bytes

    def __enter__(self) -> None:
        if self.context_id in self.running:
            raise AlreadyExists("a snapshot of this context is already being taken")
        self.running.add(self.context_id)

    def __exit__(self, *_exc: object) -> None:
        self.running.discard(self.context_id)
