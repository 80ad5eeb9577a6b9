"""A small multiaddr codec: text (``/ip4/1.2.3.4/tcp/4001/p2p/12D3KooW…``) and binary.

The binary form is a sequence of ``uvarint(protocol code) || value``, where the value is
fixed-size (ip4: 4 bytes, tcp/udp: 2-byte BE port, ip6: 16 bytes), absent (``/ws``,
``/quic-v1``, …) or ``uvarint(len) || bytes`` (dns names, ``/p2p`` multihash, …).

Only the protocols in :data:`PROTOCOLS` are understood. A binary multiaddr containing any
other code cannot even be split into components (its value size is unknown), so decoding
it raises RemoteProtocolError; identify therefore keeps listen addresses as raw bytes and
decodes them one by one.

Parsers treat their input as untrusted and raise RemoteProtocolError.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.keys import PeerId
from trionode.wire.varint import BytesLike, decode_uvarint, encode_uvarint

if TYPE_CHECKING:
    from collections.abc import Iterator

MAX_MULTIADDR_SIZE = 1024
"""Largest binary multiaddr accepted."""

MAX_VARIABLE_VALUE_SIZE = 255
"""Largest variable-size value (dns names are at most 253 bytes; PeerIds 38)."""

_VARIABLE = -1


@dataclass(frozen=True, slots=True)
class Protocol:
    """A multiaddr protocol: its name, multicodec code and value size in bytes."""

    name: str
    code: int
    size: int
    """Value size in bytes; 0 for no value, -1 for a varint-length-prefixed value."""


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("ip4", 0x04, 4),
    Protocol("tcp", 0x06, 2),
    Protocol("dccp", 0x21, 2),
    Protocol("ip6", 0x29, 16),
    Protocol("ip6zone", 0x2A, _VARIABLE),
    Protocol("dns", 0x35, _VARIABLE),
    Protocol("dns4", 0x36, _VARIABLE),
    Protocol("dns6", 0x37, _VARIABLE),
    Protocol("dnsaddr", 0x38, _VARIABLE),
    Protocol("sctp", 0x84, 2),
    Protocol("udp", 0x0111, 2),
    Protocol("webrtc-direct", 0x0118, 0),
    Protocol("webrtc", 0x0119, 0),
    Protocol("p2p-circuit", 0x0122, 0),
    Protocol("p2p", 0x01A5, _VARIABLE),
    Protocol("https", 0x01BB, 0),
    Protocol("tls", 0x01C0, 0),
    Protocol("sni", 0x01C1, _VARIABLE),
    Protocol("noise", 0x01C6, 0),
    Protocol("quic", 0x01CC, 0),
    Protocol("quic-v1", 0x01CD, 0),
    Protocol("webtransport", 0x01D1, 0),
    Protocol("ws", 0x01DD, 0),
    Protocol("wss", 0x01DE, 0),
    Protocol("http", 0x01E0, 0),
)

_BY_NAME = {p.name: p for p in PROTOCOLS}
_BY_NAME["ipfs"] = _BY_NAME["p2p"]  # legacy text alias; always formatted as /p2p
_BY_CODE = {p.code: p for p in PROTOCOLS}
_PORT_PROTOCOLS = frozenset({"tcp", "udp", "dccp", "sctp"})
_NAME_PROTOCOLS = frozenset({"dns", "dns4", "dns6", "dnsaddr", "sni", "ip6zone"})


@dataclass(frozen=True, slots=True)
class Component:
    """One ``/name/value`` step of a multiaddr; ``value`` is the binary value."""

    protocol: Protocol
    value: bytes

    @property
    def name(self) -> str:
        """The protocol name (``"ip4"``, ``"tcp"``, …)."""
        return self.protocol.name

    def value_text(self) -> str | None:
        """The value in text form, or ``None`` for protocols without a value."""
        return _value_to_text(self.protocol, self.value)


def _value_to_text(protocol: Protocol, value: bytes) -> str | None:
    name = protocol.name
    if protocol.size == 0:
        return None
    if name == "ip4":
        return str(ipaddress.IPv4Address(value))
    if name == "ip6":
        return ipaddress.IPv6Address(value).compressed
    if name in _PORT_PROTOCOLS:
        return str(int.from_bytes(value, "big"))
    if name == "p2p":
        return str(PeerId.from_bytes(value))
    return value.decode()  # name protocols: validated as UTF-8 without "/" on decode


def _value_from_text(protocol: Protocol, text: str) -> bytes:
    name = protocol.name
    try:
        if name == "ip4":
            return ipaddress.IPv4Address(text).packed
        if name == "ip6":
            return ipaddress.IPv6Address(text).packed
    except ValueError:
        raise RemoteProtocolError(f"invalid /{name} address {text!r}") from None
    if name in _PORT_PROTOCOLS:
        if not text.isascii() or not text.isdigit() or int(text) > 0xFFFF:
            raise RemoteProtocolError(f"invalid /{name} port {text!r}")
        return int(text).to_bytes(2, "big")
    if name == "p2p":
        return PeerId.from_string(text).multihash
    raw = text.encode()
    _check_name_value(protocol, raw)
    return raw


def _check_name_value(protocol: Protocol, raw: bytes) -> None:
    if not raw or len(raw) > MAX_VARIABLE_VALUE_SIZE:
        raise RemoteProtocolError(f"/{protocol.name} value has an invalid length")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"/{protocol.name} value is not UTF-8") from None
    if "/" in text:
        raise RemoteProtocolError(f"/{protocol.name} value contains '/'")


def _check_binary_value(protocol: Protocol, value: bytes) -> None:
    if protocol.name == "p2p":
        PeerId.from_bytes(value)
    elif protocol.name in _NAME_PROTOCOLS:
        _check_name_value(protocol, value)


def _iter_binary(data: BytesLike) -> Iterator[Component]:
    offset = 0
    size = len(data)
    while offset < size:
        decoded = decode_uvarint(data, offset)
        if decoded is None:
            raise RemoteProtocolError("truncated multiaddr protocol code")
        code, used = decoded
        offset += used
        protocol = _BY_CODE.get(code)
        if protocol is None:
            raise RemoteProtocolError(f"unknown multiaddr protocol code {code:#x}")
        length = protocol.size
        if length == _VARIABLE:
            decoded = decode_uvarint(data, offset)
            if decoded is None:
                raise RemoteProtocolError("truncated multiaddr value length")
            length, used = decoded
            offset += used
            if length > MAX_VARIABLE_VALUE_SIZE:
                raise RemoteProtocolError(f"/{protocol.name} value of {length} bytes")
        if length > size - offset:
            raise RemoteProtocolError(f"truncated /{protocol.name} value")
        value = bytes(data[offset : offset + length])
        offset += length
        _check_binary_value(protocol, value)
        yield Component(protocol, value)


@dataclass(frozen=True, slots=True)
class Multiaddr:
    """An immutable multiaddr. Build with :meth:`from_string` / :meth:`from_bytes`."""

    components: tuple[Component, ...]

    @classmethod
    def from_bytes(cls, data: BytesLike) -> Multiaddr:
        """Decode the binary form.

        Raises:
            RemoteProtocolError: empty, too long, truncated, an unknown protocol, or an
                invalid value.
        """
        if not data:
            raise RemoteProtocolError("empty multiaddr")
        if len(data) > MAX_MULTIADDR_SIZE:
            raise RemoteProtocolError(f"multiaddr of {len(data)} bytes is too long")
        return cls(tuple(_iter_binary(data)))

    @classmethod
    def from_string(cls, text: str) -> Multiaddr:
        """Parse the text form, e.g. ``/ip4/127.0.0.1/tcp/4001``.

        Raises:
            RemoteProtocolError: malformed text, an unknown protocol, or an invalid value.
        """
        if len(text) > 4 * MAX_MULTIADDR_SIZE:
            raise RemoteProtocolError("multiaddr text is too long")
        if not text.startswith("/"):
            raise RemoteProtocolError(f"multiaddr {text!r} does not start with '/'")
        parts = text[1:].split("/")
        if parts and parts[-1] == "":
            parts.pop()  # tolerate one trailing slash
        if not parts:
            raise RemoteProtocolError("empty multiaddr")
        components: list[Component] = []
        index = 0
        while index < len(parts):
            protocol = _BY_NAME.get(parts[index])
            if protocol is None:
                raise RemoteProtocolError(f"unknown multiaddr protocol {parts[index]!r}")
            index += 1
            if protocol.size == 0:
                components.append(Component(protocol, b""))
                continue
            if index >= len(parts):
                raise RemoteProtocolError(f"/{protocol.name} needs a value")
            components.append(Component(protocol, _value_from_text(protocol, parts[index])))
            index += 1
        result = cls(tuple(components))
        if len(result.to_bytes()) > MAX_MULTIADDR_SIZE:
            raise RemoteProtocolError("multiaddr is too long")
        return result

    def to_bytes(self) -> bytes:
        """The binary form."""
        out = bytearray()
        for component in self.components:
            out += encode_uvarint(component.protocol.code)
            if component.protocol.size == _VARIABLE:
                out += encode_uvarint(len(component.value))
            out += component.value
        return bytes(out)

    def __str__(self) -> str:
        parts: list[str] = []
        for component in self.components:
            parts.append(component.name)
            text = component.value_text()
            if text is not None:
                parts.append(text)
        return "/" + "/".join(parts)

    def __repr__(self) -> str:
        return f"Multiaddr({str(self)!r})"

    def __truediv__(self, other: Multiaddr) -> Multiaddr:
        """Encapsulate: ``/ip4/1.2.3.4/tcp/1`` / ``/p2p/…``."""
        return Multiaddr(self.components + other.components)

    def value_for(self, name: str) -> str | None:
        """The text value of the first ``name`` component, or ``None`` if absent/valueless."""
        for component in self.components:
            if component.name == name:
                return component.value_text()
        return None

    def peer_id(self) -> PeerId | None:
        """The PeerId of the last ``/p2p`` component, if any."""
        for component in reversed(self.components):
            if component.name == "p2p":
                return PeerId.from_bytes(component.value)
        return None

    def without_peer_id(self) -> Multiaddr:
        """This address with a trailing ``/p2p/…`` removed."""
        if self.components and self.components[-1].name == "p2p":
            return Multiaddr(self.components[:-1])
        return self

    def with_peer_id(self, peer_id: PeerId) -> Multiaddr:
        """This address ending in ``/p2p/<peer_id>`` (replacing any existing one)."""
        return Multiaddr(
            (*self.without_peer_id().components, Component(_BY_NAME["p2p"], peer_id.multihash))
        )

    def tcp_host_port(self) -> tuple[str, int] | None:
        """``(host, port)`` for ``/ip4|ip6|dns*/…/tcp/…`` addresses, else ``None``."""
        if len(self.components) < 2:
            return None
        host, port = self.components[0], self.components[1]
        if port.name != "tcp" or host.name not in {"ip4", "ip6", "dns", "dns4", "dns6"}:
            return None
        host_text = host.value_text()
        port_text = port.value_text()
        assert host_text is not None
        assert port_text is not None
        return host_text, int(port_text)

    @classmethod
    def from_tcp(cls, host: str, port: int) -> Multiaddr:
        """``/ip4|ip6/<host>/tcp/<port>`` for an IP literal, ``/dns/<host>/tcp/<port>`` else.

        Raises:
            LocalProtocolError: ``port`` is out of range.
        """
        if not 0 <= port <= 0xFFFF:
            raise LocalProtocolError(f"invalid TCP port {port}")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            first = Component(_BY_NAME["dns"], _value_from_text(_BY_NAME["dns"], host))
        else:
            name = "ip4" if address.version == 4 else "ip6"
            first = Component(_BY_NAME[name], address.packed)
        return cls((first, Component(_BY_NAME["tcp"], port.to_bytes(2, "big"))))
