"""Local writes: this node's member creating a context, calling its app, and changing
membership.

A local call runs against the replica's copy-on-write tree; on success its delta records
become one signed, encrypted delta whose parents are the current heads, committed with the
changed rows, the new heads and root hash in one LMDB write, then published to subscribers
and handed to the replicator's broadcaster (gossip). Membership changes are deltas too (auth
operations, `trionode/auth/model.py`), checked against our own authority before they are
committed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, NamedTuple, Protocol

import attrs
import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from trionode.auth.model import WRITERS, Kind, StaticError, Verdict, tag, version_key
from trionode.context.authority import AuthRejected, action, op_from_header
from trionode.context.errors import (
    AlreadyExists,
    ContextError,
    DeltaTooLarge,
    FinalityBehind,
    NotPermitted,
)
from trionode.context.events import Change, EventHub
from trionode.context.finality import lag_of
from trionode.context.invitations import seal_keys
from trionode.context.notices import b58, change_of, payload_json
from trionode.context.records import (
    DELTAS,
    IDENTITY,
    ApplicationRecord,
    ContextRecord,
    key_slot,
    member_slot,
)
from trionode.context.replicas import Replica, ReplicaStore, stage_record
from trionode.crdt import HybridClock, StateTree
from trionode.dag.delta import (
    AppEvent,
    AuthAction,
    DeltaBody,
    SignedDelta,
    key_id_of,
    seal_delta,
    verify_delta,
)
from trionode.errors import ReadOnlyError
from trionode.sdk.app import App, EntryKind
from trionode.sdk.runtime import CallOutcome, execute, init_state, run_migrate
from trionode.store.store import WriteBatch


class AppLoader(Protocol):
    async def load(self, application_id: bytes) -> App:
        """The App to run (ContextError if it is not installed or cannot be trusted)."""
        ...

    async def get(self, application_id: bytes) -> ApplicationRecord:
        """Its installed record (name, version; ContextError if it is not installed)."""
        ...

    async def bundle_blob(self, application_id: bytes) -> bytes | None:
        """The blob holding its packed bundle (None: blobs cannot be stored here)."""
        ...


class AuthoredSink(Protocol):
    """Where the deltas this node authors go once durable: the replicator's broadcaster
    (`trionode.context.replication.AuthoredGossip`, in node.py), or its channel alone."""

    def send_nowait(self, value: Authored) -> None:
        """Take the delta (trio.WouldBlock: full, the delta is not gossiped)."""
        ...


class CallResult(msgspec.Struct, frozen=True):
    """A call's answer. (A struct, not attrs: two are made per call.)"""

    result: Any
    delta_id: bytes | None
    root_hash: bytes


@attrs.frozen
class Upgraded:
    operation: SignedDelta
    """The upgrade operation."""
    migration: SignedDelta | None
    """The `@app.migrate` hook's writes (None: no hook, or it wrote nothing)."""
    application_id: bytes
    """The context's application now."""


DEFAULT_MAX_DELTA_BYTES: Final = 4 * 1024 * 1024
"""The default of `replication.max_delta_bytes`; a sync answer frame is 8 MiB."""


