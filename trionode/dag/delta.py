"""Causal deltas: the signed, encrypted unit of replication (DESIGN §6).

```
header     = {version, parents[], author, seq, vv, hlc, key_id, nonce, auth?}     (format 4)
ciphertext = XChaCha20-Poly1305(context key, nonce, body, aad = context id ‖ header bytes)
signature  = Ed25519(author, "trionode/delta/v4" ‖ context id ‖ len ‖ header ‖ ciphertext)
id         = SHA-256(header ‖ ciphertext ‖ signature)
```

(Formats 2 and 3 put `context_id` in the header and sign and associate the header alone.)

Everything a receiver needs to check authenticity is outside the ciphertext, so a node can
verify (id, signature, author) before it even has the key, and a relay that is not a member
learns only the header. The body (entity records and app events) is encrypted, and bound to
the header by the AEAD's associated data.

Format 2 adds what authorization by causal history needs (DESIGN §7.1, `trionode.auth`):
`seq`, the author's sequence number (its deltas form a chain), and `vv`, the version
vector of the delta's causal past (author tag → highest sequence number, itself
included), so "is op r in the past of this delta" is one lookup on every node. A
membership operation travels in `auth`, in the clear and signed: any holder of the delta
can judge it, key or not (which also lets a removed member learn that it was removed).
Key ids are the first 8 bytes of a hash of the key, so two admins rotating at once never
make the same id.

Format 3 lets a membership operation name an app bundle (`AuthAction.bundle_blob_id`,
`app_name`, `app_signer`): the create op names the app the context starts with and an
upgrade op the one it moves to, so a member that lacks that app can fetch it from the
others (`trionode.context.app_upgrades`). Before format 4, a delta was sealed in the oldest
format that held it (only ops naming a bundle were format 3); a format 2 header that names
a bundle is refused.

Format 4 is the compact envelope (issue #16): nothing in it is said twice.

- The header drops `context_id`: every holder of a delta already knows its context (the
  gossip topic, the sync session, the storage key), so the id is bound by the signature
  (`trionode/delta/v4` ‖ context id ‖ header ‖ ciphertext) and by the body's associated
  data instead of being sent. `verify_delta` therefore takes the context id.
- `vv` leaves out the author's own entry: it is `seq`.
- The body drops the author's root hash (never read: heartbeats carry roots), and its
  records travel as msgpack trees in which the delta's recurring values (the
  author's key, the root id, the delta's HLC, ids of records earlier in the body) are
  short references (`trionode.dag.compact`); opening the delta gives back the canonical
  record bytes, so everything past `open_delta` is the same for every format.

Format 5 is format 4 with event payloads that refer to the records' byte strings instead
of repeating them (`trionode.crdt.compact`: kv_store's `Inserted` event repeats the key and
value its records hold, about 100 of a 507-byte delta). Its header is format 4's.

A delta is sealed in format 5; formats 2, 3 and 4 (stored or received) still load, and a
format 3 op's app-bundle refs are carried by format 4 and 5 as they are.

Decoders enforce sizes and shapes and raise RemoteProtocolError; nothing here trusts input.
"""

from __future__ import annotations

import hashlib
import operator
import os
from bisect import insort
from collections.abc import Sequence
from typing import Annotated, Final, overload

import attrs
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trionode.crdt.compact import (
    MAX_EXPANSION,
    MAX_PIECES,
    PayloadSpans,
    SealedRow,
    compact_entities,
    compact_records,
    expand_payload,
    expand_records,
)
from trionode.crdt.encoding import encode_entity
from trionode.crdt.entity import Entity
from trionode.errors import RemoteProtocolError
from trionode.wire import ed25519
from trionode.wire.aead import open_xchacha20poly1305, seal_xchacha20poly1305

ID_SIZE: Final = 32
GENESIS: Final = bytes(ID_SIZE)
"""The parent of a context's first delta."""
MAX_PARENTS: Final = 64
MAX_DELTA_BYTES: Final = 8 * 1024 * 1024
MAX_EVENTS: Final = 1024
MAX_RECORDS: Final = 100_000
_SIGNING_DOMAIN: Final = b"trionode/delta/v2"
_SIGNING_DOMAIN_V4: Final = b"trionode/delta/v4"
FORMAT_VERSION: Final = 5
"""The newest format (see the module docstring); `SUPPORTED_FORMATS` are read."""
SUPPORTED_FORMATS: Final = frozenset({2, 3, 4, 5})
COMPACT_FORMATS: Final = frozenset({4, 5})
"""Formats whose header is a `CompactHeader` (and whose records are compact)."""
MAX_APP_NAME: Final = 128
MAX_VV: Final = 4096
"""Authors named in one version vector (members who ever wrote)."""
MAX_KEY_BOX: Final = 4096
MAX_SEQ: Final = (1 << 63) - 1

