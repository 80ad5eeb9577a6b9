"""Where the seconds of one join go (issue 17): a time line of the phases it reaches.

A join spans several services (the join protocol, the sync session, the snapshot's taker,
the tail sync) and, on the member, a served snapshot stream. Each opens a `Timeline` for
its own task (`timeline`); code along the way marks the phases it reaches (`mark`: a no-op
outside one, so the same code runs for sessions that are not joins), and the owner logs
the line once when it ends (`Timeline.line`). The marks are wall-clock seconds, so the
lines of two processes on one machine fall on one axis: `benchmarks/join_bench.py` merges
the joiner's and the member's into its breakdown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import attrs

_CURRENT: ContextVar[Timeline | None] = ContextVar("join_timeline", default=None)


@attrs.define
class Timeline:
    started: float = attrs.field(factory=time.time)
    """Wall-clock seconds when it was opened."""
    marks: list[tuple[str, float]] = attrs.field(factory=list)

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time()))

    def line(self) -> str:
        """`t0=<epoch seconds> phase=+seconds ...` (phase names have no spaces)."""
        parts = [f"t0={self.started:.6f}"]
        parts += [f"{phase}=+{at - self.started:.4f}" for phase, at in self.marks]
        return " ".join(parts)


@contextmanager
def timeline() -> Iterator[Timeline]:
    """A time line for this task and the tasks it starts while it is open."""
    line = Timeline()
    token = _CURRENT.set(line)
    try:
        yield line
    finally:
        _CURRENT.reset(token)


def mark(phase: str) -> None:
    """Mark `phase` on the current task's time line, if it has one."""
    line = _CURRENT.get()
    if line is not None:
        line.mark(phase)


def parse(text: str) -> tuple[float, list[tuple[str, float]]] | None:
    """The start and marks (seconds after it) of a `Timeline.line` within `text`."""
    start: float | None = None
    marks: list[tuple[str, float]] = []
    for word in text.split():
        name, sep, value = word.partition("=")
        if not sep:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if name == "t0":
            start = number
        elif start is not None:
            marks.append((name, number))
    return None if start is None else (start, marks)
