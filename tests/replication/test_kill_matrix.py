"""The kill -9 matrix (issue 11) with real `trionode start` processes on loopback:
`benchmarks.kill_matrix` kills a node with SIGKILL at each moment, restarts it on its
home, and checks that the members converge with no acknowledged write lost (and that the
kills meant to land inside a sync session or a snapshot did). One case runs
by default (a write in flight on the killed node); `-m slow` runs the whole matrix.
`python -m benchmarks.kill_matrix` prints the same matrix as a table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.kill_matrix import CASES, CaseResult, run_matrix

pytestmark = pytest.mark.real_network


def _assert_sound(results: list[CaseResult]) -> None:
    for r in results:
        assert r.converged, f"{r.case}: no convergence after killing {r.victim} ({r.note})"
        assert r.missing_after_restart == 0, f"{r.case}: acknowledged writes not on disk"
        assert r.lost == 0, f"{r.case}: acknowledged writes lost"
        assert r.acknowledged > 0
        # The in-session kills are shown (by /metrics and the datastore) to land inside it.
        assert r.inside is not False, f"{r.case}: the kill missed the session ({r.note})"


async def test_sigkill_during_local_writes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    results = await run_matrix(tmp_path, ["local-writes"])
    assert [r.case for r in results] == ["local-writes"]
    _assert_sound(results)


@pytest.mark.slow
async def test_the_whole_kill_matrix(tmp_path: Path) -> None:
    results = await run_matrix(tmp_path, list(CASES))
    assert [r.case for r in results] == list(CASES)
    _assert_sound(results)
    assert {r.case for r in results if r.inside} == {"serving-sync", "snapshot-join"}
