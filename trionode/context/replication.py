"""Replication: deltas over gossip, missing parents over `/trionode/sync/1`.

```
Replicator.run ── replication nursery
   ├─ _fetcher          fetch requests (bounded queue) → one task per request, limited
   ├─ _run_handlers     runs queued app-event handlers (also at start: crash recovery)
   ├─ _expire_pending   evicts pending deltas older than `replication.pending_timeout`
   └─ _broadcaster      gossips the deltas this node authored (a channel from the writer)
```
Every delta this node authors is published on its context's topic right after it commits;
the deltas committed together go out together, one message and one pubsub signature per
context (`DeltaBatch`). A publish that reaches nobody loses nothing: the delta is in the
store and the heads advertise it (the sync issue's heartbeat and sessions fetch it).

Received gossip comes in through the network event channel (one consumer: the node's
event task), so messages are processed one at a time; the deltas of one message are
submitted together and so commit together. A delta whose parents are unknown waits
(pending, persisted) and the sender is asked for them on a sync stream, breadth-first, so
a long gap is filled without recursion; whatever arrives goes through the same `receive`.

Sync streams are for members only: the requester's first frame proves membership by
signing the connection's Noise handshake hash with its member key.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Final

import attrs
import base58
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trionode.context.errors import ContextError
from trionode.context.heartbeats import HeartbeatExchange, HeartbeatMetrics, HeartbeatNews
from trionode.context.local_writes import Authored
from trionode.context.manager import ContextManager
from trionode.context.notices import b58
from trionode.context.processing import Received
from trionode.dag.delta import (
    MAX_DELTA_BYTES,
    SignedDelta,
    VerifiedDelta,
    decode_delta,
    verify_delta,
)
from trionode.errors import (
    LocalProtocolError,
    PeerError,
    ProtocolError,
    RemoteProtocolError,
    StorageError,
)
from trionode.net.events import GossipMessage
from trionode.net.host import Connection, Host
from trionode.net.pubsub import PubSub
from trionode.sync.driver import (
    SyncChannel,
    SyncServer,
    auth_message as auth_message,  # noqa: PLC0414 - re-exported (tests forge proofs with it)
    exchange_heads,
    fetch_deltas,
)
from trionode.sync.heartbeat import DigestLimits
from trionode.sync.machines import DeltaFetch, HeadsExchange
from trionode.wire import shared_batch
from trionode.wire.keys import PeerId
from trionode.wire.messages import (
    MAX_GOSSIP_DELTAS,
    AckGossip,
    DeltaBatch,
    DeltaGossip,
    HeadsResponse,
    Heartbeat,
    SharedDeltaBatch,
    SyncAuth,
    TopicDelta,
    decode_gossip,
    encode_gossip,
)

log = logging.getLogger(__name__)


@attrs.frozen
class OpenedStream:
    """A sync stream negotiated on `conn` (`Replicator.open_sync_stream`)."""

    conn: Connection
    protocol: str
    stream: trio.abc.HalfCloseableStream


SYNC_PROTOCOL: Final = "/trionode/sync/2"
SYNC_PROTOCOL_V1: Final = "/trionode/sync/1"
"""Served still, for peers that do not speak /2 yet: the same messages, but a delta request
never asks for ancestors on it (a /1 responder rejects the fields)."""
TOPIC_PREFIX: Final = "trionode/context/"

SESSION_ERRORS: Final = (
    PeerError,
    ProtocolError,
    ContextError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)
"""What a session or fetch with one peer can fail with: it fails, the node carries on."""


def failure_reason(error: BaseException) -> str:
    """A failed fetch's reason label: its error's type in snake case (a closed set: the
    machines' and the stream's error types), or `timeout`."""
    if isinstance(error, trio.TooSlowError):
        return "timeout"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


def topic_for(context_id: bytes) -> str:
    return TOPIC_PREFIX + b58(context_id)  # (cached: every publish names its topic)


@functools.lru_cache(maxsize=4096)
def context_of(topic: str) -> bytes | None:
    """The context a topic is named after (None: not a context's topic). Cached: every
    gossip message asks, and base58 decoding is pure Python (~30 us per message, issue
    #16); the topics a node hears are those it subscribed to, a bounded set."""
    if not topic.startswith(TOPIC_PREFIX):
        return None
    try:
        raw = base58.b58decode(topic[len(TOPIC_PREFIX) :])
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


def _delta_id(wire: bytes) -> bytes:
    return decode_delta(wire).id


def batch_of(
    context_id: bytes, deltas: Sequence[SignedDelta]
) -> TopicDelta | DeltaBatch | SharedDeltaBatch:
    """The gossip message for deltas committed together: one delta as it is (the topic
    names the context: `TopicDelta`); several as a
    `SharedDeltaBatch` when sharing their authors' keys and parent ids makes it smaller
    (and it rebuilds the same bytes), else as a plain `DeltaBatch`."""
    wires = [delta.encode() for delta in deltas]
    if len(wires) == 1:
        return TopicDelta(wires[0])
    plain = DeltaBatch(context_id=context_id, deltas=wires)
    authors = [verify_delta(d, context_id=context_id).author for d in deltas]  # (cached: ours)
    shared, parts = shared_batch.pack(wires, [d.id for d in deltas], authors)
    if shared_batch.packed_size(shared, parts) >= sum(len(w) + 5 for w in wires):
        return plain
    rebuilt = shared_batch.unpack(
        shared, parts, id_of=_delta_id, max_delta_bytes=max(len(w) for w in wires)
    )
    if rebuilt != wires:  # (a bug, never the peer's problem: send what surely works)
        log.error("a shared delta batch did not rebuild its deltas; sending them plain")
        return plain
    return SharedDeltaBatch(context_id=context_id, shared=shared, deltas=parts)


class ReplicationMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.deltas = Counter(
            "trionode_deltas",
            "Received and local deltas by outcome (applied, pending, cascaded, duplicate, "
            "evicted, rejected_<reason>, published; unpublished: authored when no peer was on "
            "the topic; deferred: stamped ahead of our clock, "
            "waits; refused_ahead: beyond max_clock_drift + pending_timeout, not stored; "
            "refused_state_ahead: state records beyond max_clock_drift; folded: final deltas "
            "whose bodies left the undo log for the final state)",
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
            "Missing-parent fetches by outcome (ok, failed, dropped: the queue was full, "
            "arrived: everything asked for came another way before its turn, folded)",
            ["outcome"],
            registry=registry,
        )
        self.fetch_failures = Counter(
            "trionode_delta_fetch_failures",
            "Delta fetches that failed (a missing-parent fetch, or the delta fetch of a sync "
            "session), by reason: the machine's verdict on an answer (answer_mismatch, "
            "too_many_ids, unexpected_message, unrequested: an ancestor or delta nobody asked "
            "for), a delta in it that does not decode or verify (remote_protocol_error), one "
            "the processor refused, the stream (stream_ended_error, stream_stalled_error), the "
            "peer (peer_error, peer_refused) or the fetch's time (timeout)",
            ["reason"],
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
        # These two let an operator (and the kill -9 matrix) see a session being served
        # right now, not only sessions that ended.
        self.serving = Gauge(
            "trionode_sync_serving",
            "Sync sessions this node is serving now (the member's proof was accepted)",
            registry=registry,
        )
        self.served_deltas = Counter(
            "trionode_sync_served_deltas",
            "Deltas sent to members in sync sessions this node served",
            registry=registry,
        )
        self.fetch_requests = Counter(
            "trionode_sync_delta_requests",
            "Delta requests this node sent (round trips of delta sync and gap fetches)",
            registry=registry,
        )
        self.heartbeat = HeartbeatMetrics(registry)
        self._outcomes: dict[str, Counter] = {}
        """`deltas` by outcome, as `labels` gave them: looking a label up costs ~10 us (a
        lock, a tuple, checks), and every received delta counts one or two (issue #16).
        The outcomes are a closed set of names."""

    def outcome(self, outcome: str, n: int = 1) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.deltas.labels(outcome)
        child.inc(n)

    def fetch_failed(self, error: BaseException | str) -> None:
        self.fetch_failures.labels(error if isinstance(error, str) else failure_reason(error)).inc()

    def pending_depth(self, depth: int) -> None:
        self.pending.set(depth)

    def heads(self, count: int) -> None:
        self.heads_histogram.observe(count)

    def handler_run(self, *, ok: bool) -> None:
        self.handlers.labels("ok" if ok else "failed").inc()


class FoldedClaims:
    """Which peers answered "folded" for which ids of a context (bounded: the oldest claims
    are forgotten first). Such a peer is not asked for those ids again; whether waiting
    for them may end is for our own finality to say (`release_past_folded`), so a false
    claim costs at most that one peer's answer, and the id is still asked of others."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._claims: dict[bytes, OrderedDict[bytes, set[PeerId]]] = {}

    def note(self, context_id: bytes, peer: PeerId, ids: Iterable[bytes]) -> None:
        claims = self._claims.setdefault(context_id, OrderedDict())
        for delta_id in ids:
            claims.setdefault(delta_id, set()).add(peer)
            claims.move_to_end(delta_id)
        while len(claims) > self._limit:
            claims.popitem(last=False)

    def by(self, context_id: bytes, peer: PeerId) -> set[bytes]:
        """The ids `peer` said it folded."""
        claims = self._claims.get(context_id)
        return set() if claims is None else {i for i, who in claims.items() if peer in who}

    def ids(self, context_id: bytes) -> set[bytes]:
        return set(self._claims.get(context_id, ()))

    def forget(self, context_id: bytes, ids: Iterable[bytes]) -> None:
        claims = self._claims.get(context_id)
        if claims is None:
            return
        for delta_id in ids:
            claims.pop(delta_id, None)
        if not claims:
            del self._claims[context_id]


class AuthoredGossip:
    """Where the delta processor hands each delta this node authored once it is durable
    (`LocalWriter`'s `authored`): to the broadcaster's channel while a peer is on the
    context's topic; with nobody there it is counted `unpublished` at once, as the
    broadcaster would when its turn came, without waking it (a lone node's every write
    woke it for nothing: a task step, a channel's receive and a message's checks, ~400
    bytecodes of each sequential call, issue #16). Either way the topic is subscribed."""

    def __init__(
        self,
        channel: trio.MemorySendChannel[Authored],
        pubsub: PubSub,
        metrics: ReplicationMetrics,
    ) -> None:
        self._channel = channel
        self._pubsub = pubsub
        self._metrics = metrics

    def send_nowait(self, value: Authored) -> None:
        """trio.WouldBlock when the broadcaster's channel is full (`LocalWriter._announce`)."""
        pubsub = self._pubsub
        topic = topic_for(value.context_id)
        if pubsub.has_topic_peers(topic):
            self._channel.send_nowait(value)
            return
        # (`Replicator.broadcast` with no peer on the topic, which its turn would have been)
        if topic not in pubsub.topics():
            pubsub.subscribe(topic)
        self._metrics.outcome("unpublished", 1)


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
        max_ancestors: int = 1024,
        ancestor_headers: int = 4096,
        walk_budget: float | None = None,
        max_concurrent_fetches: int = 8,
        session_limiter: trio.CapacityLimiter | None = None,
        session_started: Callable[[], None] | None = None,
        heartbeats: trio.MemorySendChannel[tuple[PeerId, HeartbeatNews]] | None = None,
        serve_max_requests: int = 1024,
        serve_timeout: float | None = None,
        snapshot_idle_timeout: float = 60.0,
        snapshot_keepalive: float = 5.0,
        acks: Callable[[bytes, bytes], Awaitable[bool]] | None = None,
        authored: trio.MemoryReceiveChannel[Authored] | None = None,
        max_batch_bytes: int = 256 * 1024,
        heartbeat_interval: float = 5.0,
        heartbeat_max_beats: int = 16384,
        heartbeat_digests: DigestLimits | None = None,
    ) -> None:
        self.contexts = contexts
        self.host = host
        self.pubsub = pubsub
        self.metrics = metrics
        self.pending_timeout = pending_timeout
        self.fetch_timeout = fetch_timeout
        self.max_fetch_rounds = max_fetch_rounds
        self.max_ancestors = max_ancestors
        """Ancestors a delta request asks for (and the most a request we serve gets)."""
        self._fetch_limit = trio.CapacityLimiter(max_concurrent_fetches)
        self._send_fetch, self._receive_fetch = trio.open_memory_channel[_Fetch](256)
        self._fetching: set[tuple[bytes, bytes]] = set()
        self.folded = FoldedClaims()
        """Ids peers answered "folded" for (see `FoldedClaims`)."""
        self.session_limiter = session_limiter
        self.session_started = session_started
        """Shared with the sync manager's outgoing sessions (wired in node.py): incoming
        sessions take the same tokens and are counted alike."""
        self._heartbeats = heartbeats
        """Where received heartbeats go (the sync manager's channel; full: dropped and
        counted, the next heartbeat or interval tick does the same job)."""
        self._acks = acks
        """Where received finality acks go (the AckBook, wired in node.py)."""
        self._server = SyncServer(
            contexts,
            host,
            refused=metrics.sync_refused,
            busy=metrics.sync_busy,
            limiter=session_limiter,
            session_started=session_started,
            max_requests=serve_max_requests,
            session_timeout=serve_timeout,
            serving=metrics.serving,
            served_deltas=metrics.served_deltas,
            max_ancestors=max_ancestors,
            ancestor_headers=ancestor_headers,
            walk_budget=walk_budget,
            snapshot_idle_timeout=snapshot_idle_timeout,
            snapshot_keepalive=snapshot_keepalive,
            acks=acks,
        )
        self._authored = authored
        """The deltas this node authors, once durable (from the LocalWriter, wired in
        node.py): `_broadcaster` gossips them."""
        self._max_batch_bytes = max_batch_bytes
        """Delta bytes one gossip message carries at most (below pubsub's message size)."""
        host.set_handler(SYNC_PROTOCOL, self._serve_sync)
        host.set_handler(SYNC_PROTOCOL_V1, self._serve_sync)
        self.heartbeats = HeartbeatExchange(
            host,
            pubsub,
            heartbeats,
            metrics.heartbeat,
            interval=heartbeat_interval,
            max_beats=heartbeat_max_beats,
            timeout=fetch_timeout,
            digests=heartbeat_digests,
        )
        """Sends each peer one heartbeat stream per interval (for the sync manager) and
        passes the beats peers send on to `heartbeats`."""

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
            if self._authored is not None:
                nursery.start_soon(self._broadcaster, self._authored)
            task_status.started()
            await shutdown_requested.wait()
            nursery.cancel_scope.cancel()

    def subscribe(self, context_id: bytes) -> None:
        topic = topic_for(context_id)
        if topic not in self.pubsub.topics():
            self.pubsub.subscribe(topic)

    # -- outbound --------------------------------------------------------------------------

    async def _broadcaster(self, authored: trio.MemoryReceiveChannel[Authored]) -> None:
        """Gossip what this node authored: whatever queued up meanwhile goes out together,
        one message (one signature) per context and `MAX_GOSSIP_DELTAS` deltas."""
        async for first in authored:
            ready = [first]
            while True:
                try:
                    ready.append(authored.receive_nowait())
                except trio.WouldBlock:
                    break
            by_context: dict[bytes, list[SignedDelta]] = {}
            for item in ready:  # (dicts keep order: each context's deltas stay in order)
                by_context.setdefault(item.context_id, []).append(item.delta)
            for context_id, deltas in by_context.items():
                for part in self._parts(deltas):
                    self.broadcast(context_id, part)

    def _parts(self, deltas: list[SignedDelta]) -> list[list[SignedDelta]]:
        parts: list[list[SignedDelta]] = [[]]
        size = 0
        for delta in deltas:
            current = parts[-1]
            wire = delta.encode()
            if current and (
                len(current) == MAX_GOSSIP_DELTAS or size + len(wire) > self._max_batch_bytes
            ):
                parts.append([])
                size = 0
            parts[-1].append(delta)
            size += len(wire)
        return parts

    def broadcast(self, context_id: bytes, deltas: list[SignedDelta]) -> None:
        """Publish deltas this node committed: one gossip message, one signature. With no
        peer on the topic nothing is built or signed (counted `unpublished`): no one would
        receive it, and heartbeats and sync bring the deltas to peers that come later."""
        self.subscribe(context_id)
        topic = topic_for(context_id)
        if not self.pubsub.has_topic_peers(topic):
            self.metrics.outcome("unpublished", len(deltas))
            return
        message = encode_gossip(batch_of(context_id, deltas))
        try:
            self.pubsub.publish(topic, message)
        except LocalProtocolError as exc:
            # (One delta larger than pubsub's message size: heartbeats and sync carry it.)
            log.warning("not gossiping %d deltas: %s", len(deltas), exc)
            return
        self.metrics.outcome("published", len(deltas))

    # -- inbound gossip --------------------------------------------------------------------

    async def on_gossip(self, message: GossipMessage) -> None:
        """One gossip message from the network event channel. Pubsub forwards it once it
        is judged here (`PubSub.validated`, `trionode/net/pubsub.py`): a delta message as
        soon as its deltas are applied and shown (before any fetch of missing parents),
        anything else once handled; never a malformed one or one whose deltas are all
        invalid."""
        message_id = message.message_id
        accept = False
        try:
            accept = await self._take_gossip(message)
        finally:
            self.pubsub.validated(message_id, accept=accept)  # (nothing if judged before)

    async def _take_gossip(self, message: GossipMessage) -> bool:
        """`on_gossip`'s work; whether the message may be forwarded (if not judged yet)."""
        context_id = context_of(message.topic)
        if context_id is None:
            return False  # (a malformed context topic: nobody's to relay)
        try:
            gossip = decode_gossip(message.data)
        except RemoteProtocolError as exc:
            self.metrics.outcome("rejected_malformed")
            log.info("malformed gossip from %s: %s", message.author, exc)
            return False
        if isinstance(gossip, TopicDelta):
            # (The topic's context: a delta of another one fails its check, as invalid.)
            await self.receive_from(
                message.received_from, context_id, gossip.delta, judged=message.message_id
            )
            return True
        if gossip.context_id != context_id:
            self.metrics.outcome("rejected_malformed")
            return False
        if isinstance(gossip, Heartbeat):
            if self._heartbeats is not None:
                # Sync with the member that sent it if we can reach it, else the relay.
                author = message.author
                peer = author if author in self.host.connections else message.received_from
                try:
                    self._heartbeats.send_nowait((peer, gossip))
                except trio.WouldBlock:
                    self.metrics.outcome("heartbeat_dropped")
            return True
        if isinstance(gossip, AckGossip):
            if self._acks is not None:
                await self._acks(context_id, gossip.ack)
            return True
        if isinstance(gossip, SharedDeltaBatch):
            try:
                wires = shared_batch.unpack(
                    gossip.shared, gossip.deltas, id_of=_delta_id, max_delta_bytes=MAX_DELTA_BYTES
                )
            except RemoteProtocolError as exc:
                self.metrics.outcome("rejected_malformed")
                log.info("malformed delta batch from %s: %s", message.author, exc)
                return False
        else:
            wires = [gossip.delta] if isinstance(gossip, DeltaGossip) else gossip.deltas
        await self.receive_from(
            message.received_from, context_id, *wires, judged=message.message_id
        )
        return True

    async def receive_from(
        self, peer: PeerId, context_id: bytes, *wires: bytes, judged: bytes | None = None
    ) -> None:
        """Take deltas from `peer`, all submitted at once (they commit together). `judged`:
        the id of the gossip message that carried them, judged (`PubSub.validated`) as soon
        as they are staged: rejected only if every one of them is invalid."""
        try:
            results = await self.contexts.receive_many(context_id, wires)
        except ContextError:
            return  # not a member: we only relay this context's gossip
        except StorageError as exc:
            # Our commit failed (the replica reloads from disk): the deltas are not ours to
            # keep yet, but their peers have them and sync brings them again. The gossip
            # handler goes on; the node does not stop over one failed write.
            self.metrics.outcome("store_failed", len(wires))
            log.warning("could not store deltas from %s in %s: %s", peer, b58(context_id), exc)
            return
        if judged is not None:
            valid = not all(isinstance(result, ProtocolError) for result in results)
            self.pubsub.validated(judged, accept=valid)
        missing: set[bytes] = set()
        for result in results:
            if isinstance(result, ProtocolError):
                self.metrics.outcome("rejected_invalid")
                log.info("invalid delta from %s: %s", peer, result)
            else:
                missing |= result.missing
        claimed = missing & self.folded.ids(context_id) if missing else set()
        if claimed:
            # Parents some peer folded: waiting may end if our own finality covers them.
            # (Still asked of this peer unless it said so itself: `request_fetch`.)
            await self.release_past_folded(context_id, claimed)
            missing = set(await self.contexts.missing(context_id)) & missing
        if (
            missing
            and not self.contexts.snapshot_running(context_id)
            and not await self.contexts.is_fresh(context_id)
            # (Over auth.max_nonfinal_bytes the parents would be refused on arrival: a sync
            # session brings them once finality has moved.)
            and not await self.contexts.undo_log_full(context_id)
        ):
            # (A node with no state takes it from its first sync, a snapshot whose boundary
            # releases what waits here, then the tail; chasing history now would duplicate
            # that.)
            self.request_fetch(peer, context_id, frozenset(missing))

    def request_fetch(self, peer: PeerId, context_id: bytes, ids: frozenset[bytes]) -> None:
        folded = self.folded.by(context_id, peer)
        wanted = frozenset(
            i for i in ids if (context_id, i) not in self._fetching and i not in folded
        )
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
                # Gossip often brings a parent just after its child (they took different
                # paths), and a fetch may wait here behind others: ask only for what is
                # still missing when its turn comes.
                ids = request.ids & await self.contexts.missing(request.context_id)
                if not ids:
                    self.metrics.fetches.labels("arrived").inc()
                    return
                with trio.fail_after(self.fetch_timeout):
                    await self.fetch(request.peer, request.context_id, set(ids))
                self.metrics.fetches.labels("ok").inc()
            except SESSION_ERRORS as exc:
                self.metrics.fetches.labels("failed").inc()
                if isinstance(exc, trio.TooSlowError):
                    self.metrics.fetch_failed(exc)  # (inside, the fetch saw a cancellation)
                log.info(
                    "fetching %d deltas from %s failed: %s", len(request.ids), request.peer, exc
                )
            finally:
                self._fetching.difference_update((request.context_id, i) for i in request.ids)

    async def fetch(
        self, peer: PeerId, context_id: bytes, ids: set[bytes], *, max_rounds: int | None = None
    ) -> int:
        """Get `ids` and, breadth-first, whatever they still lack, from `peer` (at most
        `max_rounds` requests, default `max_fetch_rounds`); how many deltas applied."""
        fetching = False
        try:
            async with self.session(peer, context_id) as (channel, _):
                fetching = True
                return await self.fetch_on(channel, peer, context_id, ids, max_rounds=max_rounds)
        except SESSION_ERRORS as exc:
            if not fetching:  # (`fetch_on` counts its own)
                self.metrics.fetch_failed(exc)
            raise

    async def fetch_on(
        self,
        channel: SyncChannel,
        peer: PeerId,
        context_id: bytes,
        ids: set[bytes],
        *,
        max_rounds: int | None = None,
    ) -> int:
        """`fetch` on a sync stream already open to `peer` (a session's one stream)."""
        ancestors = self.max_ancestors if channel.chains else 0
        machine = DeltaFetch(
            ids,
            context_id=context_id,
            max_rounds=self.max_fetch_rounds if max_rounds is None else max_rounds,
            ancestors=ancestors,
            have=await self.contexts.heads_vv(context_id) if ancestors else None,
        )
        received = 0

        async def apply(deltas: Sequence[VerifiedDelta]) -> set[bytes]:
            # Queued together, so they commit together: a chain of ancestors is one
            # commit, not one per delta. (Each is judged alone; the first bad one fails
            # the fetch, as it would have alone.)
            nonlocal received
            if len(deltas) == 1:
                results: list[Received | ProtocolError] = [
                    await self.contexts.receive(context_id, deltas[0])
                ]
            else:
                results = await self.contexts.receive_many(context_id, deltas)
            missing: set[bytes] = set()
            for result in results:
                if isinstance(result, ProtocolError):
                    raise result
                received += len(result.applied)
                missing |= result.missing
            return missing

        try:
            await fetch_deltas(channel, machine, apply)
        except SESSION_ERRORS as exc:
            self.metrics.fetch_failed(exc)
            raise
        finally:
            self.metrics.fetch_requests.inc(machine.rounds)
        if machine.rejected:
            self.metrics.fetch_failed("unrequested")
            # Not what we asked for (a wrong id): never applied, whatever it is.
            self.metrics.outcome("rejected_invalid", machine.rejected)
            log.info("%s sent %d deltas that were not requested", peer, machine.rejected)
        if machine.peer_missing:
            log.info("%s lacks %d requested deltas", peer, len(machine.peer_missing))
        if machine.peer_folded:
            # An honest answer, not a failure: those bodies are gone everywhere they are
            # final. Their effects come as final state; what waits for them may go on once
            # our own finality covers them.
            self.metrics.fetches.labels("folded").inc(len(machine.peer_folded))
            self.folded.note(context_id, peer, machine.peer_folded)
            received += await self.release_past_folded(context_id, machine.peer_folded)
        return received

    async def release_past_folded(self, context_id: bytes, ids: Iterable[bytes]) -> int:
        """`DeltaProcessor.release_past_folded`. A claim is kept (the peer is not asked
        again) until the id turns up applied here after all."""
        ids = set(ids)
        released = await self.contexts.release_past_folded(context_id, ids)
        self.folded.forget(context_id, await self.contexts.applied(context_id, ids))
        return released

    async def open_sync_stream(self, conn: Connection) -> OpenedStream:
        """A sync stream on `conn`, negotiated (no message sent on it yet): for `session`."""
        protocol, stream = await conn.new_stream(
            [SYNC_PROTOCOL, SYNC_PROTOCOL_V1],
            negotiation_timeout=self.host.config.negotiation_timeout,
        )
        return OpenedStream(conn, protocol, stream)

    @asynccontextmanager
    async def session(
        self, peer: PeerId, context_id: bytes, *, opened: OpenedStream | None = None
    ) -> AsyncIterator[tuple[SyncChannel, Connection]]:
        """A sync stream to `peer` on which we have proved our membership of `context_id`:
        a sync session runs all its protocols on one (heads exchange, then delta sync,
        snapshot or tree comparison). `opened`: a stream `open_sync_stream` negotiated
        before (a join's, while it waited for its admission), taken if it runs on the
        peer's connection now (else its opener closes it)."""
        conn = self.host.connections.get(peer)
        if conn is None or conn.closed:
            raise PeerError(f"not connected to {peer}")
        if opened is not None and opened.conn is conn:
            protocol, stream = opened.protocol, opened.stream
        else:
            # The proof names the connection the stream runs on: looked up after opening
            # it, a connection that won a simultaneous dial meanwhile would make it a wrong
            # one.
            protocol, stream = await conn.new_stream(
                [SYNC_PROTOCOL, SYNC_PROTOCOL_V1],
                negotiation_timeout=self.host.config.negotiation_timeout,
            )
        async with stream:
            channel = self._requesting(stream)
            channel.chains = protocol == SYNC_PROTOCOL
            await channel.send(await self._auth(conn, context_id))
            yield channel, conn
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_eof()

    async def _auth(self, conn: Connection, context_id: bytes) -> SyncAuth:
        member, key = await self.contexts.member_key(context_id)
        signature = key.sign(auth_message(conn.noise.remote.handshake_hash, context_id))
        return SyncAuth(context_id=context_id, member=member, signature=signature)

    # -- serving ---------------------------------------------------------------------------

    async def take_ack(self, context_id: bytes, wire: bytes) -> bool:
        """A signed ack a sync session brought (as if gossiped): whether it was kept."""
        return self._acks is not None and await self._acks(context_id, wire)

    async def ask_heads_on(self, channel: SyncChannel, context_id: bytes) -> HeadsResponse:
        """The heads exchange on a session's stream (its first request, or again later)."""
        _, ours, _ = await self.contexts.state(context_id)
        return await exchange_heads(channel, HeadsExchange(ours))

    def _requesting(self, stream: trio.abc.Stream) -> SyncChannel:
        return SyncChannel(stream, self.host.stream_limits.for_requester())

    async def _serve_sync(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        await self._server.serve(stream, conn)

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


_Channel = SyncChannel
"""The sync stream's typed channel (kept under its old name for the tests' raw peers)."""
