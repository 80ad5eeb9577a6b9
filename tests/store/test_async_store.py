from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

from trionode.errors import StorageError
from trionode.store.lmdb_store import Column, PutMany
from trionode.store.store import BytesCodec, MsgpackCodec, StrCodec, Table, WriteBatch, open_store


class Head(msgspec.Struct):
    context: str
    parents: list[bytes]


HEADS = Table(Column.GENERIC, StrCodec(), MsgpackCodec(Head))
BLOBS = Table(Column.BLOB_META, BytesCodec(), BytesCodec())


async def test_typed_tables_and_batches(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with open_store(
        tmp_path / "db",
        initial_map_size=1 << 20,
        max_map_size=1 << 30,
        reader_threads=2,
        passphrase=None,
        registry=registry,
    ) as store:
        batch = WriteBatch()
        batch.put(HEADS, "ctx/1", Head("c1", [b"\x00" * 32]))
        batch.put(BLOBS, b"blob", b"meta")
        await store.write(batch)
        assert await store.get(HEADS, "ctx/1") == Head("c1", [b"\x00" * 32])
        assert await store.get(BLOBS, b"blob") == b"meta"
        assert [k for k, _ in await store.scan(HEADS, prefix=b"ctx/")] == ["ctx/1"]
        await store.delete(BLOBS, b"blob")
        assert await store.get(BLOBS, b"blob") is None
        stats = await store.stats()
        assert stats.entries["generic"] == 1
    puts = registry.get_sample_value(
        "trionode_store_operations_total", {"op": "put", "column": "generic"}
    )
    assert puts == 1.0


async def test_operations_are_counted_by_kind_and_column(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with open_store(
        tmp_path / "db",
        initial_map_size=1 << 20,
        max_map_size=1 << 30,
        reader_threads=1,
        passphrase=None,
        registry=registry,
    ) as store:
        batch = WriteBatch()
        batch.put(BLOBS, b"a", b"1")
        batch.put(BLOBS, b"b", b"2")
        batch.delete(BLOBS, b"c")
        batch.ops.append(PutMany(Column.GENERIC, [(b"x", b"1"), (b"y", b"2"), (b"z", b"3")]))
        await store.write(batch)
        only_puts = WriteBatch()  # (a call's write: counted in one step, the same counts)
        only_puts.put(BLOBS, b"d", b"4")
        only_puts.put(BLOBS, b"e", b"5")
        only_puts.put(HEADS, "ctx/2", Head("c2", []))
        await store.write(only_puts)
        await store.get(BLOBS, b"a")
        await store.delete(BLOBS, b"a")

    def count(op: str, column: str) -> float | None:
        return registry.get_sample_value(
            "trionode_store_operations_total", {"op": op, "column": column}
        )

    assert count("put", "blob_meta") == 4.0
    assert count("put", "generic") == 4.0
    assert count("delete", "blob_meta") == 2.0
    assert count("get", "blob_meta") == 1.0
    assert count("delete", "generic") is None  # (nothing deleted there: no series)


async def test_undecodable_value_is_a_storage_error(tmp_path: Path) -> None:
    async with open_store(
        tmp_path / "db",
        initial_map_size=1 << 20,
        max_map_size=1 << 30,
        reader_threads=1,
        passphrase=None,
    ) as store:
        store.raw.put(Column.GENERIC, b"bad", b"\xc1")  # 0xc1 is never valid msgpack
        with pytest.raises(StorageError, match="unreadable"):
            await store.get(HEADS, "bad")


async def test_concurrent_writers_are_serialised_and_all_commit(tmp_path: Path) -> None:
    async with open_store(
        tmp_path / "db",
        initial_map_size=1 << 20,
        max_map_size=1 << 30,
        reader_threads=4,
        passphrase=None,
    ) as store:

        async def writer(n: int) -> None:
            for i in range(20):
                await store.put(BLOBS, b"%d/%d" % (n, i), b"x" * 100)

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(writer, n)
        assert store.raw.count(Column.BLOB_META) == 100
