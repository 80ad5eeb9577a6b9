"""The WebSocket event log in LMDB: `since` means the same thing after a restart."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import base58
import msgspec
import pytest
from msgspec.structs import replace

from tests.context.test_contexts import auth, call, install_and_create
from trionode.api.app import create_app
from trionode.context.event_log import (
    CONTEXT_PREFIX,
    CRASH_GAP,
    EVENT_PREFIX,
    EVENT_ROW_VERSION,
    META_KEY,
    SHAPE_PREFIX,
    EventLog,
    EventRowCodec,
    LogMeta,
)
from trionode.context.events import (
    Change,
    ContextEvent,
    EventHub,
    Replay,
    Subscription,
    context_event,
)
from trionode.errors import StorageError
from trionode.node import open_node
from trionode.store.lmdb_store import Column, Put, WriteOp
from trionode.store.store import AsyncStore, BytesCodec, MsgpackCodec, Table, WriteBatch, open_store
from trionode.testing import TestNode, make_test_config

_OLD_EVENTS = Table(Column.GENERIC, BytesCodec(), BytesCodec())
_OLD_META = Table(Column.GENERIC, BytesCodec(), MsgpackCodec(LogMeta))


async def _resume(node: TestNode, context: str, since: int) -> list[dict[str, Any]]:
    client = create_app(node.node).test_client()
    async with client.websocket("/ws", headers=auth(node)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "contextIds": [context], "since": since}))
        received = [json.loads(await ws.receive())]
        while received[-1]["type"] not in ("subscribed", "resync"):
            received.append(json.loads(await ws.receive()))
    return received


async def test_a_restart_keeps_numbering_and_replays_what_was_missed(tmp_path: Path) -> None:
    config, token = make_test_config(tmp_path / "home", api=False)
    async with open_node(config) as running:
        node = TestNode(node=running, home=tmp_path / "home", token=token)
        client = create_app(running).test_client()
        context = await install_and_create(client, node)
        await call(client, node, context, "set", {"key": "a", "value": "1"})
        seen = running.hub.seq  # the client saw everything up to here, then went away
        await call(client, node, context, "set", {"key": "b", "value": "2"})
        before_restart = running.hub.seq
    async with open_node(config) as running:
        node = TestNode(node=running, home=tmp_path / "home", token=token)
        client = create_app(running).test_client()
        assert running.hub.seq == before_restart  # numbering continues
        await call(client, node, context, "set", {"key": "c", "value": "3"})
        received = await _resume(node, context, seen)
    deltas, answer = received[:-1], received[-1]
    assert answer == {"type": "subscribed", "contextIds": [context], "seq": before_restart + 1}
    assert [d["seq"] for d in deltas] == [before_restart, before_restart + 1]
    assert [d["events"][0]["payload"]["key"] for d in deltas] == ["b", "c"]


@asynccontextmanager
async def _store(path: Path) -> AsyncIterator[AsyncStore]:
    async with open_store(
        path, initial_map_size=1 << 20, max_map_size=1 << 26, reader_threads=1, passphrase=None
    ) as store:
        yield store


def _publish(hub: EventHub, context: str, n: int) -> None:
    for i in range(n):
        hub.publish(
            context_id=context,
            delta_id=f"{i:064x}",
            root_hash="",
            heads=[],
            events=[{"name": "E", "payload": {"i": i, "nested": [1.5, None, "x"]}}],
            origin="local",
        )


def _answer(hub: EventHub, since: int) -> tuple[list[int], dict[str, Any]]:
    sub = Subscription(hub, 10_000)
    hub.add_contexts(sub, ["ctx"], since)
    replay = sub.receive.receive_nowait()
    assert isinstance(replay, Replay)
    return [e.seq for e in replay.events], replay.answer


def _log(hub: EventHub, store: AsyncStore, clock: Callable[[], float]) -> EventLog:
    return EventLog(hub, store, retention=100.0, max_events=50, clock=clock)


async def _write_then_publish(store: AsyncStore, written: int, unwritten: int) -> EventLog:
    log = _log(EventHub(), store, lambda: 0.0)
    await log.load()
    _publish(log.hub, "ctx", written)
    await log.flush()
    _publish(log.hub, "ctx", unwritten)
    return log


async def test_events_survive_a_clean_stop_exactly(tmp_path: Path) -> None:
    async with _store(tmp_path / "db") as store:
        log = await _write_then_publish(store, 5, 2)
        await log.close()  # writes the last two too
    async with _store(tmp_path / "db") as store:
        again = EventHub()
        await _log(again, store, lambda: 0.0).load()
    assert again.seq == 7
    seqs, answer = _answer(again, 3)
    assert seqs == [4, 5, 6, 7]
    assert answer["type"] == "subscribed"
    replayed = again._recent["ctx"][0]
    assert replayed.events == [{"name": "E", "payload": {"i": 0, "nested": [1.5, None, "x"]}}]


async def test_after_a_crash_old_positions_must_resync(tmp_path: Path) -> None:
    async with _store(tmp_path / "db") as store:
        # 3 events published (and maybe seen by clients), never written: the process dies.
        await _write_then_publish(store, 5, 3)
    async with _store(tmp_path / "db") as store:
        again = EventHub()
        await _log(again, store, lambda: 0.0).load()
    assert again.seq == 5 + CRASH_GAP  # never reuses a number a client may have seen
    for since in (0, 5, 7):
        _, answer = _answer(again, since)
        assert answer["type"] == "resync"
    _publish(again, "ctx", 1)
    seqs, answer = _answer(again, 5 + CRASH_GAP)
    assert (seqs, answer["type"]) == ([5 + CRASH_GAP + 1], "subscribed")


async def test_retention_drops_old_events_and_says_so(tmp_path: Path) -> None:
    now = [0.0]
    async with _store(tmp_path / "db") as store:
        hub = EventHub(clock=lambda: now[0])
        log = _log(hub, store, lambda: now[0])
        await log.load()
        _publish(hub, "ctx", 3)  # at t=0
        await log.flush()
        now[0] = 150.0  # past the 100 s retention
        _publish(hub, "ctx", 2)  # seq 4, 5
        await log.flush()
        assert hub.floor == 4
        assert _answer(hub, 2)[1]["type"] == "resync"
        assert _answer(hub, 3)[0] == [4, 5]
        _publish(hub, "ctx", 60)  # the count limit (50) drops more
        await log.flush()
        assert hub.floor == 66 - 50
        await log.close()
        assert len(await store.raw_scan(Column.GENERIC, prefix=b"ws-event/")) == 50
    async with _store(tmp_path / "db") as store:
        again = EventHub(clock=lambda: now[0])
        await _log(again, store, lambda: now[0]).load()
    assert again.floor == 16
    assert _answer(again, 14)[1]["type"] == "resync"
    assert _answer(again, 15)[0] == list(range(16, 66))


def _event(seq: int, **fields: Any) -> ContextEvent:
    values: dict[str, Any] = {
        "seq": seq,
        "context_id": base58.b58encode(bytes(range(32))).decode("ascii"),
        "delta_id": bytes([seq]).hex() * 32,
        "root_hash": "ab" * 32,
        "heads": ["cd" * 32, "ef" * 32],
        "events": [{"name": "Inserted", "payload": {"key": "k", "value": "v" * 100}}],
        "origin": "local",
        "at": 1.5,
    }
    return context_event(**(values | fields))


def _v1_row(event: ContextEvent) -> bytes:
    """`event` as the first nodes stored it: the event's fields in an array, ids in hex."""
    return msgspec.msgpack.encode(
        [
            event.seq,
            event.context_id,
            event.delta_id,
            event.root_hash,
            event.heads,
            event.events,
            event.origin,
            event.at,
        ]
    )


