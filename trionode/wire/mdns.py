"""DNS messages for libp2p mDNS discovery (RFC 1035 wire format, RFC 6762 multicast rules).

Theory of operation (libp2p `discovery/mdns.md`, r2):

- A peer finds others by multicasting a query with one question, ``_p2p._udp.local PTR``,
  to 224.0.0.251:5353. Every peer answers (itself included, so a querier's neighbours learn
  about it passively) with a response (QR=1, AA=1) holding

  ```
  answer:      _p2p._udp.local              PTR  <peer-name>._p2p._udp.local
  additional:  <peer-name>._p2p._udp.local  TXT  "dnsaddr=/ip4/…/tcp/…/p2p/<peer id>"
               … one TXT record per address
  ```

  ``peer-name`` is a random lower-case alphanumeric label of 32-63 characters, not the peer
  id (a future PeerId might not fit a 63-byte label); the peer id travels inside each
  multiaddr. We write one TXT record per address, as rust-libp2p does, and read any number
  of ``dnsaddr=`` strings in any TXT record named after the PTR target, in the answer or
  additional section (go-libp2p puts several strings in one record).

- The decoder sees every mDNS packet on the link, from printers and phones too, so it is
  strict about *structure* and lenient about *meaning*: a message that is oversized,
  truncated, carries trailing bytes, a label longer than 63 bytes, a name longer than 255, a
  reserved label type, or a compression pointer that does not point strictly backwards (which
  rules out loops) raises RemoteProtocolError; unknown record types are kept as raw rdata,
  and ``dnsaddr`` values that are not multiaddrs we understand are skipped by
  :func:`find_peers` (so a peer advertising e.g. ``/webtransport/certhash/…`` next to TCP is
  still found).

Names are tuples of label bytes; compare them with :func:`name_key` (ASCII case-folded).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.varint import BytesLike

MDNS_ADDRESS: Final = "224.0.0.251"
MDNS_PORT: Final = 5353
SERVICE_NAME: Final = "_p2p._udp.local"

TYPE_A: Final = 1
TYPE_PTR: Final = 12
TYPE_TXT: Final = 16
TYPE_AAAA: Final = 28
TYPE_SRV: Final = 33
TYPE_ANY: Final = 255
CLASS_IN: Final = 1

MAX_MESSAGE_SIZE: Final = 9000
"""Largest message accepted (RFC 6762 §17: 9000 bytes is the most a packet may be)."""

MAX_RECORDS: Final = 256
"""Most questions + records a message may declare."""

MAX_LABEL_LENGTH: Final = 63
MAX_NAME_LENGTH: Final = 255
MAX_POINTER_JUMPS: Final = 32
MAX_CHARACTER_STRING: Final = 255

DEFAULT_RESPONSE_SIZE: Final = 1400
"""Responses we build stay under this, so they fit an Ethernet frame without fragmenting."""

DEFAULT_TTL: Final = 120
"""Seconds a response's records stay valid (the libp2p spec's example value)."""

DNSADDR_PREFIX: Final = b"dnsaddr="

_HEADER: Final = struct.Struct("!HHHHHH")
_QUESTION_TAIL: Final = struct.Struct("!HH")
_RECORD_TAIL: Final = struct.Struct("!HHIH")
_FLAG_QR: Final = 0x8000
_FLAG_AA: Final = 0x0400
_OPCODE_MASK: Final = 0x7800
_RCODE_MASK: Final = 0x000F
_TOP_BIT: Final = 0x8000  # QU in a question's class, cache-flush in a record's class
_POINTER: Final = 0xC0

Name: TypeAlias = tuple[bytes, ...]


def name_from_text(text: str) -> Name:
    """``"_p2p._udp.local"`` → ``(b"_p2p", b"_udp", b"local")`` (a trailing dot is fine).

    Raises:
        LocalProtocolError: an empty or over-long label, or a name over 255 bytes.
    """
    labels = tuple(label.encode() for label in text.rstrip(".").split("."))
    _check_name(labels)
    return labels


def name_to_text(name: Name) -> str:
    return ".".join(label.decode("utf-8", "replace") for label in name)


def name_key(name: Name) -> Name:
    """The name with ASCII letters lower-cased: DNS names compare case-insensitively."""
    return tuple(label.lower() for label in name)


def _check_name(name: Name) -> None:
    if any(not 0 < len(label) <= MAX_LABEL_LENGTH for label in name):
        raise LocalProtocolError("DNS label must be 1-63 bytes")
    if sum(len(label) + 1 for label in name) + 1 > MAX_NAME_LENGTH:
        raise LocalProtocolError("DNS name longer than 255 bytes")


@dataclass(frozen=True, slots=True)
class Question:
    name: Name
    qtype: int
    qclass: int
    """The class without the top bit."""
    unicast_response: bool
    """The QU bit: the querier prefers a unicast reply."""


@dataclass(frozen=True, slots=True)
class Record:
    name: Name
    rtype: int
    rclass: int
    """The class without the top bit."""
    cache_flush: bool
    ttl: int
    rdata: bytes
    target: Name | None = None
    """For PTR records: the (decompressed) name pointed to."""
    strings: tuple[bytes, ...] = ()
    """For TXT records: the character-strings."""


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...]
    answers: tuple[Record, ...]
    authorities: tuple[Record, ...]
    additionals: tuple[Record, ...]

    @property
    def is_response(self) -> bool:
        return bool(self.flags & _FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags & _OPCODE_MASK) >> 11

    @property
    def rcode(self) -> int:
        return self.flags & _RCODE_MASK


@dataclass(frozen=True, slots=True)
class MdnsPeer:
    """A peer found in a response: its id, its addresses (without /p2p) and the TTL."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]
    ttl: int


