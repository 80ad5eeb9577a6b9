"""What the browser tests do on the page, step by step (shared by the test modules)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.browser.conftest import LiveNode, OpenPage

ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "apps"
KV_STORE = APPS / "kv_store"
SCREENSHOTS = os.environ.get("TRIONODE_SCREENSHOTS")
"""A directory: the happy-path test also saves the README's screenshots there."""


def shoot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=Path(SCREENSHOTS) / f"{name}.png", full_page=True)


def sign_in(page: Page, node: LiveNode) -> None:
    page.get_by_label("API token").fill(node.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#peer-id")).to_have_text(node.peer_id)


def install_kv_store(page: Page) -> None:
    page.get_by_role("link", name="Apps").click()
    page.get_by_label("Bundle path").fill(str(KV_STORE))
    page.get_by_role("button", name="Install", exact=True).click()
    expect(page.locator("#notice")).to_contain_text("Installed kv_store")


def create_context(page: Page) -> str:
    page.get_by_role("link", name="Contexts").click()
    page.get_by_role("button", name="Create context").click()
    expect(page).to_have_url(re.compile(r"#/context/\w+$"))
    expect(page.get_by_role("heading", level=1)).to_contain_text("Context ")
    match = re.search(r"#/context/(\w+)$", page.url)
    assert match is not None, page.url
    return match.group(1)


def call(page: Page, method: str, **args: str) -> str:
    form = page.locator(f'form[data-method="{method}"]')
    for name, value in args.items():
        form.get_by_label(name, exact=False).first.fill(value)
    form.get_by_role("button").click()
    result = form.locator(".result")
    expect(result).to_be_visible()
    return result.inner_text()


def invite(page: Page) -> str:
    """On a context's page: make an invitation (the form's defaults) and return it."""
    page.get_by_role("button", name="Invite").click()
    invitation = page.get_by_label("Invitation", exact=True)
    expect(invitation).to_have_value(re.compile(r"^trinv"))
    return invitation.input_value()


def join(page: Page, invitation: str) -> str:
    """Join with an invitation on the Contexts view; returns the joined context's id."""
    page.get_by_role("link", name="Contexts").click()
    page.get_by_label("Invitation").fill(invitation)
    page.get_by_role("button", name="Join").click()
    expect(page).to_have_url(re.compile(r"#/context/\w+$"))
    return page.url.rsplit("/", 1)[1]


def no_horizontal_overflow(page: Page) -> None:
    """Nothing wider than the window (tables and the graph scroll inside their boxes)."""
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{page.url} is {overflow}px wider than the window"


def context_page(open_page: OpenPage, node: LiveNode) -> tuple[Page, str]:
    """A signed-in page on `node` showing a new kv_store context, and that context's id."""
    page = open_page(node.page_url())
    sign_in(page, node)
    install_kv_store(page)
    return page, create_context(page)


def second_page(open_page: OpenPage, node: LiveNode) -> Page:
    """A signed-in page on another node, with kv_store installed (a node runs only bundles
    its operator installed), ready to join."""
    page = open_page(node.page_url())
    sign_in(page, node)
    install_kv_store(page)
    return page
