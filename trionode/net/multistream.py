"""Trio driver for multistream-select: negotiate a protocol on any trio stream.

Bytes the peer sent right after agreement already belong to the next protocol, so both
functions return a stream that hands those bytes out first (`PrefixedStream`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import trio

from trionode.errors import PeerError, RemoteProtocolError
from trionode.wire.multistream import (
    Event,
    MultistreamDialer,
    MultistreamListener,
    NegotiationFailed,
    ProtocolAgreed,
)

RECEIVE_SIZE = 4096
S = TypeVar("S", bound=trio.abc.Stream)


class ProtocolNotSupportedError(PeerError):
    """The peer answered `na` to every protocol we proposed."""


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream whose first received bytes come from `prefix`, then from `inner`."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = bytearray(prefix)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not isinstance(self.inner, trio.abc.HalfCloseableStream):
            raise trio.BrokenResourceError("stream cannot half-close")
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            n = len(self._prefix) if max_bytes is None else min(max_bytes, len(self._prefix))
            chunk = bytes(self._prefix[:n])
            del self._prefix[:n]
            return chunk
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _wrap(stream: S, trailing: bytes) -> S | PrefixedStream:
    return PrefixedStream(stream, trailing) if trailing else stream


class _Negotiation(Protocol):
    @property
    def trailing_data(self) -> bytes: ...

    def receive_data(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def data_to_send(self) -> bytes: ...
    def next_event(self) -> Event | None: ...


async def _drive(stream: trio.abc.Stream, machine: _Negotiation) -> ProtocolAgreed:
    while True:
        out = machine.data_to_send()
        if out:
            await stream.send_all(out)
        event = machine.next_event()
        if isinstance(event, ProtocolAgreed):
            # Our echo (as listener) must reach the peer before the protocol starts.
            out = machine.data_to_send()
            if out:
                await stream.send_all(out)
            return event
        if isinstance(event, NegotiationFailed):
            raise ProtocolNotSupportedError(f"peer supports none of {', '.join(event.tried)}")
        if event is not None:
            continue  # a rejection: the next proposal is already queued
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise RemoteProtocolError("peer closed the stream during protocol negotiation")
        machine.receive_data(data)


async def select_protocol(stream: S, protocols: Sequence[str]) -> tuple[str, S | PrefixedStream]:
    """As the dialer: propose `protocols` in order; return the agreed one and the stream."""
    dialer = MultistreamDialer(protocols)
    agreed = await _drive(stream, dialer)
    return agreed.protocol, _wrap(stream, dialer.trailing_data)


async def accept_protocol(stream: S, supported: Iterable[str]) -> tuple[str, S | PrefixedStream]:
    """As the listener: accept the first proposal we support."""
    listener = MultistreamListener(supported)
    agreed = await _drive(stream, listener)
    return agreed.protocol, _wrap(stream, listener.trailing_data)
