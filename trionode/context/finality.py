"""Finality as the node reports it: per-context status for the admin API, and the lag
gauges on /metrics, one sample per loaded context (`trionode_finality_lag_deltas`,
`trionode_finality_lag_seconds`, `trionode_finality_oldest_unacked_admin_seconds`). The
rule itself is `trionode.auth.finality`; the authority of each replica computes it.

Lag is what the undo log holds: data deltas whose verdict may still change because some
ever-admin has not yet acknowledged them. `lag_seconds` is the age of the oldest of them,
by its HLC against our wall clock (0 when nothing waits). The *oldest unacked admin* is
the AckSet member whose acknowledgement lags most: the one with the oldest data delta its
counted ack does not cover. Finality cannot pass it, so that is the admin an operator has
to look at (a node that is down, or one gone for good that must be removed). The undo
log's size is bounded by `auth.max_nonfinal_bytes` (context/processing.py and
context/local_writes.py refuse new non-final deltas beyond it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import base58
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trionode.auth.finality import within
from trionode.context.authority import ContextAuthority
from trionode.crdt.hlc import ntp64_from_unix, ntp64_seconds


@attrs.frozen
class Unacked:
    """An AckSet member and the data deltas its counted ack does not cover yet."""

    admin: bytes
    seconds: float
    """Age of the oldest of them."""
    deltas: int


@attrs.frozen
class FinalityLag:
    final_deltas: int
    non_final_deltas: int
    lag_seconds: float
    non_final_bytes: int = 0
    oldest_unacked: Unacked | None = None


def _age(hlc: int, now: float) -> float:
    return max(0.0, ntp64_seconds(max(0, ntp64_from_unix(now) - hlc)))


def lag_of(authority: ContextAuthority, now: float) -> FinalityLag:
    """How far finality trails what `authority` holds, at Unix time `now`."""
    pending = authority.non_final_data()
    data = sum(1 for m in authority.meta.values() if not m.op)
    seconds = 0.0
    oldest: Unacked | None = None
    if pending:
        seconds = _age(min(m.hlc for _, m in pending), now)
        f = authority.finality()
        for admin in sorted(f.ack_set):
            ack = f.counted.get(admin)
            unacked = [m.hlc for _, m in pending if ack is None or not within(m.vv, ack)]
            if not unacked:
                continue
            candidate = Unacked(admin, _age(min(unacked), now), len(unacked))
            if oldest is None or (candidate.seconds, candidate.deltas) > (
                oldest.seconds,
                oldest.deltas,
            ):
                oldest = candidate
    return FinalityLag(
        data - len(pending), len(pending), seconds, authority.nonfinal_bytes(), oldest
    )


def _b58(raw: bytes) -> str:
    return base58.b58encode(raw).decode("ascii")


def finality_json(
    authority: ContextAuthority, now: float, *, max_nonfinal_bytes: int | None = None
) -> dict[str, Any]:
    """The admin API's view of a context's finality."""
    f = authority.finality()
    lag = lag_of(authority, now)

    def keys(members: Iterable[bytes]) -> list[str]:
        return sorted(_b58(m) for m in members)

    oldest = lag.oldest_unacked
    return {
        "finalDeltas": lag.final_deltas,
        "nonFinalDeltas": lag.non_final_deltas,
        "nonFinalBytes": lag.non_final_bytes,
        "maxNonFinalBytes": max_nonfinal_bytes,
        "lagSeconds": round(lag.lag_seconds, 3),
        "oldestUnackedAdmin": None
        if oldest is None
        else {
            "admin": _b58(oldest.admin),
            "seconds": round(oldest.seconds, 3),
            "deltas": oldest.deltas,
        },
        "ackSet": keys(f.ack_set),
        "waitingFor": keys(f.waiting_for),
        "retired": keys(f.retired),
        "finalFrontier": {t.hex(): seq for t, seq in sorted(f.final.items())},
        "checkpoints": len(authority.checkpoint_vv),
    }


class FinalityMetrics(Collector):
    """Gauges read at scrape time, one sample per context loaded in memory."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        authorities: Callable[[], Iterable[tuple[bytes, ContextAuthority]]],
        wall_clock: Callable[[], float],
    ) -> None:
        self._authorities = authorities
        self._wall_clock = wall_clock
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[Metric]:
        now = self._wall_clock()
        deltas = GaugeMetricFamily(
            "trionode_finality_lag_deltas",
            "Data deltas not yet final (kept for undo), per loaded context",
            labels=["context"],
        )
        seconds = GaugeMetricFamily(
            "trionode_finality_lag_seconds",
            "Age of the oldest data delta not yet final, per loaded context",
            labels=["context"],
        )
        size = GaugeMetricFamily(
            "trionode_finality_nonfinal_bytes",
            "Bytes of data deltas not yet final (bounded by auth.max_nonfinal_bytes)",
            labels=["context"],
        )
        admins = GaugeMetricFamily(
            "trionode_finality_oldest_unacked_admin_seconds",
            "Per loaded context, the admin (member key) whose acknowledgement lags most, "
            "and the age of the oldest data delta it has not acknowledged",
            labels=["context", "admin"],
        )
        for context_id, authority in self._authorities():
            lag = lag_of(authority, now)
            context = _b58(context_id)
            deltas.add_metric([context], lag.non_final_deltas)
            seconds.add_metric([context], lag.lag_seconds)
            size.add_metric([context], lag.non_final_bytes)
            if lag.oldest_unacked is not None:
                admin = _b58(lag.oldest_unacked.admin)
                admins.add_metric([context, admin], lag.oldest_unacked.seconds)
        yield deltas
        yield seconds
        yield size
        yield admins
