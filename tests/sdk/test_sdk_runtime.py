"""The runtime: atomic calls, read-only views, argument validation, events and handlers."""

from __future__ import annotations

import hashlib

import base58
import msgspec
import pytest

from trionode.crdt import HybridClock, StateTree, ntp64_from_unix, unix_from_ntp64
from trionode.sdk import (
    AlreadyInitializedError,
    App,
    AppError,
    Counter,
    EventError,
    InvalidParamsError,
    MethodFailedError,
    MethodNotFoundError,
    NotInCallError,
    ReadOnlyCallError,
    ResultError,
    ViewWriteError,
)
from trionode.sdk.app import MAX_EVENTS_PER_CALL, CallState, current_call
from trionode.sdk.runtime import (
    MAX_ARGS_BYTES,
    CallOutcome,
    execute,
    init_state,
    run_handler,
)

from .probe_app import Noted, app

EXECUTOR = hashlib.sha256(b"member").digest()
CONTEXT = hashlib.sha256(b"context").digest()
NOW = ntp64_from_unix(1_700_000_000.0)


class Replica:
    def __init__(self, name: bytes = EXECUTOR) -> None:
        self.tree = StateTree()
        self.clock = HybridClock(name)
        self.member = name
        self.physical = NOW

    def call(
        self, method: str, args: object = None, *, writable: bool = True, raw: bytes | None = None
    ) -> CallOutcome:
        self.physical += 1 << 20
        data = raw if raw is not None else msgspec.json.encode(args or {})
        return execute(
            app,
            self.tree,
            self.clock,
            self.physical,
            method,
            data,
            executor=self.member,
            context_id=CONTEXT,
            writable=writable,
        )

    def handle(self, handler: str, payload: bytes) -> CallOutcome:
        self.physical += 1 << 20
        return run_handler(
            app,
            self.tree,
            self.clock,
            self.physical,
            handler,
            payload,
            executor=self.member,
            context_id=CONTEXT,
        )

    def state(self) -> object:
        return self.call("read").result

    def fingerprint(self) -> tuple[bytes, int, object]:
        return self.tree.root_hash(), len(self.tree), self.state()


# -- methods ---------------------------------------------------------------------------


def test_a_method_commits_its_writes_as_delta_records() -> None:
    r = Replica()
    outcome = r.call("write_then_fail", {"mode": "ok"})
    assert outcome.result == "ok"
    assert outcome.result_json == b'"ok"'
    assert outcome.wrote
    assert [d.id for d in outcome.delta_records] == sorted(d.id for d in outcome.delta_records)
    assert r.state() == {"reg": "written", "count": 1, "tags": [], "docs": {"d": "text"}}
    other = StateTree()
    other.apply(outcome.delta_records)
    assert other.root_hash() == r.tree.root_hash()


@pytest.mark.parametrize(
    ("mode", "error", "code"),
    [("app", AppError, 1001), ("bug", MethodFailedError, -32012)],
)
def test_a_failing_method_writes_and_emits_nothing(
    mode: str, error: type[AppError], code: int
) -> None:
    r = Replica()
    r.call("incr")
    before = r.fingerprint()
    with pytest.raises(error) as info:
        r.call("write_then_fail", {"mode": mode})
    assert info.value.code == code
    assert r.fingerprint() == before
    assert current_call() is None  # the call context is gone too
    if mode == "app":
        assert info.value.to_jsonrpc() == {
            "code": 1001,
            "message": "refused on purpose",
            "data": {"type": "Refused", "detail": {"why": "testing"}},
        }
    else:
        assert isinstance(info.value.__cause__, KeyError)
        assert "KeyError" in info.value.message
        assert info.value.data == {"method": "write_then_fail", "exception": "KeyError"}
    assert r.call("incr").result == 2  # and the next call works normally


def test_unencodable_results_and_state_assignment_fail_cleanly() -> None:
    r = Replica()
    before = r.fingerprint()
    with pytest.raises(ResultError, match="not JSON"):
        r.call("bad_result")
    with pytest.raises(MethodFailedError, match=r"cannot assign Probe\.reg"):
        r.call("assign")
    assert r.fingerprint() == before


def test_unknown_methods() -> None:
    r = Replica()
    with pytest.raises(MethodNotFoundError, match="no method or view `nope`") as info:
        r.call("nope")
    assert info.value.code == -32601
    with pytest.raises(MethodNotFoundError, match="init hook"):
        r.call("setup")
    with pytest.raises(MethodNotFoundError, match="event handler"):
        r.call("on_noted", {"n": 1})
    with pytest.raises(MethodNotFoundError):
        r.call("")


# -- read-only calls -------------------------------------------------------------------


