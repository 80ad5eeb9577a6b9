"""Async Python client for a trionode's HTTP API (the CLI uses it too)."""

from trionode.client.http import ApiError, Client, open_client

__all__ = ["ApiError", "Client", "open_client"]
