from __future__ import annotations

import pytest
import trio

from trionode.demo import run_demo

pytestmark = pytest.mark.real_network


async def test_demo_converges_three_nodes() -> None:
    lines: list[str] = []
    with trio.fail_after(60):
        result = await run_demo(3, say=lines.append)
    assert result["entries"] == {f"from-node{i}": f"hello {i}" for i in range(3)}
    assert any("converged" in line for line in lines)
    steps = result["steps"]
    assert isinstance(steps, list)
    assert steps[-1]["step"] == "converged"
