"""A bounded receive buffer for sans-IO parsers (in the style of wsproto's ``Buffer``).

Drivers :meth:`ReceiveBuffer.feed` whatever ``receive_some`` returned; parsers take complete
units out with the ``consume_*`` methods, which either consume a whole unit or nothing and
return ``None`` ("need more bytes"). Nothing is ever partially consumed, so no rollback is
needed.

The buffer refuses to hold more than ``max_size`` unconsumed bytes: a peer that keeps
sending while the parser cannot make progress is cut off with RemoteProtocolError instead of
growing memory without bound. Parsers must therefore drain everything they can after each
feed, and drivers must feed chunks that fit (``max_size`` minus the largest legal
incomplete unit).

Implementation note: deleting a prefix of a ``bytearray`` is O(1) in CPython (it moves the
start pointer), so consuming from the front is cheap.
"""

from __future__ import annotations

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.varint import (
    MAX_UVARINT_LEN,
    BytesLike,
    decode_length_prefixed,
    decode_uvarint,
)


class ReceiveBuffer:
    """Bytes received but not yet parsed, capped at ``max_size``."""

    __slots__ = ("_data", "_max_size")

    def __init__(self, max_size: int) -> None:
        """Create an empty buffer that will hold at most ``max_size`` bytes."""
        if max_size <= 0:
            raise LocalProtocolError("max_size must be positive")
        self._data = bytearray()
        self._max_size = max_size

    @property
    def max_size(self) -> int:
        """The most unconsumed bytes this buffer will hold."""
        return self._max_size

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def feed(self, data: BytesLike) -> None:
        """Append received bytes.

        Raises:
            RemoteProtocolError: the buffer would hold more than ``max_size`` bytes.
        """
        if len(self._data) + len(data) > self._max_size:
            raise RemoteProtocolError(
                f"receive buffer overflow: {len(self._data) + len(data)} bytes "
                f"exceed {self._max_size}"
            )
        self._data += data

    def peek(self, count: int) -> bytes:
        """Return up to ``count`` bytes from the front without consuming them."""
        return bytes(self._data[:count])

    def consume_exactly(self, count: int) -> bytes | None:
        """Consume and return exactly ``count`` bytes, or ``None`` if fewer are buffered."""
        if count > len(self._data):
            return None
        # Copy once, straight out of the bytearray (slicing it would copy twice); the view
        # must be released before the bytearray can be resized.
        with memoryview(self._data) as view:
            out = bytes(view[:count])
        del self._data[:count]
        return out

    def consume_at_most(self, count: int) -> bytes:
        """Consume and return up to ``count`` bytes (possibly none)."""
        out = bytes(self._data[:count])
        del self._data[:count]
        return out

    def consume_all(self) -> bytes:
        """Consume and return everything buffered."""
        out = bytes(self._data)
        self._data.clear()
        return out

    def consume_uvarint(self, *, max_len: int = MAX_UVARINT_LEN) -> int | None:
        """Consume one minimal uvarint, or nothing (``None``) if it is incomplete.

        Raises:
            RemoteProtocolError: the varint is malformed.
        """
        decoded = decode_uvarint(self._data, max_len=max_len)
        if decoded is None:
            return None
        value, consumed = decoded
        del self._data[:consumed]
        return value

    def consume_length_prefixed(self, *, max_size: int) -> bytes | None:
        """Consume one ``uvarint(len) || body`` message and return the body.

        Consumes nothing and returns ``None`` while the message is incomplete.

        Raises:
            RemoteProtocolError: the prefix is malformed or declares more than ``max_size``.
        """
        decoded = decode_length_prefixed(self._data, max_size=max_size)
        if decoded is None:
            return None
        body, consumed = decoded
        del self._data[:consumed]
        return body
