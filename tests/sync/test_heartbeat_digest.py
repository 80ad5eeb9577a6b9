"""The digest heartbeat (`trionode/sync/heartbeat.py`): two machines in memory, with
hypothesis choosing both nodes' contexts and heads and where the stream is cut.

What must hold: a context is confirmed only where the peer's beat equals ours (the peer
has nothing we lack); every context where the peer's beat differs from ours reaches us as
a beat (when the stream runs to its end); an idle heartbeat (equal beats) costs a fixed
number of bytes however many contexts; and whatever bytes a peer sends, the machines
raise only RemoteProtocolError."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from trionode.errors import RemoteProtocolError
from trionode.sync.heartbeat import (
    BeatsReceived,
    Confirmed,
    DigestAnswer,
    DigestBuckets,
    DigestDiff,
    DigestLimits,
    DigestMatch,
    DigestOffer,
    HeartbeatDigest,
    Outcome,
    bucket_of,
    decode_message,
    encode_message,
)
from trionode.wire.messages import Beat, encode_heartbeats

LIMITS = DigestLimits(max_buckets=16, bucket_contexts=4, max_beats=512)


def _id(tag: str, i: int) -> bytes:
    return hashlib.sha256(f"{tag}{i}".encode()).digest()


def _beat(context: int, heads: tuple[int, ...], root: int = 0) -> Beat:
    return Beat(_id("c", context), sorted(_id("h", h) for h in heads), _id("r", root))


class _Run:
    """One exchange, A offering to B, cut after `cut` frames (None: run to the end)."""

    def __init__(self, ours: list[Beat], theirs: list[Beat], cut: int | None = None) -> None:
        self.offer = DigestOffer(theirs, LIMITS)
        self.answer = DigestAnswer(ours, LIMITS)
        self.confirmed: set[bytes] = set()
        self.received: list[Beat] = []
        self.bytes = {"offer": 0, "answer": 0}
        frames = 0
        while cut is None or frames < cut:
            to_b = self.offer.frames_to_send()
            for body in to_b:
                self.bytes["offer"] += len(body)
                for event in self.answer.receive_frame(body):
                    if isinstance(event, Confirmed):
                        self.confirmed |= event.context_ids
                    else:
                        assert isinstance(event, BeatsReceived)
                        self.received += event.beats
                frames += 1
            if self.offer.done:
                self.answer.receive_eof()
                break
            to_a = self.answer.frames_to_send()
            assert len(to_a) == 1
            self.bytes["answer"] += len(to_a[0])
            self.offer.receive_frame(to_a[0])
            frames += 1


contexts = st.dictionaries(
    st.integers(0, 60),
    st.tuples(st.frozensets(st.integers(0, 3), max_size=3), st.integers(0, 1)),
    max_size=40,
)


@st.composite
def two_nodes(draw: st.DrawFn) -> tuple[list[Beat], list[Beat]]:
    """Our beats and the peer's for the contexts we share: mostly equal, some differing,
    some that only one side names (its view of the other's subscriptions lags)."""
    ours = draw(contexts)
    theirs = {
        c: draw(st.sampled_from([state, (state[0] | {9}, state[1]), (state[0], 1 - state[1])]))
        for c, state in ours.items()
        if draw(st.integers(0, 9))  # (1 in 10 not named by the peer)
    }
    theirs |= {c + 100: s for c, s in draw(contexts).items() if draw(st.booleans())}

    def beats(states: dict[int, tuple[frozenset[int], int]]) -> list[Beat]:
        return [_beat(c, tuple(h), r) for c, (h, r) in states.items()]

    return beats(ours), beats(theirs)


@settings(max_examples=100, deadline=None)
@given(two_nodes(), st.none() | st.integers(0, 6))
def test_only_equal_contexts_are_confirmed_and_every_difference_arrives(
    nodes: tuple[list[Beat], list[Beat]], cut: int | None
) -> None:
    ours, theirs = nodes
    run = _Run(ours, theirs, cut)
    our_beat = {b.context_id: b for b in ours}
    their_beat = {b.context_id: b for b in theirs}
    for context in run.confirmed:
        assert our_beat[context] == their_beat.get(context)
    assert all(their_beat[b.context_id] == b for b in run.received)
    assert len({b.context_id for b in run.received}) == len(run.received)
    if cut is None:
        differing = {c for c, b in their_beat.items() if our_beat.get(c) != b}
        assert differing <= {b.context_id for b in run.received}
        if run.offer.outcome is Outcome.SAME:
            assert run.confirmed == set(our_beat)
        assert run.answer.outcome is run.offer.outcome


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 500))
def test_an_idle_heartbeat_costs_the_same_bytes_for_any_number_of_contexts(n: int) -> None:
    beats = [_beat(i, (i, i + 1)) for i in range(n)]
    run = _Run(beats, beats)
    assert run.offer.outcome is Outcome.SAME
    assert run.confirmed == {b.context_id for b in beats}
    assert run.received == []
    assert run.bytes["offer"] <= 32
    assert run.bytes["answer"] <= 8


