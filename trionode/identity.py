"""The node's identity: an Ed25519 key kept in `<home>/identity.key`.

The file holds the libp2p protobuf encoding of the private key (the format other libp2p
tools read), written with mode 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

import base58
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trionode.errors import ConfigError

_ED25519 = 1
_PRIVATE_PREFIX = bytes([0x08, _ED25519, 0x12, 64])  # KeyType=Ed25519, Data=<64 bytes>
_PUBLIC_PREFIX = bytes([0x08, _ED25519, 0x12, 32])


class NodeIdentity:
    """An Ed25519 keypair and the libp2p PeerId derived from it."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self.public_bytes = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @property
    def peer_id_bytes(self) -> bytes:
        # Identity multihash (code 0x00) of the protobuf public key: it is short enough to inline.
        encoded = _PUBLIC_PREFIX + self.public_bytes
        return bytes([0x00, len(encoded)]) + encoded

    @property
    def peer_id(self) -> str:
        return base58.b58encode(self.peer_id_bytes).decode("ascii")

    def to_file_bytes(self) -> bytes:
        seed = self.private_key.private_bytes_raw()
        return _PRIVATE_PREFIX + seed + self.public_bytes

    @classmethod
    def from_file_bytes(cls, data: bytes, *, source: str = "identity") -> NodeIdentity:
        if len(data) != len(_PRIVATE_PREFIX) + 64 or not data.startswith(_PRIVATE_PREFIX):
            raise ConfigError(f"{source}: not an Ed25519 libp2p private key")
        seed, public = data[4:36], data[36:68]
        identity = cls(Ed25519PrivateKey.from_private_bytes(seed))
        if identity.public_bytes != public:
            raise ConfigError(f"{source}: public key does not match the private key")
        return identity

    def save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.to_file_bytes())

    @classmethod
    def load(cls, path: Path) -> NodeIdentity:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{path} is missing (run `trionode init`)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.from_file_bytes(data, source=str(path))
