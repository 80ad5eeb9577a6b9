"""Fan-out of applied-delta events to WebSocket subscribers, resumable by sequence number.

Every applied delta (local or remote) becomes exactly one `ContextEvent` with a node-wide,
strictly increasing `seq`. The hub keeps the last `replay` events per context, so a client
that reconnects with `since=<last seq it saw>` gets what it missed, in order, before live
events. Each subscriber has a bounded queue: one that falls that far behind is disconnected
(it can resume), so a slow client never makes the node buffer without bound or slows the
delta processor, which only ever calls the non-blocking `publish`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
import trio


@attrs.frozen
class ContextEvent:
    seq: int
    context_id: str
    delta_id: str
    root_hash: str
    heads: list[str]
    events: list[dict[str, Any]]
    """App events: {"name": ..., "payload": <decoded JSON>}."""
    origin: str
    """"local" for calls made on this node, "remote" for deltas received from peers."""

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "delta",
            "seq": self.seq,
            "contextId": self.context_id,
            "deltaId": self.delta_id,
            "rootHash": self.root_hash,
            "heads": self.heads,
            "events": self.events,
            "origin": self.origin,
        }


@attrs.frozen
class Notice:
    """A transient message for a context's subscribers (e.g. blob transfer progress): not
    numbered and not replayed on resume, unlike applied-delta events."""

    context_id: str
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.payload


class ResumeTooOldError(Exception):
    """The requested resume point is no longer buffered."""


class Subscription:
    """One subscriber: a set of context ids and a bounded queue of events."""

    def __init__(self, hub: EventHub, capacity: int) -> None:
        self._hub = hub
        self.contexts: set[str] = set()
        self.send, self.receive = trio.open_memory_channel[ContextEvent | Notice](capacity)
        self.overflowed = False

    def _offer(self, event: ContextEvent | Notice) -> None:
        if self.overflowed:
            return
        try:
            self.send.send_nowait(event)
        except trio.WouldBlock:
            self.overflowed = True
            self._hub.overflows += 1
            self.send.close()

    def close(self) -> None:
        self._hub.unsubscribe(self)
        self.send.close()


class EventHub:
    def __init__(self, *, replay: int = 1000, subscriber_capacity: int = 256) -> None:
        self.seq = 0
        self.overflows = 0
        self._replay = replay
        self._capacity = subscriber_capacity
        self._recent: dict[str, deque[ContextEvent]] = {}
        self._subscriptions: set[Subscription] = set()

    def open(self) -> Subscription:
        sub = Subscription(self, self._capacity)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def add_contexts(self, sub: Subscription, contexts: list[str], since: int | None) -> None:
        """Subscribe to `contexts`; with `since`, first replay their buffered events after it."""
        if since is not None:
            backlog: list[ContextEvent] = []
            for context in contexts:
                recent = self._recent.get(context, deque())
                if recent and recent[0].seq > since + 1 and len(recent) == self._replay:
                    raise ResumeTooOldError(f"events after {since} for {context} are gone")
                backlog += [e for e in recent if e.seq > since]
            for event in sorted(backlog, key=lambda e: e.seq):
                sub._offer(event)  # noqa: SLF001 - hub and subscription are one unit
        sub.contexts.update(contexts)

    def publish(
        self,
        *,
        context_id: str,
        delta_id: str,
        root_hash: str,
        heads: list[str],
        events: list[dict[str, Any]],
        origin: str,
    ) -> ContextEvent:
        """Record and fan out one applied delta. Never blocks."""
        self.seq += 1
        event = ContextEvent(self.seq, context_id, delta_id, root_hash, heads, events, origin)
        recent = self._recent.setdefault(context_id, deque(maxlen=self._replay))
        recent.append(event)
        for sub in list(self._subscriptions):
            if context_id in sub.contexts:
                sub._offer(event)  # noqa: SLF001
        return event

    def notify(self, context_id: str, payload: dict[str, Any]) -> None:
        """Send a transient notice to the context's current subscribers. Never blocks."""
        notice = Notice(context_id, payload)
        for sub in list(self._subscriptions):
            if context_id in sub.contexts:
                sub._offer(notice)  # noqa: SLF001

    def forget(self, context_id: str) -> None:
        self._recent.pop(context_id, None)
