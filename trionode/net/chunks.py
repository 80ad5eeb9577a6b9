"""A FIFO of received byte chunks that hands out up to N bytes without re-copying them.

Appending to one big bytearray and deleting from its front copies every byte twice more
and reallocates as the buffer grows; keeping the chunks as they arrived costs one copy only
when a read ends in the middle of a chunk.
"""

from __future__ import annotations

import operator
from collections import deque


class ChunkQueue:
    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._size += len(data)

    def take(self, max_bytes: int | None = None) -> bytes:
        """Remove and return up to `max_bytes` (all if None) from the front."""
        chunks = self._chunks
        if not chunks:
            return b""
        first = chunks[0]
        if max_bytes is not None and len(first) >= max_bytes:
            if len(first) == max_bytes:
                chunks.popleft()
            else:
                chunks[0] = first[max_bytes:]
                first = first[:max_bytes]
            self._size -= len(first)
            return first
        limit = self._size if max_bytes is None else min(max_bytes, self._size)
        parts: list[bytes] = []
        taken = 0
        while chunks and taken < limit:
            chunk = chunks[0]
            room = limit - taken
            if len(chunk) <= room:
                parts.append(chunks.popleft())
                taken += len(chunk)
            else:
                parts.append(chunk[:room])
                chunks[0] = chunk[room:]
                taken += room
        self._size -= taken
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0


def checked_max_bytes(max_bytes: int | None) -> int | None:
    """Validate `receive_some`'s argument as trio.abc.ReceiveStream requires."""
    if max_bytes is None:
        return None
    max_bytes = operator.index(max_bytes)
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes
