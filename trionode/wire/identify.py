"""Identify (``/ipfs/id/1.0.0`` and ``/ipfs/id/push/1.0.0``) and ping (``/ipfs/ping/1.0.0``).

Identify: the responder writes one uvarint-length-prefixed ``Identify`` protobuf and closes
its side; a push is the same message sent unasked, where missing fields mean "unchanged".
Listen and observed addresses are binary multiaddrs, kept here as raw bytes because a peer
may list transports our multiaddr codec does not know; :meth:`IdentifyMessage.decoded_listen_addrs`
decodes the ones it can.

Ping: the dialer writes 32 random bytes, the listener echoes them; repeat on the same stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trionode.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.keys import PublicKey
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.varint import BytesLike, decode_length_prefixed, encode_length_prefixed

IDENTIFY_PROTOCOL_ID = "/ipfs/id/1.0.0"
IDENTIFY_PUSH_PROTOCOL_ID = "/ipfs/id/push/1.0.0"

MAX_IDENTIFY_MESSAGE_SIZE = 8192
"""Largest identify message (js-libp2p's ``MAX_IDENTIFY_MESSAGE_SIZE``)."""

MAX_LISTEN_ADDRS = 128
MAX_PROTOCOLS = 256

PING_PROTOCOL_ID = "/ipfs/ping/1.0.0"
PING_PAYLOAD_LENGTH = 32

_PUBLIC_KEY = 1
_LISTEN_ADDRS = 2
_PROTOCOLS = 3
_OBSERVED_ADDR = 4
_PROTOCOL_VERSION = 5
_AGENT_VERSION = 6
_SIGNED_PEER_RECORD = 8


@dataclass(frozen=True, slots=True)
class IdentifyMessage:
    """The ``Identify`` protobuf. ``None``/empty means the field is absent."""

    protocol_version: str | None = None
    """e.g. ``"ipfs/0.1.0"``."""
    agent_version: str | None = None
    """``"name/version"``."""
    public_key: bytes | None = None
    """The sender's serialized ``PublicKey`` protobuf."""
    listen_addrs: tuple[bytes, ...] = ()
    """Binary multiaddrs the sender listens on."""
    observed_addr: bytes | None = None
    """Binary multiaddr of the requester as the responder sees it."""
    protocols: tuple[str, ...] = ()
    """Protocols the sender accepts inbound streams for."""
    signed_peer_record: bytes | None = None
    """An optional signed envelope, passed through uninterpreted."""

    @classmethod
    def create(
        cls,
        *,
        protocol_version: str | None = None,
        agent_version: str | None = None,
        public_key: PublicKey | None = None,
        listen_addrs: Sequence[Multiaddr] = (),
        observed_addr: Multiaddr | None = None,
        protocols: Sequence[str] = (),
    ) -> IdentifyMessage:
        """Build a message from typed values."""
        return cls(
            protocol_version=protocol_version,
            agent_version=agent_version,
            public_key=None if public_key is None else public_key.to_protobuf(),
            listen_addrs=tuple(a.to_bytes() for a in listen_addrs),
            observed_addr=None if observed_addr is None else observed_addr.to_bytes(),
            protocols=tuple(protocols),
        )

    def encode(self) -> bytes:
        """Serialize in field-number order.

        Raises:
            LocalProtocolError: the result exceeds :data:`MAX_IDENTIFY_MESSAGE_SIZE`.
        """
        out = bytearray()
        if self.public_key is not None:
            out += protobuf.encode_bytes_field(_PUBLIC_KEY, self.public_key)
        for address in self.listen_addrs:
            out += protobuf.encode_bytes_field(_LISTEN_ADDRS, address)
        for protocol in self.protocols:
            out += protobuf.encode_string_field(_PROTOCOLS, protocol)
        if self.observed_addr is not None:
            out += protobuf.encode_bytes_field(_OBSERVED_ADDR, self.observed_addr)
        if self.protocol_version is not None:
            out += protobuf.encode_string_field(_PROTOCOL_VERSION, self.protocol_version)
        if self.agent_version is not None:
            out += protobuf.encode_string_field(_AGENT_VERSION, self.agent_version)
        if self.signed_peer_record is not None:
            out += protobuf.encode_bytes_field(_SIGNED_PEER_RECORD, self.signed_peer_record)
        if len(out) > MAX_IDENTIFY_MESSAGE_SIZE:
            raise LocalProtocolError(f"identify message of {len(out)} bytes is too large")
        return bytes(out)

    def encode_framed(self) -> bytes:
        """``uvarint(len) || encode()``, as written on the identify stream."""
        return encode_length_prefixed(self.encode(), max_size=MAX_IDENTIFY_MESSAGE_SIZE)

    @classmethod
    def decode(cls, data: BytesLike) -> IdentifyMessage:
        """Parse a message body; unknown fields are ignored.

        Raises:
            RemoteProtocolError: malformed, too large, or too many addresses/protocols.
        """
        message = protobuf.decode_message(data, max_size=MAX_IDENTIFY_MESSAGE_SIZE)
        return cls(
            protocol_version=message.get_str(_PROTOCOL_VERSION),
            agent_version=message.get_str(_AGENT_VERSION),
            public_key=message.get_bytes(_PUBLIC_KEY),
            listen_addrs=tuple(
                message.get_repeated_bytes(_LISTEN_ADDRS, max_count=MAX_LISTEN_ADDRS)
            ),
            observed_addr=message.get_bytes(_OBSERVED_ADDR),
            protocols=tuple(message.get_repeated_str(_PROTOCOLS, max_count=MAX_PROTOCOLS)),
            signed_peer_record=message.get_bytes(_SIGNED_PEER_RECORD),
        )

    @classmethod
    def decode_framed(cls, data: BytesLike) -> tuple[IdentifyMessage, int] | None:
        """Parse ``uvarint(len) || body`` from the front of ``data``.

        Returns:
            ``(message, consumed)``, or ``None`` if ``data`` holds an incomplete message.

        Raises:
            RemoteProtocolError: malformed or too large.
        """
        decoded = decode_length_prefixed(data, max_size=MAX_IDENTIFY_MESSAGE_SIZE)
        if decoded is None:
            return None
        body, consumed = decoded
        return cls.decode(body), consumed

    def decoded_public_key(self) -> PublicKey | None:
        """The sender's public key, or ``None`` if absent.

        Raises:
            RemoteProtocolError: the key protobuf is malformed.
        """
        return None if self.public_key is None else PublicKey.from_protobuf(self.public_key)

    def decoded_listen_addrs(self) -> list[Multiaddr]:
        """The listen addresses this codec understands (others are skipped)."""
        out: list[Multiaddr] = []
        for raw in self.listen_addrs:
            try:
                out.append(Multiaddr.from_bytes(raw))
            except ProtocolError:
                continue
        return out

    def decoded_observed_addr(self) -> Multiaddr | None:
        """The observed address, or ``None`` if absent or not understood."""
        if self.observed_addr is None:
            return None
        try:
            return Multiaddr.from_bytes(self.observed_addr)
        except ProtocolError:
            return None


def make_ping_payload(rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """32 random bytes for one ping."""
    payload = rng(PING_PAYLOAD_LENGTH)
    if len(payload) != PING_PAYLOAD_LENGTH:
        raise LocalProtocolError("rng returned the wrong number of bytes")
    return payload


def check_ping_response(sent: bytes, received: bytes) -> None:
    """Check that the pong echoes the ping.

    Raises:
        RemoteProtocolError: ``received`` differs from ``sent``.
    """
    if received != sent:
        raise RemoteProtocolError("ping response does not match the ping payload")
