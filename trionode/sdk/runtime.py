"""Running app calls against a context's `StateTree`: the entry points the context layer uses.

    outcome = execute(app, tree, clock, physical_now, "set", b'{"key":"k","value":"v"}',
                      executor=member_key, context_id=context_id, writable=True)
    outcome.result_json      # b'null'
    outcome.delta_records    # list[Entity]: Transaction.commit() -> ship in one causal delta
    outcome.events           # [EmittedEvent("Inserted", b'{"key":"k","value":"v"}')]

A method runs in a copy-on-write `Transaction` (`tree.begin(clock, physical_now)`); if it
returns normally, its result is encoded and the transaction committed: the tree then holds
the changes and `delta_records` are exactly the delta-states to persist and broadcast. On
any error the transaction is aborted — the tree is untouched and no events are reported —
and an `AppError` subclass is raised (see `trionode.sdk.errors` for codes). Views, and
methods called with `writable=False`, run in a read-only transaction: they never tick the
clock and never produce records.

Calls are synchronous and pure (no I/O): the caller holds the context's lock, runs one call
at a time per tree, and persists the records. `physical_now` is NTP64 wall-clock time (e.g.
`ntp64_from_unix_ns(time.time_ns())`); the clock's node id is the writer id stamped into
every record. A `TransactionError` from the commit (another local transaction committed to
the same tree meanwhile) is a caller bug and propagates unchanged.
"""

from __future__ import annotations

from typing import Any, Final, NoReturn, cast

import msgspec

from trionode.crdt import (
    Entity,
    EntityPath,
    HybridClock,
    SchemaError,
    StateTree,
    Timestamp,
    Transaction,
    TransactionError,
)
from trionode.crdt.entity import Body
from trionode.sdk.app import CURRENT_CALL, App, CallState, EmittedEvent, EntryKind, EntryPoint
from trionode.sdk.blobs import check_access_done
from trionode.sdk.errors import (
    AlreadyInitializedError,
    AppError,
    InvalidParamsError,
    MethodFailedError,
    MethodNotFoundError,
    ReadOnlyCallError,
    ResultError,
    StateSchemaError,
    ViewWriteError,
)

_encode_json: Final = msgspec.json.encode

MAX_ARGS_BYTES: Final = 10 * 1024 * 1024
"""Largest JSON argument document accepted (the reference's limit)."""
MAX_METHOD_NAME: Final = 256
ID_BYTES: Final = 32


class CallOutcome(msgspec.Struct, frozen=True):
    """What a successful call produced. (A struct, not an attrs class: one is made per
    call, by msgspec's constructor rather than a generated Python `__init__`.)"""

    result_json: bytes
    """The return value as JSON (`null` for None)."""
    delta_records: list[Entity]
    """The delta-states to persist and ship (sorted by entity id); empty for read-only calls."""
    events: list[EmittedEvent]
    """Events in emission order: (type name, JSON payload)."""

    @property
    def result(self) -> Any:
        """The return value decoded from JSON."""
        return msgspec.json.decode(self.result_json)

    @property
    def wrote(self) -> bool:
        return bool(self.delta_records)


class _ReadOnlyTransaction(Transaction):
    """A reader whose write attempts fail with the call's typed error *and* are remembered,
    so a view that catches the error still fails (and the traceback points at the write)."""

    __slots__ = ("call",)

    def __init__(self, tree: StateTree) -> None:
        super().__init__(tree, None, 0)
        self.call: CallState | None = None

    def _refuse(self) -> NoReturn:
        if self.call is not None:
            self.call.forbid_side_effects("write state")
        raise TransactionError("read-only transaction")

    def stamp(self) -> NoReturn:
        self._refuse()

    def write(
        self, path: EntityPath, body: Body | None = None, *, stamp: Timestamp | None = None
    ) -> NoReturn:
        self._refuse()

    def remove(self, path: EntityPath) -> NoReturn:
        self._refuse()


