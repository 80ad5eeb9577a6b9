"""Causal deltas: the signed, encrypted unit of replication (DESIGN §6).

```
header     = {version, context_id, parents[], author, seq, vv, hlc, key_id, nonce, auth?}
ciphertext = XChaCha20-Poly1305(context key, nonce, body, aad = header bytes)
signature  = Ed25519(author, "trionode/delta/v1" ‖ header ‖ ciphertext)
id         = SHA-256(header ‖ ciphertext ‖ signature)
```

Everything a receiver needs to check authenticity is outside the ciphertext, so a node can
verify (id, signature, author) before it even has the key, and a relay that is not a member
learns only the header. The body (entity records, app events and the author's root hash) is
encrypted, and bound to the header by the AEAD's associated data.

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
others (`trionode.context.app_upgrades`). A delta is sealed in the oldest format that holds
it (only ops naming a bundle are format 3), and format 2 deltas, stored or received, still
load; a format 2 header that names a bundle is refused.

Decoders enforce sizes and shapes and raise RemoteProtocolError; nothing here trusts input.
"""

from __future__ import annotations

import hashlib
import os
from typing import Annotated, Final

import attrs
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from trionode.errors import RemoteProtocolError

ID_SIZE: Final = 32
GENESIS: Final = bytes(ID_SIZE)
"""The parent of a context's first delta."""
MAX_PARENTS: Final = 64
MAX_DELTA_BYTES: Final = 8 * 1024 * 1024
MAX_EVENTS: Final = 1024
MAX_RECORDS: Final = 100_000
_SIGNING_DOMAIN: Final = b"trionode/delta/v2"
FORMAT_VERSION: Final = 3
"""The newest format (see the module docstring); `SUPPORTED_FORMATS` are read."""
SUPPORTED_FORMATS: Final = frozenset({2, 3})
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


class AppEvent(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    payload: bytes
    """JSON bytes."""


class DeltaBody(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    records: Annotated[list[bytes], msgspec.Meta(max_length=MAX_RECORDS)]
    """Encoded entity records (`trionode.crdt.encode_entity`)."""
    events: Annotated[list[AppEvent], msgspec.Meta(max_length=MAX_EVENTS)]
    root_hash: Bytes32
    """The author's root hash after applying this delta (a divergence hint, not a rule)."""


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

    @property
    def id(self) -> bytes:
        cached: bytes | None = self.__dict__.get("_id")
        if cached is None:
            cached = self.__dict__["_id"] = delta_id(self)
        return cached

    def encode(self) -> bytes:
        cached: bytes | None = self.__dict__.get("_wire")
        if cached is None:
            cached = self.__dict__["_wire"] = _ENCODER.encode(self)
        return cached


_ENCODER = msgspec.msgpack.Encoder()
_HEADER_DECODER = msgspec.msgpack.Decoder(DeltaHeader)
_BODY_DECODER = msgspec.msgpack.Decoder(DeltaBody)
_SIGNED_DECODER = msgspec.msgpack.Decoder(SignedDelta)


def delta_id(delta: SignedDelta) -> bytes:
    h = hashlib.sha256()
    h.update(delta.header)
    h.update(delta.ciphertext)
    h.update(delta.signature)
    return h.digest()


def _signed_message(header: bytes, ciphertext: bytes) -> bytes:
    return _SIGNING_DOMAIN + len(header).to_bytes(4, "big") + header + ciphertext


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
) -> SignedDelta:
    """Encrypt and sign a body as a new delta. `vv` is the version vector of its parents
    (author tag → seq); the author's own entry is set to `seq`."""
    author_public = author.public_key().public_bytes_raw()
    full_vv = dict(vv or {})
    full_vv[author_public[:8]] = seq
    header = DeltaHeader(
        version=FORMAT_VERSION if auth is not None and auth.names_bundle else 2,
        context_id=context_id,
        parents=sorted(parents),
        author=author_public,
        seq=seq,
        vv=sorted(full_vv.items()),
        hlc=hlc,
        key_id=key_id,
        nonce=os.urandom(24),
        auth=auth,
    )
    header_bytes = _ENCODER.encode(header)
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(
        _ENCODER.encode(body), header_bytes, header.nonce, context_key
    )
    signature = author.sign(_signed_message(header_bytes, ciphertext))
    delta = SignedDelta(header=header_bytes, ciphertext=ciphertext, signature=signature)
    delta.__dict__["_header"] = header  # ours, just signed: nothing to verify
    return delta


def decode_delta(
    data: bytes | bytearray | memoryview, *, max_size: int = MAX_DELTA_BYTES
) -> SignedDelta:
    """Parse a delta off the wire (no signature check yet)."""
    if len(data) > max_size:
        raise RemoteProtocolError(f"delta of {len(data)} bytes exceeds {max_size}")
    try:
        delta = _SIGNED_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed delta: {exc}") from None
    if isinstance(data, bytes):
        delta.__dict__["_wire"] = data  # (canonical or not, these are the bytes we hold)
    return delta


def verify_delta(delta: SignedDelta, *, expected_id: bytes | None = None) -> DeltaHeader:
    """Check the id (if the sender named one) and the author's signature; return the header.

    Membership and write rights are the caller's to check: they depend on context state.
    The first successful check is kept on the delta; later calls return it at once.
    """
    if expected_id is not None and delta.id != expected_id:
        raise RemoteProtocolError("delta id does not match its contents")
    cached: DeltaHeader | None = delta.__dict__.get("_header")
    if cached is not None:
        return cached
    try:
        header = _HEADER_DECODER.decode(delta.header)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed delta header: {exc}") from None
    if _ENCODER.encode(header) != delta.header:
        raise RemoteProtocolError("delta header is not canonical")
    if header.version not in SUPPORTED_FORMATS:
        raise RemoteProtocolError(f"delta format {header.version} is not supported")
    if header.version < FORMAT_VERSION and header.auth is not None and header.auth.names_bundle:
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
    try:
        Ed25519PublicKey.from_public_bytes(header.author).verify(
            delta.signature, _signed_message(delta.header, delta.ciphertext)
        )
    except (InvalidSignature, ValueError):
        raise RemoteProtocolError("bad delta signature") from None
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
    wire: bytes, *, expected_id: bytes | None = None, max_size: int = MAX_DELTA_BYTES
) -> VerifiedDelta:
    """Decode and verify a delta off the wire (RemoteProtocolError if it is not one)."""
    delta = decode_delta(wire, max_size=max_size)
    return VerifiedDelta(delta, verify_delta(delta, expected_id=expected_id))


def open_delta(delta: SignedDelta, header: DeltaHeader, context_key: bytes) -> DeltaBody:
    """Decrypt and decode the body of a verified delta."""
    try:
        plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
            delta.ciphertext, delta.header, header.nonce, context_key
        )
    except CryptoError:
        raise RemoteProtocolError("delta body does not decrypt under that key") from None
    try:
        return _BODY_DECODER.decode(plain)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed delta body: {exc}") from None


def header_vv(header: DeltaHeader) -> dict[bytes, int]:
    return dict(header.vv)


def key_id_of(key: bytes) -> int:
    """A key's id: unique per key (so per rotation), and reveals nothing of the key."""
    return int.from_bytes(hashlib.sha256(b"trionode/key-id/v1" + key).digest()[:8], "big")


def stored_header(delta: SignedDelta) -> DeltaHeader:
    """The header of a delta this node verified before it stored it (no signature check:
    a restart re-reads thousands of them)."""
    try:
        return _HEADER_DECODER.decode(delta.header)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed delta header: {exc}") from None