class LocalWriter:
    """Writes as this node's member, each under the replica's lock. App calls are staged
    into the delta processor's batch (`pipeline.py`: `run_call`, `stage_outcome`);
    membership changes commit on their own."""

    def __init__(
        self,
        replicas: ReplicaStore,
        hub: EventHub,
        apps: AppLoader,
        *,
        read_only: bool = False,
        authored: AuthoredSink | None = None,
        max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES,
        max_nonfinal_bytes: int | None = None,
    ) -> None:
        self._replicas = replicas
        self.read_only = read_only
        self._max_delta_bytes = max_delta_bytes
        """`replication.max_delta_bytes`: a delta this node writes must be able to travel by
        sync (one answer frame) later, so a larger one is refused when it is sealed."""
        self.max_nonfinal_bytes = max_nonfinal_bytes
        """`auth.max_nonfinal_bytes` (None: unbounded): see `_check_room`."""
        """`node.mode = "read-only"`: every local write raises ReadOnlyError (views run)."""
        self._hub = hub
        self._apps = apps
        self._authored = authored
        """Where every delta this node authors goes once it is durable (the replicator's
        broadcaster, wired in node.py). Full: the delta is not gossiped (counted in
        `unannounced`); heartbeats and sync bring it to the peers instead."""
        self.unannounced = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def create(
        self, application_id: bytes, init_args_json: str | None = None
    ) -> ContextRecord:
        """A new context running `application_id`, with this node's new member as admin."""
        self.writable("creating a context")
        replicas = self._replicas
        app = await self._apps.load(application_id)
        context_id = os.urandom(32)
        member_key = Ed25519PrivateKey.generate()
        member = member_key.public_key().public_bytes_raw()
        context_key = os.urandom(32)
        tree = StateTree()
        clock = HybridClock(member, replicas.max_clock_drift)
        now = replicas.physical_now()
        outcome = init_state(
            app, tree, clock, now, init_args_json, executor=member, context_id=context_id
        )
        key_id = key_id_of(context_key)
        record = ContextRecord(
            context_id=context_id,
            application_id=application_id,
            created_at=replicas.wall_clock(),
            root_hash=tree.root_hash(),
            heads=[],
            key_id=key_id,
            members=[],
            our_member=member,
        )
        replica = Replica(
            record,
            tree,
            replicas.new_dag(),
            clock,
            member_key,
            {key_id: context_key},
            markers=False,  # (no base row yet: `note_base` sets it with the first)
        )
        batch = WriteBatch()
        batch.put(IDENTITY, key_slot(context_id, key_id), context_key)
        batch.put(IDENTITY, member_slot(context_id, member), member_key.private_bytes_raw())
        # The genesis delta is the Create operation (its author the first admin) and carries
        # the app's initial state.
        create = action(Kind.CREATE, key_id=key_id, **await self._app_ref(application_id))
        delta, parents = self._seal(replica, outcome, auth=create)
        self._stage(replica, batch, delta, parents)
        await replicas.store.write(batch)
        replicas.add(replica)
        self._after_local(replica, delta, outcome)
        return replica.record

    async def adopt(
        self,
        *,
        context_id: bytes,
        application_id: bytes,
        member_key: Ed25519PrivateKey,
        keys: dict[int, bytes],
        key_id: int,
        extra: Callable[[WriteBatch], None] | None = None,
    ) -> ContextRecord:
        """Record a context this node joined (state arrives by sync and gossip); `extra`
        stages more writes in the same commit."""
        if self._replicas.knows(context_id):
            raise AlreadyExists(f"already a member of {b58(context_id)}")
        await self._apps.load(application_id)
        return await self._replicas.adopt(
            context_id=context_id,
            application_id=application_id,
            member_key=member_key,
            keys=keys,
            key_id=key_id,
            extra=extra,
        )

    async def delete(self, context_id: bytes) -> None:
        await self._replicas.delete(context_id)
        self._hub.forget(b58(context_id))

    # -- calls -------------------------------------------------------------------------------

    def run_call(self, replica: Replica, app: App, method: str, args_json: str) -> CallOutcome:
        """Run `method` against the replica's state (under its lock). Raises NotPermitted or
        AppError having changed nothing; on success the tree holds the call's changes,
        which `stage_outcome` must then seal (or the replica be reloaded)."""
        role = replica.authority.role(replica.record.our_member)
        if role is None:
            raise NotPermitted("this node is not (or no longer) a member")
        self._check_room(replica, app, method)
        return execute(
            app,
            replica.tree,
            replica.clock,
            self._replicas.physical_now(),
            method,
            args_json,
            executor=replica.record.our_member,
            context_id=replica.context_id,
            writable=role in WRITERS,
        )

    def stage_outcome(
        self,
        replica: Replica,
        outcome: CallOutcome,
        batch: WriteBatch,
        fresh: dict[bytes, SignedDelta] | None = None,
        changes: list[Change] | None = None,
    ) -> tuple[SignedDelta, Callable[[], None]]:
        """Seal what a call (or a handler run) changed as our delta and stage it in `batch`
        (under the lock), with a key rotation first if no key we hold may be written under.
        Returns the delta and what to announce once `batch` is durable. The events for
        subscribers go to `changes` if given (the caller stores and shows them), else the
        announcing publishes them."""
        sealed: list[SignedDelta] = []
        own: list[Change] = []
        planned: _Next | None = self._next(replica)
        key_id = self._write_key(replica, planned)
        if key_id is None:
            # No key we hold follows every removal in our view (concurrent removals, a
            # leaked invitation, or a removal whose key was not sealed to us): introduce one.
            rotate = self.new_key_action(replica, Kind.ROTATE, replica.authority.roles())
            rotation, nothing = self._stage_op(replica, rotate, batch, fresh)
            sealed.append(rotation)
            own.append(_change(replica, rotation, nothing))
            planned = None  # (the rotation is a new head)
            key_id = self._write_key(replica)
        # (The key is resolved once per call: it walks the context's membership ops.)
        delta, parents = self._seal(replica, outcome, write_key=key_id, planned=planned)
        self._stage(replica, batch, delta, parents, fresh)
        sealed.append(delta)
        own.append(_change(replica, delta, outcome))
        if changes is not None:
            changes += own

        def after_commit() -> None:
            if changes is None:
                for change in own:
                    self._hub.emit(change)
            for each in sealed:
                self._announce(replica.context_id, each)

        return delta, after_commit

    def _check_room(self, replica: Replica, app: App, method: str) -> None:
        """A call that may write is refused (FinalityBehind) while the context's undo log
        is over `auth.max_nonfinal_bytes`: its delta would be one more non-final delta.
        Views run; membership changes go on (removing a silent admin is the remedy)."""
        limit = self.max_nonfinal_bytes
        if limit is None or not replica.authority.undo_log_over(limit):
            return
        entry = app.entry(method)
        if entry is not None and entry.kind is EntryKind.VIEW:
            return
        held = replica.authority.nonfinal_bytes()
        oldest = lag_of(replica.authority, self._replicas.wall_clock()).oldest_unacked
        who = "the admins acknowledge" if oldest is None else f"admin {b58(oldest.admin)}"
        raise FinalityBehind(
            f"context {b58(replica.context_id)} holds {held} bytes of deltas that are not "
            f"final yet (auth.max_nonfinal_bytes = {limit}): writes resume once "
            f"{who if oldest is None else who + ' acknowledges'} them (remove an admin that "
            "is gone for good)"
        )

    def check_call(self, app: App, method: str) -> None:
        """On a read-only node only views run (ReadOnlyError for anything else)."""
        if self.read_only:
            entry = app.entry(method)
            # An unknown method falls through to the runtime's own "no such method" error.
            if entry is not None and entry.kind is not EntryKind.VIEW:
                raise ReadOnlyError(f"calling {method!r} (only views run)")

    async def commit_outcome(
        self, replica: Replica, outcome: CallOutcome, batch: WriteBatch
    ) -> SignedDelta:
        """`stage_outcome`, then commit `batch` on its own (under the lock)."""
        delta, after_commit = self.stage_outcome(replica, outcome, batch)
        await self._replicas.write(replica, batch)
        after_commit()
        return delta

    # -- membership --------------------------------------------------------------------------

    async def upgrade(self, context_id: bytes, application_id: bytes) -> Upgraded:
        """As an admin: move the context to `application_id`, a newer version of the app
        it runs (same name; installed here), then run its `@app.migrate` hook here, once.

        The move is a signed operation in the replicated state, so every member switches
        when it applies it, and concurrent upgrades resolve alike everywhere (the highest
        version, then the highest id: `trionode.auth.model.application_of`). The hook's
        writes are one ordinary delta after it. Raises NotPermitted (not an admin),
        ContextError (not installed, another app), AlreadyExists (not newer).
        """
        self.writable("upgrading a context")
        replica = await self._replicas.load(context_id)
        target = await self._apps.get(application_id)
        new_app = await self._apps.load(application_id)
        async with replica.lock:
            if replica.authority.role(replica.record.our_member) != "admin":
                raise NotPermitted("only admins can upgrade a context")
            current = await self._apps.get(replica.record.application_id)
            if target.name != current.name:
                raise ContextError(
                    f"{b58(application_id)} is the app {target.name!r}; this context runs "
                    f"{current.name!r}: an upgrade moves to a new version of the same app"
                )
            if version_key(target.version) <= version_key(current.version):
                raise AlreadyExists(
                    f"{target.name} {target.version} is not newer than the context's "
                    f"{current.version}"
                )
            upgrade = await self._commit_op(
                replica, action(Kind.UPGRADE, **await self._app_ref(application_id))
            )
            if replica.record.application_id != application_id:
                # A concurrent upgrade to a higher version already won here: no migration.
                return Upgraded(upgrade, None, replica.record.application_id)
            outcome = run_migrate(
                new_app,
                replica.tree,
                replica.clock,
                self._replicas.physical_now(),
                from_version=current.version,
                executor=replica.record.our_member,
                context_id=context_id,
            )
            migration = None
            if outcome is not None and (outcome.delta_records or outcome.events):
                migration = await self.commit_outcome(replica, outcome, WriteBatch())
            return Upgraded(upgrade, migration, application_id)

    async def _app_ref(self, application_id: bytes) -> dict[str, object]:
        """What an op says of an installed app so members that lack it can fetch it
        (format 3: `trionode.context.app_upgrades`)."""
        record = await self._apps.get(application_id)
        return {
            "application_id": application_id,
            "app_version": record.version,
            "app_name": record.name,
            "bundle_blob_id": await self._apps.bundle_blob(application_id),
            "app_signer": record.signer,
        }

    def writable(self, what: str) -> None:
        """ReadOnlyError (naming `what`) on a read-only node."""
        if self.read_only:
            raise ReadOnlyError(what)

    def new_key_action(
        self, replica: Replica, kind: Kind, recipients: Iterable[bytes], member: bytes | None = None
    ) -> AuthAction:
        new_key = os.urandom(32)
        new_id = key_id_of(new_key)
        replica.keys[new_id] = new_key  # (dropped with the replica if the commit fails)
        box = [(m, seal_keys({new_id: new_key}, m)) for m in sorted(recipients)]
        return action(kind, member=member, key_id=new_id, key_box=box)

    def _stage_op(
        self,
        replica: Replica,
        auth: AuthAction,
        batch: WriteBatch,
        fresh: dict[bytes, SignedDelta] | None = None,
    ) -> tuple[SignedDelta, CallOutcome]:
        """Seal and check one membership operation of ours and stage it (under the lock).
        Raises NotPermitted, having staged nothing, if our own authority refuses it."""
        outcome = CallOutcome(b"null", [], [])
        delta, parents = self._seal(replica, outcome, auth=auth)
        header = verify_delta(delta, context_id=replica.context_id)
        try:
            replica.authority.graph.check(op_from_header(delta.id, header))
        except (StaticError, AuthRejected) as exc:
            raise NotPermitted(str(exc)) from None
        if auth.key_id is not None and auth.key_id in replica.keys:
            batch.put(
                IDENTITY, key_slot(replica.context_id, auth.key_id), replica.keys[auth.key_id]
            )
        self._stage(replica, batch, delta, parents, fresh)
        return delta, outcome

    def stage_own_op(
        self,
        replica: Replica,
        auth: AuthAction,
        batch: WriteBatch,
        fresh: dict[bytes, SignedDelta],
        changes: list[Change],
    ) -> tuple[SignedDelta, Callable[[], None]]:
        """`_stage_op` for the delta processor (`membership.py`): the event for subscribers
        goes to `changes`; returns the delta and what to announce once it is durable."""
        delta, outcome = self._stage_op(replica, auth, batch, fresh)
        changes.append(_change(replica, delta, outcome))
        return delta, lambda: self._announce(replica.context_id, delta)

    async def _commit_op(self, replica: Replica, auth: AuthAction) -> SignedDelta:
        """Seal, check and commit one membership operation of ours (under the lock)."""
        batch = WriteBatch()
        delta, outcome = self._stage_op(replica, auth, batch)
        await self._replicas.write(replica, batch)
        self._after_local(replica, delta, outcome)
        return delta

    # -- sealing and staging -----------------------------------------------------------------

    def _write_key(self, replica: Replica, planned: _Next | None = None) -> int | None:
        """The key a data delta written now must use (None: rotate first). `planned`: the
        delta's parents and vectors (`_next`), whose vector is the heads' when it takes
        every head."""
        heads = replica.dag.heads
        if planned is not None and heads and len(planned.parents) == len(heads):
            vv = planned.vv
        else:
            _, vv = replica.authority.next_local(heads, replica.record.our_member)
        return replica.authority.resolution().write_key(vv, held=replica.keys)

    def _next(self, replica: Replica) -> _Next:
        """The parents, seq and parents' version vector of our next delta."""
        parents = replica.dag.parents_for_new_delta(first=_own_newest(replica))
        seq, vv = replica.authority.next_local(parents, replica.record.our_member)
        return _Next(parents, seq, vv)

    def _seal(
        self,
        replica: Replica,
        outcome: CallOutcome,
        *,
        auth: AuthAction | None = None,
        write_key: int | None = None,
        planned: _Next | None = None,
    ) -> tuple[SignedDelta, list[bytes]]:
        """Seal `outcome` (or the op `auth`) as our next delta; a data delta uses
        `write_key` if the caller resolved it (`_write_key`), else resolves it. `planned`:
        its parents and vectors if the caller took them (`_next`) and nothing changed since."""
        # (The records go as they are: sealing compacts them without their encodings.)
        body = DeltaBody(records=[], events=[AppEvent(e.name, e.payload) for e in outcome.events])
        parents, seq, vv = planned if planned is not None else self._next(replica)
        if auth is not None:
            auth = msgspec.structs.replace(auth, parents=replica.authority.auth_parents(vv))
        key_id = replica.record.key_id
        if auth is None:
            key_id = write_key or self._write_key(replica) or key_id
        elif auth.key_id is not None and auth.key_id in replica.keys:
            key_id = auth.key_id
        delta = seal_delta(
            context_id=replica.context_id,
            parents=parents,
            author=replica.member_key,
            hlc=replica.clock.last,
            key_id=key_id,
            context_key=replica.keys[key_id],
            body=body,
            seq=seq,
            vv=vv,
            auth=auth,
            author_public=replica.record.our_member,
            entities=outcome.delta_records,
            rows=replica.tree.sealed_rows,  # (the rows of the records, made on the way)
        )
        size = len(delta.encode())  # cached: the bytes that are stored and sent
        if size > self._max_delta_bytes:
            raise DeltaTooLarge(
                f"the call's changes make a delta of {size} bytes, above the "
                f"{self._max_delta_bytes} a delta may have (replication.max_delta_bytes): "
                "split the change over several calls, or keep large data in blobs"
            )
        return delta, parents

    def _stage(
        self,
        replica: Replica,
        batch: WriteBatch,
        delta: SignedDelta,
        parents: list[bytes],
        fresh: dict[bytes, SignedDelta] | None = None,
    ) -> None:
        """Add a local delta's rows to `batch` and advance the in-memory heads and record;
        `fresh` (if given) collects the deltas staged but not yet written."""
        if fresh is not None:
            fresh[delta.id] = delta
        header = verify_delta(delta, context_id=replica.context_id)
        if header.auth is not None:
            replica.authority.add_op(delta.id, header)
            if header.auth.key_id is not None and header.auth.key_id in replica.keys:
                replica.record = replace(replica.record, key_id=header.auth.key_id)
        wire = delta.encode()
        replica.authority.record(delta.id, header, len(wire))
        if header.auth is None:
            replica.authority.verdicts[delta.id] = Verdict.ACCEPTED
        replica.dag.offer(delta.id, parents, delta, now=trio.current_time())
        batch.put(DELTAS, replica.context_id + delta.id, wire)
        stage_record(replica, batch, data_only=header.auth is None)

    def _after_local(self, replica: Replica, delta: SignedDelta, outcome: CallOutcome) -> None:
        self._hub.emit(_change(replica, delta, outcome))
        self._announce(replica.context_id, delta)

    def _announce(self, context_id: bytes, delta: SignedDelta) -> None:
        if self._authored is None:
            return
        try:
            self._authored.send_nowait(Authored(context_id, delta))
        except trio.WouldBlock:
            self.unannounced += 1


