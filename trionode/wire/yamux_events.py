"""Events emitted by :class:`trionode.wire.yamux.YamuxConnection`.

Every event is a frozen, slotted dataclass. ``next_event()`` returns them in the order the
frames that caused them arrived; for one frame carrying several flags the order is
SYN/ACK, then data, then FIN, then RST.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "GoAwayReceived",
    "PingReceived",
    "PongReceived",
    "StreamAccepted",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
    "YamuxEvent",
]


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream (a frame with SYN). It has already been accepted for us."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer acknowledged (ACK) a stream we opened."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Body bytes arrived on a stream.

    The bytes count against the stream's receive window until the application hands them
    back with ``acknowledge_received(stream_id, len(data))``.
    """

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (FIN): no more data will arrive on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset the stream (RST), or refused one we opened. Its state is gone."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted more send window on a stream: ``send_data`` may accept more now."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged us; the ACK reply has already been queued."""

    opaque: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered one of our pings."""

    opaque: int
    rtt: float | None
    """Seconds between ``ping()`` and the answer, if ``now`` was known at both ends."""


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams; existing ones may finish.

    ``error_code`` is 0 (normal), 1 (protocol error), 2 (internal error) or anything else
    the peer chose. js-libp2p treats a non-zero code as an abort of every stream.
    """

    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over: the transport hit EOF, or a ping went unanswered.

    Every stream is gone. (Protocol violations are raised as ``RemoteProtocolError``
    from ``receive_data`` instead.)
    """

    reason: str
    error_code: int | None
    """The code of the peer's GoAway, if one arrived before the end."""


YamuxEvent: TypeAlias = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PingReceived
    | PongReceived
    | GoAwayReceived
    | ConnectionTerminated
)
