"""The `App` object an application module builds, and what the runtime reads from it.

    app = App("kv_store")

    class Inserted(msgspec.Struct):
        key: str
        value: str

    @app.state
    class KvStore:
        items: UnorderedMap[str, LwwRegister[str]]

        @app.method
        def set(self, key: str, value: str) -> None:
            self.items[key].set(value)
            app.emit(Inserted(key=key, value=value))

        @app.view
        def get(self, key: str) -> str | None:
            return self.items[key].get()

Theory of operation
-------------------
The decorators only *record* things: `@app.method`, `@app.view`, `@app.init` and
`@app.handler(...)` remember the function (they run inside the class body, before the class
exists), and `@app.state` claims the recorded functions found in the class. Type hints are
resolved lazily, on first use or by `app.check()` (which `load_app` calls), so annotations
may name types defined later in the module.

For every call the runtime binds a fresh instance of the state class to the call's
transaction: each annotated field becomes a handle (`tx.field(name, spec_for(annotation))`).
Instances hold nothing else and refuse attribute assignment, so no state can hide outside
the replicated fields.

The call-only API (`app.emit`, `app.executor()`, `app.context_id()`, `app.now()`,
`app.unique_id()`) reads the current call from a `ContextVar` that the runtime sets, so it
works in plain functions the methods call, and concurrent Trio tasks never see each
other's calls. An `App` holds no per-call or per-node state: one loaded module may serve
many nodes in one process.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from functools import partial
from typing import Any, ClassVar, Final, NamedTuple, TypeVar, cast, get_origin

import attrs
import base58
import msgspec

from trionode.crdt import Spec, StateTree, Transaction, spec_for, unix_from_ntp64
from trionode.crdt.transaction import EntityPath, field_path
from trionode.sdk.blobs import (
    BlobNotAvailableError,
    BlobReadError,
    BlobRef,
    UnknownBlobError,
    b58,
    current_access,
    parse_blob_id,
)
from trionode.sdk.errors import (
    AppDefinitionError,
    EventError,
    InvalidParamsError,
    NotInCallError,
    ReadOnlyCallError,
    ViewWriteError,
)

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

MAX_NAME_LENGTH: Final = 256
MAX_EVENTS_PER_CALL: Final = 100
MAX_EVENT_NAME_BYTES: Final = 100
MAX_EVENT_PAYLOAD_BYTES: Final = 64 * 1024
MAX_BLOB_NAME: Final = 1024
MAX_BLOB_MIME: Final = 255
BLOB_POLICIES: Final = ("on-read", "eager")

_new: Final = object.__new__
_setattr: Final = object.__setattr__
_asdict: Final = msgspec.structs.asdict
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENTRY_NAME = re.compile(r"[A-Za-z0-9_]+")
_UNIQUE_ID_DOMAIN: Final = b"trionode/sdk/unique-id/v1"


class EntryKind(enum.Enum):
    INIT = "init"
    METHOD = "method"
    VIEW = "view"
    HANDLER = "handler"
    MIGRATE = "migrate"


class EmittedEvent(NamedTuple):
    """An event recorded during a call: its type name and its JSON payload."""

    name: str
    payload: bytes


_event: Final = cast(
    "Callable[[tuple[str, bytes]], EmittedEvent]", partial(tuple.__new__, EmittedEvent)
)
"""`EmittedEvent` without the NamedTuple's Python-level `__new__` (per event)."""


@attrs.frozen
class Param:
    """One JSON parameter of an entry point."""

    name: str
    annotation: Any
    required: bool


