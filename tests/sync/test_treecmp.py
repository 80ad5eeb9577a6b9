"""The tree-comparison machine against a model responder in memory, no Trio: each side's
final state is a real `StateTree` (hypothesis-chosen records), the responder is the real
`Responder` machine whose delegated state requests a small model answers as
`context/treecmp.SessionResponder` does. Messages move one at a time, as on a stream; a
cut at a chosen message breaks the session (what was joined stays joined: state only grows)
and the next, fault-free comparison finishes the job."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from tests.sync.harness import Cut, Stalled
from trionode.crdt import Entity, Kind, StateTree, Timestamp, decode_entities, encode_entity
from trionode.crdt.entity import ROOT_ID, child_id
from trionode.crdt.register import RegisterState
from trionode.errors import TrionodeError
from trionode.sync.errors import AnswerMismatch, UntrustedState
from trionode.sync.machines import CheckAuth, Delegate, Responder
from trionode.sync.treecmp import (
    AdoptBoundary,
    CheckPeer,
    ExportAuth,
    FinalSide,
    JoinRecords,
    ReadNodes,
    ReadSubtrees,
    TakeAcks,
    TreeCompare,
    TreeLimits,
    TreeResult,
)
from trionode.wire.messages import (
    AuthRequest,
    AuthResponse,
    EntityPush,
    NodeRequest,
    NodeResponse,
    PeerProof,
    ProofRequest,
    PushAck,
    SyncAuth,
    SyncMessage,
    TreeDone,
    TreeDoneAck,
    TreeNode,
    TreeStart,
    TreeStarted,
)

CONTEXT = b"\x07" * 32
DEADLINE = 30.0
WRITER = b"\x0a" * 32
READER = b"\x0b" * 32


@attrs.define
class Side:
    """One replica's final state, the checkpoints it stands for, and whom it trusts."""

    tree: StateTree
    boundary: set[bytes]
    member: bytes = WRITER
    writers: set[bytes] = attrs.field(factory=lambda: {WRITER})
    frontier: dict[bytes, int] = attrs.field(factory=dict)
    applied: set[bytes] = attrs.field(factory=set)
    acks: tuple[bytes, ...] = ()
    taken: list[bytes] = attrs.field(factory=list)
    """The peer's acks this side took."""

    def final(self) -> FinalSide:
        return FinalSide(
            self.tree.root_hash(), self.frontier, tuple(sorted(self.boundary)), self.acks
        )

    def nodes(self, queries: Sequence[tuple[bytes, bytes | None]]) -> list[TreeNode]:
        out = []
        for entity_id, after in queries:
            info = self.tree.node(entity_id)
            children = [c for c in info.children if after is None or c[0] > after]
            record = None if info.entity is None else encode_entity(info.entity)
            out.append(TreeNode(entity_id, record, info.hash, children, more=False))
        return out

    def subtrees(self, roots: Sequence[bytes], limit: int) -> tuple[list[bytes], bool]:
        records: list[bytes] = []
        work = [r for r in roots if r in self.tree]
        while work:
            if len(records) >= limit:
                return records, False
            entity_id = work.pop()
            entity = self.tree.get(entity_id)
            if entity is not None:
                records.append(encode_entity(entity))
            work.extend(self.tree.children(entity_id))
        return records, True


