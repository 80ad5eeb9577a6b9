"""apps/chat through the runtime: posts, reactions and topic on replicas in any order."""

from __future__ import annotations

import base58
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
    unix_seconds,
)

APP = load_shipped_app("chat")


def _nodes(n: int = 3) -> list[Node]:
    return [Node(APP, name) for name in ("alice", "bob", "carol")[:n]]


def _author(node: Node) -> str:
    return base58.b58encode(node.member).decode()


def test_post_react_unreact_topic_with_events() -> None:
    (a,) = _nodes(1)
    genesis = a.init(topic="general")
    assert genesis.records  # the topic
    assert a.view("topic") == "general"
    first, d1 = a.call("post", text="hello")
    second, _ = a.call("post", text="world")
    assert first != second
    assert event_names(d1.events) == ["MessagePosted"]
    assert event_payloads(d1.events) == [{"id": first, "author": _author(a), "text": "hello"}]
    assert a.call("react", message_id=first, emoji="👍")[0] == 1
    assert a.call("react", message_id=first, emoji="👍")[0] == 2
    count, d2 = a.call("react", message_id=first, emoji="🎉")
    assert count == 1
    assert event_payloads(d2.events) == [{"message_id": first, "emoji": "🎉", "by": _author(a)}]
    count, d3 = a.call("unreact", message_id=first, emoji="🎉")
    assert count == 0
    assert event_names(d3.events) == ["ReactionRemoved"]
    count, d4 = a.call("unreact", message_id=first, emoji="🎉")  # nothing left to take back
    assert count == 0
    assert d4.records == ()
    assert d4.events == ()
    _, d5 = a.call("set_topic", topic="random")
    assert event_payloads(d5.events) == [{"topic": "random", "by": _author(a)}]
    messages = a.view("messages")
    assert [m["text"] for m in messages] == ["hello", "world"]
    assert messages[0]["id"] == first
    assert messages[0]["author"] == _author(a)
    assert messages[0]["reactions"] == {"👍": 2}
    assert messages[1]["reactions"] == {}
    assert messages[0]["sent_at"] == pytest.approx(unix_seconds(a), abs=1.0)
    assert a.view("messages", offset=1, limit=5) == messages[1:]
    assert a.view("count") == 2
    assert a.view("topic") == "random"


def test_bad_input_is_refused_and_writes_nothing() -> None:
    (a,) = _nodes(1)
    a.init()
    message_id, _ = a.call("post", text="hi")
    root = a.tree.root_hash()
    with pytest.raises(AppError) as unknown:
        a.call("react", message_id="no-such-id", emoji="👍")
    assert unknown.value.code == 404
    with pytest.raises(InvalidParamsError) as empty:
        a.call("post", text="")
    assert empty.value.param == "text"
    with pytest.raises(InvalidParamsError) as big_page:
        a.view("messages", limit=5000)
    assert big_page.value.param == "limit"
    assert "<= 1000" in big_page.value.message
    with pytest.raises(InvalidParamsError) as emoji:
        a.call("react", message_id=message_id, emoji="x" * 33)
    assert emoji.value.param == "emoji"
    assert a.tree.root_hash() == root


def test_concurrent_posts_and_reactions_converge() -> None:
    a, b, c = _nodes()
    genesis = a.init(topic="t0")
    for node in (b, c):
        node.receive(genesis)
    hello, d_hello = a.call("post", text="hello from alice")
    log: list[Delta] = [d_hello]
    for node in (b, c):
        node.receive(d_hello)
    # everyone posts and reacts concurrently, before seeing each other
    for node in (a, b, c):
        log.append(node.call("post", text=f"hi, I am {node.name}")[1])
        log.append(node.call("react", message_id=hello, emoji="👍")[1])
    log.append(b.call("react", message_id=hello, emoji="❤")[1])
    b.physical += SECOND
    log.append(b.call("set_topic", topic="from bob (later)")[1])
    log.append(c.call("set_topic", topic="from carol")[1])
    deliver_all([a, b, c], log, order=list(reversed(range(len(log)))))
    results = assert_converged([a, b, c], "messages", "topic", "count")
    messages = results["messages"]
    assert messages[0]["text"] == "hello from alice"
    assert sorted(m["text"] for m in messages[1:]) == [
        "hi, I am alice",
        "hi, I am bob",
        "hi, I am carol",
    ]
    assert messages[0]["reactions"] == {"👍": 3, "❤": 1}
    assert results["topic"] == "from bob (later)"
    assert results["count"] == 4
    assert sorted(event_names(a.received_events)) == sorted(
        ["MessagePosted"] * 2 + ["ReactionAdded"] * 3 + ["TopicChanged"] * 2
    )


def test_concurrent_unreact_of_the_last_reaction_shows_zero() -> None:
    a, b = _nodes(2)
    b.receive(a.init())
    message_id, posted = a.call("post", text="m")
    reacted = a.call("react", message_id=message_id, emoji="👍")[1]
    b.receive(posted)
    b.receive(reacted)
    log = [a.call("unreact", message_id=message_id, emoji="👍")[1]]
    log.append(b.call("unreact", message_id=message_id, emoji="👍")[1])
    deliver_all([a, b], log)
    messages = assert_converged([a, b], "messages")["messages"]
    assert messages[0]["reactions"] == {}  # the counter is at -1: shown as no reaction


@given(st.data())
def test_random_chat_converges(data: st.DataObject) -> None:
    nodes = _nodes()
    genesis = nodes[0].init()
    for node in nodes[1:]:
        node.receive(genesis)
    log: list[Delta] = []
    for _ in range(data.draw(st.integers(1, 10), label="steps")):
        node = data.draw(st.sampled_from(nodes), label="node")
        op = data.draw(st.sampled_from(["post", "react", "unreact", "topic"]), label="op")
        known = [m["id"] for m in node.view("messages")]
        if op == "post" or not known:
            delta = node.call("post", text=data.draw(st.text("ab", min_size=1, max_size=3)))[1]
        elif op == "topic":
            delta = node.call("set_topic", topic=data.draw(st.sampled_from(["x", "y"])))[1]
        else:
            target = data.draw(st.sampled_from(known), label="message")
            emoji = data.draw(st.sampled_from(["👍", "👎"]), label="emoji")
            delta = node.call(op, message_id=target, emoji=emoji)[1]
        log.append(delta)
        if data.draw(st.booleans(), label="deliver now"):
            data.draw(st.sampled_from(nodes), label="to").receive(
                data.draw(st.sampled_from(log), label="which")
            )
    order = data.draw(st.permutations(range(len(log))), label="order")
    deliver_all(nodes, log, order=list(order))
    results = assert_converged(nodes, "messages", "topic", "count")
    assert results["count"] == len(results["messages"])
