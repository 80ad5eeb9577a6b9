"""Sans-IO machines for `/trionode/sync/2` (and `/1`): the heads exchange, the delta fetch,
and the responder that serves both. On /2 a delta request may ask for the ancestors the
requester lacks, so a chain comes in one answer (`DeltaFetch`, `Responder`).

Theory of operation
-------------------
A machine owns no stream, no clock and no storage. Its driver (`trionode.sync.driver`)
feeds it the messages it read (``receive_message(message, now)``), sends what
``messages_to_send()`` returns, and fulfils the storage *actions* ``next_action()`` asks for
(read our heads, read these deltas, apply these deltas, check this membership proof) by
calling the matching completion method with the answer. Time is a parameter: a machine
built with a deadline refuses input after it (``handle_timer(now)`` raises
:class:`SessionExpired`), and ``get_timer()`` tells the driver when to give up waiting.

One message is in flight at a time, as on the stream: a requester sends one request and
waits for its answer; a responder reads one request, answers it, then reads the next.
``awaiting_message`` says whether a machine wants input now; feeding it while it waits for
an action is a LocalProtocolError (a driver bug, not the peer's fault).

Errors. Whatever the peer does wrong raises a :class:`SyncViolation` and leaves the machine
failed (every later call raises LocalProtocolError): an answer of the wrong kind or out of
turn (a duplicated or replayed message arrives out of turn), an answer that does not
account for exactly the ids asked, more ids than allowed, a request before
authentication. A refusal (``SyncError``) raises :class:`PeerRefused`. A delta nobody
asked for is never applied: it is counted (``rejected``), recorded as ``violation``, and
the fetch ends after that answer (the deltas that were asked for still apply: each
verifies itself).

What is applied is all or nothing per delta: the driver hands each verified delta to the
delta processor, which takes it whole or not at all, and a delta whose parents are not
applied waits as pending. So a session cut at any point leaves nothing half-applied: only
whole deltas, each applied only once its parents are.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import NoReturn

import attrs
import msgspec

from trionode.auth.model import tag
from trionode.dag.delta import GENESIS, VerifiedDelta, decode_delta, stored_header, verify_wire
from trionode.errors import LocalProtocolError, RemoteProtocolError, TrionodeError
from trionode.sync.errors import (
    AnswerMismatch,
    NotAuthenticated,
    SessionExpired,
    TooManyIds,
    TooManyRequests,
    UnexpectedMessage,
    UnrequestedDelta,
    refusal,
)
from trionode.wire.messages import (
    MAX_ANCESTORS,
    MAX_FRAME,
    MAX_HAVE,
    MAX_IDS,
    AuthRequest,
    DeltaRequest,
    DeltaResponse,
    EntityPush,
    HeadsRequest,
    HeadsResponse,
    NodeRequest,
    ProofRequest,
    SnapshotOpen,
    SnapshotRequest,
    SyncAuth,
    SyncError,
    SyncMessage,
    TreeDone,
    TreeStart,
)

MAX_AUTH_FRAME = 4096
"""The first frame of a sync stream we serve is a SyncAuth (about 150 bytes): a peer that has
not proved membership never gets a larger frame of its buffered."""

MAX_ANSWER_BYTES = MAX_FRAME - 64 * 1024
"""Delta bytes in one answer: what fits a frame with room for the message around them."""

STATE_REQUESTS: tuple[type[SyncMessage], ...] = (
    ProofRequest,
    SnapshotRequest,
    TreeStart,
    NodeRequest,
    EntityPush,
    TreeDone,
    AuthRequest,
)
"""Requests of the state-based protocols (snapshot, tree comparison): the responder hands
them to the driver as they are (`Delegate`)."""


# -- actions: storage work the driver does for a machine --------------------------------------


@attrs.frozen
class CheckAuth:
    """Is `auth` a valid membership proof on this connection? Answer `auth_checked`."""

    auth: SyncAuth


@attrs.frozen
class ReadHeads:
    """Read our heads, those of `peer_heads` applied here, and our root hash, together.
    Answer `heads_read`."""

    peer_heads: tuple[bytes, ...]


@attrs.frozen
class ReadDeltas:
    """Read the wire bytes of `ids`. Answer `deltas_read`."""

    ids: tuple[bytes, ...]


@attrs.frozen
class ReadAncestors:
    """Read the wire bytes of those of `ids` held here (ancestors of an answer's deltas).
    Answer `ancestors_read` with the ones found, in the order asked."""

    ids: tuple[bytes, ...]


@attrs.frozen
class Delegate:
    """A snapshot or tree-comparison request: answer it (`delegated`)."""

    message: SyncMessage


@attrs.frozen
class ApplyDeltas:
    """Hand these verified deltas (each one asked for) to the delta processor, in order.
    Answer `deltas_applied` with the parents they lack."""

    deltas: tuple[VerifiedDelta, ...]


@attrs.frozen
class StreamSnapshot:
    """Stream a snapshot (a `trionode.sync.snapshot.SnapshotServe` machine runs the stream
    on this one until the requester closes it); answer `snapshot_streamed`."""

    request: SnapshotOpen


ResponderAction = CheckAuth | ReadHeads | ReadDeltas | ReadAncestors | Delegate | StreamSnapshot


class MachineBase:
    """What every machine shares: the outbox, the deadline and the failed state."""

    def __init__(self, deadline: float | None) -> None:
        self._outbox: list[SyncMessage] = []
        self._deadline = deadline
        self._failed: TrionodeError | None = None

    def messages_to_send(self) -> list[SyncMessage]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        """When the session expires (None: never)."""
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Raises SessionExpired once `now` reaches the deadline."""
        self._check_alive()
        if self._deadline is not None and now >= self._deadline:
            self._fail(SessionExpired("sync session deadline passed"))

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise LocalProtocolError(f"sync session already failed: {self._failed}")

    def _fail(self, error: TrionodeError) -> NoReturn:
        self._failed = error
        self._outbox.clear()
        raise error


# -- requester: heads exchange -----------------------------------------------------------------


class HeadsExchange(MachineBase):
    """Ask the peer for its heads and root hash, telling it ours (so it can say which of
    ours it has applied). Finished once ``result`` is set."""

    def __init__(
        self, our_heads: Sequence[bytes], *, deadline: float | None = None, max_ids: int = MAX_IDS
    ) -> None:
        super().__init__(deadline)
        self._max_ids = max_ids
        self._sent = list(our_heads[:max_ids])
        self._outbox.append(HeadsRequest(heads=self._sent))
        self.result: HeadsResponse | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def awaiting_message(self) -> bool:
        return not self.finished and not self.failed

    def receive_message(self, message: SyncMessage, now: float) -> None:
        self.handle_timer(now)
        if isinstance(message, SyncError):
            self._fail(refusal(message.message))
        if self.result is not None or not isinstance(message, HeadsResponse):
            self._fail(UnexpectedMessage(message, "heads"))
        assert isinstance(message, HeadsResponse)
        if len(message.heads) > self._max_ids:
            self._fail(TooManyIds(f"{len(message.heads)} heads (at most {self._max_ids})"))
        if not set(message.known) <= set(self._sent):
            self._fail(TooManyIds("the answer lists heads of ours we never sent"))
        self.result = message


# -- requester: delta fetch ----------------------------------------------------------------------


class _FetchState(enum.Enum):
    READY = "ready"
    AWAIT_ANSWER = "await_answer"
    AWAIT_APPLY = "await_apply"
    DONE = "done"


class DeltaFetch(MachineBase):
    """Fetch `wanted` deltas and, breadth-first, the parents they still lack, at most
    `max_rounds` requests deep and `batch` ids per request.

    Each answer's deltas are verified here (id, signature) and must each be one of the ids
    just asked for; the driver applies them (`ApplyDeltas`) and reports the parents they
    lack (`deltas_applied`), which the next rounds ask for. An id is asked at most once per
    session: the peer either sent it or said it lacks it. Finished when nothing is wanted,
    the rounds are spent, or the peer sent a delta nobody asked for.

    With `ancestors` > 0 (a `/trionode/sync/2` peer) each request also asks for up to that
    many ancestors of the deltas asked for that `have` (our version vector) does not cover,
    so a chain of n deltas comes in one answer instead of n round trips. Each ancestor must
    be a parent of a delta asked for or of an ancestor after it in the answer (so parents
    come first); one that is not is unrelated: never applied, counted, and the fetch ends
    as for an unrequested delta. More ancestors than asked for fails the session. A cut
    chain (the answer's limits) goes on with the parents still lacking, as before.
    """

    def __init__(
        self,
        wanted: Iterable[bytes],
        *,
        context_id: bytes,
        max_rounds: int,
        batch: int = MAX_IDS,
        deadline: float | None = None,
        ancestors: int = 0,
        have: Mapping[bytes, int] | None = None,
    ) -> None:
        super().__init__(deadline)
        if not 1 <= batch <= MAX_IDS:
            raise ValueError(f"batch must be within 1..{MAX_IDS}")
        if not 0 <= ancestors <= MAX_ANCESTORS:
            raise ValueError(f"ancestors must be within 0..{MAX_ANCESTORS}")
        self._batch = batch
        self._ancestors = ancestors
        # (A longer vector only makes the peer send more: the hint is cut, never wrong.)
        self._have = sorted(have.items())[:MAX_HAVE] if have and ancestors else []
        self._context_id = context_id
        self._rounds_left = max_rounds
        self._wanted = {i for i in wanted if i != GENESIS}
        self._asked_ever: set[bytes] = set()
        self._asked: frozenset[bytes] = frozenset()
        self._action: ApplyDeltas | None = None
        self._state = _FetchState.READY
        self.rounds = 0
        self.received = 0
        """Deltas verified and handed to the driver to apply."""
        self.ancestors_received = 0
        """Of those, ancestors the peer sent beside the deltas asked for."""
        self.rejected = 0
        """Deltas in answers that were not asked for (never applied)."""
        self.peer_missing: set[bytes] = set()
        """Ids the peer said it does not hold."""
        self.peer_folded: set[bytes] = set()
        """Ids the peer said it folded into its final state (not asked again here)."""
        self.violation: UnrequestedDelta | None = None
        self._ask_next()

    @property
    def finished(self) -> bool:
        return self._state is _FetchState.DONE

    @property
    def awaiting_message(self) -> bool:
        return self._state is _FetchState.AWAIT_ANSWER and not self.failed

    @property
    def wanted(self) -> frozenset[bytes]:
        """Ids still to ask for (left over when the rounds ran out)."""
        return frozenset(self._wanted)

    def next_action(self) -> ApplyDeltas | None:
        action, self._action = self._action, None
        return action

    def receive_message(self, message: SyncMessage, now: float) -> None:
        self.handle_timer(now)
        if isinstance(message, SyncError):
            self._fail(refusal(message.message))
        if self._state is not _FetchState.AWAIT_ANSWER or not isinstance(message, DeltaResponse):
            self._fail(UnexpectedMessage(message, "deltas"))
        assert isinstance(message, DeltaResponse)
        listed = (
            len(message.deltas) + len(message.missing) + len(message.later) + len(message.folded)
        )
        if listed != len(self._asked):
            self._fail(AnswerMismatch(f"an answer for {listed} ids, {len(self._asked)} asked"))
        missing, later, folded = set(message.missing), set(message.later), set(message.folded)
        if (
            len(missing) + len(later) + len(folded)
            != len(message.missing) + len(message.later) + len(message.folded)
            or not (missing | later | folded) <= self._asked
            or missing & later
            or folded & (missing | later)
        ):
            # An answer to another request (a replayed or duplicated one).
            self._fail(AnswerMismatch("the answer lists ids that were not asked"))
        if later and not message.deltas:
            self._fail(AnswerMismatch("the answer defers ids without sending any"))
        if len(message.ancestors) > self._ancestors:
            self._fail(
                TooManyIds(f"{len(message.ancestors)} ancestors (at most {self._ancestors})")
            )
        verified: list[VerifiedDelta] = []
        seen: set[bytes] = set()
        for wire in message.deltas:
            delta = self._verify(wire)
            if delta.id not in self._asked or delta.id in seen:
                self._unrequested()
                continue
            seen.add(delta.id)
            verified.append(delta)
        ancestors = self._related([self._verify(wire) for wire in message.ancestors], verified)
        self.peer_missing.update(missing)
        self.peer_folded.update(folded)
        self._wanted.update(later)  # asked again: the answer had no room for them
        for delta in ancestors:
            self._wanted.discard(delta.id)
            self._asked_ever.add(delta.id)
        verified = ancestors + verified
        self.received += len(verified)
        self.ancestors_received += len(ancestors)
        self._state = _FetchState.AWAIT_APPLY
        if verified:
            self._action = ApplyDeltas(tuple(verified))
        else:
            self.deltas_applied(())

    def _verify(self, wire: bytes) -> VerifiedDelta:
        try:
            return verify_wire(wire, context_id=self._context_id)
        except RemoteProtocolError as exc:
            self._fail(exc)  # a forged or corrupt delta fails the session

    def _unrequested(self) -> None:
        self.rejected += 1
        self.violation = UnrequestedDelta("the peer sent a delta that was not requested")

    def _related(
        self, ancestors: list[VerifiedDelta], asked: list[VerifiedDelta]
    ) -> list[VerifiedDelta]:
        """The ancestors that are a parent of a delta asked for or of an ancestor after them,
        in the answer's order (parents first). Walked from the end: every child of a
        delta comes after it, so its parents are known to be wanted when it is reached.
        The others (unrelated, repeated, or out of causal order) are counted and dropped."""
        wanted = {p for delta in asked for p in delta.header.parents}
        taken: set[bytes] = {delta.id for delta in asked}
        keep: list[VerifiedDelta] = []
        for delta in reversed(ancestors):
            if delta.id not in wanted or delta.id in taken:
                self._unrequested()
                continue
            taken.add(delta.id)
            wanted.update(delta.header.parents)
            keep.append(delta)
        keep.reverse()
        return keep

    def deltas_applied(self, missing: Iterable[bytes]) -> None:
        """The deltas of the last `ApplyDeltas` were handed to the processor; `missing` are
        the parents they wait for (fetched in the next rounds)."""
        self._check_alive()
        if self._state is not _FetchState.AWAIT_APPLY:
            raise LocalProtocolError("no deltas were waiting to be applied")
        self._action = None
        self._wanted.update(i for i in missing if i != GENESIS and i not in self._asked_ever)
        self._ask_next()

    def _ask_next(self) -> None:
        if self.violation is not None or not self._wanted or self._rounds_left <= 0:
            self._state = _FetchState.DONE
            return
        batch = sorted(self._wanted)[: self._batch]
        self._wanted.difference_update(batch)
        self._asked_ever.update(batch)
        self._asked = frozenset(batch)
        self._rounds_left -= 1
        self.rounds += 1
        self._outbox.append(DeltaRequest(ids=batch, ancestors=self._ancestors, have=self._have))
        self._state = _FetchState.AWAIT_ANSWER


# -- responder -------------------------------------------------------------------------------------


class _ServeState(enum.Enum):
    AWAIT_AUTH = "await_auth"
    CHECKING_AUTH = "checking_auth"
    SERVING = "serving"
    ACTING = "acting"
    DONE = "done"


class Responder(MachineBase):
    """The serving side of one sync stream: the first message must prove membership
    (`CheckAuth`); then it answers heads and delta requests itself (reading storage through
    `ReadHeads` / `ReadDeltas`) and hands snapshot and tree-comparison requests to the
    driver (`Delegate`), one request at a time, until the requester ends the stream.

    ``max_frame`` is the largest frame the driver should accept next: small until the peer
    has proved membership. At most `max_requests` heads and delta requests are served per
    stream, each naming at most `max_ids` ids.

    A delta request that asks for ancestors (`/trionode/sync/2`) is answered after a walk
    back from the deltas sent (`ReadAncestors`, one generation of parents per action):
    what the request's version vector does not cover, up to the count it asked for (and
    at most `max_ancestors`) and within `max_answer_bytes` with the deltas asked for,
    sent parents first.
    """

    def __init__(
        self,
        *,
        max_ids: int = MAX_IDS,
        max_requests: int = 1024,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        max_ancestors: int = MAX_ANCESTORS,
        deadline: float | None = None,
        headers: HeaderCache | None = None,
        walk_budget: float | None = None,
    ) -> None:
        super().__init__(deadline)
        self._walk_budget = walk_budget
        """Seconds an ancestor walk may take from its request: past them the answer goes
        with what the walk took so far (None: no bound)."""
        self._request_at = 0.0
        self._headers = headers if headers is not None else HeaderCache(0)
        """Headers read by earlier walks (shared by the streams a node serves)."""
        self._max_answer_bytes = max_answer_bytes
        self._max_ancestors = max_ancestors
        self._request: DeltaRequest | None = None
        self._walk: _Walk | None = None
        self.ancestors_sent = 0
        """Ancestors sent in answers on this stream so far."""
        self._max_ids = max_ids
        self._max_requests = max_requests
        self._requests = 0
        self._state = _ServeState.AWAIT_AUTH
        self._action: ResponderAction | None = None
        self._acting: type[ResponderAction] | None = None
        self._claimed: SyncAuth | None = None
        self.auth: SyncAuth | None = None
        """The requester's proof, once checked."""
        self.refused: str | None = None
        """Why the session was refused (sent to the peer as a SyncError)."""

    @property
    def authenticated(self) -> bool:
        return self.auth is not None

    @property
    def max_frame(self) -> int:
        return MAX_FRAME if self.authenticated else MAX_AUTH_FRAME

    @property
    def finished(self) -> bool:
        return self._state is _ServeState.DONE

    @property
    def awaiting_message(self) -> bool:
        return self._state in (_ServeState.AWAIT_AUTH, _ServeState.SERVING) and not self.failed

    def next_action(self) -> ResponderAction | None:
        action, self._action = self._action, None
        return action

    def receive_message(self, message: SyncMessage, now: float) -> None:
        self.handle_timer(now)
        if not self.awaiting_message:
            raise LocalProtocolError(f"responder is not reading ({self._state.value})")
        if self._state is _ServeState.AWAIT_AUTH:
            if not isinstance(message, SyncAuth):
                self._fail(NotAuthenticated(message))
            assert isinstance(message, SyncAuth)
            self._claimed = message
            self._act(CheckAuth(message), _ServeState.CHECKING_AUTH)
            return
        if isinstance(message, HeadsRequest | DeltaRequest):
            self._requests += 1
            if self._requests > self._max_requests:
                self._fail(TooManyRequests(f"more than {self._max_requests} requests"))
        if isinstance(message, HeadsRequest):
            if len(message.heads) > self._max_ids:
                self._fail(TooManyIds(f"{len(message.heads)} heads (at most {self._max_ids})"))
            self._act(ReadHeads(tuple(message.heads)))
        elif isinstance(message, DeltaRequest):
            if len(message.ids) > self._max_ids:
                self._fail(TooManyIds(f"{len(message.ids)} ids (at most {self._max_ids})"))
            self._request = message
            self._request_at = now
            self._act(ReadDeltas(tuple(message.ids)))
        elif isinstance(message, SnapshotOpen):
            self._act(StreamSnapshot(message))
        elif isinstance(message, STATE_REQUESTS):
            self._act(Delegate(message))
        else:
            self._fail(UnexpectedMessage(message, "a sync request"))

    def receive_eof(self) -> None:
        """The requester ended the stream (between requests): the session is over."""
        self._check_alive()
        if not self.awaiting_message:
            raise LocalProtocolError(f"responder is not reading ({self._state.value})")
        self._state = _ServeState.DONE

    def auth_checked(self, problem: str | None) -> None:
        """The answer to `CheckAuth`: None if the proof holds, else why not (refused)."""
        self._done_acting(CheckAuth)
        if problem is not None:
            self.refuse(problem)
            return
        self.auth = self._claimed
        self._state = _ServeState.SERVING

    def refuse(self, message: str) -> None:
        """End the session with a SyncError (a bad proof, or the node is busy)."""
        self._check_alive()
        self.refused = message
        self._outbox.append(SyncError(message=message[:1024]))
        self._state = _ServeState.DONE

    def heads_read(self, heads: Sequence[bytes], known: Sequence[bytes], root: bytes) -> None:
        self._done_acting(ReadHeads)
        self._answer(
            HeadsResponse(heads=list(heads[: self._max_ids]), root_hash=root, known=list(known))
        )

    def deltas_read(
        self,
        found: Sequence[tuple[bytes, bytes]],
        missing: Sequence[bytes],
        folded: Sequence[bytes] = (),
    ) -> None:
        """The answer to `ReadDeltas`: (id, wire bytes) of the ids held, the ids not held,
        and those folded into the final state. The answer carries deltas up to
        `max_answer_bytes` and lists the rest as `later` (asked again); a delta that alone
        exceeds that cannot travel by sync and is listed missing."""
        self._done_acting(ReadDeltas)
        sent: list[bytes] = []
        sent_ids: list[bytes] = []
        later: list[bytes] = []
        not_sent = list(missing)
        size = 0
        for delta_id, wire in found:
            if len(wire) > self._max_answer_bytes:
                not_sent.append(delta_id)
            elif later or size + len(wire) > self._max_answer_bytes:
                later.append(delta_id)
            else:
                sent.append(wire)
                sent_ids.append(delta_id)
                size += len(wire)
        reply = DeltaResponse(deltas=sent, missing=not_sent, later=later, folded=list(folded))
        request, self._request = self._request, None
        limit = 0 if request is None else min(request.ancestors, self._max_ancestors)
        if limit and sent and not later and self.auth is not None:
            assert request is not None
            walk = _Walk(
                reply,
                self.auth.context_id,
                dict(request.have),
                seen=set(request.ids),
                limit=limit,
                room=self._max_answer_bytes - size,
                headers=self._headers,
            )
            walk.take(zip(sent_ids, sent, strict=True), asked=True)
            self._walk_on(walk)
            return
        self._answer(reply)

    def ancestors_read(
        self, found: Sequence[tuple[bytes, bytes]], now: float | None = None
    ) -> None:
        """The answer to `ReadAncestors`: (id, wire bytes) of those held, in the order
        asked (what is not held is left out: the requester asks for it by id). `now`: the
        time it was read; once the walk has taken `walk_budget` seconds the answer goes
        with what it took so far, parents first, and the requester asks for the rest in
        its next request. Under load a walk of a thousand ancestors outlived the
        requester's session deadline, and the whole answer was lost with it."""
        self._done_acting(ReadAncestors)
        walk, self._walk = self._walk, None
        assert walk is not None
        walk.take(found)
        if (
            now is not None
            and self._walk_budget is not None
            and now - self._request_at >= self._walk_budget
        ):
            walk.stop()
        self._walk_on(walk)

    def _walk_on(self, walk: _Walk) -> None:
        frontier = walk.frontier()
        if frontier:
            self._walk = walk
            self._act(ReadAncestors(tuple(frontier)))
        else:
            answer = walk.answer()
            self.ancestors_sent += len(answer.ancestors)
            self._answer(answer)

    def snapshot_streamed(self, seconds: float) -> None:
        """The snapshot stream ended after `seconds`: it had its own idle deadline, so the
        session's deadline moves on by that long (a long snapshot is not cut by it)."""
        self._done_acting(StreamSnapshot)
        if self._deadline is not None:
            self._deadline += seconds
        self._state = _ServeState.SERVING

    def delegated(self, reply: SyncMessage) -> None:
        self._done_acting(Delegate)
        self._answer(reply)

    def _act(self, action: ResponderAction, state: _ServeState = _ServeState.ACTING) -> None:
        self._action = action
        self._acting = type(action)
        self._state = state

    def _done_acting(self, kind: type[ResponderAction]) -> None:
        self._check_alive()
        if self._acting is not kind:
            raise LocalProtocolError(f"no {kind.__name__} was asked for")
        self._acting = None
        self._action = None

    def _answer(self, reply: SyncMessage) -> None:
        self._outbox.append(reply)
        self._state = _ServeState.SERVING


@attrs.frozen
class HeldHeader:
    """What an ancestor walk needs of a stored delta's header."""

    author: bytes
    """The author's tag (the key of version vectors)."""
    seq: int
    parents: tuple[bytes, ...]


class HeaderCache:
    """The headers of stored deltas that ancestor walks read, the `size` used most recently,
    by (context, id). While many members catch up at once, every session they open walks
    back over the same recent deltas; without it each walk decoded each of their headers
    again (13 % of the 100-node scale bench's process while it converged). An id names its
    delta's bytes, so an entry never goes stale: a delta folded away is just no longer
    read. Sans-IO like the machines: a plain bounded mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._held: OrderedDict[bytes, HeldHeader] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._held)

    def read(self, context_id: bytes, delta_id: bytes, wire: bytes) -> HeldHeader:
        """The header of a stored delta of `context_id` (decoded, no signature check, on a
        miss). Raises RemoteProtocolError for one that does not decode."""
        key = context_id + delta_id
        held = self._held.get(key)
        if held is not None:
            self.hits += 1
            self._held.move_to_end(key)
            return held
        self.misses += 1
        header = stored_header(decode_delta(wire), context_id=context_id)
        held = HeldHeader(tag(header.author), header.seq, tuple(header.parents))
        if self.size > 0:
            self._held[key] = held
            if len(self._held) > self.size:
                self._held.popitem(last=False)
        return held


class _Walk:
    """The walk back from an answer's deltas to the ancestors the requester lacks: each
    `take` adds one generation (as read), `frontier` names the next, until the count or
    the bytes run out or nothing uncovered is left."""

    def __init__(
        self,
        reply: DeltaResponse,
        context_id: bytes,
        have: dict[bytes, int],
        *,
        seen: set[bytes],
        limit: int,
        room: int,
        headers: HeaderCache,
    ) -> None:
        self._reply = reply
        self._headers = headers
        self._context_id = context_id
        self._have = have
        self._seen = seen
        """Ids asked for, taken, or named in a frontier already: never walked twice."""
        self._limit = limit
        self._room = room
        self._taken: dict[bytes, tuple[bytes, tuple[bytes, ...]]] = {}
        self._next: list[bytes] = []
        self._full = False

    def take(self, found: Iterable[tuple[bytes, bytes]], *, asked: bool = False) -> None:
        """One generation read (first the deltas `asked` for, already in the answer): each
        ancestor the requester's vector does not cover goes in, and its parents become the
        next frontier, until the answer is full."""
        parents: list[bytes] = []
        for delta_id, wire in found:
            try:
                header = self._headers.read(self._context_id, delta_id, wire)
            except RemoteProtocolError:
                continue  # (a stored delta we cannot read is not ours to send)
            if not asked:
                if self._have.get(header.author, 0) >= header.seq:
                    continue  # the requester holds it (and so its past)
                if len(self._taken) >= self._limit or len(wire) > self._room:
                    self._full = True
                    break
                self._taken[delta_id] = (wire, header.parents)
                self._room -= len(wire)
            parents.extend(header.parents)
        self._next = []
        if self._full:
            return
        for parent in parents:
            if parent == GENESIS or parent in self._seen:
                continue
            self._seen.add(parent)
            self._next.append(parent)

    def stop(self) -> None:
        """End the walk with what it took (its frontier is not read)."""
        self._full = True

    def frontier(self) -> list[bytes]:
        """The next generation to read (empty: the walk is over)."""
        left = self._limit - len(self._taken)
        return [] if self._full or left <= 0 else self._next[:left]

    def answer(self) -> DeltaResponse:
        ancestors = [self._taken[i][0] for i in self._order()]
        return msgspec.structs.replace(self._reply, ancestors=ancestors)

    def _order(self) -> list[bytes]:
        """The taken ids, each after its taken parents (depth first, iteratively)."""
        out: list[bytes] = []
        done: set[bytes] = set()
        for start in self._taken:
            stack = [start]
            entered: set[bytes] = set()
            while stack:
                node = stack[-1]
                if node in done:
                    stack.pop()
                    continue
                todo = [p for p in self._taken[node][1] if p in self._taken and p not in done]
                if todo and node not in entered:
                    entered.add(node)
                    stack.extend(todo)
                    continue
                done.add(node)
                out.append(node)
                stack.pop()
        return out
