"""Contexts: create, list, show, delete; local calls and received deltas.

A context's state lives in memory as a `StateTree` (loaded from the `state` column the
first time it is used) beside its causal DAG and HLC. A local call runs against a
copy-on-write transaction; on success its delta records become one signed, encrypted delta
whose parents are the current heads. A received delta is verified (id and signature on
arrival; author membership and write rights when it is applied, because the membership
that admits a new author may itself still be on its way), decrypted, and joined.

Either way, the changed entity rows, the delta, the new heads and root hash, the pending
set and any event-handler runs it triggers commit in one LMDB write. If that write fails,
the in-memory copy is dropped and reloaded from the store, so memory never runs ahead of
disk. One writer at a time per context (a trio.Lock).
"""

from __future__ import annotations

import json
import logging
import os
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Final, Protocol

import attrs
import base58
import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from trionode.auth.model import WRITERS, Kind, StaticError, Verdict
from trionode.context.authority import (
    AuthRejected,
    ContextAuthority,
    action,
    decode_vv,
    encode_vv,
    op_from_header,
)
from trionode.context.events import EventHub
from trionode.context.invitations import SignedInvitation, open_keys, seal_keys
from trionode.context.records import (
    CONTEXTS,
    DELTAS,
    HANDLER_PREFIX,
    HANDLER_RUNS,
    IDENTITY,
    PENDING,
    STATE,
    ContextRecord,
    HandlerRun,
    MemberRecord,
    PendingRecord,
    key_slot,
    member_slot,
)
from trionode.crdt import (
    Entity,
    HybridClock,
    StateTree,
    Timestamp,
    decode_entities,
    decode_entity,
    encode_entity,
    max_stamp,
    ntp64_from_unix,
)
from trionode.crdt.hlc import DEFAULT_DRIFT_TOLERANCE, ntp64_duration, ntp64_seconds
from trionode.crdt.rows import Row
from trionode.dag.dag import CausalDag, Defer
from trionode.dag.delta import (
    GENESIS,
    AppEvent,
    AuthAction,
    DeltaBody,
    DeltaHeader,
    SignedDelta,
    decode_delta,
    key_id_of,
    open_delta,
    seal_delta,
    stored_header,
    verify_delta,
)
from trionode.errors import (
    ProtocolError,
    ReadOnlyError,
    RemoteProtocolError,
    StorageError,
    TrionodeError,
)
from trionode.sdk.app import App, EntryKind
from trionode.sdk.errors import AppError
from trionode.sdk.runtime import CallOutcome, execute, init_state, run_handler
from trionode.store.lmdb_store import Column, Delete
from trionode.store.store import AsyncStore, BytesCodec, Table, WriteBatch

log = logging.getLogger(__name__)

_CLOCK_SLACK = 0.001
"""Seconds added to a wait for the clock, so the wall clock has surely moved on by then."""
AUX = Table(Column.GENERIC, BytesCodec(), BytesCodec())
BASE_PREFIX = b"base/"
"""base/ ‖ context ‖ entity id → the join of every record that arrived as *state* (snapshot
pages, tree comparison): what a rebuild starts from, as no delta body carries it."""
STORAGE_FORMAT: Final = 2
"""2: deltas carry sequence numbers, version vectors and membership operations."""
FORMAT_TABLE = Table(Column.META, BytesCodec(), BytesCodec())
FORMAT_KEY: Final = b"context-format"
CHECKPOINT_VV_PREFIX = b"ckvv/"
"""ckvv/ ‖ context ‖ delta id → the version vector of a checkpoint (as its source said)."""


