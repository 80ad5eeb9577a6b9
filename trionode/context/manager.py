"""Contexts: create, list, show, delete, and execute method calls into causal deltas.

A context's state lives in memory as a `StateTree` (loaded from the `state` column the
first time it is used) beside its causal DAG and HLC. A call runs against a copy-on-write
transaction; on success its delta records become one signed, encrypted delta whose
parents are the current heads, and the changed entity rows, the delta, and the new heads
and root hash commit in one LMDB write. If that write fails, the in-memory copy is thrown
away and reloaded from the store, so memory never runs ahead of disk.

One call at a time per context (a trio.Lock): the transaction layer requires it, and it
gives every call a well-defined parent set.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import base58
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from trionode.context.events import EventHub
from trionode.context.records import (
    CONTEXTS,
    DELTAS,
    IDENTITY,
    STATE,
    ContextRecord,
    MemberRecord,
    key_slot,
    member_slot,
)
from trionode.crdt import HybridClock, StateTree, decode_entity, encode_entity, ntp64_from_unix
from trionode.dag.dag import CausalDag
from trionode.dag.delta import AppEvent, DeltaBody, SignedDelta, seal_delta
from trionode.errors import StorageError, TrionodeError
from trionode.sdk.app import App
from trionode.sdk.runtime import CallOutcome, execute, init_state
from trionode.store.store import AsyncStore, WriteBatch

log = logging.getLogger(__name__)

ROLES = ("admin", "member", "read-only")


class ContextError(TrionodeError):
    """A request about a context cannot be served; `status` is the HTTP status to use."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@attrs.define
class _Loaded:
    record: ContextRecord
    tree: StateTree
    dag: CausalDag[None]
    clock: HybridClock
    member_key: Ed25519PrivateKey
    context_key: bytes
    lock: trio.Lock = attrs.field(factory=trio.Lock)


@attrs.frozen
class CallResult:
    result: Any
    delta_id: bytes | None
    root_hash: bytes


class AppLoader(Protocol):
    async def load(self, application_id: bytes) -> App:
        """The App to run (ContextError if it is not installed or cannot be trusted)."""
        ...


