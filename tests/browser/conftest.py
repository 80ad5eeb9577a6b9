"""Browser tests: Debian's Chromium driven by Playwright, against real nodes on loopback.

One browser for the whole session (it is the slow part to start). The nodes run in a
background thread with their own `trio.run`, because Playwright's sync API runs its own
event loop on the test's thread. Each test gets a fresh browser context (no cookies
shared) and, when it fails, leaves a screenshot of every page it opened in
`build/browser-failures/`.

`make test` installs Chromium (apt, as root) before the tests run. Where it is missing
the tests skip, except under CI (`CI` set), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from trionode.testing import open_test_nodes

ROOT = Path(__file__).resolve().parents[2]
FAILURES = ROOT / "build" / "browser-failures"
CHROMIUM = os.environ.get("TRIONODE_CHROMIUM") or shutil.which("chromium")

if CHROMIUM is None:
    reason = "the browser tests need Chromium (make browser installs it: apt-get install chromium)"
    if os.environ.get("CI"):
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


# The machine running the suite may be busy (CI on two shared cores): wait up to 20 s for
# what the page should show, instead of Playwright's 5 s.
expect.set_options(timeout=20_000)


@attrs.frozen
class LiveNode:
    url: str
    token: str
    peer_id: str

    def page_url(self) -> str:
        return f"{self.url}/admin/"


class NodesThread:
    """`n` nodes (API on loopback) running in a thread until `stop()`."""

    def __init__(self, base: Path, n: int) -> None:
        self._base = base
        self._n = n
        self._ready: queue.Queue[list[LiveNode] | BaseException] = queue.Queue()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, name="browser-test-nodes", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self._ready.put(exc)

    async def _main(self) -> None:
        async with open_test_nodes(self._n, self._base) as nodes:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._ready.put([LiveNode(n.api_url, n.token, n.node.peer_id) for n in nodes])
            await self._stop.wait()

    def start(self) -> list[LiveNode]:
        self._thread.start()
        result = self._ready.get(timeout=60)
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            self._token.run_sync_soon(self._stop.set)
        self._thread.join(timeout=60)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LiveNode]]:
    thread = NodesThread(tmp_path_factory.mktemp("browser-nodes"), 2)
    started = thread.start()
    yield started
    thread.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()

OpenPage = Callable[..., Page]


@pytest.fixture
def open_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[OpenPage]:
    """Open pages in fresh browser contexts; screenshots of all of them if the test fails."""
    contexts: list[BrowserContext] = []
    pages: list[Page] = []

    def open_one(url: str, *, width: int = 1280, height: int = 800) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(20_000)
        contexts.append(context)
        page = context.new_page()
        pages.append(page)
        page.goto(url)
        return page

    yield open_one
    if request.node.stash.get(FAILED, False):
        FAILURES.mkdir(parents=True, exist_ok=True)
        for i, page in enumerate(pages):
            page.screenshot(path=FAILURES / f"{request.node.name}-{i}.png", full_page=True)
    for context in contexts:
        context.close()
