"""apps/notes through the runtime: concurrent text editing converges on every replica."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trionode.sdk import AppError, InvalidParamsError

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

APP = load_shipped_app("notes")


def _nodes(n: int = 3) -> list[Node]:
    return [Node(APP, name) for name in "abc"[:n]]


def _start(nodes: list[Node], **init: str) -> None:
    genesis = nodes[0].init(**init)
    for node in nodes[1:]:
        node.receive(genesis)


def test_edit_title_and_events() -> None:
    (a,) = _nodes(1)
    _start([a], title="Draft", text="hello")
    assert a.view("snapshot") == {"title": "Draft", "text": "hello", "length": 5}
    length, d1 = a.call("insert", pos=5, text=" world")
    assert length == 11
    length, d2 = a.call("delete", pos=0, length=6)
    assert length == 5
    assert a.view("text") == "world"
    _, d3 = a.call("set_title", title="Final")
    assert a.view("title") == "Final"
    events = [e for d in (d1, d2, d3) for e in d.events]
    assert event_names(events) == ["TextInserted", "TextDeleted", "TitleChanged"]
    by = event_payloads(events)[0]["by"]
    assert event_payloads(events) == [
        {"pos": 5, "text": " world", "by": by},
        {"pos": 0, "length": 6, "by": by},
        {"title": "Final", "by": by},
    ]
    a.call("insert", pos=0, text="✓ ")  # characters, not bytes
    assert a.view("snapshot")["length"] == 7


def test_out_of_range_edits_are_refused_and_write_nothing() -> None:
    (a,) = _nodes(1)
    _start([a], text="abc")
    root = a.tree.root_hash()
    with pytest.raises(AppError) as past_end:
        a.call("insert", pos=4, text="x")
    assert past_end.value.code == 416
    assert past_end.value.data == {"length": 3}
    with pytest.raises(AppError, match="past the end"):
        a.call("delete", pos=2, length=2)
    with pytest.raises(InvalidParamsError) as negative:
        a.call("insert", pos=-1, text="x")
    assert negative.value.param == "pos"
    with pytest.raises(InvalidParamsError) as zero:
        a.call("delete", pos=0, length=0)
    assert zero.value.param == "length"
    with pytest.raises(InvalidParamsError) as text_type:
        a.call("insert", pos=0, text=5)
    assert text_type.value.param == "text"
    assert a.tree.root_hash() == root


def test_concurrent_edits_converge_in_any_order() -> None:
    a, b, c = _nodes()
    _start([a, b, c], title="t", text="The quick fox")
    log: list[Delta] = []
    log.append(a.call("insert", pos=4, text="very ")[1])  # "The very quick fox"
    log.append(b.call("insert", pos=10, text="brown ")[1])  # "The quick brown fox"
    log.append(c.call("delete", pos=0, length=4)[1])  # "quick fox"
    log.append(c.call("insert", pos=9, text="!")[1])  # "quick fox!"
    b.physical += SECOND
    log.append(b.call("set_title", title="b's title")[1])
    log.append(a.call("set_title", title="a's title")[1])
    deliver_all([a, b, c], log, order=[5, 3, 1, 4, 0, 2])
    results = assert_converged([a, b, c], "text", "title")
    assert results["text"] == "very quick brown fox!"
    assert results["title"] == "b's title"


def test_concurrent_inserts_at_one_spot_keep_each_run_together() -> None:
    nodes = _nodes()
    _start(nodes, text="[]")
    log = [node.call("insert", pos=1, text=node.name * 3)[1] for node in nodes]
    deliver_all(nodes, log)
    text = assert_converged(nodes, "text")["text"]
    assert text[0] == "["
    assert text[-1] == "]"
    assert sorted(text[1:-1][i : i + 3] for i in (0, 3, 6)) == ["aaa", "bbb", "ccc"]


@given(st.data())
def test_random_editing_converges(data: st.DataObject) -> None:
    nodes = _nodes()
    _start(nodes, text="base")
    log: list[Delta] = []
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        node = data.draw(st.sampled_from(nodes), label="node")
        length = node.view("snapshot")["length"]
        if length and data.draw(st.booleans(), label="delete"):
            pos = data.draw(st.integers(0, length - 1), label="pos")
            count = data.draw(st.integers(1, length - pos), label="count")
            delta = node.call("delete", pos=pos, length=count)[1]
        else:
            pos = data.draw(st.integers(0, length), label="pos")
            delta = node.call("insert", pos=pos, text=data.draw(st.text("xyz", min_size=1)))[1]
        log.append(delta)
        if data.draw(st.booleans(), label="deliver now"):
            data.draw(st.sampled_from(nodes), label="to").receive(
                data.draw(st.sampled_from(log), label="which")
            )
    order = data.draw(st.permutations(range(len(log))), label="order")
    deliver_all(nodes, log, order=list(order))
    snapshot = assert_converged(nodes, "snapshot")["snapshot"]
    assert snapshot["length"] == len(snapshot["text"])
