"""What the browser tests do on the page, step by step (shared by the test modules)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.browser.conftest import LiveNode

ROOT = Path(__file__).resolve().parents[2]
KV_STORE = ROOT / "apps" / "kv_store"
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
    page.get_by_role("button", name="Install").click()
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
