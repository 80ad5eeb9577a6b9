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

from tests.context.test_contexts import auth, call, install_and_create
from trionode.api.app import create_app
from trionode.context.event_log import (
    CRASH_GAP,
    EVENT_PREFIX,
    EVENT_ROW_VERSION,
    META_KEY,
    EventLog,
    EventRowCodec,
    LogMeta,
)
from trionode.context.events import ContextEvent, EventHub, Replay, Subscription
from trionode.errors import StorageError
from trionode.node import open_node
from trionode.store.lmdb_store import Column
from trionode.store.store import AsyncStore, BytesCodec, MsgpackCodec, Table, WriteBatch, open_store
from trionode.testing import TestNode, make_test_config

_OLD_EVENTS = Table(Column.GENERIC, BytesCodec(), MsgpackCodec(ContextEvent))
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
    return ContextEvent(**(values | fields))


def test_event_rows_hold_ids_as_bytes_and_read_back_exactly() -> None:
    codec = EventRowCodec()
    event = _event(7)
    row = codec.encode(event)
    as_before = msgspec.msgpack.encode(event)
    assert codec.decode(row) == event
    # The ids as 32 raw bytes instead of base58 (context) and hex (delta, root, 2 heads)
    # text, for one version byte.
    assert len(as_before) - len(row) == (len(event.context_id) - 32) + 4 * 32 - 1
    # What does not round-trip through bytes stays text, exactly.
    odd = _event(8, context_id="not base58: 0OIl", delta_id="AB" * 32, root_hash="", heads=["x"])
    assert codec.decode(codec.encode(odd)) == odd


def test_event_rows_written_before_still_load_and_bad_rows_are_storage_errors() -> None:
    codec = EventRowCodec()
    old = _event(3)
    assert codec.decode(msgspec.msgpack.encode(old)) == old
    for bad in (EVENT_ROW_VERSION, EVENT_ROW_VERSION + b"\xc1", EVENT_ROW_VERSION + b"\x93\x01"):
        with pytest.raises(StorageError):
            codec.decode(bad)
    with pytest.raises(StorageError):
        codec.decode(b"\x98garbage")


async def test_a_log_of_old_rows_loads_and_goes_on_in_the_new_format(tmp_path: Path) -> None:
    async with _store(tmp_path / "db") as store:
        batch = WriteBatch()
        for seq in (1, 2):  # as a node before compact rows wrote them
            batch.put(_OLD_EVENTS, EVENT_PREFIX + seq.to_bytes(8, "big"), _event(seq))
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
