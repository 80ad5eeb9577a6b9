"""Checkpoint rows (`ckvv/` ‖ context ‖ delta id) kept in the delta index row of the same
context and id (store layout 6): every read and write sees two columns as before."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from trionode.errors import StorageError
from trionode.store.encryption import KdfParams
from trionode.store.lmdb_store import INLINE_MAX, Column, Delete, LmdbStore, Put

FAST_KDF = KdfParams(time_cost=1, memory_kib=8 * 1024)
CONTEXTS = [hashlib.sha256(b"context %d" % i).digest() for i in range(2)]
IDS = [hashlib.sha256(b"delta %d" % i).digest() for i in range(4)]
_keys = st.tuples(st.sampled_from(CONTEXTS), st.sampled_from(IDS))
_ops = st.lists(
    st.tuples(
        st.sampled_from(["delta", "checkpoint", "other"]),
        _keys,
        st.one_of(
            st.none(),
            st.just(b""),
            st.binary(min_size=1, max_size=40),  # (kept in the index row)
            st.just(b"\x07" * (INLINE_MAX + 1)),  # (kept in the log)
        ),
    ),
    max_size=30,
)


def _key(kind: str, context: bytes, delta_id: bytes) -> tuple[Column, bytes]:
    if kind == "delta":
        return Column.DELTA, context + delta_id
    if kind == "checkpoint":
        return Column.GENERIC, b"ckvv/" + context + delta_id
    return Column.GENERIC, b"ckvv/" + context + delta_id[:8]  # (not a checkpoint key)


def _check(store: LmdbStore, model: dict[tuple[Column, bytes], bytes]) -> None:
    for column in (Column.DELTA, Column.GENERIC):
        rows = sorted((k, v) for (c, k), v in model.items() if c is column)
        assert store.scan(column) == rows
        assert store.count(column) == len(rows)
        for context in CONTEXTS:
            prefix = context if column is Column.DELTA else b"ckvv/" + context
            mine = [(k, v) for k, v in rows if k.startswith(prefix)]
            assert store.scan(column, prefix=prefix) == mine
            assert store.scan(column, prefix=prefix, limit=2) == mine[:2]
            if mine:
                assert store.scan(column, prefix=prefix, start=mine[-1][0]) == mine[-1:]
                assert store.scan(column, prefix=prefix, end=mine[-1][0]) == mine[:-1]
    for context in CONTEXTS:
        for delta_id in IDS:
            for kind in ("delta", "checkpoint", "other"):
                column, key = _key(kind, context, delta_id)
                assert store.get(column, key) == model.get((column, key))
                assert store.get_many(column, [key]) == [model.get((column, key))]


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(_ops, min_size=1, max_size=4), encrypted=st.booleans())
def test_checkpoint_rows_and_delta_rows_read_as_two_columns(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[tuple[str, tuple[bytes, bytes], bytes | None]]],
    encrypted: bool,
) -> None:
    path = tmp_path_factory.mktemp("db")
    passphrase = "pw" if encrypted else None
    model: dict[tuple[Column, bytes], bytes] = {}
    store = LmdbStore.open(path, passphrase=passphrase, kdf=FAST_KDF)
    try:
        for ops in batches:
            writes: list[Put | Delete] = []
            for kind, (context, delta_id), value in ops:
                column, key = _key(kind, context, delta_id)
                if value is None:
                    writes.append(Delete(column, key))
                    model.pop((column, key), None)
                else:
                    writes.append(Put(column, key, value))
                    model[column, key] = value
            store.write(writes)
            _check(store, model)
    finally:
        store.close()
    store = LmdbStore.open(path, passphrase=passphrase, kdf=FAST_KDF)
    try:
        _check(store, model)
    finally:
        store.close()


def test_a_folded_delta_takes_one_index_row(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db")
    context, delta_id = CONTEXTS[0], IDS[0]
    try:
        store.put(Column.DELTA, context + delta_id, b"body" * 100)
        store.write(
            [
                Put(Column.DELTA, context + delta_id, b""),
                Put(Column.GENERIC, b"ckvv/" + context + delta_id, b"\x02vv"),
            ]
        )
        with store._env.begin() as txn:
            assert txn.stat(store._dbs[Column.GENERIC])["entries"] == 0
            assert txn.stat(store._dbs[Column.DELTA])["entries"] == 1
            assert txn.stat(store._deltas.log)["entries"] == 0
        assert store.get(Column.DELTA, context + delta_id) == b""
        assert store.get(Column.GENERIC, b"ckvv/" + context + delta_id) == b"\x02vv"
    finally:
        store.close()


def test_a_damaged_index_value_is_a_storage_error(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db")
    context, delta_id = CONTEXTS[0], IDS[0]
    try:
        store.put(Column.GENERIC, b"ckvv/" + context + delta_id, b"vv")
        stored_key = store.stored_key(Column.DELTA, context + delta_id)
        assert stored_key is not None
        for damaged in (b"\xff", b"\xff\x03\x00"):
            with store._env.begin(write=True, db=store._dbs[Column.DELTA]) as txn:
                txn.put(stored_key, damaged)
            with pytest.raises(StorageError):
                store.get(Column.DELTA, context + delta_id)
            with pytest.raises(StorageError):
                store.scan(Column.GENERIC, prefix=b"ckvv/" + context)
    finally:
        store.close()


def test_a_layout_5_stores_checkpoint_rows_move_into_the_index_at_open(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db")
    context = CONTEXTS[0]
    rows = {b"ckvv/" + context + d: b"\x02%d" % i for i, d in enumerate(IDS)}
    try:
        store.write([Put(Column.DELTA, context + IDS[0], b"")])
        with store._env.begin(write=True) as txn:  # as layout 5 kept them
            for key, value in rows.items():
                generic_key = store.stored_key(Column.GENERIC, key)
                txn.put(generic_key, value, db=store._dbs[Column.GENERIC])
            txn.put(b"store-layout", b"5", db=store._dbs[Column.META])
    finally:
        store.close()
    store = LmdbStore.open(tmp_path / "db")
    try:
        assert dict(store.scan(Column.GENERIC)) == rows
        assert store.scan(Column.DELTA) == [(context + IDS[0], b"")]
        with store._env.begin() as txn:
            assert txn.stat(store._dbs[Column.GENERIC])["entries"] == 0
    finally:
        store.close()
