"""Tree comparison as a sans-IO machine: two initialised replicas compare `(FF, final
root)` and repair the *final* state only (reference local-first-auth.md §5.5, DESIGN §8).

```
requester (I)                                     responder (R)
  ProofRequest                        ──────────▶  (I proved membership with SyncAuth)
                                      ◀──────────  PeerProof: R's member key (CheckPeer: a
                                                   current member in I's own resolution)
  TreeStart(boundary B_I, FF_I, acks) ──────────▶  reads together: its final boundary B_R,
                                      ◀──────────  which of B_I it has applied, final root, FF_R;
                                                   FFs differ: each side takes the other's
                                                   signed acks (TakeAcks), so FF catches up
  equal final roots: nothing to walk. Otherwise (same FF: a divergence, counted) walk
  breadth-first from the root, only where hashes differ:
  NodeRequest([(id, after)…])         ──────────▶  per node of its final tree: record, hash,
                                      ◀──────────  (child id, child hash)…
  (ReadNodes: ours; JoinRecords: R's records; ReadSubtrees: what only we hold)
  EntityPush(final records)           ──────────▶  joined if I is a current member there
                                      ◀──────────  PushAck(changed, refused)
  TreeDone(ops, vvs of B_I)           ──────────▶  R adopts B_I as checkpoints (if it refused
                                      ◀──────────  nothing)
  AuthRequest(B_R)                    ──────────▶
                                      ◀──────────  AuthResponse(ops, vvs): I adopts B_R
```
The session then fetches R's non-final deltas by id, signed, on the same stream (delta
sync: `DeltaFetch`), so each side judges them itself.

What travels unsigned
---------------------
Only *final* state: the base rows a replica's rebuild starts from (folded final deltas,
and final state that arrived as state) plus the context's creation records, whose Merkle
root is the *final root*. The records of every delta whose body a replica holds, final or
not, stay out of the walk: they travel as signed deltas. So a member cannot hand its peer
a record of a non-final delta that a concurrent removal later filters (the hole #10 names:
such a record would join the base, which no rebuild undoes). The *boundary* is the set of
checkpoints the final state stands for (`SyncServing.final_view`): after a complete walk
each side holds the other's final state as of the boundary it announced, so it records
that boundary as checkpoints (applied here, bodies elsewhere), and delta sync stops there.

Trust
-----
State without signatures is taken only from a peer that is a current member in the
receiver's *own* resolution: the requester checks the responder's proof (`CheckPeer`),
the responder checks the requester's role when records are pushed. A side that refused
records adopts no boundary.

Errors: whatever the peer does wrong raises a `SyncViolation` (answers out of turn, out of
order, for ids not asked, records that do not match their ids, children out of order) and
fails the machine; a refusal raises `PeerRefused`; an untrusted responder `UntrustedState`.
Limits: `TreeLimits` caps round trips and records per session; a walk cut short by them
adopts nothing (the next session continues where hashes still differ).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence

import attrs

from trionode.crdt import Entity, decode_entity
from trionode.crdt.entity import ROOT_ID
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.sync.errors import (
    AnswerMismatch,
    TooManyIds,
    UnexpectedMessage,
    UntrustedState,
    refusal,
)
from trionode.sync.machines import MachineBase
from trionode.wire.messages import (
    MAX_IDS,
    MAX_PAGE_RECORDS,
    AuthRequest,
    AuthResponse,
    EntityPush,
    NodeQuery,
    NodeRequest,
    NodeResponse,
    PeerProof,
    ProofRequest,
    PushAck,
    SyncError,
    SyncMessage,
    TreeDone,
    TreeDoneAck,
    TreeNode,
    TreeStart,
    TreeStarted,
)

_ABSENT = b"absent"
"""Stands for a child we do not list (never a hash: hashes are 32 bytes)."""

PUSH_BYTES = 2 * 1024 * 1024
"""Record bytes per push (below a frame, with room for the message around them)."""

LocalNode = tuple[bytes | None, bytes | None, Sequence[tuple[bytes, bytes | None]], bool]
"""Our side of one node: (encoded record, Merkle hash, [(child id, hash)], more)."""


@attrs.frozen
class TreeLimits:
    max_round_trips: int = 1024
    """Node requests per session."""
    max_records: int = 100_000
    """Records pulled plus pushed per session."""


@attrs.frozen
class FinalSide:
    """One replica's final state as a comparison starts (read together, under its lock)."""

    root: bytes
    """Merkle root of the final state."""
    frontier: Mapping[bytes, int]
    """FF: author tag → highest final sequence number."""
    boundary: tuple[bytes, ...]
    """The checkpoints the final state stands for (at most `MAX_IDS` travel)."""
    acks: tuple[bytes, ...] = ()
    """The signed acks held (see `trionode.context.acks`), offered when frontiers differ."""


