"""Multiaddrs (``/ip4/1.2.3.4/tcp/4001/p2p/12D3KooW…``), handled with the `multiaddr` package.

The package does the multiaddr work: its protocol table (codes and value sizes), splitting
the binary form (``uvarint(code) || value``), and every value's text <-> bytes conversion
(ip4/ip6 via netaddr, ports, dns names checked with IDNA, ``/p2p`` peer ids as CIDs). This
module is the one place trionode touches it, because on untrusted input the package alone
is not safe (version 0.2):

- ``multiaddr.Multiaddr(bytes)`` validates nothing, and its binary splitter reads a short
  value without noticing (``04`` becomes ``/ip4/0.0.0.0``, ``047f0000`` ``/ip4/0.127.0.0``).
  We check every value's length and that the parts rebuild the input byte for byte.
- Its text parser accepts ``ip4/1.2.3.4`` (no leading slash), ``/``, ``//``, ports written
  ``+1``, `` 1`` or in fullwidth digits (``int()``), and refuses a dns name that is also a
  protocol name (``/dns/ws``). We split the text ourselves and use only its value codecs.
- ``ip6zone`` is split with a zero-length value by its binary splitter although its text
  encoder writes a length prefix, so it is left out of :data:`PROTOCOLS`.
- It raises whatever its codecs raise (``ValueError``, ``EOFError``, netaddr's and idna's
  errors, ``BinaryParseError``…). Every call into it is wrapped: callers only ever see
  :class:`~trionode.errors.RemoteProtocolError`, with the size limits below checked first.
- It does not know the legacy ``/ipfs`` name, and would store a CIDv1 peer id as the whole
  CID instead of the multihash the spec asks for; peer ids therefore go through
  :class:`~trionode.wire.keys.PeerId`.

Only the protocols in :data:`PROTOCOLS` are accepted; identify keeps listen addresses as
raw bytes and decodes them one by one, so an address in any other protocol is skipped.
Importing the package costs about 35 ms (netaddr, cid, idna): client commands
(``trionode call``) never import this module.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any

from multiaddr.codecs import codec_by_name
from multiaddr.protocols import protocol_with_name
from multiaddr.transforms import bytes_iter

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.keys import PeerId
from trionode.wire.varint import BytesLike, encode_uvarint

MAX_MULTIADDR_SIZE = 1024
"""Largest binary multiaddr accepted."""

MAX_VARIABLE_VALUE_SIZE = 255
"""Largest variable-size value (dns names are at most 253 bytes; PeerIds 38)."""

PROTOCOLS: tuple[str, ...] = (
    "ip4",
    "tcp",
    "dccp",
    "ip6",
    "dns",
    "dns4",
    "dns6",
    "dnsaddr",
    "sctp",
    "udp",
    "webrtc-direct",
    "webrtc",
    "p2p-circuit",
    "p2p",
    "https",
    "tls",
    "sni",
    "noise",
    "quic",
    "quic-v1",
    "webtransport",
    "ws",
    "wss",
    "http",
)
"""The protocols we accept (all of them round-trip through the package; tested)."""

_ALIASES = {"ipfs": "p2p"}  # legacy text name; always formatted as /p2p


@dataclass(frozen=True, slots=True)
class _Kind:
    """One protocol as the package describes it, looked up once at import."""

    name: str
    code: int
    size: int
    """Value size in bytes; 0 for no value, -1 for a length-prefixed value."""
    proto: Any  # multiaddr.protocols.Protocol
    codec: Any  # multiaddr.codecs.CodecBase


def _kind(name: str) -> _Kind:
    proto = protocol_with_name(name)
    codec = codec_by_name(proto.codec)
    bits = int(codec.SIZE)
    size = -1 if bits < 0 else bits // 8
    return _Kind(name, int(proto.code), size, proto, codec)


_BY_NAME = {name: _kind(name) for name in PROTOCOLS}
_BY_CODE = {kind.code: kind for kind in _BY_NAME.values()}
_PORTS = frozenset(name for name, kind in _BY_NAME.items() if kind.proto.codec == "uint16be")


@dataclass(frozen=True, slots=True)
class Component:
    """One ``/name/value`` step of a multiaddr; ``value`` is the binary value."""

    name: str
    value: bytes

    def value_text(self) -> str | None:
        """The value in text form, or ``None`` for protocols without a value."""
        kind = _BY_NAME[self.name]
        if kind.size == 0:
            return None
        return str(kind.codec.to_string(kind.proto, self.value))


def _component(kind: _Kind, value: bytes) -> Component:
    """Validate one binary value the package split off (it checks no lengths itself)."""
    if kind.size >= 0 and len(value) != kind.size:
        raise RemoteProtocolError(f"/{kind.name} value of {len(value)} bytes")
    if kind.size < 0:
        if not value or len(value) > MAX_VARIABLE_VALUE_SIZE:
            raise RemoteProtocolError(f"/{kind.name} value has an invalid length")
        if kind.name == "p2p":
            PeerId.from_bytes(value)  # the package accepts any CID; we need a PeerId
        else:
            try:
                text = kind.codec.to_string(kind.proto, value)
            except Exception as error:  # noqa: BLE001 - the package raises anything
                raise RemoteProtocolError(f"invalid /{kind.name} value: {error}") from None
            if "/" in text:
                raise RemoteProtocolError(f"/{kind.name} value contains '/'")
    return Component(kind.name, value)


def _encode(component: Component) -> bytes:
    kind = _BY_NAME[component.name]
    if kind.size < 0:
        return encode_uvarint(kind.code) + encode_uvarint(len(component.value)) + component.value
    return encode_uvarint(kind.code) + component.value


def _split(data: bytes) -> tuple[Component, ...]:
    try:
        pieces = [
            (int(proto.code), str(proto.name), bytes(value))
            for _, proto, _, value in bytes_iter(data)
        ]
    except Exception as error:  # noqa: BLE001 - EOFError, BinaryParseError, TypeError, …
        raise RemoteProtocolError(f"malformed binary multiaddr: {error}") from None
    components: list[Component] = []
    for code, name, value in pieces:
        kind = _BY_CODE.get(code)
        if kind is None:
            raise RemoteProtocolError(f"unsupported multiaddr protocol {name!r}")
        components.append(_component(kind, value))
    if b"".join(_encode(c) for c in components) != data:
        # A truncated value, a non-minimal varint or trailing bytes: not what was sent.
        raise RemoteProtocolError("malformed binary multiaddr")
    return tuple(components)


def _parse_text(text: str) -> tuple[Component, ...]:
    """Split the text form ourselves (stricter than the package); its codecs do the values."""
    if not text.startswith("/"):
        raise RemoteProtocolError(f"multiaddr {text[:64]!r} does not start with '/'")
    parts = text[1:].split("/")
    if parts and parts[-1] == "":
        parts.pop()  # tolerate one trailing slash
    if not parts:
        raise RemoteProtocolError("empty multiaddr")
    components: list[Component] = []
    index = 0
    while index < len(parts):
        name = _ALIASES.get(parts[index], parts[index])
        kind = _BY_NAME.get(name)
        if kind is None:
            raise RemoteProtocolError(f"unknown multiaddr protocol {parts[index][:64]!r}")
        index += 1
        if kind.size == 0:
            components.append(Component(name, b""))
            continue
        if index >= len(parts) or not parts[index]:
            raise RemoteProtocolError(f"/{name} needs a value")
        value = parts[index]
        index += 1
        if name == "p2p":  # base58 or CIDv1 text; the binary value is the multihash
            components.append(Component(name, PeerId.from_string(value).multihash))
            continue
        if name in _PORTS and not (value.isascii() and value.isdigit()):
            raise RemoteProtocolError(f"invalid /{name} port {value[:16]!r}")
        try:
            binary = kind.codec.to_bytes(kind.proto, value)
        except Exception as error:  # noqa: BLE001 - ValueError, netaddr, idna, …
            raise RemoteProtocolError(f"invalid /{name} value {value[:64]!r}: {error}") from None
        components.append(_component(kind, bytes(binary)))
    return tuple(components)


DECODE_CACHE_SIZE = 2048
"""Decoded addresses kept (at most 2 MiB): the same few recur in every kad response."""


@functools.lru_cache(maxsize=DECODE_CACHE_SIZE)
def _decode(data: bytes) -> Multiaddr:
    # Cached because the package's splitter costs 10-30 us per address and a 50-node kad
    # lookup decodes ~400 addresses, 97 % of them seen before (benchmarks/multiaddr_bench).
    # A refused input raises, and lru_cache keeps no exceptions: garbage is never cached.
    return Multiaddr(_split(data))


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
        return _decode(bytes(data))

    @classmethod
    def from_string(cls, text: str) -> Multiaddr:
        """Parse the text form, e.g. ``/ip4/127.0.0.1/tcp/4001``.

        Raises:
            RemoteProtocolError: malformed text, an unknown protocol, or an invalid value.
        """
        if len(text) > 4 * MAX_MULTIADDR_SIZE:
            raise RemoteProtocolError("multiaddr text is too long")
        result = cls(_parse_text(text))
        if len(result.to_bytes()) > MAX_MULTIADDR_SIZE:
            raise RemoteProtocolError("multiaddr is too long")
        return result

    def to_bytes(self) -> bytes:
        """The binary form."""
        return b"".join(_encode(c) for c in self.components)

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
        return Multiaddr((*self.without_peer_id().components, Component("p2p", peer_id.multihash)))

    def is_circuit(self) -> bool:
        """Whether this is a relayed address (``…/p2p/<relay>/p2p-circuit[/p2p/<peer>]``)."""
        return any(component.name == "p2p-circuit" for component in self.components)

    def circuit_through(self, relay: PeerId) -> Multiaddr:
        """``<this>/p2p/<relay>/p2p-circuit``: where others reach us through ``relay``."""
        return Multiaddr((*self.with_peer_id(relay).components, Component("p2p-circuit", b"")))

    def tcp_host_port(self) -> tuple[str, int] | None:
        """``(host, port)`` for ``/ip4|ip6|dns*/…/tcp/…`` addresses, else ``None``."""
        if len(self.components) < 2:
            return None
        host, port = self.components[0], self.components[1]
        if port.name != "tcp" or host.name not in {"ip4", "ip6", "dns", "dns4", "dns6"}:
            return None
        host_text = host.value_text()
        assert host_text is not None
        return host_text, int.from_bytes(port.value, "big")

    @classmethod
    def from_tcp(cls, host: str, port: int) -> Multiaddr:
        """``/ip4|ip6/<host>/tcp/<port>`` for an IP literal, ``/dns/<host>/tcp/<port>`` else.

        Raises:
            LocalProtocolError: ``port`` is out of range.
            RemoteProtocolError: ``host`` is neither an IP literal nor a valid dns name.
        """
        if not 0 <= port <= 0xFFFF:
            raise LocalProtocolError(f"invalid TCP port {port}")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if "/" in host:
                raise RemoteProtocolError(f"invalid host name {host[:64]!r}") from None
            return cls.from_string(f"/dns/{host}/tcp/{port}")
        # A socket's own address (maybe with a "%scope" the package cannot parse): its
        # packed form is already the binary value.
        first = Component("ip4" if address.version == 4 else "ip6", address.packed)
        return cls((first, Component("tcp", port.to_bytes(2, "big"))))