class ModelServer:
    """The responder's delegated requests, answered like `SessionResponder`."""

    def __init__(self, side: Side, requester: bytes) -> None:
        self.side = side
        self.requester = requester
        self.start: TreeStart | None = None
        self.refused = 0

    def handle(self, message: SyncMessage) -> SyncMessage:
        side = self.side
        if isinstance(message, ProofRequest):
            return PeerProof(member=side.member, signature=bytes(64))
        if isinstance(message, TreeStart):
            self.start = message
            differ = dict(message.frontier) != side.frontier
            if differ:
                side.taken.extend(message.acks)
            return TreeStarted(
                heads=sorted(side.boundary),
                known=sorted(h for h in message.heads if h in side.applied | side.boundary),
                root_hash=side.tree.root_hash(),
                frontier=sorted(side.frontier.items()),
                acks=list(side.acks) if differ else [],
            )
        if isinstance(message, NodeRequest):
            nodes = side.nodes([(q.id, q.after) for q in message.queries])
            return NodeResponse(nodes=nodes[:3])  # a prefix: the requester asks again
        if isinstance(message, EntityPush):
            if self.requester not in side.writers:
                self.refused += len(message.records)
                return PushAck(changed=0, refused=len(message.records))
            changed = side.tree.apply(decode_entities(message.records))
            return PushAck(changed=len(changed), refused=0)
        if isinstance(message, AuthRequest):
            return AuthResponse(ops=[], vvs=[])
        assert isinstance(message, TreeDone)
        assert self.start is not None
        adopted = not self.refused
        if adopted:
            side.applied |= set(self.start.heads)
        return TreeDoneAck(adopted=adopted, heads=[], root_hash=side.tree.root_hash())


def fulfil(machine: TreeCompare, local: Side) -> bool:
    action = machine.next_action()
    if action is None:
        return False
    if isinstance(action, CheckPeer):
        member = action.proof.member
        trusted = member in local.writers
        machine.peer_checked(member, None if trusted else "not a writer of this context")
    elif isinstance(action, TakeAcks):
        local.taken.extend(action.acks)
        machine.acks_taken()
    elif isinstance(action, ReadNodes):
        machine.nodes_read(
            [(n.record, n.hash, n.children, n.more) for n in local.nodes(action.queries)]
        )
    elif isinstance(action, JoinRecords):
        local.tree.apply(action.records)
        machine.records_joined()
    elif isinstance(action, ReadSubtrees):
        records, whole = local.subtrees(action.roots, action.limit)
        machine.subtrees_read(records, whole=whole)
    elif isinstance(action, ExportAuth):
        machine.auth_exported([], [])
    else:
        assert isinstance(action, AdoptBoundary)
        local.applied |= set(action.heads)
        machine.boundary_adopted()
    return True


def compare(
    local: Side,
    remote: Side,
    *,
    cut_after: int | None = None,
    limits: TreeLimits | None = None,
    tamper: dict[type[SyncMessage], SyncMessage] | None = None,
) -> TreeResult:
    """One stream: `local` compares with `remote`. Raises what the machine raises, or Cut."""
    machine = TreeCompare(local.final(), limits=limits, deadline=DEADLINE)
    responder = Responder(deadline=DEADLINE)
    server = ModelServer(remote, local.member)
    to_remote: deque[SyncMessage] = deque(
        [SyncAuth(context_id=CONTEXT, member=local.member, signature=bytes(64))]
    )
    to_local: deque[SyncMessage] = deque()
    delivered = 0
    while True:
        to_remote.extend(machine.messages_to_send())
        if fulfil(machine, local):
            continue
        action = responder.next_action()
        if isinstance(action, CheckAuth):
            responder.auth_checked(None)
            continue
        if isinstance(action, Delegate):
            reply = server.handle(action.message)
            reply = (tamper or {}).get(type(reply), reply)
            responder.delegated(reply)
            continue
        to_local.extend(responder.messages_to_send())
        if machine.finished:
            return machine.result
        if cut_after is not None and delivered >= cut_after:
            raise Cut
        if responder.awaiting_message and to_remote:
            delivered += 1
            responder.receive_message(to_remote.popleft(), 0.0)
        elif machine.awaiting_message and to_local:
            delivered += 1
            machine.receive_message(to_local.popleft(), 0.0)
        else:
            raise Stalled


# -- strategies ----------------------------------------------------------------------------------

NAMES = [b"a", b"b", b"c", b"d"]
MAPS = [child_id(ROOT_ID, name) for name in NAMES[:2]]


