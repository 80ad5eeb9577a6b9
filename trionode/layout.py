"""What is where in a node home, and the lock that gives a home to one running node.

This module imports only the standard library: client commands (`trionode call`, …) read
the API URL and token from the home through it without loading the node (Quart, Hypercorn,
crypto), which would triple their start-up time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from trionode.errors import ConfigError, HomeLockedError

CONFIG_FILE: Final = "config.toml"
IDENTITY_FILE: Final = "identity.key"
TOKEN_FILE: Final = "api-token"  # noqa: S105 - a file name
DATA_DIR: Final = "data"
API_URL_FILE: Final = "api.url"
"""Written by a running node with the API's real URL (the port may have been 0)."""
LOCK_FILE: Final = "node.lock"
"""Locked (flock) by the running node; holds its pid for the `already running` message."""
DEFAULT_HOME: Final = ".trionode"
HOME_ENV: Final = "TRIONODE_HOME"
"""Environment variable naming the home when `--home` is not given."""
DEFAULT_SWARM_PORT: Final = 2428
DEFAULT_SERVER_PORT: Final = 2528


def default_home(env: dict[str, str] | None = None) -> str:
    """`$TRIONODE_HOME` if set and not empty, else `.trionode`."""
    return (os.environ if env is None else env).get(HOME_ENV) or DEFAULT_HOME


def read_token(home: Path) -> str:
    path = home / TOKEN_FILE
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: pass --token or --home of an initialised node"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def read_api_url(home: Path) -> str | None:
    try:
        return (home / API_URL_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{home / API_URL_FILE}: cannot read: {exc.strerror}") from None


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
