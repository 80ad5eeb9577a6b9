"""XChaCha20-Poly1305 decryption through libsodium's own binding, for the receive path.

Every member opens the body of every delta it receives. PyNaCl's wrapper
(`nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt`) checks its arguments by
formatting an error message for each check whether it fails or not, about twice the cost
of the decryption itself for a delta of a few hundred bytes (issue #16). This calls the
same libsodium function once, with the lengths checked here (libsodium trusts them).
"""

from __future__ import annotations

from typing import Final

from nacl._sodium import ffi, lib  # type: ignore[import-not-found,unused-ignore]

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 24
TAG_BYTES: Final = 16


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