@st.composite
def records(draw: st.DrawFn) -> list[Entity]:
    """Maps under the root and registers under the root and in those maps, with stamps and
    removals from a small range, so two sides often hold versions of the same entity. A
    side holds the map of each register it holds in one (final state is ancestor-closed:
    no record arrives before the one that created its parent)."""
    out: list[Entity] = []
    parents = draw(st.lists(st.sampled_from([ROOT_ID, *MAPS]), max_size=6))
    names = draw(st.lists(st.sampled_from(NAMES[:2]), unique=True))
    for name in {*names, *(NAMES[MAPS.index(p)] for p in parents if p != ROOT_ID)}:
        removed = draw(st.none() | st.builds(Timestamp, st.integers(1, 3), st.just(WRITER)))
        added = Timestamp(draw(st.integers(1, 3)), WRITER)
        out.append(Entity(ROOT_ID, name, Kind.MAP, added=added, removed=removed))
    for parent in parents:
        name = draw(st.sampled_from(NAMES[2:] if parent == ROOT_ID else NAMES))
        stamp = Timestamp(draw(st.integers(1, 6)), WRITER)
        value = RegisterState(stamp, draw(st.binary(max_size=2)))
        out.append(Entity(parent, name, Kind.REGISTER, added=stamp, body=value))
    return out


def side(entities: list[Entity], boundary: set[bytes], member: bytes = WRITER) -> Side:
    return Side(StateTree([e.copy() for e in entities]), boundary, member=member)


def union_root(*sides: list[Entity]) -> bytes:
    return StateTree([e.copy() for entities in sides for e in entities]).root_hash()


BOUNDARIES = st.sets(st.binary(min_size=32, max_size=32), max_size=3)


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(records(), records(), BOUNDARIES, BOUNDARIES)
def test_a_complete_comparison_leaves_both_with_the_join_of_both(
    mine: list[Entity], theirs: list[Entity], b_local: set[bytes], b_remote: set[bytes]
) -> None:
    local, remote = side(mine, b_local), side(theirs, b_remote)
    result = compare(local, remote)
    assert result.complete
    assert result.adopted_here
    assert result.adopted_there
    want = union_root(mine, theirs)
    assert local.tree.root_hash() == remote.tree.root_hash() == want
    # Each side adopted the other's boundary (and only once the walk was complete).
    assert b_remote <= local.applied
    assert b_local <= remote.applied
    assert result.walked == (
        side(mine, set()).tree.root_hash() != side(theirs, set()).tree.root_hash()
    )
    # Nothing left to do: the next comparison walks nothing.
    again = compare(local, remote)
    assert not again.walked
    assert again.round_trips == 0


@settings(max_examples=150, deadline=None)
@given(records(), records(), st.integers(0, 40))
def test_a_cut_session_leaves_only_joined_state_and_the_next_one_finishes(
    mine: list[Entity], theirs: list[Entity], cut: int
) -> None:
    local, remote = side(mine, {b"\x01" * 32}), side(theirs, {b"\x02" * 32})
    try:
        result: TreeResult | None = compare(local, remote, cut_after=cut)
    except (Cut, TrionodeError):
        result = None
    want = union_root(mine, theirs)
    # Whatever either side holds now is within the join of both (nothing invented).
    for held in (local, remote):
        assert (
            StateTree(
                [e.copy() for e in [*mine, *theirs]] + [e.copy() for e in held.tree.entities()]
            ).root_hash()
            == want
        )
    if result is None:
        # Cut before the end: a boundary is adopted only after a complete walk.
        assert b"\x02" * 32 not in local.applied or local.tree.root_hash() == want
    compare(local, remote)
    assert local.tree.root_hash() == remote.tree.root_hash() == want


@settings(max_examples=60, deadline=None)
@given(records(), records())
def test_the_caps_cut_the_walk_short_and_adopt_nothing(
    mine: list[Entity], theirs: list[Entity]
) -> None:
    local, remote = side(mine, set()), side(theirs, {b"\x02" * 32})
    result = compare(local, remote, limits=TreeLimits(max_round_trips=1))
    if result.walked and result.round_trips >= 1 and not result.complete:
        assert not result.adopted_here
        assert b"\x02" * 32 not in local.applied


# -- trust and hostile answers ---------------------------------------------------------------------


