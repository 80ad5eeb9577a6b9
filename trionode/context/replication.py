"""Replication: deltas over gossip, missing parents over `/trionode/sync/1`.

```
Replicator.run ── replication nursery
   ├─ _fetcher          fetch requests (bounded queue) → one task per request, limited
   ├─ _run_handlers     runs queued app-event handlers (also at start: crash recovery)
   └─ _expire_pending   evicts pending deltas older than `replication.pending_timeout`
```
Every delta this node authors is published on its context's topic right after it commits.
A publish that reaches nobody loses nothing: the delta is in the store and the heads
advertise it (the sync issue's heartbeat and sessions fetch it).

Received gossip comes in through the network event channel (one consumer: the node's
event task), so deltas are processed one at a time. A delta whose parents are unknown waits
(pending, persisted) and the sender is asked for them on a sync stream, breadth-first, so
a long gap is filled without recursion; whatever arrives goes through the same `receive`.

Sync streams are for members only: the requester's first frame proves membership by
signing the connection's Noise handshake hash with its member key.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Final

import attrs
import base58
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trionode.context.errors import ContextError, PeerFailed
from trionode.context.manager import ContextManager
from trionode.context.treecmp import SessionResponder
from trionode.dag.delta import SignedDelta, verify_wire
from trionode.errors import PeerError, ProtocolError, RemoteProtocolError, StreamEndedError
from trionode.net.events import GossipMessage
from trionode.net.framed import FramedStream, StreamLimits
from trionode.net.host import Connection, Host
from trionode.net.pubsub import PubSub
from trionode.wire.keys import PeerId
from trionode.wire.messages import (
    MAX_FRAME,
    MAX_IDS,
    DeltaGossip,
    DeltaRequest,
    DeltaResponse,
    HeadsRequest,
    HeadsResponse,
    Heartbeat,
    SyncAuth,
    SyncError,
    SyncMessage,
    decode_gossip,
    decode_sync,
    encode_gossip,
    frame,
)

log = logging.getLogger(__name__)

SYNC_PROTOCOL: Final = "/trionode/sync/1"
TOPIC_PREFIX: Final = "trionode/context/"
AUTH_DOMAIN: Final = b"trionode/sync-auth/v1"
MAX_AUTH_FRAME: Final = 4096
"""The first frame of a sync stream we serve is a SyncAuth (about 150 bytes): a peer that has
not proved membership never gets a larger frame of its buffered."""


SESSION_ERRORS: Final = (
    PeerError,
    ProtocolError,
    ContextError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)
"""What a session or fetch with one peer can fail with: it fails, the node carries on."""


def topic_for(context_id: bytes) -> str:
    return TOPIC_PREFIX + base58.b58encode(context_id).decode("ascii")


def context_of(topic: str) -> bytes | None:
    if not topic.startswith(TOPIC_PREFIX):
        return None
    try:
        raw = base58.b58decode(topic[len(TOPIC_PREFIX) :])
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


def auth_message(handshake_hash: bytes, context_id: bytes) -> bytes:
    return AUTH_DOMAIN + handshake_hash + context_id


class ReplicationMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.deltas = Counter(
            "trionode_deltas",
            "Received and local deltas by outcome (applied, pending, cascaded, duplicate, "
            "evicted, rejected_<reason>, published; deferred: stamped ahead of our clock, "
            "waits; refused_ahead: beyond max_clock_drift + pending_timeout, not stored; "
            "refused_state_ahead: state records beyond max_clock_drift)",
            ["outcome"],
            registry=registry,
        )
        self.pending = Gauge(
            "trionode_deltas_pending",
            "Pending deltas in the context last changed",
            registry=registry,
        )
        self.heads_histogram = Histogram(
            "trionode_context_heads",
            "DAG heads per context after each applied delta",
            buckets=(1, 2, 3, 4, 8, 16, 64),
            registry=registry,
        )
        self.handlers = Counter(
            "trionode_handler_runs",
            "App event handler runs by outcome",
            ["outcome"],
            registry=registry,
        )
        self.fetches = Counter(
            "trionode_delta_fetches",
            "Missing-parent fetches by outcome",
            ["outcome"],
            registry=registry,
        )
        self.sync_busy = Counter(
            "trionode_sync_busy",
            "Incoming sync streams turned away because max_concurrent sessions were running",
            registry=registry,
        )
        self.sync_refused = Counter(
            "trionode_sync_refused",
            "Sync streams refused (not a member, bad proof)",
            registry=registry,
        )

    def outcome(self, outcome: str, n: int = 1) -> None:
        self.deltas.labels(outcome).inc(n)

    def pending_depth(self, depth: int) -> None:
        self.pending.set(depth)

    def heads(self, count: int) -> None:
        self.heads_histogram.observe(count)

    def handler_run(self, *, ok: bool) -> None:
        self.handlers.labels("ok" if ok else "failed").inc()


@attrs.frozen
class _Fetch:
    peer: PeerId
    context_id: bytes
    ids: frozenset[bytes]


class Replicator:
    def __init__(
        self,
        contexts: ContextManager,
        host: Host,
        pubsub: PubSub,
        metrics: ReplicationMetrics,
        *,
        pending_timeout: float = 300.0,
        fetch_timeout: float = 30.0,
        max_fetch_rounds: int = 64,
        max_concurrent_fetches: int = 8,
        session_limiter: trio.CapacityLimiter | None = None,
        session_started: Callable[[], None] | None = None,
        heartbeats: trio.MemorySendChannel[tuple[PeerId, Heartbeat]] | None = None,
    ) -> None:
        self.contexts = contexts
        self.host = host
        self.pubsub = pubsub
        self.metrics = metrics
        self.pending_timeout = pending_timeout
        self.fetch_timeout = fetch_timeout
        self.max_fetch_rounds = max_fetch_rounds
        self._fetch_limit = trio.CapacityLimiter(max_concurrent_fetches)
        self._send_fetch, self._receive_fetch = trio.open_memory_channel[_Fetch](256)
        self._fetching: set[tuple[bytes, bytes]] = set()
        self.session_limiter = session_limiter
        self.session_started = session_started
        """Shared with the sync manager's outgoing sessions (wired in node.py): incoming
        sessions take the same tokens and are counted alike."""
        self._heartbeats = heartbeats
        """Where received heartbeats go (the sync manager's channel; full: dropped and
        counted, the next heartbeat or interval tick does the same job)."""
        host.set_handler(SYNC_PROTOCOL, self._serve_sync)
        contexts.local_delta_listeners.append(self.broadcast)

    # -- running ---------------------------------------------------------------------------

    async def run(
        self,
        shutdown_requested: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        for context_id in self.contexts.known_ids():
            self.subscribe(context_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fetcher, nursery)
            nursery.start_soon(self._run_handlers)
            nursery.start_soon(self._expire_pending)
            task_status.started()
            await shutdown_requested.wait()
            nursery.cancel_scope.cancel()

    def subscribe(self, context_id: bytes) -> None:
        topic = topic_for(context_id)
        if topic not in self.pubsub.topics():
            self.pubsub.subscribe(topic)

    # -- outbound --------------------------------------------------------------------------

    def broadcast(self, context_id: bytes, delta: SignedDelta) -> None:
        """Publish a delta this node just committed (called synchronously after commit)."""
        self.subscribe(context_id)
        message = encode_gossip(DeltaGossip(context_id=context_id, delta=delta.encode()))
        self.pubsub.publish(topic_for(context_id), message)
        self.metrics.outcome("published")

    # -- inbound gossip --------------------------------------------------------------------

    async def on_gossip(self, message: GossipMessage) -> None:
        """One gossip message from the network event channel."""
        context_id = context_of(message.topic)
        if context_id is None:
            return
        try:
            gossip = decode_gossip(message.data)
        except RemoteProtocolError as exc:
            self.metrics.outcome("rejected_malformed")
            log.info("malformed gossip from %s: %s", message.author, exc)
            return
        if gossip.context_id != context_id:
            self.metrics.outcome("rejected_malformed")
            return
        if isinstance(gossip, Heartbeat):
            if self._heartbeats is not None:
                # Sync with the member that sent it if we can reach it, else the relay.
                author = message.author
                peer = author if author in self.host.connections else message.received_from
                try:
                    self._heartbeats.send_nowait((peer, gossip))
                except trio.WouldBlock:
                    self.metrics.outcome("heartbeat_dropped")
            return
        await self.receive_from(message.received_from, context_id, gossip.delta)

    async def receive_from(self, peer: PeerId, context_id: bytes, wire: bytes) -> None:
        try:
            result = await self.contexts.receive(context_id, wire)
        except ContextError:
            return  # not a member: we only relay this context's gossip
        except ProtocolError as exc:
            self.metrics.outcome("rejected_invalid")
            log.info("invalid delta from %s: %s", peer, exc)
            return
        if (
            result.missing
            and not self.contexts.snapshot_running(context_id)
            and not await self.contexts.is_fresh(context_id)
        ):
            # (A node with no state takes it from its first sync, a snapshot whose boundary
            # releases what waits here, then the tail; chasing history now would duplicate
            # that.)
            self.request_fetch(peer, context_id, result.missing)

    def request_fetch(self, peer: PeerId, context_id: bytes, ids: frozenset[bytes]) -> None:
        wanted = frozenset(i for i in ids if (context_id, i) not in self._fetching)
        if not wanted:
            return
        try:
            self._send_fetch.send_nowait(_Fetch(peer, context_id, wanted))
        except trio.WouldBlock:
            self.metrics.fetches.labels("dropped").inc()  # sync sessions will fill the gap
            return
        self._fetching.update((context_id, i) for i in wanted)

    async def _fetcher(self, nursery: trio.Nursery) -> None:
        async for request in self._receive_fetch:
            nursery.start_soon(self._fetch, request)

    async def _fetch(self, request: _Fetch) -> None:
        async with self._fetch_limit:
            try:
                with trio.fail_after(self.fetch_timeout):
                    await self.fetch(request.peer, request.context_id, set(request.ids))
                self.metrics.fetches.labels("ok").inc()
            except SESSION_ERRORS as exc:
                self.metrics.fetches.labels("failed").inc()
                log.info(
                    "fetching %d deltas from %s failed: %s", len(request.ids), request.peer, exc
                )
            finally:
                self._fetching.difference_update((request.context_id, i) for i in request.ids)

    async def fetch(
        self, peer: PeerId, context_id: bytes, ids: set[bytes], *, max_rounds: int | None = None
    ) -> int:
        """Get `ids` and, breadth-first, whatever they still lack, from `peer` (at most
        `max_rounds` requests, default `max_fetch_rounds`)."""
        _, stream = await self.host.new_stream(peer, [SYNC_PROTOCOL])
        received = 0
        async with stream:
            conn = self.host.connections.get(peer)
            if conn is None:
                raise PeerError(f"lost the connection to {peer}")
            channel = self._requesting(stream)
            await channel.send(await self._auth(conn, context_id))
            wanted = set(ids)
            for _ in range(self.max_fetch_rounds if max_rounds is None else max_rounds):
                if not wanted:
                    break
                batch = sorted(wanted)[:MAX_IDS]
                await channel.send(DeltaRequest(ids=batch))
                reply = await channel.receive()
                if isinstance(reply, SyncError):
                    raise PeerFailed(f"{peer} refused: {reply.message}")
                if not isinstance(reply, DeltaResponse):
                    raise RemoteProtocolError(f"expected deltas, got {type(reply).__name__}")
                wanted.difference_update(batch)
                asked = set(batch)
                for wire in reply.deltas:
                    verified = verify_wire(wire)  # once: the processor takes it as it is
                    if verified.id not in asked:
                        # Not what we asked for (a wrong id): never applied, whatever it is.
                        self.metrics.outcome("rejected_invalid")
                        log.info("%s sent a delta that was not requested", peer)
                        continue
                    result = await self.contexts.receive(context_id, verified)
                    received += len(result.applied)
                    wanted.update(result.missing)
                if reply.missing:
                    log.info("%s lacks %d requested deltas", peer, len(reply.missing))
            await stream.send_eof()
        return received

    @asynccontextmanager
    async def session(
        self, peer: PeerId, context_id: bytes
    ) -> AsyncIterator[tuple[_Channel, Connection]]:
        """A sync stream to `peer` on which we have proved our membership of `context_id`
        (for the state-based protocols: snapshot, tree comparison)."""
        _, stream = await self.host.new_stream(peer, [SYNC_PROTOCOL])
        async with stream:
            conn = self.host.connections.get(peer)
            if conn is None:
                raise PeerError(f"lost the connection to {peer}")
            channel = self._requesting(stream)
            await channel.send(await self._auth(conn, context_id))
            yield channel, conn
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_eof()

    async def _auth(self, conn: Connection, context_id: bytes) -> SyncAuth:
        member, key = await self.contexts.member_key(context_id)
        signature = key.sign(auth_message(conn.noise.remote.handshake_hash, context_id))
        return SyncAuth(context_id=context_id, member=member, signature=signature)

    # -- serving ---------------------------------------------------------------------------

    async def ask_heads(self, peer: PeerId, context_id: bytes) -> HeadsResponse:
        """Open a session: the peer's heads and root hash for `context_id`."""
        _, stream = await self.host.new_stream(peer, [SYNC_PROTOCOL])
        async with stream:
            conn = self.host.connections.get(peer)
            if conn is None:
                raise PeerError(f"lost the connection to {peer}")
            channel = self._requesting(stream)
            await channel.send(await self._auth(conn, context_id))
            _, ours, _ = await self.contexts.state(context_id)
            await channel.send(HeadsRequest(heads=ours[:MAX_IDS]))
            reply = await channel.receive()
            if isinstance(reply, SyncError):
                raise PeerFailed(f"{peer} refused: {reply.message}")
            if not isinstance(reply, HeadsResponse):
                raise RemoteProtocolError(f"expected heads, got {type(reply).__name__}")
            await stream.send_eof()
            return reply

    def _requesting(self, stream: trio.abc.Stream) -> _Channel:
        return _Channel(stream, self.host.stream_limits.for_requester())

    async def _serve_sync(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        # Until the peer has proved membership its stream holds no limiter token and may
        # send one small frame, within the first-message deadline: silent or anonymous
        # streams cost the node almost nothing and never make members wait.
        channel = _Channel(stream, self.host.stream_limits, max_frame=MAX_AUTH_FRAME)
        try:
            first = await channel.receive()
        except StreamEndedError:
            raise  # silent or gone: it costs the stream (and the peer may only be slow)
        except RemoteProtocolError:
            # Garbage or an oversized frame before any proof: no member's node sends that.
            self.host.report_misbehaviour(conn.peer_id, "sync_before_auth")
            raise
        if not isinstance(first, SyncAuth):
            self.host.report_misbehaviour(conn.peer_id, "sync_before_auth")
            raise RemoteProtocolError("a sync stream must start with auth")
        problem = await self._check_auth(conn, first)
        if problem is not None:
            self.metrics.sync_refused.inc()
            await channel.send(SyncError(message=problem))
            return
        self.host.member_proven(conn.peer_id, first.context_id)
        channel.allow_frames(MAX_FRAME)
        if self.session_limiter is None:
            await self._serve_session(channel, stream, conn, first)
            return
        # Incoming sessions share the limiter with outgoing ones, but never *wait* for it:
        # two nodes whose tokens are all held by sessions towards each other would otherwise
        # each wait for the other until the timeouts fired. A busy node says so at once; the
        # requester backs off and tries again.
        try:
            self.session_limiter.acquire_nowait()
        except trio.WouldBlock:
            self.metrics.sync_busy.inc()
            await channel.send(SyncError(message="busy: too many sync sessions"))
            return
        try:
            if self.session_started is not None:
                self.session_started()
            await self._serve_session(channel, stream, conn, first)
        finally:
            self.session_limiter.release()

    async def _serve_session(
        self,
        channel: _Channel,
        stream: trio.abc.HalfCloseableStream,
        conn: Connection,
        first: SyncAuth,
    ) -> None:
        state_sync = SessionResponder(self.contexts, conn, first.context_id, first.member)
        while (message := await channel.receive(eof_ok=True)) is not None:
            if isinstance(message, HeadsRequest):
                heads, known, root = await self.contexts.capture(first.context_id, message.heads)
                await channel.send(
                    HeadsResponse(heads=heads[:MAX_IDS], root_hash=root, known=known[:MAX_IDS])
                )
                continue
            if not isinstance(message, DeltaRequest):
                # Snapshot and tree comparison (raises for anything else).
                await channel.send(await state_sync.handle(message))
                continue
            found: list[bytes] = []
            missing: list[bytes] = []
            for delta_id in message.ids:
                wire = await self.contexts.read_delta(first.context_id, delta_id)
                (found if wire is not None else missing).append(wire or delta_id)
            await channel.send(DeltaResponse(deltas=found, missing=missing))
        await stream.send_eof()

    async def _check_auth(self, conn: Connection, auth: SyncAuth) -> str | None:
        if auth.context_id not in self.contexts.known_ids():
            return "unknown context"
        try:
            Ed25519PublicKey.from_public_bytes(auth.member).verify(
                auth.signature, auth_message(conn.noise.remote.handshake_hash, auth.context_id)
            )
        except (InvalidSignature, ValueError):
            return "bad membership proof"
        if await self.contexts.role(auth.context_id, auth.member) is None:
            return "not a member"
        return None

    # -- background ------------------------------------------------------------------------

    async def _run_handlers(self) -> None:
        while True:
            queued = self.contexts.handler_wakeup()
            await self.contexts.run_pending_handlers()
            await queued.wait()

    async def _expire_pending(self) -> None:
        while True:
            await trio.sleep(max(self.pending_timeout / 4, 1.0))
            expired = await self.contexts.expire_pending(self.pending_timeout)
            if expired:
                log.info("evicted %d pending deltas whose parents never arrived", expired)


class _Channel:
    """Typed sync frames over one stream, on the shared framed-stream helper (its deadlines
    and frame-size bound; `limits` default to the config defaults)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        limits: StreamLimits | None = None,
        *,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self._stream = stream
        self._framed = FramedStream(
            stream, limits or StreamLimits(), max_frame=max_frame, what="sync stream"
        )

    def allow_frames(self, max_frame: int) -> None:
        """Accept frames up to `max_frame` bytes from now on (after authentication)."""
        self._framed.max_frame = max_frame

    async def send(self, message: SyncMessage) -> None:
        await self._stream.send_all(frame(message))

    async def receive(self, *, eof_ok: bool = False) -> SyncMessage | None:
        if eof_ok:
            body = await self._framed.receive_frame_or_eof()
            return None if body is None else decode_sync(body)
        return decode_sync(await self._framed.receive_frame())