def execute(  # noqa: PLR0917  # the context layer's call signature, kept flat on purpose
    app: App,
    tree: StateTree,
    clock: HybridClock,
    physical_now: int,
    method: str,
    args_json: bytes | str | None,
    *,
    executor: bytes,
    context_id: bytes,
    writable: bool = True,
) -> CallOutcome:
    """Run the method or view `method` with JSON arguments.

    Args:
        writable: False when the executor may not write (a read-only member): methods then
            run read-only and any write fails with `ReadOnlyCallError`.

    Raises:
        MethodNotFoundError: no such method or view (handlers and the init hook are not
            callable here: see `run_handler` and `init_state`).
        InvalidParamsError: bad arguments; the message names the parameter.
        AppError: the app failed the call (its own error, `MethodFailedError` for an
            unexpected exception, `ViewWriteError`, `ResultError`, `EventError`, …).
    """
    entry = _lookup(app, method)
    if entry.kind is EntryKind.HANDLER:
        raise MethodNotFoundError(
            f"`{method}` is an event handler of {app.name}: it runs when "
            f"{' / '.join(entry.events)} events arrive from other nodes, not on request",
            {"method": method},
        )
    return _run(
        app,
        entry,
        tree=tree,
        clock=clock,
        physical_now=physical_now,
        args_json=args_json,
        executor=executor,
        context_id=context_id,
        writable=writable,
    )


def run_handler(  # noqa: PLR0917  # mirrors execute()
    app: App,
    tree: StateTree,
    clock: HybridClock,
    physical_now: int,
    handler: str,
    payload_json: bytes | str,
    *,
    executor: bytes,
    context_id: bytes,
    writable: bool = True,
) -> CallOutcome:
    """Run the event handler `handler` with an event's JSON payload, as a method call of
    `executor` (the receiving node's own member). Its writes and events form a new delta.

    Use `app.handlers_for(event.name)` to find the handlers of a received event.

    Raises:
        MethodNotFoundError: `handler` is not an event handler of this app.
        InvalidParamsError: the payload does not fit the handler's parameters.
        AppError: as for `execute`.
    """
    entry = _lookup(app, handler)
    if entry.kind is not EntryKind.HANDLER:
        raise MethodNotFoundError(
            f"`{handler}` is not an event handler of {app.name}", {"method": handler}
        )
    return _run(
        app,
        entry,
        tree=tree,
        clock=clock,
        physical_now=physical_now,
        args_json=payload_json,
        executor=executor,
        context_id=context_id,
        writable=writable,
    )


def init_state(
    app: App,
    tree: StateTree,
    clock: HybridClock,
    physical_now: int,
    args_json: bytes | str | None = None,
    *,
    executor: bytes,
    context_id: bytes,
) -> CallOutcome:
    """Run the app's `@app.init` hook on a new, empty context state.

    An app without an init hook takes no arguments and starts with empty collections
    (the outcome then has no records).

    Raises:
        AlreadyInitializedError: the tree already holds state.
        InvalidParamsError, AppError: as for `execute`.
    """
    if len(tree):
        raise AlreadyInitializedError(
            f"the context of {app.name} already has state; init runs only at creation"
        )
    entry = app.init_entry
    if entry is None:
        data = args_json.encode() if isinstance(args_json, str) else (args_json or b"")
        if data.strip() not in (b"", b"null", b"{}"):
            raise InvalidParamsError(f"{app.name} has no init hook; it takes no arguments")
        return CallOutcome(b"null", [], [])
    return _run(
        app,
        entry,
        tree=tree,
        clock=clock,
        physical_now=physical_now,
        args_json=args_json,
        executor=executor,
        context_id=context_id,
        writable=True,
    )


def run_migrate(
    app: App,
    tree: StateTree,
    clock: HybridClock,
    physical_now: int,
    *,
    from_version: str,
    executor: bytes,
    context_id: bytes,
) -> CallOutcome | None:
    """Run the app's `@app.migrate` hook on a context upgraded to it (None: it has none).

    Raises:
        AppError: as for `execute` (the upgrade itself stays: the admin can fix the data
            with methods).
    """
    entry = app.migrate_entry
    if entry is None:
        return None
    takes_version = any(p.name == "from_version" for p in entry.params)
    return _run(
        app,
        entry,
        tree=tree,
        clock=clock,
        physical_now=physical_now,
        args_json=msgspec.json.encode({"from_version": from_version}) if takes_version else None,
        executor=executor,
        context_id=context_id,
        writable=True,
    )


