"""The one place the context layer's typed errors become HTTP statuses and JSON-RPC codes."""

from __future__ import annotations

from typing import Final

from trionode.context.errors import (
    AlreadyExists,
    ContextBroken,
    ContextError,
    ContextNotFound,
    DeltaTooLarge,
    FinalityBehind,
    MissingPrerequisite,
    NotPermitted,
    PeerFailed,
    WaitingForApp,
)

JSONRPC_CONTEXT_NOT_FOUND: Final = -32001
JSONRPC_FORBIDDEN: Final = -32002
JSONRPC_WAITING_FOR_APP: Final = -32004
JSONRPC_DELTA_TOO_LARGE: Final = -32005
JSONRPC_FINALITY_BEHIND: Final = -32006

_STATUSES: Final[tuple[tuple[type[ContextError], int], ...]] = (
    (ContextNotFound, 404),
    (NotPermitted, 403),
    (AlreadyExists, 409),
    (MissingPrerequisite, 412),
    (PeerFailed, 502),
    (ContextBroken, 500),
    (WaitingForApp, 503),
    (DeltaTooLarge, 413),
    (FinalityBehind, 503),
)


def http_status(exc: ContextError) -> int:
    """The HTTP status for `exc` (400: the request itself cannot be served)."""
    for kind, status in _STATUSES:
        if isinstance(exc, kind):
            return status
    return 400


def jsonrpc_code(exc: ContextError) -> int:
    """The JSON-RPC error code for a call refused by the context layer."""
    if isinstance(exc, WaitingForApp):
        return JSONRPC_WAITING_FOR_APP
    if isinstance(exc, DeltaTooLarge):
        return JSONRPC_DELTA_TOO_LARGE
    if isinstance(exc, FinalityBehind):
        return JSONRPC_FINALITY_BEHIND
    return JSONRPC_CONTEXT_NOT_FOUND if isinstance(exc, ContextNotFound) else JSONRPC_FORBIDDEN
