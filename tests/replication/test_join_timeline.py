"""A join's time line (trionode/context/join_timeline.py): the joiner logs the phases of its
join once, in order, and the member those of the snapshot it served, so the bench can say
where a join's seconds go."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.replication.test_lazy_join import folded
from tests.replication.test_sync_protocols import LIMIT, folding, join
from trionode.context import join_timeline
from trionode.testing import open_cluster


def test_a_line_parses_back_to_its_marks() -> None:
    with join_timeline.timeline() as line:
        join_timeline.mark("one")
        join_timeline.mark("two")
    join_timeline.mark("outside")  # no time line: nothing happens
    parsed = join_timeline.parse(f"2026-01-01 INFO x: join of abc: {line.line()}")
    assert parsed is not None
    start, marks = parsed
    assert start == pytest.approx(line.started, abs=1e-5)
    assert [name for name, _ in marks] == ["one", "two"]
    assert all(at >= 0 for _, at in marks)
    assert marks[0][1] <= marks[1][1]
    assert join_timeline.parse("no time line here") is None


def _phases(caplog: pytest.LogCaptureFixture, marker: str) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if marker in r.getMessage()]
    assert len(lines) == 1, lines
    parsed = join_timeline.parse(lines[0])
    assert parsed is not None
    _, marks = parsed
    times = [at for _, at in marks]
    assert times == sorted(times)
    return [name for name, _ in marks]


async def test_a_join_logs_its_phases_on_both_sides(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=folding) as cluster:
            c = cluster[1]
            context = await folded(cluster, 30)
            c.sync.snapshot_page_records = 8  # several pages
            c.sync.snapshot_batch_bytes = 1  # a batch per page
            caplog.set_level(logging.INFO)
            await join(cluster, 0, 1, context)
            joiner = _phases(caplog, "join of ")
            member = _phases(caplog, " served: ")
            takes = [
                r.getMessage() for r in caplog.records if "snapshot pages of " in r.getMessage()
            ]
    expected = ["connected", "admitted", "adopted", "proved", "first_batch"]
    assert joiner[: len(expected)] == expected
    batches = [p for p in joiner if p.startswith("batch_")]
    assert len(batches) >= 4
    # (No root to check: a fresh stream from a member whose final state is not built sends
    # none, and hashes nothing: trionode/sync/snapshot.py, "Root last, or none".)
    assert joiner[len(expected) + len(batches) :] == [
        "pages_stored",
        "certified",
        "boundary_adopted",
        "synced",
        "done",
    ]
    # Where the stream of pages spent its time, once, counting the batches it stored.
    assert len(takes) == 1, takes
    assert f" {len(batches)} batches: storing " in takes[0]
    assert "waiting for pages" in takes[0]
    assert "taking pages in" in takes[0]
    assert "(the loop's CPU " in takes[0]
    assert member[0] == "first_page_read"
    assert member[-2:] == ["last_page_read", "closed"]
    assert "root_hashed" not in member