Bytes32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Bytes24 = Annotated[bytes, msgspec.Meta(min_length=24, max_length=24)]
Bytes64 = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


Bytes8 = Annotated[bytes, msgspec.Meta(min_length=8, max_length=8)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]
KeyId = Annotated[int, msgspec.Meta(ge=0)]
"""Up to 2**64 - 1: msgpack integers end there."""


class AuthAction(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A membership operation (see `trionode.auth.model.Kind` for the kinds)."""

    kind: Annotated[str, msgspec.Meta(max_length=16)]
    parents: Annotated[list[Bytes32], msgspec.Meta(max_length=MAX_PARENTS)] = []
    """The maximal membership operations in this one's past (exact op-to-op ancestry)."""
    member: Bytes32 | None = None
    role: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    invitation: Annotated[bytes, msgspec.Meta(max_length=8192)] | None = None
    """Admission: the invitation as its inviter signed it (without the secret)."""
    invitation_signature: Bytes64 | None = None
    invitation_id: Bytes32 | None = None
    """Revocation: the invitation it revokes."""
    key_id: KeyId | None = None
    """Create, remove, rotate: the new key's id."""
    key_box: Annotated[list[tuple[Bytes32, bytes]], msgspec.Meta(max_length=MAX_KEY_BOX)] = []
    """The new key sealed to each member that may read: (member, sealed box)."""
    application_id: Bytes32 | None = None
    """Upgrade: the application the context moves to."""
    app_version: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    """Upgrade: that application's version (the highest standing one is the context's)."""
    bundle_blob_id: Bytes32 | None = None
    """Create, upgrade (format 3): the blob holding the app's packed bundle, which members
    serve to each other; with `application_id`, `app_version`, `app_name`, `app_signer`."""
    app_name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_APP_NAME)] | None = None
    app_signer: Bytes32 | None = None
    """The bundle's signer (Ed25519 public key); None: unsigned."""

    @property
    def names_bundle(self) -> bool:
        """Whether this op needs format 3."""
        return (self.bundle_blob_id, self.app_name, self.app_signer) != (None, None, None)


