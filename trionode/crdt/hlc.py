"""Hybrid logical clock (HLC) with NTP64 timestamps.

Theory of operation
-------------------
A timestamp's `time` is a 64-bit NTP-style fixed-point number counted from the Unix epoch:
the high 32 bits are whole seconds, the low 32 bits the fraction. The lowest
`LOGICAL_BITS` (16) bits of the fraction are not physical time but a logical counter, so one
integer carries both parts and plain integer comparison orders them.

`HybridClock.now(physical)` returns `max(physical with the counter bits cleared, last + 1)`:
when physical time has moved on the counter restarts at 0, otherwise the counter is bumped.
A counter overflow simply carries into the fraction, i.e. borrows ~15 µs of future time,
which keeps stamps unique and monotonic without any special case.

Nothing received can break the clock. A remote stamp moves it only through `update`, which
refuses one more than the drift tolerance ahead of physical time (the caller makes that
data wait), and `witness` ignores stamps that far ahead. So `last` stays within physical
time + drift (plus counter ticks) and `now()` cannot be pushed to the end of the 64-bit
range, not even by state that an older version let in stamped 2^64-1: such a stamp is never
witnessed, and local writes order by physical time below it. They succeed; a far-future
LWW value simply keeps winning over them.

Ties between writers are broken by the writer's node id: `Timestamp` is a NamedTuple
`(time, node)` and tuples compare lexicographically, so "highest (HLC, writer)" is `max()`.

The clock never reads the system time: callers pass `physical` (NTP64) in, which keeps this
module deterministic and lets tests drive it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Final, NamedTuple, cast

import msgspec

from trionode.errors import TrionodeError

FRACTION_BITS: Final = 32
LOGICAL_BITS: Final = 16
LOGICAL_MASK: Final = (1 << LOGICAL_BITS) - 1
NTP64_MAX: Final = (1 << 64) - 1
MAX_NODE_ID_BYTES: Final = 64
DEFAULT_DRIFT_TOLERANCE: Final = 5.0
"""Seconds a remote stamp may be ahead of our physical clock before we make the caller wait
(the node takes it from `sync.max_clock_drift`)."""

_NS_PER_S: Final = 1_000_000_000


def ntp64_from_unix(seconds: float) -> int:
    """Convert Unix time in seconds (e.g. `time.time()`) to NTP64."""
    if seconds < 0:
        raise ValueError("NTP64 time cannot be negative")
    whole = int(seconds)
    fraction = int((seconds - whole) * (1 << FRACTION_BITS))
    time = (whole << FRACTION_BITS) | fraction
    return time if time <= NTP64_MAX else _check_range(time)  # (a call's physical time)


def ntp64_from_unix_ns(nanoseconds: int) -> int:
    """Convert Unix time in integer nanoseconds (e.g. `time.time_ns()`) to NTP64, exactly."""
    if nanoseconds < 0:
        raise ValueError("NTP64 time cannot be negative")
    # = (whole seconds << 32) | (rest << 32) // 10^9: the fraction part is below 2^32.
    time = (nanoseconds << FRACTION_BITS) // _NS_PER_S
    return time if time <= NTP64_MAX else _check_range(time)  # (a transaction per call)


def unix_from_ntp64(time: int) -> float:
    """Convert NTP64 (logical bits included) back to Unix seconds."""
    return time / (1 << FRACTION_BITS)


def ntp64_duration(seconds: float) -> int:
    """A duration in seconds as an NTP64 delta (for tolerances, horizons)."""
    if seconds < 0:
        raise ValueError("durations cannot be negative")
    return int(seconds * (1 << FRACTION_BITS))


def ntp64_seconds(duration: int) -> float:
    """An NTP64 duration in seconds, rounded up to the next nanosecond (so waiting that long
    always suffices)."""
    return -(-duration * _NS_PER_S // (1 << FRACTION_BITS)) / _NS_PER_S


def _check_range(time: int) -> int:
    if not 0 <= time <= NTP64_MAX:
        raise ValueError(f"time {time} does not fit in 64 bits")
    return time


class Timestamp(NamedTuple):
    """An HLC stamp. Ordered by (time, node): the writer id breaks ties deterministically.

    It doubles as the id of RGA elements and as the stamp of LWW values and tombstones.
    """

    time: int
    """NTP64 time; the low `LOGICAL_BITS` bits are the logical counter."""
    node: Annotated[bytes, msgspec.Meta(max_length=MAX_NODE_ID_BYTES)]
    """The writer: the node/member id that produced this stamp."""

    @property
    def physical(self) -> int:
        """The physical part (logical counter bits cleared)."""
        return self.time & ~LOGICAL_MASK

    @property
    def logical(self) -> int:
        """The logical counter."""
        return self.time & LOGICAL_MASK


new_stamp: Final = cast(
    "Callable[[tuple[int, bytes]], Timestamp]", partial(tuple.__new__, Timestamp)
)
"""A `Timestamp` without the NamedTuple's Python-level `__new__` (runs once per write)."""