def test_views_cannot_write_emit_or_allocate_ids() -> None:
    r = Replica()
    r.call("incr")
    before = r.fingerprint()
    clock_before = r.clock.last
    for view in ("sneaky_write", "swallowed_write", "view_emit", "view_unique_id"):
        with pytest.raises(ViewWriteError) as info:
            r.call(view)
        assert info.value.code == -32010
        assert f"`{view}`" in info.value.message
    assert r.fingerprint() == before
    assert r.clock.last == clock_before  # views never tick the clock


def test_read_only_calls_may_read_but_not_write() -> None:
    r = Replica()
    r.call("write_then_fail", {"mode": "ok"})
    before = r.fingerprint()
    outcome = r.call("only_reads", writable=False)
    assert outcome.result == "written"
    assert outcome.delta_records == []
    with pytest.raises(ReadOnlyCallError, match="read-only member") as info:
        r.call("incr", writable=False)
    assert info.value.code == -32011
    with pytest.raises(ReadOnlyCallError):
        r.call("emit_many", {"n": 1}, writable=False)
    assert r.fingerprint() == before


def test_views_return_values_and_see_the_call_context() -> None:
    r = Replica()
    who = r.call("who").result
    assert who["executor"] == EXECUTOR.hex()
    assert who["executor_b58"] == base58.b58encode(EXECUTOR).decode()
    assert who["context"] == CONTEXT.hex()
    assert who["now"] == pytest.approx(unix_from_ntp64(r.physical))
    with pytest.raises(NotInCallError):
        app.executor()
    with pytest.raises(NotInCallError):
        app.emit(Noted(n=1))


# -- arguments -------------------------------------------------------------------------


def test_arguments_are_validated_against_the_type_hints() -> None:
    r = Replica()
    ok = r.call("typed", {"a": 1, "b": ["x"], "d": {"k": 2}, "e": {"n": 3}}).result
    assert ok == {"a": 1, "b": ["x"], "c": 1.0, "d": {"k": 2}, "e": {"n": 3}}
    cases = [
        ({"a": "1", "b": []}, "a", "parameter `a`: expected `int`, got `str`"),
        ({"a": 1, "b": ["x", 2]}, "b", "parameter `b` (at `[1]`): expected `str`, got `int`"),
        ({"a": 1, "b": [], "c": 0}, "c", "parameter `c`: expected `float` > 0.0"),
        ({"a": 1, "b": [], "e": {"n": "x"}}, "e", "parameter `e` (at `.n`)"),
        ({"b": []}, "a", "missing required parameter `a`"),
        ({"a": 1, "b": [], "z": 1}, "z", "unknown parameter `z` (parameters: `a`, `b`, `c`"),
    ]
    for args, param, message in cases:
        with pytest.raises(InvalidParamsError) as info:
            r.call("typed", args)
        assert info.value.code == -32602
        assert info.value.param == param
        assert message in info.value.message, info.value.message
        assert info.value.message.startswith("`typed`: ")
        assert info.value.to_jsonrpc()["data"]["detail"] == {"param": param}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[1, 2]", "arguments must be a JSON object of named parameters, got array"),
        (b'"a"', "got str"),
        (b"{not json", "arguments are not valid JSON"),
        (b"", "missing required parameter `mode`"),
        (b"null", "missing required parameter `mode`"),
    ],
)
def test_malformed_argument_documents(raw: bytes, message: str) -> None:
    r = Replica()
    with pytest.raises(InvalidParamsError, match=message):
        r.call("write_then_fail", raw=raw)


def test_arguments_may_be_text_and_are_bounded() -> None:
    r = Replica()
    r.physical += 1
    outcome = execute(
        app,
        r.tree,
        r.clock,
        r.physical,
        "incr",
        '{"by": 5}',
        executor=EXECUTOR,
        context_id=CONTEXT,
    )
    assert outcome.result == 5
    huge = b'{"mode": "' + b"x" * MAX_ARGS_BYTES + b'"}'
    with pytest.raises(InvalidParamsError, match="limit"):
        r.call("write_then_fail", raw=huge)
    with pytest.raises(ValueError, match="32-byte"):
        execute(app, r.tree, r.clock, r.physical, "incr", b"", executor=b"x", context_id=CONTEXT)


# -- events ----------------------------------------------------------------------------


def test_events_are_returned_in_emission_order() -> None:
    r = Replica()
    outcome = r.call("emit_mixed")
    assert outcome.events == [
        ("Noted", b'{"n":1}'),
        ("Tagged", b'{"tag":"t","extra":"e"}'),
        ("Noted", b'{"n":2}'),
    ]
    assert outcome.delta_records == []  # events without writes: the caller decides
    many = r.call("emit_many", {"n": 5})
    assert [msgspec.json.decode(e.payload)["n"] for e in many.events] == [0, 1, 2, 3, 4]


