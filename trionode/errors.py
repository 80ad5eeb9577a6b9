"""The error hierarchy: every error trionode raises on purpose derives from TrionodeError.

Protocol errors follow h11: a *local* protocol error means we tried to do something the
protocol forbids (a bug or misuse on our side); a *remote* one means the peer sent bytes
that break the protocol, and the right reaction is to disconnect that peer and count it.
"""

from __future__ import annotations


class TrionodeError(Exception):
    """Base of every error trionode raises deliberately."""


class ConfigError(TrionodeError):
    """The configuration or the home directory is unusable; the message names the key/path."""


class ProtocolError(TrionodeError):
    """A wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We attempted something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent data that violates the protocol (malformed, oversized, out of state)."""


class StreamEndedError(RemoteProtocolError):
    """The peer closed a stream before a whole message. It may simply have given up (its
    own timeout), so the stream fails but the peer is not disconnected for it."""


class StreamStalledError(StreamEndedError):
    """The peer sent nothing within a stream's deadline (first message, or between
    messages), so we closed the stream."""


class PeerError(TrionodeError):
    """A peer could not be reached, authenticated or kept."""


class StorageError(TrionodeError):
    """The datastore failed or holds data we cannot read."""


class WrongPassphraseError(StorageError):
    """The passphrase does not open this encrypted datastore."""


class ListenError(TrionodeError):
    """A configured listen address could not be bound (in use, not ours, no permission)."""


class HomeLockedError(TrionodeError):
    """Another running node holds this home's lock."""

    def __init__(self, home: object, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"{home}: a node is already running ({who})")
        self.pid = pid


class ReadOnlyError(TrionodeError):
    """The node runs with `node.mode = "read-only"` and the request would write."""

    def __init__(self, what: str) -> None:
        super().__init__(f"this node is read-only (node.mode): {what} is not allowed")
        self.what = what


_SILENT_ERRORS: dict[str, str] = {
    "TooSlowError": "timed out",
    "BrokenResourceError": "the connection broke",
    "ClosedResourceError": "the connection was closed",
    "EndOfChannel": "the peer closed the stream",
}


def describe(error: BaseException | None) -> str:
    """What went wrong, in words, for a message a user reads: Trio's timeouts and broken
    streams carry no text of their own (``str()`` is empty), so they are named here."""
    if error is None:
        return "no address to try"
    text = str(error)
    if text:
        return text
    name = type(error).__name__
    return _SILENT_ERRORS.get(name, name)
