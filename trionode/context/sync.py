"""The sync manager: heartbeats and sessions that make convergence certain (DESIGN §8).

```
SyncManager.run ── sync nursery
   ├─ _send_heartbeats   every `sync.heartbeat`: (heads, root) of every context, one stream
   │                  per peer on its topics (`context/heartbeats.py`)
   ├─ _receive_heartbeats  heartbeats the replicator received (a bounded channel wired in
   │                  node.py): a peer with heads we lack is synced with at once
   ├─ _ticks          every `sync.interval`: a session for each context not synced within
   │                  `sync.min_interval` (failures back off exponentially, capped)
   └─ sessions        one task each, all under one CapacityLimiter(sync.max_concurrent)
                      shared with incoming sessions (see Replicator._serve_sync)
```
A session opens one sync stream to a member peer, asks for its heads and root
(`HeadsRequest`), then picks a protocol (`_run_session`) and runs it on the same stream:

* a snapshot is being taken (a marker is persisted), or the node has no state at all →
  **snapshot** (`snapshot.take`: streamed, resumable, checked against its final root and
  finality certificate, never over existing state), then a delta
  sync of the tail. A node with no state and no trusted snapshot source (only the join
  records one) fetches the whole delta history instead: deltas verify themselves.
* every head of the peer's is applied here: equal roots → nothing to do; equal heads and a
  different root → **divergence** (counted) → tree comparison; otherwise we are ahead and the
  peer pulls from us in its own session.
* otherwise → **delta sync**: fetch the peer's unknown heads (and the parents our pending
  deltas miss) breadth-first, at most `max_delta_rounds` requests deep. If that closes the
  gap, done; if not (a long gap, or history the peer does not hold because it took a
  snapshot) → **tree comparison** (`trionode.sync.treecmp`: compare (FF, final root),
  repair the final state both ways, then fetch the peer's non-final deltas by id on the
  same stream; nothing non-final travels unsigned).

Both sides run sessions, so each pulls what it lacks. A heartbeat showing heads we lack
starts a session with that peer at once; equal heads with a different root are counted as
divergence and start one too (within the interval and backoff rules); any other heartbeat
shows the peer has nothing we lack, and a context so confirmed since the last tick gets no
tick session (idle contexts cost their heartbeats only). Sessions of one
context run one at a time (a per-context lock; an explicit sync waits for a running one).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Iterable
from typing import Any, Final

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trionode.context import snapshot
from trionode.context.errors import ContextError, ContextNotFound
from trionode.context.events import EventHub
from trionode.context.heartbeats import HeartbeatNews
from trionode.context.manager import ContextManager
from trionode.context.notices import b58
from trionode.context.replication import (
    SESSION_ERRORS,
    OpenedStream,
    Replicator,
    context_of,
    failure_reason,
    topic_for,
)
from trionode.net.host import Connection
from trionode.net.pubsub import PubSub
from trionode.sync import plan
from trionode.sync.driver import SyncChannel, compare_trees
from trionode.sync.heartbeat import Confirmed
from trionode.sync.treecmp import TreeCompare, TreeLimits
from trionode.wire.keys import PeerId
from trionode.wire.messages import Beat, HeadsResponse, Heartbeat, encode_gossip

log = logging.getLogger(__name__)

MAX_BACKOFF: Final = 300.0


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry | None, limiter: trio.CapacityLimiter) -> None:
        self.sessions = Counter(
            "trionode_sync_sessions",
            "Sync sessions by protocol and outcome",
            ["protocol", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "trionode_sync_session_failures",
            "Failed sync sessions by protocol and reason: timeout (the session's "
            "`sync.timeout`, its fetch saw only a cancellation), peer_busy (the peer ran "
            "`max_concurrent` sessions), peer_refused, peer_error (not connected, stream "
            "refused), session_expired, stream_ended_error, stream_stalled_error, or the "
            "type of the peer's protocol violation",
            ["protocol", "reason"],
            registry=registry,
        )
        self.duration = Histogram(
            "trionode_sync_session_seconds", "Sync session duration", registry=registry
        )
        self.deltas = Counter(
            "trionode_sync_deltas", "Deltas applied by sync sessions", registry=registry
        )
        self.divergence = Counter(
            "trionode_sync_divergence",
            "Peers that reported our heads with a different root hash",
            registry=registry,
        )
        self.snapshot_refused = Counter(
            "trionode_sync_snapshot_refused",
            "Snapshots refused because the node already had state",
            registry=registry,
        )
        self.records = Counter(
            "trionode_sync_records",
            "Entity records moved by state-based sync (snapshot, pulled, pushed, refused)",
            ["direction"],
            registry=registry,
        )
        self.snapshot_pages = Counter(
            "trionode_snapshot_pages",
            "Snapshot pages this node joined, each persisted with its progress marker",
            registry=registry,
        )
        self.round_trips = Counter(
            "trionode_sync_round_trips",
            "Requests answered within state-based sessions",
            ["protocol"],
            registry=registry,
        )
        self.bytes = Counter(
            "trionode_sync_bytes",
            "Approximate payload bytes of tree comparisons",
            ["direction"],
            registry=registry,
        )
        self.heartbeats = Counter(
            "trionode_sync_heartbeats", "Heartbeats by direction", ["direction"], registry=registry
        )
        in_use = Gauge("trionode_sync_limiter_in_use", "Sessions running", registry=registry)
        in_use.set_function(lambda: limiter.borrowed_tokens)
        waiting = Gauge("trionode_sync_limiter_waiting", "Sessions waiting", registry=registry)
        waiting.set_function(lambda: limiter.statistics().tasks_waiting)
        self.peak = Gauge(
            "trionode_sync_limiter_peak",
            "Most sessions (incoming and outgoing) ever running at once",
            registry=registry,
        )
        self._limiter = limiter
        self.peak_in_use = 0

    def session_started(self) -> None:
        """Called just after a session took a token: keeps the peak (a safety figure)."""
        in_use = self._limiter.borrowed_tokens
        if in_use > self.peak_in_use:
            self.peak_in_use = in_use
            self.peak.set(in_use)


@attrs.define
class _ContextSync:
    last_success: float = -1e18
    confirmed_at: float = -1e18
    """When a peer's heartbeat last showed we lack nothing it has (trio time)."""
    failures: int = 0
    next_attempt: float = 0.0
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    waiting: dict[PeerId, frozenset[bytes] | None] = attrs.field(factory=dict)
    """Peers a session was asked for (a re-subscription, a heartbeat with news) while one
    was running, oldest first, with the heads of theirs we lacked (None: asked for without
    a reason to check): each gets its turn when the running one ends, unless by then
    those heads arrived (gossip, the running session) and no parent is missing."""


