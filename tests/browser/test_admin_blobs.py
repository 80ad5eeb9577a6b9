"""The page's blobs view in a real browser: upload with progress, list, download, pin, delete."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import LiveNode, OpenPage
from tests.browser.pages import context_page, invite, join, second_page, shoot, sign_in

pytestmark = pytest.mark.real_network


def test_upload_list_download_pin_and_delete_a_blob(
    open_page: OpenPage, nodes: list[LiveNode], tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 4321)  # several chunks, so progress has steps
    source = tmp_path / "holiday photo.jpg"
    source.write_bytes(data)
    page = open_page(nodes[0].page_url())
    sign_in(page, nodes[0])
    page.get_by_role("link", name="Blobs").click()
    page.get_by_label("File").set_input_files(source)
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#notice")).to_contain_text("Uploaded holiday photo.jpg (3.0 MiB)")
    row = page.locator("tr", has_text="holiday photo.jpg")
    expect(row).to_contain_text("3.0 MiB")
    expect(row).to_contain_text("no")  # not pinned
    upload_bar = page.get_by_label("Upload progress")
    expect(upload_bar).to_have_attribute("value", str(len(data)))
    expect(page.locator(".progress", has=upload_bar)).to_contain_text("Uploaded 3.0 MiB of 3.0 MiB")
    blob_id = row.get_attribute("data-blob-id")
    assert blob_id is not None
    info = page.evaluate("id => fetch(`/admin-api/blobs/${id}`).then(r => r.json())", blob_id)
    assert (info["size"], info["name"], info["pinned"]) == (len(data), "holiday photo.jpg", False)

    with page.expect_download() as download_info:
        row.get_by_role("button", name="Download").click()
    download = download_info.value
    assert download.suggested_filename == "holiday photo.jpg"
    assert Path(download.path()).read_bytes() == data
    bar = page.get_by_label("Download progress")
    expect(bar).to_have_attribute("value", str(len(data)))
    expect(page.locator(".progress", has=bar)).to_contain_text("Downloaded 3.0 MiB of 3.0 MiB")

    shoot(page, "blobs")
    row.get_by_role("button", name="Pin").click()
    row = page.locator("tr", has_text="holiday photo.jpg")
    expect(row.get_by_role("button", name="Unpin")).to_be_visible()
    expect(row).to_contain_text("pinned")

    delete = row.get_by_role("button", name="Delete")
    delete.click()
    expect(delete).to_have_text("Really delete?")
    delete.click()
    expect(page.locator("#notice")).to_contain_text(re.compile(r"Deleted blob \w+"))
    expect(page.locator("tr", has_text="holiday photo.jpg")).to_have_count(0)


def test_a_member_fetches_a_blob_shared_with_a_context(
    open_page: OpenPage, nodes: list[LiveNode], tmp_path: Path
) -> None:
    first, second = nodes
    a, context = context_page(open_page, first)
    invitation = invite(a)
    b = second_page(open_page, second)
    join(b, invitation)
    data = os.urandom(200_000)
    source = tmp_path / "shared.bin"
    source.write_bytes(data)
    a.get_by_role("link", name="Blobs").click()
    a.get_by_label("File").set_input_files(source)
    a.get_by_label("Share with context").select_option(context)
    a.get_by_role("button", name="Upload").click()
    row = a.locator("tr", has_text="shared.bin")
    expect(row).to_contain_text(context[:10])
    blob_id = row.get_attribute("data-blob-id")
    assert blob_id is not None

    b.get_by_role("link", name="Blobs").click()
    b.get_by_label("Blob id").fill(blob_id)
    b.get_by_label("From the members of").select_option(context)
    b.get_by_role("button", name="Fetch").click()
    expect(b.locator("#notice")).to_contain_text("Fetched blob")
    fetched = b.locator(f'tr[data-blob-id="{blob_id}"]')
    with b.expect_download() as download_info:
        fetched.get_by_role("button", name="Download").click()
    assert Path(download_info.value.path()).read_bytes() == data
    # A blob nobody has: a sentence.
    b.get_by_label("Blob id").fill("1" * 32)
    b.get_by_role("button", name="Fetch").click()
    notice = b.locator("#notice")
    expect(notice).not_to_contain_text("Fetched")
    expect(notice).to_be_visible()
    assert not notice.inner_text().lstrip().startswith("{")
