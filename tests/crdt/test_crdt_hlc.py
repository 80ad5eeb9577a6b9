from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trionode.crdt import (
    ClockDriftError,
    HybridClock,
    Timestamp,
    ntp64_duration,
    ntp64_from_unix,
    ntp64_from_unix_ns,
    unix_from_ntp64,
)
from trionode.crdt.hlc import LOGICAL_MASK, NTP64_MAX

T0 = ntp64_from_unix(1_700_000_000.5)
SECOND = 1 << 32


def test_conversions() -> None:
    assert ntp64_from_unix(1.5) == (1 << 32) | (1 << 31)
    assert ntp64_from_unix_ns(1_500_000_000) == (1 << 32) | (1 << 31)
    assert unix_from_ntp64(ntp64_from_unix(1_700_000_000.25)) == pytest.approx(1_700_000_000.25)
    assert ntp64_duration(5.0) == 5 * SECOND
    with pytest.raises(ValueError, match="negative"):
        ntp64_from_unix(-1.0)


@given(st.integers(0, (2**32 - 1) * 10**9))
def test_ns_conversion_is_monotonic_and_close(ns: int) -> None:
    t = ntp64_from_unix_ns(ns)
    assert ntp64_from_unix_ns(ns + 1) >= t
    assert abs(unix_from_ntp64(t) * 1e9 - ns) <= max(1.0, ns * 1e-15)


def test_now_is_strictly_monotonic_and_counts_in_the_low_bits() -> None:
    clock = HybridClock(b"n")
    a = clock.now(T0)
    b = clock.now(T0)  # same physical time: logical counter ticks
    c = clock.now(T0 - SECOND)  # physical time went backwards: still ticks forward
    assert a < b < c
    assert a.logical == 0
    assert (b.physical, b.logical) == (a.physical, 1)
    assert c.logical == 2
    d = clock.now(T0 + SECOND)  # physical time moved on: counter restarts
    assert d.logical == 0
    assert d.physical == (T0 + SECOND) & ~LOGICAL_MASK


def test_counter_overflow_carries_into_time() -> None:
    clock = HybridClock(b"n", last=(T0 & ~LOGICAL_MASK) | LOGICAL_MASK)
    stamp = clock.now(T0)
    assert stamp.logical == 0
    assert stamp.physical > T0 & ~LOGICAL_MASK


def test_order_is_time_then_writer() -> None:
    assert Timestamp(5, b"b") > Timestamp(5, b"a")
    assert Timestamp(6, b"a") > Timestamp(5, b"b")


def test_update_advances_past_remote() -> None:
    clock = HybridClock(b"local")
    remote = Timestamp(T0 + 2 * SECOND, b"remote")  # ahead, but within 5 s
    received = clock.update(remote, T0)
    assert received > remote
    assert clock.now(T0) > received


def test_update_with_older_remote_still_ticks() -> None:
    clock = HybridClock(b"local")
    first = clock.now(T0)
    received = clock.update(Timestamp(T0 - SECOND, b"r"), T0)
    assert received > first


def test_drift_beyond_tolerance_raises_with_wait() -> None:
    clock = HybridClock(b"local", drift_tolerance=5.0)
    before = clock.last
    remote = Timestamp(T0 + 8 * SECOND, b"r")
    with pytest.raises(ClockDriftError) as info:
        clock.update(remote, T0)
    assert info.value.remote == remote
    assert info.value.wait_seconds == pytest.approx(3.0, abs=1e-6)
    assert clock.last == before  # nothing changed: the caller delays and retries
    # once physical time has caught up, the same stamp is accepted
    assert clock.update(remote, T0 + 3 * SECOND) > remote


def test_witness_moves_clock_past_stamps_within_drift() -> None:
    clock = HybridClock(b"local", drift_tolerance=5.0)
    near = Timestamp(T0 + 4 * SECOND, b"r")
    clock.witness(near, T0)
    assert clock.now(T0) > near


@pytest.mark.parametrize("ahead", [6 * SECOND, 3600 * SECOND, NTP64_MAX - T0])
def test_witness_ignores_stamps_beyond_drift_so_now_never_overflows(ahead: int) -> None:
    clock = HybridClock(b"local", drift_tolerance=5.0)
    first = clock.now(T0)
    clock.witness(Timestamp(T0 + ahead, b"r"), T0)
    assert clock.last == first.time
    stamps = [clock.now(T0) for _ in range(3)]
    assert first < stamps[0] < stamps[1] < stamps[2]
    assert stamps[-1].time < T0 + SECOND


def test_update_refuses_the_end_of_the_range_and_leaves_the_clock_alone() -> None:
    clock = HybridClock(b"local")
    with pytest.raises(ClockDriftError):
        clock.update(Timestamp(NTP64_MAX, b"r"), T0)
    assert clock.now(T0).time == T0 & ~LOGICAL_MASK


def test_excess_measures_the_lead_beyond_drift() -> None:
    clock = HybridClock(b"local", drift_tolerance=5.0)
    assert clock.excess(T0 + 5 * SECOND, T0) == 0
    assert clock.excess(T0 + 7 * SECOND, T0) == 2 * SECOND
    assert clock.excess(T0, T0) < 0


def test_node_id_is_validated() -> None:
    with pytest.raises(ValueError, match="node id"):
        HybridClock(b"")
    with pytest.raises(ValueError, match="node id"):
        HybridClock(b"x" * 65)


@given(st.integers(0, 2**32 * 10**9 - 1))
def test_ns_conversion_is_whole_seconds_then_the_fraction(ns: int) -> None:
    """One floor division gives what the two-part definition gives: the seconds in the
    high 32 bits, the fraction of the rest in the low 32."""
    whole, rest = divmod(ns, 10**9)
    assert ntp64_from_unix_ns(ns) == (whole << 32) | ((rest << 32) // 10**9)


_TIMES = st.one_of(
    st.integers(T0 - 10 * SECOND, T0 + 10 * SECOND),  # around now, within the drift or not
    st.integers(0, NTP64_MAX),
)


@given(last=_TIMES, stamp=_TIMES, physical=_TIMES, node=st.sampled_from([b"a", b"n", b"z"]))
def test_now_after_is_witness_then_now(last: int, stamp: int, physical: int, node: bytes) -> None:
    """`now_after` (a keystroke continuing a run) issues what `witness` then `now` issue,
    leaves the clock where they leave it, and raises where they raise, for stamps within
    the drift tolerance, beyond it, and at the end of the range."""
    fused = HybridClock(b"n", last=last)
    twin = HybridClock(b"n", last=last)
    seen = Timestamp(stamp, node)
    try:
        twin.witness(seen, physical)
        expected: Timestamp | None = twin.now(physical)
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError, match="64 bits"):
            fused.now_after(seen, physical)
        return
    assert fused.now_after(seen, physical) == expected
    assert fused.last == twin.last
