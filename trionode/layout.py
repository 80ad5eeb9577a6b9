"""What is where in a node home.

This module imports only `os` (loaded with the interpreter) and `trionode.errors`: client
commands (`trionode call`, …) read the API URL and token from the home through it without
loading the node (Quart, Hypercorn, crypto), which would triple their start-up time, and an
early `context join` (trionode/cli_early.py) reads them before anything else loads, so not
even `pathlib` or `typing` (~7 ms of its start): a home may be any path, `str` or `Path`.
The lock that gives a home to one running node is the node's (`trionode.home.lock_home`).
"""

from __future__ import annotations

import os

from trionode.errors import ConfigError

TYPE_CHECKING = False  # (`typing` is not loaded for this: module doc)
if TYPE_CHECKING:
    from typing import Final

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


def read_token(home: str | os.PathLike[str]) -> str:
    path = os.path.join(home, TOKEN_FILE)
    try:
        return _read_text(path).strip()
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: pass --token or --home of an initialised node"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def read_api_url(home: str | os.PathLike[str]) -> str | None:
    path = os.path.join(home, API_URL_FILE)
    try:
        return _read_text(path).strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()