def _diverged() -> tuple[Side, Side]:
    shared = Entity(ROOT_ID, b"c", Kind.REGISTER, added=Timestamp(1, WRITER))
    other = Entity(ROOT_ID, b"d", Kind.REGISTER, added=Timestamp(2, WRITER))
    return side([shared], {b"\x01" * 32}), side([shared, other], {b"\x02" * 32})


def test_state_from_a_peer_that_is_no_writer_here_is_never_joined() -> None:
    local, remote = _diverged()
    remote.member = READER
    before = local.tree.root_hash()
    with pytest.raises(UntrustedState, match="not a writer"):
        compare(local, remote)
    assert local.tree.root_hash() == before
    assert not local.applied


def test_pushes_refused_by_the_responder_keep_it_from_adopting_our_boundary() -> None:
    remote, local = _diverged()  # local holds a record the remote lacks
    remote.writers = set()  # it trusts nobody
    result = compare(local, remote)
    assert result.refused_there == result.pushed == 1
    assert not result.adopted_there
    assert not remote.applied


def test_same_frontier_and_different_final_roots_is_a_divergence() -> None:
    local, remote = _diverged()
    local.frontier = remote.frontier = {b"t" * 8: 3}
    assert compare(local, remote).divergence
    local, remote = _diverged()
    local.frontier, remote.frontier = {b"t" * 8: 3}, {b"t" * 8: 4}
    result = compare(local, remote)
    assert result.walked
    assert not result.divergence


@settings(max_examples=60, deadline=None)
@given(records(), records(), st.booleans())
def test_different_frontiers_exchange_acks_and_equal_ones_do_not(
    mine: list[Entity], theirs: list[Entity], same: bool
) -> None:
    local, remote = side(mine, set()), side(theirs, set())
    local.acks, remote.acks = (b"ack of I",), (b"ack of R",)
    local.frontier = {b"t" * 8: 3}
    remote.frontier = {b"t" * 8: 3 if same else 5}
    result = compare(local, remote)
    assert local.taken == ([] if same else [b"ack of R"])
    assert remote.taken == ([] if same else [b"ack of I"])
    assert result.complete
    assert local.tree.root_hash() == remote.tree.root_hash() == union_root(mine, theirs)


def test_acks_offered_under_an_equal_frontier_fail_the_session() -> None:
    local, remote = _diverged()
    started = TreeStarted(heads=[], known=[], root_hash=bytes(32), acks=[b"unasked"])
    with pytest.raises(AnswerMismatch, match="acks"):
        compare(local, remote, tamper={TreeStarted: started})
    assert not local.taken


@pytest.mark.parametrize(
    "reply",
    [
        NodeResponse(nodes=[]),
        NodeResponse(nodes=[TreeNode(b"\x09" * 32, None, None, [], more=False)]),
        NodeResponse(
            nodes=[TreeNode(ROOT_ID, None, b"\x01" * 32, [(b"\x02" * 32, None)] * 2, more=False)]
        ),
        NodeResponse(
            nodes=[
                TreeNode(
                    ROOT_ID,
                    encode_entity(Entity(ROOT_ID, b"x", Kind.REGISTER)),
                    b"\x01" * 32,
                    [],
                    more=False,
                )
            ]
        ),
        NodeResponse(nodes=[TreeNode(ROOT_ID, None, b"\x01" * 32, [], more=True)]),
    ],
    ids=["empty", "wrong-id", "children-out-of-order", "record-of-another-id", "more-of-none"],
)
def test_malformed_node_answers_fail_the_session_and_join_nothing(reply: NodeResponse) -> None:
    local, remote = _diverged()
    before = local.tree.root_hash()
    with pytest.raises(AnswerMismatch):
        compare(local, remote, tamper={NodeResponse: reply})
    assert local.tree.root_hash() == before
    assert not local.applied


def test_an_answer_out_of_turn_fails_the_session() -> None:
    local, remote = _diverged()
    with pytest.raises(TrionodeError, match="expected"):
        compare(local, remote, tamper={TreeStarted: PushAck(changed=0, refused=0)})
