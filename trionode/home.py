"""The node's home directory: created by `trionode init`, read by `start` and the CLI."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import attrs

from trionode.config import (
    ApiSection,
    FileConfig,
    NetworkSection,
    render_config,
)
from trionode.errors import ConfigError, HomeLockedError
from trionode.identity import NodeIdentity
from trionode.layout import CONFIG_FILE, IDENTITY_FILE, LOCK_FILE, TOKEN_FILE


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


@contextlib.contextmanager
def lock_home(home: Path) -> Iterator[None]:
    """Hold `<home>/node.lock` for the block, or raise HomeLockedError naming the holder.

    `flock` locks belong to the open file: the kernel drops them when the holder exits, even
    by kill -9, so a crashed node never leaves a stale lock behind. The pid written into the
    file is only for the message; the lock itself is the truth. The file is opened without
    truncation so a refused second node does not erase the first one's pid.
    """
    path = home / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise ConfigError(f"{home} does not exist (run `trionode init --home {home}`)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise HomeLockedError(home, int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
