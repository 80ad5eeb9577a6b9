"""apps/kv_store through the runtime, on replicas exchanging deltas in different orders."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trionode.sdk import AppError, InvalidParamsError, MethodNotFoundError

from .app_helpers import (
    SECOND,
    Delta,
    Node,
    assert_converged,
    deliver_all,
    event_names,
    event_payloads,
    load_shipped_app,
)

APP = load_shipped_app("kv_store")


def _nodes(n: int = 3) -> list[Node]:
    return [Node(APP, name) for name in "abc"[:n]]


def test_set_get_update_remove_with_events() -> None:
    (a,) = _nodes(1)
    assert a.init().records == ()  # no init hook: an empty store
    _, d1 = a.call("set", key="k", value="v1")
    _, d2 = a.call("set", key="k", value="v2")
    _, d3 = a.call("set", key="other", value="x")
    assert a.view("get", key="k") == "v2"
    assert a.view("get", key="missing") is None
    assert a.view("entries") == {"k": "v2", "other": "x"}
    assert a.view("len") == 2
    old, d4 = a.call("remove", key="k")
    assert old == "v2"
    gone, d5 = a.call("remove", key="k")
    assert gone is None
    assert d5.records == ()  # nothing to remove: no write ...
    assert d5.events == ()  # ... and no event
    events = [e for d in (d1, d2, d3, d4) for e in d.events]
    assert event_names(events) == ["Inserted", "Updated", "Inserted", "Removed"]
    assert event_payloads(events) == [
        {"key": "k", "value": "v1"},
        {"key": "k", "value": "v2"},
        {"key": "other", "value": "x"},
        {"key": "k"},
    ]
    assert a.view("entries") == {"other": "x"}
    assert a.view("len") == 1
    count, d6 = a.call("clear")
    assert count == 1
    assert event_payloads(d6.events) == [{"count": 1}]
    assert a.view("entries") == {}


def test_errors_name_the_problem_and_write_nothing() -> None:
    (a,) = _nodes(1)
    a.call("set", key="k", value="v")
    root = a.tree.root_hash()
    with pytest.raises(InvalidParamsError) as bad:
        a.call("set", key="", value="v")
    assert bad.value.param == "key"
    assert "`key`" in bad.value.message
    with pytest.raises(InvalidParamsError, match="missing required parameter `value`"):
        a.call("set", key="k")
    with pytest.raises(AppError) as missing:
        a.view("get_required", key="nope")
    assert missing.value.code == 404
    assert missing.value.to_jsonrpc()["data"] == {"type": "NotFound", "detail": {"key": "nope"}}
    with pytest.raises(MethodNotFoundError):
        a.call("drop_table")
    with pytest.raises(MethodNotFoundError, match="event handler"):
        a.call("count_event")
    assert a.tree.root_hash() == root
    assert a.view("get_required", key="k") == "v"


def test_concurrent_writes_converge_last_writer_wins() -> None:
    a, b, c = _nodes()
    log: list[Delta] = []
    log.append(a.call("set", key="shared", value="from a")[1])
    b.physical += SECOND  # b's write is later by HLC: it wins wherever it lands
    log.append(b.call("set", key="shared", value="from b")[1])
    log.append(c.call("set", key="c-only", value="c")[1])
    log.append(a.call("set", key="doomed", value="a")[1])
    deliver_all([a, b, c], log)
    c.physical += 2 * SECOND
    log.append(c.call("remove", key="doomed")[1])
    deliver_all([a, b, c], log[-1:])
    results = assert_converged([a, b, c], "entries", "len")
    assert results["entries"] == {"shared": "from b", "c-only": "c"}
    assert results["len"] == 2


def test_remove_and_concurrent_re_set_later_wins() -> None:
    a, b = _nodes(2)
    base = a.call("set", key="k", value="v")[1]
    b.receive(base)
    removal = a.call("remove", key="k")[1]
    b.physical += SECOND
    reset = b.call("set", key="k", value="again")[1]
    for order in ([removal, reset], [reset, removal]):
        fresh = Node(APP, "fresh")
        for delta in [base, *order]:
            fresh.receive(delta, run_handlers=False)
        assert fresh.view("entries") == {"k": "again"}
    deliver_all([a, b], [removal, reset])
    assert assert_converged([a, b], "entries", "handler_calls") == {
        "entries": {"k": "again"},
        "handler_calls": 3,  # b: Inserted, Removed; a: Updated
    }


def test_handlers_run_once_per_receiving_node() -> None:
    a, b, c = _nodes()
    log = [
        a.call("set", key="x", value="1")[1],  # Inserted
        a.call("set", key="x", value="2")[1],  # Updated
        b.call("remove", key="nothing")[1],  # no event, no handler runs
    ]
    deliver_all([a, b, c], log, order=[2, 0, 1])
    deliver_all([a, b, c], list(log))  # redelivering everything changes nothing
    # two events, each handled by the two nodes that did not author it
    assert assert_converged([a, b, c], "handler_calls", "entries") == {
        "handler_calls": 4,
        "entries": {"x": "2"},
    }
    assert sorted(event_names(c.received_events)) == ["Inserted", "Updated"]


@given(st.data())
def test_random_operations_converge(data: st.DataObject) -> None:
    nodes = _nodes()
    log: list[Delta] = []
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        node = data.draw(st.sampled_from(nodes), label="node")
        key = data.draw(st.sampled_from("pqr"), label="key")
        op = data.draw(st.sampled_from(["set", "set", "remove", "clear"]), label="op")
        if op == "set":
            delta = node.call("set", key=key, value=data.draw(st.text("xyz", max_size=3)))[1]
        elif op == "remove":
            delta = node.call("remove", key=key)[1]
        else:
            delta = node.call("clear")[1]
        log.append(delta)
        if data.draw(st.booleans(), label="deliver now"):
            target = data.draw(st.sampled_from(nodes), label="to")
            log.extend(target.receive(data.draw(st.sampled_from(log), label="which")))
    order = data.draw(st.permutations(range(len(log))), label="order")
    deliver_all(nodes, log, order=list(order))
    results = assert_converged(nodes, "entries", "len", "handler_calls")
    assert results["len"] == len(results["entries"])