class EntryPoint:
    """A method, view, init hook or event handler of an app, with its argument decoder."""

    __slots__ = (
        "_args_type",
        "_decoder",
        "_fields",
        "events",
        "fn",
        "kind",
        "name",
        "params",
        "returns",
    )

    def __init__(self, fn: Callable[..., Any], kind: EntryKind, events: tuple[str, ...]) -> None:
        self.fn = fn
        self.kind = kind
        self.events = events
        """For handlers: the event type names they run on."""
        self.name: str = fn.__name__
        self.params: tuple[Param, ...] = ()
        self.returns: Any = Any
        self._args_type: Any = None
        self._decoder: msgspec.json.Decoder[Any] | None = None
        """The arguments' JSON decoder, built once (`compile`): `msgspec.json.decode` with a
        type looks the type up per call."""
        self._fields: tuple[str, ...] | None = None
        """Parameter names to unpack from the decoded struct; None: pass it whole."""

    @property
    def whole_event(self) -> bool:
        """A handler taking the decoded event as its one parameter (not its fields)."""
        self._ensure_compiled()
        return self._fields is None

    def _ensure_compiled(self) -> None:
        if self._args_type is None:
            self.compile()

    def compile(self) -> None:
        """Resolve type hints and build the argument decoder.

        Raises:
            AppDefinitionError: unsupported signature or annotation.
        """
        where = f"{self.kind.value} `{self.name}`"
        if inspect.iscoroutinefunction(self.fn) or inspect.isgeneratorfunction(self.fn):
            raise AppDefinitionError(f"{where} must be a plain function (calls are synchronous)")
        try:
            hints = typing.get_type_hints(self.fn, include_extras=True)
        except (NameError, TypeError) as exc:
            raise AppDefinitionError(f"{where}: cannot resolve its type hints: {exc}") from exc
        parameters = list(inspect.signature(self.fn).parameters.values())
        if not parameters or parameters[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise AppDefinitionError(f"{where} must take `self` (the state) first")
        params: list[Param] = []
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for parameter in parameters[1:]:
            if parameter.kind not in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY,
            ):
                raise AppDefinitionError(
                    f"{where}: parameter `{parameter.name}` must be passable by name "
                    "(no positional-only, *args or **kwargs: arguments are a JSON object)"
                )
            if parameter.name not in hints:
                raise AppDefinitionError(
                    f"{where}: parameter `{parameter.name}` needs a type annotation "
                    "(arguments are validated against it)"
                )
            annotation = hints[parameter.name]
            required = parameter.default is inspect.Parameter.empty
            params.append(Param(parameter.name, annotation, required))
            fields.append(
                (parameter.name, annotation)
                if required
                else (parameter.name, annotation, parameter.default)
            )
        self.params = tuple(params)
        self.returns = hints.get("return", Any)
        if self.kind is EntryKind.HANDLER and _is_event_param(self.params, self.events):
            self._args_type = self.params[0].annotation
            self._decoder = msgspec.json.Decoder(self._args_type)
            self._fields = None
            return
        try:
            # A handler may ignore event fields it does not need; a caller's unknown
            # argument is a mistake worth reporting.
            self._args_type = msgspec.defstruct(
                f"{self.name}_args",
                fields,
                forbid_unknown_fields=self.kind is not EntryKind.HANDLER,
                kw_only=True,
            )
            self._decoder = msgspec.json.Decoder(self._args_type)  # (unsupported ones fail)
        except (TypeError, ValueError) as exc:
            raise AppDefinitionError(f"{where}: unsupported parameter types: {exc}") from exc
        self._fields = tuple(p.name for p in self.params)

    def bind(self, args_json: bytes | str | None) -> dict[str, Any]:
        """Decode and validate JSON arguments into keyword arguments.

        Empty input, `null` and `{}` all mean "no arguments".

        Raises:
            InvalidParamsError: not JSON, not an object, unknown/missing parameter, or a
                value that does not match the parameter's type; the message names it.
        """
        decoder = self._decoder
        if decoder is None:  # (`_ensure_compiled`, inline: per call)
            self.compile()
            decoder = self._decoder
            assert decoder is not None  # (compiled)
        # (A str is decoded as it is: msgspec takes both, and encoding it first copied it.)
        data = args_json or b""
        stripped = data.strip()
        if not stripped or stripped == ("null" if isinstance(stripped, str) else b"null"):
            data = b"{}"
        try:
            decoded = decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise _invalid_params(self, str(exc)) from None
        except msgspec.DecodeError as exc:
            raise InvalidParamsError(
                f"`{self.name}`: arguments are not valid JSON: {exc}"
            ) from None
        if self._fields is None:
            return {self.params[0].name: decoded}
        return _asdict(decoded)  # (the struct's fields are `_fields`, in order)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (for `app show` and docs)."""
        self._ensure_compiled()
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind.value,
            "params": [
                {"name": p.name, "type": type_name(p.annotation), "required": p.required}
                for p in self.params
            ],
            "returns": type_name(self.returns),
        }
        if self.events:
            out["events"] = list(self.events)
        return out

    def __repr__(self) -> str:
        return f"EntryPoint({self.kind.value} {self.name!r})"


