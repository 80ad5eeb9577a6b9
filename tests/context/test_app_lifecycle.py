"""Installing, describing and uninstalling applications over the API (and how the CLI shows them).

A broken bundle is refused at `app install` with the reason (400), not later at
`context create` as a 500.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from trionode import schemas
from trionode.cli_contexts import _render_app
from trionode.client import ApiError
from trionode.testing import open_test_node

APPS = Path(__file__).resolve().parents[2] / "apps"

pytestmark = pytest.mark.real_network

MANIFEST = {"name": "broken", "version": "1", "entry": "broken:app"}
GOOD_HEAD = "from trionode.sdk import App, Counter, LwwRegister\napp = App('broken')\n"


def bundle(tmp_path: Path, source: str, manifest: dict[str, str] = MANIFEST) -> str:
    folder = tmp_path / f"bundle{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "broken.py").write_text(source)
    return str(folder)


BROKEN = [
    ("def oops(:\n", "importing broken failed: SyntaxError"),
    ("import no_such_module_here\n", "ModuleNotFoundError"),
    (GOOD_HEAD.replace("app = ", "other = "), "broken:app is not an App (got NoneType)"),
    (
        GOOD_HEAD.replace("App('broken')", "App('renamed')"),
        "broken:app is App('renamed'); the manifest says 'broken'",
    ),
    (
        GOOD_HEAD + "@app.state\nclass S:\n    n: int\n",
        "S.n: `int` is not a replicated type: wrap plain values in LwwRegister",
    ),
    (
        GOOD_HEAD
        + "@app.state\nclass S:\n    n: Counter\n    @app.method\n    def add(self, by) -> None:\n"
        "        self.n.increment(by)\n",
        "parameter `by` needs a type annotation",
    ),
    (GOOD_HEAD, "has no @app.state class"),
]


async def test_broken_bundles_are_refused_at_install_with_the_reason(tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "home") as node, node.client() as client:
            for source, reason in BROKEN:
                with pytest.raises(ApiError, match=r"^400: ") as caught:
                    await client.install_application(bundle(bundles, source))
                assert reason in str(caught.value)
            missing_entry = dict(MANIFEST, entry="nope:app")
            with pytest.raises(ApiError, match=r"entry module .nope. has no nope\.py"):
                await client.install_application(bundle(bundles, GOOD_HEAD, missing_entry))
            # Paths that are not bundles at all (found by schemathesis: a NUL was a 500, and
            # a device would have been read forever).
            for path, reason in (("a\0b", "NUL"), ("/dev/zero", "not a directory or a regular")):
                with pytest.raises(ApiError, match=r"^400: ") as caught:
                    await client.install_application(path)
                assert reason in str(caught.value)
            # Nothing half-installed is left behind.
            assert (await client.applications()).applications == []


async def test_app_show_lists_the_interface_with_types_and_docstrings(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "home") as node, node.client() as client:
            installed = await client.install_application(str(APPS / "kv_store"))
            shown = await client.application(installed.application_id)
    assert shown.name == "kv_store"
    assert shown.state == {
        "items": "UnorderedMap[str, LwwRegister[str]]",
        "handled": "Counter",
    }
    entries = {e.name: e for e in shown.entry_points}
    assert entries["remove"] == schemas.EntryPoint(
        name="remove",
        kind="method",
        params=[schemas.Parameter(name="key", type="str", required=True)],
        returns="str | None",
        doc="Remove `key`; returns its old value (null if it was missing).",
    )
    assert entries["get"].kind == "view"
    assert entries["count_event"].events == ["Inserted", "Updated", "Removed", "Cleared"]
    text = _render_app(shown)
    assert "methods:\n  set(key: " in text
    assert "views:\n  get(key: str) -> str | None\n      The value of `key`, or null." in text
    assert "count_event() -> None  (on Inserted, Updated, Removed, Cleared)" in text


async def test_uninstall_is_refused_while_a_context_uses_the_app(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "home") as node, node.client() as client:
            kv = (await client.install_application(str(APPS / "kv_store"))).application_id
            notes = (await client.install_application(str(APPS / "notes"))).application_id
            context = (await client.create_context(kv)).context_id

            assert await client.uninstall_application(notes) == schemas.Uninstalled(
                uninstalled=notes, contexts=[]
            )
            with pytest.raises(ApiError, match=f"^409: .*used by 1 context.*{context}"):
                await client.uninstall_application(kv)
            assert [a.application_id for a in (await client.applications()).applications] == [kv]
            assert await client.uninstall_application(kv, force=True) == schemas.Uninstalled(
                uninstalled=kv, contexts=[context]
            )
            assert (await client.applications()).applications == []
            with pytest.raises(ApiError, match=r"^404: application .* is not installed"):
                await client.uninstall_application(kv)
            with pytest.raises(ApiError, match=r"^404: "):
                await client.application(kv)
            # Installing it again brings it back under the same id.
            again = await client.install_application(str(APPS / "kv_store"))
            assert again.application_id == kv
