"""Heartbeat digests: `/trionode/heartbeat/2` as two sans-IO machines (issue #16).

On `/trionode/heartbeat/1` every interval each peer gets a stream naming the (heads, root)
of every context it shares with us, whether anything changed or not: a node with 1,000
contexts sent ~100 KB per peer every 5 s to say "nothing new". On /2 it sends a digest
first, and names contexts only where the two nodes differ, so an idle heartbeat costs a
few dozen bytes whatever the number of contexts.

Theory of operation
-------------------
The *offer* side (the heartbeat's sender, A) holds its beats for the peer: one
`Beat(context, heads, root)` per context whose topic the peer is on. The *answer* side (B)
holds its own beats for the contexts it shares with A (its contexts on A's topics, as B
sees A's subscriptions): what it would send A. Both sides' beats are built the same way
(sorted heads, at most 256), so two nodes holding the same state of a context hold equal
beats of it.

```
A (offer)                                   B (answer)
  HeartbeatDigest(count, digest)  ──────▶   digest of B's beats equal?
                                  ◀──────   DigestMatch            → B confirms them all; done
                                  ◀──────   DigestBuckets(n x 8 B) → a digest per bucket
  DigestDiff(differing buckets)   ──────▶   B confirms its contexts in the other buckets
  HeartbeatBatch(beats of those)* ──────▶   B takes each beat as a heartbeat (as on /1)
  EOF
```
A context's bucket is its id's first four bytes modulo n (ids are hashes: spread evenly);
B picks n from the larger beat count so that a bucket holds about `bucket_contexts`
contexts, up to `max_buckets`. A write to one context among 1,000 costs ~1 KB of bucket
digests and the beats of one bucket, not 100 KB.

What "confirmed" means: the peer's beat of that context equals ours, so it has nothing we
lack, which is what a /1 heartbeat with equal heads and root told the sync manager
(`SyncManager._on_heartbeat`: no tick session for a context so confirmed). Digests are
SHA-256 (16 bytes for the whole, 8 per bucket): a peer can only make itself look
confirmed by sending what it holds, and a false match costs at most a tick session
skipped once; the next heartbeat or a gossiped delta still starts the session.

Bounds: every frame is decoded with an explicit limit (`max_frame` says how large the next
one may be), a digest's count, the buckets and the beats are bounded by `DigestLimits`
(from `sync.heartbeat_max_buckets` and `sync.heartbeat_max_beats`); whatever a peer gets
wrong (a message out of turn, a bucket out of range or not listed, a context twice) is a
`RemoteProtocolError` and leaves the machine failed. Nothing is confirmed on a stream cut
short before B's answer (and nothing in the differing buckets ever is).
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from typing import Annotated, Final

import attrs
import msgspec

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.messages import (
    MAX_HEARTBEAT_FRAME,
    Beat,
    HeartbeatBatch,
    decode_heartbeats,
    encode_heartbeats,
)

DIGEST_BYTES: Final = 16
BUCKET_DIGEST_BYTES: Final = 8
MAX_BUCKETS: Final = 4096
"""The most buckets the wire format allows (`sync.heartbeat_max_buckets` is at most this)."""
CONTROL_FRAME_OVERHEAD: Final = 64
"""Bytes of a control message besides its buckets (its tag and headers, generously)."""

Digest = Annotated[bytes, msgspec.Meta(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)]
BucketDigest = Annotated[
    bytes, msgspec.Meta(min_length=BUCKET_DIGEST_BYTES, max_length=BUCKET_DIGEST_BYTES)
]


class HeartbeatDigest(msgspec.Struct, tag="digest", frozen=True, array_like=True):
    """A's beats for B, summed up: how many, and the digest of all of them."""

    count: Annotated[int, msgspec.Meta(ge=0)]
    digest: Digest


class DigestMatch(msgspec.Struct, tag="match", frozen=True, array_like=True):
    """B holds the same beats: nothing more follows."""


class DigestBuckets(msgspec.Struct, tag="buckets", frozen=True, array_like=True):
    """B's beats differ: the digest of each of B's buckets (their number is the modulus)."""

    buckets: Annotated[list[BucketDigest], msgspec.Meta(min_length=1, max_length=MAX_BUCKETS)]


class DigestDiff(msgspec.Struct, tag="diff", frozen=True, array_like=True):
    """The buckets where A's beats differ from B's (ascending); their beats follow."""

    differing: Annotated[
        list[Annotated[int, msgspec.Meta(ge=0, lt=MAX_BUCKETS)]],
        msgspec.Meta(max_length=MAX_BUCKETS),
    ]


DigestMessage = HeartbeatDigest | DigestMatch | DigestBuckets | DigestDiff

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(DigestMessage)


def encode_message(message: DigestMessage) -> bytes:
    return _ENCODER.encode(message)


def decode_message(body: bytes | bytearray | memoryview, max_frame: int) -> DigestMessage:
    """One control frame (RemoteProtocolError if it is not one or is too large)."""
    if len(body) > max_frame:
        raise RemoteProtocolError(
            f"heartbeat digest frame of {len(body)} bytes exceeds {max_frame}"
        )
    try:
        message: DigestMessage = _DECODER.decode(body)
        return message
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:  # (bad UTF-8)
        raise RemoteProtocolError(f"malformed heartbeat digest message: {exc}") from None


