"""Ed25519 signing and verification through libsodium (PyNaCl), for the hot paths.

Every delta is signed once and verified by every member that receives it, and every gossip
message is signed (StrictSign) and verified by every peer it reaches (issue #16). On our
machines libsodium verifies a signature in about half the time OpenSSL (the `cryptography`
package) takes, and signs in about three quarters of it. Ed25519 signatures are
deterministic (RFC 8032): both libraries sign the same bytes.

libsodium's verification is the stricter of the two: besides a non-canonical `S` it
refuses public keys and `R` points of small order, which honest key generation never
yields. Keys are still generated and stored as `cryptography` keys; `sign` takes the
32-byte seed such a key holds.
"""

from __future__ import annotations

from typing import Final

from nacl._sodium import ffi, lib  # type: ignore[import-not-found,unused-ignore]
from nacl.bindings import crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError

PUBLIC_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
_SECRET_KEY_BYTES: Final = 64
_SECRETS_KEPT: Final = 256
"""Expanded secret keys `sign` remembers (expanding one costs as much as a signature)."""
_secrets: dict[bytes, bytes] = {}


def secret_key(seed: bytes) -> bytes:
    """libsodium's 64-byte secret key for a 32-byte seed."""
    _, secret = crypto_sign_seed_keypair(seed)
    return bytes(secret)


def sign(seed: bytes, message: bytes) -> bytes:
    """The Ed25519 signature of `message` by the key whose seed is `seed` (64 bytes)."""
    secret = _secrets.get(seed)
    if secret is None:
        if len(_secrets) >= _SECRETS_KEPT:
            _secrets.clear()
        secret = _secrets[seed] = secret_key(seed)
    return sign_with(secret, message)


def sign_with(secret: bytes, message: bytes) -> bytes:
    """`sign` with an expanded secret key (`secret_key`).

    libsodium's `crypto_sign` called directly (as `trionode.wire.aead` calls its AEAD):
    PyNaCl's wrapper copies the whole signed message out, of which only the first 64
    bytes (the signature) are wanted, and checks the result through a call (every delta
    and gossip message signed, issue #16).

    Raises:
        ValueError: a secret key that is not 64 bytes.
    """
    if len(secret) != _SECRET_KEY_BYTES:
        raise ValueError("an Ed25519 secret key is 64 bytes")
    size = len(message)
    signed = ffi.new("unsigned char[]", size + SIGNATURE_BYTES)
    if lib.crypto_sign(signed, ffi.NULL, message, size, secret) != 0:
        raise RuntimeError("libsodium could not sign")
    return bytes(ffi.buffer(signed, SIGNATURE_BYTES))


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is `public_key`'s valid signature of `message` (False for
    anything malformed: wrong lengths, a key that is no curve point, small order)."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        crypto_sign_open(bytes(signature) + bytes(message), bytes(public_key))
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True
