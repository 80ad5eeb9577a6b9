"""PN-counter state: one increment and one decrement slot per writer, join = max per slot.

Each writer only ever writes its own slot and its slot values only grow, so "max per slot"
loses nothing and counts nothing twice: concurrent increments sum exactly.

Reset after a removal: a counter that is the value of a removed map entry must read 0 if the
key comes back later, yet slots cannot shrink. So each slot also records `since`, the stamp
that started the writer's current run. A removal of an enclosing entry at HLC `floor` hides
every slot with `since <= floor`; the writer's next write starts a new run (`since` = that
write's stamp), and a newer run replaces an older one in the join.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NamedTuple

from trionode.crdt.canonical import canonical
from trionode.crdt.hlc import Timestamp

U64_MAX: Final = (1 << 64) - 1


class Slot(NamedTuple):
    since: Timestamp
    """Stamp of the first write of this run (the writer is `since.node`)."""
    inc: int
    dec: int


def join_slot(a: Slot, b: Slot) -> Slot:
    """The newer run wins whole; within one run each total only grows, so take the max."""
    if a.since != b.since:
        return a if a.since > b.since else b
    if a == b:
        return a
    return Slot(a.since, max(a.inc, b.inc), max(a.dec, b.dec))


class CounterState:
    """Slots keyed by writer id. Mutable (`merge`) for the tree; `join` is the pure form."""

    __slots__ = ("_slots",)

    def __init__(self, slots: Mapping[bytes, Slot] | None = None) -> None:
        self._slots: dict[bytes, Slot] = dict(slots) if slots else {}

    @property
    def slots(self) -> Mapping[bytes, Slot]:
        return MappingProxyType(self._slots)

    def copy(self) -> CounterState:
        return CounterState(self._slots)

    def is_empty(self) -> bool:
        return not self._slots

    def merge(self, other: CounterState) -> bool:
        """Join `other` into self; returns whether anything changed."""
        changed = False
        for writer, slot in other._slots.items():
            mine = self._slots.get(writer)
            new = slot if mine is None else join_slot(mine, slot)
            if new != mine:
                self._slots[writer] = new
                changed = True
        return changed

    def join(self, other: CounterState) -> CounterState:
        result = self.copy()
        result.merge(other)
        return result

    def live_slots(self, floor: Timestamp | None) -> list[tuple[bytes, Slot]]:
        """Slots not hidden by a removal at `floor`, sorted by writer."""
        return sorted((w, s) for w, s in self._slots.items() if floor is None or s.since > floor)

    def value(self, floor: Timestamp | None = None) -> int:
        """Sum of increments minus sum of decrements over the visible slots."""
        return sum(s.inc - s.dec for _, s in self.live_slots(floor))

    def delta(
        self, stamp: Timestamp, floor: Timestamp | None, *, inc: int = 0, dec: int = 0
    ) -> CounterState:
        """The delta-state of the writer `stamp.node` adding `inc` and `dec`.

        Raises:
            ValueError: negative amounts, or a slot would overflow 64 bits.
        """
        if inc < 0 or dec < 0:
            raise ValueError("counter amounts must be non-negative")
        mine = self._slots.get(stamp.node)
        if mine is None or (floor is not None and mine.since <= floor):
            slot = Slot(stamp, inc, dec)  # first write, or first write after a reset
        else:
            slot = Slot(mine.since, mine.inc + inc, mine.dec + dec)
        if slot.inc > U64_MAX or slot.dec > U64_MAX:
            raise ValueError("counter slot overflows 64 bits")
        return CounterState({stamp.node: slot})

    def wire(self) -> list[tuple[bytes, Timestamp, int, int]]:
        """Canonical form: every slot, sorted by writer."""
        return [(w, s.since, s.inc, s.dec) for w, s in sorted(self._slots.items())]

    def hash_form(self, floor: Timestamp | None) -> list[tuple[bytes, Timestamp, int, int]]:
        return [(w, s.since, s.inc, s.dec) for w, s in self.live_slots(floor)]

    def canonical(self) -> bytes:
        return canonical(self.wire())

    def max_stamp(self) -> Timestamp | None:
        return max((s.since for s in self._slots.values()), default=None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CounterState) and self._slots == other._slots

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CounterState({self._slots!r})"
