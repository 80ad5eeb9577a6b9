"""Fan-out of applied-delta events to WebSocket subscribers, resumable by sequence number.

Every applied delta (local or remote) becomes exactly one `ContextEvent` with a node-wide,
strictly increasing `seq`. The hub keeps the last `replay` events per context, so a client
that reconnects with `since=<last seq it saw>` gets what it missed, in order, before live
events; when that is no longer possible it is told to resync (`ResumeTooOldError`), never
served a silent gap. The events are also kept in LMDB (`context/event_log.py`), so after a
restart numbering continues and `since` still means the same thing.

Each subscriber has a bounded queue: one that falls that far behind is disconnected (it can
resume), so a slow client never makes the node buffer without bound or slows the delta
processor, which only ever calls the non-blocking `publish`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import msgspec
import trio

Id = bytes | str
"""A delta or root id as the node holds it, raw bytes (its hex is what subscribers see);
an id given to `EventHub.publish` as text that is not the lowercase hex of any bytes is
kept as that text."""


def raw_id(text: str) -> Id:
    """`text` as the bytes it is the lowercase hex of, or as it is if it is not that."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return text
    return raw if raw and raw.hex() == text else text


def id_text(value: Id) -> str:
    """An `Id` as subscribers see it: raw bytes as hex, text as it is."""
    return value.hex() if value.__class__ is bytes else value  # type: ignore[return-value]


class ContextEvent(msgspec.Struct, frozen=True):
    """One applied delta, as subscribers see it (and as the event log stores it).

    Its ids are held as the node has them (`Id`: raw bytes) and made hex only when asked
    (`delta_id`, `root_hash`, `heads`: subscribers' JSON); the event log stores the raw
    bytes. Every call's event went from bytes to hex and back (issue #16)."""

    seq: int
    context_id: str
    delta_raw: Id
    root_raw: Id
    heads_raw: list[Id]
    events: list[dict[str, Any]]
    """App events: {"name": ..., "payload": <decoded JSON>}."""
    origin: str
    """"local" for calls made on this node, "remote" for deltas received from peers."""
    at: float = 0.0
    """Unix time it was published (for `api.event_retention`); not sent to clients."""

    @property
    def delta_id(self) -> str:
        return id_text(self.delta_raw)

    @property
    def root_hash(self) -> str:
        return id_text(self.root_raw)

    @property
    def heads(self) -> list[str]:
        return list(map(id_text, self.heads_raw))

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


def context_event(
    *,
    seq: int,
    context_id: str,
    delta_id: str,
    root_hash: str,
    heads: list[str],
    events: list[dict[str, Any]],
    origin: str,
    at: float = 0.0,
) -> ContextEvent:
    """A `ContextEvent` from its ids as subscribers see them (hex)."""
    return ContextEvent(
        seq,
        context_id,
        raw_id(delta_id),
        raw_id(root_hash),
        [*map(raw_id, heads)],
        events,
        origin,
        at,
    )


class Change(msgspec.Struct, frozen=True):
    """An applied delta's event before it is numbered (`EventHub.reserve`). (A struct, not
    attrs: two are made per call, and a frozen attrs class's `__init__` cost ~1 us each.)
    Its ids are `Id`s: raw bytes, as the node holds them (`ContextEvent`)."""

    context_id: str
    delta_id: Id
    root_hash: Id
    heads: list[Id]
    events: list[dict[str, Any]]
    origin: str


@attrs.frozen
class Notice:
    """A transient message for a context's subscribers (e.g. blob transfer progress): not
    numbered and not replayed on resume, unlike applied-delta events. Only a context's
    latest snapshot progress is kept, and handed to a new subscriber of it that asks
    (`EventHub.add_contexts`, before the subscription's answer)."""

    context_id: str
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.payload


@attrs.frozen
class Replay:
    """What a subscribe puts in the subscriber's queue as one item, so nothing live can
    overtake it: the missed events in order, then the answer to the subscribe."""

    events: list[ContextEvent]
    answer: dict[str, Any]