def _v2_row(event: ContextEvent) -> bytes:
    """`event` as a node before version 3 rows stored it: every field, ids as raw bytes."""
    return b"\x02" + msgspec.msgpack.encode(
        [
            event.seq,
            base58.b58decode(event.context_id),
            bytes.fromhex(event.delta_id),
            bytes.fromhex(event.root_hash),
            [bytes.fromhex(h) for h in event.heads],
            event.events,
            event.origin,
            event.at,
        ]
    )


def test_event_rows_say_only_what_no_key_or_other_row_says() -> None:
    event = _event(7, heads=[bytes([7]).hex() * 32], at=1_700_000_000.0)
    codec = EventRowCodec({1: event.context_id})
    row = codec.encode(event, 1)
    assert codec.decode(7, row) == event
    assert row.startswith(EVENT_ROW_VERSION)
    assert base58.b58decode(event.context_id) not in row  # named by its number
    assert row.count(bytes.fromhex(event.delta_id)) == 1  # the heads are just the delta
    # Against version 2: the context (33 bytes), the heads (34), the seq (1), the event's
    # field names (13), "local" (5) and the time as a float (4).
    assert len(_v2_row(event)) - len(row) == 33 + 34 + 1 + 13 + 5 + 4


def test_event_rows_keep_what_is_not_the_usual_shape_exactly() -> None:
    odd = _event(
        8,
        context_id="not base58: 0OIl",
        delta_id="AB" * 32,
        root_hash="",
        heads=["x", "cd" * 32],
        events=[{"name": "N", "payload": 1, "extra": True}, {"payload": None}, {"name": 3}],
        origin="elsewhere",
        at=-2.5,
    )
    codec = EventRowCodec({5: odd.context_id})
    assert codec.decode(8, codec.encode(odd, 5)) == odd
    remote = _event(9, origin="remote", at=12.75, heads=[])
    assert codec.decode(9, codec.encode(remote, 5)) == replace(
        remote,
        context_id=odd.context_id,
        at=12.0,  # (whole seconds: only retention reads it)
    )