@attrs.define
class PeerSyncStatus:
    """How this node's last sessions of one context with one peer went (for the page and
    `GET /admin-api/contexts/ID/sync`). Times are wall-clock seconds (Unix)."""

    last_attempt: float
    outcome: str = "ok"
    """Of the last attempt: ok, partial, busy, refused or failed."""
    protocol: str = "none"
    """Of the last successful session: none (already in sync), delta, snapshot or tree."""
    last_success: float | None = None
    deltas: int = 0
    """Deltas applied here by the last successful session."""
    last_error: str | None = None
    last_error_at: float | None = None


@attrs.frozen
class _Link:
    """A session's one sync stream (membership already proved on it) and its peer."""

    peer: PeerId
    channel: SyncChannel
    conn: Connection


@attrs.define
class _Run:
    """What one session did (for its metrics)."""

    protocol: str = "none"
    outcome: str = "ok"
    applied: int = 0
    scope: trio.CancelScope | None = None
    """The session's deadline (`timeout`): a streamed snapshot lifts it while it moves."""


class SyncManager:
    def __init__(
        self,
        contexts: ContextManager,
        replicator: Replicator,
        pubsub: PubSub,
        *,
        limiter: trio.CapacityLimiter,
        metrics: SyncMetrics,
        heartbeats: trio.MemoryReceiveChannel[tuple[PeerId, HeartbeatNews]] | None = None,
        interval: float = 10.0,
        min_interval: float = 5.0,
        heartbeat: float = 5.0,
        announce_interval: float = 1.0,
        timeout: float = 30.0,
        max_delta_rounds: int = 64,
        tree_limits: TreeLimits | None = None,
        on_join: bool = True,
        join_jitter: float = 0.2,
        max_peer_status: int = 64,
        snapshot_page_records: int = snapshot.PAGE_RECORDS,
        snapshot_page_bytes: int = snapshot.PAGE_BYTES,
        snapshot_window: int = snapshot.WINDOW,
        snapshot_batch_bytes: int = snapshot.BATCH_BYTES,
        snapshot_idle_timeout: float = snapshot.IDLE_TIMEOUT,
        snapshot_prepare_timeout: float = snapshot.PREPARE_TIMEOUT,
        hub: EventHub | None = None,
    ) -> None:
        self.contexts = contexts
        self.replicator = replicator
        self.pubsub = pubsub
        self.interval = interval
        self.min_interval = min_interval
        self.heartbeat = heartbeat
        self.announce_interval = announce_interval
        """Seconds between two announcements of one context's heads on its topic after
        sessions (`_announce`): the sessions in between share the next one."""
        self._announced: dict[bytes, float] = {}
        """Context → when its heads were last announced (trio time)."""
        self._announcing: set[bytes] = set()
        """Contexts whose next announcement waits for `announce_interval` to pass."""
        self.timeout = timeout
        self.limiter = limiter
        """Shared with the replicator's incoming sessions (wired in node.py)."""
        self.max_delta_rounds = max_delta_rounds
        """How deep (in breadth-first requests) a gap delta sync fills before giving way to
        tree comparison."""
        self.tree_limits = tree_limits or TreeLimits()
        self.snapshot_page_records = snapshot_page_records
        self.snapshot_page_bytes = snapshot_page_bytes
        self.snapshot_window = snapshot_window
        self.snapshot_batch_bytes = snapshot_batch_bytes
        self.snapshot_idle_timeout = snapshot_idle_timeout
        self.snapshot_prepare_timeout = snapshot_prepare_timeout
        self.hub = hub
        """Where snapshot progress goes (a transient notice to the context's subscribers;
        `trionode context join` shows it)."""
        self.on_join = on_join
        self.join_jitter = join_jitter
        self.metrics = metrics
        self._heartbeats = heartbeats
        self._state: dict[bytes, _ContextSync] = {}
        self._peer_status: dict[bytes, dict[PeerId, PeerSyncStatus]] = {}
        self.max_peer_status = max_peer_status
        """Peers remembered per context; beyond, the one tried longest ago is forgotten."""
        self._running: set[bytes] = set()
        self._greetings: dict[PeerId, set[bytes]] = {}
        """Peers to greet (`on_topic_joined`), with the contexts their burst named so far."""
        self._nursery: trio.Nursery | None = None
        self._rng = random.Random()  # noqa: S311 - picks a peer, protects nothing

    async def run(
        self,
        shutdown_requested: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._send_heartbeats)
                nursery.start_soon(self._ticks)
                if self._heartbeats is not None:
                    nursery.start_soon(self._receive_heartbeats, self._heartbeats)
                task_status.started()
                await shutdown_requested.wait()
                nursery.cancel_scope.cancel()
        finally:
            # An explicit sync (`sync_now`) ending after this must not start a waiting
            # peer's session in a closed nursery.
            self._nursery = None

    # -- scheduling --------------------------------------------------------------------------

    async def _ticks(self) -> None:
        while True:
            await trio.sleep(self.interval)
            now = trio.current_time()
            known = self.contexts.known_ids()
            for gone in self._peer_status.keys() - known:
                del self._peer_status[gone]
            for gone in [c for c, at in self._announced.items() if now - at > self.interval]:
                del self._announced[gone]  # (long enough ago to announce at once again)
            for context_id in known:
                state = self._context_sync(context_id)
                if now - state.last_success < self.min_interval or now < state.next_attempt:
                    continue
                if now - state.confirmed_at < self.interval:
                    # A peer's heartbeat since the last tick showed it has nothing we lack
                    # (and one that has would have started a session itself): an idle
                    # context costs its heartbeats, not a session per tick.
                    continue
                self._start(context_id, None)

    def on_topic_joined(self, peer: PeerId, topic: str) -> None:
        """A peer (re)subscribed to a topic: if it is one of our contexts', greet it with
        our (heads, root) of that context at once (DESIGN §8: a healed partition converges
        at once, not at a tick). It does the same, so whichever side lacks something starts
        a session right away (`_on_heartbeat`), with no jitter and no session that would
        bring nothing. A peer that cannot be greeted gets a jittered session instead."""
        context_id = context_of(topic)
        if (
            not self.on_join
            or self._nursery is None
            or context_id is None
            or context_id not in self.contexts.known_ids()
        ):
            return
        waiting = self._greetings.get(peer)
        if waiting is not None:
            waiting.add(context_id)  # one greeting for a whole subscription burst
            return
        self._greetings[peer] = {context_id}
        self._nursery.start_soon(self._greet, peer)

    async def _greet(self, peer: PeerId) -> None:
        # The topics of one subscription message join back to back: let them gather.
        await trio.lowlevel.checkpoint()
        context_ids = self._greetings.pop(peer, set())
        beats: list[Beat] = []
        for context_id in context_ids:
            try:
                root, heads, _ = await self.contexts.state(context_id)
            except ContextError:
                continue
            beats.append(Beat(context_id, heads[:256], root))
        if not beats:
            return
        if await self.replicator.heartbeats.greet(peer, beats):
            self.metrics.heartbeats.labels("sent").inc(len(beats))
            return
        nursery = self._nursery
        if nursery is not None:  # (None once the manager stopped)
            for beat in beats:
                nursery.start_soon(self._join_session, beat.context_id, peer)

    async def _join_session(self, context_id: bytes, peer: PeerId) -> None:
        await trio.sleep(self._rng.uniform(0, self.join_jitter))
        if peer in self.replicator.host.connections:
            self._start(context_id, peer)

    def _start(
        self, context_id: bytes, peer: PeerId | None, wants: frozenset[bytes] | None = None
    ) -> None:
        """A session for `context_id` (with `peer`, or a random member peer); `wants`: the
        heads of the peer's we lack, which a session that has to wait checks again."""
        if self._nursery is None:
            return
        if context_id in self._running:
            # One session per context at a time, but a peer that asked for one now (it just
            # came back with what we lack) must not wait for a heartbeat: it goes next.
            if peer is not None:
                waiting = self._context_sync(context_id).waiting
                if peer in waiting:
                    # (Its newest heartbeat names its newest heads; None stays None.)
                    if waiting[peer] is not None:
                        waiting[peer] = wants
                elif len(waiting) < self.max_peer_status:
                    waiting[peer] = wants
            return
        self._running.add(context_id)
        self._nursery.start_soon(self._session, context_id, peer, wants)

    def _next_waiting(self, context_id: bytes, state: _ContextSync) -> None:
        """Start the session the oldest still-connected waiting peer asked for."""
        connected = self.replicator.host.connections
        while state.waiting:
            peer = next(iter(state.waiting))
            wants = state.waiting.pop(peer)
            if peer in connected:
                self._start(context_id, peer, wants)
                return

    async def sync_now(
        self, context_id: bytes, peer: PeerId | None = None, *, opened: OpenedStream | None = None
    ) -> int:
        """Run one session now (skipping the interval); returns deltas applied. `opened`: a
        sync stream to `peer` already negotiated (`Replicator.session`)."""
        if context_id not in self.contexts.known_ids():
            raise ContextNotFound("no such context")
        return await self._session(context_id, peer, raise_errors=True, opened=opened)

    async def _session(
        self,
        context_id: bytes,
        peer: PeerId | None,
        wants: frozenset[bytes] | None = None,
        *,
        raise_errors: bool = False,
        opened: OpenedStream | None = None,
    ) -> int:
        state = self._context_sync(context_id)
        self._running.add(context_id)
        started = time.perf_counter()
        run = _Run()
        chosen: PeerId | None = None
        try:
            async with state.lock:
                if wants is not None and not await self._still_lacking(context_id, wants):
                    # Asked for while another session ran; what the peer's heartbeat showed
                    # came meanwhile. Under load heartbeats queue one session per peer
                    # behind the running one, mostly for deltas gossip was still bringing.
                    run.outcome = "arrived"
                    return 0
                candidates = [peer] if peer is not None else self._member_peers(context_id)
                if not candidates:
                    run.outcome = "no_peer"
                    return 0  # "no peer" is not a failure
                chosen = await self._pick(context_id, candidates)
                async with self.limiter:
                    self.metrics.session_started()
                    with trio.fail_after(self.timeout) as run.scope:
                        await self._sync_with(context_id, chosen, run, opened)
            if run.outcome == "ok":
                state.last_success = trio.current_time()
                state.failures = 0
            self._record(context_id, chosen, run, None)
            self.metrics.deltas.inc(run.applied)
            if run.applied:
                # Deltas that came by sync are not gossiped again: tell the topic our new
                # heads now, so peers that lack them (the other side of a healed partition,
                # reachable only through us) pull at once instead of at the next heartbeat.
                self._announce(context_id)
            return run.applied
        except SESSION_ERRORS as exc:
            if isinstance(exc, snapshot.SnapshotRefused):
                run.outcome = "refused"
            else:
                run.outcome = "failed"
            state.failures += 1
            self.metrics.failures.labels(run.protocol, failure_reason(exc)).inc()
            self._record(context_id, chosen, run, exc)
            # The exponent is capped: heartbeats start sessions regardless of the backoff,
            # so a removed member fails thousands of times, and 2.0**1024 overflows.
            backoff = min(self.min_interval * 2.0 ** min(state.failures, 32), MAX_BACKOFF)
            state.next_attempt = trio.current_time() + backoff
            log.info(
                "%s sync of %s failed (%s); next try in %.0fs",
                run.protocol,
                context_id.hex()[:12],
                exc,
                backoff,
            )
            if raise_errors:
                raise
            return run.applied
        finally:
            self._running.discard(context_id)
            self.metrics.sessions.labels(run.protocol, run.outcome).inc()
            self.metrics.duration.observe(time.perf_counter() - started)
            if chosen is not None:
                state.waiting.pop(chosen, None)  # just had its session
            self._next_waiting(context_id, state)

    async def _still_lacking(self, context_id: bytes, heads: frozenset[bytes]) -> bool:
        """Whether a heartbeat's `heads` still name deltas we do not know, or deltas here
        wait for parents (the test `_on_heartbeat` starts a session on)."""
        return bool(
            await self.contexts.unknown(context_id, heads)
            or await self.contexts.missing(context_id)
        )

    def _record(
        self, context_id: bytes, peer: PeerId | None, run: _Run, error: BaseException | None
    ) -> None:
        if peer is None:
            return  # no peer to sync with: nothing was tried
        now = time.time()
        statuses = self._peer_status.setdefault(context_id, {})
        status = statuses.get(peer)
        if status is None:
            if len(statuses) >= self.max_peer_status:
                del statuses[min(statuses, key=lambda p: statuses[p].last_attempt)]
            status = statuses[peer] = PeerSyncStatus(last_attempt=now)
        status.last_attempt = now
        status.outcome = run.outcome
        if error is not None:
            status.last_error = str(error) or type(error).__name__
            status.last_error_at = now
        elif run.outcome == "ok":
            status.last_success = now
            status.protocol = run.protocol
            status.deltas = run.applied

    def peer_status(self, context_id: bytes) -> list[tuple[PeerId, bool, PeerSyncStatus | None]]:
        """Each peer that may hold the context (connected on its topic now, or synced with
        before): whether it is connected, and how the last sessions with it went."""
        connected = self.replicator.host.connections
        statuses = self._peer_status.get(context_id, {})
        peers = dict.fromkeys([*self._member_peers(context_id), *statuses])
        return [(peer, peer in connected, statuses.get(peer)) for peer in peers]

    def is_running(self, context_id: bytes) -> bool:
        return context_id in self._running

    async def _pick(self, context_id: bytes, candidates: list[PeerId]) -> PeerId:
        """A random candidate; but while a snapshot is being taken, its peer if connected
        (the one trusted source of unsigned state; others would only give us deltas)."""
        progress = await snapshot.load_progress(self.contexts.store, context_id)
        if progress is not None and progress.peer is not None:
            for connected, conn in self.replicator.host.connections.items():
                if str(connected) == progress.peer and not conn.closed:
                    return connected
        return self._rng.choice(candidates)

    def _member_peers(self, context_id: bytes) -> list[PeerId]:
        # Members subscribe to their contexts' topics, so a topic's peers are candidate
        # members; the sync stream's membership proof settles it.
        connected = self.replicator.host.connections
        return [p for p in self.pubsub.topic_peers(topic_for(context_id)) if p in connected]

    async def _sync_with(
        self, context_id: bytes, peer: PeerId, run: _Run, opened: OpenedStream | None = None
    ) -> None:
        """One session with `peer`: gather what the choice needs (`trionode.sync.plan`)
        and run the protocol chosen."""
        if self.contexts.snapshot_running(context_id):
            run.protocol, run.outcome = "snapshot", "busy"  # the join is taking it
            return
        async with self.replicator.session(peer, context_id, opened=opened) as (channel, conn):
            await self._run_session(context_id, _Link(peer, channel, conn), run)

    async def _run_session(self, context_id: bytes, link: _Link, run: _Run) -> None:
        """The session on its one stream: heads exchange, then whatever protocol the plan
        picks (snapshot, delta sync, tree comparison) on the same stream."""
        peer = link.peer
        progress = await snapshot.load_progress(self.contexts.store, context_id)
        heads = await self.replicator.ask_heads_on(link.channel, context_id)
        fresh = progress is not None or await self.contexts.is_fresh(context_id)
        situation = plan.Situation(heads, snapshot_in_progress=progress is not None, fresh=fresh)
        if not fresh:
            claimed = self.replicator.folded.ids(context_id)
            if claimed:  # our finality may cover them by now (acks came since)
                run.applied += await self.replicator.release_past_folded(context_id, claimed)
            root, ours, _ = await self.contexts.state(context_id)
            unknown = await self.contexts.unknown(context_id, heads.heads)
            # Not what this peer said it folded: asking again brings nothing (its final
            # state has them: a tree comparison).
            waiting = set(await self.contexts.missing(context_id))
            folded = waiting & self.replicator.folded.by(context_id, peer)
            missing = waiting - folded
            applied = await self.contexts.applied(context_id, heads.heads)
            if not missing and len(applied) == len(set(heads.heads)):
                # (Only once every head of the peer's is *applied*: adopting its heads
                # while one waits here, deferred, would mark it applied unread.)
                ours = await self._drop_stale_heads(context_id, heads, ours)
            situation = attrs.evolve(
                situation, root=root, heads=ours, unknown=unknown, missing=missing, folded=folded
            )
        choice = plan.choose(situation)
        if choice is plan.Choice.SNAPSHOT:
            try:
                await self._snapshot(context_id, link, run)
                return
            except snapshot.UntrustedSource as exc:
                log.info("no snapshot from %s (%s): syncing deltas instead", peer, exc)
                choice = plan.Choice.HISTORY
        if choice is plan.Choice.HISTORY:
            # The whole history (each session goes `max_fetch_rounds` deeper): every delta
            # verifies itself, so any member will do.
            run.protocol = "delta"
            if not await self._delta_sync(context_id, link, heads, run, max_rounds=None):
                run.outcome = "partial"
            elif progress is not None:
                await self.contexts.store.delete(
                    snapshot.PROGRESS, snapshot.progress_key(context_id)
                )
            return
        if choice is plan.Choice.NOTHING:
            return  # in sync, or we are ahead (the peer pulls from us)
        if choice is plan.Choice.DELTA:
            run.protocol = "delta"
            if await self._delta_sync(
                context_id, link, heads, run, max_rounds=self.max_delta_rounds
            ):
                await self._drop_stale_heads(context_id, heads, situation.heads)
                return
            if not await self.contexts.unknown(
                context_id, heads.heads
            ) and not await self.contexts.missing(context_id):
                # Every head of the peer's is here, some pending with no parent missing:
                # they wait for our clock (stamped ahead) and apply once it allows. A tree
                # comparison would only pull their records as unsigned state: refused as
                # ahead of our clock, or joined for good with whatever came before them.
                return
            diverged = False
        elif situation.folded:
            diverged = False  # parents only the peer's final state holds
        else:
            diverged = True
            log.warning("divergence in %s: same heads, different root", context_id.hex()[:12])
        if await self.contexts.undo_log_full(context_id):
            # The deltas it lacks were refused (auth.max_nonfinal_bytes): state that carries
            # them must not slip in either. A later session fetches them once finality moved.
            run.outcome = "undo_full"
            return
        await self._tree_compare(context_id, link, heads.heads, run, diverged=diverged)

    async def _drop_stale_heads(
        self, context_id: bytes, peer: HeadsResponse, ours: Iterable[bytes]
    ) -> list[bytes]:
        """If every head of the peer's is applied here, drop our stale heads
        (`plan.stale_heads`). Returns our heads now.

        A peer head we only hold *pending* (waiting for our clock, say) must not pass:
        `adopt_heads` would record it as a checkpoint, as if its effects had come as state,
        and no state comes here; it would count as applied without its records, leaving
        us at the peer's heads with a different root."""
        stale = plan.stale_heads(peer, ours)
        if not stale or len(await self.contexts.applied(context_id, peer.heads)) < len(
            set(peer.heads)
        ):
            return sorted(ours)
        log.info("%d stale heads in %s", len(stale), context_id.hex()[:12])
        _, heads = await self.contexts.adopt_heads(context_id, peer.heads, stale)
        return heads

    async def _delta_sync(
        self,
        context_id: bytes,
        link: _Link,
        heads: HeadsResponse,
        run: _Run,
        *,
        max_rounds: int | None,
    ) -> bool:
        """Fetch what we lack of the peer's heads (and what our pending deltas wait for), at
        most `max_rounds` requests deep (None: the replicator's default); whether every head
        of the peer's is applied now."""
        wanted = await self.contexts.unknown(context_id, heads.heads)
        wanted |= await self.contexts.missing(context_id)
        wanted -= self.replicator.folded.by(context_id, link.peer)
        if wanted:
            run.applied += await self.replicator.fetch_on(
                link.channel, link.peer, context_id, wanted, max_rounds=max_rounds
            )
        applied = await self.contexts.applied(context_id, heads.heads)
        return len(applied) == len(set(heads.heads))

    async def _snapshot(self, context_id: bytes, link: _Link, run: _Run) -> None:
        run.protocol = "snapshot"
        # The stream has its own idle deadline (`snapshot_idle_timeout`): a snapshot of a
        # million records is not cut by the session's `timeout` while it moves.
        if run.scope is not None:
            run.scope.deadline = math.inf
        try:
            _, joined = await snapshot.take(
                self.contexts,
                link.channel,
                link.conn,
                link.peer,
                context_id,
                page_records=self.snapshot_page_records,
                page_bytes=self.snapshot_page_bytes,
                window=self.snapshot_window,
                batch_bytes=self.snapshot_batch_bytes,
                idle_timeout=self.snapshot_idle_timeout,
                prepare_timeout=self.snapshot_prepare_timeout,
                on_page=self.metrics.snapshot_pages.inc,
                on_progress=functools.partial(self._snapshot_progress, context_id),
            )
        except snapshot.SnapshotRefused:
            self.metrics.snapshot_refused.inc()
            # The state came some other way: the marker no longer applies.
            await self.contexts.store.delete(snapshot.PROGRESS, snapshot.progress_key(context_id))
            raise
        self.metrics.records.labels("snapshot").inc(joined)
        if run.scope is not None:
            run.scope.deadline = trio.current_time() + self.timeout
        # The tail: what the peer wrote since the boundary (and anything gossip left pending).
        tail = await self.replicator.ask_heads_on(link.channel, context_id)
        if not await self._delta_sync(
            context_id, link, tail, run, max_rounds=self.max_delta_rounds
        ):
            run.outcome = "partial"  # the next session continues (delta or tree comparison)

    def _snapshot_progress(self, context_id: bytes, payload: dict[str, Any]) -> None:
        if self.hub is not None:
            payload["contextId"] = b58(context_id)
            self.hub.notify(payload["contextId"], payload)

    async def _tree_compare(
        self,
        context_id: bytes,
        link: _Link,
        peer_heads: list[bytes],
        run: _Run,
        *,
        diverged: bool,
    ) -> None:
        """Compare (FF, final root) with `peer` and repair the final state
        (`trionode.sync.treecmp`), then fetch its non-final deltas by id, signed, on the
        same stream: whatever is not final never travels unsigned."""
        run.protocol = "tree"
        contexts = self.contexts
        ours, _ = await contexts.final_start(context_id, ())
        machine = TreeCompare(ours, limits=self.tree_limits)
        result = await compare_trees(
            link.channel, machine, contexts, link.conn, context_id, acks=self.replicator.take_ack
        )
        wanted = await contexts.unknown(context_id, peer_heads)
        wanted |= await contexts.missing(context_id)
        if wanted:
            run.applied += await self.replicator.fetch_on(
                link.channel, link.peer, context_id, wanted, max_rounds=None
            )
        if diverged or result.divergence:
            self.metrics.divergence.inc()
        if result.divergence:
            log.warning(
                "divergence in %s: same final frontier, different final root",
                context_id.hex()[:12],
            )
        self.metrics.records.labels("pulled").inc(result.pulled)
        self.metrics.records.labels("pushed").inc(result.pushed)
        self.metrics.records.labels("refused").inc(result.refused_there)
        self.metrics.round_trips.labels("tree").inc(result.round_trips)
        self.metrics.bytes.labels("received").inc(result.bytes_received)
        self.metrics.bytes.labels("sent").inc(result.bytes_sent)
        applied = await contexts.applied(context_id, peer_heads)
        if not (
            result.complete
            and result.adopted_here
            and result.adopted_there
            and len(applied) == len(set(peer_heads))
        ):
            run.outcome = "partial"

    # -- heartbeats --------------------------------------------------------------------------

    async def _send_heartbeats(self) -> None:
        """Every interval, each context's (heads, root) to the peers on its topic: one
        stream per peer for all of them (`context/heartbeats.py`), not one gossip message
        per context. A context taking a snapshot is left out: its root is a partial
        state's, which no peer can use, and hashing it (the pages invalidate the whole
        tree's hashes) cost a joiner about a tenth of a large join (issue 17)."""
        while True:
            await trio.sleep(self.heartbeat)
            beats: dict[str, Beat] = {}
            for context_id in self.contexts.known_ids():
                if self.contexts.snapshot_running(context_id):
                    continue
                try:
                    root, heads, _ = await self.contexts.state(context_id)
                except ContextError:
                    continue
                self.replicator.subscribe(context_id)
                beats[topic_for(context_id)] = Beat(context_id, heads[:256], root)
            await self.replicator.heartbeats.send(beats)
            self.metrics.heartbeats.labels("sent").inc(len(beats))

    def _context_sync(self, context_id: bytes) -> _ContextSync:
        """A context's session state, made on first use. Not `setdefault`: that builds a
        throwaway `_ContextSync` (and its lock) on every call, once per context per tick."""
        state = self._state.get(context_id)
        if state is None:
            state = self._state[context_id] = _ContextSync()
        return state

    def announcement_due(self, context_id: bytes) -> bool:
        """Whether an announcement of the context's heads is scheduled and not yet sent."""
        return context_id in self._announcing

    def _announce(self, context_id: bytes) -> None:
        """Our new heads of a context on its topic after a session applied deltas: at once
        if none went out within `announce_interval`, else once that has passed, for all the
        sessions since. Each announcement reaches every member (D copies each), and while
        many members repair one context every session sent one."""
        nursery = self._nursery
        if nursery is None or context_id in self._announcing:
            return  # (an announcement is due: it will carry these heads too)
        now = trio.current_time()
        last = self._announced.get(context_id)
        self._announcing.add(context_id)
        due = now if last is None else max(now, last + self.announce_interval)
        nursery.start_soon(self._announce_at, context_id, due)

    async def _announce_at(self, context_id: bytes, due: float) -> None:
        try:
            await trio.sleep_until(due)
        finally:
            self._announcing.discard(context_id)
        self._announced[context_id] = trio.current_time()
        self.metrics.heartbeats.labels("announced").inc()
        await self._heartbeat(context_id)

    async def _heartbeat(self, context_id: bytes) -> None:
        """Publish our (heads, root) of one context on its topic at once (after a session
        that applied deltas): one gossip message, not worth a stream per peer."""
        try:
            root, heads, _ = await self.contexts.state(context_id)
        except ContextError:
            return
        message = Heartbeat(context_id=context_id, heads=heads[:256], root_hash=root)
        self.replicator.subscribe(context_id)
        self.pubsub.publish(topic_for(context_id), encode_gossip(message))
        self.metrics.heartbeats.labels("sent").inc()

    async def _receive_heartbeats(
        self, heartbeats: trio.MemoryReceiveChannel[tuple[PeerId, HeartbeatNews]]
    ) -> None:
        async for peer, heartbeat in heartbeats:
            if isinstance(heartbeat, Confirmed):
                self._on_confirmed(heartbeat)
            else:
                await self._on_heartbeat(peer, heartbeat)

    def _on_confirmed(self, confirmed: Confirmed) -> None:
        """A digest heartbeat showed the peer's (heads, root) of these contexts equal ours:
        as a beat of each with equal heads and root would have (`_on_heartbeat`)."""
        now = trio.current_time()
        known = self.contexts.known_ids()
        self.metrics.heartbeats.labels("confirmed").inc(len(confirmed.context_ids))
        for context_id in confirmed.context_ids:
            if context_id in known:
                self._context_sync(context_id).confirmed_at = now

    async def _on_heartbeat(self, peer: PeerId, heartbeat: Heartbeat) -> None:
        self.metrics.heartbeats.labels("received").inc()
        context_id = heartbeat.context_id
        if context_id not in self.contexts.known_ids():
            return
        state = self._context_sync(context_id)
        now = trio.current_time()
        lacking = set(heartbeat.heads) - await self.contexts.applied(context_id, heartbeat.heads)
        if lacking:
            wants = frozenset(lacking)
            if await self._still_lacking(context_id, wants):
                self._start(context_id, peer, wants)  # they have something we lack: sync now
                return
            # Every head of theirs we lack is here, pending with no parent missing: stamped
            # ahead of our clock, it applies when the clock allows (`serve_clock_waits` knows
            # when). A session would bring nothing (`_run_session` ends on the same test).
            state.confirmed_at = now
            return
        root, heads, _ = await self.contexts.state(context_id)
        if heads != sorted(heartbeat.heads) or root == heartbeat.root_hash:
            state.confirmed_at = now  # we have every head it has: nothing to pull from it
            return
        self.metrics.divergence.inc()
        log.warning("divergence in %s: same heads, different root", context_id.hex()[:12])
        if now - state.last_success >= self.min_interval and now >= state.next_attempt:
            self._start(context_id, peer)  # tree comparison repairs it
