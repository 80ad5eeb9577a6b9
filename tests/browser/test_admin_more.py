"""The page in a real browser, beyond the basics: per-peer sync status, installing an app by
upload, revoking invitations, leaving, and every main view at phone width."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Route, expect

from tests.browser.conftest import LiveNode, OpenPage
from tests.browser.pages import (
    APPS,
    context_page,
    create_context,
    install_kv_store,
    invite,
    join,
    no_horizontal_overflow,
    second_page,
    shoot,
    sign_in,
)
from trionode.sdk.bundle import load_bundle, pack_bundle

pytestmark = pytest.mark.real_network


def test_the_context_view_shows_each_peers_sync_and_syncs_with_one(
    open_page: OpenPage, nodes: list[LiveNode]
) -> None:
    first, second = nodes
    a, context = context_page(open_page, first)
    invitation = invite(a)
    b = second_page(open_page, second)
    join(b, invitation)
    # The joining node synced with the inviting one while joining: its page says so.
    row = b.locator(f'#sync-status tr[data-peer-id="{first.peer_id}"]')
    expect(row).to_contain_text("connected")
    expect(row.locator(".last-sync time")).to_have_text(re.compile(r"^\d+ s ago$"))
    # The first node's page lists the second as a member peer; "Sync now" on its row runs a
    # session with exactly that peer, and the row then shows when and how.
    row = a.locator(f'#sync-status tr[data-peer-id="{second.peer_id}"]')
    expect(row).to_contain_text("connected")
    row.get_by_role("button", name="Sync now").click()
    expect(a.locator("#notice")).to_contain_text("Synced with")
    expect(row.locator(".last-sync time")).to_have_text(re.compile(r"^\d+ s ago$"))
    expect(row.locator(".last-sync")).to_contain_text("delta(s) applied")
    # A session may have failed earlier (one racing the join); the row keeps showing that
    # error with its time, and it is older than the sync just made.
    status = a.evaluate(
        "id => fetch(`/admin-api/contexts/${id}/sync`).then(r => r.json())", context
    )
    [peer] = [p for p in status["peers"] if p["peerId"] == second.peer_id]
    assert peer["connected"] is True
    assert peer["outcome"] == "ok"
    if peer["lastError"] is not None:
        assert peer["lastError"]["at"] <= peer["lastSync"]["at"]
        expect(row.locator(".last-error")).to_contain_text(peer["lastError"]["message"])
    shoot(a, "context-sync")
    # The contexts list sums it up per context.
    a.get_by_role("link", name="Contexts").click()
    summary = a.locator(f'tr[data-context-id="{context}"] .sync-summary')
    expect(summary).to_contain_text(re.compile(r"1 of 1 peer\(s\) connected · last sync \d+ s ago"))


def test_an_app_installed_by_upload_shows_its_methods(
    open_page: OpenPage, nodes: list[LiveNode], tmp_path: Path
) -> None:
    bundle = tmp_path / "chat.tar.gz"
    bundle.write_bytes(pack_bundle(load_bundle(APPS / "chat")))
    page = open_page(nodes[1].page_url())
    sign_in(page, nodes[1])
    page.get_by_role("link", name="Apps").click()
    page.get_by_label("Bundle file").set_input_files(bundle)
    page.get_by_role("button", name="Upload bundle").click()
    expect(page.locator("#notice")).to_contain_text("Installed chat 0.1.0 from chat.tar.gz")
    row = page.locator("tr", has_text="chat")
    row.get_by_role("button", name="Methods").click()
    methods = page.locator("td", has_text="post (method)")
    expect(methods).to_contain_text("text: str")
    expect(methods).to_contain_text("messages (view)")
    # Not an archive: a sentence, and nothing installed.
    junk = tmp_path / "notes.zip"
    junk.write_bytes(b"this is no zip file")
    page.get_by_label("Bundle file").set_input_files(junk)
    page.get_by_role("button", name="Upload bundle").click()
    notice = page.locator("#notice")
    expect(notice).to_contain_text("notes.zip")
    assert not notice.inner_text().lstrip().startswith("{")


def test_revoke_an_invitation_and_refusals_read_as_sentences(
    open_page: OpenPage, nodes: list[LiveNode]
) -> None:
    first, second = nodes
    a, _ = context_page(open_page, first)
    invitation = invite(a)
    revoke = a.locator("#invitation ~ button", has_text="Revoke")
    revoke.click()
    expect(revoke).to_have_text("Really revoke?")
    revoke.click()
    expect(a.locator("#notice")).to_contain_text("Invitation revoked")
    # The revoked invitation no longer lets anyone in.
    b = second_page(open_page, second)
    b.get_by_role("link", name="Contexts").click()
    b.get_by_label("Invitation").fill(invitation)
    b.get_by_role("button", name="Join").click()
    expect(b.locator("#notice")).to_contain_text("revoked")
    assert not b.locator("#notice").inner_text().lstrip().startswith("{")
    # The only admin can't leave: the node says why.
    leave = a.get_by_role("button", name="Leave")
    leave.click()
    leave.click()
    expect(a.locator("#notice")).to_contain_text("admin")


@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 800)])
def test_every_main_view_fits_the_screen(
    open_page: OpenPage, nodes: list[LiveNode], width: int, height: int
) -> None:
    page = open_page(nodes[0].page_url(), width=width, height=height)
    sign_in(page, nodes[0])
    install_kv_store(page)
    create_context(page)
    expect(page.locator("#dag svg")).to_be_visible()
    no_horizontal_overflow(page)
    if width < 400:
        shoot(page, "phone")
    for view, ready in [
        ("Node", "#peer-id"),
        ("Peers", "form"),
        ("Apps", "table"),
        ("Contexts", "table"),
        ("Blobs", "form"),
    ]:
        page.get_by_role("link", name=view, exact=True).click()
        expect(page.get_by_role("heading", level=1)).to_have_text(view)
        expect(page.locator(f"#view {ready}").first).to_be_visible()
        no_horizontal_overflow(page)


def test_the_main_views_work_from_the_keyboard(open_page: OpenPage, nodes: list[LiveNode]) -> None:
    page = open_page(nodes[0].page_url())
    sign_in(page, nodes[0])
    install_kv_store(page)

    def tab_to(name: str) -> None:
        # Tab forward (a bounded number of times) until the control named `name` has focus.
        for _ in range(40):
            page.keyboard.press("Tab")
            focused = page.evaluate(
                "(document.activeElement.innerText || document.activeElement.value || '').trim()"
            )
            if focused == name:
                return
        raise AssertionError(f"Tab never reached {name!r}")

    page.evaluate("document.body.focus()")
    tab_to("Contexts")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Contexts")
    tab_to("Create context")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#/context/\w+$"))
    tab_to("Blobs")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Blobs")


def test_a_view_still_loading_does_not_take_the_keyboard_focus_back(
    open_page: OpenPage, nodes: list[LiveNode]
) -> None:
    # The contexts view shows its table, then asks for each context's peers. Hold those answers
    # so the view is still loading while the user tabs through it: when they arrive, the focus
    # must stay where the user put it (it used to jump back to the main region).
    page = open_page(nodes[0].page_url())
    sign_in(page, nodes[0])
    install_kv_store(page)
    create_context(page)
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)

    page.route(re.compile(r"/admin-api/contexts/\w+/sync$"), hold)

    page.get_by_role("link", name="Contexts").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Contexts")
    expect(page.locator(".sync-summary").first).to_have_text("…")
    create_button = page.get_by_role("button", name="Create context")
    create_button.focus()
    assert held, "the view asked for no context's peers"
    for route in held:
        route.continue_()
    expect(page.locator(".sync-summary").first).not_to_have_text("…")
    expect(create_button).to_be_focused()