class ContextError(TrionodeError):
    """A request about a context cannot be served; `status` is the HTTP status to use."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class StateAheadError(ProtocolError):
    """Records that arrived as state (a snapshot page, a tree comparison) carry a stamp
    more than `sync.max_clock_drift` ahead of our clock: none of them was joined.

    State cannot wait like a delta (it is not signed by its writers), so it is refused;
    the session fails and a later one, once clocks agree, brings it again."""

    def __init__(self, seconds_ahead: float) -> None:
        super().__init__(f"state stamped {seconds_ahead:.3f}s beyond the allowed clock drift")
        self.seconds_ahead = seconds_ahead


@attrs.define
class _Loaded:
    record: ContextRecord
    tree: StateTree
    dag: CausalDag[SignedDelta]
    clock: HybridClock
    member_key: Ed25519PrivateKey
    keys: dict[int, bytes]
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    authority: ContextAuthority = attrs.field(factory=ContextAuthority)

    @property
    def context_id(self) -> bytes:
        return self.record.context_id


@attrs.frozen
class CallResult:
    result: Any
    delta_id: bytes | None
    root_hash: bytes


@attrs.frozen
class Received:
    """What became of a received delta."""

    applied: list[bytes]
    """Ids applied now (the delta and any pending ones it released), in causal order."""
    missing: frozenset[bytes]
    """Parents nobody has sent us: ask the sender for these."""
    duplicate: bool = False
    rejected: list[tuple[bytes, str]] = attrs.field(factory=list)
    """(id, reason) of deltas refused when they became applicable."""
    refused: list[bytes] = attrs.field(factory=list)
    """Valid deltas stamped more than drift + pending timeout ahead of our clock: neither
    stored nor remembered, so the same delta is welcome again once clocks agree."""


class AppLoader(Protocol):
    async def load(self, application_id: bytes) -> App:
        """The App to run (ContextError if it is not installed or cannot be trusted)."""
        ...


class DeltaListener(Protocol):
    def __call__(self, context_id: bytes, delta: SignedDelta) -> None: ...


class ReplicationMetrics(Protocol):
    def outcome(self, outcome: str, n: int = 1) -> None: ...
    def pending_depth(self, depth: int) -> None: ...
    def heads(self, count: int) -> None: ...
    def handler_run(self, *, ok: bool) -> None: ...


class _NoMetrics:
    def outcome(self, outcome: str, n: int = 1) -> None:
        pass

    def pending_depth(self, depth: int) -> None:
        pass

    def heads(self, count: int) -> None:
        pass

    def handler_run(self, *, ok: bool) -> None:
        pass


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
    ) -> None:
        self._store = store
        self.read_only = read_only
        """`node.mode = "read-only"`: every local write raises ReadOnlyError, received
        deltas queue no handler runs (and queued ones do not run); receiving, sync and
        views are unaffected."""
        self._hub = hub
        self._apps = apps
        self._wall_clock = wall_clock
        self._max_pending = max_pending
        self._max_pending_per_author = max_pending_per_author
        self._max_clock_drift = max_clock_drift
        self._max_wait = ntp64_duration(pending_timeout)
        """How far beyond the drift a delta's stamps may lead and it still waits."""
        self._deferred = trio.Event()
        """Set when a delta starts waiting for the clock (see `serve_clock_waits`)."""
        self.metrics: ReplicationMetrics = metrics or _NoMetrics()
        self._loaded: dict[bytes, _Loaded] = {}
        self._known: set[bytes] = set()
        self._load_lock = trio.Lock()
        self.local_delta_listeners: list[DeltaListener] = []
        """Called (synchronously, after commit) with every delta this node authors."""
        self.handler_runs_queued = trio.Event()
        self._handler_lock = trio.Lock()
        self._snapshots_running: set[bytes] = set()

    async def start(self) -> None:
        """Learn which contexts exist; their state loads lazily on first use.

        Raises StorageError for contexts stored by a trionode whose delta format this one
        cannot read (format 1: membership in the state, no sequence numbers)."""
        records = await self.records()
        stored = await self._store.get(FORMAT_TABLE, FORMAT_KEY)
        if stored is None and records:
            raise StorageError(
                f"this home holds {len(records)} context(s) in storage format 1, which this "
                f"trionode (format {STORAGE_FORMAT}) cannot read: start from a new home "
                "(`trionode init --home NEW`) and share the contexts again"
            )
        if stored is not None and stored != str(STORAGE_FORMAT).encode():
            raise StorageError(
                f"this home's contexts are in storage format {stored.decode(errors='replace')}, "
                f"and this trionode reads format {STORAGE_FORMAT}: use a matching trionode"
            )
        if stored is None:
            await self._store.put(FORMAT_TABLE, FORMAT_KEY, str(STORAGE_FORMAT).encode())
        self._known = {record.context_id for record in records}

    # -- queries ---------------------------------------------------------------------------

    async def records(self) -> list[ContextRecord]:
        return [record for _, record in await self._store.scan(CONTEXTS)]

    async def get(self, context_id: bytes) -> ContextRecord:
        record = await self._store.get(CONTEXTS, context_id)
        if record is None:
            raise ContextError(f"no context {b58(context_id)}", status=404)
        return record

    def known_ids(self) -> set[bytes]:
        return set(self._known)

    async def state(self, context_id: bytes) -> tuple[bytes, list[bytes], int]:
        """(root hash, heads, pending count) as held in memory now."""
        loaded = await self._context(context_id)
        return loaded.tree.root_hash(), sorted(loaded.dag.heads), loaded.dag.pending_count

    async def read_delta(self, context_id: bytes, delta_id: bytes) -> bytes | None:
        """A delta's wire bytes; None if we do not hold its body (unknown, or a checkpoint:
        applied here as state from a snapshot or tree comparison, see `adopt_heads`)."""
        return await self._store.get(DELTAS, context_id + delta_id) or None

    async def member_key(self, context_id: bytes) -> tuple[bytes, Ed25519PrivateKey]:
        loaded = await self._context(context_id)
        return loaded.record.our_member, loaded.member_key

    async def keys(self, context_id: bytes) -> dict[int, bytes]:
        loaded = await self._context(context_id)
        return dict(loaded.keys)

    async def role(self, context_id: bytes, member: bytes) -> str | None:
        """`member`'s role as resolved from every membership operation held here."""
        loaded = await self._context(context_id)
        return loaded.authority.role(member)

    async def roles(self, context_id: bytes) -> dict[bytes, str]:
        loaded = await self._context(context_id)
        return loaded.authority.roles()

    # -- lifecycle -------------------------------------------------------------------------

    async def create(
        self, application_id: bytes, init_args_json: str | None = None
    ) -> ContextRecord:
        """A new context running `application_id`, with this node's new member as admin."""
        self._writable("creating a context")
        app = await self._apps.load(application_id)
        context_id = os.urandom(32)
        member_key = Ed25519PrivateKey.generate()
        member = member_key.public_key().public_bytes_raw()
        context_key = os.urandom(32)
        tree = StateTree()
        clock = HybridClock(member, self._max_clock_drift)
        now = self._physical_now()
        outcome = init_state(
            app, tree, clock, now, init_args_json, executor=member, context_id=context_id
        )
        key_id = key_id_of(context_key)
        record = ContextRecord(
            context_id=context_id,
            application_id=application_id,
            created_at=self._wall_clock(),
            root_hash=tree.root_hash(),
            heads=[],
            key_id=key_id,
            members=[],
            our_member=member,
        )
        loaded = _Loaded(
            record,
            tree,
            self._new_dag(),
            clock,
            member_key,
            {key_id: context_key},
        )
        batch = WriteBatch()
        batch.put(IDENTITY, key_slot(context_id, key_id), context_key)
        batch.put(IDENTITY, member_slot(context_id, member), member_key.private_bytes_raw())
        # The genesis delta is the Create operation (its author the first admin) and carries
        # the app's initial state.
        delta, parents = self._seal(loaded, outcome, auth=action(Kind.CREATE, key_id=key_id))
        self._stage(loaded, batch, delta, parents)
        await self._store.write(batch)
        self._loaded[context_id] = loaded
        self._known.add(context_id)
        self._after_local(loaded, delta, outcome)
        return loaded.record

    async def adopt(
        self,
        *,
        context_id: bytes,
        application_id: bytes,
        member_key: Ed25519PrivateKey,
        keys: dict[int, bytes],
        key_id: int,
    ) -> ContextRecord:
        """Record a context this node joined (state arrives by sync and gossip)."""
        if context_id in self._known:
            raise ContextError(f"already a member of {b58(context_id)}", status=409)
        await self._apps.load(application_id)
        member = member_key.public_key().public_bytes_raw()
        record = ContextRecord(
            context_id=context_id,
            application_id=application_id,
            created_at=self._wall_clock(),
            root_hash=StateTree().root_hash(),
            heads=[],
            key_id=key_id,
            members=[],
            our_member=member,
        )
        batch = WriteBatch()
        for kid, key in keys.items():
            batch.put(IDENTITY, key_slot(context_id, kid), key)
        batch.put(IDENTITY, member_slot(context_id, member), member_key.private_bytes_raw())
        batch.put(CONTEXTS, context_id, record)
        await self._store.write(batch)
        self._known.add(context_id)
        return record

    async def add_key(self, context_id: bytes, key_id: int, key: bytes) -> None:
        loaded = await self._context(context_id)
        async with loaded.lock:
            loaded.keys[key_id] = key
            if key_id > loaded.record.key_id:
                loaded.record = replace(loaded.record, key_id=key_id)
            batch = WriteBatch()
            batch.put(IDENTITY, key_slot(context_id, key_id), key)
            batch.put(CONTEXTS, context_id, loaded.record)
            await self._store.write(batch)

    async def delete(self, context_id: bytes) -> None:
        await self.get(context_id)
        loaded = self._loaded.pop(context_id, None)
        if loaded is not None:
            await loaded.lock.acquire()  # let an in-flight call finish first
        batch = WriteBatch()
        batch.delete(CONTEXTS, context_id)
        for column in (Column.STATE, Column.DELTA, Column.IDENTITY, Column.PENDING):
            for key, _ in await self._store.raw_scan(column, prefix=context_id):
                batch.ops.append(Delete(column, key))
        for key, _ in await self._store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX + context_id):
            batch.delete(HANDLER_RUNS, key)
        await self._store.write(batch)
        self._known.discard(context_id)
        self._hub.forget(b58(context_id))

    # -- local calls -----------------------------------------------------------------------

    async def execute(
        self, context_id: bytes, method: str, args_json: str, *, executor: bytes | None = None
    ) -> CallResult:
        loaded = await self._context(context_id)
        if executor is not None and executor != loaded.record.our_member:
            raise ContextError("this node holds no key for that executor", status=403)
        app = await self._apps.load(loaded.record.application_id)
        if self.read_only:
            entry = app.entry(method)
            # An unknown method falls through to the runtime's own "no such method" error.
            if entry is not None and entry.kind is not EntryKind.VIEW:
                raise ReadOnlyError(f"calling {method!r} (only views run)")
        async with loaded.lock:
            role = loaded.authority.role(loaded.record.our_member)
            if role is None:
                raise ContextError("this node is not (or no longer) a member", status=403)
            outcome = execute(
                app,
                loaded.tree,
                loaded.clock,
                self._physical_now(),
                method,
                args_json,
                executor=loaded.record.our_member,
                context_id=context_id,
                writable=role in WRITERS,
            )
            if not outcome.delta_records and not outcome.events:
                return CallResult(outcome.result, None, loaded.tree.root_hash())
            delta = await self._commit_local(loaded, outcome)
            return CallResult(outcome.result, delta.id, loaded.tree.root_hash())

    async def change_members(
        self, context_id: bytes, changes: list[tuple[bytes, str | None]]
    ) -> SignedDelta:
        """As an admin: grant roles (role) or remove members (None), one operation each;
        returns the last one's delta."""
        self._writable("changing roles")
        if not changes:
            raise ContextError("no membership changes given")
        last: SignedDelta | None = None
        for member, role in changes:
            if role is None:
                last = await self.remove_member(context_id, member)
            else:
                loaded = await self._context(context_id)
                async with loaded.lock:
                    last = await self._commit_op(
                        loaded, action(Kind.GRANT, member=member, role=role)
                    )
        assert last is not None
        return last

    async def remove_member(self, context_id: bytes, member: bytes) -> SignedDelta:
        """As an admin: remove `member`; the operation introduces a new key, sealed to every
        remaining member (the removed one cannot open it). Deltas written concurrently with
        the removal by `member` are filtered on every node (`trionode.auth.model`)."""
        self._writable("removing a member")
        loaded = await self._context(context_id)
        async with loaded.lock:
            current = loaded.authority.roles()
            if current.get(loaded.record.our_member) != "admin":
                raise ContextError("only admins can remove members", status=403)
            if member not in current:
                raise ContextError("not a member", status=404)
            if member == loaded.record.our_member:
                raise ContextError("an admin cannot remove itself: leave instead", status=400)
            keep = [m for m in current if m != member]
            return await self._commit_op(
                loaded, self._new_key_action(loaded, Kind.REMOVE, keep, member)
            )

    async def leave(self, context_id: bytes) -> SignedDelta:
        """Leave the context (refused for its last admin: appoint another first)."""
        self._writable("leaving a context")
        loaded = await self._context(context_id)
        async with loaded.lock:
            return await self._commit_op(loaded, action(Kind.LEAVE))

    async def revoke_invitation(self, context_id: bytes, invitation_id: bytes) -> SignedDelta:
        """As an admin: no admission may spend this invitation after this operation."""
        self._writable("revoking an invitation")
        loaded = await self._context(context_id)
        async with loaded.lock:
            return await self._commit_op(loaded, action(Kind.REVOKE, invitation_id=invitation_id))

    async def admit(
        self, context_id: bytes, invitation: SignedInvitation, member: bytes, role: str
    ) -> SignedDelta:
        """Spend `invitation` on `member` in the replicated state: every node refuses a
        second spend once it holds this one (raises ContextError if already spent)."""
        self._writable("admitting a member")
        loaded = await self._context(context_id)
        async with loaded.lock:
            return await self._commit_op(
                loaded,
                action(
                    Kind.ADMIT,
                    member=member,
                    role=role,
                    invitation=invitation.invitation,
                    invitation_signature=invitation.signature,
                ),
            )

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(what)

    def _new_key_action(
        self, loaded: _Loaded, kind: Kind, recipients: Iterable[bytes], member: bytes | None = None
    ) -> AuthAction:
        new_key = os.urandom(32)
        new_id = key_id_of(new_key)
        loaded.keys[new_id] = new_key  # (dropped with the context if the commit fails)
        box = [(m, seal_keys({new_id: new_key}, m)) for m in sorted(recipients)]
        return action(kind, member=member, key_id=new_id, key_box=box)

    async def _commit_op(self, loaded: _Loaded, auth: AuthAction) -> SignedDelta:
        """Seal, check and commit one membership operation of ours (under the lock)."""
        outcome = CallOutcome(b"null", [], [])
        delta, parents = self._seal(loaded, outcome, auth=auth)
        header = verify_delta(delta)
        try:
            loaded.authority.graph.check(op_from_header(delta.id, header))
        except (StaticError, AuthRejected) as exc:
            raise ContextError(str(exc), status=403) from None
        batch = WriteBatch()
        if auth.key_id is not None and auth.key_id in loaded.keys:
            batch.put(IDENTITY, key_slot(loaded.context_id, auth.key_id), loaded.keys[auth.key_id])
        self._stage(loaded, batch, delta, parents)
        await self._write_or_reload(loaded, batch)
        self._after_local(loaded, delta, outcome)
        return delta

    def _learn_keys(self, loaded: _Loaded, batch: WriteBatch, auth: AuthAction) -> None:
        """Open a new key an operation sealed to us; it becomes our write key."""
        if auth.key_id is None or auth.key_id in loaded.keys:
            return
        for member, sealed in auth.key_box:
            if member != loaded.record.our_member:
                continue
            try:
                key = open_keys(sealed, loaded.member_key)[auth.key_id]
            except (ProtocolError, KeyError):
                return
            loaded.keys[auth.key_id] = key
            batch.put(IDENTITY, key_slot(loaded.context_id, auth.key_id), key)
            loaded.record = replace(loaded.record, key_id=auth.key_id)
            return

    async def _ensure_write_key(self, loaded: _Loaded) -> None:
        """If no key we hold follows every removal in our view (concurrent removals, a
        leaked invitation, or a removal whose key was not sealed to us), introduce one."""
        if self._write_key(loaded) is None:
            roles = loaded.authority.roles()
            await self._commit_op(loaded, self._new_key_action(loaded, Kind.ROTATE, roles))

    async def _commit_local(self, loaded: _Loaded, outcome: CallOutcome) -> SignedDelta:
        await self._ensure_write_key(loaded)
        delta, parents = self._seal(loaded, outcome)
        batch = WriteBatch()
        self._stage(loaded, batch, delta, parents)
        await self._write_or_reload(loaded, batch)
        self._after_local(loaded, delta, outcome)
        return delta

    def _after_local(self, loaded: _Loaded, delta: SignedDelta, outcome: CallOutcome) -> None:
        self._publish(loaded, delta, [(e.name, e.payload) for e in outcome.events], "local")
        for listener in self.local_delta_listeners:
            listener(loaded.context_id, delta)

    # -- received deltas -------------------------------------------------------------------

    async def receive(self, context_id: bytes, wire: bytes) -> Received:
        """Take a delta from a peer (gossip or sync). Raises ProtocolError for a bad one."""
        if context_id not in self._known:
            raise ContextError(f"not a member of {b58(context_id)}", status=404)
        delta = decode_delta(wire)
        header = verify_delta(delta)
        if header.context_id != context_id:
            raise RemoteProtocolError("delta belongs to another context")
        loaded = await self._context(context_id)
        if self._too_far_ahead(loaded, header.hlc, self._physical_now()):
            # Checked before anything is stored: such a delta may be valid later.
            self._refuse_ahead(context_id, delta.id)
            return Received([], frozenset(), refused=[delta.id])
        async with loaded.lock:
            batch = WriteBatch()
            applying = _Applying(loaded, batch)
            offer = loaded.dag.offer(
                delta.id,
                header.parents,
                delta,
                now=trio.current_time(),
                apply=lambda delta_id, item: self._apply_one(applying, delta_id, item),
                author=header.author,
            )
            if offer.duplicate:
                self.metrics.outcome("duplicate")
                return Received([], frozenset(), duplicate=True)
            for evicted in offer.evicted:
                batch.delete(PENDING, context_id + evicted)
                self.metrics.outcome("evicted")
            if loaded.dag.is_pending(delta.id):
                batch.put(
                    PENDING,
                    context_id + delta.id,
                    PendingRecord(delta=wire, received_at=self._wall_clock()),
                )
            self._note_deferred(loaded)
            if not offer.ready and not applying.rejected:
                await self._write_or_reload(loaded, batch)
                if loaded.dag.is_pending(delta.id):
                    self.metrics.outcome("pending")
                self.metrics.pending_depth(loaded.dag.pending_count)
                return Received([], offer.missing, refused=applying.refused)
            reverted = self._settle(applying)
            _stage_state(loaded, batch)
            self._refresh_record(loaded)
            batch.put(CONTEXTS, context_id, loaded.record)
            await self._write_or_reload(loaded, batch)
        if reverted:
            self._publish_verdicts(loaded, reverted)
        applied = [delta_id for delta_id, _ in offer.ready]
        if applied:
            self.metrics.outcome("applied")
        self._after_received(loaded, applying, max(len(applied) - 1, 0), "cascaded")
        return Received(applied, frozenset(), rejected=applying.rejected, refused=applying.refused)

    def _too_far_ahead(self, loaded: _Loaded, time: int, physical: int) -> bool:
        return loaded.clock.excess(time, physical) > self._max_wait

    def _refuse_ahead(self, context_id: bytes, delta_id: bytes) -> None:
        self.metrics.outcome("refused_ahead")
        log.warning(
            "refused delta %s in %s: stamped beyond max_clock_drift + pending_timeout",
            delta_id.hex()[:16],
            b58(context_id),
        )

    def _note_deferred(self, loaded: _Loaded) -> None:
        if loaded.dag.next_release() is not None:
            self._deferred.set()

    def _apply_one(self, applying: _Applying, delta_id: bytes, delta: SignedDelta) -> bool | Defer:
        """Judge one ready delta and join it into the state if it stands, refuse it, or make
        it wait for our clock (`Defer`: it stays pending); called in causal order.

        Returns False only for a delta no honest member writes (rejected: never applied,
        so nothing builds on it) or one stamped too far ahead; filtered and invalid deltas
        are applied as no-ops, so honest descendants are judged on their own merits. The
        verdict never depends on time; only *when* a valid delta applies does."""
        loaded, batch = applying.loaded, applying.batch
        context_id = loaded.context_id
        authority = loaded.authority
        header = verify_delta(delta)
        try:
            authority.check_chain(header)
            if header.auth is not None:
                authority.check_op(delta_id, header)
            else:
                authority.check_data(header)
        except AuthRejected as exc:
            batch.delete(PENDING, context_id + delta_id)
            return self._reject(applying, delta_id, str(exc))
        physical = self._physical_now()
        wait = self._wait_for(loaded, applying, delta_id, header.hlc, physical)
        if wait is not None:
            return wait
        body: DeltaBody | None = None
        records: list[Entity] = []
        verdict = Verdict.ACCEPTED
        if header.auth is None:
            verdict, why = authority.verdict_for(header)
            if verdict is not Verdict.ACCEPTED:
                self.metrics.outcome(f"auth_{verdict.value}")
                log.info(
                    "delta %s in %s is %s: %s", delta_id.hex()[:16], b58(context_id), verdict, why
                )
        if verdict is Verdict.ACCEPTED and (header.auth is None or header.auth.kind == Kind.CREATE):
            try:
                body = open_delta(delta, header, loaded.keys[header.key_id])
                records = decode_entities(body.records)
            except KeyError:
                batch.delete(PENDING, context_id + delta_id)
                return self._reject(applying, delta_id, f"no key {header.key_id}")
            except ProtocolError as exc:
                batch.delete(PENDING, context_id + delta_id)
                return self._reject(applying, delta_id, str(exc))
            # Its newest stamp, header or any record inside, must be within drift of our
            # clock, or joining it would drag our clock (and every local write) ahead.
            newest = (max_stamp(records) or Timestamp(0, b"")).time
            wait = self._wait_for(loaded, applying, delta_id, newest, physical)
            if wait is not None:
                return wait
        batch.delete(PENDING, context_id + delta_id)
        if header.auth is not None:
            authority.add_op(delta_id, header)
        equivocates = authority.record(delta_id, header)
        if header.auth is None:
            authority.verdicts[delta_id] = verdict
        applying.auth_changed |= header.auth is not None or equivocates
        applying.fresh[delta_id] = delta
        batch.put(DELTAS, context_id + delta_id, delta.encode())
        if header.auth is not None:
            self._learn_keys(loaded, batch, header.auth)
        if body is None:
            applying.events.append((delta_id, []))
            return True
        loaded.clock.update(Timestamp(header.hlc, header.author), physical)
        loaded.tree.apply(records)
        # A read-only node runs no handlers, so it queues none (they would pile up forever).
        for index, event in enumerate(() if self.read_only else body.events):
            batch.put(
                HANDLER_RUNS,
                HANDLER_PREFIX + context_id + delta_id + index.to_bytes(4, "big"),
                HandlerRun(name=event.name, payload=event.payload),
            )
        applying.events.append((delta_id, list(body.events)))
        return True

    def deferral_wakeup(self) -> trio.Event:
        """A fresh event, set when a delta next starts waiting for the clock."""
        self._deferred = trio.Event()
        return self._deferred

    def next_release(self) -> float | None:
        """When the earliest delta waiting for the clock may apply (trio time)."""
        times = [loaded.dag.next_release() for loaded in self._loaded.values()]
        return min((t for t in times if t is not None), default=None)

    async def load_waiting(self) -> None:
        """Load every context that has pending deltas (some may wait for the clock)."""
        contexts = {key[:32] for key, _ in await self._store.raw_scan(Column.PENDING)}
        for context_id in sorted(contexts & self._known):
            await self._context(context_id)

    async def release_deferred(self) -> int:
        """Apply the deltas whose wait for the clock is over (and what they release)."""
        total = 0
        now = trio.current_time()
        for loaded in list(self._loaded.values()):
            due = loaded.dag.next_release()
            if due is None or due > now:
                continue
            async with loaded.lock:
                batch = WriteBatch()
                applying = _Applying(loaded, batch)
                released = loaded.dag.release(now, partial(self._apply_one, applying))
                reverted = self._settle(applying)
                _stage_state(loaded, batch)
                self._refresh_record(loaded)
                batch.put(CONTEXTS, loaded.context_id, loaded.record)
                await self._write_or_reload(loaded, batch)
            if reverted:
                self._publish_verdicts(loaded, reverted)
            total += len(released)
            self._after_received(loaded, applying, len(released), "cascaded")
        return total

    def _after_received(
        self, loaded: _Loaded, applying: _Applying, applied: int, outcome: str
    ) -> None:
        if applied:
            self.metrics.outcome(outcome, applied)
        self.metrics.pending_depth(loaded.dag.pending_count)
        self.metrics.heads(len(loaded.dag.heads))
        for delta_id, event_list in applying.events:
            self._publish_remote(loaded, delta_id, event_list)
        if any(event_list for _, event_list in applying.events):
            self.handler_runs_queued.set()

    def _wait_for(
        self, loaded: _Loaded, applying: _Applying, delta_id: bytes, time: int, physical: int
    ) -> Defer | bool | None:
        """None if a delta stamped `time` may apply now; else Defer (wait for our clock)
        or False (refused: beyond drift + pending timeout)."""
        excess = loaded.clock.excess(time, physical)
        if excess > self._max_wait:
            applying.batch.delete(PENDING, loaded.context_id + delta_id)
            applying.refused.append(delta_id)
            self._refuse_ahead(loaded.context_id, delta_id)
            return False
        if excess > 0:
            self.metrics.outcome("deferred")
            return Defer(trio.current_time() + ntp64_seconds(excess) + _CLOCK_SLACK)
        return None

    def _reject(self, applying: _Applying, delta_id: bytes, reason: str) -> bool:
        loaded = applying.loaded
        applying.rejected.append((delta_id, reason))
        self.metrics.outcome(f"rejected_{_reason_label(reason)}")
        log.warning(
            "rejected delta %s in %s: %s", delta_id.hex()[:16], b58(loaded.context_id), reason
        )
        return False

    def _settle(self, applying: _Applying) -> list[bytes]:
        """After a batch of deltas: if membership changed, judge every applied delta again
        and rebuild the state without those that no longer stand (or with those that now
        do). Returns the ids whose verdict changed."""
        if not applying.auth_changed:
            return []
        loaded = applying.loaded
        changed = loaded.authority.rejudge()
        if not changed:
            return []
        self._rebuild(loaded, applying.batch, applying.fresh)
        reverted = sum(1 for _, now in changed.values() if now is not Verdict.ACCEPTED)
        self.metrics.outcome("reverted", reverted)
        return sorted(changed)

    def _rebuild(self, loaded: _Loaded, batch: WriteBatch, fresh: dict[bytes, SignedDelta]) -> None:
        """Recompute the whole state as base ⊔ every standing delta's records, and stage it
        to replace the stored rows in `batch` (one transaction: a crash leaves the old
        state, and verdicts are recomputed from the deltas on restart). `fresh` holds the
        deltas applied in this batch (not in the store yet)."""
        context_id = loaded.context_id
        base = self._store.scan_sync(Column.GENERIC, BASE_PREFIX + context_id)
        tree = StateTree(decode_entity(value) for _, value in base)
        for delta_id, meta in loaded.authority.meta.items():
            if meta.op and delta_id not in loaded.authority.creations:
                continue
            if loaded.authority.verdicts.get(delta_id, Verdict.ACCEPTED) is not Verdict.ACCEPTED:
                continue
            delta = fresh.get(delta_id)
            if delta is None:
                wire = self._store.get_sync(DELTAS, context_id + delta_id)
                if not wire:
                    continue
                delta = decode_delta(wire)
            header = verify_delta(delta)
            try:
                body = open_delta(delta, header, loaded.keys[header.key_id])
            except (KeyError, ProtocolError):
                continue
            tree.apply([decode_entity(r) for r in body.records])
        rows = tree.rows_replacing(loaded.tree)  # drops the old journal rows too
        loaded.tree = tree
        _stage_rows(loaded, batch, rows)
        loaded.clock.witness(tree.max_stamp, self._physical_now())

    async def expire_pending(self, max_age: float) -> int:
        """Evict pending deltas older than `timeout` seconds in every loaded context."""
        total = 0
        for loaded in list(self._loaded.values()):
            async with loaded.lock:
                expired = loaded.dag.expire(trio.current_time(), max_age)
                if not expired:
                    continue
                batch = WriteBatch()
                for delta_id in expired:
                    batch.delete(PENDING, loaded.context_id + delta_id)
                await self._write_or_reload(loaded, batch)
                total += len(expired)
                self.metrics.outcome("evicted", len(expired))
                self.metrics.pending_depth(loaded.dag.pending_count)
        return total

    async def missing(self, context_id: bytes) -> set[bytes]:
        loaded = await self._context(context_id)
        return loaded.dag.missing()

    # -- event handlers --------------------------------------------------------------------

    async def run_pending_handlers(self) -> int:
        """Run every queued handler once, as this node's member; each run commits its own
        delta together with the removal of its queue entry (so a crash replays it once)."""
        async with self._handler_lock:  # one runner at a time, or a run could happen twice
            return await self._run_pending_handlers()

    async def _run_pending_handlers(self) -> int:
        if self.read_only:
            return 0  # runs queued while the node was read-write wait for that mode again
        ran = 0
        for key, run in await self._store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX):
            context_id = key[len(HANDLER_PREFIX) : len(HANDLER_PREFIX) + 32]
            if context_id not in self._known:
                continue
            loaded = await self._context(context_id)
            app = await self._apps.load(loaded.record.application_id)
            async with loaded.lock:
                batch = WriteBatch()
                batch.delete(HANDLER_RUNS, key)
                outcome: CallOutcome | None = None
                for handler in app.handlers_for(run.name):
                    try:
                        result = run_handler(
                            app,
                            loaded.tree,
                            loaded.clock,
                            self._physical_now(),
                            handler,
                            run.payload,
                            executor=loaded.record.our_member,
                            context_id=context_id,
                            writable=loaded.authority.role(loaded.record.our_member) in WRITERS,
                        )
                    except AppError as exc:
                        self.metrics.handler_run(ok=False)
                        log.warning("handler %s for %s failed: %s", handler, run.name, exc)
                        continue
                    self.metrics.handler_run(ok=True)
                    outcome = _merge(outcome, result)
                if outcome is not None and (outcome.delta_records or outcome.events):
                    await self._ensure_write_key(loaded)
                    delta, parents = self._seal(loaded, outcome)
                    self._stage(loaded, batch, delta, parents)
                    await self._write_or_reload(loaded, batch)
                    self._after_local(loaded, delta, outcome)
                else:
                    await self._write_or_reload(loaded, batch)
                ran += 1
        return ran

    # -- GC --------------------------------------------------------------------------------

    async def collect_garbage(self, horizon_unix: float) -> dict[str, int]:
        """Drop tombstones older than `horizon_unix` in every context; persist the result."""
        removed = 0
        contexts = 0
        for record in await self.records():
            loaded = await self._context(record.context_id)
            async with loaded.lock:
                count = loaded.tree.gc(ntp64_from_unix(horizon_unix))
                if not count:
                    continue
                contexts += 1
                removed += count
                batch = WriteBatch()
                _stage_state(loaded, batch)
                await self._write_or_reload(loaded, batch)
        return {"tombstonesRemoved": removed, "contexts": contexts}

    # -- state-based sync: snapshot and tree comparison --------------------------------------
    #
    # Records that arrive as state (a snapshot page, a tree comparison's pulls and pushes) are
    # joined like delta records but belong to no delta. What they cover is told to the DAG by
    # `adopt_heads`: the source's heads become *checkpoints*, ids applied here whose bodies we
    # do not hold (an empty row in the delta column, so they survive restarts and `_read`
    # counts them applied; `read_delta` answers None, so a peer asking hears "missing").
    # Every read here happens under the context lock, so nothing a peer receives can be a
    # change still being written (and possibly rolled back).

    @property
    def store(self) -> AsyncStore:
        return self._store

    async def is_fresh(self, context_id: bytes) -> bool:
        """No state at all yet (a joiner before its first sync)."""
        loaded = await self._context(context_id)
        return len(loaded.tree) == 0 and not loaded.dag.applied

    def snapshot_running(self, context_id: bytes) -> bool:
        return context_id in self._snapshots_running

    def snapshot_guard(self, context_id: bytes) -> _SnapshotGuard:
        """Held while a snapshot is taken for `context_id` (one at a time)."""
        return _SnapshotGuard(self._snapshots_running, context_id)

    async def unknown(self, context_id: bytes, ids: Iterable[bytes]) -> set[bytes]:
        """Those of `ids` neither applied nor pending here."""
        loaded = await self._context(context_id)
        return {i for i in ids if i != GENESIS and not loaded.dag.knows(i)}

    async def applied(self, context_id: bytes, ids: Iterable[bytes]) -> set[bytes]:
        """Those of `ids` applied here (checkpoints included)."""
        loaded = await self._context(context_id)
        return {i for i in ids if i in loaded.dag.applied}

    async def capture(
        self, context_id: bytes, peer_heads: Iterable[bytes]
    ) -> tuple[list[bytes], list[bytes], bytes]:
        """(our heads, which of `peer_heads` we have applied, root hash), read together."""
        loaded = await self._context(context_id)
        async with loaded.lock:
            known = sorted({h for h in peer_heads if h in loaded.dag.applied})
            return sorted(loaded.dag.heads), known, loaded.tree.root_hash()

    async def peer_rights(self, context_id: bytes, member: bytes) -> tuple[bool, bool]:
        """(may write, may change members) for state pushed or served by `member`."""
        loaded = await self._context(context_id)
        role = loaded.authority.role(member)
        return role in WRITERS, role == "admin"

    async def snapshot_page(
        self, context_id: bytes, cursor: bytes | None, max_records: int, max_bytes: int
    ) -> tuple[list[bytes], bytes | None, list[bytes], bytes]:
        """(records, next cursor or None at the end, heads, root hash): encoded records in
        id order after `cursor`, at least one and then up to `max_records`/`max_bytes`."""
        loaded = await self._context(context_id)
        async with loaded.lock:
            entities = loaded.tree.entities(start_after=cursor, limit=max_records + 1)
            records: list[bytes] = []
            size = 0
            for entity in entities[:max_records]:
                data = encode_entity(entity)
                if records and size + len(data) > max_bytes:
                    break
                records.append(data)
                size += len(data)
            more = len(records) < len(entities)
            next_cursor = entities[len(records) - 1].id if more else None
            return records, next_cursor, sorted(loaded.dag.heads), loaded.tree.root_hash()

    async def tree_nodes(
        self,
        context_id: bytes,
        queries: Sequence[tuple[bytes, bytes | None]],
        *,
        max_children: int | None = None,
        max_bytes: int | None = None,
    ) -> list[tuple[bytes | None, bytes | None, list[tuple[bytes, bytes | None]], bool]]:
        """For a prefix of `queries` (entity id, list children after this id): (encoded
        record, Merkle hash, [(child id, hash)], more children follow). The first query is
        always answered; later ones only within `max_children` and `max_bytes` in total."""
        loaded = await self._context(context_id)
        out: list[tuple[bytes | None, bytes | None, list[tuple[bytes, bytes | None]], bool]] = []
        children_left = max_children
        bytes_left = max_bytes
        async with loaded.lock:
            for entity_id, after in queries:
                info = loaded.tree.node(entity_id)
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
        """Encoded records of `roots` and everything below them (at most `limit`; the flag
        says whether that was all)."""
        loaded = await self._context(context_id)
        records: list[bytes] = []
        async with loaded.lock:
            tree = loaded.tree
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
        loaded = await self._context(context_id)
        async with loaded.lock:
            if only_if_empty and len(loaded.tree):
                return None
            physical = self._physical_now()
            newest = max_stamp(list(records))
            excess = 0 if newest is None else loaded.clock.excess(newest.time, physical)
            if excess > 0:
                self.metrics.outcome("refused_state_ahead")
                raise StateAheadError(ntp64_seconds(excess))
            changed = loaded.tree.apply(records)
            loaded.clock.witness(loaded.tree.max_stamp, physical)
            batch = WriteBatch()
            self._stage_base(loaded, batch, records)
            _stage_state(loaded, batch)
            self._refresh_record(loaded)
            batch.put(CONTEXTS, context_id, loaded.record)
            if extra is not None:
                extra(batch)
            await self._write_or_reload(loaded, batch)
        if changed:
            self._hub.publish(
                context_id=b58(context_id),
                delta_id="",
                root_hash=loaded.record.root_hash.hex(),
                heads=[h.hex() for h in loaded.record.heads],
                events=[],
                origin="sync",
            )
        return len(changed)

    async def auth_export(
        self, context_id: bytes, heads: Iterable[bytes]
    ) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
        """The signed membership operations in the past of `heads` and the heads' version
        vectors (for a peer about to adopt them as checkpoints)."""
        loaded = await self._context(context_id)
        async with loaded.lock:
            authority = loaded.authority
            vvs = [(h, authority.vv_of(h)) for h in heads]
            known = [(h, vv) for h, vv in vvs if vv is not None]
            ops: list[bytes] = []
            for op in sorted(authority.graph.ops.values(), key=lambda o: o.order_key):
                if any(op.in_past_of(vv) for _, vv in known):
                    wire = await self._store.get(DELTAS, context_id + op.id)
                    if wire:
                        ops.append(wire)
            return ops, [(h, encode_vv(vv)) for h, vv in known]

    async def adopt_auth(
        self, context_id: bytes, ops: Sequence[bytes], vvs: Sequence[tuple[bytes, bytes]]
    ) -> int:
        """Take a peer's membership operations and checkpoint version vectors before adopting
        its heads (see `auth_export`): each op is verified and checked here, in causal
        order, as if it had arrived by gossip. Returns how many ops were new."""
        loaded = await self._context(context_id)
        async with loaded.lock:
            authority = loaded.authority
            batch = WriteBatch()
            applying = _Applying(loaded, batch)
            for head, encoded in vvs:
                if authority.vv_of(head) is None:
                    authority.checkpoint_vv[head] = decode_vv(encoded)
                    batch.put(AUX, CHECKPOINT_VV_PREFIX + context_id + head, encoded)
            received: list[tuple[SignedDelta, DeltaHeader]] = []
            for wire in ops:
                delta = decode_delta(wire)
                header = verify_delta(delta)
                if header.context_id != context_id or header.auth is None:
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
                    if loaded.dag.is_pending(delta_id):
                        batch.delete(PENDING, context_id + delta_id)
                    loaded.dag.settle(delta_id)
                batch.put(DELTAS, context_id + delta_id, delta.encode())
                self._learn_keys(loaded, batch, header.auth)
                applying.auth_changed = True
                added += 1
            reverted = self._settle(applying)
            _stage_state(loaded, batch)
            self._refresh_record(loaded)
            batch.put(CONTEXTS, context_id, loaded.record)
            await self._write_or_reload(loaded, batch)
        if reverted:
            self._publish_verdicts(loaded, reverted)
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
        loaded = await self._context(context_id)
        async with loaded.lock:
            batch = WriteBatch()
            applying = _Applying(loaded, batch)
            marked = [h for h in heads if h != GENESIS and h not in loaded.dag.applied]

            def cover(covered: list[tuple[bytes, SignedDelta]]) -> None:
                # Before any delta they unblock is judged: those may stand on the
                # authority these carry. Ops go in causal order (a version vector's sum
                # grows along every causal path).
                judged = [(delta_id, delta, verify_delta(delta)) for delta_id, delta in covered]
                judged.sort(key=lambda item: (sum(v for _, v in item[2].vv), item[0]))
                for delta_id, delta, header in judged:
                    batch.delete(PENDING, context_id + delta_id)
                    batch.put(DELTAS, context_id + delta_id, delta.encode())
                    if header.auth is not None:
                        try:
                            loaded.authority.add_op(delta_id, header)
                        except AuthRejected as exc:
                            log.warning(
                                "covered operation %s refused: %s", delta_id.hex()[:16], exc
                            )
                        applying.auth_changed = True
                        self._learn_keys(loaded, batch, header.auth)
                    loaded.authority.record(delta_id, header)
                    if header.auth is None:
                        loaded.authority.verdicts[delta_id] = Verdict.ACCEPTED  # came as state

            released, covered = loaded.dag.checkpoint(
                heads,
                superseded=superseded,
                apply=lambda delta_id, item: self._apply_one(applying, delta_id, item),
                cover=cover,
            )
            bodies = dict(covered)
            for delta_id in marked:
                if delta_id not in bodies and delta_id not in loaded.authority.meta:
                    batch.put(DELTAS, context_id + delta_id, b"")
            reverted = self._settle(applying)
            _stage_state(loaded, batch)
            self._refresh_record(loaded)
            batch.put(CONTEXTS, context_id, loaded.record)
            if extra is not None:
                extra(batch)
            await self._write_or_reload(loaded, batch)
            self._note_deferred(loaded)
        if reverted:
            self._publish_verdicts(loaded, reverted)
        self._after_received(loaded, applying, len(released), "cascaded")
        return loaded.record.root_hash, list(loaded.record.heads)

    # -- internals -------------------------------------------------------------------------

    def _physical_now(self) -> int:
        return ntp64_from_unix(self._wall_clock())

    def _write_key(self, loaded: _Loaded) -> int | None:
        """The key a data delta written now must use (None: rotate first)."""
        _, vv = loaded.authority.next_local(loaded.dag.heads, loaded.record.our_member)
        return loaded.authority.resolution().write_key(vv, held=loaded.keys)

    def _seal(
        self, loaded: _Loaded, outcome: CallOutcome, *, auth: AuthAction | None = None
    ) -> tuple[SignedDelta, list[bytes]]:
        body = DeltaBody(
            records=[encode_entity(r) for r in outcome.delta_records],
            events=[AppEvent(e.name, e.payload) for e in outcome.events],
            root_hash=loaded.tree.root_hash(),
        )
        parents = loaded.dag.parents_for_new_delta()
        seq, vv = loaded.authority.next_local(parents, loaded.record.our_member)
        if auth is not None:
            auth = msgspec.structs.replace(auth, parents=loaded.authority.auth_parents(vv))
        key_id = loaded.record.key_id
        if auth is None:
            key_id = self._write_key(loaded) or key_id
        elif auth.key_id is not None and auth.key_id in loaded.keys:
            key_id = auth.key_id
        delta = seal_delta(
            context_id=loaded.context_id,
            parents=parents,
            author=loaded.member_key,
            hlc=loaded.clock.last,
            key_id=key_id,
            context_key=loaded.keys[key_id],
            body=body,
            seq=seq,
            vv=vv,
            auth=auth,
        )
        return delta, parents

    def _stage(
        self, loaded: _Loaded, batch: WriteBatch, delta: SignedDelta, parents: list[bytes]
    ) -> None:
        """Add a local delta's rows to `batch` and advance the in-memory heads and record."""
        context_id = loaded.context_id
        header = verify_delta(delta)
        if header.auth is not None:
            loaded.authority.add_op(delta.id, header)
            if header.auth.key_id is not None and header.auth.key_id in loaded.keys:
                loaded.record = replace(loaded.record, key_id=header.auth.key_id)
        loaded.authority.record(delta.id, header)
        if header.auth is None:
            loaded.authority.verdicts[delta.id] = Verdict.ACCEPTED
        _stage_state(loaded, batch)
        loaded.dag.offer(delta.id, parents, delta, now=trio.current_time())
        batch.put(DELTAS, context_id + delta.id, delta.encode())
        self._refresh_record(loaded)
        batch.put(CONTEXTS, context_id, loaded.record)

    def _stage_base(self, loaded: _Loaded, batch: WriteBatch, records: Sequence[Entity]) -> None:
        """Join records that arrived as state into the base a rebuild starts from."""
        prefix = BASE_PREFIX + loaded.context_id
        for record in records:
            key = prefix + record.id
            old = self._store.get_sync(AUX, key)
            joined = record if not old else decode_entity(old).join(record)
            batch.put(AUX, key, encode_entity(joined))

    def _refresh_record(self, loaded: _Loaded) -> None:
        loaded.record = replace(
            loaded.record,
            root_hash=loaded.tree.root_hash(),
            heads=sorted(loaded.dag.heads),
            members=[
                MemberRecord(public_key=m, role=r)
                for m, r in sorted(loaded.authority.roles().items())
            ],
        )

    async def _write_or_reload(self, loaded: _Loaded, batch: WriteBatch) -> None:
        try:
            await self._store.write(batch)
        except StorageError:
            self._loaded.pop(loaded.context_id, None)  # reload from disk next time
            raise

    def _publish(
        self, loaded: _Loaded, delta: SignedDelta, events: list[tuple[str, bytes]], origin: str
    ) -> None:
        self._hub.publish(
            context_id=b58(loaded.context_id),
            delta_id=delta.id.hex(),
            root_hash=loaded.record.root_hash.hex(),
            heads=[h.hex() for h in loaded.record.heads],
            events=[{"name": n, "payload": _json(p)} for n, p in events],
            origin=origin,
        )

    def _publish_verdicts(self, loaded: _Loaded, changed: list[bytes]) -> None:
        """Tell subscribers which applied deltas a late membership decision reverted (or
        reinstated): their effects are gone from (or back in) the state, and app handlers
        that already ran for them are not undone."""
        verdicts = loaded.authority.verdicts
        reverted = [i.hex() for i in changed if verdicts.get(i) is not Verdict.ACCEPTED]
        reinstated = [i.hex() for i in changed if verdicts.get(i) is Verdict.ACCEPTED]
        self._hub.publish(
            context_id=b58(loaded.context_id),
            delta_id="",
            root_hash=loaded.record.root_hash.hex(),
            heads=[h.hex() for h in loaded.record.heads],
            events=[
                {"name": "reverted", "payload": {"reverted": reverted, "reinstated": reinstated}}
            ],
            origin="auth",
        )

    def _publish_remote(self, loaded: _Loaded, delta_id: bytes, events: list[AppEvent]) -> None:
        self._hub.publish(
            context_id=b58(loaded.context_id),
            delta_id=delta_id.hex(),
            root_hash=loaded.record.root_hash.hex(),
            heads=[h.hex() for h in loaded.record.heads],
            events=[{"name": e.name, "payload": _json(e.payload)} for e in events],
            origin="remote",
        )

    async def _context(self, context_id: bytes) -> _Loaded:
        loaded = self._loaded.get(context_id)
        if loaded is not None:
            return loaded
        async with self._load_lock:
            loaded = self._loaded.get(context_id)
            if loaded is None:
                loaded = await self._read(context_id)
                self._loaded[context_id] = loaded
        return loaded

    async def _load_authority(self, loaded: _Loaded, rows: list[tuple[bytes, bytes]]) -> None:
        """Rebuild the auth graph, version vectors and verdicts from the stored deltas (a
        pure function of them: the same verdicts as before the restart)."""
        context_id = loaded.context_id
        authority = loaded.authority
        ops: list[tuple[bytes, DeltaHeader]] = []
        for key, wire in rows:
            if not wire:
                continue
            delta_id = key[len(context_id) :]
            header = stored_header(decode_delta(wire))
            authority.record(delta_id, header)
            if header.auth is not None:
                ops.append((delta_id, header))
        for key, value in await self._store.scan(AUX, prefix=CHECKPOINT_VV_PREFIX + context_id):
            authority.checkpoint_vv[key[len(CHECKPOINT_VV_PREFIX) + 32 :]] = decode_vv(value)
        ops.sort(key=lambda item: (sum(v for _, v in item[1].vv), item[0]))
        for delta_id, header in ops:
            try:
                authority.add_op(delta_id, header)
            except AuthRejected as exc:  # stored before a rule tightened: skip it
                log.warning("stored operation %s no longer passes: %s", delta_id.hex()[:16], exc)
        for delta_id, meta in authority.meta.items():
            if not meta.op:
                authority.verdicts[delta_id] = authority.judge(delta_id)[0]
        authority.judged()
        loaded.record = replace(
            loaded.record,
            members=[
                MemberRecord(public_key=m, role=r) for m, r in sorted(authority.roles().items())
            ],
        )

    async def _read(self, context_id: bytes) -> _Loaded:
        record = await self.get(context_id)
        rows = await self._store.scan(STATE, prefix=context_id)
        tree = StateTree.from_rows((key[len(context_id) :], value) for key, value in rows)
        delta_rows = await self._store.scan(DELTAS, prefix=context_id)
        applied = [k[len(context_id) :] for k, _ in delta_rows]
        dag = self._new_dag(applied=applied, heads=record.heads)
        member_seed = await self._store.get(IDENTITY, member_slot(context_id, record.our_member))
        keys = {
            int.from_bytes(k[33:41], "big"): v
            for k, v in await self._store.scan(IDENTITY, prefix=context_id + b"k")
        }
        if member_seed is None or record.key_id not in keys:
            raise StorageError(f"context {b58(context_id)} has lost its keys")
        clock = HybridClock(record.our_member, self._max_clock_drift)
        # Beyond drift this is ignored: state poisoned by an older version (a stamp near
        # 2^64-1) must not make every local write overflow the clock after a restart.
        clock.witness(tree.max_stamp, self._physical_now())
        loaded = _Loaded(
            record, tree, dag, clock, Ed25519PrivateKey.from_private_bytes(member_seed), keys
        )
        await self._load_authority(loaded, delta_rows)
        # Pending deltas survive restarts: put them back in the DAG. Those waiting for the
        # clock have all their parents: they wait again, due at once, so the next release
        # checks them against the clock as it is now.
        now = trio.current_time()
        for key, pending in await self._store.scan(PENDING, prefix=context_id):
            try:
                delta = decode_delta(pending.delta)
                header = verify_delta(delta)
            except ProtocolError:
                continue
            dag.offer(
                key[32:],
                header.parents,
                delta,
                now=now,
                apply=lambda _id, _item: Defer(now),
                author=header.author,
            )
        self._note_deferred(loaded)
        return loaded

    def _new_dag(
        self, *, applied: Iterable[bytes] = (), heads: Iterable[bytes] = ()
    ) -> CausalDag[SignedDelta]:
        return CausalDag(
            applied=applied,
            heads=heads,
            max_pending=self._max_pending,
            max_pending_per_author=self._max_pending_per_author,
        )


