"""Why a sync session ended early, as types (raised by the machines in `trionode.sync`).

A peer that breaks the protocol raises a :class:`SyncViolation` (a RemoteProtocolError, so
the stream's handler counts it and closes the stream, and the session manager backs off); a
peer that answers with a refusal raises :class:`PeerRefused`; a session that outlives its
deadline raises :class:`SessionExpired` (a stalled stream: the peer may only be slow).
"""

from __future__ import annotations

from trionode.context.errors import NotPermitted, PeerFailed
from trionode.errors import RemoteProtocolError, StreamStalledError


class SyncViolation(RemoteProtocolError):
    """The peer sent something the sync protocol does not allow at this point."""


class UnexpectedMessage(SyncViolation):
    """A message of the wrong kind for the session's state (a reply nobody asked for, a
    request on the requesting side, a second authentication)."""

    def __init__(self, got: object, expected: str) -> None:
        super().__init__(f"expected {expected}, got {type(got).__name__}")
        self.got = type(got).__name__
        self.expected = expected


class NotAuthenticated(UnexpectedMessage):
    """The first message of a served sync stream was not a membership proof."""

    def __init__(self, got: object) -> None:
        super().__init__(got, "auth (a sync stream must start with auth)")


class TooManyIds(SyncViolation):
    """A request or answer listing more ids than the protocol allows (or than were asked)."""


class AnswerMismatch(SyncViolation):
    """A delta answer that does not account for exactly the ids asked (each either sent or
    listed missing): an answer to another request, replayed or duplicated, or a truncated
    one."""


class TooManyRequests(SyncViolation):
    """More requests on one served stream than `sync.serve_max_requests`."""


class UnrequestedDelta(SyncViolation):
    """A delta answer carried a delta that was not asked for (or one twice). The delta is
    never applied; the fetch ends there."""


class SessionExpired(StreamStalledError):
    """The session's deadline passed before it finished."""


class PeerRefused(PeerFailed):
    """The peer answered with a refusal (not a member, busy, unknown context)."""


class PeerBusy(PeerRefused):
    """The peer refused because it runs `sync.max_concurrent` sessions already: a sign of
    load, not of a bad peer (counted apart, `trionode_sync_session_failures`)."""


BUSY = "busy: too many sync sessions"
"""The refusal a responder with no session token left sends."""


def refusal(message: str) -> PeerRefused:
    """The error for a peer's `SyncError` carrying `message`."""
    if message.startswith(BUSY):
        return PeerBusy(f"peer refused: {message}")
    return PeerRefused(f"peer refused: {message}")


class UntrustedState(NotPermitted):
    """The peer offered state without signatures but is no writer in our own resolution:
    nothing it sends is joined (`trionode.sync.treecmp`)."""
