"""Delta processing: received deltas judged, applied (or left pending, deferred, refused)
and committed, and the state rebuilt when a late membership decision changes a verdict.

A received delta is verified once on arrival (id and signature, `VerifiedDelta`) by the
task that received it; the delta processor (`pipeline.py`) stages it here, in its batch,
under the replica's lock. Its author's rights are checked when it is *applied*, in causal
order, because the membership that admits a new author may itself still be on its way
(`trionode/auth/model.py`, DESIGN §7.1). The changed
entity rows, the delta, the new heads and root hash, the pending set and the handler runs
it queues commit in one LMDB write (shared with the rest of the processor's batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import Protocol

import attrs
import trio

from trionode.auth.finality import within
from trionode.auth.model import Kind, Verdict, tag
from trionode.context.authority import AuthRejected
from trionode.context.events import Change, EventHub
from trionode.context.notices import app_events_change, b58, publish_verdicts, verdicts_change
from trionode.context.records import (
    DELTAS,
    HANDLER_PREFIX,
    HANDLER_RUNS,
    PENDING,
    HandlerRun,
    PendingRecord,
)
from trionode.context.replicas import (
    Replica,
    ReplicaStore,
    learn_keys,
    stage_record,
    stage_rows,
)
from trionode.crdt import Entity, StateTree, Timestamp, decode_entities, decode_entity, max_stamp
from trionode.crdt.hlc import ntp64_duration, ntp64_seconds
from trionode.dag.dag import Defer
from trionode.dag.delta import (
    AppEvent,
    DeltaBody,
    DeltaHeader,
    SignedDelta,
    VerifiedDelta,
    decode_delta,
    header_vv,
    open_delta,
    verify_delta,
)
from trionode.errors import ProtocolError, RemoteProtocolError
from trionode.store.store import WriteBatch

log = logging.getLogger(__name__)

_CLOCK_SLACK = 0.001
"""Seconds added to a wait for the clock, so the wall clock has surely moved on by then."""


class ReplicationMetrics(Protocol):
    def outcome(self, outcome: str, n: int = 1) -> None: ...
    def pending_depth(self, depth: int) -> None: ...
    def heads(self, count: int) -> None: ...
    def handler_run(self, *, ok: bool) -> None: ...


class NoMetrics:
    def outcome(self, outcome: str, n: int = 1) -> None:
        pass

    def pending_depth(self, depth: int) -> None:
        pass

    def heads(self, count: int) -> None:
        pass

    def handler_run(self, *, ok: bool) -> None:
        pass


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


@attrs.define
class Progress:
    """Whether staging a job has started to change its replica in memory (an error after
    that point leaves the replica unusable until it is reloaded), and the events its
    subscribers are to see once the batch is durable."""

    mutated: bool = False
    changes: list[Change] = attrs.field(factory=list)


@attrs.define
class Applying:
    """What applying a cascade of received deltas produced, for one write."""

    replica: Replica
    batch: WriteBatch
    rejected: list[tuple[bytes, str]] = attrs.field(factory=list)
    refused: list[bytes] = attrs.field(factory=list)
    events: list[tuple[bytes, list[AppEvent]]] = attrs.field(factory=list)
    auth_changed: bool = False
    """An op or an equivocation arrived: verdicts may change (see `settle`)."""
    fresh: dict[bytes, SignedDelta] = attrs.field(factory=dict)
    handles: Callable[[str], bool] | None = None
    """Whether the app the context runs has a handler for an event name (None: not known
    here, so every event queues its run: see `apply_one`)."""


class DeltaProcessor:
    """The receive path of every replica (see the module docstring)."""

    def __init__(
        self,
        replicas: ReplicaStore,
        hub: EventHub,
        metrics: ReplicationMetrics,
        *,
        pending_timeout: float = 300.0,
        read_only: bool = False,
        max_nonfinal_bytes: int | None = None,
    ) -> None:
        self._replicas = replicas
        self._read_only = read_only
        self.max_nonfinal_bytes = max_nonfinal_bytes
        """`auth.max_nonfinal_bytes` (None: unbounded): see `_undo_log_full`."""
        self._hub = hub
        self.metrics = metrics
        self._max_wait = ntp64_duration(pending_timeout)
        """How far beyond the drift a delta's stamps may lead and it still waits."""
        self._handler_runs_queued = trio.Event()

    def handler_wakeup(self) -> trio.Event:
        """A fresh event, set when received deltas next queue app handler runs."""
        self._handler_runs_queued = trio.Event()
        return self._handler_runs_queued

    def wake_handlers(self) -> None:
        """Wake whoever waits for handler runs (also after a restart left some queued)."""
        self._handler_runs_queued.set()

    def stage_received(
        self,
        replica: Replica,
        verified: VerifiedDelta,
        batch: WriteBatch,
        fresh: dict[bytes, SignedDelta],
        progress: Progress,
        *,
        handles: Callable[[str], bool] | None = None,
    ) -> tuple[Received, Callable[[], None] | None]:
        """Offer a verified delta to `replica` (under its lock) and stage what that changes
        in `batch`, which the caller commits; returns what became of it and what to announce
        once the batch is durable. `fresh` holds the deltas staged but not yet written for
        this replica (a rebuild reads them from there). `handles`: see `Applying.handles`.
        Raises RemoteProtocolError, having changed nothing, for a delta of another
        context."""
        context_id = replica.context_id
        delta, header = verified.delta, verified.header
        if header.context_id != context_id:
            raise RemoteProtocolError("delta belongs to another context")
        if self._too_far_ahead(replica, header.hlc, self._replicas.physical_now()):
            # Checked before anything is stored: such a delta may be valid later.
            self._refuse_ahead(context_id, delta.id)
            return Received([], frozenset(), refused=[delta.id]), None
        applying = Applying(replica, batch, fresh=fresh, handles=handles)
        progress.mutated = True
        offer = replica.dag.offer(
            delta.id,
            header.parents,
            delta,
            now=trio.current_time(),
            apply=lambda delta_id, item: self.apply_one(applying, delta_id, item),
            author=header.author,
        )
        if offer.duplicate:
            self.metrics.outcome("duplicate")
            return Received([], frozenset(), duplicate=True), None
        for evicted in offer.evicted:
            batch.delete(PENDING, context_id + evicted)
            self.metrics.outcome("evicted")
        pending = replica.dag.is_pending(delta.id)
        if pending:
            batch.put(
                PENDING,
                context_id + delta.id,
                PendingRecord(delta=verified.wire, received_at=self._replicas.wall_clock()),
            )
        self._replicas.note_deferred(replica)
        if not offer.ready and not applying.rejected:

            def after_pending() -> None:
                if pending:
                    self.metrics.outcome("pending")
                self.metrics.pending_depth(replica.dag.pending_count)

            return Received([], offer.missing, refused=applying.refused), after_pending
        reverted = self.settle(applying)
        stage_record(replica, batch, data_only=not applying.auth_changed and not reverted)
        applied = [delta_id for delta_id, _ in offer.ready]
        if reverted:
            progress.changes.append(verdicts_change(replica, reverted))
        progress.changes += self.changes_of(applying)

        def after_applied() -> None:
            if applied:
                self.metrics.outcome("applied")
            self.count_received(applying, max(len(applied) - 1, 0), "cascaded")

        received = Received(
            applied, frozenset(), rejected=applying.rejected, refused=applying.refused
        )
        return received, after_applied

    def _too_far_ahead(self, replica: Replica, time: int, physical: int) -> bool:
        return replica.clock.excess(time, physical) > self._max_wait

    def _refuse_ahead(self, context_id: bytes, delta_id: bytes) -> None:
        self.metrics.outcome("refused_ahead")
        log.warning(
            "refused delta %s in %s: stamped beyond max_clock_drift + pending_timeout",
            delta_id.hex()[:16],
            b58(context_id),
        )

    def apply_one(self, applying: Applying, delta_id: bytes, delta: SignedDelta) -> bool | Defer:
        """Judge one ready delta and join it into the state if it stands, refuse it, or make
        it wait for our clock (`Defer`: it stays pending); called in causal order.

        Returns False only for a delta no honest member writes (rejected: never applied,
        so nothing builds on it) or one stamped too far ahead; filtered and invalid deltas
        are applied as no-ops, so honest descendants are judged on their own merits. The
        verdict never depends on time; only *when* a valid delta applies does."""
        replica, batch = applying.replica, applying.batch
        context_id = replica.context_id
        authority = replica.authority
        header = verify_delta(delta, context_id=context_id)
        try:
            authority.check_chain(header)
            if header.auth is not None:
                authority.check_op(delta_id, header)
            else:
                authority.check_data(header)
        except AuthRejected as exc:
            batch.delete(PENDING, context_id + delta_id)
            return self._reject(applying, delta_id, str(exc))
        if header.auth is None and self._undo_log_full(replica, header):
            # Refused, not rejected: nothing is wrong with it, and it is not remembered, so
            # a sync session brings it again once finality has moved (it is not counted
            # against the peer). Membership operations are always taken: removing a silent
            # admin must stay possible.
            batch.delete(PENDING, context_id + delta_id)
            applying.refused.append(delta_id)
            self.metrics.outcome("refused_undo_full")
            return False
        physical = self._replicas.physical_now()
        wait = self._wait_for(applying, delta_id, header.hlc, physical)
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
                body = open_delta(delta, header, replica.keys[header.key_id])
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
            wait = self._wait_for(applying, delta_id, newest, physical)
            if wait is not None:
                return wait
        batch.delete(PENDING, context_id + delta_id)
        if header.auth is not None:
            authority.add_op(delta_id, header)
        wire = delta.encode()
        equivocates = authority.record(delta_id, header, len(wire))
        if header.auth is None:
            authority.verdicts[delta_id] = verdict
        applying.auth_changed |= header.auth is not None or equivocates
        applying.fresh[delta_id] = delta
        batch.put(DELTAS, context_id + delta_id, wire)
        if header.auth is not None:
            learn_keys(replica, batch, header.auth)
        if body is None:
            applying.events.append((delta_id, []))
            return True
        replica.clock.update(Timestamp(header.hlc, header.author), physical)
        replica.tree.apply(records)
        # A read-only node runs no handlers, so it queues none (they would pile up forever).
        for index, event in enumerate(() if self._read_only else body.events):
            if not _may_handle(applying, event.name):
                continue
            batch.put(
                HANDLER_RUNS,
                HANDLER_PREFIX + context_id + delta_id + index.to_bytes(4, "big"),
                HandlerRun(name=event.name, payload=event.payload),
            )
        applying.events.append((delta_id, list(body.events)))
        return True

    def _undo_log_full(self, replica: Replica, header: DeltaHeader) -> bool:
        """Whether a received data delta is refused because the context's undo log is over
        `max_nonfinal_bytes` (local-first-auth.md §5.4: convergence over liveness). One
        every AckSet member has acknowledged is taken all the same: it is final as soon as
        its past is here, and refusing it would keep those acks from counting."""
        limit = self.max_nonfinal_bytes
        authority = replica.authority
        if limit is None or not authority.undo_log_over(limit):
            return False
        return not within(header_vv(header), authority.acked_by_all(replica.record.our_member))

    async def release_deferred(self) -> int:
        """Apply the deltas whose wait for the clock is over (and what they release)."""
        total = 0
        now = trio.current_time()
        for replica in self._replicas.loaded():
            due = replica.dag.next_release()
            if due is None or due > now:
                continue
            async with replica.lock:
                batch = WriteBatch()
                applying = Applying(replica, batch)
                released = replica.dag.release(now, partial(self.apply_one, applying))
                reverted = self.settle(applying)
                stage_record(replica, batch)
                await self._replicas.write(replica, batch)
            if reverted:
                publish_verdicts(self._hub, replica, reverted)
            total += len(released)
            self.after_received(applying, len(released), "cascaded")
        return total

    async def release_past_folded(self, context_id: bytes, folded: Iterable[bytes]) -> int:
        """Apply the pending deltas that wait for parents a peer said it folded, where our
        *own* finality shows those parents are in our final state: the delta's whole past
        (its version vector less its own step) is final here. Such a parent was folded or
        came as final state, so nobody can send its body; waiting for it would never end.

        A peer's "folded" only makes us look: a false one for a parent that is not final
        here changes nothing (the delta keeps waiting and the parent is still asked of
        others). The parents are not marked applied either: if one ever arrives, it applies
        as usual (joining its records again changes nothing). Returns how many applied."""
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            final = replica.authority.finality()
            if not final.final:
                return 0

            def past_is_final(_delta_id: bytes, delta: SignedDelta) -> bool:
                header = verify_delta(delta, context_id=context_id)
                past = dict(header_vv(header))
                past[tag(header.author)] = header.seq - 1
                return within(past, final.final)

            batch = WriteBatch()
            applying = Applying(replica, batch)
            released = replica.dag.forgo(folded, past_is_final, partial(self.apply_one, applying))
            if not released and not applying.rejected and not applying.refused:
                return 0
            reverted = self.settle(applying)
            stage_record(replica, batch)
            await self._replicas.write(replica, batch)
            self._replicas.note_deferred(replica)
        if reverted:
            publish_verdicts(self._hub, replica, reverted)
        self.after_received(applying, len(released), "released_folded")
        return len(released)

    def after_received(self, applying: Applying, applied: int, outcome: str) -> None:
        """Once a cascade is committed: count it and tell subscribers (and the handler
        runner) what it applied."""
        for change in self.changes_of(applying):
            self._hub.emit(change)
        self.count_received(applying, applied, outcome)

    def changes_of(self, applying: Applying) -> list[Change]:
        """What subscribers are to hear of a cascade: one event per delta it applied."""
        replica = applying.replica
        return [
            app_events_change(replica, delta_id, event_list, "remote")
            for delta_id, event_list in applying.events
        ]

    def count_received(self, applying: Applying, applied: int, outcome: str) -> None:
        """Once a cascade is committed: count it and wake the handler runner if it queued
        runs."""
        replica = applying.replica
        if applied:
            self.metrics.outcome(outcome, applied)
        self.metrics.pending_depth(replica.dag.pending_count)
        self.metrics.heads(len(replica.dag.heads))
        if any(event_list for _, event_list in applying.events):
            self._handler_runs_queued.set()

    def _wait_for(
        self, applying: Applying, delta_id: bytes, time: int, physical: int
    ) -> Defer | bool | None:
        """None if a delta stamped `time` may apply now; else Defer (wait for our clock)
        or False (refused: beyond drift + pending timeout)."""
        replica = applying.replica
        excess = replica.clock.excess(time, physical)
        if excess > self._max_wait:
            applying.batch.delete(PENDING, replica.context_id + delta_id)
            applying.refused.append(delta_id)
            self._refuse_ahead(replica.context_id, delta_id)
            return False
        if excess > 0:
            self.metrics.outcome("deferred")
            return Defer(trio.current_time() + ntp64_seconds(excess) + _CLOCK_SLACK)
        return None

    def _reject(self, applying: Applying, delta_id: bytes, reason: str) -> bool:
        applying.rejected.append((delta_id, reason))
        self.metrics.outcome(f"rejected_{_reason_label(reason)}")
        log.warning(
            "rejected delta %s in %s: %s",
            delta_id.hex()[:16],
            b58(applying.replica.context_id),
            reason,
        )
        return False

    def settle(self, applying: Applying) -> list[bytes]:
        """After a batch of deltas: if membership changed, judge every applied delta again
        and rebuild the state without those that no longer stand (or with those that now
        do). Returns the ids whose verdict changed."""
        if not applying.auth_changed:
            return []
        replica = applying.replica
        changed = replica.authority.rejudge()
        if not changed:
            return []
        self._rebuild(replica, applying.batch, applying.fresh)
        reverted = sum(1 for _, now in changed.values() if now is not Verdict.ACCEPTED)
        self.metrics.outcome("reverted", reverted)
        return sorted(changed)

    def _rebuild(
        self, replica: Replica, batch: WriteBatch, fresh: dict[bytes, SignedDelta]
    ) -> None:
        """Recompute the whole state as base ⊔ every standing delta's records, and stage it
        to replace the stored rows in `batch` (one transaction: a crash leaves the old
        state, and verdicts are recomputed from the deltas on restart). `fresh` holds the
        deltas applied in this batch (not in the store yet)."""
        context_id = replica.context_id
        store = self._replicas.store
        tree = StateTree(self._replicas.iter_base(context_id))
        for delta_id, meta in replica.authority.meta.items():
            if meta.op and delta_id not in replica.authority.creations:
                continue
            if replica.authority.verdicts.get(delta_id, Verdict.ACCEPTED) is not Verdict.ACCEPTED:
                continue
            delta = fresh.get(delta_id)
            if delta is None:
                wire = store.get_sync(DELTAS, context_id + delta_id)
                if not wire:
                    continue
                delta = decode_delta(wire)
            header = verify_delta(delta, context_id=context_id)
            try:
                body = open_delta(delta, header, replica.keys[header.key_id])
            except (KeyError, ProtocolError):
                continue
            tree.apply([decode_entity(r) for r in body.records])
        rows = tree.rows_replacing(replica.tree)  # drops the old journal rows too
        replica.tree = tree
        stage_rows(replica, batch, rows)
        replica.clock.witness(tree.max_stamp, self._replicas.physical_now())

    async def expire_pending(self, max_age: float) -> int:
        """Evict pending deltas older than `max_age` seconds in every loaded context."""
        total = 0
        for replica in self._replicas.loaded():
            async with replica.lock:
                expired = replica.dag.expire(trio.current_time(), max_age)
                if not expired:
                    continue
                batch = WriteBatch()
                for delta_id in expired:
                    batch.delete(PENDING, replica.context_id + delta_id)
                await self._replicas.write(replica, batch)
                total += len(expired)
                self.metrics.outcome("evicted", len(expired))
                self.metrics.pending_depth(replica.dag.pending_count)
        return total

    async def undo_log_full(self, context_id: bytes) -> bool:
        """Whether the context holds `max_nonfinal_bytes` of non-final deltas or more."""
        if self.max_nonfinal_bytes is None:
            return False
        replica = await self._replicas.load(context_id)
        return replica.authority.undo_log_over(self.max_nonfinal_bytes)

    async def missing(self, context_id: bytes) -> set[bytes]:
        replica = await self._replicas.load(context_id)
        return replica.dag.missing()


def _may_handle(applying: Applying, name: str) -> bool:
    """Whether an event of a delta applied now queues a handler run: unless the app the
    context runs is known and has no handler for it (issue #16: each queued run cost a
    row, a wake-up of the handler runner, a store scan and a second commit to delete the
    row, for every event of every received delta, handled or not). An event queues its
    run whenever this cascade applied an operation before it (the app may have changed
    with it, and the record names the new one only once the batch is staged)."""
    return applying.handles is None or applying.auth_changed or applying.handles(name)


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
