"""The framed-stream helper: deadlines, the length check before the body, clean ends."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trionode.errors import RemoteProtocolError, StreamEndedError, StreamStalledError
from trionode.net.framed import LENGTH, FramedStream, StreamLimits

LIMITS = StreamLimits(first_message=2.0, between_messages=5.0)


class CountingStream(trio.abc.HalfCloseableStream):
    """A memory stream that remembers the largest read the reader asked for."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.largest_read = 0
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.largest_read = max(self.largest_read, max_bytes or 0)
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


def pair(
    max_frame: int = 1024,
) -> tuple[trio.abc.HalfCloseableStream, FramedStream, CountingStream]:
    left, right = trio.testing.memory_stream_pair()
    counting = CountingStream(right)
    return left, FramedStream(counting, LIMITS, max_frame=max_frame, what="test"), counting


async def test_frames_round_trip_and_a_clean_end_is_none() -> None:
    left, framed, _ = pair()
    sender = FramedStream(left, LIMITS, max_frame=1024)
    await sender.send_frame(b"hello")
    await sender.send_frame(b"")
    await left.send_eof()
    assert await framed.receive_frame() == b"hello"
    assert await framed.receive_frame() == b""
    assert await framed.receive_frame_or_eof() is None


async def test_a_silent_stream_is_given_up_after_the_first_message_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _left, framed, _ = pair()
    started = trio.current_time()
    with pytest.raises(StreamStalledError, match="no first message within 2s"):
        await framed.receive_frame()
    assert trio.current_time() - started == pytest.approx(LIMITS.first_message)


async def test_a_stall_between_messages_or_mid_frame_is_given_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, framed, _ = pair()
    await left.send_all(LENGTH.pack(3) + b"abc" + LENGTH.pack(10) + b"part")
    assert await framed.receive_frame() == b"abc"
    started = trio.current_time()
    with pytest.raises(StreamStalledError, match="within 5s"):
        await framed.receive_frame()
    assert trio.current_time() - started == pytest.approx(LIMITS.between_messages)


async def test_the_length_is_refused_before_any_of_the_body_is_read() -> None:
    left, framed, counting = pair(max_frame=100)
    # Announce 8 MiB and send a first megabyte of it.
    await left.send_all(LENGTH.pack(8 * 1024 * 1024) + bytes(1024 * 1024))
    with pytest.raises(RemoteProtocolError, match="8388608 bytes exceeds 100"):
        await framed.receive_frame()
    assert counting.received == LENGTH.size
    # Raised limits apply to the next frame, and reads never ask past the frame's end.
    left2, framed2, counting2 = pair(max_frame=10)
    framed2.max_frame = 200_000
    await left2.send_all(LENGTH.pack(150_000) + bytes(150_000) + b"trailing")
    assert await framed2.receive_frame() == bytes(150_000)
    assert counting2.received == LENGTH.size + 150_000
    assert counting2.largest_read <= 64 * 1024


async def test_an_end_inside_a_frame_or_before_the_first_is_an_error() -> None:
    left, framed, _ = pair()
    await left.send_all(LENGTH.pack(10) + b"abc")
    await left.send_eof()
    with pytest.raises(StreamEndedError, match="test ended mid-frame"):
        await framed.receive_frame_or_eof()
    left2, framed2, _ = pair()
    await left2.send_eof()
    with pytest.raises(StreamEndedError, match="test ended mid-conversation"):
        await framed2.receive_frame()


def test_requesters_wait_the_between_messages_deadline_for_the_first_answer() -> None:
    assert LIMITS.for_requester() == StreamLimits(5.0, 5.0)
