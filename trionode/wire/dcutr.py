"""DCUtR (``/libp2p/dcutr``): the message and the sans-IO exchange that times a hole punch.

```
HolePunch (proto2) { required Type type = 1;   // CONNECT = 100, SYNC = 300
                     repeated bytes ObsAddrs = 2; }
```

Each message is one ``uvarint(len) || protobuf`` frame. There is no status: a failure is a
closed or reset stream. Roles follow the spec (``relay/DCUtR.md``): **B** received the relayed
connection and drives; **A** dialed through the relay.

```
B (HolePunchInitiator)                         A (HolePunchResponder)
  start() → CONNECT{B's addrs}; clock starts ─▶ receive: CONNECT → answer CONNECT{A's addrs}
  receive: CONNECT{A's addrs} → rtt           ◀─
           → SYNC, DialAfter(rtt / 2, A's addrs) ─▶ receive: SYNC → DialNow(B's addrs)
```

Both then dial each other's addresses at about the same moment (B when its timer fires, A
when SYNC arrives, half a round trip after B sent it): each side's outbound packets open its
NAT for the other's. On the punched connection A is the initiator of every protocol above
TCP (multistream, Noise, yamux client) and B the responder, whichever side's dial connected.

Addresses from the peer are cleaned before use: unparseable ones, relay (``/p2p-circuit``)
ones, non-TCP ones and ones naming another peer are dropped; a trailing ``/p2p/<peer>`` that
names the peer is stripped (js appends it). An exchange with no usable address left fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from trionode.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.varint import BytesLike, decode_length_prefixed, encode_length_prefixed

PROTOCOL: Final = "/libp2p/dcutr"
MAX_MESSAGE_SIZE: Final = 4096
"""Largest frame accepted (the spec: SHOULD refuse more than 4 KiB)."""
MAX_ADDRS: Final = 16
"""Addresses one CONNECT may carry; more is an error (ours carry a handful)."""


class HolePunchType(IntEnum):
    CONNECT = 100
    SYNC = 300


@dataclass(frozen=True, slots=True)
class HolePunch:
    type: HolePunchType
    addrs: tuple[bytes, ...] = ()
    """Binary multiaddrs (``ObsAddrs``)."""


def encode_hole_punch(message: HolePunch) -> bytes:
    """One frame.

    Raises:
        LocalProtocolError: more than MAX_ADDRS addresses or a frame over MAX_MESSAGE_SIZE.
    """
    if len(message.addrs) > MAX_ADDRS:
        raise LocalProtocolError(f"a hole punch message carries at most {MAX_ADDRS} addresses")
    out = protobuf.encode_varint_field(1, int(message.type))
    for addr in message.addrs:
        out += protobuf.encode_bytes_field(2, addr)
    if len(out) > MAX_MESSAGE_SIZE:
        raise LocalProtocolError("hole punch message over the size limit")
    return encode_length_prefixed(out, max_size=MAX_MESSAGE_SIZE)


def decode_hole_punch_frame(data: BytesLike) -> tuple[HolePunch, int] | None:
    """The message at the front of ``data`` and the bytes it used; ``None`` if incomplete.

    Raises:
        RemoteProtocolError: too large, malformed, no or unknown type, too many addresses.
    """
    framed = decode_length_prefixed(data, max_size=MAX_MESSAGE_SIZE)
    if framed is None:
        return None
    message = protobuf.decode_message(framed[0], max_size=MAX_MESSAGE_SIZE)
    raw_type = message.get_uint(1)
    if raw_type is None:
        raise RemoteProtocolError("hole punch message without a type")
    try:
        kind = HolePunchType(raw_type)
    except ValueError:
        raise RemoteProtocolError(f"unknown hole punch message type {raw_type}") from None
    addrs = tuple(message.get_repeated_bytes(2, max_count=MAX_ADDRS))
    return HolePunch(kind, addrs), framed[1]


def usable_addresses(raw: Sequence[bytes], peer: PeerId) -> list[Multiaddr]:
    """The addresses of ``raw`` worth dialing to punch a hole to ``peer`` (see the module)."""
    out: list[Multiaddr] = []
    for blob in raw:
        try:
            addr = Multiaddr.from_bytes(blob)
        except ProtocolError:
            continue
        named = addr.peer_id()
        if named is not None and named != peer:
            continue
        addr = addr.without_peer_id()
        if addr.is_circuit() or addr.tcp_host_port() is None:
            continue
        if addr not in out:
            out.append(addr)
    return out


# -- the exchange ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialAfter:
    """B: send nothing more; dial ``addrs`` (as the responder) after ``delay`` seconds."""

    delay: float
    addrs: tuple[Multiaddr, ...]


@dataclass(frozen=True, slots=True)
class DialNow:
    """A: dial ``addrs`` (as the initiator) now."""

    addrs: tuple[Multiaddr, ...]


class _Exchange:
    def __init__(self, peer: PeerId, ours: Sequence[Multiaddr]) -> None:
        self._peer = peer
        self._ours = tuple(a.without_peer_id().to_bytes() for a in ours[:MAX_ADDRS])
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self.done = False

    def data_to_send(self) -> bytes:
        """Bytes for the stream, in order; empty when there is nothing."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def _next(self, data: BytesLike) -> HolePunch | None:
        if self.done:
            if data or self._buffer:
                raise RemoteProtocolError("hole punch: data after the exchange ended")
            return None
        self._buffer += data
        decoded = decode_hole_punch_frame(self._buffer)
        if decoded is None:
            return None
        message, used = decoded
        del self._buffer[:used]
        return message

    def _connect_addrs(self, message: HolePunch) -> tuple[Multiaddr, ...]:
        addrs = usable_addresses(message.addrs, self._peer)
        if not addrs:
            raise RemoteProtocolError("hole punch: the peer named no address we can dial")
        return tuple(addrs)