@attrs.define
class TreeResult:
    round_trips: int = 0
    pulled: int = 0
    """Records received and joined here."""
    pushed: int = 0
    """Records sent to the peer."""
    refused_there: int = 0
    complete: bool = True
    """The walk reached every differing node within the caps."""
    walked: bool = False
    """The final roots differed, so the trees were walked."""
    divergence: bool = False
    """Same FF, different final root: the final states diverged (counted by the caller)."""
    adopted_here: bool = False
    adopted_there: bool = False
    bytes_received: int = 0
    bytes_sent: int = 0


# -- actions ---------------------------------------------------------------------------------


@attrs.frozen
class CheckPeer:
    """Does `proof` prove a key that is a current member in our own resolution, on this
    connection? Answer `peer_checked`."""

    proof: PeerProof


@attrs.frozen
class ReadNodes:
    """Our final tree's nodes for `queries` (entity id, list children after). Answer
    `nodes_read`, one node per query, in order."""

    queries: tuple[tuple[bytes, bytes | None], ...]


@attrs.frozen
class JoinRecords:
    """Join these final records of the peer's into our state and base. Answer
    `records_joined`."""

    records: tuple[Entity, ...]


@attrs.frozen
class ReadSubtrees:
    """Encoded final records of `roots` and all below them, at most `limit`. Answer
    `subtrees_read`."""

    roots: tuple[bytes, ...]
    limit: int


@attrs.frozen
class ExportAuth:
    """The signed membership ops in the past of `heads`, and the heads' vectors. Answer
    `auth_exported`."""

    heads: tuple[bytes, ...]


@attrs.frozen
class TakeAcks:
    """The frontiers differ: take the peer's signed acks (each verified, and counted once
    its whole past is held here). Answer `acks_taken`."""

    acks: tuple[bytes, ...]


@attrs.frozen
class AdoptBoundary:
    """Take these ops (verified and judged here), then record `heads` as checkpoints
    (`known`: those of our own boundary the peer had applied). Answer `boundary_adopted`."""

    ops: tuple[bytes, ...]
    vvs: tuple[tuple[bytes, bytes], ...]
    heads: tuple[bytes, ...]
    known: tuple[bytes, ...]


TreeAction = (
    CheckPeer | TakeAcks | ReadNodes | JoinRecords | ReadSubtrees | ExportAuth | AdoptBoundary
)


class _State(enum.Enum):
    AWAIT_PROOF = "await_proof"
    AWAIT_STARTED = "await_started"
    AWAIT_NODES = "await_nodes"
    AWAIT_PUSH_ACK = "await_push_ack"
    AWAIT_DONE_ACK = "await_done_ack"
    AWAIT_AUTH = "await_auth"
    ACTING = "acting"
    DONE = "done"


def adds(mine: Entity, theirs: Entity) -> bool:
    """Whether joining `mine` into `theirs` would change it."""
    return theirs.copy().merge(mine).changed


