"""Finality as the node reports it: per-context status for the admin API, and the lag
gauges (`trionode_finality_lag_deltas`, `trionode_finality_lag_seconds`). The rule itself
is `trionode.auth.finality`; the authority of each replica computes it.

Lag is what the undo log holds: data deltas whose verdict may still change because some
ever-admin has not yet acknowledged them. `lag_seconds` is the age of the oldest of them,
by its HLC against our wall clock (0 when nothing waits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
import base58
from prometheus_client import CollectorRegistry, Gauge

from trionode.context.authority import ContextAuthority
from trionode.crdt.hlc import ntp64_from_unix, ntp64_seconds


@attrs.frozen
class FinalityLag:
    final_deltas: int
    non_final_deltas: int
    lag_seconds: float


def lag_of(authority: ContextAuthority, now: float) -> FinalityLag:
    """How far finality trails what `authority` holds, at Unix time `now`."""
    pending = authority.non_final_data()
    data = sum(1 for m in authority.meta.values() if not m.op)
    seconds = 0.0
    if pending:
        oldest = min(m.hlc for _, m in pending)
        seconds = max(0.0, ntp64_seconds(max(0, ntp64_from_unix(now) - oldest)))
    return FinalityLag(data - len(pending), len(pending), seconds)


def finality_json(authority: ContextAuthority, now: float) -> dict[str, Any]:
    """The admin API's view of a context's finality."""
    f = authority.finality()
    lag = lag_of(authority, now)

    def keys(members: Iterable[bytes]) -> list[str]:
        return sorted(base58.b58encode(m).decode("ascii") for m in members)

    return {
        "finalDeltas": lag.final_deltas,
        "nonFinalDeltas": lag.non_final_deltas,
        "lagSeconds": round(lag.lag_seconds, 3),
        "ackSet": keys(f.ack_set),
        "waitingFor": keys(f.waiting_for),
        "retired": keys(f.retired),
        "finalFrontier": {t.hex(): seq for t, seq in sorted(f.final.items())},
        "checkpoints": len(authority.checkpoint_vv),
    }


class FinalityMetrics:
    """Gauges read at scrape time over the contexts loaded in memory."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        authorities: Callable[[], Iterable[ContextAuthority]],
        wall_clock: Callable[[], float],
    ) -> None:
        self._authorities = authorities
        self._wall_clock = wall_clock
        deltas = Gauge(
            "trionode_finality_lag_deltas",
            "Data deltas not yet final (kept for undo), summed over loaded contexts",
            registry=registry,
        )
        deltas.set_function(lambda: sum(lag.non_final_deltas for lag in self._lags()))
        seconds = Gauge(
            "trionode_finality_lag_seconds",
            "Age of the oldest data delta not yet final, over loaded contexts",
            registry=registry,
        )
        seconds.set_function(lambda: max((lag.lag_seconds for lag in self._lags()), default=0))

    def _lags(self) -> list[FinalityLag]:
        now = self._wall_clock()
        return [lag_of(a, now) for a in self._authorities()]
