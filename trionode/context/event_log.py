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
`ws-event-ctx/<n, 4 bytes big-endian>` → a context id and `ws-event-shape/<n>` → an app
event's name and payload keys (`_Numbers`); `ws-event-meta` → `LogMeta`. An event row
(`EVENT_ROW_VERSION` 4, `EventRowCodec`) says only what neither its key nor another row
says: the context by its local number, the delta and root ids as raw bytes, the heads only
when they are not just the delta itself (a local write's), app events as [name, payload]
pairs or, when the payload is a small map, as [shape number, its values] (the name and
the keys said once in the shape's row), the origin as a bool and the time in whole
seconds (only retention reads it). A kv `set`'s row went from 306 to ~200 bytes, then
~18 less with shapes (`make bench --only bytes`). Rows written before still load:
version 3 (no shapes), version 2 (every field, ids as raw bytes) and version 1 (the
`ContextEvent` array as it is).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import base58
import msgspec
import trio

from trionode.context.events import ContextEvent, EventHub, context_event
from trionode.errors import StorageError
from trionode.store.lmdb_store import Column, Put
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


EVENT_ROW_VERSION: Final = b"\x04"
"""First byte of an event row this build writes. A row of version 1 (a bare `ContextEvent`
array) starts with a msgpack array header (0x9_), never with a positive fixint."""
_ROW_V3: Final = b"\x03"
"""Version 3 rows are version 4 rows without shapes (read by the same decoder)."""
_ROW_V2: Final = b"\x02"
CONTEXT_PREFIX: Final = b"ws-event-ctx/"
"""ws-event-ctx/ ‖ number (4 bytes) → a context id as the event rows' `_Id` (msgpack)."""
SHAPE_PREFIX: Final = b"ws-event-shape/"
"""ws-event-shape/ ‖ number (4 bytes) → a `Shape` as msgpack [name, [keys]]."""
_NUMBER_BYTES: Final = 4

_Id = bytes | str
"""An id as raw bytes, or its string as the hub had it when that is not what encoding
the bytes gives back (never for ids the node makes; kept exact for any other). msgspec
cannot type a union of bytes and str, so `_EventRow` takes either and `_id` checks."""


class _EventRow1(msgspec.Struct, frozen=True, array_like=True):
    """A `ContextEvent` as version 1 rows stored it: its fields as they were, ids in hex."""

    seq: int
    context_id: str
    delta_id: str
    root_hash: str
    heads: list[str]
    events: list[dict[str, Any]]
    origin: str
    at: float = 0.0


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


class _EventRow3(msgspec.Struct, frozen=True, array_like=True):
    """A `ContextEvent` as version 3 rows store it (see the module docstring); its seq is
    the row's key."""

    context: int
    delta_id: Any
    root_hash: Any
    heads: list[Any] | None
    """None: just the delta id."""
    events: list[Any]
    """[name, payload] pairs, or the event's dict as it is when it is not exactly that."""
    origin: bool | str
    """True: "local", False: "remote"; any other value as it is."""
    at: int | float


_ORIGINS: Final = {"local": True, "remote": False}
_MAX_SECONDS: Final = 1 << 32
"""`at` in whole seconds below this (5 msgpack bytes, not 9); as it is otherwise."""


def _compact_event(event: dict[str, Any], shape: Callable[[Shape], int | None] | None) -> Any:
    """An app event as a row holds it: [shape number, its payload's values] if it has a
    shape (`shape_of`) that `shape` numbers, else [name, payload] if it is just those, else
    the map as it is. (`shape_of`'s checks, inline: every call's event comes here.)"""
    if len(event) == 2:
        name = event.get("name")
        if isinstance(name, str) and "payload" in event:
            payload = event["payload"]
            if (
                shape is not None
                and type(payload) is dict
                and 0 < len(payload) <= MAX_SHAPE_KEYS
                and {*map(type, payload)} == _STR_ONLY
            ):
                number = shape((name, tuple(payload)))
                if number is not None:
                    return [number, list(payload.values())]
            return [name, payload]
    return event


def _app_event(value: object, shapes: dict[int, Shape]) -> dict[str, Any]:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        return {"name": value[0], "payload": value[1]}
    if isinstance(value, list) and len(value) == 2 and type(value[0]) is int:
        shape, values = shapes.get(value[0]), value[1]
        if shape is None:
            raise StorageError(f"stored event names event shape {value[0]}, unknown")
        if not isinstance(values, list) or len(values) != len(shape[1]):
            raise StorageError("stored event is unreadable: values do not fit their shape")
        return {"name": shape[0], "payload": dict(zip(shape[1], values, strict=True))}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return value
    raise StorageError("stored event is unreadable: an app event is neither a pair nor a map")


class EventRowCodec:
    """Event rows: written as version 4 (the context by number: `contexts` maps numbers
    to ids; an app event whose payload is a small map as [shape number, its values]:
    `shapes` maps numbers to `Shape`s), read in any version. Bad bytes raise
    StorageError, as every stored value's codec does."""

    def __init__(
        self, contexts: dict[int, str] | None = None, shapes: dict[int, Shape] | None = None
    ) -> None:
        self.contexts = {} if contexts is None else contexts
        self.shapes = {} if shapes is None else shapes
        self._encoder = msgspec.msgpack.Encoder()
        self._rows = msgspec.msgpack.Decoder(_EventRow3)
        self._v2 = msgspec.msgpack.Decoder(_EventRow)
        self._old = MsgpackCodec(_EventRow1)

    def encode(
        self,
        event: ContextEvent,
        context: int,
        shape: Callable[[Shape], int | None] | None = None,
    ) -> bytes:
        """The row of `event`, whose context has the number `context` (`shape` gives an
        app event shape's number, or None: that event is stored whole)."""
        # (The event's ids are raw bytes as the node made them: written as they are. An id
        # given as text is written as the bytes it is the hex of, if it is, as before.)
        delta_id = event.delta_raw
        if delta_id.__class__ is not bytes:
            delta_id = _hex_raw(delta_id)  # type: ignore[arg-type]
        root = event.root_raw
        heads = event.heads_raw
        row = _EventRow3(
            context,
            delta_id,
            root if root.__class__ is bytes else _hex_raw(root),  # type: ignore[arg-type]
            None
            if heads == [delta_id]
            else [h if h.__class__ is bytes else _hex_raw(h) for h in heads],  # type: ignore[arg-type]
            [_compact_event(e, shape) for e in event.events],
            _ORIGINS.get(event.origin, event.origin),
            int(event.at) if 0 <= event.at < _MAX_SECONDS else event.at,
        )
        return EVENT_ROW_VERSION + self._encoder.encode(row)

    def decode(self, seq: int, data: bytes, /) -> ContextEvent:
        """The event of row `seq` (a v3 row's context must be in `contexts`)."""
        if data.startswith((EVENT_ROW_VERSION, _ROW_V3)):
            return self._decode_v3(seq, data)
        if data.startswith(_ROW_V2):
            return self._decode_v2(data)
        old = self._old.decode(data)
        return context_event(
            seq=old.seq,
            context_id=old.context_id,
            delta_id=old.delta_id,
            root_hash=old.root_hash,
            heads=old.heads,
            events=old.events,
            origin=old.origin,
            at=old.at,
        )

    def _decode_v3(self, seq: int, data: bytes) -> ContextEvent:
        try:
            row = self._rows.decode(memoryview(data)[1:])
        except msgspec.DecodeError as exc:
            raise StorageError(f"stored event is unreadable: {exc}") from None
        context_id = self.contexts.get(row.context)
        if context_id is None:
            raise StorageError(f"stored event {seq} names context number {row.context}, unknown")
        delta_id = _id(row.delta_id)
        origin = row.origin
        return ContextEvent(
            seq,
            context_id,
            delta_id,
            _id(row.root_hash),
            [delta_id] if row.heads is None else [*map(_id, row.heads)],
            [_app_event(e, self.shapes) for e in row.events],
            origin if isinstance(origin, str) else ("local" if origin else "remote"),
            float(row.at),
        )

    def _decode_v2(self, data: bytes) -> ContextEvent:
        try:
            row = self._v2.decode(memoryview(data)[1:])
        except msgspec.DecodeError as exc:
            raise StorageError(f"stored event is unreadable: {exc}") from None
        return ContextEvent(
            row.seq,
            _b58_text(row.context_id),
            _id(row.delta_id),
            _id(row.root_hash),
            [*map(_id, row.heads)],
            row.events,
            row.origin,
            row.at,
        )


T = TypeVar("T")
Shape = tuple[str, tuple[str, ...]]
"""An app event's name and its payload's keys, in order (`EventRowCodec`)."""


class _Numbers(Generic[T]):
    """Local numbers for what event rows name often: contexts (1-5 bytes, not 32) and
    event shapes (`Shape`: 1-3 bytes, not a name and field names).

    A number's row (`prefix` ‖ number) is put in the same batch as the first event rows
    that use it, and again in each later batch until it is seen in the store: a batch
    that failed (the delta processor's commit) must not leave rows naming a number the
    store does not hold. Numbers no retained row names are dropped at start."""

    def __init__(
        self,
        store: AsyncStore,
        prefix: bytes,
        *,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
        what: str,
        limit: int | None = None,
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._encode = encode
        self._decode = decode
        self._what = what
        self._limit = 1 << (8 * _NUMBER_BYTES) if limit is None else limit
        """Numbers held at once at most (past it `number` gives None)."""
        self.names: dict[int, T] = {}
        self._numbers: dict[T, int] = {}
        self._stored: set[int] = set()
        self.stored: dict[T, int] = {}
        """The names whose number's row is in the store, and their numbers: what `number`
        gives for them at once (every event names a context and most an app event shape,
        found here with one lookup each, issue #16)."""
        self._next = 1

    def _key(self, number: int) -> bytes:
        return self._prefix + number.to_bytes(_NUMBER_BYTES, "big")

    async def load(self) -> None:
        for key, value in await self._store.scan(_RAW, prefix=self._prefix):
            number = int.from_bytes(key[len(self._prefix) :], "big")
            try:
                name = self._decode(value)
            except (msgspec.DecodeError, ValueError, TypeError, StorageError):
                raise StorageError(f"stored event {self._what} {number} is unreadable") from None
            self.names[number] = name
            self._numbers[name] = number
            self._stored.add(number)
            self.stored[name] = number
        self._next = max(self.names, default=0) + 1

    def drop_unused(self, used: set[int], batch: WriteBatch) -> None:
        for number in set(self.names) - used:
            batch.delete(_RAW, self._key(number))
            name = self.names.pop(number)
            if self._numbers.get(name) == number:
                del self._numbers[name]
            if self.stored.get(name) == number:
                del self.stored[name]
            self._stored.discard(number)
        self._next = max(self.names, default=0) + 1

    def known(self, name: T) -> int | None:
        return self._numbers.get(name)

    def number(self, name: T, batch: WriteBatch, put: set[int]) -> int | None:
        """`name`'s number, its row staged in `batch` unless stored (or already in
        `put`, the numbers this batch holds); None once `limit` numbers are given."""
        number = self._numbers.get(name)
        if number is None:
            if len(self.names) >= self._limit or self._next >= 1 << (8 * _NUMBER_BYTES):
                return None
            number = self._next
            self._next += 1
            self._numbers[name] = number
            self.names[number] = name
        if number not in self._stored and number not in put:
            key = self._key(number)
            if self._store.get_sync(_RAW, key) is not None:
                self._stored.add(number)
                self.stored[name] = number
            else:
                batch.put(_RAW, key, self._encode(name))
                put.add(number)
        return number


def _encode_context(context_id: str) -> bytes:
    return msgspec.msgpack.encode(_b58_raw(context_id))


def _decode_context(data: bytes) -> str:
    return _b58_text(msgspec.msgpack.decode(data))


def _encode_shape(shape: Shape) -> bytes:
    return msgspec.msgpack.encode([shape[0], list(shape[1])])


def _decode_shape(data: bytes) -> Shape:
    name, keys = msgspec.msgpack.decode(data, type=tuple[str, tuple[str, ...]])
    return name, keys


MAX_SHAPE_KEYS: Final = 16
"""Payloads of more keys than this are stored whole (a shape is worth it for the small
maps apps emit again and again)."""


_STR_ONLY: Final = {str}


def shape_of(event: dict[str, Any]) -> Shape | None:
    """The shape of an app event `{"name": str, "payload": {str: ...}}`, else None."""
    if len(event) != 2:
        return None
    name, payload = event.get("name"), event.get("payload")
    if (
        isinstance(name, str)
        and type(payload) is dict
        and 0 < len(payload) <= MAX_SHAPE_KEYS
        and {*map(type, payload)} == _STR_ONLY  # (every key a str: no generator)
    ):
        return name, tuple(payload)
    return None


_RAW = Table(Column.GENERIC, BytesCodec(), BytesCodec())
_GENERIC: Final = Column.GENERIC
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
        max_shapes: int = 4096,
    ) -> None:
        self.hub = hub
        self._store = store
        self._retention = retention
        self._max_events = max_events
        self._clock = clock
        self._kept: deque[tuple[int, float]] = deque()
        """(seq, at) of the events in LMDB, oldest first: what retention may drop."""
        self._contexts = _Numbers(
            store, CONTEXT_PREFIX, encode=_encode_context, decode=_decode_context, what="context"
        )
        self._shapes = _Numbers(
            store,
            SHAPE_PREFIX,
            encode=_encode_shape,
            decode=_decode_shape,
            what="shape",
            limit=max_shapes,
        )
        self._codec = EventRowCodec(self._contexts.names, self._shapes.names)

    async def load(self) -> None:
        """Give the hub its retained events and numbering; mark the log as in use."""
        meta = await self._store.get(_META, META_KEY)
        await self._contexts.load()
        await self._shapes.load()
        events = [event for event, _ in await self.read()]
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
        kept = {seq for seq, _ in self._kept}
        named = {e.context_id for e in events if e.seq in kept}
        self._contexts.drop_unused(
            {n for n, name in self._contexts.names.items() if name in named}, batch
        )
        shapes = {shape_of(a) for e in events if e.seq in kept for a in e.events}
        self._shapes.drop_unused(
            {n for n, shape in self._shapes.names.items() if shape in shapes}, batch
        )
        # Marked in use (not clean) until `close`: a crash from here on is detected.
        batch.put(_META, META_KEY, LogMeta(self.hub.floor, seq + 1, clean=False))
        await self._store.write(batch)

    async def read(self) -> list[tuple[ContextEvent, int]]:
        """The stored events, oldest first, each with the bytes its row takes (key and
        value). Raises StorageError for a damaged row."""
        out: list[tuple[ContextEvent, int]] = []
        for key, value in await self._store.scan(_RAW, prefix=EVENT_PREFIX):
            seq = int.from_bytes(key[len(EVENT_PREFIX) :], "big")
            out.append((self._codec.decode(seq, value), len(key) + len(value)))
        return out

    async def flush(self) -> None:
        """Write what the hub published since the last flush, then apply retention."""
        unsaved = self.hub.unsaved
        if unsaved is None:
            return
        taken = unsaved[:]
        batch = WriteBatch()
        self._put(batch, taken)
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
        if events:
            self._put(batch, events)
            self._drop_expired(batch)

    def _put(self, batch: WriteBatch, events: list[ContextEvent]) -> None:
        put: set[int] = set()
        put_shapes: set[int] = set()
        shapes, stored_shapes = self._shapes, self._shapes.stored
        contexts, stored_contexts = self._contexts, self._contexts.stored

        def shape(found: Shape) -> int | None:
            number = stored_shapes.get(found)  # (`number`'s answer for a stored one)
            return shapes.number(found, batch, put_shapes) if number is None else number

        encode, ops, kept = self._codec.encode, batch.ops, self._kept
        for event in events:
            number = stored_contexts.get(event.context_id)
            if number is None:
                number = contexts.number(event.context_id, batch, put)
            if number is None:
                raise StorageError("the event log ran out of context numbers")
            # (A `Put` made here: `_RAW`'s codecs pass bytes as they are. Every call's event
            # is put so, issue #16.)
            ops.append(Put(_GENERIC, _key(event.seq), encode(event, number, shape)))
            kept.append((event.seq, event.at))

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
            batch.delete(_RAW, _key(seq))
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