class ContextManager:
    def __init__(
        self,
        store: AsyncStore,
        hub: EventHub,
        apps: AppLoader,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._hub = hub
        self._apps = apps
        self._wall_clock = wall_clock
        self._loaded: dict[bytes, _Loaded] = {}
        self._known: set[bytes] = set()
        self._load_lock = trio.Lock()

    async def start(self) -> None:
        """Learn which contexts exist (their state loads lazily on first use)."""
        self._known = {record.context_id for record in await self.records()}

    # -- queries ---------------------------------------------------------------------------

    async def records(self) -> list[ContextRecord]:
        return [record for _, record in await self._store.scan(CONTEXTS)]

    async def get(self, context_id: bytes) -> ContextRecord:
        record = await self._store.get(CONTEXTS, context_id)
        if record is None:
            raise ContextError(f"no context {context_id.hex()}", status=404)
        return record

    # -- lifecycle -------------------------------------------------------------------------

    async def create(
        self, application_id: bytes, init_args_json: str | None = None
    ) -> ContextRecord:
        """A new context running `application_id`, with this node's new member as admin."""
        app = await self._apps.load(application_id)
        context_id = os.urandom(32)
        member_key = Ed25519PrivateKey.generate()
        member = member_key.public_key().public_bytes_raw()
        context_key = os.urandom(32)
        tree = StateTree()
        clock = HybridClock(member)
        outcome = init_state(
            app,
            tree,
            clock,
            self._physical_now(),
            init_args_json,
            executor=member,
            context_id=context_id,
        )
        record = ContextRecord(
            context_id=context_id,
            application_id=application_id,
            created_at=self._wall_clock(),
            root_hash=tree.root_hash(),
            heads=[],
            key_id=0,
            members=[MemberRecord(public_key=member, role="admin")],
            our_member=member,
        )
        loaded = _Loaded(record, tree, CausalDag(), clock, member_key, context_key)
        batch = WriteBatch()
        batch.put(IDENTITY, key_slot(context_id, 0), context_key)
        batch.put(IDENTITY, member_slot(context_id, member), member_key.private_bytes_raw())
        delta, parents = self._seal(loaded, outcome)
        self._stage(loaded, batch, delta, parents)
        await self._store.write(batch)
        self._loaded[context_id] = loaded
        self._known.add(context_id)
        self._publish(loaded, delta, outcome)
        return loaded.record

    async def delete(self, context_id: bytes) -> None:
        await self.get(context_id)
        loaded = self._loaded.pop(context_id, None)
        if loaded is not None:
            await loaded.lock.acquire()  # let an in-flight call finish first
        batch = WriteBatch()
        batch.delete(CONTEXTS, context_id)
        for table in (STATE, DELTAS, IDENTITY):
            for key, _ in await self._store.scan(table, prefix=context_id):
                batch.delete(table, key)
        await self._store.write(batch)
        self._known.discard(context_id)
        self._hub.forget(b58(context_id))

    # -- calls -----------------------------------------------------------------------------

    async def execute(
        self, context_id: bytes, method: str, args_json: str, *, executor: bytes | None = None
    ) -> CallResult:
        loaded = await self._context(context_id)
        if executor is not None and executor != loaded.record.our_member:
            raise ContextError("this node holds no key for that executor", status=403)
        app = await self._apps.load(loaded.record.application_id)
        async with loaded.lock:
            role = _role(loaded.record, loaded.record.our_member)
            outcome = execute(
                app,
                loaded.tree,
                loaded.clock,
                self._physical_now(),
                method,
                args_json,
                executor=loaded.record.our_member,
                context_id=context_id,
                writable=role != "read-only",
            )
            if not outcome.delta_records and not outcome.events:
                return CallResult(outcome.result, None, loaded.tree.root_hash())
            delta, parents = self._seal(loaded, outcome)
            batch = WriteBatch()
            self._stage(loaded, batch, delta, parents)
            try:
                await self._store.write(batch)
            except StorageError:
                self._loaded.pop(context_id, None)  # reload from disk next time
                raise
            self._publish(loaded, delta, outcome)
            return CallResult(outcome.result, delta.id, loaded.tree.root_hash())

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
                await self._store.write(batch)
        return {"tombstonesRemoved": removed, "contexts": contexts}

    def known_ids(self) -> set[bytes]:
        return set(self._known)

    # -- internals -------------------------------------------------------------------------

    def _physical_now(self) -> int:
        return ntp64_from_unix(self._wall_clock())

    def _seal(self, loaded: _Loaded, outcome: CallOutcome) -> tuple[SignedDelta, list[bytes]]:
        body = DeltaBody(
            records=[encode_entity(r) for r in outcome.delta_records],
            events=[AppEvent(e.name, e.payload) for e in outcome.events],
            root_hash=loaded.tree.root_hash(),
        )
        parents = loaded.dag.parents_for_new_delta()
        delta = seal_delta(
            context_id=loaded.record.context_id,
            parents=parents,
            author=loaded.member_key,
            hlc=loaded.clock.last,
            key_id=loaded.record.key_id,
            context_key=loaded.context_key,
            body=body,
        )
        return delta, parents

    def _stage(
        self, loaded: _Loaded, batch: WriteBatch, delta: SignedDelta, parents: list[bytes]
    ) -> None:
        """Add the call's rows to `batch` and advance the in-memory heads and record."""
        context_id = loaded.record.context_id
        _stage_state(loaded, batch)
        loaded.dag.offer(delta.id, parents, None, now=0)
        batch.put(DELTAS, context_id + delta.id, delta.encode())
        loaded.record = replace(
            loaded.record, root_hash=loaded.tree.root_hash(), heads=sorted(loaded.dag.heads)
        )
        batch.put(CONTEXTS, context_id, loaded.record)

    def _publish(self, loaded: _Loaded, delta: SignedDelta, outcome: CallOutcome) -> None:
        self._hub.publish(
            context_id=b58(loaded.record.context_id),
            delta_id=delta.id.hex(),
            root_hash=loaded.record.root_hash.hex(),
            heads=[h.hex() for h in loaded.record.heads],
            events=[{"name": e.name, "payload": json.loads(e.payload)} for e in outcome.events],
            origin="local",
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

    async def _read(self, context_id: bytes) -> _Loaded:
        record = await self.get(context_id)
        rows = await self._store.scan(STATE, prefix=context_id)
        tree = StateTree(decode_entity(value) for _, value in rows)
        tree.drain_changes()
        applied = [
            key[len(context_id) :] for key, _ in await self._store.scan(DELTAS, prefix=context_id)
        ]
        dag: CausalDag[None] = CausalDag(applied=applied, heads=record.heads)
        member_seed = await self._store.get(IDENTITY, member_slot(context_id, record.our_member))
        context_key = await self._store.get(IDENTITY, key_slot(context_id, record.key_id))
        if member_seed is None or context_key is None:
            raise StorageError(f"context {context_id.hex()} has lost its keys")
        clock = HybridClock(record.our_member)
        clock.witness(tree.max_stamp)
        return _Loaded(
            record, tree, dag, clock, Ed25519PrivateKey.from_private_bytes(member_seed), context_key
        )


def b58(data: bytes) -> str:
    return base58.b58encode(data).decode("ascii")


def _role(record: ContextRecord, member: bytes) -> str:
    for m in record.members:
        if m.public_key == member:
            return m.role
    raise ContextError("not a member of this context", status=403)


def _stage_state(loaded: _Loaded, batch: WriteBatch) -> None:
    """Rewrite (or delete) the state rows of every entity changed since the last drain."""
    context_id = loaded.record.context_id
    changes = loaded.tree.drain_changes()
    for entity_id in changes.updated:
        entity = loaded.tree.get(entity_id)
        if entity is not None:
            batch.put(STATE, context_id + entity_id, encode_entity(entity))
    for entity_id in changes.deleted:
        batch.delete(STATE, context_id + entity_id)
