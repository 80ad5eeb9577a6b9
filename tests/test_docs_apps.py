"""docs/apps.md's tutorial, run as written: its counter bundle and its example test."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trionode.client import ApiError
from trionode.testing import open_test_node

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "apps.md").read_text(encoding="utf-8")


def block_after(heading: str, language: str) -> str:
    """The first ```language block after the line containing `heading`."""
    rest = DOC.split(heading, 1)[1]
    match = re.search(rf"```{language}\n(.*?)```", rest, re.DOTALL)
    assert match is not None, heading
    return match.group(1)


def write_counter(folder: Path) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(block_after("`~/counter/manifest.json`:", "json"))
    (folder / "counter.py").write_text(block_after("`~/counter/counter.py`:", "python"))
    return folder


pytestmark = pytest.mark.real_network


async def test_the_tutorials_example_test_passes(tmp_path: Path) -> None:
    counter = write_counter(tmp_path / "counter")
    source = block_after("### 7. Test it", "python")
    assert 'COUNTER = Path.home() / "counter"' in source
    namespace: dict[str, Any] = {}
    exec(source.replace('Path.home() / "counter"', repr(str(counter))), namespace)
    test: Callable[[Path], Awaitable[None]] = namespace["test_two_members_count_together"]
    (tmp_path / "nodes").mkdir()
    with trio.fail_after(120):
        await test(tmp_path / "nodes")


async def test_the_counter_behaves_as_the_tutorial_says(tmp_path: Path) -> None:
    counter = write_counter(tmp_path / "counter")
    assert json.loads((counter / "manifest.json").read_text())["entry"] == "counter:app"
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "home") as node, node.client() as client:
            app = await client.install_application(str(counter))
            shown = await client.application(app.application_id)
            docs = {e.name: e.doc for e in shown.entry_points}
            assert docs["increase"] == "Add `by` (1 if omitted) and return the new value."
            ctx = (await client.create_context(app.application_id)).context_id
            assert (await client.call(ctx, "increase", {"by": 2})).output == 2
            assert (await client.call(ctx, "increase", {})).output == 3
            await client.call(ctx, "rename", {"label": "visitors"})
            assert (await client.call(ctx, "describe", {})).output == "visitors: 3"
            with pytest.raises(ApiError, match="`by` must be at least 1"):
                await client.call(ctx, "increase", {"by": 0})
            assert (await client.call(ctx, "value", {})).output == 3