def _check_children(node: TreeNode, after: bytes | None) -> None:
    previous = after
    for child_id, _ in node.children:
        if previous is not None and child_id <= previous:
            raise AnswerMismatch("node children out of order")
        previous = child_id
    if node.more and not node.children:
        raise AnswerMismatch("a node with more children listed none")


class TreeCompare(MachineBase):
    """The requester of a tree comparison (see the module doc). Built with our final side
    once the stream is authenticated; finished once ``result`` says how it went."""

    def __init__(
        self,
        ours: FinalSide,
        *,
        limits: TreeLimits | None = None,
        deadline: float | None = None,
    ) -> None:
        super().__init__(deadline)
        self._ours = ours
        self._limits = limits or TreeLimits()
        self._state = _State.AWAIT_PROOF
        self._action: TreeAction | None = None
        self._acting: type[TreeAction] | None = None
        self._queue: deque[tuple[bytes, bytes | None]] = deque()
        self._answered: list[tuple[bytes, bytes | None]] = []
        self._reply: list[TreeNode] = []
        self._pushes: list[bytes] = []
        self._push_roots: list[bytes] = []
        self._suspect: set[bytes] = set()
        """Nodes whose hidden children are compared too (see `nodes_read`)."""
        self.started: TreeStarted | None = None
        self.member: bytes | None = None
        """The responder's proven member key."""
        self.result = TreeResult()
        self._outbox.append(ProofRequest())

    # -- the driver's view -----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._state is _State.DONE

    @property
    def awaiting_message(self) -> bool:
        return self._state.name.startswith("AWAIT") and not self.failed

    def next_action(self) -> TreeAction | None:
        action, self._action = self._action, None
        return action

    def receive_message(self, message: SyncMessage, now: float) -> None:
        self.handle_timer(now)
        if not self.awaiting_message:
            raise LocalProtocolError(f"tree comparison is not reading ({self._state.value})")
        if isinstance(message, SyncError):
            self._fail(refusal(message.message))
        try:
            self._dispatch(message)
        except RemoteProtocolError as exc:
            self._fail(exc)

    def _dispatch(self, message: SyncMessage) -> None:
        state = self._state
        if state is _State.AWAIT_PROOF and isinstance(message, PeerProof):
            self._act(CheckPeer(message))
        elif state is _State.AWAIT_STARTED and isinstance(message, TreeStarted):
            self._on_started(message)
        elif state is _State.AWAIT_NODES and isinstance(message, NodeResponse):
            self._on_nodes(message)
        elif state is _State.AWAIT_PUSH_ACK and isinstance(message, PushAck):
            self.result.refused_there += message.refused
            self._push_next()
        elif state is _State.AWAIT_DONE_ACK and isinstance(message, TreeDoneAck):
            self.result.adopted_there = message.adopted
            self._after_done()
        elif state is _State.AWAIT_AUTH and isinstance(message, AuthResponse):
            started = self.started
            assert started is not None
            heads = set(started.heads)
            if any(head not in heads for head, _ in message.vvs):
                raise AnswerMismatch("vectors of heads that were not asked")
            self._act(
                AdoptBoundary(
                    tuple(message.ops),
                    tuple(message.vvs),
                    tuple(started.heads),
                    tuple(started.known),
                )
            )
        else:
            raise UnexpectedMessage(message, f"a tree comparison answer ({state.value})")

    # -- completions -----------------------------------------------------------------------

    def peer_checked(self, member: bytes | None, problem: str | None) -> None:
        """The answer to `CheckPeer`: the proven key, or why it is no source of state."""
        self._done_acting(CheckPeer)
        if problem is not None:
            self._fail(UntrustedState(problem))
        self.member = member
        ours = self._ours
        self._send(
            TreeStart(
                heads=list(ours.boundary[:MAX_IDS]),
                known=[],
                frontier=_encode_frontier(ours.frontier),
                acks=list(ours.acks[:MAX_IDS]),
            ),
            _State.AWAIT_STARTED,
        )

    def nodes_read(self, local: Sequence[LocalNode]) -> None:
        """The answer to `ReadNodes`: our nodes, one per query asked."""
        self._done_acting(ReadNodes)
        if len(local) != len(self._answered):
            raise LocalProtocolError("one local node per query")
        result = self.result
        pulls: list[Entity] = []
        for (entity_id, after), remote, (record, own_hash, own_children, _) in zip(
            self._answered, self._reply, local, strict=True
        ):
            if remote.hash is not None and remote.hash == own_hash:
                continue  # the same subtree on both sides
            theirs: Entity | None = None
            if remote.record is not None:
                try:
                    theirs = decode_entity(remote.record)
                except RemoteProtocolError as exc:
                    self._fail(exc)
                if theirs.id != entity_id:
                    self._fail(AnswerMismatch("node record does not match its id"))
                if after is None:
                    pulls.append(theirs)
            if record is not None and after is None:
                if theirs is None and entity_id != ROOT_ID:
                    self._push_roots.append(entity_id)  # the peer lacks it and all below
                    continue
                if theirs is not None and adds(decode_entity(record), theirs):
                    self._pushes.append(record)
            upto = remote.children[-1][0] if remote.more else None
            ours = dict(own_children)
            # A hidden child has no hash, so "hidden on both sides" says nothing about its
            # records when the two sides hide it under different floors: where this node's
            # records differ (or an ancestor's did), joining may make it visible, so it is
            # asked for too (and its hidden children after it).
            suspect = entity_id in self._suspect or (after is None and remote.record != record)
            if suspect:
                self._suspect.add(entity_id)
            for child_id, child_hash in remote.children:
                mine = ours.get(child_id, _ABSENT)
                if child_hash is not None and mine == child_hash:
                    continue  # the same subtree on both sides
                if child_hash is None and mine is None:
                    if not suspect:
                        continue  # hidden on both sides under the same floor
                    self._suspect.add(child_id)
                self._queue.append((child_id, None))
            listed = {child_id for child_id, _ in remote.children}
            self._push_roots.extend(
                child_id
                for child_id, _ in own_children
                if child_id not in listed and (upto is None or child_id <= upto)
            )
            if remote.more:
                self._queue.append((entity_id, upto))
        if pulls:
            self._act(JoinRecords(tuple(pulls)))
            result.pulled += len(pulls)
        else:
            self._after_join()

    def records_joined(self) -> None:
        self._done_acting(JoinRecords)
        self._after_join()

    def subtrees_read(self, records: Sequence[bytes], *, whole: bool) -> None:
        self._done_acting(ReadSubtrees)
        self._pushes.extend(records)
        if not whole:
            self.result.complete = False
        self._push_next()

    def auth_exported(self, ops: Sequence[bytes], vvs: Sequence[tuple[bytes, bytes]]) -> None:
        self._done_acting(ExportAuth)
        self._send(TreeDone(ops=list(ops), vvs=list(vvs)), _State.AWAIT_DONE_ACK)

    def boundary_adopted(self) -> None:
        self._done_acting(AdoptBoundary)
        self.result.adopted_here = True
        self._state = _State.DONE

    # -- the walk --------------------------------------------------------------------------

    def _on_started(self, started: TreeStarted) -> None:
        if not set(started.known) <= set(self._ours.boundary):
            raise TooManyIds("the answer lists boundary ids of ours we never sent")
        self.started = started
        same_frontier = _decode_frontier(started.frontier) == dict(self._ours.frontier)
        if started.acks and same_frontier:
            raise AnswerMismatch("acks offered under an equal frontier")
        if started.acks:
            self._act(TakeAcks(tuple(started.acks)))
            return
        self._begin_walk(same_frontier=same_frontier)

    def acks_taken(self) -> None:
        self._done_acting(TakeAcks)
        self._begin_walk(same_frontier=False)

    def _begin_walk(self, *, same_frontier: bool) -> None:
        started = self.started
        assert started is not None
        if started.root_hash == self._ours.root:
            self._finish_walk()
            return
        self.result.walked = True
        self.result.divergence = same_frontier
        self._queue.append((ROOT_ID, None))
        self._ask_next()

    def _ask_next(self) -> None:
        result, limits = self.result, self._limits
        if not self._queue:
            self._finish_walk()
            return
        if (
            result.round_trips >= limits.max_round_trips
            or result.pulled + result.pushed >= limits.max_records
        ):
            result.complete = False
            self._finish_walk()
            return
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_IDS))]
        self._answered = batch
        result.round_trips += 1
        self._send(
            NodeRequest(queries=[NodeQuery(id=i, after=a) for i, a in batch]),
            _State.AWAIT_NODES,
        )

    def _on_nodes(self, reply: NodeResponse) -> None:
        batch = self._answered
        if not reply.nodes or len(reply.nodes) > len(batch):
            raise AnswerMismatch("node reply answers no query or too many")
        answered = batch[: len(reply.nodes)]
        self._queue.extendleft(reversed(batch[len(reply.nodes) :]))
        for (entity_id, after), node in zip(answered, reply.nodes, strict=True):
            if node.id != entity_id:
                raise AnswerMismatch("node reply out of order")
            _check_children(node, after)
            self.result.bytes_received += len(node.record or b"") + 66 * len(node.children)
        self._answered = answered
        self._reply = list(reply.nodes)
        self._act(ReadNodes(tuple(answered)))

    def _after_join(self) -> None:
        if self._push_roots:
            result = self.result
            room = max(
                self._limits.max_records - result.pulled - result.pushed - len(self._pushes), 0
            )
            roots, self._push_roots = tuple(self._push_roots), []
            self._act(ReadSubtrees(roots, room))
            return
        self._push_next()

    def _push_next(self) -> None:
        records = self._pushes
        if not records:
            self._ask_next()
            return
        end = 1
        size = len(records[0])
        while (
            end < len(records) and end < MAX_PAGE_RECORDS and size + len(records[end]) <= PUSH_BYTES
        ):
            size += len(records[end])
            end += 1
        page, self._pushes = records[:end], records[end:]
        self.result.pushed += len(page)
        self.result.bytes_sent += size
        self._send(EntityPush(records=page), _State.AWAIT_PUSH_ACK)

    def _finish_walk(self) -> None:
        if not self.result.complete:
            self._state = _State.DONE  # adopt nothing: the next session continues
            return
        self._act(ExportAuth(self._ours.boundary[:MAX_IDS]))

    def _after_done(self) -> None:
        started = self.started
        assert started is not None
        if not started.heads:
            self.result.adopted_here = True  # no boundary to adopt: nothing is folded there
            self._state = _State.DONE
            return
        self._send(AuthRequest(heads=list(started.heads)), _State.AWAIT_AUTH)

    # -- plumbing --------------------------------------------------------------------------

    def _send(self, message: SyncMessage, state: _State) -> None:
        self._outbox.append(message)
        self._state = state

    def _act(self, action: TreeAction) -> None:
        self._action = action
        self._acting = type(action)
        self._state = _State.ACTING

    def _done_acting(self, kind: type[TreeAction]) -> None:
        self._check_alive()
        if self._acting is not kind:
            raise LocalProtocolError(f"no {kind.__name__} was asked for")
        self._acting = None
        self._action = None


def _encode_frontier(frontier: Mapping[bytes, int]) -> list[tuple[bytes, int]]:
    return sorted(frontier.items())


def _decode_frontier(entries: Sequence[tuple[bytes, int]]) -> dict[bytes, int]:
    out = dict(entries)
    if len(out) != len(entries):
        raise AnswerMismatch("a frontier names an author twice")
    return out
