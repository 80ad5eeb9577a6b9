"""Last-writer-wins register state: the highest (HLC, writer) wins."""

from __future__ import annotations

from typing import NamedTuple

from trionode.crdt.canonical import canonical
from trionode.crdt.hlc import Timestamp


class RegisterState(NamedTuple):
    """One written value and the stamp that wrote it.

    The empty register is `None` at the entity level, so every `RegisterState` holds a value.
    """

    stamp: Timestamp
    value: bytes
    """The canonical encoding of the value (typed decoding is the handle's business)."""

    def join(self, other: RegisterState) -> RegisterState:
        """The higher (stamp, value) wins. Honest writers never reuse a stamp, so comparing
        the value only matters for forged duplicates, and keeps join a total function."""
        return max(self, other)

    def visible(self, floor: Timestamp | None) -> bool:
        """Whether the value survives a removal of an enclosing entry at `floor`."""
        return floor is None or self.stamp > floor

    def hash_form(self, floor: Timestamp | None) -> tuple[Timestamp, bytes] | None:
        return (self.stamp, self.value) if self.visible(floor) else None

    def max_stamp(self) -> Timestamp:
        return self.stamp

    def canonical(self) -> bytes:
        return canonical((self.stamp, self.value))
