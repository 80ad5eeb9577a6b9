"""Causal deltas: the signed, encrypted unit of replication (DESIGN §6).

```
header     = {context_id, parents[], author, hlc, key_id, nonce}     (msgpack, canonical)
ciphertext = XChaCha20-Poly1305(context key, nonce, body, aad = header bytes)
signature  = Ed25519(author, "trionode/delta/v1" ‖ header ‖ ciphertext)
id         = SHA-256(header ‖ ciphertext ‖ signature)
```

Everything a receiver needs to check authenticity is outside the ciphertext, so a node can
verify (id, signature, author) before it even has the key, and a relay that is not a member
learns only the header. The body (entity records, app events and the author's root hash) is
encrypted, and bound to the header by the AEAD's associated data.

Decoders enforce sizes and shapes and raise RemoteProtocolError; nothing here trusts input.
"""

from __future__ import annotations

import hashlib
import os
from typing import Annotated, Final

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
_SIGNING_DOMAIN: Final = b"trionode/delta/v1"

Bytes32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Bytes24 = Annotated[bytes, msgspec.Meta(min_length=24, max_length=24)]
Bytes64 = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


class DeltaHeader(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    context_id: Bytes32
    parents: Annotated[list[Bytes32], msgspec.Meta(min_length=1, max_length=MAX_PARENTS)]
    author: Bytes32
    """The author's member public key (Ed25519)."""
    hlc: Annotated[int, msgspec.Meta(ge=0)]
    """The author's HLC time (NTP64); the writer id is `author`."""
    key_id: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
    """Which context key encrypted the body (keys rotate when members leave)."""
    nonce: Bytes24


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


class SignedDelta(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What travels: the header bytes exactly as signed, the ciphertext and the signature."""

    header: bytes
    ciphertext: bytes
    signature: Bytes64

    @property
    def id(self) -> bytes:
        return delta_id(self)

    def encode(self) -> bytes:
        return _ENCODER.encode(self)


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
) -> SignedDelta:
    """Encrypt and sign a body as a new delta."""
    author_public = author.public_key().public_bytes_raw()
    header = DeltaHeader(
        context_id=context_id,
        parents=sorted(parents),
        author=author_public,
        hlc=hlc,
        key_id=key_id,
        nonce=os.urandom(24),
    )
    header_bytes = _ENCODER.encode(header)
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(
        _ENCODER.encode(body), header_bytes, header.nonce, context_key
    )
    signature = author.sign(_signed_message(header_bytes, ciphertext))
    return SignedDelta(header=header_bytes, ciphertext=ciphertext, signature=signature)


def decode_delta(
    data: bytes | bytearray | memoryview, *, max_size: int = MAX_DELTA_BYTES
) -> SignedDelta:
    """Parse a delta off the wire (no signature check yet)."""
    if len(data) > max_size:
        raise RemoteProtocolError(f"delta of {len(data)} bytes exceeds {max_size}")
    try:
        return _SIGNED_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed delta: {exc}") from None


def verify_delta(delta: SignedDelta, *, expected_id: bytes | None = None) -> DeltaHeader:
    """Check the id (if the sender named one) and the author's signature; return the header.

    Membership and write rights are the caller's to check: they depend on context state.
    """
    if expected_id is not None and delta_id(delta) != expected_id:
        raise RemoteProtocolError("delta id does not match its contents")
    try:
        header = _HEADER_DECODER.decode(delta.header)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed delta header: {exc}") from None
    if _ENCODER.encode(header) != delta.header:
        raise RemoteProtocolError("delta header is not canonical")
    if header.hlc >= 1 << 64:
        raise RemoteProtocolError("delta hlc out of range")
    if header.parents != sorted(set(header.parents)):
        raise RemoteProtocolError("delta parents must be sorted and distinct")
    try:
        Ed25519PublicKey.from_public_bytes(header.author).verify(
            delta.signature, _signed_message(delta.header, delta.ciphertext)
        )
    except (InvalidSignature, ValueError):
        raise RemoteProtocolError("bad delta signature") from None
    return header


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
