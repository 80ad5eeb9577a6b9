"""`ContextManager`: one handle on the services that hold this node's contexts.

The work is split by responsibility, one module each:

| module              | service          | what it does                                        |
|---------------------|------------------|-----------------------------------------------------|
| `replicas.py`       | `ReplicaStore`   | which contexts exist; loading one; staging, writing |
| `local_writes.py`   | `LocalWriter`    | create, calls, membership changes by our member     |
| `processing.py`     | `DeltaProcessor` | received deltas: judge, apply, pend, defer, rebuild |
| `pipeline.py`       | `DeltaPipeline`  | the delta processor task: group commit of both      |
| `handler_runs.py`   | `HandlerRunner`  | app event handlers queued by received deltas        |
| `serving.py`        | `SyncServing`    | snapshot pages, tree nodes, merging state, heads    |

This class builds them and exposes their methods under one name, so callers hold one
object; the few queries that belong to no single service live here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trionode.context.app_choice import running_app
from trionode.context.errors import ContextError
from trionode.context.event_log import EventLog
from trionode.context.events import EventHub
from trionode.context.handler_runs import HandlerRunner
from trionode.context.local_writes import (
    DEFAULT_MAX_DELTA_BYTES,
    AppLoader,
    Authored,
    AuthoredSink,
    CallResult,
    LocalWriter,
)
from trionode.context.membership import Membership
from trionode.context.notices import b58
from trionode.context.pipeline import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DELTAS,
    DEFAULT_QUEUE,
    DeltaPipeline,
)
from trionode.context.processing import (
    DeltaProcessor,
    NoMetrics,
    Received,
    ReplicationMetrics,
)
from trionode.context.records import DELTAS
from trionode.context.replicas import DagLimits, Replica, ReplicaStore, stage_state
from trionode.context.serving import StateAheadError, SyncServing
from trionode.context.snapshot_state import SnapshotState
from trionode.crdt import StateTree, ntp64_from_unix
from trionode.crdt.hlc import DEFAULT_DRIFT_TOLERANCE
from trionode.sdk.app import App
from trionode.store.store import AsyncStore, WriteBatch

__all__ = [
    "AppLoader",
    "Authored",
    "CallResult",
    "ContextError",
    "ContextManager",
    "Received",
    "ReplicationMetrics",
    "StateAheadError",
    "b58",
]


class ContextManager:
    def __init__(
        self,
        store: AsyncStore,
        hub: EventHub,
        apps: AppLoader,
        *,
        wall_clock: Callable[[], float] = time.time,
        max_pending: int = 1000,
        max_pending_per_author: int | None = None,
        max_clock_drift: float = DEFAULT_DRIFT_TOLERANCE,
        pending_timeout: float = 300.0,
        metrics: ReplicationMetrics | None = None,
        read_only: bool = False,
        processor_queue: int = DEFAULT_QUEUE,
        group_commit_max_deltas: int = DEFAULT_MAX_DELTAS,
        group_commit_max_bytes: int = DEFAULT_MAX_BYTES,
        event_log: EventLog | None = None,
        authored: AuthoredSink | None = None,
        max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES,
        max_nonfinal_bytes: int | None = None,
    ) -> None:
        self.read_only = read_only
        """`node.mode = "read-only"`: every local write raises ReadOnlyError, received
        deltas queue no handler runs (and queued ones do not run); receiving, sync and
        views are unaffected."""
        self.metrics: ReplicationMetrics = metrics or NoMetrics()
        self.replicas = ReplicaStore(
            store,
            wall_clock=wall_clock,
            limits=DagLimits(max_pending, max_pending_per_author),
            max_clock_drift=max_clock_drift,
        )
        self.writer = LocalWriter(
            self.replicas,
            hub,
            apps,
            read_only=read_only,
            authored=authored,
            max_delta_bytes=max_delta_bytes,
            max_nonfinal_bytes=max_nonfinal_bytes,
        )
        self.processor = DeltaProcessor(
            self.replicas,
            hub,
            self.metrics,
            pending_timeout=pending_timeout,
            read_only=read_only,
            max_nonfinal_bytes=max_nonfinal_bytes,
        )
        self.pipeline = DeltaPipeline(
            self.replicas,
            self.writer,
            self.processor,
            apps,
            hub,
            event_log=event_log,
            queue=processor_queue,
            max_deltas=group_commit_max_deltas,
            max_bytes=group_commit_max_bytes,
        )
        self.membership = Membership(self.writer, self.pipeline)
        self.handlers = HandlerRunner(
            self.replicas, self.writer, apps, self.metrics, self.pipeline, read_only=read_only
        )
        self.serving = SyncServing(self.replicas, self.processor, hub, self.metrics)
        self.snapshots = SnapshotState(self.replicas, self.serving, hub, self.metrics)
        self.store: AsyncStore = store
        self._apps = apps

        replicas, writer, processor, serving = (
            self.replicas,
            self.writer,
            self.processor,
            self.serving,
        )
        # Replica storage.
        self.start = replicas.start
        self.records = replicas.records
        self.get = replicas.get
        self.known_ids = replicas.known_ids
        self.wait_changed = replicas.wait_changed
        self.replica = replicas.load
        self.add_key = replicas.add_key
        self.load_waiting = replicas.load_waiting
        self.deferral_wakeup = replicas.deferral_wakeup
        self.next_release = replicas.next_release
        # Local writes.
        self.create = writer.create
        self.adopt = writer.adopt
        self.delete = writer.delete
        self.execute = self.pipeline.call
        self.change_members = self.membership.change_members
        self.remove_member = self.membership.remove_member
        self.leave = self.membership.leave
        self.revoke_invitation = self.membership.revoke_invitation
        self.admit = self.membership.admit
        self.upgrade = writer.upgrade
        # Delta processing.
        self.receive = self.pipeline.receive
        self.receive_many = self.pipeline.receive_many
        self.release_deferred = processor.release_deferred
        self.expire_pending = processor.expire_pending
        self.missing = processor.missing
        self.undo_log_full = processor.undo_log_full
        self.release_past_folded = processor.release_past_folded
        self.handler_wakeup = processor.handler_wakeup
        self.wake_handlers = processor.wake_handlers
        # Handler runs.
        self.run_pending_handlers = self.handlers.run_pending_handlers
        # Serving sync.
        self.is_fresh = serving.is_fresh
        self.snapshot_running = serving.snapshot_running
        self.snapshot_guard = serving.snapshot_guard
        self.unknown = serving.unknown
        self.applied = serving.applied
        self.capture = serving.capture
        self.heads_vv = serving.heads_vv
        self.peer_rights = serving.peer_rights
        self.snapshot_page = serving.snapshot_page
        self.final_start = serving.final_start
        self.tree_nodes = serving.tree_nodes
        self.subtree_records = serving.subtree_records
        self.merge_state = serving.merge_state
        self.auth_export = serving.auth_export
        self.adopt_auth = serving.adopt_auth
        self.adopt_heads = serving.adopt_heads
        # Streamed snapshots.
        self.snapshot_first_page = self.snapshots.first_page
        self.snapshot_next_page = self.snapshots.next_page
        self.snapshot_hash_view = self.snapshots.hash_view
        self.store_snapshot_batch = self.snapshots.store_batch
        self.check_snapshot_root = self.snapshots.check_root
        self.check_snapshot_certificate = self.snapshots.check_certificate
        self.note_snapshot_acks = self.snapshots.note_acks
        self.announce_snapshot = self.snapshots.announce
        self.discard_snapshot = self.snapshots.discard

    # -- queries ---------------------------------------------------------------------------

    async def state(self, context_id: bytes) -> tuple[bytes, list[bytes], int]:
        """(root hash, heads, pending count) as held in memory now."""
        replica = await self.replicas.load(context_id)
        return replica.tree.root_hash(), sorted(replica.dag.heads), replica.dag.pending_count

    async def state_tree(self, context_id: bytes) -> StateTree:
        """The context's live state tree, for readers that scan it (blob references);
        callers must not change it."""
        return (await self.replicas.load(context_id)).tree

    async def read_delta(self, context_id: bytes, delta_id: bytes) -> bytes | None:
        """A delta's wire bytes; None if we do not hold its body (unknown, or a checkpoint:
        applied here as state from a snapshot or tree comparison, see `adopt_heads`)."""
        return await self.store.get(DELTAS, context_id + delta_id) or None

    async def folded(self, context_id: bytes, ids: Iterable[bytes]) -> set[bytes]:
        """Those of `ids` folded here (context/folding.py): a peer asking for them hears
        "folded", not "missing"."""
        replica = await self.replicas.load(context_id)
        return set(ids) & replica.authority.folded

    async def running_app(self, context_id: bytes, method: str | None = None) -> App:
        """The app whose code serves `method` on the context (`app_choice.running_app`:
        WaitingForApp while the app it moved to is not installed, views excepted)."""
        replica = await self.replicas.load(context_id)
        return await running_app(self._apps, self.replicas, replica, method)

    async def member_key(self, context_id: bytes) -> tuple[bytes, Ed25519PrivateKey]:
        replica = await self.replicas.load(context_id)
        return replica.record.our_member, replica.member_key

    async def keys(self, context_id: bytes) -> dict[int, bytes]:
        replica = await self.replicas.load(context_id)
        return dict(replica.keys)

    async def role(self, context_id: bytes, member: bytes) -> str | None:
        """`member`'s role as resolved from every membership operation held here."""
        replica = await self.replicas.load(context_id)
        return replica.authority.role(member)

    async def roles(self, context_id: bytes) -> dict[bytes, str]:
        replica = await self.replicas.load(context_id)
        return replica.authority.roles()

    # -- GC --------------------------------------------------------------------------------

    async def collect_garbage(self, horizon_unix: float) -> dict[str, int]:
        """Drop tombstones older than `horizon_unix` in every context; persist the result."""
        removed = 0
        contexts = 0
        for record in await self.replicas.records():
            replica: Replica = await self.replicas.load(record.context_id)
            async with replica.lock:
                count = replica.tree.gc(ntp64_from_unix(horizon_unix))
                if not count:
                    continue
                contexts += 1
                removed += count
                batch = WriteBatch()
                stage_state(replica, batch)
                await self.replicas.write(replica, batch)
        return {"tombstonesRemoved": removed, "contexts": contexts}
