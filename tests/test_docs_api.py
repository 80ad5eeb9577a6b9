"""docs/api.md's Python client example, run as written against a live node."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trionode.testing import open_test_node

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")

pytestmark = pytest.mark.real_network


def first_python_block(after: str) -> str:
    match = re.search(r"```python\n(.*?)```", DOC.split(after, 1)[1], re.DOTALL)
    assert match is not None, after
    return match.group(1)


async def test_the_python_client_example_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace: dict[str, Any] = {}
    exec(first_python_block("## The Python client"), namespace)
    example: Callable[[str, str, str], Awaitable[None]] = namespace["main"]
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "home") as node:
            await example(node.api_url, node.token, str(ROOT / "apps" / "kv_store"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("kv_store 0.1.0 ")
    assert re.fullmatch(r"wrote delta [0-9a-f]{64}", lines[1])
    assert lines[2] == "1"
    assert lines[3] == "refused: -32601"
    assert re.fullmatch(r"\[\('\w+', 'admin'\)\]", lines[4])
    # The context's creation, then the write (with the app's event).
    assert lines[5:] == ["1 []", "2 ['Inserted']"]