def _is_event_param(params: tuple[Param, ...], events: tuple[str, ...]) -> bool:
    """One parameter annotated with the (one) event class the handler runs on."""
    if len(params) != 1 or len(events) != 1:
        return False
    annotation = params[0].annotation
    return (
        isinstance(annotation, type)
        and annotation.__name__ == events[0]
        and (issubclass(annotation, msgspec.Struct) or dataclasses.is_dataclass(annotation))
    )


_AT_PATH = re.compile(r"^(?P<what>.*) - at `\$(?P<path>[^`]*)`$")
_FIRST_KEY = re.compile(r"^\.(?P<key>[A-Za-z_][A-Za-z0-9_]*)")
_MISSING = re.compile(r"^Object missing required field `(?P<key>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]*)`$")
_TOP_TYPE = re.compile(r"^Expected `object`, got `(?P<got>[^`]*)`$")


def _invalid_params(entry: EntryPoint, detail: str) -> InvalidParamsError:
    """Turn a msgspec validation message into one naming the parameter."""
    method = f"`{entry.name}`"
    if entry.whole_event:
        param = entry.params[0].name
        return InvalidParamsError(
            f"{method}: event `{entry.events[0]}` does not decode: {detail}", param
        )
    path = ""
    if (match := _AT_PATH.match(detail)) is not None:
        detail, path = match["what"], match["path"]
    key = _FIRST_KEY.match(path)
    if key is not None:
        param = key["key"]
        inner = path[key.end() :]
        where = f" (at `{inner}`)" if inner else ""
        return InvalidParamsError(f"{method}: parameter `{param}`{where}: {_lower(detail)}", param)
    if (match := _MISSING.match(detail)) is not None:
        return InvalidParamsError(
            f"{method}: missing required parameter `{match['key']}`", match["key"]
        )
    if (match := _UNKNOWN.match(detail)) is not None:
        known = ", ".join(f"`{p.name}`" for p in entry.params) or "none"
        return InvalidParamsError(
            f"{method}: unknown parameter `{match['key']}` (parameters: {known})", match["key"]
        )
    if (match := _TOP_TYPE.match(detail)) is not None:
        return InvalidParamsError(
            f"{method}: arguments must be a JSON object of named parameters, got {match['got']}"
        )
    return InvalidParamsError(f"{method}: invalid arguments: {detail}")


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def type_name(annotation: Any) -> str:
    """A readable name for a type annotation (`str | None`, `UnorderedMap[str, Counter]`)."""
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and get_origin(annotation) is None:
        return annotation.__qualname__
    return re.sub(r"\b(?:typing|builtins|trionode\.crdt\.handles)\.", "", repr(annotation))


# -- the current call ------------------------------------------------------------------


class CallState(msgspec.Struct):
    """What the runtime tells the SDK about the call in progress. (A struct, not an attrs
    class: one is made per call, by msgspec's constructor rather than a generated Python
    `__init__`.)"""

    app: App
    entry: EntryPoint
    tx: Transaction
    executor: bytes
    context_id: bytes
    physical: int
    events: list[EmittedEvent] = msgspec.field(default_factory=list)
    violation: str | None = None
    """Set when the app attempted a forbidden side effect (even if it caught the error)."""

    def forbid_side_effects(self, action: str) -> None:
        """Raise (and remember) if this call may not write."""
        if self.tx.writable:
            return
        if self.entry.kind is EntryKind.VIEW:
            error: ViewWriteError | ReadOnlyCallError = ViewWriteError(
                f"view `{self.entry.name}` cannot {action}; make it an @app.method"
            )
        else:
            error = ReadOnlyCallError(
                f"`{self.entry.name}` cannot {action}: this call is read-only "
                "(the executor is a read-only member)"
            )
        self.violation = error.message
        raise error


