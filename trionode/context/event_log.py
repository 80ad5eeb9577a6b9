"""The event hub's log in LMDB: WebSocket `since` means the same thing after a restart.

The events of the deltas the delta processor commits (app calls, received deltas) are
numbered before its commit and written in its transaction (`stage`): no fsync of their own,
and they are on disk exactly when their deltas are. The few others (a membership change, a
sync adopting state, a deferred delta released) are written by one background task
(`serve_event_log`) in batches, after the hub numbered and fanned them out; a crash can lose
the last of those. So the log also records whether the node stopped cleanly: after a crash,
numbering jumps ahead by `CRASH_GAP` and the hub's floor moves past the jump, so a client
resuming from before the crash is told to resync instead of being served a log with a hole
in it.

Retention (`api.event_retention` seconds, at most `api.max_retained_events` events) is
applied at start and after every write; dropping events raises the hub's floor the same way.

Layout (GENERIC column): `ws-event/<seq, 8 bytes big-endian>` → the `ContextEvent`;
`ws-event-meta` → `LogMeta`. An event row is `EVENT_ROW_VERSION` ‖ a msgpack array holding
the ids as raw bytes (`EventRowCodec`): the hub's events spell them in base58 and hex,
which took 44-66 bytes each, 4 per event, in a log that holds up to
`api.max_retained_events` of them. Rows written before (the `ContextEvent` array as it is)
still load.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import base58
import msgspec
import trio

from trionode.context.events import ContextEvent, EventHub
from trionode.errors import StorageError
from trionode.store.lmdb_store import Column
from trionode.store.store import AsyncStore, BytesCodec, MsgpackCodec, Table, WriteBatch

log_ = logging.getLogger(__name__)

EVENT_PREFIX: Final = b"ws-event/"
META_KEY: Final = b"ws-event-meta"
CRASH_GAP: Final = 1 << 20
"""How far numbering jumps after a crash: more than the events one unflushed batch holds."""


class LogMeta(msgspec.Struct, frozen=True):
    floor: int
    next_seq: int
    clean: bool


EVENT_ROW_VERSION: Final = b"\x02"
"""First byte of a compact event row. A row of version 1 (a bare `ContextEvent` array)
starts with a msgpack array header (0x9_), never with this positive fixint."""

_Id = bytes | str
"""An id as raw bytes, or its string as the hub had it when that is not what encoding
the bytes gives back (never for ids the node makes; kept exact for any other). msgspec
cannot type a union of bytes and str, so `_EventRow` takes either and `_id` checks."""


class _EventRow(msgspec.Struct, frozen=True, array_like=True):
    """A `ContextEvent` as the log stores it: the same fields, ids as raw bytes."""

    seq: int
    context_id: Any
    delta_id: Any
    root_hash: Any
    heads: list[Any]
    events: list[dict[str, Any]]
    origin: str
    at: float


_B58_CACHE_SIZE: Final = 1024
"""Context ids remembered by `_b58_raw`: every event row names one, and decoding base58
(then encoding it again to check it) cost more than the rest of the row (issue #16)."""
_b58_cache: dict[str, _Id] = {}


def _b58_raw(text: str) -> _Id:
    cached = _b58_cache.get(text)
    if cached is not None:
        return cached
    try:
        raw = base58.b58decode(text)
    except ValueError:
        return text
    found = raw if raw and base58.b58encode(raw).decode("ascii") == text else text
    if len(_b58_cache) >= _B58_CACHE_SIZE:
        _b58_cache.clear()
    _b58_cache[text] = found
    return found


def _hex_raw(text: str) -> _Id:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return text
    return raw if raw and raw.hex() == text else text


def _id(value: object) -> _Id:
    if not isinstance(value, bytes | str):
        raise StorageError("stored event is unreadable: an id is neither bytes nor text")
    return value


def _b58_text(value: object) -> str:
    value = _id(value)
    return value if isinstance(value, str) else base58.b58encode(value).decode("ascii")


def _hex_text(value: object) -> str:
    value = _id(value)
    return value if isinstance(value, str) else value.hex()


class EventRowCodec:
    """Event rows: written compact (`_EventRow` after `EVENT_ROW_VERSION`), read in either
    version. Bad bytes raise StorageError, as every stored value's codec does."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._rows = msgspec.msgpack.Decoder(_EventRow)
        self._old = MsgpackCodec(ContextEvent)

    def encode(self, event: ContextEvent, /) -> bytes:
        row = _EventRow(
            event.seq,
            _b58_raw(event.context_id),
            _hex_raw(event.delta_id),
            _hex_raw(event.root_hash),
            [_hex_raw(h) for h in event.heads],
            event.events,
            event.origin,
            event.at,
        )
        return EVENT_ROW_VERSION + self._encoder.encode(row)

    def decode(self, data: bytes, /) -> ContextEvent:
        if not data.startswith(EVENT_ROW_VERSION):
            return self._old.decode(data)
        try:
            row = self._rows.decode(memoryview(data)[1:])
        except msgspec.DecodeError as exc:
            raise StorageError(f"stored event is unreadable: {exc}") from None
        return ContextEvent(
            seq=row.seq,
            context_id=_b58_text(row.context_id),
            delta_id=_hex_text(row.delta_id),
            root_hash=_hex_text(row.root_hash),
            heads=[_hex_text(h) for h in row.heads],
            events=row.events,
            origin=row.origin,
            at=row.at,
        )


_EVENTS = Table(Column.GENERIC, BytesCodec(), EventRowCodec())
_META = Table(Column.GENERIC, BytesCodec(), MsgpackCodec(LogMeta))


def _key(seq: int) -> bytes:
    return EVENT_PREFIX + seq.to_bytes(8, "big")


class EventLog:
    """Loads the hub from LMDB at start, then keeps LMDB up with it."""

    def __init__(
        self,
        hub: EventHub,
        store: AsyncStore,
        *,
        retention: float,
        max_events: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hub = hub
        self._store = store
        self._retention = retention
        self._max_events = max_events
        self._clock = clock
        self._kept: deque[tuple[int, float]] = deque()
        """(seq, at) of the events in LMDB, oldest first: what retention may drop."""

    async def load(self) -> None:
        """Give the hub its retained events and numbering; mark the log as in use."""
        meta = await self._store.get(_META, META_KEY)
        rows = await self._store.scan(_EVENTS, prefix=EVENT_PREFIX)
        events = [event for _, event in rows]
        self._kept.extend((e.seq, e.at) for e in events)
        last = max((e.seq for e in events), default=0)
        if meta is None:
            seq, floor = last, 1
        elif meta.clean:
            seq, floor = max(last, meta.next_seq - 1), meta.floor
        else:
            seq = max(last, meta.next_seq - 1) + CRASH_GAP
            floor = seq + 1
        self.hub.restore(events, seq=seq, floor=floor)
        self.hub.unsaved = []
        batch = WriteBatch()
        self._drop_expired(batch)
        # Marked in use (not clean) until `close`: a crash from here on is detected.
        batch.put(_META, META_KEY, LogMeta(self.hub.floor, seq + 1, clean=False))
        await self._store.write(batch)

    async def flush(self) -> None:
        """Write what the hub published since the last flush, then apply retention."""
        unsaved = self.hub.unsaved
        if unsaved is None:
            return
        taken = unsaved[:]
        batch = WriteBatch()
        for event in taken:
            batch.put(_EVENTS, _key(event.seq), event)
            self._kept.append((event.seq, event.at))
        self._drop_expired(batch)  # may drop some of these too (max_retained_events)
        if len(batch):
            await self._store.write(batch)
        # Only now: if the write was cancelled or failed, the next flush writes these again
        # (`_kept` then names them twice, which only makes retention drop a little early).
        del unsaved[: len(taken)]

    def stage(self, batch: WriteBatch, events: list[ContextEvent]) -> None:
        """Put `events` (just numbered by `EventHub.reserve`) in `batch`, the delta
        processor's transaction that commits the deltas they describe: no write of their
        own, and an acknowledged delta's event survives a crash with it."""
        for event in events:
            batch.put(_EVENTS, _key(event.seq), event)
            self._kept.append((event.seq, event.at))
        if events:
            self._drop_expired(batch)

    async def close(self) -> None:
        """Final flush and the clean-stop mark (after every publisher has stopped)."""
        await self.flush()
        meta = LogMeta(self.hub.floor, self.hub.seq + 1, clean=True)
        await self._store.put(_META, META_KEY, meta)

    def _drop_expired(self, batch: WriteBatch) -> None:
        """Stage deleting what retention drops, after the batch's own puts."""
        horizon = self._clock() - self._retention
        kept = self._kept
        dropped = False
        while kept and (len(kept) > self._max_events or kept[0][1] < horizon):
            seq, _ = kept.popleft()
            batch.delete(_EVENTS, _key(seq))
            self.hub.raise_floor(seq + 1)
            dropped = True
        if dropped:
            batch.put(_META, META_KEY, LogMeta(self.hub.floor, self.hub.seq + 1, clean=False))


async def serve_event_log(
    log: EventLog,
    shutdown_requested: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write the hub's new events to LMDB as they come, until shutdown is requested.

    `open_node` calls `log.close()` after its nursery, once nothing publishes any more.
    """
    async with trio.open_nursery() as nursery:

        async def stop_on_shutdown() -> None:
            await shutdown_requested.wait()
            nursery.cancel_scope.cancel(reason="node shutting down")

        nursery.start_soon(stop_on_shutdown)
        task_status.started()
        while True:
            await log.hub.unsaved_ready.wait()
            log.hub.unsaved_ready = trio.Event()
            try:
                await log.flush()
            except StorageError as exc:
                # Kept in memory and tried again with the next events (or at close).
                log_.warning("could not write WebSocket events to LMDB: %s", exc)