class _Next(NamedTuple):
    """Our next delta's parents, sequence number and the parents' version vector (each
    taken once per call: the vector merges every head's)."""

    parents: list[bytes]
    seq: int
    vv: dict[bytes, int]


class Authored(msgspec.Struct, frozen=True):
    """A delta this node authored, durable now: for the replicator to gossip."""

    context_id: bytes
    delta: SignedDelta


def _change(replica: Replica, delta: SignedDelta, outcome: CallOutcome) -> Change:
    events = [(e.name, payload_json(e.payload)) for e in outcome.events]
    return change_of(replica, delta_id=delta.id, events=events, origin="local")


def _own_newest(replica: Replica) -> Iterator[bytes]:
    """A head whose past holds our own newest delta (by its seq in the heads' vectors; none
    before our first): a delta that takes only some heads as parents (more heads than a
    header may name) must keep it, or its seq would not follow its past and every peer
    would refuse it. (A generator: `parents_for_new_delta` reads it only then, so the
    common delta, which takes every head, walks no vector for it.)"""
    own = tag(replica.record.our_member)
    authority = replica.authority
    best = 0
    newest: list[bytes] = []
    for head in replica.dag.heads:
        vv = authority.vv_of(head)
        seq = 0 if vv is None else vv.get(own, 0)
        if seq > best or (seq == best and seq and head < newest[0]):
            best, newest = seq, [head]
    yield from newest
