"""Encryption at rest: values sealed with XChaCha20-Poly1305 under an Argon2id-derived key.

Keys stay plaintext so prefix and range scans keep working; each value is bound to its
column and key through the AEAD's associated data, so a sealed value moved to another key
(by corruption or by someone editing the file) fails to open instead of being misread.

A *verifier* record (salt, KDF parameters and a sealed known plaintext) is written when an
encrypted store is created. Opening checks the passphrase against it before anything else
happens, so a wrong passphrase is a clear error and the store is left untouched.
"""

from __future__ import annotations

import hashlib
import os
from typing import Final

import msgspec
from argon2.low_level import Type, hash_secret_raw
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from trionode.errors import StorageError, WrongPassphraseError

NONCE_SIZE: Final = 24
KEY_SIZE: Final = 32
_VERIFIER_PLAINTEXT: Final = b"trionode encrypted datastore v1"
_VERIFIER_AAD: Final = b"trionode/verifier"


class KdfParams(msgspec.Struct, frozen=True):
    """Argon2id cost parameters, stored with the verifier so they can change later."""

    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 1


class Verifier(msgspec.Struct, frozen=True):
    version: int
    salt: bytes
    kdf: KdfParams
    sealed: bytes


def derive_key(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    return hash_secret_raw(
        passphrase.encode("utf-8"),
        salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=KEY_SIZE,
        type=Type.ID,
    )


class ValueCipher:
    """Seals and opens datastore values; bound to (column, key) by associated data."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("value cipher key must be 32 bytes")
        self._key = key

    def subkey(self, purpose: str) -> bytes:
        """An independent 32-byte key for another use of the same secret (e.g. blob chunk
        files), so no two uses ever share a key."""
        return hashlib.blake2b(purpose.encode(), key=self._key, digest_size=KEY_SIZE).digest()

    @staticmethod
    def _aad(column: str, key: bytes) -> bytes:
        return column.encode() + b"\x00" + key

    def seal(self, column: str, key: bytes, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
            value, self._aad(column, key), nonce, self._key
        )
        return nonce + sealed

    def open(self, column: str, key: bytes, stored: bytes) -> bytes:
        if len(stored) < NONCE_SIZE + 16:
            raise StorageError(f"sealed value in {column!r} is truncated")
        try:
            return crypto_aead_xchacha20poly1305_ietf_decrypt(
                stored[NONCE_SIZE:], self._aad(column, key), stored[:NONCE_SIZE], self._key
            )
        except CryptoError:
            raise StorageError(f"sealed value in {column!r} failed authentication") from None


def create_verifier(passphrase: str, params: KdfParams) -> tuple[ValueCipher, bytes]:
    """Make a new key and the verifier record that proves the passphrase later."""
    salt = os.urandom(16)
    key = derive_key(passphrase, salt, params)
    nonce = os.urandom(NONCE_SIZE)
    sealed = nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(
        _VERIFIER_PLAINTEXT, _VERIFIER_AAD, nonce, key
    )
    record = Verifier(version=1, salt=salt, kdf=params, sealed=sealed)
    return ValueCipher(key), msgspec.msgpack.encode(record)


def open_verifier(passphrase: str, record: bytes) -> ValueCipher:
    """Check the passphrase against a stored verifier; WrongPassphraseError if it fails."""
    try:
        verifier = msgspec.msgpack.decode(record, type=Verifier)
    except msgspec.DecodeError:
        raise StorageError("the datastore's encryption verifier is corrupt") from None
    if verifier.version != 1:
        raise StorageError(f"unsupported encryption verifier version {verifier.version}")
    key = derive_key(passphrase, verifier.salt, verifier.kdf)
    sealed = verifier.sealed
    try:
        plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[NONCE_SIZE:], _VERIFIER_AAD, sealed[:NONCE_SIZE], key
        )
    except CryptoError:
        raise WrongPassphraseError(
            "wrong passphrase: $TRIONODE_PASSPHRASE does not open this datastore"
        ) from None
    if plain != _VERIFIER_PLAINTEXT:
        raise WrongPassphraseError("wrong passphrase: verifier mismatch")
    return ValueCipher(key)