CURRENT_CALL: ContextVar[CallState | None] = ContextVar("trionode_sdk_call", default=None)


# -- the app ---------------------------------------------------------------------------


class App:
    """An application: its replicated state class, entry points and events.

    Args:
        name: the app's name (matches the bundle manifest's `name`).
    """

    def __init__(self, name: str) -> None:
        if not _is_str(name) or _APP_NAME.fullmatch(name) is None:
            raise AppDefinitionError(f"app name {name!r}: use letters, digits, `_`, `.` or `-`")
        self.name = name
        self._marked: dict[Callable[..., Any], tuple[EntryKind, tuple[str, ...]]] = {}
        self._state_cls: type | None = None
        self._entries: dict[str, EntryPoint] = {}
        self._init: EntryPoint | None = None
        self._migrate: EntryPoint | None = None
        self._handlers: dict[str, list[str]] = {}
        self._fields: dict[str, Spec[Any]] | None = None
        self._bound: tuple[type, tuple[tuple[str, Spec[Any], EntityPath], ...]] | None = None
        """The state class and each field's name, spec and path (`bind_state`)."""
        self.blob_policy = "on-read"
        """When this node fetches blobs the state references: "on-read" (when a call reads
        one) or "eager" (as soon as a delta references one). Set from the bundle manifest's
        `blobs` by `load_app`."""

    def __repr__(self) -> str:
        return f"App({self.name!r})"

    # -- decorators ----------------------------------------------------------------------

    def state(self, cls: C) -> C:
        """Declare the state class: its annotated fields are the replicated collections, its
        decorated functions the app's entry points. One per app."""
        if not isinstance(cls, type):
            raise AppDefinitionError("@app.state decorates a class")
        if self._state_cls is not None:
            raise AppDefinitionError(
                f"app {self.name!r} already has a state class ({self._state_cls.__name__})"
            )
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                if inspect.isfunction(value) and value in self._marked:
                    self._claim(value)
        if "__setattr__" not in vars(cls):
            type.__setattr__(cls, "__setattr__", _refuse_assignment)
        self._state_cls = cls
        return cls

    def init(self, fn: F) -> F:
        """The initialiser: runs once when a context is created, may take JSON arguments."""
        return self._mark(fn, EntryKind.INIT)

    def migrate(self, fn: F) -> F:
        """The migration: runs once per context when an admin upgrades a context to this
        version (`trionode context upgrade`), on that admin's node; its writes become one
        delta. It takes no parameters, or one `from_version: str` (the version upgraded
        from)."""
        return self._mark(fn, EntryKind.MIGRATE)

    def method(self, fn: F) -> F:
        """A method: may read and write; its writes become one delta."""
        return self._mark(fn, EntryKind.METHOD)

    def view(self, fn: F) -> F:
        """A view: read-only; writing or emitting raises `ViewWriteError`."""
        return self._mark(fn, EntryKind.VIEW)

    def handler(self, event: str) -> Callable[[F], F]:
        """An event handler: runs on the *other* nodes when they apply a delta carrying an
        event of type `event`, as their own member. It receives the event's fields as
        named parameters (fields it does not name are ignored), or the event itself if its
        one parameter is annotated with the event class. Stack several `@app.handler(...)`
        to run one function on several event types."""
        if not _is_str(event) or not event or len(event) > MAX_EVENT_NAME_BYTES:
            raise AppDefinitionError(
                f"@app.handler takes an event type name (got {event!r}); "
                "write @app.handler('Inserted')"
            )

        def decorate(fn: F) -> F:
            return self._mark(fn, EntryKind.HANDLER, (event,))

        return decorate

    def _mark(self, fn: F, kind: EntryKind, events: tuple[str, ...] = ()) -> F:
        if not inspect.isfunction(fn):
            raise AppDefinitionError(
                f"@app.{kind.value} decorates a plain function defined in the state class "
                f"(got {fn!r})"
            )
        if fn in self._marked:
            previous, known = self._marked[fn]
            if previous is not EntryKind.HANDLER or kind is not EntryKind.HANDLER:
                raise AppDefinitionError(
                    f"`{fn.__name__}` is both @app.{previous.value} and @app.{kind.value}"
                )
            self._marked[fn] = (kind, tuple(dict.fromkeys(events + known)))
            return fn
        name = fn.__name__
        if len(name) > MAX_NAME_LENGTH or not _ENTRY_NAME.fullmatch(name) or name[:2] == "__":
            raise AppDefinitionError(f"`{name}` is not a valid entry point name")
        if self._state_cls is not None:
            raise AppDefinitionError(
                f"`{name}` must be defined inside the @app.state class ({self._state_cls.__name__})"
            )
        self._marked[fn] = (kind, events)
        return fn

    def _claim(self, fn: Callable[..., Any]) -> None:
        kind, events = self._marked[fn]
        entry = EntryPoint(fn, kind, events)
        if kind is EntryKind.INIT:
            if self._init is not None and self._init.fn is not fn:
                raise AppDefinitionError(f"app {self.name!r} has two @app.init functions")
            self._init = entry
            return
        if kind is EntryKind.MIGRATE:
            if self._migrate is not None and self._migrate.fn is not fn:
                raise AppDefinitionError(f"app {self.name!r} has two @app.migrate functions")
            self._migrate = entry
            return
        self._entries[entry.name] = entry
        for event in events:
            names = self._handlers.setdefault(event, [])
            if entry.name not in names:
                names.append(entry.name)

    # -- introspection (used by the runtime and the node) ----------------------------------

    @property
    def state_class(self) -> type:
        if self._state_cls is None:
            raise AppDefinitionError(f"app {self.name!r} has no @app.state class")
        return self._state_cls

    def check(self) -> None:
        """Resolve every annotation and signature now, so definition errors surface at load
        time rather than on the first call.

        Raises:
            AppDefinitionError: the first problem found.
        """
        state_cls = self.state_class
        claimed = {e.fn for e in self._entries.values()}
        claimed |= {e.fn for e in (self._init, self._migrate) if e is not None}
        for fn, (kind, _) in self._marked.items():
            if fn not in claimed:
                raise AppDefinitionError(
                    f"@app.{kind.value} `{fn.__name__}` is not a member of the @app.state "
                    f"class {state_cls.__name__}"
                )
        fields = self.fields()
        for name in fields:
            if name in self._entries:
                raise AppDefinitionError(f"`{name}` is both a state field and an entry point")
        for entry in self.entry_points():
            entry.compile()
        try:
            self.bind_state(StateTree().reader())
        except (AttributeError, TypeError) as exc:
            raise AppDefinitionError(
                f"{state_cls.__name__} cannot hold its fields (drop __slots__?): {exc}"
            ) from exc

    def fields(self) -> Mapping[str, Spec[Any]]:
        """The replicated fields of the state class, by name."""
        if self._fields is None:
            state_cls = self.state_class
            try:
                hints = typing.get_type_hints(state_cls)
            except (NameError, TypeError) as exc:
                raise AppDefinitionError(
                    f"{state_cls.__name__}: cannot resolve its field annotations: {exc}"
                ) from exc
            fields: dict[str, Spec[Any]] = {}
            for name, annotation in hints.items():
                if get_origin(annotation) is ClassVar or annotation is ClassVar:
                    continue
                try:
                    fields[name] = spec_for(annotation)
                except TypeError as exc:
                    raise AppDefinitionError(
                        f"{state_cls.__name__}.{name}: `{type_name(annotation)}` is not a "
                        "replicated type: wrap plain values in LwwRegister[...], or use Counter, "
                        "UnorderedMap, UnorderedSet, Vector or Text"
                    ) from exc
            self._fields = fields
        return self._fields

    def entry_points(self) -> list[EntryPoint]:
        """Init (if any), then methods, views and handlers in definition order."""
        out = [e for e in (self._init, self._migrate) if e is not None]
        return out + list(self._entries.values())

    def entry(self, name: str) -> EntryPoint | None:
        """A method, view or handler by name (not the init hook)."""
        return self._entries.get(name)

    @property
    def init_entry(self) -> EntryPoint | None:
        return self._init

    @property
    def migrate_entry(self) -> EntryPoint | None:
        return self._migrate

    def handlers_for(self, event_name: str) -> list[str]:
        """Names of the handlers registered for events of type `event_name`, in order."""
        return list(self._handlers.get(event_name, ()))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description: state fields and entry points with their types."""
        self.check()
        return {
            "name": self.name,
            "state": {name: type_name(hint) for name, hint in self._field_hints().items()},
            "entry_points": [e.describe() for e in self.entry_points()],
        }

    def _field_hints(self) -> dict[str, Any]:
        hints = typing.get_type_hints(self.state_class)
        return {name: hints[name] for name in self.fields()}

    def bind_state(self, tx: Transaction) -> Any:
        """A state instance whose fields are handles bound to `tx`."""
        bound = self._bound
        if bound is None:
            state_cls = self.state_class
            bound = self._bound = (
                state_cls,
                tuple(
                    (name, spec, field_path(name.encode(), spec.kind))
                    for name, spec in self.fields().items()
                ),
            )
        state_cls, fields = bound
        instance: Any = _new(state_cls)
        # (`tx.field(name, spec)` with the field's path found once per app: a call binds
        # every field)
        for name, spec, path in fields:
            _setattr(instance, name, spec.bind(tx, path))
        return instance

    # -- the call-only API ---------------------------------------------------------------

    def _call(self, what: str) -> CallState:
        call = CURRENT_CALL.get()
        if call is None or call.app is not self:
            raise NotInCallError(f"app.{what} only works inside a call of app {self.name!r}")
        return call

    def emit(self, event: object) -> None:
        """Record an event (a msgspec Struct or dataclass instance). Events are returned
        with the call's result, travel inside its delta and run handlers on other nodes.
        A failed call emits nothing.

        Raises:
            ViewWriteError: in a view. ReadOnlyCallError: in a read-only call.
            EventError: not an event, or over the limits.
        """
        call = CURRENT_CALL.get()  # (`_call`, inline: per event)
        if call is None or call.app is not self:
            call = self._call("emit()")
        if not call.tx.writable:
            call.forbid_side_effects("emit events")
        if not isinstance(event, msgspec.Struct) and (
            isinstance(event, type) or not dataclasses.is_dataclass(event)
        ):
            raise EventError(
                f"`{call.entry.name}` emitted {event!r}: events are msgspec Structs or "
                "dataclass instances"
            )
        name = type(event).__name__
        if len(name.encode()) > MAX_EVENT_NAME_BYTES:
            raise EventError(f"event type name {name!r} is too long")
        if len(call.events) >= MAX_EVENTS_PER_CALL:
            raise EventError(f"`{call.entry.name}` emitted more than {MAX_EVENTS_PER_CALL} events")
        try:
            payload = msgspec.json.encode(event)
        except (TypeError, ValueError) as exc:
            raise EventError(f"event {name} is not JSON-encodable: {exc}") from exc
        if len(payload) > MAX_EVENT_PAYLOAD_BYTES:
            raise EventError(
                f"event {name} is {len(payload)} bytes (limit {MAX_EVENT_PAYLOAD_BYTES})"
            )
        call.events.append(_event((name, payload)))

    def executor(self) -> bytes:
        """The public key (member id, 32 bytes) of the member executing this call."""
        return self._call("executor()").executor

    def executor_base58(self) -> str:
        """`executor()` in base58, as shown to users."""
        return str(base58.b58encode(self._call("executor_base58()").executor).decode())

    def context_id(self) -> bytes:
        """The id (32 bytes) of the context this call runs in."""
        return self._call("context_id()").context_id

    def now(self) -> float:
        """The call's wall-clock time (Unix seconds), as given by the executing node.

        Only the executing node reads it; other nodes see whatever it stored.
        """
        return unix_from_ntp64(self._call("now()").physical)

    def unique_id(self) -> str:
        """A fresh id, unique across all nodes and calls of the context (base58, 22 chars).

        Only in calls that may write (it is derived from a new HLC stamp).
        """
        call = self._call("unique_id()")
        call.forbid_side_effects("allocate unique ids")
        stamp = call.tx.stamp()
        digest = hashlib.sha256(
            _UNIQUE_ID_DOMAIN + call.context_id + stamp.time.to_bytes(8, "big") + stamp.node
        ).digest()
        return str(base58.b58encode(digest[:16]).decode())

    # -- blobs (see trionode.sdk.blobs) ------------------------------------------------------

    def attach_blob(self, blob_id: str, *, name: str = "", mime: str = "") -> BlobRef:
        """A `BlobRef` to a blob stored on this node (uploaded with `POST /admin-api/blobs`
        or `trionode blob add`), to keep in state. Its size comes from the store.

        Raises:
            InvalidParamsError: not a blob id, or a name/mime over the limits.
            UnknownBlobError: the blob is not stored on this node.
        """
        self._call("attach_blob()")
        raw = parse_blob_id(blob_id)
        if not _is_str(name) or len(name) > MAX_BLOB_NAME:
            raise InvalidParamsError(f"blob name: a string of at most {MAX_BLOB_NAME} characters")
        if not _is_str(mime) or len(mime) > MAX_BLOB_MIME:
            raise InvalidParamsError(f"mime type: a string of at most {MAX_BLOB_MIME} characters")
        size = current_access("app.attach_blob()").size(raw)
        if size is None:
            raise UnknownBlobError(
                f"blob {b58(raw)} is not stored on this node for this context: upload it "
                "first (`trionode blob add PATH`), then attach it by the id printed",
                {"blobId": b58(raw)},
            )
        return BlobRef(id=b58(raw), size=size, name=name, mime=mime)

    def read_blob(self, blob: BlobRef | str, start: int = 0, length: int | None = None) -> bytes:
        """Up to `length` bytes of a blob from `start` (None: to the end), within the
        node's per-call budget (`blobs.call_read_max`; read big blobs in ranges).

        Never waits on the network: a blob that is not here yet raises
        `BlobNotAvailableError`, and the node starts fetching it from the context's members.

        Raises:
            BlobNotAvailableError: not stored on this node (yet).
            BlobReadError: over the budget, `start` past the end, or not in an API call.
            InvalidParamsError: not a blob reference or id.
        """
        self._call("read_blob()")
        raw = blob.blob_id if isinstance(blob, BlobRef) else parse_blob_id(blob)
        if start < 0 or (length is not None and length < 0):
            raise BlobReadError(f"bad range: start {start}, length {length}")
        data = current_access("app.read_blob()").read(raw, start, length)
        if data is None:
            raise BlobNotAvailableError(
                f"blob {b58(raw)} is not available on this node yet: it is being fetched "
                "from the context's members; try again shortly",
                {"blobId": b58(raw)},
            )
        return data


def _is_str(value: object) -> bool:
    """Runtime type check of arguments typed `str` (callers may not be type-checked)."""
    return isinstance(value, str)


def _refuse_assignment(self: object, name: str, value: object) -> None:
    raise AttributeError(
        f"cannot assign {type(self).__name__}.{name}: state lives only in the replicated "
        "fields; write through their handles (e.g. `self.topic.set(...)`, "
        "`self.items[key].set(...)`)"
    )


def current_call() -> CallState | None:
    """The call in progress in this context (for the runtime and tests)."""
    return CURRENT_CALL.get()


__all__ = [
    "CURRENT_CALL",
    "MAX_EVENTS_PER_CALL",
    "MAX_EVENT_NAME_BYTES",
    "MAX_EVENT_PAYLOAD_BYTES",
    "App",
    "CallState",
    "EmittedEvent",
    "EntryKind",
    "EntryPoint",
    "Param",
    "current_call",
    "type_name",
]
