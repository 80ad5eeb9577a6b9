"""The benchmark table: each row is a trionode figure beside a baseline measured in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import attrs


@attrs.frozen
class Row:
    case: str
    value: float
    unit: str
    baseline_name: str
    baseline: float
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        """How many times better than the baseline (>1 is better, whatever the unit)."""
        if self.value == 0 or self.baseline == 0:
            return float("nan")
        return self.value / self.baseline if self.higher_is_better else self.baseline / self.value


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:,.2f}"
    return f"{value:.4f}"


def render(rows: list[Row]) -> str:
    headers = ("case", "trionode", "baseline", "baseline is", "ratio (>1 better)")
    cells = [
        (
            r.case,
            f"{_fmt(r.value)} {r.unit}",
            f"{_fmt(r.baseline)} {r.unit}",
            r.baseline_name,
            f"{r.ratio:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *cells, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns of text padded to their widest cell, under a header and a rule."""
    widths = [max(len(c) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