class Subscription:
    """One subscriber: a set of context ids and a bounded queue of events."""

    def __init__(
        self,
        hub: EventHub,
        capacity: int,
        wants: Callable[[ContextEvent], bool] | None = None,
    ) -> None:
        self._hub = hub
        self.contexts: set[str] = set()
        self.send, self.receive = trio.open_memory_channel[ContextEvent | Notice | Replay](capacity)
        self.overflowed = False
        self.wants = wants
        """A watcher's filter (`EventHub.watch`); None: every event."""

    def _offer(self, event: ContextEvent | Notice | Replay) -> None:
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
    def __init__(
        self,
        *,
        replay: int = 1000,
        subscriber_capacity: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.seq = 0
        """The last number given to an event."""
        self.shown = 0
        """The last number subscribers were shown (behind `seq` while a reserved batch is
        being committed)."""
        self.floor = 1
        """Every event numbered from here on is still known (held, or lost to nothing);
        below it some may be gone (retention, a crash), so resuming from before it needs a
        resync."""
        self.overflows = 0
        self._replay = replay
        self._capacity = subscriber_capacity
        self._clock = clock
        self._recent: dict[str, deque[ContextEvent]] = {}
        self._dropped: dict[str, int] = {}
        """Per context, the newest event no longer held in memory."""
        self._progress: dict[str, Notice] = {}
        """Per context, its latest `snapshot_progress` notice (`notify`): a subscriber
        that comes while a snapshot is taken, or just after, gets it at once if it asks."""
        self._subscriptions: set[Subscription] = set()
        self._watchers: set[Subscription] = set()
        self._remote_watchers: set[Subscription] = set()
        """Node services following every context's applied deltas (not WebSockets)."""
        self.unsaved: list[ContextEvent] | None = None
        """Published but not yet in LMDB, when an event log is attached (`EventLog.load`
        sets it to a list); its writer takes them from here."""
        self.unsaved_ready = trio.Event()
        self._reserved = 0
        """Batches numbered by `reserve` whose commit is not settled yet: while there is
        one, what others publish waits in `_waiting`, so subscribers see seq in order."""
        self._waiting: list[ContextEvent] = []

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def open(self) -> Subscription:
        sub = Subscription(self, self._capacity)
        self._subscriptions.add(sub)
        return sub

    def watch(
        self,
        *,
        remote_only: bool = False,
        wants: Callable[[ContextEvent], bool] | None = None,
    ) -> Subscription:
        """Follow the applied deltas of every context (for node services; not counted as a
        subscriber). Its queue is bounded like a WebSocket's: a watcher that falls behind
        finds it closed and must catch up some other way. `remote_only`: only deltas
        received from peers (a watcher that nothing written here can concern is then not
        woken by every local write: issue #16). `wants`: only the events for which it says
        True, asked when each is offered (synchronous, cheap, and never raising: a service
        that would find nothing to do is then not woken, issue #16: each such wake was two
        task steps per received delta and service)."""
        sub = Subscription(self, self._capacity, wants)
        (self._remote_watchers if remote_only else self._watchers).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)
        self._watchers.discard(sub)
        self._remote_watchers.discard(sub)

    def add_contexts(
        self, sub: Subscription, contexts: list[str], since: int | None, *, progress: bool = False
    ) -> bool:
        """Subscribe to `contexts`; with `since`, first replay their events after it; with
        `progress`, first hand over each one's latest snapshot progress (`notify`).

        The replayed events and the answer go into the subscriber's queue as one `Replay`,
        so the client sees them in order, before anything published later. The answer is
        `subscribed`, or `resync` when some event after `since` is gone (or `since` is from
        another numbering): the client must fetch the state again and follow from `seq`.
        Returns whether the resume (if any) was served.
        """
        gone = since is not None and (
            since > self.shown
            or since < self.floor - 1
            or any(self._dropped.get(c, 0) > since for c in contexts)
        )
        backlog: list[ContextEvent] = []
        if since is not None and not gone:
            for context in contexts:
                backlog += [e for e in self._recent.get(context, ()) if e.seq > since]
            backlog.sort(key=lambda e: e.seq)
        sub.contexts.update(contexts)
        answer: dict[str, Any] = {"type": "subscribed", "contextIds": contexts, "seq": self.shown}
        if gone:
            answer = {
                "type": "resync",
                "contextIds": contexts,
                "seq": self.shown,
                "reason": f"events after {since} are no longer kept (kept from seq "
                f"{self.floor}); fetch the state again, then follow from seq {self.shown}",
            }
        # Where a snapshot being taken stands (or, just taken, its last word), for one that
        # asks as it subscribes late: `context join` sends its request before it can
        # follow. Before the answer, so that once the answer is in, the subscriber knows it
        # has it. (Only if asked: other subscribers hear of snapshots as they happen.)
        for context in contexts if progress else ():
            latest = self._progress.get(context)
            if latest is not None:
                sub._offer(latest)  # noqa: SLF001 - hub and subscription are one unit
        sub._offer(Replay(backlog, answer))  # noqa: SLF001
        return not gone

    def restore(self, events: Iterable[ContextEvent], *, seq: int, floor: int) -> None:
        """Take back the events kept in LMDB at start, oldest first (before any publish)."""
        self.seq = self.shown = seq
        self.floor = floor
        for event in events:
            self._remember(event)

    def raise_floor(self, floor: int) -> None:
        """Events before `floor` were dropped from the log (retention)."""
        self.floor = max(self.floor, floor)

    def _remember(self, event: ContextEvent) -> None:
        recent = self._recent.get(event.context_id)
        if recent is None:  # (not a new deque per event for `setdefault`, issue #16)
            recent = self._recent[event.context_id] = deque(maxlen=self._replay)
        if len(recent) == recent.maxlen:
            self._dropped[event.context_id] = recent[0].seq
        recent.append(event)

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
        """Record and fan out one applied delta (its ids as hex). Never blocks."""
        change = Change(
            context_id, raw_id(delta_id), raw_id(root_hash), [*map(raw_id, heads)], events, origin
        )
        return self.emit(change)

    def emit(self, change: Change) -> ContextEvent:
        """`publish` of a `Change`."""
        event = self._number(change, self._clock())
        if self.unsaved is not None:
            self.unsaved.append(event)
            self.unsaved_ready.set()
        if self._reserved:
            self._waiting.append(event)
        else:
            self._fan_out(event)
        return event

    def reserve(self, changes: Iterable[Change]) -> list[ContextEvent]:
        """Number the events of a write about to be committed (the delta processor stores
        them in the same transaction, see `event_log.py`); nobody sees them, nor anything
        published after them, until `settle`."""
        at = self._clock()
        seq = self.seq
        events: list[ContextEvent] = []
        for change in changes:  # (`_number`, inline: every call's event is numbered here)
            seq += 1
            events.append(
                ContextEvent(
                    seq,
                    change.context_id,
                    change.delta_id,
                    change.root_hash,
                    change.heads,
                    change.events,
                    change.origin,
                    at,
                )
            )
        self.seq = seq
        self._reserved += 1
        return events

    def show_early(self, events: list[ContextEvent]) -> None:
        """Fan out the first events of a reserved batch before its commit is settled (the
        delta processor does so for received deltas: `pipeline.py`). They must be the
        batch's first events, in order, so subscribers still see `seq` in order.

        Remote-only watchers (node services: the app follower, the blob fetcher) hear of
        them only once durable (`settle`): what they do is work for a delta the node keeps,
        and waking them here put their steps between the showing of one node's delta
        and the next (issue #16: on one event loop, ~0.2 ms per receiver)."""
        for event in events:
            self._fan_out(event, services=False)

    def settle(self, events: list[ContextEvent], *, durable: bool, early: int = 0) -> None:
        """The commit holding `events` (from `reserve`) is over: fan them out if it is
        durable (drop them if not: their numbers stay unused), then what waited on them.
        The first `early` were shown already (`show_early`); if the commit failed they
        are lost (`_lost`)."""
        self._reserved -= 1
        if durable:
            if early:
                for event in events[:early]:
                    self._offer_services(event)
                events = events[early:]
            for event in events:
                self._fan_out(event)
        elif early:
            self._lost(events[:early])
        if not self._reserved and self._waiting:
            waiting, self._waiting = self._waiting, []
            for event in waiting:
                self._fan_out(event)

    def _lost(self, events: list[ContextEvent]) -> None:
        """Events shown before a commit that then failed: their deltas are not applied here
        any more (the replica reloads from disk; they come again by gossip or sync, as new
        events). A client that saw one, or resumes from before one, must read the state
        again: the floor moves past the next number (a resume from the last lost one is
        refused too), their contexts' kept events go, and current subscribers of those
        contexts are told to resync."""
        contexts = sorted({event.context_id for event in events})
        self.floor = max(self.floor, events[-1].seq + 2)
        for context in contexts:
            self.forget(context)
            self.notify(
                context,
                {
                    "type": "resync",
                    "contextIds": [context],
                    "seq": self.shown,
                    "reason": "deltas shown before they were stored could not be stored; "
                    f"fetch the state again, then follow from seq {self.shown}",
                },
            )

    def _number(self, change: Change, at: float) -> ContextEvent:
        self.seq += 1
        return ContextEvent(
            self.seq,
            change.context_id,
            change.delta_id,
            change.root_hash,
            change.heads,
            change.events,
            change.origin,
            at,
        )

    def _fan_out(self, event: ContextEvent, *, services: bool = True) -> None:
        """Show `event`; to remote-only watchers too unless `services` is False (then
        `_offer_services` does so later)."""
        self.shown = event.seq
        # (`_remember`, inline: every call's event comes here, issue #16.)
        recent = self._recent.get(event.context_id)
        if recent is None:
            recent = self._recent[event.context_id] = deque(maxlen=self._replay)
        if len(recent) == recent.maxlen:
            self._dropped[event.context_id] = recent[0].seq
        recent.append(event)
        # (Copied to walk them only if any.)
        if self._subscriptions:
            for sub in list(self._subscriptions):
                if event.context_id in sub.contexts:
                    sub._offer(event)  # noqa: SLF001
        if self._watchers:
            for sub in list(self._watchers):
                if sub.wants is None or sub.wants(event):
                    sub._offer(event)  # noqa: SLF001
        if services and event.origin != "local":  # (`_offer_services`' first check)
            self._offer_services(event)

    def _offer_services(self, event: ContextEvent) -> None:
        if event.origin != "local":
            for sub in list(self._remote_watchers):
                if sub.wants is None or sub.wants(event):
                    sub._offer(event)  # noqa: SLF001

    def notify(self, context_id: str, payload: dict[str, Any]) -> None:
        """Send a transient notice to the context's current subscribers. Never blocks."""
        notice = Notice(context_id, payload)
        if payload.get("type") == "snapshot_progress":
            self._progress[context_id] = notice
        for sub in list(self._subscriptions):
            if context_id in sub.contexts:
                sub._offer(notice)  # noqa: SLF001

    def forget(self, context_id: str) -> None:
        self._progress.pop(context_id, None)
        recent = self._recent.pop(context_id, None)
        if recent:
            self._dropped[context_id] = recent[-1].seq
