"""Why a request about a context cannot be served, as types.

The context layer raises these; only `trionode/api/` turns them into HTTP statuses and
JSON-RPC codes (`trionode/api/context_errors.py`), so no domain code knows about HTTP.
A plain `ContextError` is a bad request: the caller asked for something that cannot be.
"""

from __future__ import annotations

from trionode.errors import TrionodeError


class ContextError(TrionodeError):
    """A request about a context cannot be served as asked (bad input, by default)."""


class ContextNotFound(ContextError):
    """What was asked for (a context, a member, an application) does not exist here."""


class NotPermitted(ContextError):
    """The acting member (or peer) lacks the role the request needs."""


class AlreadyExists(ContextError):
    """The request would create something that already exists (a membership, a snapshot
    already being taken)."""


class MissingPrerequisite(ContextError):
    """The request needs something this node does not have yet (the context's
    application installed, a peer it trusts to serve a snapshot)."""


class PeerFailed(ContextError):
    """A peer the request depended on could not be reached or refused."""


class ContextBroken(ContextError):
    """This node's own data for the request is missing or unusable (not the caller's
    fault: an operator has to look)."""


class WaitingForApp(ContextError):
    """The context moved to an app this node does not have yet (an upgrade it is still
    fetching, or may not run): calls are refused until it is installed, views of the
    state so far keep running on the version this node has (`context/app_upgrades.py`)."""


class DeltaTooLarge(ContextError):
    """A call changed so much that its delta would be larger than a delta may be
    (`replication.max_delta_bytes`): nothing was written."""


class FinalityBehind(ContextError):
    """The context's undo log (its non-final deltas) is over `auth.max_nonfinal_bytes`: it
    takes no new writes until the admins' acknowledgements make older deltas final. Not
    the caller's fault, and temporary: retry later (or remove an admin that is gone)."""