def test_event_rows_written_before_still_load_and_bad_rows_are_storage_errors() -> None:
    codec = EventRowCodec({1: "ctx"})
    old = _event(3)
    assert codec.decode(3, _v1_row(old)) == old  # version 1
    assert codec.decode(3, _v2_row(old)) == old
    good = codec.encode(_event(4, context_id="ctx"), 1)
    for bad in (
        EVENT_ROW_VERSION,
        EVENT_ROW_VERSION + b"\xc1",
        EVENT_ROW_VERSION + b"\x93\x01",
        good[:-3],
        codec.encode(_event(4, context_id="ctx"), 2),  # a context number nobody stored
        codec.encode(_event(4, context_id="ctx", events=[{1: 2}]), 1),  # a key is no text
        codec.encode(_event(4, context_id="ctx", events=[["a", 1, 2]]), 1),  # no pair
        b"\x02",
        b"\x02\x93\x01",
        b"\x98garbage",
    ):
        with pytest.raises(StorageError):
            codec.decode(4, bad)


async def test_contexts_are_numbered_once_and_unused_numbers_go_at_start(
    tmp_path: Path,
) -> None:
    now = [0.0]
    async with _store(tmp_path / "db") as store:
        hub = EventHub(clock=lambda: now[0])
        log = EventLog(hub, store, retention=100.0, max_events=50, clock=lambda: now[0])
        await log.load()
        first = WriteBatch()
        log.stage(first, log.hub.reserve([_change("a"), _change("b"), _change("a")]))
        context_rows = [op for op in first.ops if _names_a_context(op)]
        assert len(context_rows) == 2  # one row per context, in the batch that needs it
        # That batch never commits (the delta processor's write failed): the next one
        # that names "a" holds its number's row again.
        again = WriteBatch()
        log.stage(again, log.hub.reserve([_change("a")]))
        assert sum(_names_a_context(op) for op in again.ops) == 1
        await store.write(again)
        third = WriteBatch()
        log.stage(third, log.hub.reserve([_change("a")]))
        assert not any(_names_a_context(op) for op in third.ops)  # stored now
        await store.write(third)
        now[0] = 50.0
        _publish(log.hub, "c", 2)
        await log.close()
        assert len(await store.raw_scan(Column.GENERIC, prefix=CONTEXT_PREFIX)) == 2  # a, c
    async with _store(tmp_path / "db") as store:
        hub = EventHub()
        reopened = EventLog(hub, store, retention=100.0, max_events=50, clock=lambda: now[0])
        await reopened.load()
        await reopened.close()
        assert [e.context_id for e in hub._recent["a"]] == ["a", "a"]
        assert [e.events for e in hub._recent["c"]] == [
            [{"name": "E", "payload": {"i": i, "nested": [1.5, None, "x"]}}] for i in (0, 1)
        ]
        now[0] = 120.0  # a's events (t=0) are past retention, c's (t=50) are not
    async with _store(tmp_path / "db") as store:
        hub = EventHub()
        await EventLog(hub, store, retention=100.0, max_events=50, clock=lambda: now[0]).load()
        assert hub.floor == 6  # a's events were dropped; c's (6, 7) are kept
        assert [e.seq for e in hub._recent["c"]] == [6, 7]
        assert len(await store.raw_scan(Column.GENERIC, prefix=CONTEXT_PREFIX)) == 1  # c


def _names_a_context(op: WriteOp) -> bool:
    return isinstance(op, Put) and op.key.startswith(CONTEXT_PREFIX)


def _change(context: str) -> Change:
    return Change(context, "ab" * 32, "cd" * 32, ["ab" * 32], [], "local")


async def test_a_log_of_old_rows_loads_and_goes_on_in_the_new_format(tmp_path: Path) -> None:
    async with _store(tmp_path / "db") as store:
        batch = WriteBatch()
        for seq in (1, 2):  # as a node before compact rows wrote them
            batch.put(_OLD_EVENTS, EVENT_PREFIX + seq.to_bytes(8, "big"), _v1_row(_event(seq)))
        batch.put(_OLD_META, META_KEY, LogMeta(floor=1, next_seq=3, clean=True))
        await store.write(batch)
        log = _log(EventHub(), store, lambda: 0.0)
        await log.load()
        _publish(log.hub, "ctx", 1)
        await log.close()
        rows = dict(await store.raw_scan(Column.GENERIC, prefix=EVENT_PREFIX))
    assert not rows[EVENT_PREFIX + (1).to_bytes(8, "big")].startswith(EVENT_ROW_VERSION)
    assert rows[EVENT_PREFIX + (3).to_bytes(8, "big")].startswith(EVENT_ROW_VERSION)
    async with _store(tmp_path / "db") as store:
        again = EventHub()
        await _log(again, store, lambda: 0.0).load()
    assert again.seq == 3
    assert [e.seq for e in again._recent[_event(1).context_id]] == [1, 2]
    assert [e.seq for e in again._recent["ctx"]] == [3]
    assert again._recent[_event(1).context_id][1] == _event(2)


