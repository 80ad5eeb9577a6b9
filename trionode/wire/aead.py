"""XChaCha20-Poly1305 through libsodium's own binding, for the hot paths.

Every member opens the body of every delta it receives, and seals the body of every delta
it writes. PyNaCl's wrappers (`nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt`,
`..._encrypt`) check their arguments by formatting an error message for each check whether
it fails or not, about twice the cost of the decryption itself for a delta of a few hundred
bytes, and three times that of the encryption (12.5 against 3.1 us for a 300-byte body,
issue #16). These call the same libsodium functions once, with the lengths checked here
(libsodium trusts them).
"""

from __future__ import annotations

from typing import Final

from nacl._sodium import ffi, lib  # type: ignore[import-not-found,unused-ignore]

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 24
TAG_BYTES: Final = 16


def seal_xchacha20poly1305(plain: bytes, associated_data: bytes, nonce: bytes, key: bytes) -> bytes:
    """`plain` encrypted under `key` and `nonce`, bound to `associated_data`, its 16-byte
    tag last (what PyNaCl's `crypto_aead_xchacha20poly1305_ietf_encrypt` returns).

    Raises:
        ValueError: a key or nonce of the wrong length.
    """
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError("XChaCha20-Poly1305 takes a 32-byte key and a 24-byte nonce")
    size = len(plain) + TAG_BYTES
    sealed = ffi.new("unsigned char[]", size)
    lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        sealed,
        ffi.NULL,
        plain,
        len(plain),
        associated_data,
        len(associated_data),
        ffi.NULL,
        nonce,
        key,
    )
    return bytes(ffi.buffer(sealed, size))


def open_xchacha20poly1305(
    ciphertext: bytes, associated_data: bytes, nonce: bytes, key: bytes
) -> bytes | None:
    """The plaintext of `ciphertext` (its tag last), or None if it does not authenticate
    under `key`, `nonce` and `associated_data` (or any length is wrong)."""
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
        return None
    size = len(ciphertext) - TAG_BYTES
    plain = ffi.new("unsigned char[]", size or 1)
    failed = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        plain,
        ffi.NULL,
        ffi.NULL,
        ciphertext,
        len(ciphertext),
        associated_data,
        len(associated_data),
        nonce,
        key,
    )
    if failed:
        return None
    return bytes(ffi.buffer(plain, size))