class ClockDriftError(TrionodeError):
    """A remote stamp is further in the future than the drift tolerance allows.

    The data is valid: the caller should wait `wait_seconds` (then retry), never drop it.
    """

    def __init__(self, remote: Timestamp, physical: int, wait: int) -> None:
        self.remote = remote
        """The offending stamp."""
        self.physical = physical
        """Our physical time (NTP64) when we checked."""
        self.wait = wait
        """NTP64 delta after which `remote` is within tolerance."""
        super().__init__(f"remote stamp is {self.wait_seconds:.3f}s beyond the drift tolerance")

    @property
    def wait_seconds(self) -> float:
        """How long to wait, in seconds (rounded up to the next nanosecond)."""
        return ntp64_seconds(self.wait)


class HybridClock:
    """A node's HLC. Not thread-safe; one per writer identity.

    Args:
        node_id: the writer id put in every stamp (1..64 bytes, unique per writer).
        drift_tolerance: seconds a remote stamp may lead our physical clock.
        last: the highest time already issued (restore it after a restart; a `StateTree`
            also re-witnesses its newest stamp when a transaction begins). Not checked
            against drift: pass only a time this node issued.
    """

    __slots__ = ("_drift", "_node", "last", "node_id")

    def __init__(
        self, node_id: bytes, drift_tolerance: float = DEFAULT_DRIFT_TOLERANCE, *, last: int = 0
    ) -> None:
        if not 1 <= len(node_id) <= MAX_NODE_ID_BYTES:
            raise ValueError(f"node id must be 1..{MAX_NODE_ID_BYTES} bytes")
        self._node = bytes(node_id)
        self.node_id: Final = self._node
        """The writer id (a plain attribute: a transaction reads it as it begins)."""
        self._drift = ntp64_duration(drift_tolerance)
        self.last = _check_range(last)
        """The highest time issued or witnessed so far (a plain attribute: a transaction
        reads it as it begins). Read-only."""

    @property
    def drift(self) -> int:
        """The drift tolerance as an NTP64 duration."""
        return self._drift

    def excess(self, time: int, physical: int) -> int:
        """How far (NTP64) `time` lies beyond physical time + drift; <= 0 when within."""
        return time - physical - self._drift

    def now(self, physical: int) -> Timestamp:
        """Tick: a fresh stamp greater than every stamp issued or witnessed before."""
        if not 0 <= physical <= NTP64_MAX:
            _check_range(physical)  # raises
        time = physical & ~LOGICAL_MASK
        last = self.last + 1
        if last > time:
            time = last
            if time > NTP64_MAX:
                _check_range(time)  # raises
        self.last = time  # (inlined `_issue`: this runs once per write)
        return new_stamp((time, self._node))

    def update(self, remote: Timestamp, physical: int) -> Timestamp:
        """Receive: advance past `remote` and return a stamp for the receive event.

        Raises:
            ClockDriftError: `remote` is more than the drift tolerance ahead of `physical`;
                nothing changed, the caller delays the remote data by `wait_seconds`.
        """
        _check_range(physical)
        excess = remote.time - physical - self._drift
        if excess > 0:
            raise ClockDriftError(remote, physical, excess)
        return self._issue(max(physical & ~LOGICAL_MASK, self.last + 1, remote.time + 1))

    def witness(self, stamp: Timestamp | None, physical: int) -> None:
        """Make later stamps exceed `stamp`, unless it lies beyond the drift tolerance.

        For stamps that are already part of accepted state (loaded from disk, or applied
        earlier): local writes must order after everything the replica holds, or a local
        RGA insert could land behind a newer sibling and a local set could lose to a value
        the user already saw. Accepted state is never stamped beyond physical time + drift
        (received data further ahead waits), so a stamp beyond it came from an older version
        or a clock that has since stepped back: following it could push the clock to the
        end of its range, so it is ignored (local writes then order below it).
        """
        if stamp is None or stamp.time <= self.last:
            return
        if self.excess(stamp.time, _check_range(physical)) <= 0:
            self.last = stamp.time

    def now_after(self, stamp: Timestamp, physical: int) -> Timestamp:
        """`witness(stamp, physical)`, then `now(physical)`, in one call (a keystroke
        continuing its writer's run witnesses the id it took, then stamps the record)."""
        if not 0 <= physical <= NTP64_MAX:
            _check_range(physical)  # raises
        last = self.last
        if stamp.time > last and stamp.time - physical - self._drift <= 0:
            last = self.last = stamp.time
        time = physical & ~LOGICAL_MASK
        last += 1
        if last > time:
            time = last
            if time > NTP64_MAX:
                _check_range(time)  # raises
        self.last = time
        return new_stamp((time, self._node))

    def _issue(self, time: int) -> Timestamp:
        self.last = _check_range(time)
        return Timestamp(time, self._node)


def latest(a: Timestamp | None, b: Timestamp | None) -> Timestamp | None:
    """The later of two optional stamps (`None` is "never")."""
    if a is None:
        return b
    if b is None:
        return a
    return b if b > a else a  # noqa: FURB136  # max() without the call: runs per record
