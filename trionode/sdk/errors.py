"""Errors of the app SDK: what a call can fail with, and how each maps to JSON-RPC.

Every error a method call can end with is an `AppError`: it carries a JSON-RPC `code`, a
`message` a user can act on and optional JSON `data`. `to_jsonrpc()` gives the JSON-RPC
error object; its `data` is always `{"type": <error class name>, "detail": <data>}` so a
client can tell an app's own `NotFound` from a runtime error without parsing messages.

Codes (JSON-RPC reserves -32768..-32000; -32001..-32009 are left to the context layer for
errors it raises before an app runs, such as an unknown context):

| code   | error                 | meaning                                                   |
|--------|-----------------------|-----------------------------------------------------------|
| -32601 | MethodNotFoundError   | the app has no such method or view                        |
| -32602 | InvalidParamsError    | arguments are not JSON or do not match the type hints     |
| -32000 | AppError              | the app raised an error of its own (apps may pick codes)  |
| -32010 | ViewWriteError        | a view tried to write or emit                             |
| -32011 | ReadOnlyCallError     | a call made read-only (read-only member) tried to write   |
| -32012 | MethodFailedError     | the app raised an unexpected exception (a bug in the app) |
| -32013 | ResultError           | the return value cannot be encoded as JSON                |
| -32014 | EventError            | an emitted event is not an event, or exceeds the limits   |
| -32015 | StateSchemaError      | stored state does not decode as the app's declared types  |
| -32016 | AlreadyInitializedError | `init` on a context that already has state              |
| -32017 | BlobNotAvailableError | a blob read before the blob is here (being fetched)       |
| -32018 | UnknownBlobError      | `attach_blob` of a blob not stored here for this context  |
| -32019 | BlobReadError         | a blob read over the per-call limits or past the end      |

(The blob errors live in `trionode.sdk.blobs`.)

Apps raise `AppError` (or subclasses with their own `code`, preferably outside the reserved
range) to fail a call deliberately; like every error, it discards the call's writes.

Errors in *defining* an app (a bad decorator use, an unsupported annotation) are
`AppDefinitionError`; using the call-only API (`app.emit`, `app.executor`, …) outside a
call is `NotInCallError`. Neither reaches a JSON-RPC client.
"""

from __future__ import annotations

from typing import Any

from trionode.errors import TrionodeError


class AppError(TrionodeError):
    """A call failed; maps to a JSON-RPC error object.

    Args:
        message: what went wrong, for a user.
        data: optional JSON-able detail (e.g. the missing key).
        code: override the class's JSON-RPC code.
    """

    code: int = -32000
    """The JSON-RPC error code (subclasses set their own; an instance may override it)."""

    def __init__(self, message: str, data: Any = None, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data
        if code is not None:
            self.code = code

    @property
    def kind(self) -> str:
        """The error's type name, as shown to clients (`data.type`)."""
        return type(self).__name__

    def to_jsonrpc(self) -> dict[str, Any]:
        """The JSON-RPC 2.0 error object."""
        return {
            "code": self.code,
            "message": self.message,
            "data": {"type": self.kind, "detail": self.data},
        }

    def __repr__(self) -> str:
        return f"{self.kind}({self.code}, {self.message!r}, {self.data!r})"


class MethodNotFoundError(AppError):
    code = -32601


class InvalidParamsError(AppError):
    """Arguments do not match the method; `data` names the parameter when there is one."""

    code = -32602

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, {"param": param} if param is not None else None)
        self.param = param


class ViewWriteError(AppError):
    code = -32010


class ReadOnlyCallError(AppError):
    code = -32011


class MethodFailedError(AppError):
    """The app raised something that is not an `AppError`; the cause is chained."""

    code = -32012


class ResultError(AppError):
    code = -32013


class EventError(AppError):
    code = -32014


class StateSchemaError(AppError):
    code = -32015


class AlreadyInitializedError(AppError):
    code = -32016


class AppDefinitionError(TrionodeError, TypeError):
    """The app is defined wrongly (raised while decorating or checking it, never in a call)."""


class NotInCallError(TrionodeError, RuntimeError):
    """`app.emit`, `app.executor()` and friends only work while the runtime runs a call."""


__all__ = [
    "AlreadyInitializedError",
    "AppDefinitionError",
    "AppError",
    "EventError",
    "InvalidParamsError",
    "MethodFailedError",
    "MethodNotFoundError",
    "NotInCallError",
    "ReadOnlyCallError",
    "ResultError",
    "StateSchemaError",
    "ViewWriteError",
]