def _lookup(app: App, method: str) -> EntryPoint:
    if not method or len(method) > MAX_METHOD_NAME:
        raise MethodNotFoundError(f"invalid method name {method[:64]!r}")
    entry = app.entry(method)
    if entry is None:
        init = app.init_entry
        hint = (
            f"; `{method}` is the init hook, run once at context creation"
            if init is not None and init.name == method
            else ""
        )
        raise MethodNotFoundError(
            f"{app.name} has no method or view `{method}`{hint}", {"method": method}
        )
    return entry


def _run(
    app: App,
    entry: EntryPoint,
    *,
    tree: StateTree,
    clock: HybridClock,
    physical_now: int,
    args_json: bytes | str | None,
    executor: bytes,
    context_id: bytes,
    writable: bool,
) -> CallOutcome:
    if len(executor) != ID_BYTES or len(context_id) != ID_BYTES:
        raise ValueError("executor and context_id must be 32-byte ids")
    size = len(args_json) if args_json is not None else 0
    if size > MAX_ARGS_BYTES:
        raise InvalidParamsError(
            f"`{entry.name}`: arguments are {size} bytes (limit {MAX_ARGS_BYTES})"
        )
    kwargs = entry.bind(args_json)
    read_only = entry.kind is EntryKind.VIEW or not writable
    tx = _ReadOnlyTransaction(tree) if read_only else tree.begin(clock, physical_now)
    try:
        call = CallState(app, entry, tx, bytes(executor), bytes(context_id), physical_now, [])
        if read_only:
            cast("_ReadOnlyTransaction", tx).call = call
        token = CURRENT_CALL.set(call)
        try:
            result = _invoke(app, entry, app.bind_state(tx), kwargs, call)
        finally:
            CURRENT_CALL.reset(token)
        try:  # (`_encode_result`'s work, inline: per call)
            result_json = _encode_json(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _not_json(entry, result, exc) from exc
        if read_only:
            tx.abort()
            records: list[Entity] = []
        else:
            records = tx.commit()
    except BaseException:
        if not tx.closed:
            tx.abort()
        raise
    return CallOutcome(result_json, records, list(call.events))


def _invoke(
    app: App, entry: EntryPoint, state: Any, kwargs: dict[str, Any], call: CallState
) -> Any:
    """Call the app function, turning whatever it raises into an `AppError`."""
    try:
        result = entry.fn(state, **kwargs)
    except AppError:
        check_access_done()  # a blob load the app swallowed comes first: it reruns the call
        raise
    except TransactionError as exc:
        if not call.tx.writable:
            _raise_violation(entry, "write state", exc)
        raise _failed(app, entry, exc) from exc
    except SchemaError as exc:
        raise StateSchemaError(
            f"`{entry.name}`: the stored state does not match {app.name}'s types: {exc}"
        ) from exc
    except Exception as exc:
        check_access_done()
        raise _failed(app, entry, exc) from exc
    check_access_done()
    if call.violation is not None:  # the app caught the error and carried on
        _raise_violation(entry, "write state or emit events", None)
    return result


def _raise_violation(entry: EntryPoint, action: str, cause: BaseException | None) -> None:
    if entry.kind is EntryKind.VIEW:
        raise ViewWriteError(
            f"view `{entry.name}` tried to {action}; views are read-only (make it an @app.method)",
            {"method": entry.name},
        ) from cause
    raise ReadOnlyCallError(
        f"`{entry.name}` tried to {action}, but this call is read-only "
        "(the executor is a read-only member)",
        {"method": entry.name},
    ) from cause


def _failed(app: App, entry: EntryPoint, exc: Exception) -> MethodFailedError:
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return MethodFailedError(
        f"{app.name}.{entry.name} failed: {detail}",
        {"method": entry.name, "exception": type(exc).__name__},
    )


def _not_json(entry: EntryPoint, result: Any, exc: Exception) -> ResultError:
    return ResultError(
        f"`{entry.name}` returned {type(result).__name__}, which is not JSON: {exc} "
        "(return plain values, e.g. `handle.get()` or `handle.to_list()`, not handles)",
        {"method": entry.name},
    )


__all__ = [
    "MAX_ARGS_BYTES",
    "CallOutcome",
    "EmittedEvent",
    "execute",
    "init_state",
    "run_handler",
]
