"""Keystrokes count their block lazily: the Fenwick tree of visible counts lags behind a
run of in-place keystrokes in one block (`SequenceState._lag_at`) and catches up before
anything reads it or changes another count.

A stateful test drives one `VectorState` or `TextState` with tiny blocks (so typing,
inserts elsewhere and deletes split blocks and renumber them all the time) against a
plain list: typing on and backspaces at a cursor (the lagging paths), keystrokes
elsewhere, another writer's inserts and range deletes merged the general way (counts
changed under a lag: their deltas are made on a copy, so nothing reads the state's own
tree first), copies (the lag goes along) and reads of every position (each a Fenwick
lookup), and checks the whole state against the per-element model at the end.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from trionode.crdt import HybridClock, sequence
from trionode.crdt.sequence import SequenceState, TextState, VectorState

from . import sequence_model as model
from .crdt_helpers import T0
from .test_run_items import assert_same


class LaggedCounts(RuleBasedStateMachine):
    state: SequenceState[Any]

    @initialize(text=st.booleans())
    def start(self, text: bool) -> None:
        self.text = text
        self.state = TextState() if text else VectorState()
        self.naive: Any = model.TextState() if text else model.VectorState()
        self.expected: list[Any] = []
        self.cursor = 0
        self.clock = HybridClock(b"a", drift_tolerance=3600.0)
        self.other = HybridClock(b"b", drift_tolerance=3600.0)
        self.physical = T0

    def _value(self, n: int) -> Any:
        return "xyzw"[n % 4] if self.text else bytes([n % 251])

    def _tick(self) -> int:
        self.physical += 1 << 20
        return self.physical

    def _merged(self, delta: SequenceState[Any]) -> None:
        self.naive.merge(type(self.naive)(dict(delta.elements)))

    @rule(count=st.integers(1, 12), seed=st.integers(0, 1_000))
    def type_on(self, count: int, seed: int) -> None:
        """Typing at the cursor: after the first keystroke each one lags its block."""
        for n in range(count):
            at = min(self.cursor, len(self.expected))
            value = self._value(seed + n)
            physical = self._tick()
            delta, eid, continues = self.state.insert_in_place(at, value, self.clock, physical)
            if continues:
                self.clock.witness(eid, physical)
            self._merged(delta)
            self.expected.insert(at, value)
            self.cursor = at + 1

    @rule(count=st.integers(1, 6))
    def backspace(self, count: int) -> None:
        for _ in range(count):
            if not self.cursor or not self.expected:
                return
            at = min(self.cursor, len(self.expected)) - 1
            delta, _eid, _before = self.state.delete_in_place(at, self.clock.now(self._tick()))
            self._merged(delta)
            del self.expected[at]
            self.cursor = at

    @rule(where=st.integers(0, 10_000))
    def jump(self, where: int) -> None:
        self.cursor = where % (len(self.expected) + 1)

    @rule(where=st.integers(0, 10_000))
    def delete_elsewhere(self, where: int) -> None:
        if not self.expected:
            return
        at = where % len(self.expected)
        delta, _eid, _before = self.state.delete_in_place(at, self.clock.now(self._tick()))
        self._merged(delta)
        del self.expected[at]

    @rule(where=st.integers(0, 10_000))
    def other_types(self, where: int) -> None:
        """Another writer's insert, merged the general way (places and counts a block)."""
        at = where % (len(self.expected) + 1)
        value = self._value(where)
        physical = self._tick()
        delta = self.state.copy().insert_delta(at, [value], partial(self.other.now, physical))
        self.state.merge(delta)
        self._merged(delta)
        self.expected.insert(at, value)

    @rule(where=st.integers(0, 10_000), count=st.integers(1, 9))
    def range_delete(self, where: int, count: int) -> None:
        """A range delete merged back (uncounts several blocks at once)."""
        if not self.expected:
            return
        at = where % len(self.expected)
        count = min(count, len(self.expected) - at)
        delta = self.state.copy().delete_delta(at, count, self.clock.now(self._tick()))
        self.state.merge(delta)
        self._merged(delta)
        del self.expected[at : at + count]

    @rule()
    def copy(self) -> None:
        """Go on with a copy, which carries the lag (the original, read, must not have
        changed)."""
        original = self.state
        self.state = original.copy()
        self._read(original)

    @rule()
    def read_every_position(self) -> None:
        """(A rule, not an invariant: a read catches the counts up, and other rules must
        also run while they lag.)"""
        self._read(self.state)

    def _read(self, state: SequenceState[Any]) -> None:
        assert len(state) == len(self.expected)
        for position, value in enumerate(self.expected):
            element = state.element(state.visible_at(position))
            assert element is not None
            assert element.value == value

    def teardown(self) -> None:
        if hasattr(self, "state"):
            self.read_every_position()
            assert self.state.values() == self.expected
            assert_same(self.state, self.naive, [])


def test_lagging_block_counts_match_a_plain_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sequence, "BLOCK_MAX", 3)  # (tiny blocks: splits everywhere)
    monkeypatch.setattr(sequence, "_BLOCK_FILL", 2)
    run_state_machine_as_test(
        LaggedCounts,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )
