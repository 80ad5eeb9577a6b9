"""The node's page in a real browser: sign in, contexts, invitations, calls, live events, DAG."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import LiveNode, OpenPage
from tests.browser.pages import (
    call,
    context_page,
    create_context,
    install_kv_store,
    invite,
    join,
    second_page,
    shoot,
    sign_in,
)

pytestmark = pytest.mark.real_network


def test_sign_in_keeps_an_httponly_cookie_never_the_token(
    open_page: OpenPage, nodes: list[LiveNode]
) -> None:
    node = nodes[0]
    page = open_page(node.page_url())
    # A wrong token is a readable message, not a JSON dump.
    page.get_by_label("API token").fill("not-the-token")
    page.get_by_label("API token").press("Enter")  # the keyboard alone signs in
    expect(page.locator("#notice")).to_have_text(re.compile("not this node's API token"))
    page.get_by_label("API token").fill(node.token)
    page.get_by_label("API token").press("Enter")
    expect(page.locator("#peer-id")).to_have_text(node.peer_id)
    expect(page.locator("#uptime")).to_have_text(re.compile(r"^\d+(\.\d)? (s|min|h|days)$"))
    expect(page.locator("#reachability")).not_to_contain_text("[object")
    shoot(page, "node")
    cookies = page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("trionode_session", True, "Strict")
    ]
    assert node.token not in cookies[0]["value"]
    assert node.token not in page.url
    assert page.evaluate("document.cookie") == ""  # scripts can't read the session
    # A reload stays signed in; signing out ends the session on the node too.
    page.reload()
    expect(page.locator("#peer-id")).to_have_text(node.peer_id)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API token")).to_be_visible()
    status = page.evaluate("fetch('/admin-api/node').then(r => r.status)")
    assert status == 401


def test_create_a_context_and_invite(open_page: OpenPage, nodes: list[LiveNode]) -> None:
    page = open_page(nodes[0].page_url())
    sign_in(page, nodes[0])
    install_kv_store(page)
    context = create_context(page)
    invite(page)
    page.get_by_role("link", name="Contexts").click()
    expect(page.get_by_role("link", name=re.compile(context[:16]))).to_be_visible()


def test_a_joined_nodes_write_appears_live_with_a_new_head(
    open_page: OpenPage, nodes: list[LiveNode]
) -> None:
    first, second = nodes
    a, context = context_page(open_page, first)
    invitation = invite(a)
    expect(a.locator("#live-state")).to_have_text("live")
    shoot(a, "context")

    b = second_page(open_page, second)
    assert join(b, invitation) == context

    text = call(b, "set", key="from-b", value="hello from the second node")
    delta_id = re.search(r"New delta (\w+)", text)
    assert delta_id is not None, text
    # The write shows on the first node's page without a reload: in the event list...
    event = a.locator("#events li", has_text="from-b")
    expect(event).to_contain_text("hello from the second node")
    expect(event).to_contain_text("remote")
    # ...and in the DAG. (kv_store's event handler then writes on every node that applies
    # the delta, so the head is that handler's delta, a child of B's write.)
    full_id = event.get_attribute("data-delta-id")
    assert full_id is not None
    assert full_id.startswith(delta_id.group(1).rstrip("…"))
    expect(a.locator(f'#dag g.dag-node[data-delta-id="{full_id}"]')).to_have_count(1)
    expect(a.locator("#dag g.dag-node.head")).not_to_have_count(0)
    shoot(a, "context-live")


def test_a_method_form_calls_and_shows_the_result(
    open_page: OpenPage, nodes: list[LiveNode]
) -> None:
    page = open_page(nodes[0].page_url())
    sign_in(page, nodes[0])
    install_kv_store(page)
    create_context(page)
    assert "Result: null" in call(page, "set", key="colour", value="teal")
    assert call(page, "get", key="colour") == 'Result: "teal"'


def test_api_errors_show_as_messages(open_page: OpenPage, nodes: list[LiveNode]) -> None:
    page = open_page(nodes[0].page_url())
    sign_in(page, nodes[0])
    install_kv_store(page)
    create_context(page)
    form = page.locator('form[data-method="get_required"]')
    form.get_by_label("key").fill("missing")
    form.get_by_role("button").click()
    error = form.locator(".result.error")
    expect(error).to_contain_text("no key 'missing'")
    expect(error).to_contain_text("code 404")
    assert "jsonrpc" not in error.inner_text()
    # An admin route's error shows in the notice area as its message.
    page.get_by_role("link", name="Peers").click()
    page.get_by_label("Multiaddr").fill("/ip4/127.0.0.1/tcp/1")
    page.get_by_role("button", name="Connect").click()
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    assert not notice.inner_text().lstrip().startswith("{")


def test_the_dag_gets_a_new_head_after_a_write(open_page: OpenPage, nodes: list[LiveNode]) -> None:
    page = open_page(nodes[0].page_url())
    sign_in(page, nodes[0])
    install_kv_store(page)
    create_context(page)
    heads = page.locator("#dag g.dag-node.head")
    expect(heads).to_have_count(1)
    before = heads.first.get_attribute("data-delta-id")
    call(page, "set", key="k", value="v")
    expect(heads).to_have_count(1)
    expect(heads.first).not_to_have_attribute("data-delta-id", before or "")
    after = heads.first.get_attribute("data-delta-id")
    # The old head is now the new head's parent, drawn as an applied (non-head) node.
    expect(page.locator(f'#dag g.dag-node:not(.head)[data-delta-id="{before}"]')).to_have_count(1)
    dag = page.evaluate(
        "id => fetch(`/admin-api/contexts/${id}/dag`).then(r => r.json())",
        page.url.rsplit("/", 1)[1],
    )
    assert dag["heads"] == [after]
    assert json.dumps(dag).count(before or "-") >= 2  # a node and its child's parent link