def test_an_app_event_whose_payload_is_a_small_map_names_its_shape_by_number() -> None:
    event = _event(7, at=1.0)
    shapes: dict[int, Any] = {}
    codec = EventRowCodec({1: event.context_id}, shapes)
    whole = codec.encode(event, 1)

    def shape(found: Any) -> int:
        shapes[3] = found
        return 3

    row = codec.encode(event, 1, shape)
    assert shapes == {3: ("Inserted", ("key", "value"))}
    assert codec.decode(7, row) == event
    # The name (9 bytes), the map's header (1) and its keys (4 + 6) against a number and an
    # array header.
    assert len(whole) - len(row) == 9 + 1 + 10 - 2
    odd = [
        {"name": "N", "payload": {1: 2}},  # a key that is no text
        {"name": "N", "payload": {}},
        {"name": "N", "payload": {f"k{i}": i for i in range(17)}},  # too many keys
        {"name": "N", "payload": [1, 2]},
        {"name": "N", "payload": {"a": 1}, "extra": True},
        {"name": "M", "payload": {"b": {"nested": [1, None]}, "a": 1.5}},  # (key order kept)
    ]
    shapes.clear()
    mixed = replace(event, events=odd)
    assert codec.decode(7, codec.encode(mixed, 1, shape)) == mixed
    assert shapes == {3: ("M", ("b", "a"))}
    for bad in (
        codec.encode(event, 1, lambda _: 4),  # a shape number nobody stored
        EVENT_ROW_VERSION + msgspec.msgpack.encode([1, b"", b"", None, [[3, [1]]], True, 0]),
        EVENT_ROW_VERSION + msgspec.msgpack.encode([1, b"", b"", None, [[3, 7]], True, 0]),
    ):
        with pytest.raises(StorageError):
            codec.decode(7, bad)
    v3 = b"\x03" + whole[1:]  # a version 3 row (no shapes) still loads
    assert codec.decode(7, v3) == event


async def test_shapes_are_numbered_once_kept_while_named_and_bounded(tmp_path: Path) -> None:
    now = [0.0]

    def names_a_shape(op: WriteOp) -> bool:
        return isinstance(op, Put) and op.key.startswith(SHAPE_PREFIX)

    async with _store(tmp_path / "db") as store:
        hub = EventHub(clock=lambda: now[0])
        log = EventLog(
            hub, store, retention=100.0, max_events=50, clock=lambda: now[0], max_shapes=2
        )
        await log.load()
        changes = [
            Change(
                "a", "ab" * 32, "cd" * 32, ["ab" * 32], [{"name": n, "payload": {"x": 1}}], "local"
            )
            for n in ("one", "two", "one", "three")
        ]
        first = WriteBatch()
        log.stage(first, log.hub.reserve(changes))
        assert sum(names_a_shape(op) for op in first.ops) == 2  # "three": past the limit
        again = WriteBatch()  # (the first batch never committed)
        log.stage(again, log.hub.reserve(changes[:1]))
        assert sum(names_a_shape(op) for op in again.ops) == 1
        await store.write(again)
        third = WriteBatch()
        log.stage(third, log.hub.reserve(changes))
        assert sum(names_a_shape(op) for op in third.ops) == 1  # "two": "one" is stored
        await store.write(third)
        fourth = WriteBatch()
        log.stage(fourth, log.hub.reserve(changes))
        assert not any(names_a_shape(op) for op in fourth.ops)
        await store.write(fourth)
        await log.close()
        expected = [c.events for c in changes[:1] + changes + changes]  # (what committed)
    async with _store(tmp_path / "db") as store:
        hub = EventHub()
        log = EventLog(hub, store, retention=100.0, max_events=50, clock=lambda: now[0])
        await log.load()
        await log.close()
        assert [e.events for e in hub._recent["a"]] == expected
        assert len(await store.raw_scan(Column.GENERIC, prefix=SHAPE_PREFIX)) == 2
    now[0] = 150.0  # every event is past retention: no row names a shape
    async with _store(tmp_path / "db") as store:
        await EventLog(
            EventHub(), store, retention=100.0, max_events=50, clock=lambda: now[0]
        ).load()
        assert await store.raw_scan(Column.GENERIC, prefix=SHAPE_PREFIX) == []
