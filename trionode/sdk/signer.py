"""App signer keys: the key file `trionode app keygen` writes and `trionode app sign` reads.

A signer key is an Ed25519 key pair; its public half, base58, is the **signer id** that
operators list in `apps.trusted_signers`. The key file is a small JSON document:

    {"format": "trionode/app-signer-key/v1", "signer": "<base58 public key>",
     "seed": "<base58 32-byte Ed25519 seed>"}

It is written with mode 0600 and never over an existing file unless asked to. Reading one
is bounded (`MAX_KEY_FILE` bytes) and checks that the seed really yields the public key it
names, so a key file that was edited by hand or truncated is refused with the reason
instead of signing bundles with a key nobody trusts.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

import base58
import msgspec

from trionode.errors import LocalProtocolError, TrionodeError
from trionode.wire.keys import PrivateKey

KEY_FORMAT: Final = "trionode/app-signer-key/v1"
MAX_KEY_FILE: Final = 4096


class SignerKeyError(TrionodeError):
    """A signer key file cannot be read, written or used; the message says why."""


class _KeyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    signer: str
    seed: str


def signer_id(key: PrivateKey) -> str:
    """The base58 public key that names this signer (what `apps.trusted_signers` lists)."""
    return str(base58.b58encode(key.public_key.data).decode("ascii"))


def encode_signer_key(key: PrivateKey) -> bytes:
    seed = base58.b58encode(key.seed).decode("ascii")
    document = _KeyFile(format=KEY_FORMAT, signer=signer_id(key), seed=seed)
    return msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"


def decode_signer_key(data: bytes, source: str = "signer key") -> PrivateKey:
    """Parse a key file's bytes.

    Raises:
        SignerKeyError: too large, not a v1 signer key, or a seed that does not match its
            signer.
    """
    if len(data) > MAX_KEY_FILE:
        raise SignerKeyError(f"{source}: {len(data)} bytes; a signer key file is under 4 KiB")
    try:
        document = msgspec.json.decode(data, type=_KeyFile)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise SignerKeyError(f"{source}: not a trionode signer key file ({exc})") from None
    if document.format != KEY_FORMAT:
        raise SignerKeyError(
            f"{source}: format {document.format[:64]!r} is not {KEY_FORMAT!r}"
            " (made by a newer trionode?)"
        )
    try:
        key = PrivateKey(base58.b58decode(document.seed[:64]))
    except (ValueError, LocalProtocolError):
        raise SignerKeyError(f"{source}: the seed is not a 32-byte base58 Ed25519 seed") from None
    if signer_id(key) != document.signer:
        raise SignerKeyError(f"{source}: the seed does not belong to signer {document.signer!r}")
    return key


def write_signer_key(path: Path, key: PrivateKey, *, force: bool = False) -> None:
    """Write a key file readable by its owner only.

    Raises:
        SignerKeyError: the file exists (and not `force`), or cannot be written.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SignerKeyError(f"{path} exists; pass --force to replace that key") from None
    except OSError as exc:
        raise SignerKeyError(f"{path}: cannot write: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        if force:  # an existing file keeps its mode through O_TRUNC
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), 0o600)
        f.write(encode_signer_key(key))


def read_signer_key(path: Path) -> PrivateKey:
    """Read a key file (bounded; see `decode_signer_key`).

    Raises:
        SignerKeyError: missing, unreadable, too large or invalid.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise SignerKeyError(f"{path}: cannot read the signer key: {exc.strerror}") from None
    return decode_signer_key(data, str(path))


__all__ = [
    "KEY_FORMAT",
    "MAX_KEY_FILE",
    "SignerKeyError",
    "decode_signer_key",
    "encode_signer_key",
    "read_signer_key",
    "signer_id",
    "write_signer_key",
]
