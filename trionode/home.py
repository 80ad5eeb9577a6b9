"""The node's home directory: created by `trionode init`, read by `start` and the CLI."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

import attrs

from trionode.config import (
    ApiSection,
    FileConfig,
    NetworkSection,
    render_config,
)
from trionode.errors import ConfigError
from trionode.identity import NodeIdentity
from trionode.layout import CONFIG_FILE, IDENTITY_FILE, TOKEN_FILE


@attrs.frozen
class InitResult:
    home: Path
    peer_id: str
    token: str


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_home(
    home: Path,
    *,
    swarm_port: int,
    server_port: int,
    swarm_host: str = "0.0.0.0",  # noqa: S104 - peers must reach the swarm port
    force: bool = False,
    mdns: bool = True,
) -> InitResult:
    """Create identity, config and API token. An existing home is kept unless `force`."""
    for name, port in (("--swarm-port", swarm_port), ("--server-port", server_port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name}: {port} is not a port number (0-65535)")
    if home.exists() and any(home.iterdir()):
        if not force:
            raise ConfigError(f"{home} already holds a node home; use --force to replace it")
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    identity = NodeIdentity.generate()
    identity.save(home / IDENTITY_FILE)
    token = secrets.token_urlsafe(32)
    _write_private(home / TOKEN_FILE, token.encode() + b"\n")
    file = FileConfig(
        network=NetworkSection(listen=[f"/ip4/{swarm_host}/tcp/{swarm_port}"], mdns=mdns),
        api=ApiSection(port=server_port, token_sha256=hashlib.sha256(token.encode()).hexdigest()),
    )
    (home / CONFIG_FILE).write_text(render_config(file), encoding="utf-8")
    return InitResult(home=home, peer_id=identity.peer_id, token=token)