# -- digests ------------------------------------------------------------------------------------


def _beat_bytes(beat: Beat) -> bytes:
    """A beat in a canonical form: context, root, the heads' count, the heads."""
    return b"".join(
        (beat.context_id, beat.root_hash, len(beat.heads).to_bytes(2, "big"), *beat.heads)
    )


def digest_of(beats: Iterable[Beat]) -> bytes:
    """The digest of a set of beats (in any order; one beat per context)."""
    hasher = hashlib.sha256()
    for beat in sorted(beats, key=lambda b: b.context_id):
        hasher.update(_beat_bytes(beat))
    return hasher.digest()[:DIGEST_BYTES]


def bucket_of(context_id: bytes, buckets: int) -> int:
    return int.from_bytes(context_id[:4], "big") % buckets


def bucket_digests(beats: Iterable[Beat], buckets: int) -> list[bytes]:
    """The digest of each bucket's beats, bucket 0 first."""
    hashers = [hashlib.sha256() for _ in range(buckets)]
    for beat in sorted(beats, key=lambda b: b.context_id):
        hashers[bucket_of(beat.context_id, buckets)].update(_beat_bytes(beat))
    return [h.digest()[:BUCKET_DIGEST_BYTES] for h in hashers]


@attrs.frozen
class DigestLimits:
    """What one digest stream may hold (`sync.heartbeat_max_buckets`, `…_bucket_contexts`,
    `…_max_beats`)."""

    max_buckets: int = 256
    """Buckets an answer may hold (we answer with at most this many, and take no more)."""
    bucket_contexts: int = 8
    """Contexts per bucket we aim at when we answer (so the beats of one bucket are few)."""
    max_beats: int = 16384
    """Beats one stream may name (and the most a digest may count)."""

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.max_buckets <= MAX_BUCKETS:
            raise ValueError(f"max_buckets must be within 1..{MAX_BUCKETS}")
        if self.bucket_contexts < 1 or self.max_beats < 1:
            raise ValueError("bucket_contexts and max_beats must be positive")

    @property
    def control_frame(self) -> int:
        """The largest control frame (a `DigestBuckets` or `DigestDiff` of `max_buckets`)."""
        return CONTROL_FRAME_OVERHEAD + (BUCKET_DIGEST_BYTES + 2) * self.max_buckets

    def buckets_for(self, count: int) -> int:
        return max(1, min(self.max_buckets, -(-count // self.bucket_contexts)))


# -- events --------------------------------------------------------------------------------------


@attrs.frozen
class Confirmed:
    """The peer's beats of these contexts equal ours: it has nothing we lack in them."""

    context_ids: frozenset[bytes]


@attrs.frozen
class BeatsReceived:
    """Beats of contexts where the peer differs from us: each is a heartbeat (as on /1)."""

    beats: tuple[Beat, ...]


DigestEvent = Confirmed | BeatsReceived


class Outcome(enum.Enum):
    PENDING = "pending"
    SAME = "same"
    """The digests matched: nothing but them crossed."""
    LISTED = "listed"
    """Buckets differed; their beats crossed."""
    FAILED = "failed"


def _violation(machine: DigestOffer | DigestAnswer, message: str) -> RemoteProtocolError:
    machine.outcome = Outcome.FAILED
    return RemoteProtocolError(message)


class DigestOffer:
    """A's side: offers the digest of `beats`, lists the beats of the buckets that differ.

    Feed each frame read with `receive_frame`; send what `frames_to_send` returns; the
    machine is `done` once it has nothing more to send (the driver then sends EOF)."""

    def __init__(self, beats: Sequence[Beat], limits: DigestLimits) -> None:
        self._beats = sorted(beats, key=lambda b: b.context_id)
        self._limits = limits
        self._outgoing: list[bytes] = [
            encode_message(HeartbeatDigest(len(self._beats), digest_of(self._beats)))
        ]
        self.outcome = Outcome.PENDING
        self.listed = 0
        """Beats sent after the digest (the contexts where the peer differs)."""

    @property
    def done(self) -> bool:
        return self.outcome is not Outcome.PENDING

    @property
    def max_frame(self) -> int:
        """The largest frame the peer may send next."""
        return self._limits.control_frame

    def frames_to_send(self) -> list[bytes]:
        frames, self._outgoing = self._outgoing, []
        return frames

    def receive_frame(self, body: bytes | bytearray | memoryview) -> None:
        """Take the peer's answer (RemoteProtocolError if it is not one: failed)."""
        if self.done:
            raise _violation(self, "heartbeat digest answer after the exchange ended")
        try:
            message = decode_message(body, self.max_frame)
        except RemoteProtocolError:
            self.outcome = Outcome.FAILED
            raise
        if isinstance(message, DigestMatch):
            self.outcome = Outcome.SAME
            return
        if not isinstance(message, DigestBuckets):
            raise _violation(self, f"expected a digest answer, not {type(message).__name__}")
        n = len(message.buckets)
        if n > self._limits.max_buckets:
            raise _violation(self, f"{n} buckets exceed {self._limits.max_buckets}")
        ours = bucket_digests(self._beats, n)
        differing = [i for i in range(n) if ours[i] != message.buckets[i]]
        wanted = set(differing)
        listed = [b for b in self._beats if bucket_of(b.context_id, n) in wanted]
        self._outgoing.append(encode_message(DigestDiff(differing)))
        self._outgoing += encode_heartbeats(listed)
        self.listed = len(listed)
        self.outcome = Outcome.LISTED

    def receive_eof(self) -> None:
        """The peer closed before answering (an old or failed peer): nothing was compared."""
        if not self.done:
            self.outcome = Outcome.FAILED


class _AnswerState(enum.Enum):
    DIGEST = "await digest"
    DIFF = "await diff"
    BEATS = "beats"
    DONE = "done"


class DigestAnswer:
    """B's side: compares the peer's digest with that of `beats` (ours for the contexts we
    share with it), answers, and turns what follows into events (`receive_frame` returns
    them)."""

    def __init__(self, beats: Sequence[Beat], limits: DigestLimits) -> None:
        self._beats = {b.context_id: b for b in beats}
        self._limits = limits
        self._state = _AnswerState.DIGEST
        self._outgoing: list[bytes] = []
        self._buckets = 0
        self._differing: frozenset[int] = frozenset()
        self._seen: set[bytes] = set()
        self.outcome = Outcome.PENDING

    @property
    def max_frame(self) -> int:
        """The largest frame the peer may send next."""
        if self._state is _AnswerState.BEATS:
            return MAX_HEARTBEAT_FRAME
        return self._limits.control_frame

    @property
    def done(self) -> bool:
        return self._state is _AnswerState.DONE or self.outcome is Outcome.FAILED

    def frames_to_send(self) -> list[bytes]:
        frames, self._outgoing = self._outgoing, []
        return frames

    def receive_frame(self, body: bytes | bytearray | memoryview) -> list[DigestEvent]:
        if self.outcome is Outcome.FAILED:
            raise LocalProtocolError("heartbeat digest machine already failed")
        if self._state is _AnswerState.DONE:
            raise _violation(self, "a heartbeat digest frame after the exchange ended")
        try:
            if self._state is _AnswerState.BEATS:
                return self._receive_beats(decode_heartbeats(body))
            message = decode_message(body, self.max_frame)
        except RemoteProtocolError:
            self.outcome = Outcome.FAILED
            raise
        if self._state is _AnswerState.DIGEST and isinstance(message, HeartbeatDigest):
            return self._receive_digest(message)
        if self._state is _AnswerState.DIFF and isinstance(message, DigestDiff):
            return self._receive_diff(message)
        raise _violation(self, f"unexpected {type(message).__name__} ({self._state.value})")

    def receive_eof(self) -> None:
        """The peer finished (or gave up): nothing more is confirmed or taken."""
        self._state = _AnswerState.DONE
        if self.outcome is Outcome.PENDING:
            self.outcome = Outcome.FAILED

    def _receive_digest(self, message: HeartbeatDigest) -> list[DigestEvent]:
        if message.count > self._limits.max_beats:
            raise _violation(self, f"a digest of {message.count} beats exceeds the limit")
        if message.count == len(self._beats) and message.digest == digest_of(self._beats.values()):
            self._outgoing.append(encode_message(DigestMatch()))
            self._state = _AnswerState.DONE
            self.outcome = Outcome.SAME
            return [Confirmed(frozenset(self._beats))] if self._beats else []
        self._buckets = self._limits.buckets_for(max(message.count, len(self._beats)))
        digests = bucket_digests(self._beats.values(), self._buckets)
        self._outgoing.append(encode_message(DigestBuckets(digests)))
        self._state = _AnswerState.DIFF
        return []

    def _receive_diff(self, message: DigestDiff) -> list[DigestEvent]:
        differing = message.differing
        if any(i >= self._buckets for i in differing) or any(
            a >= b for a, b in itertools.pairwise(differing)
        ):
            raise _violation(self, "differing buckets out of range or not ascending")
        self._differing = frozenset(differing)
        self._state = _AnswerState.BEATS
        self.outcome = Outcome.LISTED
        same = frozenset(
            c for c in self._beats if bucket_of(c, self._buckets) not in self._differing
        )
        return [Confirmed(same)] if same else []

    def _receive_beats(self, batch: HeartbeatBatch) -> list[DigestEvent]:
        for beat in batch.beats:
            if bucket_of(beat.context_id, self._buckets) not in self._differing:
                raise _violation(self, "a beat outside the differing buckets")
            if beat.context_id in self._seen:
                raise _violation(self, "a context named twice")
            self._seen.add(beat.context_id)
        if len(self._seen) > self._limits.max_beats:
            raise _violation(self, f"more than {self._limits.max_beats} beats in one stream")
        return [BeatsReceived(tuple(batch.beats))]
