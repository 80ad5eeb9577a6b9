"""Async Python client for a trionode's HTTP API (the CLI uses it too)."""

import sys

# httpx imports its own command-line client (click, rich, pygments) whenever those happen to
# be installed: a quarter of every client command's import time (0.12 of 0.48 s CPU). We
# never run it, and httpx falls back to a stub when it cannot be imported.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from trionode.client.http import (  # noqa: E402 (after the line above)
    ApiError,
    Client,
    open_blocking_client,
    open_client,
    run_blocking,
)

__all__ = ["ApiError", "Client", "open_blocking_client", "open_client", "run_blocking"]
