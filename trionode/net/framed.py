"""Length-prefixed frames over one stream: the helper every request/response protocol uses
(sync sessions, parent fetches, joins), so each gets the same deadlines and memory bound.

A frame is a 4-byte big-endian length and that many bytes. Three rules keep a hostile or
stalled peer cheap:

* **A deadline for the first frame** (``StreamLimits.first_message``): a stream that is
  opened and then left silent is closed, so it holds nothing (no task, no limiter token)
  for long. Only the serving side needs it: a requester writes first.
* **A deadline between frames** (``StreamLimits.between_messages``): a peer that stops in
  the middle of a conversation, or in the middle of a frame, is cut off.
* **The length is checked before the body is read.** The reader takes the 4-byte prefix
  alone, refuses a length above the current ``max_frame`` at once, and then reads no more
  than that frame's remaining bytes, so a stream never buffers more than one frame of the
  size it currently allows. Protocols start with a small ``max_frame`` (an authentication
  message) and raise it once the peer has proved who it is, so an anonymous peer can
  never make the node hold a large frame.

A deadline that passes raises :class:`~trionode.errors.StreamStalledError` (a kind of
RemoteProtocolError that costs the stream, not the connection: the peer may only be slow).
"""

from __future__ import annotations

import struct
from typing import Final

import attrs
import trio

from trionode.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    StreamEndedError,
    StreamStalledError,
)

LENGTH: Final = struct.Struct(">I")
RECEIVE_SIZE: Final = 64 * 1024
"""Largest single read while a frame's body comes in."""


@attrs.frozen
class StreamLimits:
    """Deadlines for the frames of one stream (from `network.stream_*` in config.toml)."""

    first_message: float = 10.0
    """Seconds the serving side waits for the first frame of a stream it accepted."""
    between_messages: float = 30.0
    """Seconds either side waits for each further frame (and the requester for the first
    answer)."""

    def for_requester(self) -> StreamLimits:
        """The limits for the side that opened the stream: it sends first, then waits for
        answers, each within `between_messages`."""
        return StreamLimits(self.between_messages, self.between_messages)


class FramedStream:
    """Frames over `stream`, read under the deadlines of `limits` and at most `max_frame`
    bytes each (settable: raise it once the peer is authenticated).

    Not safe for concurrent receives (one reader per stream, as every protocol here has).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        limits: StreamLimits,
        *,
        max_frame: int,
        what: str = "stream",
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.max_frame = max_frame
        self.what = what
        """Names the protocol in errors ("sync stream ended mid-frame")."""
        self._frames_received = 0

    async def send_frame(self, body: bytes) -> None:
        """Send one frame. Raises LocalProtocolError if `body` is larger than 4 GiB - 1."""
        if len(body) > 0xFFFFFFFF:
            raise LocalProtocolError(f"{self.what} frame of {len(body)} bytes is too large")
        await self.stream.send_all(LENGTH.pack(len(body)) + body)

    async def receive_frame(self) -> bytes:
        """The next frame's body.

        Raises:
            StreamStalledError: the frame did not arrive (whole) within its deadline.
            StreamEndedError: the stream ended before the frame did.
            RemoteProtocolError: the frame announces more than `max_frame` bytes.
        """
        body = await self._receive_within_deadline(eof_ok=False)
        assert body is not None
        return body

    async def receive_frame_or_eof(self) -> bytes | None:
        """Like :meth:`receive_frame`, but a clean end of stream between frames is None."""
        return await self._receive_within_deadline(eof_ok=True)

    async def _receive_within_deadline(self, *, eof_ok: bool) -> bytes | None:
        timeout = (
            self.limits.first_message
            if self._frames_received == 0
            else self.limits.between_messages
        )
        with trio.move_on_after(timeout) as scope:
            body = await self._receive(eof_ok=eof_ok)
            self._frames_received += 1
            return body
        assert scope.cancelled_caught
        raise StreamStalledError(
            f"{self.what}: no {'first ' if self._frames_received == 0 else ''}message "
            f"within {timeout:g}s"
        )

    async def _receive(self, *, eof_ok: bool) -> bytes | None:
        header = await self._receive_exactly(LENGTH.size, eof_ok=eof_ok, started=False)
        if header is None:
            return None
        (length,) = LENGTH.unpack(header)
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"{self.what} frame of {length} bytes exceeds {self.max_frame}"
            )
        body = await self._receive_exactly(length, eof_ok=False, started=True)
        assert body is not None
        return body

    async def _receive_exactly(self, size: int, *, eof_ok: bool, started: bool) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            chunk = await self.stream.receive_some(min(size - len(data), RECEIVE_SIZE))
            if not chunk:
                if eof_ok and not data:
                    return None
                where = "mid-frame" if data or started else "mid-conversation"
                raise StreamEndedError(f"{self.what} ended {where}")
            data += chunk
        return bytes(data)