@attrs.define
class _SnapshotGuard:
    running: set[bytes]
    context_id: bytes

    def __enter__(self) -> None:
        if self.context_id in self.running:
            raise ContextError("a snapshot of this context is already being taken", status=409)
        self.running.add(self.context_id)

    def __exit__(self, *_exc: object) -> None:
        self.running.discard(self.context_id)


@attrs.define
class _Applying:
    """What applying a cascade of received deltas produced, for one write."""

    loaded: _Loaded
    batch: WriteBatch
    rejected: list[tuple[bytes, str]] = attrs.field(factory=list)
    refused: list[bytes] = attrs.field(factory=list)
    events: list[tuple[bytes, list[AppEvent]]] = attrs.field(factory=list)
    auth_changed: bool = False
    """An op or an equivocation arrived: verdicts may change (see `_settle`)."""
    fresh: dict[bytes, SignedDelta] = attrs.field(factory=dict)


def _merge(a: CallOutcome | None, b: CallOutcome) -> CallOutcome:
    if a is None:
        return b
    return attrs.evolve(
        b, delta_records=[*a.delta_records, *b.delta_records], events=[*a.events, *b.events]
    )


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _reason_label(reason: str | None) -> str:
    if reason is None:
        return "unreadable"
    if "author" in reason:
        return "author"
    if "admin" in reason:
        return "role"
    if "key" in reason or "decrypt" in reason:
        return "key"
    return "malformed"


def _stage_state(loaded: _Loaded, batch: WriteBatch) -> None:
    """Write (or delete) the state rows changed since the last drain (a Text keystroke
    writes its delta, not the whole Text: see `trionode/crdt/rows.py`)."""
    _stage_rows(loaded, batch, loaded.tree.drain_rows())


def _stage_rows(loaded: _Loaded, batch: WriteBatch, rows: Iterable[Row]) -> None:
    """Put or delete state rows (keys relative to the context). A rebuild stages a whole
    new tree through here too (`StateTree.rows_replacing`)."""
    context_id = loaded.context_id
    for key, value in rows:
        if value is None:
            batch.delete(STATE, context_id + key)
        else:
            batch.put(STATE, context_id + key, value)


def b58(data: bytes) -> str:
    return base58.b58encode(data).decode("ascii")