# -- decoding ---------------------------------------------------------------------------------


def decode_message(data: BytesLike) -> Message:
    """Parse one DNS message.

    Raises:
        RemoteProtocolError: see the module docstring for what counts as malformed.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise RemoteProtocolError(f"DNS message of {len(data)} bytes is too large")
    if len(data) < _HEADER.size:
        raise RemoteProtocolError("DNS message shorter than its header")
    data = bytes(data)
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if qdcount + ancount + nscount + arcount > MAX_RECORDS:
        raise RemoteProtocolError("DNS message declares too many records")
    pos = _HEADER.size
    questions: list[Question] = []
    for _ in range(qdcount):
        name, pos = _read_name(data, pos)
        if pos + _QUESTION_TAIL.size > len(data):
            raise RemoteProtocolError("truncated DNS question")
        qtype, qclass = _QUESTION_TAIL.unpack_from(data, pos)
        pos += _QUESTION_TAIL.size
        questions.append(Question(name, qtype, qclass & ~_TOP_BIT, bool(qclass & _TOP_BIT)))
    sections: list[tuple[Record, ...]] = []
    for count in (ancount, nscount, arcount):
        records: list[Record] = []
        for _ in range(count):
            record, pos = _read_record(data, pos)
            records.append(record)
        sections.append(tuple(records))
    if pos != len(data):
        raise RemoteProtocolError("bytes after the last DNS record")
    return Message(ident, flags, tuple(questions), sections[0], sections[1], sections[2])


def _read_name(data: bytes, offset: int) -> tuple[Name, int]:
    """Read a possibly compressed name at ``offset``; return it and the offset after it."""
    labels: list[bytes] = []
    length = 1  # the root label
    pos = offset
    floor = offset  # every pointer must jump strictly below this: no loops, ever
    end: int | None = None
    jumps = 0
    while True:
        if pos >= len(data):
            raise RemoteProtocolError("truncated DNS name")
        size = data[pos]
        if size & _POINTER == _POINTER:
            if pos + 1 >= len(data):
                raise RemoteProtocolError("truncated DNS name pointer")
            target = ((size & ~_POINTER) << 8) | data[pos + 1]
            if target >= floor:
                raise RemoteProtocolError("DNS name pointer does not point backwards")
            jumps += 1
            if jumps > MAX_POINTER_JUMPS:
                raise RemoteProtocolError("too many DNS name pointers")
            if end is None:
                end = pos + 2
            pos = floor = target
            continue
        if size & _POINTER:
            raise RemoteProtocolError(f"reserved DNS label type {size:#x}")
        if size == 0:
            return tuple(labels), (pos + 1 if end is None else end)
        label = data[pos + 1 : pos + 1 + size]
        if len(label) < size:
            raise RemoteProtocolError("truncated DNS label")
        length += size + 1
        if length > MAX_NAME_LENGTH:
            raise RemoteProtocolError("DNS name longer than 255 bytes")
        labels.append(label)
        pos += 1 + size


def _read_record(data: bytes, pos: int) -> tuple[Record, int]:
    name, pos = _read_name(data, pos)
    if pos + _RECORD_TAIL.size > len(data):
        raise RemoteProtocolError("truncated DNS record")
    rtype, rclass, ttl, rdlength = _RECORD_TAIL.unpack_from(data, pos)
    pos += _RECORD_TAIL.size
    end = pos + rdlength
    if end > len(data):
        raise RemoteProtocolError("truncated DNS record data")
    rdata = data[pos:end]
    target: Name | None = None
    strings: tuple[bytes, ...] = ()
    if rtype == TYPE_PTR:
        target, after = _read_name(data, pos)
        if after != end:
            raise RemoteProtocolError("PTR record data length mismatch")
    elif rtype == TYPE_TXT:
        strings = _read_strings(rdata)
    record = Record(
        name, rtype, rclass & ~_TOP_BIT, bool(rclass & _TOP_BIT), ttl, rdata, target, strings
    )
    return record, end


def _read_strings(rdata: bytes) -> tuple[bytes, ...]:
    strings: list[bytes] = []
    pos = 0
    while pos < len(rdata):
        size = rdata[pos]
        if pos + 1 + size > len(rdata):
            raise RemoteProtocolError("truncated TXT character-string")
        strings.append(rdata[pos + 1 : pos + 1 + size])
        pos += 1 + size
    return tuple(strings)


# -- encoding ---------------------------------------------------------------------------------


class _Writer:
    """Builds a message; names are compressed against every name written before."""

    def __init__(self) -> None:
        self.out = bytearray(_HEADER.size)
        self._names: dict[Name, int] = {}

    def name(self, name: Name) -> None:
        _check_name(name)
        for index in range(len(name)):
            suffix = name_key(name[index:])
            known = self._names.get(suffix)
            if known is not None:
                self.out += struct.pack("!H", (_POINTER << 8) | known)
                return
            if len(self.out) < 0x3FFF:
                self._names[suffix] = len(self.out)
            self.out.append(len(name[index]))
            self.out += name[index]
        self.out.append(0)

    def record(self, name: Name, rtype: int, rclass: int, ttl: int, rdata: bytes | Name) -> None:
        self.name(name)
        tail = len(self.out)
        self.out += _RECORD_TAIL.pack(rtype, rclass, ttl, 0)
        start = len(self.out)
        if isinstance(rdata, tuple):
            self.name(rdata)
        else:
            self.out += rdata
        struct.pack_into("!H", self.out, tail + 8, len(self.out) - start)

    def mark(self) -> tuple[int, dict[Name, int]]:
        return len(self.out), dict(self._names)

    def rollback(self, mark: tuple[int, dict[Name, int]]) -> None:
        del self.out[mark[0] :]
        self._names = mark[1]

    def finish(self, ident: int, flags: int, counts: tuple[int, int, int, int]) -> bytes:
        _HEADER.pack_into(self.out, 0, ident, flags, *counts)
        return bytes(self.out)


def encode_query(*, query_id: int = 0, service: str = SERVICE_NAME) -> bytes:
    """A "find all peers" query: one ``<service> PTR`` question (multicast response wanted)."""
    writer = _Writer()
    writer.name(name_from_text(service))
    writer.out += _QUESTION_TAIL.pack(TYPE_PTR, CLASS_IN)
    return writer.finish(query_id, 0, (1, 0, 0, 0))


def encode_response(
    peer_name: str,
    addrs: Iterable[str | Multiaddr],
    *,
    query_id: int = 0,
    ttl: int = DEFAULT_TTL,
    service: str = SERVICE_NAME,
    max_size: int = DEFAULT_RESPONSE_SIZE,
    include_question: bool = False,
) -> bytes:
    """Our answer to a "find all peers" query.

    Args:
        peer_name: our random instance label (32-63 lower-case alphanumerics).
        addrs: full multiaddrs, each ending in ``/p2p/<our peer id>``.
        query_id: 0 for multicast; the query's id when answering a legacy unicast query.
        ttl: seconds the records stay valid (0 says goodbye).
        service: the service name.
        max_size: addresses that would push the message past this are left out, as are
            addresses whose ``dnsaddr=`` string exceeds 255 bytes.
        include_question: repeat the ``<service> PTR`` question, as answers to legacy
            unicast queries must (RFC 6762 §6.7).

    Raises:
        LocalProtocolError: ``peer_name`` is not a valid DNS label.
    """
    service_name = name_from_text(service)
    instance = (peer_name.encode(), *service_name)
    writer = _Writer()
    if include_question:
        writer.name(service_name)
        writer.out += _QUESTION_TAIL.pack(TYPE_PTR, CLASS_IN)
    writer.record(service_name, TYPE_PTR, CLASS_IN, ttl, instance)
    additionals = 0
    for addr in addrs:
        value = DNSADDR_PREFIX + str(addr).encode()
        if len(value) > MAX_CHARACTER_STRING:
            continue
        mark = writer.mark()
        rdata = bytes((len(value),)) + value
        writer.record(instance, TYPE_TXT, CLASS_IN | _TOP_BIT, ttl, rdata)
        if len(writer.out) > max_size:
            writer.rollback(mark)
            continue
        additionals += 1
    questions = 1 if include_question else 0
    return writer.finish(query_id, _FLAG_QR | _FLAG_AA, (questions, 1, 0, additionals))


# -- interpretation ---------------------------------------------------------------------------


def is_peer_query(message: Message, *, service: str = SERVICE_NAME) -> bool:
    """Whether ``message`` is a standard query asking for ``<service> PTR`` (or ANY)."""
    if message.is_response or message.opcode != 0:
        return False
    key = name_key(name_from_text(service))
    return any(
        name_key(q.name) == key and q.qtype in (TYPE_PTR, TYPE_ANY) for q in message.questions
    )


def find_peers(message: Message, *, service: str = SERVICE_NAME) -> list[MdnsPeer]:
    """The peers a response advertises.

    Per PTR answer for ``service``, the ``dnsaddr=`` strings of the TXT records named after
    its target are parsed as multiaddrs; those that do not parse, lack ``/p2p`` or name a
    different peer than the first one are skipped. A PTR without any usable address yields
    nothing. Queries and responses with a non-zero opcode or rcode yield nothing.
    """
    if not message.is_response or message.opcode != 0 or message.rcode != 0:
        return []
    service_key = name_key(name_from_text(service))
    texts: dict[Name, list[bytes]] = {}
    for record in (*message.answers, *message.additionals):
        if record.rtype == TYPE_TXT:
            texts.setdefault(name_key(record.name), []).extend(record.strings)
    peers: list[MdnsPeer] = []
    for record in message.answers:
        if record.rtype != TYPE_PTR or record.target is None:
            continue
        if name_key(record.name) != service_key:
            continue
        peer = _peer_from_strings(texts.get(name_key(record.target), ()), record.ttl)
        if peer is not None:
            peers.append(peer)
    return peers


def _peer_from_strings(strings: Sequence[bytes], ttl: int) -> MdnsPeer | None:
    peer_id: PeerId | None = None
    addrs: list[Multiaddr] = []
    for value in strings:
        if not value.startswith(DNSADDR_PREFIX):
            continue
        try:
            addr = Multiaddr.from_string(value[len(DNSADDR_PREFIX) :].decode("ascii"))
        except (UnicodeDecodeError, RemoteProtocolError):
            continue
        named = addr.peer_id()
        if named is None or (peer_id is not None and named != peer_id):
            continue
        peer_id = named
        bare = addr.without_peer_id()
        if bare.components and bare not in addrs:
            addrs.append(bare)
    if peer_id is None or not addrs:
        return None
    return MdnsPeer(peer_id, tuple(addrs), ttl)
