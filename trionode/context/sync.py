"""The sync manager: heartbeats and sessions that make convergence certain (DESIGN §8).

```
SyncManager.run ── sync nursery
   ├─ _heartbeats     every `sync.heartbeat`: publish (heads, root) on each context topic
   ├─ _ticks          every `sync.interval`: a session for each context not synced within
   │                  `sync.min_interval` (failures back off exponentially, capped)
   └─ sessions        one task each, all under one CapacityLimiter(sync.max_concurrent)
                      shared with incoming sessions (see Replicator._serve_sync)
```
A session asks a member peer for its heads and root (`HeadsRequest`), then fetches every
head it lacks breadth-first (delta sync, via `Replicator.fetch`). Both sides run sessions,
so each pulls what it lacks. A heartbeat showing heads we lack starts a session with that
peer at once; equal heads with a different root are counted as divergence.

Not here yet: snapshot transfer for fresh joiners (they delta-sync the whole history) and
Merkle tree comparison for divergent replicas (see the closing notes of the sync issue).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Final

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trionode.context.manager import ContextError, ContextManager
from trionode.context.replication import Replicator, topic_for
from trionode.errors import PeerError, ProtocolError
from trionode.net.pubsub import PubSub
from trionode.wire.keys import PeerId
from trionode.wire.messages import Heartbeat, encode_gossip

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
        self.heartbeats = Counter(
            "trionode_sync_heartbeats", "Heartbeats by direction", ["direction"], registry=registry
        )
        in_use = Gauge("trionode_sync_limiter_in_use", "Sessions running", registry=registry)
        in_use.set_function(lambda: limiter.borrowed_tokens)
        waiting = Gauge("trionode_sync_limiter_waiting", "Sessions waiting", registry=registry)
        waiting.set_function(lambda: limiter.statistics().tasks_waiting)


@attrs.define
class _ContextSync:
    last_success: float = -1e18
    failures: int = 0
    next_attempt: float = 0.0


class SyncManager:
    def __init__(
        self,
        contexts: ContextManager,
        replicator: Replicator,
        pubsub: PubSub,
        *,
        registry: CollectorRegistry | None = None,
        interval: float = 10.0,
        min_interval: float = 5.0,
        heartbeat: float = 5.0,
        timeout: float = 30.0,
        max_concurrent: int = 30,
    ) -> None:
        self.contexts = contexts
        self.replicator = replicator
        self.pubsub = pubsub
        self.interval = interval
        self.min_interval = min_interval
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.limiter = trio.CapacityLimiter(max_concurrent)
        self.metrics = SyncMetrics(registry, self.limiter)
        self._state: dict[bytes, _ContextSync] = {}
        self._running: set[bytes] = set()
        self._nursery: trio.Nursery | None = None
        self._rng = random.Random()  # noqa: S311 - picks a peer, protects nothing
        replicator.session_limiter = self.limiter
        replicator.on_heartbeat = self._on_heartbeat

    async def run(
        self,
        shutdown_requested: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._heartbeats)
            nursery.start_soon(self._ticks)
            task_status.started()
            await shutdown_requested.wait()
            nursery.cancel_scope.cancel()

    # -- scheduling --------------------------------------------------------------------------

    async def _ticks(self) -> None:
        while True:
            await trio.sleep(self.interval)
            now = trio.current_time()
            for context_id in self.contexts.known_ids():
                state = self._state.setdefault(context_id, _ContextSync())
                if now - state.last_success < self.min_interval or now < state.next_attempt:
                    continue
                self._start(context_id, None)

    def _start(self, context_id: bytes, peer: PeerId | None) -> None:
        if context_id in self._running or self._nursery is None:
            return
        self._running.add(context_id)
        self._nursery.start_soon(self._session, context_id, peer)

    async def sync_now(self, context_id: bytes, peer: PeerId | None = None) -> int:
        """Run one session now (skipping the interval); returns deltas applied."""
        if context_id not in self.contexts.known_ids():
            raise ContextError("no such context", status=404)
        return await self._session(context_id, peer, raise_errors=True)

    async def _session(
        self, context_id: bytes, peer: PeerId | None, *, raise_errors: bool = False
    ) -> int:
        state = self._state.setdefault(context_id, _ContextSync())
        self._running.add(context_id)
        started = time.perf_counter()
        try:
            candidates = [peer] if peer is not None else self._member_peers(context_id)
            if not candidates:
                self.metrics.sessions.labels("delta", "no_peer").inc()
                return 0  # "no peer" is not a failure
            chosen = self._rng.choice(candidates)
            async with self.limiter:
                with trio.fail_after(self.timeout):
                    applied = await self._delta_sync(context_id, chosen)
            state.last_success = trio.current_time()
            state.failures = 0
            self.metrics.sessions.labels("delta", "ok").inc()
            self.metrics.deltas.inc(applied)
            return applied
        except (
            PeerError,
            ProtocolError,
            ContextError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            state.failures += 1
            backoff = min(self.min_interval * 2**state.failures, MAX_BACKOFF)
            state.next_attempt = trio.current_time() + backoff
            self.metrics.sessions.labels("delta", "failed").inc()
            log.info(
                "sync of %s failed (%s); next try in %.0fs", context_id.hex()[:12], exc, backoff
            )
            if raise_errors:
                raise
            return 0
        finally:
            self._running.discard(context_id)
            self.metrics.duration.observe(time.perf_counter() - started)

    def _member_peers(self, context_id: bytes) -> list[PeerId]:
        # Members subscribe to their contexts' topics, so a topic's peers are candidate
        # members; the sync stream's membership proof settles it.
        connected = self.replicator.host.connections
        return [p for p in self.pubsub.topic_peers(topic_for(context_id)) if p in connected]

    async def _delta_sync(self, context_id: bytes, peer: PeerId) -> int:
        heads = await self.replicator.ask_heads(peer, context_id)
        ours_root, ours, _ = await self.contexts.state(context_id)
        unknown = {h for h in heads.heads if not await self._known(context_id, h)}
        if not unknown:
            if sorted(heads.heads) == ours and heads.root_hash != ours_root:
                self.metrics.divergence.inc()
                log.warning("divergence in %s: same heads, different root", context_id.hex()[:12])
            return 0
        return await self.replicator.fetch(peer, context_id, unknown)

    async def _known(self, context_id: bytes, delta_id: bytes) -> bool:
        return await self.contexts.read_delta(context_id, delta_id) is not None

    # -- heartbeats --------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.heartbeat)
            for context_id in self.contexts.known_ids():
                try:
                    root, heads, _ = await self.contexts.state(context_id)
                except ContextError:
                    continue
                message = Heartbeat(context_id=context_id, heads=heads[:256], root_hash=root)
                self.replicator.subscribe(context_id)
                self.pubsub.publish(topic_for(context_id), encode_gossip(message))
                self.metrics.heartbeats.labels("sent").inc()

    async def _on_heartbeat(self, peer: PeerId, heartbeat: Heartbeat) -> None:
        self.metrics.heartbeats.labels("received").inc()
        context_id = heartbeat.context_id
        if context_id not in self.contexts.known_ids():
            return
        for head in heartbeat.heads:
            if not await self._known(context_id, head):
                self._start(context_id, peer)  # they have something we lack: sync now
                return
        root, heads, _ = await self.contexts.state(context_id)
        if heads == sorted(heartbeat.heads) and root != heartbeat.root_hash:
            self.metrics.divergence.inc()
            log.warning("divergence in %s: same heads, different root", context_id.hex()[:12])