class DeltaHeader(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    version: int
    context_id: Bytes32
    parents: Annotated[list[Bytes32], msgspec.Meta(min_length=1, max_length=MAX_PARENTS)]
    author: Bytes32
    """The author's member public key (Ed25519)."""
    seq: Seq
    """The author's sequence number: one more than its highest in the delta's past."""
    vv: Annotated[list[tuple[Bytes8, Seq]], msgspec.Meta(min_length=1, max_length=MAX_VV)]
    """Version vector of the causal past, this delta included: (author tag, seq), sorted."""
    hlc: Annotated[int, msgspec.Meta(ge=0)]
    """The author's HLC time (NTP64); the writer id is `author`."""
    key_id: KeyId
    """Which context key encrypted the body (keys rotate when members leave)."""
    nonce: Bytes24
    auth: AuthAction | None = None


class CompactHeader(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A format 4 header as it is signed and sent (see the module docstring): a
    `DeltaHeader` without `context_id`, and `vv` without the author's own entry."""

    version: int
    parents: Annotated[list[Bytes32], msgspec.Meta(min_length=1, max_length=MAX_PARENTS)]
    author: Bytes32
    seq: Seq
    vv: Annotated[list[tuple[Bytes8, Seq]], msgspec.Meta(max_length=MAX_VV - 1)]
    """The other authors of the causal past: (author tag, seq), sorted."""
    hlc: Annotated[int, msgspec.Meta(ge=0)]
    key_id: KeyId
    nonce: Bytes24
    auth: AuthAction | None = None


class AppEvent(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    payload: bytes
    """JSON bytes."""


class DeltaBody(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    records: Annotated[list[bytes], msgspec.Meta(max_length=MAX_RECORDS)]
    """Encoded entity records (`trionode.crdt.encode_entity`)."""
    events: Annotated[list[AppEvent], msgspec.Meta(max_length=MAX_EVENTS)]
    root_hash: Bytes32 | None = None
    """Formats 2/3: the author's root hash after applying this delta. Nothing ever read it
    (heartbeats carry roots), so format 4 does not send it."""


class CompactBody(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A format 4 body as encrypted: `DeltaBody` with compact records (`dag/compact.py`)
    and no root hash."""

    records: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=MAX_RECORDS)]
    events: Annotated[list[AppEvent], msgspec.Meta(max_length=MAX_EVENTS)]


class CompactEvent(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A format 5 event: its payload as it is, or as pieces (`trionode.crdt.compact`)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    payload: (
        bytes | Annotated[list[bytes | msgspec.msgpack.Ext], msgspec.Meta(max_length=MAX_PIECES)]
    )


class CompactBody5(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A format 5 body as encrypted: `CompactBody` whose event payloads may refer to the
    records."""

    records: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=MAX_RECORDS)]
    events: Annotated[list[CompactEvent], msgspec.Meta(max_length=MAX_EVENTS)]


class _DeltaId:
    """`SignedDelta.id`: its SHA-256, computed on the first access and kept in the delta's
    `__dict__`, where every later access finds it with no call (a descriptor without
    `__set__` yields to the instance's dict: ~10 accesses of each local write's delta,
    issue #16)."""

    @overload
    def __get__(self, delta: None, owner: type) -> _DeltaId: ...
    @overload
    def __get__(self, delta: SignedDelta, owner: type | None = None) -> bytes: ...
    def __get__(self, delta: SignedDelta | None, owner: type | None = None) -> bytes | _DeltaId:
        if delta is None:
            return self
        value = delta.__dict__["id"] = delta_id(delta)
        return value


class SignedDelta(
    msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, dict=True
):
    """What travels: the header bytes exactly as signed, the ciphertext and the signature.

    One pass per delta: its id, its wire bytes and (once checked) its verified header are
    computed once and kept on the object (`__dict__`, never encoded), so the many places
    that ask for them cost a dictionary lookup, not a SHA-256, an encoding or an Ed25519
    verification each."""

    header: bytes
    ciphertext: bytes
    signature: Bytes64

    id = _DeltaId()

    def encode(self) -> bytes:
        cached: bytes | None = self.__dict__.get("_wire")
        if cached is None:
            cached = self.__dict__["_wire"] = _ENCODER.encode(self)
        return cached


_ENCODER = msgspec.msgpack.Encoder()
_HEADER_DECODER = msgspec.msgpack.Decoder(DeltaHeader)
_COMPACT_HEADER_DECODER = msgspec.msgpack.Decoder(CompactHeader)
_BODY_DECODER = msgspec.msgpack.Decoder(DeltaBody)
_COMPACT_BODY_DECODER = msgspec.msgpack.Decoder(CompactBody)
_COMPACT_BODY5_DECODER = msgspec.msgpack.Decoder(CompactBody5)
_SIGNED_DECODER = msgspec.msgpack.Decoder(SignedDelta)


def encode_compact_body(
    body: DeltaBody,
    *,
    author: bytes,
    hlc: int,
    version: int = FORMAT_VERSION,
    record_ids: Sequence[bytes] | None = None,
    entities: Sequence[Entity] | None = None,
    rows: dict[bytes, SealedRow] | None = None,
) -> bytes:
    """A body's plaintext in format 4 or 5. `record_ids`: its records' entity ids, if the
    caller holds them (`compact_records`); `entities`: the records themselves, whose
    encodings `body.records` are (`compact_entities`: the same bytes, sooner), or would
    be (`body.records` may then be left empty: a local write does not encode them);
    `rows`: where `compact_entities` leaves their state rows (with `entities`)."""
    leaves: list[bytes] | None = [] if body.events and version != 4 else None
    if entities is not None:
        records = compact_entities(entities, author=author, hlc=hlc, leaves=leaves, rows=rows)
    else:
        records = compact_records(
            body.records, author=author, hlc=hlc, leaves=leaves, ids=record_ids
        )
    if version == 4:
        return _ENCODER.encode(CompactBody(records, body.events))
    opened = sum(map(len, map(_PAYLOAD, body.events)))
    if entities is None or body.records:
        opened += sum(map(len, body.records))
    elif opened + (grown := _MAX_GROWTH * sum(map(len, records))) > MAX_EXPANSION:
        opened += sum(len(encode_entity(e)) for e in entities)
    else:
        opened += grown  # (at least what they open to)
    # A body that would open past the budget every receiver holds it to travels without
    # references: as large as it is, it is refused here (replication.max_delta_bytes),
    # never sealed small and refused by every other member.
    spans = PayloadSpans(leaves if leaves is not None and opened <= MAX_EXPANSION else [])
    events = [CompactEvent(e.name, spans.compact(e.payload)) for e in body.events]
    return _ENCODER.encode(CompactBody5(records, events))


_PAYLOAD: Final = operator.attrgetter("payload")
_MAX_GROWTH: Final = 16
"""A compact record opens to less than this many times its bytes: its largest reference
for its size, a stamp (3 bytes), stands for 44 (`trionode.crdt.compact`)."""


def decode_compact_body(
    plain: bytes, *, author: bytes, hlc: int, version: int = FORMAT_VERSION
) -> DeltaBody:
    """A format 4 or 5 body, its records expanded to canonical bytes and its payloads
    rebuilt (RemoteProtocolError)."""
    try:
        wire = (_COMPACT_BODY_DECODER if version == 4 else _COMPACT_BODY5_DECODER).decode(plain)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:  # (bad UTF-8)
        raise RemoteProtocolError(f"malformed delta body: {exc}") from None
    items = [bytes(r) for r in wire.records]
    if isinstance(wire, CompactBody):
        return DeltaBody(expand_records(items, author=author, hlc=hlc), wire.events)
    pieces = any(not isinstance(e.payload, bytes) for e in wire.events)
    leaves: list[bytes] | None = [] if pieces else None
    records = expand_records(items, author=author, hlc=hlc, leaves=leaves)
    # (The records and the payloads share one budget: a delta never opens past it.)
    left = MAX_EXPANSION - sum(len(r) for r in records)
    events: list[AppEvent] = []
    for event in wire.events:
        payload = event.payload
        if not isinstance(payload, bytes):
            payload = expand_payload(payload, leaves or [], budget=left)
        left -= len(payload)
        events.append(AppEvent(event.name, payload))
    return DeltaBody(records, events)


def delta_id(delta: SignedDelta) -> bytes:
    h = hashlib.sha256()
    h.update(delta.header)
    h.update(delta.ciphertext)
    h.update(delta.signature)
    return h.digest()


def _signed_message(header: bytes, ciphertext: bytes) -> bytes:
    """What a format 2/3 author signs (the header names the context)."""
    return _SIGNING_DOMAIN + len(header).to_bytes(4, "big") + header + ciphertext


def _signed_message_v4(context_id: bytes, header: bytes, ciphertext: bytes) -> bytes:
    """What a format 4 author signs: the context id is signed, not sent."""
    return _SIGNING_DOMAIN_V4 + context_id + len(header).to_bytes(4, "big") + header + ciphertext


def _associated_data(header: DeltaHeader, header_bytes: bytes) -> bytes:
    """What binds the body to its header (and, in format 4, to its context)."""
    if header.version >= 4:
        return header.context_id + header_bytes
    return header_bytes


def _wire_header(header: DeltaHeader) -> bytes:
    """The bytes a header is signed and sent as, in its own format."""
    if header.version not in COMPACT_FORMATS:
        return _ENCODER.encode(header)
    tag = header.author[:8]
    return _ENCODER.encode(
        CompactHeader(
            version=header.version,
            parents=header.parents,
            author=header.author,
            seq=header.seq,
            vv=[entry for entry in header.vv if entry[0] != tag],
            hlc=header.hlc,
            key_id=header.key_id,
            nonce=header.nonce,
            auth=header.auth,
        )
    )


def _read_header(data: bytes, context_id: bytes) -> DeltaHeader:
    """Decode a header of any supported format, as a `DeltaHeader` of `context_id` (a
    format 2/3 header must name it). Checks shape and canonical bytes, not the signature."""
    version = data[1] if len(data) > 1 and 0x90 <= data[0] <= 0x9F else None  # [v, ...]
    if version is not None and version < 0x80 and version not in SUPPORTED_FORMATS:
        raise RemoteProtocolError(f"delta format {version} is not supported")
    try:
        if version in COMPACT_FORMATS:
            wire = _COMPACT_HEADER_DECODER.decode(data)
            tag = wire.author[:8]
            if any(t == tag for t, _ in wire.vv):
                raise RemoteProtocolError("delta version vector repeats its own author")
            header = DeltaHeader(
                version=wire.version,
                context_id=context_id,
                parents=wire.parents,
                author=wire.author,
                seq=wire.seq,
                vv=sorted([*wire.vv, (tag, wire.seq)]),
                hlc=wire.hlc,
                key_id=wire.key_id,
                nonce=wire.nonce,
                auth=wire.auth,
            )
        else:
            header = _HEADER_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:  # (bad UTF-8)
        raise RemoteProtocolError(f"malformed delta header: {exc}") from None
    if header.version not in SUPPORTED_FORMATS:
        raise RemoteProtocolError(f"delta format {header.version} is not supported")
    if header.context_id != context_id:
        raise RemoteProtocolError("delta belongs to another context")
    return header


def seal_delta(
    *,
    context_id: bytes,
    parents: list[bytes],
    author: Ed25519PrivateKey,
    hlc: int,
    key_id: int,
    context_key: bytes,
    body: DeltaBody,
    seq: int = 1,
    vv: dict[bytes, int] | None = None,
    auth: AuthAction | None = None,
    version: int = FORMAT_VERSION,
    author_public: bytes | None = None,
    record_ids: Sequence[bytes] | None = None,
    entities: Sequence[Entity] | None = None,
    rows: dict[bytes, SealedRow] | None = None,
) -> SignedDelta:
    """Encrypt and sign a body as a new delta. `vv` is the version vector of its parents
    (author tag → seq); the author's own entry is set to `seq`. `version` other than the
    newest is for tests of what older nodes wrote. `author_public`: `author`'s public key
    if the caller holds it (deriving it is a scalar multiplication, ~20 us per delta).
    `record_ids`: the entity ids of `body.records`, if the caller holds them (a SHA-256
    per record saved: `compact_records`); `entities`: the records themselves, whose
    encodings `body.records` are, or would be if left empty (`compact_entities`); `rows`:
    where the state rows of `entities` are left as they are made on the way (a local
    write's tree: `StateTree.sealed_rows`; formats 4 and 5)."""
    if version not in SUPPORTED_FORMATS:
        raise ValueError(f"cannot seal delta format {version}")
    if author_public is None:
        author_public = author.public_key().public_bytes_raw()
    tag = author_public[:8]
    # (The vector without our own entry, as format 4 sends it, and with it, as the header
    # says it: one sort, no dictionary copy, no second pass over the sorted vector.)
    others = sorted([entry for entry in vv.items() if entry[0] != tag]) if vv else []
    full_vv = others.copy()
    insort(full_vv, (tag, seq))
    parents = sorted(parents)
    nonce = os.urandom(24)
    header = DeltaHeader(
        version=version,
        context_id=context_id,
        parents=parents,
        author=author_public,
        seq=seq,
        vv=full_vv,
        hlc=hlc,
        key_id=key_id,
        nonce=nonce,
        auth=auth,
    )
    if version in COMPACT_FORMATS:
        header_bytes = _ENCODER.encode(
            CompactHeader(version, parents, author_public, seq, others, hlc, key_id, nonce, auth)
        )  # (`_wire_header(header)`, from the parts at hand)
        plain = encode_compact_body(
            body,
            author=author_public,
            hlc=hlc,
            version=version,
            record_ids=record_ids,
            entities=entities,
            rows=rows,
        )
        ciphertext = seal_xchacha20poly1305(plain, context_id + header_bytes, nonce, context_key)
        message = _SIGNING_DOMAIN_V4 + context_id + _length(header_bytes) + header_bytes
    else:
        header_bytes = _ENCODER.encode(header)
        if entities is not None and not body.records:
            body = msgspec.structs.replace(body, records=[encode_entity(e) for e in entities])
        ciphertext = seal_xchacha20poly1305(_ENCODER.encode(body), header_bytes, nonce, context_key)
        message = _SIGNING_DOMAIN + _length(header_bytes) + header_bytes
    # (signed by libsodium: `trionode.wire.ed25519`)
    signature = ed25519.sign(author.private_bytes_raw(), message + ciphertext)
    delta = SignedDelta(header_bytes, ciphertext, signature)
    delta.__dict__["_header"] = header  # ours, just signed: nothing to verify
    return delta


def _length(header: bytes) -> bytes:
    """A header's length as the signed message frames it."""
    return len(header).to_bytes(4, "big")


def decode_delta(
    data: bytes | bytearray | memoryview, *, max_size: int = MAX_DELTA_BYTES
) -> SignedDelta:
    """Parse a delta off the wire (no signature check yet)."""
    if len(data) > max_size:
        raise RemoteProtocolError(f"delta of {len(data)} bytes exceeds {max_size}")
    try:
        delta = _SIGNED_DECODER.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed delta: {exc}") from None
    if isinstance(data, bytes):
        delta.__dict__["_wire"] = data  # (canonical or not, these are the bytes we hold)
    return delta


def verify_delta(
    delta: SignedDelta, *, context_id: bytes, expected_id: bytes | None = None
) -> DeltaHeader:
    """Check the id (if the sender named one), that the delta belongs to `context_id` and
    the author's signature; return the header.

    Membership and write rights are the caller's to check: they depend on context state.
    The first successful check is kept on the delta; later calls return it at once.
    """
    if expected_id is not None and delta.id != expected_id:
        raise RemoteProtocolError("delta id does not match its contents")
    cached: DeltaHeader | None = delta.__dict__.get("_header")
    if cached is not None:
        if cached.context_id != context_id:
            raise RemoteProtocolError("delta belongs to another context")
        return cached
    header = _read_header(delta.header, context_id)
    if _wire_header(header) != delta.header:
        raise RemoteProtocolError("delta header is not canonical")
    if header.version < 3 and header.auth is not None and header.auth.names_bundle:
        raise RemoteProtocolError(f"a format {header.version} delta names no app bundle")
    if header.hlc >= 1 << 64:
        raise RemoteProtocolError("delta hlc out of range")
    tags = [t for t, _ in header.vv]
    if tags != sorted(set(tags)):
        raise RemoteProtocolError("delta version vector must be sorted and distinct")
    if dict(header.vv).get(header.author[:8]) != header.seq:
        raise RemoteProtocolError("delta version vector does not name its own seq")
    if header.parents != sorted(set(header.parents)):
        raise RemoteProtocolError("delta parents must be sorted and distinct")
    if header.version >= 4:
        message = _signed_message_v4(context_id, delta.header, delta.ciphertext)
    else:
        message = _signed_message(delta.header, delta.ciphertext)
    if not ed25519.verify(header.author, delta.signature, message):
        raise RemoteProtocolError("bad delta signature")
    delta.__dict__["_header"] = header
    return header


@attrs.frozen
class VerifiedDelta:
    """A received delta checked once (decoded, id computed, signature verified, header
    decoded) with the wire bytes it came as: what the delta processor takes."""

    delta: SignedDelta
    header: DeltaHeader

    @property
    def id(self) -> bytes:
        return self.delta.id

    @property
    def wire(self) -> bytes:
        return self.delta.encode()


def verify_wire(
    wire: bytes,
    *,
    context_id: bytes,
    expected_id: bytes | None = None,
    max_size: int = MAX_DELTA_BYTES,
) -> VerifiedDelta:
    """Decode and verify a delta of `context_id` off the wire (RemoteProtocolError if it
    is not one)."""
    delta = decode_delta(wire, max_size=max_size)
    return VerifiedDelta(delta, verify_delta(delta, context_id=context_id, expected_id=expected_id))


def open_delta(delta: SignedDelta, header: DeltaHeader, context_key: bytes) -> DeltaBody:
    """Decrypt and decode the body of a verified delta (records as canonical bytes, whatever
    the format)."""
    plain = open_xchacha20poly1305(
        delta.ciphertext, _associated_data(header, delta.header), header.nonce, context_key
    )
    if plain is None:
        raise RemoteProtocolError("delta body does not decrypt under that key")
    if header.version in COMPACT_FORMATS:
        return decode_compact_body(
            plain, author=header.author, hlc=header.hlc, version=header.version
        )
    try:
        return _BODY_DECODER.decode(plain)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:  # (bad UTF-8)
        raise RemoteProtocolError(f"malformed delta body: {exc}") from None


def header_vv(header: DeltaHeader) -> dict[bytes, int]:
    return dict(header.vv)


def key_id_of(key: bytes) -> int:
    """A key's id: unique per key (so per rotation), and reveals nothing of the key."""
    return int.from_bytes(hashlib.sha256(b"trionode/key-id/v1" + key).digest()[:8], "big")


def stored_header(delta: SignedDelta, *, context_id: bytes) -> DeltaHeader:
    """The header of a delta of `context_id` this node verified before it stored it (no
    signature check: a restart re-reads thousands of them)."""
    return _read_header(delta.header, context_id)
