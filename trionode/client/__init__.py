"""Async Python client for a trionode's HTTP API (the CLI uses it too)."""

from trionode.client.http import (
    ApiError,
    Client,
    open_blocking_client,
    open_client,
    run_blocking,
)

__all__ = ["ApiError", "Client", "open_blocking_client", "open_client", "run_blocking"]
