"""The sync machines (`trionode.sync.machines`) against each other and against hostile
peers, in memory and without Trio (see `harness.py`)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.sync.harness import (
    CONTEXT,
    Faults,
    Replica,
    check_consistent,
    converge,
    pull,
    seal,
    try_pull,
    union_of,
)
from trionode.dag.delta import GENESIS, SignedDelta, verify_wire
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.sync.errors import (
    AnswerMismatch,
    NotAuthenticated,
    PeerRefused,
    SessionExpired,
    TooManyIds,
    TooManyRequests,
    UnexpectedMessage,
)
from trionode.sync.machines import (
    MAX_AUTH_FRAME,
    ApplyDeltas,
    CheckAuth,
    Delegate,
    DeltaFetch,
    HeadsExchange,
    ReadDeltas,
    ReadHeads,
    Responder,
)
from trionode.wire.messages import (
    MAX_FRAME,
    DeltaRequest,
    DeltaResponse,
    HeadsRequest,
    HeadsResponse,
    SnapshotRequest,
    SyncAuth,
    SyncError,
    SyncMessage,
)

A_MEMBER = b"\xaa" * 32
B_MEMBER = b"\xbb" * 32
AUTH = SyncAuth(context_id=CONTEXT, member=A_MEMBER, signature=bytes(64))


def chain(n: int) -> list[SignedDelta]:
    deltas: list[SignedDelta] = []
    for i in range(n):
        deltas.append(seal([deltas[-1].id] if deltas else [], i))
    return deltas


def ident(i: int) -> bytes:
    return i.to_bytes(32, "big")


# -- the responder -----------------------------------------------------------------------------


def authenticated(*, max_ids: int = 256, max_requests: int = 1024) -> Responder:
    responder = Responder(max_ids=max_ids, max_requests=max_requests)
    responder.receive_message(AUTH, 0.0)
    action = responder.next_action()
    assert action == CheckAuth(AUTH)
    responder.auth_checked(None)
    assert responder.messages_to_send() == []
    return responder


def test_responder_reads_only_a_small_proof_then_serves_heads_and_deltas() -> None:
    responder = Responder()
    assert responder.max_frame == MAX_AUTH_FRAME
    responder.receive_message(AUTH, 0.0)
    assert not responder.awaiting_message  # it waits for the proof to be checked
    with pytest.raises(LocalProtocolError):
        responder.receive_message(HeadsRequest(), 0.0)
    assert responder.next_action() == CheckAuth(AUTH)
    responder.auth_checked(None)
    assert responder.max_frame == MAX_FRAME
    assert responder.auth == AUTH

    responder.receive_message(HeadsRequest(heads=[ident(1), ident(2)]), 1.0)
    assert responder.next_action() == ReadHeads((ident(1), ident(2)))
    responder.heads_read([ident(3)], [ident(1)], ident(9))
    assert responder.messages_to_send() == [
        HeadsResponse(heads=[ident(3)], root_hash=ident(9), known=[ident(1)])
    ]
    responder.receive_message(DeltaRequest(ids=[ident(1), ident(2)]), 2.0)
    assert responder.next_action() == ReadDeltas((ident(1), ident(2)))
    responder.deltas_read([(ident(1), b"wire")], [ident(2)])
    assert responder.messages_to_send() == [DeltaResponse(deltas=[b"wire"], missing=[ident(2)])]
    page = SnapshotRequest(cursor=None, max_records=10, max_bytes=1000)
    responder.receive_message(page, 3.0)
    assert responder.next_action() == Delegate(page)
    responder.delegated(SyncError(message="x"))
    assert responder.messages_to_send() == [SyncError(message="x")]
    responder.receive_eof()
    assert responder.finished


def test_a_refused_proof_gets_an_error_and_nothing_else() -> None:
    responder = Responder()
    responder.receive_message(AUTH, 0.0)
    assert isinstance(responder.next_action(), CheckAuth)
    responder.auth_checked("not a member")
    assert responder.messages_to_send() == [SyncError(message="not a member")]
    assert responder.finished
    assert not responder.authenticated
    assert responder.max_frame == MAX_AUTH_FRAME
    with pytest.raises(LocalProtocolError):
        responder.receive_message(HeadsRequest(), 0.0)


@pytest.mark.parametrize(
    "first",
    [HeadsRequest(), DeltaRequest(ids=[ident(1)]), HeadsResponse(heads=[], root_hash=ident(0))],
)
def test_anything_before_the_proof_is_a_violation(first: HeadsRequest) -> None:
    responder = Responder()
    with pytest.raises(NotAuthenticated):
        responder.receive_message(first, 0.0)
    assert responder.failed
    assert responder.next_action() is None  # nothing is read for it
    with pytest.raises(LocalProtocolError):
        responder.receive_message(AUTH, 0.0)


@pytest.mark.parametrize(
    "message",
    [
        AUTH,  # a second proof (a replay)
        HeadsResponse(heads=[], root_hash=ident(0)),
        DeltaResponse(deltas=[], missing=[]),
        SyncError(message="?"),
    ],
)
def test_a_requester_that_sends_answers_or_replays_the_proof_ends_the_session(
    message: SyncAuth,
) -> None:
    responder = authenticated()
    with pytest.raises(UnexpectedMessage):
        responder.receive_message(message, 0.0)
    assert responder.messages_to_send() == []


def test_an_answer_too_big_for_one_frame_sends_what_fits_and_defers_the_rest() -> None:
    responder = Responder(max_answer_bytes=100)
    responder.receive_message(AUTH, 0.0)
    responder.next_action()
    responder.auth_checked(None)
    ids = [ident(i) for i in range(1, 6)]
    responder.receive_message(DeltaRequest(ids=ids), 0.0)
    responder.next_action()
    sizes = [60, 30, 20, 101, 5]  # the fourth alone exceeds the budget
    responder.deltas_read([(i, bytes(n)) for i, n in zip(ids, sizes, strict=True)], [])
    assert responder.messages_to_send() == [
        DeltaResponse(deltas=[bytes(60), bytes(30)], missing=[ids[3]], later=[ids[2], ids[4]])
    ]


def test_fetch_asks_again_for_what_an_answer_deferred() -> None:
    deltas = chain(3)
    wanted = {d.id for d in deltas}
    fetch = DeltaFetch(wanted, context_id=CONTEXT, max_rounds=5)
    fetch.messages_to_send()
    first, *rest = sorted(deltas, key=lambda d: d.id)
    fetch.receive_message(answer([first], later=[d.id for d in rest]), 0.0)
    fetch.next_action()
    fetch.deltas_applied(())
    (again,) = fetch.messages_to_send()
    assert again == DeltaRequest(ids=sorted(d.id for d in rest))
    # Deferring everything and sending nothing would never end: a violation.
    with pytest.raises(AnswerMismatch):
        fetch.receive_message(answer([], later=again.ids), 0.0)


def test_responder_limits_ids_and_requests_per_stream() -> None:
    responder = authenticated(max_ids=4, max_requests=3)
    with pytest.raises(TooManyIds):
        responder.receive_message(DeltaRequest(ids=[ident(i) for i in range(5)]), 0.0)
    responder = authenticated(max_ids=4, max_requests=3)
    for _ in range(3):
        responder.receive_message(HeadsRequest(), 0.0)
        assert isinstance(responder.next_action(), ReadHeads)
        responder.heads_read([], [], ident(0))
    with pytest.raises(TooManyRequests):
        responder.receive_message(HeadsRequest(), 0.0)


def test_a_session_that_never_finishes_meets_its_deadline() -> None:
    responder = Responder(deadline=10.0)
    responder.receive_message(AUTH, 0.0)
    responder.next_action()
    responder.auth_checked(None)
    assert responder.get_timer() == 10.0
    responder.handle_timer(9.9)  # not yet
    with pytest.raises(SessionExpired):
        responder.receive_message(HeadsRequest(), 10.0)
    assert responder.failed


def test_answers_out_of_turn_are_local_errors() -> None:
    responder = authenticated()
    with pytest.raises(LocalProtocolError):
        responder.heads_read([], [], ident(0))
    responder.receive_message(HeadsRequest(), 0.0)
    with pytest.raises(LocalProtocolError):
        responder.deltas_read([], [])


# -- the requester: heads exchange -------------------------------------------------------------


def test_heads_exchange() -> None:
    exchange = HeadsExchange([ident(1), ident(2)])
    assert exchange.messages_to_send() == [HeadsRequest(heads=[ident(1), ident(2)])]
    answer = HeadsResponse(heads=[ident(3)], root_hash=ident(9), known=[ident(2)])
    exchange.receive_message(answer, 0.0)
    assert exchange.finished
    assert exchange.result == answer
    with pytest.raises(UnexpectedMessage):  # a duplicate
        exchange.receive_message(answer, 0.0)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (SyncError(message="not a member"), PeerRefused),
        (DeltaResponse(deltas=[], missing=[]), UnexpectedMessage),
        (HeadsRequest(), UnexpectedMessage),
        (HeadsResponse(heads=[], root_hash=ident(0), known=[ident(7)]), TooManyIds),
    ],
)
def test_heads_exchange_refuses_bad_answers(answer: HeadsResponse, error: type[Exception]) -> None:
    exchange = HeadsExchange([ident(1)])
    with pytest.raises(error):
        exchange.receive_message(answer, 0.0)
    assert exchange.failed
    assert exchange.result is None


# -- the requester: delta fetch ----------------------------------------------------------------


def answer(
    deltas: list[SignedDelta], missing: Sequence[bytes] = (), later: Sequence[bytes] = ()
) -> DeltaResponse:
    return DeltaResponse(
        deltas=[d.encode() for d in deltas], missing=list(missing), later=list(later)
    )


def test_fetch_walks_parents_breadth_first_and_asks_each_id_once() -> None:
    deltas = chain(3)
    fetch = DeltaFetch({deltas[2].id}, context_id=CONTEXT, max_rounds=10)
    assert fetch.messages_to_send() == [DeltaRequest(ids=[deltas[2].id])]
    fetch.receive_message(answer([deltas[2]]), 0.0)
    action = fetch.next_action()
    assert isinstance(action, ApplyDeltas)
    assert [d.id for d in action.deltas] == [deltas[2].id]
    # The driver applied it: it waits for deltas[1], and (a peer's confusion) for itself.
    fetch.deltas_applied({deltas[1].id, deltas[2].id, GENESIS})
    assert fetch.messages_to_send() == [DeltaRequest(ids=[deltas[1].id])]
    fetch.receive_message(answer([], [deltas[1].id]), 0.0)
    assert fetch.next_action() is None
    assert fetch.finished
    assert fetch.peer_missing == {deltas[1].id}
    assert fetch.rounds == 2
    assert fetch.received == 1


def test_fetch_batches_and_stops_after_its_rounds() -> None:
    wanted = {ident(i) for i in range(1, 11)}
    fetch = DeltaFetch(wanted, context_id=CONTEXT, max_rounds=2, batch=4)
    (first,) = fetch.messages_to_send()
    assert isinstance(first, DeltaRequest)
    assert first.ids == sorted(wanted)[:4]
    fetch.receive_message(DeltaResponse(deltas=[], missing=first.ids), 0.0)
    (second,) = fetch.messages_to_send()
    assert isinstance(second, DeltaRequest)
    fetch.receive_message(DeltaResponse(deltas=[], missing=second.ids), 0.0)
    assert fetch.finished
    assert fetch.messages_to_send() == []
    assert fetch.wanted == frozenset(sorted(wanted)[8:])


def test_an_unrequested_delta_is_never_applied_and_ends_the_fetch() -> None:
    asked, other = chain(2)
    fetch = DeltaFetch({asked.id, ident(5)}, context_id=CONTEXT, max_rounds=10, batch=1)
    fetch.messages_to_send()
    fetch.receive_message(answer([other]), 0.0)  # one delta for one id: not the one asked
    assert fetch.next_action() is None
    assert fetch.rejected == 1
    assert fetch.violation is not None
    assert fetch.finished  # no further rounds with that peer
    assert fetch.messages_to_send() == []


def test_the_same_delta_twice_in_an_answer_is_applied_once() -> None:
    (delta,) = chain(1)
    fetch = DeltaFetch({delta.id, ident(5)}, context_id=CONTEXT, max_rounds=10)
    fetch.messages_to_send()
    fetch.receive_message(answer([delta, delta]), 0.0)
    action = fetch.next_action()
    assert isinstance(action, ApplyDeltas)
    assert len(action.deltas) == 1
    assert fetch.rejected == 1


@pytest.mark.parametrize(
    "bad",
    [
        "more",  # more deltas than ids asked
        "fewer",  # an id neither sent nor said missing
        "replayed",  # the answer to an earlier request
        "heads",  # an answer of the wrong kind
        "forged",  # bytes that are no signed delta
    ],
)
def test_fetch_refuses_hostile_answers(bad: str) -> None:
    deltas = chain(3)
    fetch = DeltaFetch({deltas[2].id}, context_id=CONTEXT, max_rounds=10)
    fetch.messages_to_send()
    first = answer([deltas[2]])
    fetch.receive_message(first, 0.0)
    fetch.next_action()
    fetch.deltas_applied({deltas[1].id})
    fetch.messages_to_send()
    replies: dict[str, SyncMessage] = {
        "more": answer([deltas[1], deltas[0]]),
        "fewer": answer([]),
        "replayed": DeltaResponse(deltas=[], missing=[deltas[2].id]),
        "heads": HeadsResponse(heads=[], root_hash=ident(0)),
        "forged": DeltaResponse(deltas=[b"\x93garbage"], missing=[]),
    }
    error = {"heads": UnexpectedMessage, "forged": RemoteProtocolError}.get(bad, AnswerMismatch)
    with pytest.raises(error):
        fetch.receive_message(replies[bad], 0.0)
    assert fetch.failed
    assert fetch.next_action() is None
    with pytest.raises(LocalProtocolError):
        fetch.receive_message(answer([deltas[1]]), 0.0)


def test_fetch_refusal_and_deadline() -> None:
    fetch = DeltaFetch({ident(1)}, context_id=CONTEXT, max_rounds=1, deadline=5.0)
    fetch.messages_to_send()
    with pytest.raises(PeerRefused, match="busy"):
        fetch.receive_message(SyncError(message="busy: too many sync sessions"), 0.0)
    fetch = DeltaFetch({ident(1)}, context_id=CONTEXT, max_rounds=1, deadline=5.0)
    assert fetch.get_timer() == 5.0
    fetch.handle_timer(4.0)
    with pytest.raises(SessionExpired):
        fetch.handle_timer(5.0)


def test_nothing_wanted_is_finished_at_once() -> None:
    fetch = DeltaFetch({GENESIS}, context_id=CONTEXT, max_rounds=5)
    assert fetch.finished
    assert fetch.messages_to_send() == []


# -- two machines against each other: properties --------------------------------------------


@st.composite
def dags(
    draw: st.DrawFn, max_size: int = 14
) -> tuple[list[SignedDelta], dict[bytes, tuple[bytes, ...]]]:
    """A DAG of real signed deltas: each names up to 3 earlier ones as parents."""
    n = draw(st.integers(1, max_size))
    deltas: list[SignedDelta] = []
    for i in range(n):
        picks = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        deltas.append(seal([deltas[p].id for p in picks], i))
    parents = {
        d.id: tuple(verify_wire(d.encode(), context_id=CONTEXT).header.parents) for d in deltas
    }
    return deltas, parents


def ancestors(ids: set[bytes], parents: dict[bytes, tuple[bytes, ...]]) -> set[bytes]:
    out: set[bytes] = set()
    work = list(ids)
    while work:
        delta_id = work.pop()
        if delta_id in out or delta_id == GENESIS:
            continue
        out.add(delta_id)
        work.extend(parents[delta_id])
    return out


@st.composite
def replica_pairs(
    draw: st.DrawFn,
) -> tuple[Replica, Replica, dict[bytes, tuple[bytes, ...]]]:
    """Two replicas holding parts of one DAG: each an ancestor-closed applied set, plus
    some deltas received without their parents (pending)."""
    deltas, parents = draw(dags())
    ids = [d.id for d in deltas]
    by_id = {d.id: d for d in deltas}
    sides = []
    for member in (A_MEMBER, B_MEMBER):
        replica = Replica(member, members={A_MEMBER, B_MEMBER})
        held = ancestors(set(draw(st.sets(st.sampled_from(ids)))), parents)
        for delta in deltas:  # causal order: each applies
            if delta.id in held:
                replica.receive(delta)
        for delta_id in draw(st.sets(st.sampled_from(ids), max_size=4)):
            replica.receive(by_id[delta_id])  # pending unless its parents are here
        sides.append(replica)
    return sides[0], sides[1], parents


faults = st.builds(
    Faults,
    drop=st.none() | st.integers(0, 8),
    duplicate=st.none() | st.integers(0, 8),
    cut_after=st.none() | st.integers(0, 8),
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replica_pairs(), st.lists(st.tuples(st.booleans(), faults), max_size=4))
def test_sessions_give_both_sides_the_union_whatever_the_faults_before(
    pair: tuple[Replica, Replica, dict[bytes, tuple[bytes, ...]]],
    faulty: list[tuple[bool, Faults]],
) -> None:
    a, b, parents = pair
    expected = union_of([a, b], parents)
    for a_pulls, fault in faulty:
        local, remote = (a, b) if a_pulls else (b, a)
        before = remote.snapshot()
        try_pull(local, remote, fault)
        # A session, cut or failed wherever, leaves whole deltas only, each on its parents;
        # the serving side is never changed by it.
        check_consistent(local, parents)
        assert remote.snapshot() == before
        assert local.applied <= expected
    converge(a, b, limit=2 * len(parents) + 4)
    assert a.applied == b.applied == expected
    assert a.heads() == b.heads()
    check_consistent(a, parents)
    check_consistent(b, parents)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replica_pairs(), st.lists(faults, max_size=3))
def test_a_removed_member_gets_nothing(
    pair: tuple[Replica, Replica, dict[bytes, tuple[bytes, ...]]], faulty: list[Faults]
) -> None:
    a, b, _ = pair
    b.members.discard(A_MEMBER)  # b no longer counts a as a member
    before = a.snapshot()
    with pytest.raises(PeerRefused, match="not a member"):
        pull(a, b)
    for fault in faulty:
        assert not try_pull(a, b, fault)
    assert a.snapshot() == before


def served_chain(n: int) -> tuple[list[SignedDelta], dict[bytes, tuple[bytes, ...]], Replica]:
    """A chain of `n` deltas, their parents, and a replica holding them that serves A."""
    deltas = chain(n)
    parents = {
        d.id: tuple(verify_wire(d.encode(), context_id=CONTEXT).header.parents) for d in deltas
    }
    server = Replica(B_MEMBER, members={A_MEMBER})
    for delta in deltas:
        server.receive(delta)
    return deltas, parents, server


def test_a_fault_free_pull_needs_no_more_rounds_than_the_gap_is_deep() -> None:
    deltas, parents, b = served_chain(6)
    a = Replica(A_MEMBER)
    assert pull(a, b) == 6
    assert a.heads() == b.heads() == [deltas[-1].id]
    # Rounds run out: what came is consistent, and the next session goes on from there.
    c = Replica(A_MEMBER)
    assert pull(c, b, max_rounds=2) == 0  # two deltas fetched, both pending
    assert len(c.pending) == 2
    check_consistent(c, parents)
    assert pull(c, b) == 6
    assert c.applied == b.applied


def test_a_lost_message_expires_the_session() -> None:
    _, parents, b = served_chain(2)
    a = Replica(A_MEMBER)
    # Two streams: auth, heads request, heads; auth, then two rounds of request and answer.
    for drop in range(8):
        local = Replica(A_MEMBER)
        with pytest.raises(SessionExpired):
            pull(local, b, Faults(drop=drop))
        check_consistent(local, parents)
    assert pull(a, b, Faults(drop=8)) == 2  # beyond the session's messages: nothing lost


# -- a stateful test: writes, gossip, faulty syncs and removals in any order -------------------


class SyncModel(RuleBasedStateMachine):
    """Two replicas write, receive some deltas by gossip (possibly without their parents),
    run faulty sessions either way and lose and regain membership at each other."""

    def __init__(self) -> None:
        super().__init__()
        self.parents: dict[bytes, tuple[bytes, ...]] = {}
        self.deltas: list[SignedDelta] = []
        self.revoked = [False, False]

    @initialize()
    def start(self) -> None:
        self.replicas = (
            Replica(A_MEMBER, members={A_MEMBER, B_MEMBER}),
            Replica(B_MEMBER, members={A_MEMBER, B_MEMBER}),
        )

    @rule(side=st.integers(0, 1))
    def write(self, side: int) -> None:
        replica = self.replicas[side]
        delta = seal(replica.heads(), len(self.deltas))
        self.parents[delta.id] = tuple(
            verify_wire(delta.encode(), context_id=CONTEXT).header.parents
        )
        self.deltas.append(delta)
        replica.receive(delta)

    @precondition(lambda self: bool(self.deltas))
    @rule(side=st.integers(0, 1), pick=st.integers(0, 1000))
    def gossip(self, side: int, pick: int) -> None:
        self.replicas[side].receive(self.deltas[pick % len(self.deltas)])

    @rule(side=st.integers(0, 1), fault=faults)
    def sync(self, side: int, fault: Faults) -> None:
        local, remote = self.replicas[side], self.replicas[1 - side]
        before = local.snapshot()
        done = try_pull(local, remote, fault)
        if self.revoked[side]:
            assert not done
            assert local.snapshot() == before  # a removed member gets nothing

    @rule(side=st.integers(0, 1))
    def revoke(self, side: int) -> None:
        """`side` is removed at the other replica (the other keeps serving the rest)."""
        self.revoked[side] = True
        self.replicas[1 - side].members.discard(self.replicas[side].member)

    @rule()
    def heal(self) -> None:
        """Membership restored: fault-free sessions give both sides the union."""
        for side, replica in enumerate(self.replicas):
            self.replicas[1 - side].members.add(replica.member)
        self.revoked = [False, False]
        a, b = self.replicas
        expected = union_of(self.replicas, self.parents)
        converge(a, b, limit=2 * len(self.parents) + 4)
        assert a.applied == b.applied == expected

    @invariant()
    def consistent(self) -> None:
        for replica in getattr(self, "replicas", ()):
            check_consistent(replica, self.parents)


SyncModel.TestCase.settings = settings(
    max_examples=max(50, settings().max_examples),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSyncModel = SyncModel.TestCase
