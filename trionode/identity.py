"""The node's identity: an Ed25519 key kept in `<home>/identity.key`.

The file holds the libp2p protobuf encoding of the private key (the format other libp2p
tools read), written with mode 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

from trionode.errors import ConfigError, ProtocolError
from trionode.wire.keys import PeerId, PrivateKey


class NodeIdentity:
    """An Ed25519 keypair and the libp2p PeerId derived from it."""

    def __init__(self, key: PrivateKey) -> None:
        self.key = key
        self.peer_id_obj: PeerId = key.peer_id()

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(PrivateKey.generate())

    @property
    def peer_id(self) -> str:
        return str(self.peer_id_obj)

    def save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key.to_protobuf())

    @classmethod
    def load(cls, path: Path) -> NodeIdentity:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{path} is missing (run `trionode init`)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            return cls(PrivateKey.from_protobuf(data))
        except ProtocolError as exc:
            raise ConfigError(f"{path}: not a usable identity key: {exc}") from None
