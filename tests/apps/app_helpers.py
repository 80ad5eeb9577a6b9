"""A miniature context for app tests: replicas running one app, exchanging deltas by hand.

Each `Node` is one member's replica (a `StateTree`, an HLC, a member key). Calls go through
the runtime's `execute`, exactly as the context layer will run them; a call that wrote or
emitted becomes a `Delta` (wire-encoded records + events) that the test delivers to other
nodes in whatever order it likes. Delivery joins the records and, like DESIGN §6 says,
runs the app's event handlers once per node and delta, as the receiving member.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import attrs
import msgspec

from trionode.crdt import (
    HybridClock,
    StateTree,
    decode_entity,
    encode_entity,
    max_stamp,
    ntp64_from_unix,
    unix_from_ntp64,
)
from trionode.sdk import App, EmittedEvent
from trionode.sdk.bundle import load_app, load_bundle, verify_bundle
from trionode.sdk.runtime import CallOutcome, execute, init_state, run_handler

APPS = Path(__file__).resolve().parents[2] / "apps"
CONTEXT_ID = hashlib.sha256(b"test context").digest()
T0 = ntp64_from_unix(1_700_000_000.0)
SECOND = 1 << 32


def load_shipped_app(name: str) -> App:
    """Load `apps/<name>` the way a node loads an operator-installed bundle."""
    bundle = load_bundle(APPS / name)
    return load_app(verify_bundle(bundle, (), installed_locally=True))


def unix_seconds(node: Node) -> float:
    """The node's current physical time as Unix seconds."""
    return unix_from_ntp64(node.physical)


def member_key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


@attrs.frozen
class Delta:
    """What one call ships: its records (wire bytes) and events."""

    author: str
    records: tuple[bytes, ...]
    events: tuple[EmittedEvent, ...]

    @property
    def id(self) -> bytes:
        return hashlib.sha256(msgspec.msgpack.encode([self.author, self.records])).digest()


class Node:
    """One member's replica of the context."""

    def __init__(self, app: App, name: str, *, skew: int = 0) -> None:
        self.app = app
        self.name = name
        self.member = member_key(name)
        self.tree = StateTree()
        self.clock = HybridClock(self.member, drift_tolerance=3600.0)
        self.physical = T0 + skew
        self.applied: set[bytes] = set()
        self.received_events: list[EmittedEvent] = []
        """Events of applied deltas (what local WebSocket subscribers would see)."""

    def _tick(self) -> int:
        self.physical += 1 << 20  # ~0.25 ms per call
        return self.physical

    def init(self, **args: Any) -> Delta:
        outcome = init_state(
            self.app,
            self.tree,
            self.clock,
            self._tick(),
            msgspec.json.encode(args),
            executor=self.member,
            context_id=CONTEXT_ID,
        )
        return self._delta(outcome)

    def call(self, method: str, **args: Any) -> tuple[Any, Delta]:
        """Run a method; returns its result and the delta it produced."""
        outcome = self.execute(method, args)
        return outcome.result, self._delta(outcome)

    def view(self, method: str, **args: Any) -> Any:
        outcome = self.execute(method, args)
        assert outcome.delta_records == []
        assert outcome.events == []
        return outcome.result

    def execute(self, method: str, args: dict[str, Any] | bytes) -> CallOutcome:
        raw = args if isinstance(args, bytes) else msgspec.json.encode(args)
        return execute(
            self.app,
            self.tree,
            self.clock,
            self._tick(),
            method,
            raw,
            executor=self.member,
            context_id=CONTEXT_ID,
            writable=True,
        )

    def _delta(self, outcome: CallOutcome) -> Delta:
        delta = Delta(
            self.name,
            tuple(encode_entity(e) for e in outcome.delta_records),
            tuple(outcome.events),
        )
        self.applied.add(delta.id)
        return delta

    def receive(self, delta: Delta, *, run_handlers: bool = True) -> list[Delta]:
        """Apply a delta from another node; returns the deltas its handlers produced."""
        if delta.id in self.applied:
            return []  # duplicates are no-ops, handlers included
        entities = [decode_entity(raw) for raw in delta.records]
        stamp = max_stamp(entities)
        if stamp is not None:
            self.clock.update(stamp, self.physical)
        self.tree.apply(entities)
        self.applied.add(delta.id)
        self.received_events.extend(delta.events)
        produced: list[Delta] = []
        if run_handlers and delta.author != self.name:
            for event in delta.events:
                for handler in self.app.handlers_for(event.name):
                    outcome = run_handler(
                        self.app,
                        self.tree,
                        self.clock,
                        self._tick(),
                        handler,
                        event.payload,
                        executor=self.member,
                        context_id=CONTEXT_ID,
                    )
                    if outcome.delta_records or outcome.events:
                        produced.append(self._delta(outcome))
        return produced


def deliver_all(nodes: list[Node], log: list[Delta], order: list[int] | None = None) -> None:
    """Deliver every delta in `log` to every node (in `order`, rotated per node), including
    deltas that handlers produce along the way, until nothing new is produced."""
    pending = list(log)
    while pending:
        indexes = order if order is not None and len(order) == len(pending) else None
        produced: list[Delta] = []
        for shift, node in enumerate(nodes):
            sequence = indexes or list(range(len(pending)))
            sequence = sequence[shift % len(sequence) :] + sequence[: shift % len(sequence)]
            for index in sequence:
                produced.extend(node.receive(pending[index]))
        log.extend(produced)
        pending = produced
        order = None


def assert_converged(nodes: list[Node], *views: str) -> dict[str, Any]:
    """Same root hash everywhere and the same result for each view; returns the results."""
    root = nodes[0].tree.root_hash()
    results = {view: nodes[0].view(view) for view in views}
    for node in nodes[1:]:
        assert node.tree.root_hash() == root, f"{node.name} diverged"
        for view in views:
            assert node.view(view) == results[view], f"{node.name}.{view} differs"
    return results


def event_names(events: tuple[EmittedEvent, ...] | list[EmittedEvent]) -> list[str]:
    return [e.name for e in events]


def event_payloads(events: tuple[EmittedEvent, ...] | list[EmittedEvent]) -> list[Any]:
    return [msgspec.json.decode(e.payload) for e in events]