def test_one_context_changed_among_many_lists_only_its_bucket() -> None:
    ours = [_beat(i, (i,)) for i in range(400)]
    theirs = [*ours[:-1], _beat(399, (399, 1000))]
    limits = DigestLimits()  # (the defaults: about 8 contexts a bucket)
    offer, answer = DigestOffer(theirs, limits), DigestAnswer(ours, limits)
    sent = offer.frames_to_send()
    assert answer.receive_frame(sent[0]) == []
    answered = answer.frames_to_send()
    offer.receive_frame(answered[0])
    sent += offer.frames_to_send()
    events = [e for body in sent[1:] for e in answer.receive_frame(body)]
    assert offer.outcome is Outcome.LISTED
    (confirmed,), received = events[:1], [b for e in events[1:] for b in e.beats]  # type: ignore[union-attr]
    n = limits.buckets_for(400)
    bucket = bucket_of(_id("c", 399), n)
    assert {b.context_id for b in received} == {
        b.context_id for b in theirs if bucket_of(b.context_id, n) == bucket
    }
    assert confirmed == Confirmed(
        frozenset({b.context_id for b in ours} - {b.context_id for b in received})
    )
    # The answer's bucket digests, the diff and one bucket's beats: a tenth of /1's.
    assert sum(map(len, sent + answered)) * 10 < sum(len(b) for b in encode_heartbeats(ours))


# -- hostile peers ---------------------------------------------------------------------------


def _answer_after_digest() -> tuple[DigestAnswer, int]:
    """An answer machine that found a difference and sent its buckets."""
    answer = DigestAnswer([_beat(i, (i,)) for i in range(40)], LIMITS)
    assert answer.receive_frame(encode_message(HeartbeatDigest(40, bytes(16)))) == []
    buckets = decode_message(answer.frames_to_send()[0], LIMITS.control_frame)
    assert isinstance(buckets, DigestBuckets)
    return answer, len(buckets.buckets)


@pytest.mark.parametrize(
    "body",
    [
        b"\x00garbage",
        encode_message(DigestMatch()),  # an answer, not an offer
        encode_message(HeartbeatDigest(LIMITS.max_beats + 1, bytes(16))),
        encode_message(DigestDiff([])),  # no digest first
        bytes(LIMITS.control_frame + 1),
    ],
)
def test_a_bad_offer_is_the_typed_error(body: bytes) -> None:
    answer = DigestAnswer([_beat(1, (1,))], LIMITS)
    with pytest.raises(RemoteProtocolError):
        answer.receive_frame(body)
    assert answer.outcome is Outcome.FAILED


def test_a_diff_out_of_range_or_unordered_and_beats_not_asked_are_refused() -> None:
    answer, n = _answer_after_digest()
    with pytest.raises(RemoteProtocolError):
        answer.receive_frame(encode_message(DigestDiff([n])))
    answer, n = _answer_after_digest()
    with pytest.raises(RemoteProtocolError):
        answer.receive_frame(encode_message(DigestDiff([1, 1])))
    answer, n = _answer_after_digest()
    outside = next(i for i in range(100) if bucket_of(_id("c", i), n) != 0)
    answer.receive_frame(encode_message(DigestDiff([0])))
    with pytest.raises(RemoteProtocolError):
        answer.receive_frame(encode_heartbeats([_beat(outside, ())])[0])
    answer, n = _answer_after_digest()
    inside = next(i for i in range(100) if bucket_of(_id("c", i), n) == 0)
    answer.receive_frame(encode_message(DigestDiff([0])))
    answer.receive_frame(encode_heartbeats([_beat(inside, ())])[0])
    with pytest.raises(RemoteProtocolError):  # the same context twice
        answer.receive_frame(encode_heartbeats([_beat(inside, (1,))])[0])


def test_a_bad_answer_is_the_typed_error() -> None:
    for body in (
        b"",
        encode_message(HeartbeatDigest(0, bytes(16))),
        encode_message(DigestBuckets([bytes(8)] * (LIMITS.max_buckets + 1))),
    ):
        offer = DigestOffer([_beat(1, (1,))], LIMITS)
        offer.frames_to_send()
        with pytest.raises(RemoteProtocolError):
            offer.receive_frame(body)
        assert offer.outcome is Outcome.FAILED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.booleans())
def test_any_bytes_from_a_peer_raise_only_the_typed_error(
    frames: list[bytes], after_digest: bool
) -> None:
    answer = _answer_after_digest()[0] if after_digest else DigestAnswer([], LIMITS)
    offer = DigestOffer([_beat(1, (1,))], LIMITS)
    offer.frames_to_send()
    for machine in (answer, offer):
        try:
            for body in frames:
                machine.receive_frame(body)
        except RemoteProtocolError:
            assert machine.outcome is Outcome.FAILED