class HolePunchInitiator(_Exchange):
    """B's side of one attempt: CONNECT, measure the round trip, SYNC, then dial."""

    def __init__(self, peer: PeerId, ours: Sequence[Multiaddr]) -> None:
        super().__init__(peer, ours)
        self._sent_at: float | None = None

    def start(self, now: float) -> None:
        """Queue CONNECT with our addresses; ``now`` starts the round-trip clock."""
        if self._sent_at is not None:
            raise LocalProtocolError("hole punch already started")
        self._sent_at = now
        self._outgoing += encode_hole_punch(HolePunch(HolePunchType.CONNECT, self._ours))

    def receive_data(self, data: BytesLike, now: float) -> DialAfter | None:
        """Feed what the stream delivered; the dial to make once A's CONNECT arrived.

        Raises:
            RemoteProtocolError: anything but one CONNECT with a usable address.
            LocalProtocolError: called before :meth:`start`.
        """
        if self._sent_at is None:
            raise LocalProtocolError("hole punch not started")
        message = self._next(data)
        if message is None:
            return None
        if message.type is not HolePunchType.CONNECT:
            raise RemoteProtocolError(f"hole punch: expected CONNECT, got {message.type.name}")
        addrs = self._connect_addrs(message)
        self.done = True
        self._outgoing += encode_hole_punch(HolePunch(HolePunchType.SYNC))
        rtt = max(now - self._sent_at, 0.0)
        return DialAfter(delay=rtt / 2, addrs=addrs)


class HolePunchResponder(_Exchange):
    """A's side: answer CONNECT with ours, then dial when SYNC arrives."""

    def __init__(self, peer: PeerId, ours: Sequence[Multiaddr]) -> None:
        super().__init__(peer, ours)
        self._peer_addrs: tuple[Multiaddr, ...] | None = None

    def receive_data(self, data: BytesLike) -> DialNow | None:
        """Feed what the stream delivered; the dial to make once SYNC arrived.

        Raises:
            RemoteProtocolError: not CONNECT (with a usable address) then SYNC.
        """
        result: DialNow | None = None
        while (message := self._next(data)) is not None:
            data = b""
            if self._peer_addrs is None:
                if message.type is not HolePunchType.CONNECT:
                    raise RemoteProtocolError(
                        f"hole punch: expected CONNECT, got {message.type.name}"
                    )
                self._peer_addrs = self._connect_addrs(message)
                self._outgoing += encode_hole_punch(HolePunch(HolePunchType.CONNECT, self._ours))
            elif message.type is HolePunchType.SYNC:
                self.done = True
                result = DialNow(self._peer_addrs)
            else:
                raise RemoteProtocolError(f"hole punch: expected SYNC, got {message.type.name}")
        return result
