"""Heartbeats, batched per peer: `/trionode/heartbeat/1` (issue #16).

A heartbeat tells a peer a context's (heads, root) so that a node that missed gossip
notices and syncs (DESIGN §8). Published on each context's topic, a node with 1,000
contexts sent 1,000 gossip messages per interval, each with its own StrictSign signature,
seqno and topic name, to every mesh peer. Here the sync manager hands every context's beat
to `HeartbeatExchange.send` once per interval, and each connected peer subscribed to some
of those contexts' topics gets one stream with one frame (more only past
`MAX_HEARTBEAT_FRAME`) naming all of them.

On the receiving side each beat becomes the same `(peer, Heartbeat)` a gossip heartbeat
became, on the same bounded channel to the sync manager, so what a heartbeat starts (a
session per context, under the shared limiter and each context's backoff) does not change.
The sender is the Noise-authenticated peer of the stream; what it may claim is what any
subscriber of the topic could publish by gossip.

A peer that (re)subscribes to a context's topic (a reconnection, a healed partition) is
*greeted* at once with a stream of the beats of the topics it just joined (`greet`): whichever
side lacks something starts its session right away, and nobody starts one that would bring
nothing.

Digests (`/trionode/heartbeat/2`, `trionode/sync/heartbeat.py`): the periodic heartbeat
offers a digest of its beats first, and the peer answers with a match (nothing more
crosses: a few dozen bytes however many contexts the two share) or with a digest per
bucket of contexts, and only the beats of differing buckets follow. A match, and the
matching buckets, reach the sync manager as one `Confirmed` (the contexts where the peer
has nothing we lack) instead of a heartbeat per context. Our side of the comparison is
the beats this node last sent (`send` keeps them), so it may lag by one interval: a lag
can only make a bucket differ (and its beats cross), or match an older state of ours that
the peer has caught up with, which we hold too. A peer that does not speak /2 (an older
node) is sent /1: the sender proposes /2 then /1, and both are served. Greetings stay on
/1: they name only the contexts just joined, and should start a session whichever side
lacks something.

Bounds against a hostile peer: a peer's streams draw on a bucket of `BURST` tokens, one
token back per half interval, and a full bucket with each new connection (a handshake paid
for it); a stream with no token is closed unread, counted. So a greeting and the periodic
beat never crowd each other out, and a flood gets one stream per half interval. Frames of
at most `MAX_HEARTBEAT_FRAME`, at most `max_beats` beats per stream, the shared stream
deadlines and one deadline (`timeout`) for the whole stream, including waits while the
sync manager's queue is full: what it cuts off, the next heartbeat or sync tick does again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import trio
from prometheus_client import CollectorRegistry, Counter

from trionode.errors import PeerError, ProtocolError, RemoteProtocolError
from trionode.net.framed import FramedStream, StreamLimits
from trionode.net.host import Connection, Host
from trionode.net.pubsub import PubSub
from trionode.sync.heartbeat import (
    BeatsReceived,
    Confirmed,
    DigestAnswer,
    DigestLimits,
    DigestOffer,
    Outcome,
)
from trionode.wire.keys import PeerId
from trionode.wire.messages import (
    MAX_HEARTBEAT_FRAME,
    Beat,
    Heartbeat,
    decode_heartbeats,
    encode_heartbeats,
)

log = logging.getLogger(__name__)

HEARTBEAT_PROTOCOL: Final = "/trionode/heartbeat/1"
DIGEST_PROTOCOL: Final = "/trionode/heartbeat/2"
"""/1 with a digest first (`trionode/sync/heartbeat.py`)."""
HeartbeatNews = Heartbeat | Confirmed
"""What the exchange hands the sync manager: a peer's beat of one context, or the contexts
where a digest showed the peer's beats equal ours."""
BURST: Final = 3
"""Heartbeat streams a peer may send at once (a greeting or two beside the periodic one)."""
_SEND_ERRORS: Final = (
    PeerError,
    ProtocolError,
    trio.TooSlowError,  # (the protocol negotiation's own deadline)
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class HeartbeatMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.batches = Counter(
            "trionode_heartbeat_batches",
            "Heartbeat streams (one per peer and interval) by direction "
            "(sent, received, refused: too soon, malformed, too many beats or too slow)",
            ["direction"],
            registry=registry,
        )
        self.bytes = Counter(
            "trionode_heartbeat_bytes",
            "Heartbeat frame bytes by direction (sent, received)",
            ["direction"],
            registry=registry,
        )
        self.digests = Counter(
            "trionode_heartbeat_digests",
            "Digest heartbeat streams (/2) by side (offered, answered) and outcome (same: "
            "the digests matched; listed: the beats of differing buckets crossed; failed)",
            ["side", "outcome"],
            registry=registry,
        )


class HeartbeatExchange:
    """Sends each peer one heartbeat stream per interval and serves the peers' ones."""

    def __init__(
        self,
        host: Host,
        pubsub: PubSub,
        received: trio.MemorySendChannel[tuple[PeerId, HeartbeatNews]] | None,
        metrics: HeartbeatMetrics,
        *,
        interval: float = 5.0,
        max_beats: int = 16384,
        timeout: float = 30.0,
        digests: DigestLimits | None = None,
    ) -> None:
        self._host = host
        self._pubsub = pubsub
        self._received = received
        self.metrics = metrics
        self.min_spacing = interval / 2
        """A peer gets one stream token back per this many seconds (it sends one stream per
        interval, and greetings), up to `BURST`; a stream without one is refused."""
        self.max_beats = max_beats
        self.timeout = timeout
        """Seconds one peer's stream may take to send (or to be read and passed on)."""
        self.digests = digests or DigestLimits(max_beats=max_beats)
        """None: /2 is neither offered nor served (peers are sent /1)."""
        self.protocols = (
            (DIGEST_PROTOCOL, HEARTBEAT_PROTOCOL) if digests is not None else (HEARTBEAT_PROTOCOL,)
        )
        """What the periodic heartbeat proposes, most preferred first."""
        self._local: Mapping[str, Beat] = {}
        """The beats we last sent, by topic: our side of a peer's digest."""
        self._tokens: dict[PeerId, tuple[float, float, Connection]] = {}
        """Per peer: stream tokens left, when that was counted, and on which connection."""
        host.set_handler(HEARTBEAT_PROTOCOL, self._serve)
        if digests is not None:
            host.set_handler(DIGEST_PROTOCOL, self._serve_digest)

    # -- sending ---------------------------------------------------------------------------

    async def send(self, beats: Mapping[str, Beat]) -> int:
        """Send each connected peer the beats of the topics (`trionode/context/…`) it is
        subscribed to, one stream per peer, all at once; returns how many peers got one.
        A peer speaking /2 gets a digest first, and the beats only where we differ."""
        self._local = beats
        batches: dict[PeerId, list[Beat]] = {}
        for peer in list(self._host.connections):
            mine = [beats[t] for t in self._pubsub.peer_topics(peer) if t in beats]
            if mine:
                batches[peer] = sorted(mine, key=lambda b: b.context_id)
        async with trio.open_nursery() as nursery:
            for peer, peer_beats in batches.items():
                nursery.start_soon(self._send_to, peer, peer_beats, self.protocols)
        return len(batches)

    async def greet(self, peer: PeerId, beats: list[Beat]) -> bool:
        """Send `peer` these beats now (it just subscribed to their topics); whether they
        went out."""
        return await self._send_to(peer, sorted(beats, key=lambda b: b.context_id))

    async def _send_to(
        self, peer: PeerId, beats: list[Beat], protocols: tuple[str, ...] = (HEARTBEAT_PROTOCOL,)
    ) -> bool:
        with trio.move_on_after(self.timeout):
            try:
                protocol, stream = await self._host.new_stream(peer, protocols)
                async with stream:
                    if protocol == DIGEST_PROTOCOL:
                        sent = await self._offer(stream, beats)
                    else:
                        sent = await self._send_beats(stream, beats)
            except _SEND_ERRORS:
                return False  # gone, too slow or not speaking it: sync ticks still reach it
            self.metrics.batches.labels("sent").inc()
            self.metrics.bytes.labels("sent").inc(sent)
            return True
        return False

    async def _send_beats(self, stream: trio.abc.HalfCloseableStream, beats: list[Beat]) -> int:
        """/1: every beat; returns the bytes sent."""
        bodies = encode_heartbeats(beats)
        framed = FramedStream(stream, StreamLimits(), max_frame=0, what="heartbeat stream")
        for body in bodies:
            await framed.send_frame(body)
        await stream.send_eof()
        return sum(len(b) + 4 for b in bodies)

    async def _offer(self, stream: trio.abc.HalfCloseableStream, beats: list[Beat]) -> int:
        """/2: our digest, then the beats of the buckets where the peer differs; returns
        the bytes sent (ProtocolError if the peer answered wrong or not at all)."""
        offer = DigestOffer(beats, self.digests)
        framed = FramedStream(
            stream,
            self._host.stream_limits.for_requester(),
            max_frame=offer.max_frame,
            what="heartbeat digest",
        )
        sent = 0
        try:
            while True:
                for body in offer.frames_to_send():
                    await framed.send_frame(body)
                    sent += len(body) + 4
                if offer.done:
                    break
                answer = await framed.receive_frame_or_eof()
                if answer is None:
                    offer.receive_eof()
                    break
                self.metrics.bytes.labels("received").inc(len(answer) + 4)
                offer.receive_frame(answer)
            await stream.send_eof()
        finally:
            self.metrics.digests.labels("offered", offer.outcome.value).inc()
        if offer.outcome is Outcome.FAILED:
            raise RemoteProtocolError("the peer ended the digest stream without an answer")
        return sent

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        await self._serve_stream(stream, conn, self._receive)

    async def _serve_digest(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        await self._serve_stream(stream, conn, self._answer)

    async def _serve_stream(
        self,
        stream: trio.abc.HalfCloseableStream,
        conn: Connection,
        receive: Callable[[PeerId, FramedStream], Awaitable[None]],
    ) -> None:
        peer = conn.peer_id
        if not self._take_token(conn, trio.current_time()):
            self.metrics.batches.labels("refused").inc()
            await trio.aclose_forcefully(stream)
            return
        self._forget_gone()
        framed = FramedStream(
            stream, self._host.stream_limits, max_frame=MAX_HEARTBEAT_FRAME, what="heartbeat"
        )
        outcome = "received"
        with trio.move_on_after(self.timeout) as scope:
            try:
                await receive(peer, framed)
            except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                outcome = "refused"
                log.info("heartbeats from %s refused: %s", peer, exc)
        if scope.cancelled_caught:
            outcome = "refused"
        self.metrics.batches.labels(outcome).inc()
        await trio.aclose_forcefully(stream)

    async def _receive(self, peer: PeerId, framed: FramedStream) -> None:
        """/1: pass each beat of the stream's frames on, waiting while the sync manager's
        queue is full (the stream's deadline bounds the wait)."""
        taken = 0
        while (body := await framed.receive_frame_or_eof()) is not None:
            batch = decode_heartbeats(body)
            taken += len(batch.beats)
            if taken > self.max_beats:
                raise ProtocolError(f"more than {self.max_beats} beats in one stream")
            self.metrics.bytes.labels("received").inc(len(body) + 4)
            await self._pass_on(peer, BeatsReceived(tuple(batch.beats)))

    async def _answer(self, peer: PeerId, framed: FramedStream) -> None:
        """/2: compare the peer's digest with our beats of the contexts we share with it,
        answer, and pass on what the comparison shows (`Confirmed`, then the beats of the
        differing buckets)."""
        local = self._local
        ours = [local[t] for t in self._pubsub.peer_topics(peer) if t in local]
        answer = DigestAnswer(ours, self.digests)
        try:
            while True:
                framed.max_frame = answer.max_frame
                body = await framed.receive_frame_or_eof()
                if body is None:
                    answer.receive_eof()
                    return
                self.metrics.bytes.labels("received").inc(len(body) + 4)
                events = answer.receive_frame(body)
                for out in answer.frames_to_send():
                    await framed.send_frame(out)
                    self.metrics.bytes.labels("sent").inc(len(out) + 4)
                for event in events:
                    await self._pass_on(peer, event)
        finally:
            self.metrics.digests.labels("answered", answer.outcome.value).inc()

    async def _pass_on(self, peer: PeerId, event: Confirmed | BeatsReceived) -> None:
        """To the sync manager (waiting while its queue is full)."""
        if self._received is None:
            return
        if isinstance(event, Confirmed):
            await self._received.send((peer, event))
            return
        for beat in event.beats:
            heartbeat = Heartbeat(
                context_id=beat.context_id, heads=beat.heads, root_hash=beat.root_hash
            )
            await self._received.send((peer, heartbeat))

    def _take_token(self, conn: Connection, now: float) -> bool:
        tokens, at, on = self._tokens.get(conn.peer_id, (float(BURST), now, conn))
        if on is not conn:
            tokens = float(BURST)  # a new connection: greeted again, and may greet
        tokens = min(float(BURST), tokens + (now - at) / self.min_spacing)
        if tokens < 1:
            return False
        self._tokens[conn.peer_id] = (tokens - 1, now, conn)
        return True

    def _forget_gone(self) -> None:
        """Keep `_tokens` to connected peers (it would otherwise grow with every peer seen;
        a peer forgotten comes back with a full bucket, which its handshake paid for)."""
        if len(self._tokens) > 2 * len(self._host.connections) + 16:
            for peer in list(self._tokens):
                if peer not in self._host.connections:
                    del self._tokens[peer]
