"""multistream-select 1.0 (``/multistream/1.0.0``) as sans-IO state machines.

Theory of operation
-------------------
Every message is ``uvarint(len(text) + 1) || utf8(text) || b"\\n"`` (the length counts the
newline). Both sides first send the header ``/multistream/1.0.0``; the first message each
side receives must be exactly that header. The dialer (initiator) then proposes protocol
ids one at a time; the listener echoes an id to accept it or answers ``na``. After the echo
the channel belongs to the agreed protocol, whose first bytes may already sit in the same
segment, so everything still buffered is handed over as :attr:`trailing_data`.

Two classes share one API (h11-style):

* :meth:`receive_data` — feed received bytes; ``b""`` means the peer closed its side (EOF).
* :meth:`next_event` — the next :data:`Event`, or ``None`` when more bytes are needed or the
  negotiation is over.
* :meth:`data_to_send` — bytes to write to the peer (possibly empty).

:class:`MultistreamDialer` pipelines ``header + first proposal`` in one write, as js-libp2p
does, then waits for both replies; ``pipeline=False`` waits for the listener's header first,
as py-libp2p does. Either listener behaviour interoperates with either dialer.
:class:`MultistreamListener` sends its header at once, without waiting for the dialer.

``ls`` is optional and its reply format ill-specified; the listener refuses it with ``na``
unless ``answer_ls=True``, in which case it answers with one message whose body is the
concatenation of the encoded protocol ids (the go/js format).

Limits: messages longer than :data:`MAX_MESSAGE_LENGTH` (js's ``MAX_PROTOCOL_LENGTH``) and
more than ``max_attempts`` refused proposals are RemoteProtocolErrors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.buffer import ReceiveBuffer
from trionode.wire.varint import BytesLike, encode_uvarint

MULTISTREAM_PROTOCOL = "/multistream/1.0.0"
"""The multistream-select 1.0 header."""

NA = "na"
"""The listener's refusal."""

LS = "ls"
"""The (optional) request for the listener's protocol list."""

MAX_MESSAGE_LENGTH = 1024
"""Largest accepted message, counting the newline (the varint length field's value)."""

MAX_ATTEMPTS = 16
"""How many proposals a listener refuses before giving up on the dialer."""

DEFAULT_MAX_BUFFER_SIZE = 1 << 20
"""Default cap on unparsed received bytes (mostly pipelined data of the next protocol)."""


@dataclass(frozen=True, slots=True)
class ProtocolAgreed:
    """Both sides now speak ``protocol``; remaining bytes are :attr:`trailing_data`."""

    protocol: str


@dataclass(frozen=True, slots=True)
class ProtocolRejected:
    """The listener answered ``na`` to ``protocol`` (dialer), or we refused it (listener)."""

    protocol: str


@dataclass(frozen=True, slots=True)
class NegotiationFailed:
    """The dialer ran out of proposals; every one in ``tried`` was rejected."""

    tried: tuple[str, ...]


Event: TypeAlias = ProtocolAgreed | ProtocolRejected | NegotiationFailed


def encode_message(text: str, *, max_length: int = MAX_MESSAGE_LENGTH) -> bytes:
    """Encode one multistream message: ``uvarint(len + 1) || text || "\\n"``.

    Raises:
        LocalProtocolError: ``text`` is empty, contains a newline, or is too long.
    """
    if not text or "\n" in text:
        raise LocalProtocolError(f"invalid multistream message {text!r}")
    body = text.encode() + b"\n"
    if len(body) > max_length:
        raise LocalProtocolError(f"multistream message of {len(body)} bytes is too long")
    return encode_uvarint(len(body)) + body


def encode_ls_response(protocols: Iterable[str], *, max_length: int = MAX_MESSAGE_LENGTH) -> bytes:
    """Encode an ``ls`` reply: one message whose body is the concatenated encoded ids."""
    inner = b"".join(encode_message(p, max_length=max_length) for p in protocols)
    body = inner + b"\n"
    return encode_uvarint(len(body)) + body


