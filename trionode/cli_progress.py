"""`trionode context join`'s progress display: the node's `snapshot_progress` notices (the
same ones WebSocket subscribers get) as one updating line on a terminal, or as plain lines,
at most one a second, when stderr is not a terminal (a log, a pipe)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

PLAIN_INTERVAL = 1.0
"""Seconds between two plain (non-terminal) progress lines."""


def size_text(n: float) -> str:
    """Bytes as people read them (binary units, one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def eta_text(seconds: float) -> str:
    return f"ETA {int(seconds) // 60}:{int(seconds) % 60:02d}"


def describe(notice: dict[str, Any]) -> str:
    """One line for a `snapshot_progress` notice: entries, bytes, rate and time left."""
    entries, total = int(notice.get("entries", 0)), int(notice.get("entriesTotal", 0))
    percent = f" ({100 * entries / total:.0f}%)" if total else ""
    parts = [
        f"snapshot: {entries:,}/{total:,} entries{percent}",
        size_text(float(notice.get("bytes", 0))),
        f"{size_text(float(notice.get('bytesPerSecond', 0)))}/s",
        f"{float(notice.get('entriesPerSecond', 0)):,.0f} entries/s",
    ]
    if notice.get("done"):
        parts.append("done")
    elif notice.get("etaSeconds") is not None:
        parts.append(eta_text(float(notice["etaSeconds"])))
    return ", ".join(parts)


class ProgressLine:
    """Shows progress notices on `out` (stderr by default: stdout carries the result)."""

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self._clock = clock
        self._width = 0
        self._last_plain: float | None = None
        self.finished = False
        """A final notice (`done`) was shown."""

    def show(self, notice: dict[str, Any]) -> None:
        self.finished = self.finished or bool(notice.get("done"))
        text = describe(notice)
        if self.tty:
            # Overwrite the previous line in place (padded over a longer previous text).
            self.out.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            now = self._clock()
            final = bool(notice.get("done"))
            recent = self._last_plain is not None and now - self._last_plain < PLAIN_INTERVAL
            if recent and not final:
                return
            self._last_plain = now
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        """End the updating line (so what follows starts on a line of its own)."""
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()
            self._width = 0
