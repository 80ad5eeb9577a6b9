"""Two sync machines against each other in memory, no Trio: the requester's machines (heads
exchange, delta fetch) on one side, a `Responder` on the other, each side's storage a model
replica (a real `CausalDag` over real signed deltas). Messages move one at a time, as on a
stream; `Faults` lose, duplicate or cut them at a chosen message."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trionode.dag.dag import CausalDag
from trionode.dag.delta import (
    GENESIS,
    DeltaBody,
    SignedDelta,
    VerifiedDelta,
    seal_delta,
    verify_wire,
)
from trionode.errors import TrionodeError
from trionode.sync.machines import (
    CheckAuth,
    Delegate,
    DeltaFetch,
    HeadsExchange,
    ReadAncestors,
    ReadDeltas,
    ReadHeads,
    Responder,
)
from trionode.wire.messages import SyncAuth, SyncError, SyncMessage

CONTEXT = b"\x07" * 32
KEY = b"\x01" * 32
DEADLINE = 30.0
ANSWER_BYTES = 1000
"""Delta bytes per answer in the model: a few deltas, so answers defer the rest."""
AUTHOR = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)


def seal(parents: Iterable[bytes], n: int) -> SignedDelta:
    """A real signed delta (`n` makes it unique)."""
    return seal_delta(
        context_id=CONTEXT,
        parents=sorted(set(parents)) or [GENESIS],
        author=AUTHOR,
        hlc=n,
        key_id=0,
        context_key=KEY,
        body=DeltaBody(records=[n.to_bytes(4, "big")], events=[], root_hash=bytes(32)),
        seq=n + 1,
    )


class Cut(Exception):
    """The stream broke (the harness's fault injection)."""


class Stalled(Exception):
    """Neither side can move: both wait for a message (the harness found a deadlock)."""


@attrs.define
class Faults:
    """Message numbers (in the order the messages were sent, both directions and both
    streams of a session counted together) at which the link misbehaves."""

    drop: int | None = None
    """From this message on nothing arrives (the stream stalls)."""
    duplicate: int | None = None
    cut_after: int | None = None
    """The stream breaks once this many messages were delivered."""


class Replica:
    """A node's DAG and delta bodies, and whom it serves (member keys)."""

    def __init__(self, member: bytes, members: Iterable[bytes] = ()) -> None:
        self.member = member
        self.members: set[bytes] = set(members)
        self.dag: CausalDag[bytes] = CausalDag(max_pending=100_000)
        self.wires: dict[bytes, bytes] = {}

    def receive(self, delta: VerifiedDelta | SignedDelta) -> frozenset[bytes]:
        """Like the delta processor: apply if every parent is applied, else keep pending;
        returns the parents nobody offered yet."""
        verified = (
            verify_wire(delta.encode(), context_id=CONTEXT)
            if isinstance(delta, SignedDelta)
            else delta
        )
        self.wires.setdefault(verified.id, verified.wire)
        offer = self.dag.offer(
            verified.id, verified.header.parents, verified.wire, 0.0, lambda _i, _w: True
        )
        return offer.missing

    @property
    def applied(self) -> set[bytes]:
        return set(self.dag.applied)

    @property
    def pending(self) -> set[bytes]:
        return {i for i, _ in self.dag.pending_items()}

    def heads(self) -> list[bytes]:
        return sorted(self.dag.heads)

    def heads_vv(self) -> dict[bytes, int]:
        """The pointwise max of the heads' version vectors (what a request's `have` says)."""
        vv: dict[bytes, int] = {}
        for head in self.dag.heads:
            header = verify_wire(self.wires[head], context_id=CONTEXT).header
            for author, seq in header.vv:
                vv[author] = max(seq, vv.get(author, 0))
        return vv

    def root(self) -> bytes:
        return hashlib.sha256(b"".join(sorted(self.dag.applied))).digest()

    def unknown(self, ids: Iterable[bytes]) -> set[bytes]:
        return {i for i in ids if i != GENESIS and not self.dag.knows(i)}

    def snapshot(self) -> tuple[frozenset[bytes], frozenset[bytes]]:
        return frozenset(self.applied), frozenset(self.pending)

    # -- the responder's actions -----------------------------------------------------------

    def serve(self, responder: Responder) -> bool:
        """Fulfil the responder's next action, if it has one."""
        action = responder.next_action()
        if action is None:
            return False
        self.serve_action(responder, action)
        return True

    def serve_action(self, responder: Responder, action: object) -> None:
        """Fulfil one action the responder asked for."""
        if isinstance(action, CheckAuth):
            member = action.auth.member
            responder.auth_checked(None if member in self.members else "not a member")
        elif isinstance(action, ReadHeads):
            known = sorted(h for h in action.peer_heads if h in self.dag.applied)
            responder.heads_read(self.heads(), known, self.root())
        elif isinstance(action, ReadDeltas):
            found = [(i, self.wires[i]) for i in action.ids if i in self.dag.applied]
            missing = [i for i in action.ids if i not in self.dag.applied]
            responder.deltas_read(found, missing)
        elif isinstance(action, ReadAncestors):
            responder.ancestors_read([(i, self.wires[i]) for i in action.ids if i in self.wires])
        else:
            assert isinstance(action, Delegate)
            responder.delegated(SyncError(message="no state sync in this model"))


@attrs.define
class Link:
    """Counts messages across the streams of one session and applies the faults."""

    faults: Faults = attrs.field(factory=Faults)
    sent: int = 0
    delivered: int = 0
    now: float = 0.0
    answer_bytes: int = ANSWER_BYTES
    """Delta bytes per answer of the responder."""

    def post(self, queue: deque[SyncMessage], message: SyncMessage) -> None:
        n = self.sent
        self.sent += 1
        if self.faults.drop is not None and n >= self.faults.drop:
            return  # a stream loses no single message: from here on it stalls
        queue.append(message)
        if self.faults.duplicate == n:
            queue.append(message)


Requester = HeadsExchange | DeltaFetch


def converse(requester: Requester, local: Replica, remote: Replica, link: Link) -> None:
    """One stream: the requester's auth, then its machine against a fresh `Responder` over
    `remote`. Raises what a machine raises, `Cut`, or SessionExpired once both wait."""
    responder = Responder(deadline=link.now + DEADLINE, max_answer_bytes=link.answer_bytes)
    to_remote: deque[SyncMessage] = deque()
    to_local: deque[SyncMessage] = deque()
    auth = SyncAuth(context_id=CONTEXT, member=local.member, signature=bytes(64))
    link.post(to_remote, auth)
    while True:
        for message in requester.messages_to_send():
            link.post(to_remote, message)
        if isinstance(requester, DeltaFetch) and (apply := requester.next_action()):
            missing: set[bytes] = set()
            for delta in apply.deltas:
                missing |= local.receive(delta)
            requester.deltas_applied(missing)
            continue
        if remote.serve(responder):
            continue
        for message in responder.messages_to_send():
            link.post(to_local, message)
        if requester.finished:
            if responder.awaiting_message:
                responder.receive_eof()
            return
        if link.faults.cut_after is not None and link.delivered >= link.faults.cut_after:
            raise Cut
        if responder.awaiting_message and to_remote:
            link.delivered += 1
            responder.receive_message(to_remote.popleft(), link.now)
        elif requester.awaiting_message and to_local:
            link.delivered += 1
            requester.receive_message(to_local.popleft(), link.now)
        elif requester.awaiting_message:
            # Nothing will come (a message was lost, or the responder ended the stream):
            # the requester's deadline passes.
            link.now += DEADLINE
            requester.handle_timer(link.now)
            raise Stalled  # unreachable: handle_timer raised SessionExpired
        else:
            raise Stalled


def pull(
    local: Replica,
    remote: Replica,
    faults: Faults | None = None,
    max_rounds: int = 64,
    *,
    ancestors: int = 0,
    rounds: list[int] | None = None,
    answer_bytes: int = ANSWER_BYTES,
) -> int:
    """What `SyncManager` does for a delta sync: ask `remote`'s heads on one stream, then
    fetch what `local` lacks of them (and what its pending deltas wait for) on another,
    asking for up to `ancestors` ancestors per answer (sync/2). Returns how many deltas
    `local` applied; the fetch's round trips are appended to `rounds`."""
    before = len(local.dag.applied)
    link = Link(faults or Faults(), answer_bytes=answer_bytes)
    exchange = HeadsExchange(local.heads(), deadline=link.now + DEADLINE)
    converse(exchange, local, remote, link)
    assert exchange.result is not None
    wanted = local.unknown(exchange.result.heads) | local.dag.missing()
    if wanted:
        fetch = DeltaFetch(
            wanted,
            context_id=CONTEXT,
            max_rounds=max_rounds,
            deadline=link.now + DEADLINE,
            ancestors=ancestors,
            have=local.heads_vv(),
        )
        if rounds is not None:
            rounds.append(0)
        converse(fetch, local, remote, link)
        if rounds is not None:
            rounds[-1] = fetch.rounds
    return len(local.dag.applied) - before


SESSION_FAILURES = (TrionodeError, Cut)


def try_pull(
    local: Replica, remote: Replica, faults: Faults | None = None, *, ancestors: int = 0
) -> bool:
    """A pull that may fail (faults, refusals): whether it completed."""
    try:
        pull(local, remote, faults, ancestors=ancestors)
    except SESSION_FAILURES:
        return False
    return True


def union_of(replicas: Iterable[Replica], parents: dict[bytes, tuple[bytes, ...]]) -> set[bytes]:
    """What complete sessions must give every replica: all applied deltas, and every pending
    one whose ancestors are (transitively) available somewhere."""
    replicas = list(replicas)
    held = set().union(*(r.applied for r in replicas))
    waiting = set().union(*(r.pending for r in replicas)) - held
    progress = True
    while progress:
        progress = False
        for delta_id in sorted(waiting):
            if all(p == GENESIS or p in held for p in parents[delta_id]):
                held.add(delta_id)
                waiting.discard(delta_id)
                progress = True
    return held


def converge(a: Replica, b: Replica, limit: int, *, ancestors: int = 0) -> None:
    """Fault-free sessions both ways until neither side changes (at most `limit`)."""
    for _ in range(limit):
        before = (a.snapshot(), b.snapshot())
        pull(a, b, ancestors=ancestors)
        pull(b, a, ancestors=ancestors)
        if (a.snapshot(), b.snapshot()) == before:
            return
    raise AssertionError("sessions did not converge")


def check_consistent(replica: Replica, parents: dict[bytes, tuple[bytes, ...]]) -> None:
    """Nothing half-applied: every applied delta is one that exists and has all its parents
    applied; nothing is both applied and pending; every delta held has its body."""
    applied = replica.applied
    for delta_id in applied:
        assert delta_id in parents, "applied a delta nobody wrote"
        assert all(p == GENESIS or p in applied for p in parents[delta_id])
    assert not applied & replica.pending
    assert applied | replica.pending <= replica.wires.keys()