class _Negotiation:
    """What dialer and listener share: buffering, message parsing, output, EOF."""

    def __init__(self, *, max_message_length: int, max_buffer_size: int) -> None:
        self._buffer = ReceiveBuffer(max_buffer_size)
        self._max_message_length = max_message_length
        self._outgoing = bytearray()
        self._events: deque[Event] = deque()
        self._header_received = False
        self._finished = False
        self._eof = False
        self._agreed: str | None = None

    @property
    def agreed_protocol(self) -> str | None:
        """The protocol agreed on, or ``None`` (still negotiating, or failed)."""
        return self._agreed

    @property
    def finished(self) -> bool:
        """Whether negotiation is over (agreed or failed); no more bytes should be fed."""
        return self._finished

    @property
    def trailing_data(self) -> bytes:
        """Bytes received beyond the last negotiation message.

        After :class:`ProtocolAgreed` these are the first bytes of the agreed protocol and
        must be handed to its parser. Reading does not consume them.
        """
        return self._buffer.peek(len(self._buffer))

    def receive_data(self, data: BytesLike) -> None:
        """Feed bytes from the peer; ``b""`` signals end of file.

        Raises:
            LocalProtocolError: negotiation is already over, or data follows EOF.
            RemoteProtocolError: the peer sent more than the buffer cap.
        """
        if self._finished:
            raise LocalProtocolError("negotiation is over; give bytes to the next protocol")
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        self._buffer.feed(data)

    def data_to_send(self) -> bytes:
        """Return (and forget) the bytes to write to the peer."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def next_event(self) -> Event | None:
        """Return the next event, or ``None`` if more data is needed or negotiation ended.

        Raises:
            RemoteProtocolError: the peer broke the protocol or closed mid-negotiation.
        """
        while not self._events:
            if self._finished:
                return None
            message = self._read_message()
            if message is None:
                if self._eof:
                    raise RemoteProtocolError("peer closed the stream during negotiation")
                return None
            if not self._header_received:
                if message != MULTISTREAM_PROTOCOL:
                    raise RemoteProtocolError(f"expected multistream header, got {message!r}")
                self._header_received = True
                self._on_header()
            else:
                self._on_message(message)
        return self._events.popleft()

    def _send(self, text: str) -> None:
        self._outgoing += encode_message(text, max_length=self._max_message_length)

    def _agree(self, protocol: str) -> None:
        self._agreed = protocol
        self._finished = True
        self._events.append(ProtocolAgreed(protocol))

    def _read_message(self) -> str | None:
        body = self._buffer.consume_length_prefixed(max_size=self._max_message_length)
        if body is None:
            return None
        if not body.endswith(b"\n") or len(body) < 2:
            raise RemoteProtocolError("multistream message does not end with a newline")
        try:
            text = body[:-1].decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError("multistream message is not UTF-8") from None
        if "\n" in text:
            raise RemoteProtocolError("multistream message contains a newline")
        return text

    def _on_header(self) -> None:
        raise NotImplementedError

    def _on_message(self, message: str) -> None:
        raise NotImplementedError


class MultistreamDialer(_Negotiation):
    """The initiator: proposes ``protocols`` in order until one is accepted.

    The header (and, with ``pipeline=True``, the first proposal) is ready in
    :meth:`data_to_send` right after construction. Events, in order: one
    :class:`ProtocolRejected` per ``na``, then :class:`ProtocolAgreed` or
    :class:`NegotiationFailed`.
    """

    def __init__(
        self,
        protocols: Sequence[str],
        *,
        pipeline: bool = True,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE,
    ) -> None:
        """Start negotiating.

        Args:
            protocols: proposals, most preferred first.
            pipeline: send the first proposal together with the header instead of waiting
                for the listener's header.
            max_message_length: the largest message accepted or sent.
            max_buffer_size: cap on unparsed received bytes.

        Raises:
            LocalProtocolError: ``protocols`` is empty or holds an unencodable id.
        """
        super().__init__(max_message_length=max_message_length, max_buffer_size=max_buffer_size)
        if not protocols:
            raise LocalProtocolError("nothing to propose")
        for protocol in protocols:
            if protocol in {NA, LS, MULTISTREAM_PROTOCOL}:
                raise LocalProtocolError(f"cannot propose {protocol!r}")
            encode_message(protocol, max_length=max_message_length)
        self._protocols = tuple(protocols)
        self._index = 0
        self._pipeline = pipeline
        self._send(MULTISTREAM_PROTOCOL)
        if pipeline:
            self._send(self._protocols[0])

    @property
    def proposed_protocol(self) -> str:
        """The proposal awaiting an answer (or the last one made)."""
        return self._protocols[min(self._index, len(self._protocols) - 1)]

    def _on_header(self) -> None:
        if not self._pipeline:
            self._send(self._protocols[0])

    def _on_message(self, message: str) -> None:
        current = self._protocols[self._index]
        if message == current:
            self._agree(current)
        elif message == NA:
            self._events.append(ProtocolRejected(current))
            self._index += 1
            if self._index < len(self._protocols):
                self._send(self._protocols[self._index])
            else:
                self._finished = True
                self._events.append(NegotiationFailed(self._protocols))
        else:
            raise RemoteProtocolError(f"proposed {current!r}, listener answered {message!r}")


class MultistreamListener(_Negotiation):
    """The responder: accepts the first proposal that is in ``supported``.

    The header is ready in :meth:`data_to_send` right after construction. Events: one
    :class:`ProtocolRejected` per refused proposal, then :class:`ProtocolAgreed`.
    """

    def __init__(
        self,
        supported: Iterable[str],
        *,
        answer_ls: bool = False,
        max_attempts: int = MAX_ATTEMPTS,
        max_message_length: int = MAX_MESSAGE_LENGTH,
        max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE,
    ) -> None:
        """Start listening for proposals.

        Args:
            supported: the protocol ids we accept.
            answer_ls: reply to ``ls`` with the supported list instead of ``na``.
            max_attempts: refused proposals (including ``ls``) tolerated before failing.
            max_message_length: the largest message accepted or sent.
            max_buffer_size: cap on unparsed received bytes.
        """
        super().__init__(max_message_length=max_message_length, max_buffer_size=max_buffer_size)
        self._supported = tuple(dict.fromkeys(supported))
        for protocol in self._supported:
            encode_message(protocol, max_length=max_message_length)
        self._supported_set = frozenset(self._supported)
        self._answer_ls = answer_ls
        self._max_attempts = max_attempts
        self._attempts = 0
        self._send(MULTISTREAM_PROTOCOL)

    def _on_header(self) -> None:
        pass

    def _count_attempt(self) -> None:
        self._attempts += 1
        if self._attempts > self._max_attempts:
            raise RemoteProtocolError(f"dialer made more than {self._max_attempts} proposals")

    def _on_message(self, message: str) -> None:
        if message in self._supported_set:
            self._send(message)
            self._agree(message)
            return
        self._count_attempt()
        if message == LS:
            if self._answer_ls:
                self._outgoing += encode_ls_response(self._supported)
            else:
                self._send(NA)
            return
        self._send(NA)
        self._events.append(ProtocolRejected(message))
