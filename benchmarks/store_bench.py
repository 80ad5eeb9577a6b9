"""Datastore throughput: trionode's store (sync core and async façade) vs raw `lmdb` calls."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import lmdb
import trio

from benchmarks.harness import Row, timed
from trionode.store.encryption import KdfParams
from trionode.store.lmdb_store import Column, LmdbStore, Put
from trionode.store.store import BytesCodec, Table, open_store

VALUE = b"v" * 100
BATCH = 100
TABLE = Table(Column.STATE, BytesCodec(), BytesCodec())


def _keys(n: int) -> list[bytes]:
    return [b"key/%08d" % i for i in range(n)]


def _raw_lmdb(path: Path, keys: list[bytes], lookups: list[bytes]) -> dict[str, float]:
    env = lmdb.open(str(path), map_size=1 << 30, max_dbs=4)
    db = env.open_db(b"state")

    def puts() -> None:
        for i in range(0, len(keys), BATCH):
            _raw_batch(env, db, keys[i : i + BATCH])

    put = timed(puts)

    def gets() -> None:
        for key in lookups:
            with env.begin(db=db) as txn:
                txn.get(key)

    def scan() -> None:
        with env.begin(db=db) as txn:
            for _ in txn.cursor():
                pass

    get = timed(gets)
    scan_t = timed(scan)
    env.close()
    return {"put": len(keys) / put, "get": len(lookups) / get, "scan": len(keys) / scan_t}


def _raw_batch(env: lmdb.Environment, db: object, keys: list[bytes]) -> None:
    with env.begin(write=True, db=db) as txn:
        for key in keys:
            txn.put(key, VALUE)


def _sync_store(
    path: Path, keys: list[bytes], lookups: list[bytes], passphrase: str | None
) -> dict[str, float]:
    store = LmdbStore.open(
        path,
        initial_map_size=1 << 30,
        passphrase=passphrase,
        kdf=KdfParams(time_cost=1, memory_kib=8192),
    )

    def puts() -> None:
        for i in range(0, len(keys), BATCH):
            store.write([Put(Column.STATE, k, VALUE) for k in keys[i : i + BATCH]])

    put = timed(puts)
    get = timed(lambda: [store.get(Column.STATE, k) for k in lookups])
    scan = timed(lambda: store.scan(Column.STATE))
    store.close()
    return {"put": len(keys) / put, "get": len(lookups) / get, "scan": len(keys) / scan}


async def _async_store(
    path: Path, keys: list[bytes], lookups: list[bytes], passphrase: str | None
) -> dict[str, float]:
    async with open_store(
        path,
        initial_map_size=1 << 30,
        max_map_size=1 << 34,
        reader_threads=4,
        passphrase=passphrase,
        kdf=KdfParams(time_cost=1, memory_kib=8192),
    ) as store:
        started = trio.current_time()
        for i in range(0, len(keys), BATCH):
            await store.write([Put(Column.STATE, k, VALUE) for k in keys[i : i + BATCH]])
        put = trio.current_time() - started
        started = trio.current_time()
        for k in lookups:
            await store.get(TABLE, k)
        get = trio.current_time() - started
        started = trio.current_time()
        await store.scan(TABLE)
        scan = trio.current_time() - started
    return {"put": len(keys) / put, "get": len(lookups) / get, "scan": len(keys) / scan}


async def run(*, quick: bool) -> list[Row]:
    n = 2_000 if quick else 50_000
    keys = _keys(n)
    lookups = random.Random(1).choices(keys, k=n // 5 if quick else 10_000)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        raw = _raw_lmdb(base / "raw", keys, lookups)
        for label, passphrase in (("plain", None), ("encrypted", "pw")):
            sync = _sync_store(base / f"sync-{label}", keys, lookups, passphrase)
            asyn = await _async_store(base / f"async-{label}", keys, lookups, passphrase)
            for op, unit in (("put", "ops/s"), ("get", "ops/s"), ("scan", "rows/s")):
                rows.append(
                    Row(f"store {op} ({label}, sync core)", sync[op], unit, "raw lmdb", raw[op])
                )
                rows.append(
                    Row(f"store {op} ({label}, async)", asyn[op], unit, "raw lmdb", raw[op])
                )
    return rows
