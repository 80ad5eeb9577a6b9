"""Errors raised by the CRDT layer (all derive from TrionodeError).

Bad bytes from a peer are not here: decoders raise `trionode.errors.RemoteProtocolError`.
`ClockDriftError` lives next to the clock in `hlc.py`.
"""

from __future__ import annotations

from trionode.errors import TrionodeError


class TransactionError(TrionodeError):
    """A transaction was used wrongly: written while read-only, used after commit/abort, or
    committed after another local transaction changed the same tree."""


class SchemaError(TrionodeError):
    """Replicated state does not match the type the reader declared (e.g. a register holds
    bytes that do not decode as the handle's value type)."""