def test_bad_events_and_too_many_events_fail_the_call() -> None:
    r = Replica()
    for what in ("dict", "class", "unencodable"):
        with pytest.raises(EventError):
            r.call("emit_not_event", {"what": what})
    with pytest.raises(EventError, match=f"more than {MAX_EVENTS_PER_CALL}"):
        r.call("emit_many", {"n": MAX_EVENTS_PER_CALL + 1})
    assert len(r.call("emit_many", {"n": MAX_EVENTS_PER_CALL}).events) == MAX_EVENTS_PER_CALL


def test_unique_ids_differ_across_calls_and_members() -> None:
    a, b = Replica(), Replica(hashlib.sha256(b"other member").digest())
    ids = a.call("new_ids", {"n": 3}).result + a.call("new_ids", {"n": 2}).result
    ids += b.call("new_ids", {"n": 3}).result  # same physical times as a
    assert len(set(ids)) == 8
    assert all(len(base58.b58decode(i)) == 16 for i in ids)


# -- init ------------------------------------------------------------------------------


def test_init_runs_once_with_arguments() -> None:
    r = Replica()
    with pytest.raises(InvalidParamsError) as info:
        init_state(
            app, r.tree, r.clock, NOW, b'{"start": -1}', executor=EXECUTOR, context_id=CONTEXT
        )
    assert info.value.param == "start"
    assert len(r.tree) == 0
    outcome = init_state(
        app, r.tree, r.clock, NOW, '{"start": 3, "tag": "x"}', executor=EXECUTOR, context_id=CONTEXT
    )
    assert outcome.delta_records
    assert r.state() == {"reg": None, "count": 3, "tags": ["x"], "docs": {}}
    with pytest.raises(AlreadyInitializedError) as again:
        init_state(app, r.tree, r.clock, NOW, None, executor=EXECUTOR, context_id=CONTEXT)
    assert again.value.code == -32016


# -- handlers --------------------------------------------------------------------------


def test_handlers_are_found_by_event_name() -> None:
    assert app.handlers_for("Noted") == ["on_noted", "audit"]
    assert app.handlers_for("Tagged") == ["on_tagged", "audit"]
    assert app.handlers_for("Unknown") == []
    entry = app.entry("audit")
    assert entry is not None
    assert entry.events == ("Noted", "Tagged")


def test_handlers_run_like_methods_on_event_payloads() -> None:
    author, receiver = Replica(), Replica(hashlib.sha256(b"receiver").digest())
    emitted = author.call("emit_mixed")
    assert author.state() == {"reg": None, "count": 0, "tags": [], "docs": {}}
    outcomes = [
        receiver.handle(handler, event.payload)
        for event in emitted.events
        for handler in app.handlers_for(event.name)
    ]
    # on_noted(n=1) → +2, on_tagged(Tagged) adds "t" and emits Noted(n=len("e")), on_noted(2) → +3
    assert receiver.state() == {"reg": None, "count": 5, "tags": ["audited", "t"], "docs": {}}
    assert [o.wrote for o in outcomes] == [True, True, True, False, True, False]
    assert outcomes[2].events == [("Noted", b'{"n":1}')]
    with pytest.raises(InvalidParamsError, match="parameter `n`"):
        receiver.handle("on_noted", b'{"n": "x"}')
    with pytest.raises(InvalidParamsError, match="event `Tagged` does not decode"):
        receiver.handle("on_tagged", b'{"extra": "no tag"}')
    with pytest.raises(MethodNotFoundError, match="not an event handler"):
        receiver.handle("incr", b"{}")


# -- the call state ----------------------------------------------------------------------

_seen_fields: dict[str, object] = {}
_field_probe = App("call_state_probe")


@_field_probe.state
class _FieldProbe:
    hits: Counter

    @_field_probe.method
    def look(self) -> None:
        call = current_call()
        for field in msgspec.structs.fields(CallState):
            _seen_fields[field.name] = getattr(call, field.name)  # unset: AttributeError
        self.hits.increment()


def test_the_runtime_sets_every_field_of_the_call_state() -> None:
    """The app sees every field of the CallState `_run` builds, set to this call's."""
    tree = StateTree()
    _seen_fields.clear()
    execute(
        _field_probe,
        tree,
        HybridClock(EXECUTOR),
        NOW,
        "look",
        b"{}",
        executor=EXECUTOR,
        context_id=CONTEXT,
    )
    assert set(_seen_fields) == {field.name for field in msgspec.structs.fields(CallState)}
    assert _seen_fields["executor"] == EXECUTOR
    assert _seen_fields["context_id"] == CONTEXT
    assert _seen_fields["physical"] == NOW
    assert _seen_fields["events"] == []
    assert _seen_fields["violation"] is None
