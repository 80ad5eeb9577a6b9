from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, strategies as st

from trionode.errors import StorageError, WrongPassphraseError
from trionode.store.encryption import KdfParams
from trionode.store.lmdb_store import (
    INLINE_MAX,
    NUMBERED,
    Column,
    Delete,
    LmdbStore,
    Put,
    PutMany,
)

FAST_KDF = KdfParams(time_cost=1, memory_kib=8 * 1024)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    s = LmdbStore.open(tmp_path / "db", initial_map_size=1 << 20)
    yield s
    s.close()


def test_put_get_delete(store: LmdbStore) -> None:
    store.put(Column.STATE, b"k", b"v")
    assert store.get(Column.STATE, b"k") == b"v"
    assert store.get(Column.DELTA, b"k") is None  # columns are separate
    store.delete(Column.STATE, b"k")
    assert store.get(Column.STATE, b"k") is None


def test_batch_spans_columns_atomically(store: LmdbStore) -> None:
    store.write([Put(Column.STATE, b"a", b"1"), Put(Column.DELTA, b"a", b"2")])
    assert store.get(Column.STATE, b"a") == b"1"
    assert store.get(Column.DELTA, b"a") == b"2"
    # A batch with one invalid op writes nothing at all.
    with pytest.raises(StorageError, match="key of"):
        store.write([Put(Column.STATE, b"b", b"1"), Put(Column.DELTA, b"x" * 600, b"2")])
    assert store.get(Column.STATE, b"b") is None


@pytest.mark.parametrize("encrypted", [False, True])
def test_runs_of_puts_and_put_many_keep_the_order_of_ops(tmp_path: Path, encrypted: bool) -> None:
    """Puts to one column go in one putmulti (a PutMany is one op of many rows); every op
    still takes effect in order, across columns, deletes and the delta log."""
    store = LmdbStore.open(tmp_path / "db", passphrase="pw" if encrypted else None, kdf=FAST_KDF)
    try:
        store.write(
            [
                PutMany(Column.STATE, [(b"a", b"1"), (b"b", b"1"), (b"c", b"1")]),
                Put(Column.STATE, b"b", b"2"),
                Delete(Column.STATE, b"c"),
                PutMany(Column.GENERIC, [(b"a", b"g")]),
                Put(Column.STATE, b"c", b"3"),
                Put(Column.DELTA, b"d", b"x"),
                PutMany(Column.DELTA, [(b"e", b"y")]),
                Put(Column.STATE, b"d", b"4"),
                Delete(Column.STATE, b"d"),
            ]
        )
        assert store.scan(Column.STATE) == [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]
        assert store.scan(Column.GENERIC) == [(b"a", b"g")]
        assert store.get(Column.DELTA, b"d") == b"x"
        assert store.get(Column.DELTA, b"e") == b"y"
        # A bad key anywhere in a PutMany writes nothing at all.
        with pytest.raises(StorageError, match="empty keys"):
            store.write([Put(Column.STATE, b"z", b"1"), PutMany(Column.STATE, [(b"", b"1")])])
        assert store.get(Column.STATE, b"z") is None
    finally:
        store.close()


def test_prefix_and_range_scans(store: LmdbStore) -> None:
    store.write(
        [Put(Column.GENERIC, f"{p}/{i:03}".encode(), b"%d" % i) for p in "ab" for i in range(20)]
    )
    rows = store.scan(Column.GENERIC, prefix=b"a/")
    assert [k for k, _ in rows] == [f"a/{i:03}".encode() for i in range(20)]
    rows = store.scan(Column.GENERIC, start=b"a/005", end=b"a/010")
    assert [k for k, _ in rows] == [f"a/{i:03}".encode() for i in range(5, 10)]
    rows = store.scan(Column.GENERIC, prefix=b"b/", start=b"a/999", limit=3)
    assert [k for k, _ in rows] == [b"b/000", b"b/001", b"b/002"]
    assert store.scan(Column.GENERIC, prefix=b"c/") == []


def test_map_grows_instead_of_failing(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db", initial_map_size=1 << 20, max_map_size=64 << 20)
    value = b"\x01" * 4096
    for batch in range(40):  # ~6.5 MiB of values into a 1 MiB map
        store.write([Put(Column.STATE, b"%d/%d" % (batch, i), value) for i in range(40)])
    assert store.stats().map_size > 1 << 20
    assert store.count(Column.STATE) == 1600
    store.close()
    # Reopening keeps the grown map even though the configured initial size is smaller.
    reopened = LmdbStore.open(tmp_path / "db", initial_map_size=1 << 20, max_map_size=64 << 20)
    assert reopened.count(Column.STATE) == 1600
    reopened.close()


def test_full_map_at_maximum_is_a_clean_error(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db", initial_map_size=1 << 20, max_map_size=2 << 20)
    store.put(Column.STATE, b"before", b"ok")
    with pytest.raises(StorageError, match="datastore is full"):
        store.write([Put(Column.STATE, b"%d" % i, b"\x00" * 8192) for i in range(1000)])
    assert store.get(Column.STATE, b"before") == b"ok"
    assert store.get(Column.STATE, b"0") is None
    store.close()


def test_encrypted_values_never_hit_disk_in_plaintext(tmp_path: Path) -> None:
    secret = b"top-secret-value-" * 8
    store = LmdbStore.open(tmp_path / "db", passphrase="pw", kdf=FAST_KDF)
    assert store.encrypted
    store.write([Put(Column.STATE, b"k%d" % i, secret) for i in range(50)])
    assert store.get(Column.STATE, b"k7") == secret
    assert [v for _, v in store.scan(Column.STATE, limit=2)] == [secret, secret]
    store.close()
    data = (tmp_path / "db" / "data.mdb").read_bytes()
    assert b"top-secret-value-" not in data
    assert b"k7" in data  # keys stay plaintext for ordered scans
    reopened = LmdbStore.open(tmp_path / "db", passphrase="pw", kdf=FAST_KDF)
    assert reopened.get(Column.STATE, b"k7") == secret
    reopened.close()


def test_wrong_passphrase_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    LmdbStore.open(tmp_path / "db", passphrase="right", kdf=FAST_KDF).close()
    before = (tmp_path / "db" / "data.mdb").read_bytes()
    with pytest.raises(WrongPassphraseError, match="wrong passphrase"):
        LmdbStore.open(tmp_path / "db", passphrase="wrong", kdf=FAST_KDF)
    assert (tmp_path / "db" / "data.mdb").read_bytes() == before


def test_encryption_mode_mismatches_are_refused(tmp_path: Path) -> None:
    LmdbStore.open(tmp_path / "enc", passphrase="pw", kdf=FAST_KDF).close()
    with pytest.raises(StorageError, match="is encrypted"):
        LmdbStore.open(tmp_path / "enc")
    plain = LmdbStore.open(tmp_path / "plain")
    plain.put(Column.STATE, b"k", b"v")
    plain.close()
    with pytest.raises(StorageError, match="created without encryption"):
        LmdbStore.open(tmp_path / "plain", passphrase="pw", kdf=FAST_KDF)


def test_sealed_value_moved_to_another_key_fails(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db", passphrase="pw", kdf=FAST_KDF)
    store.put(Column.CONFIG, b"a", b"alpha")  # (a column whose keys are stored as they are)
    with store._env.begin(write=True) as txn:
        sealed = txn.get(b"a", db=store._dbs[Column.CONFIG])
        txn.put(b"b", sealed, db=store._dbs[Column.CONFIG])
    with pytest.raises(StorageError, match="failed authentication"):
        store.get(Column.CONFIG, b"b")
    store.close()


def test_closed_store_raises(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db")
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.get(Column.STATE, b"k")


keys = st.binary(min_size=1, max_size=8)


@given(
    ops=st.lists(st.tuples(st.booleans(), keys, st.binary(max_size=16)), min_size=1, max_size=40),
    prefix=st.binary(max_size=2),
    column=st.sampled_from([Column.GENERIC, Column.DELTA]),  # (the delta column: two trees)
    reopen=st.booleans(),
)
def test_scans_match_a_dict_model(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[bool, bytes, bytes]],
    prefix: bytes,
    column: Column,
    reopen: bool,
) -> None:
    path = tmp_path_factory.mktemp("model")
    store = LmdbStore.open(path, initial_map_size=1 << 20)
    model: dict[bytes, bytes] = {}
    try:
        for is_put, key, value in ops:
            if is_put:
                store.write([Put(column, key, value)])
                model[key] = value
            else:
                store.write([Delete(column, key)])
                model.pop(key, None)
        if reopen:
            store.close()
            store = LmdbStore.open(path, initial_map_size=1 << 20)
        expected = sorted((k, v) for k, v in model.items() if k.startswith(prefix))
        assert store.scan(column, prefix=prefix) == expected
        assert store.get_many(column, [k for k, _ in expected]) == [v for _, v in expected]
        assert store.count(column) == len(model)
    finally:
        store.close()


def _as_one_tree(path: Path, rows: dict[bytes, bytes], *, seal: LmdbStore | None = None) -> None:
    """Make `path` hold `rows` in its delta column as a store before the delta log did:
    one B-tree, no layout record (sealed by `seal`'s cipher, if given)."""
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        meta = env.open_db(Column.META.value.encode(), txn=txn)
        txn.delete(b"delta-layout", db=meta)
        txn.delete(b"store-layout", db=meta)
        delta = env.open_db(Column.DELTA.value.encode(), txn=txn)
        txn.drop(delta, delete=False)
        txn.drop(env.open_db(b"delta-log", txn=txn), delete=False)
        for key, value in rows.items():
            stored = value if seal is None else seal._seal(Column.DELTA, key, value)
            txn.put(key, stored, db=delta)
    env.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_delta_column_of_one_tree_moves_to_the_log_when_opened(
    tmp_path: Path, encrypted: bool
) -> None:
    passphrase = "pw" if encrypted else None
    rows = {b"%032d" % i + bytes([i % 256]) * 32: b"delta %d " % i * 40 for i in range(300)}
    rows[b"%064d" % 999] = b""  # a checkpoint's empty row
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    store.put(Column.STATE, b"s", b"state")
    _as_one_tree(tmp_path / "db", rows, seal=store)
    store.close()
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    try:
        assert store.scan(Column.DELTA) == sorted(rows.items())
        key = min(rows)
        assert store.get(Column.DELTA, key) == rows[key]
        assert store.get(Column.STATE, b"s") == b"state"
        store.write([Put(Column.DELTA, b"new", b"v"), Delete(Column.DELTA, key)])
        store.put(Column.DELTA, max(rows), b"overwritten")
    finally:
        store.close()
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)  # moved once
    try:
        expected = {k: v for k, v in rows.items() if k != key} | {
            b"new": b"v",
            max(rows): b"overwritten",
        }
        assert store.scan(Column.DELTA) == sorted(expected.items())
        assert store.count(Column.DELTA) == len(expected)
    finally:
        store.close()


def test_large_delta_values_are_kept_in_the_log_in_write_order(tmp_path: Path) -> None:
    # Values past `INLINE_MAX` go to the log, appended in the order written, and their
    # index rows hold 8-byte numbers: a walk of the index (checkpoint rows, counts) does
    # not read them.
    value = b"\x01" * (INLINE_MAX + 100)
    keys = [hashlib.sha256(b"%d" % i).digest() * 2 for i in range(300)]
    store = LmdbStore.open(tmp_path / "db", initial_map_size=1 << 24)
    try:
        for key in keys:
            store.put(Column.DELTA, key, value)
        with store._env.begin() as txn:
            log = txn.cursor(db=store._deltas.log)
            assert [v for _, v in log] == [value] * len(keys)
            index = txn.cursor(db=store._dbs[Column.DELTA])
            numbers = {store._keys.key(Column.DELTA, k): v for k, v in index}
        assert sorted(numbers, key=numbers.__getitem__) == keys
        assert {len(v) for v in numbers.values()} == {8}
        assert store.get(Column.DELTA, keys[7]) == value
    finally:
        store.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_small_delta_values_are_kept_in_their_index_rows(tmp_path: Path, encrypted: bool) -> None:
    # A commit adding a small delta dirties one tree, not the index's and the log's.
    passphrase = "pw" if encrypted else None
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    keys = [hashlib.sha256(b"%d" % i).digest() * 2 for i in range(50)]
    small, large = b"s" * 400, b"L" * (INLINE_MAX + 1)
    try:
        store.write([Put(Column.DELTA, key, small) for key in keys])
        assert _log_entries(store) == 0
        store.put(Column.DELTA, keys[0], large)  # grows past the limit: to the log
        store.put(Column.DELTA, keys[1], large)
        assert _log_entries(store) == 2
        store.put(Column.DELTA, keys[0], small)  # and back: its log row goes
        store.put(Column.DELTA, keys[2], b"")
        store.delete(Column.DELTA, keys[3])
        assert _log_entries(store) == 1
        expected = dict.fromkeys(keys, small) | {keys[1]: large, keys[2]: b""}
        del expected[keys[3]]
        assert store.scan(Column.DELTA) == sorted(expected.items())
        assert store.get_many(Column.DELTA, keys[:4]) == [small, large, b"", None]
        with store._env.begin() as txn:
            assert txn.stat(store._dbs[Column.DELTA])["entries"] == len(expected)
    finally:
        store.close()


def _log_entries(store: LmdbStore) -> int:
    with store._env.begin() as txn:
        return int(txn.stat(store._deltas.log)["entries"])


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_layout_6_store_reads_its_logged_values_and_keeps_new_small_ones_inline(
    tmp_path: Path, encrypted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    passphrase = "pw" if encrypted else None
    contexts = [hashlib.sha256(b"context %d" % i).digest() for i in range(2)]
    ids = [hashlib.sha256(b"delta %d" % i).digest() for i in range(40)]
    rows = {c + d: b"delta %d " % i * 30 for c in contexts for i, d in enumerate(ids)}
    folded = sorted(rows)[::5]
    checkpoints = {b"ckvv/" + k: b"\x01vv" for k in folded}
    rows |= dict.fromkeys(folded, b"")
    # A layout-6 store: every delta value in the log (as this build keeps large ones).
    with monkeypatch.context() as patch:
        patch.setattr("trionode.store.lmdb_store.INLINE_MAX", 0)
        store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
        store.write([Put(Column.DELTA, k, v) for k, v in rows.items()])
        store.write([Put(Column.GENERIC, k, v) for k, v in checkpoints.items()])
        assert _log_entries(store) == len(rows) - len(folded)
        store.close()
    env = lmdb.open(str(tmp_path / "db"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"store-layout", b"6", db=env.open_db(Column.META.value.encode(), txn=txn))
    env.close()
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    try:
        assert store.scan(Column.DELTA) == sorted(rows.items())
        assert store.scan(Column.GENERIC) == sorted(checkpoints.items())
        logged = len(rows) - len(folded)
        assert _log_entries(store) == logged  # (opening moved no row)
        new = {contexts[0] + b"\xee" * 32: b"new", contexts[1] + b"\xee" * 32: b"n" * 300}
        store.write([Put(Column.DELTA, k, v) for k, v in new.items()])
        assert _log_entries(store) == logged  # new small values: in their index rows
        kept = max(set(rows) - set(folded))
        store.put(Column.DELTA, kept, b"rewritten")  # (an old row's value moves in)
        store.put(Column.DELTA, folded[0], b"body again")  # (beside its checkpoint: logged)
        rows |= new | {kept: b"rewritten", folded[0]: b"body again"}
        assert _log_entries(store) == logged
    finally:
        store.close()
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    try:
        assert store.scan(Column.DELTA) == sorted(rows.items())
        assert store.scan(Column.GENERIC) == sorted(checkpoints.items())
        assert store.get(Column.DELTA, kept) == b"rewritten"
        assert store.get(Column.GENERIC, b"ckvv/" + folded[0]) == b"\x01vv"
        assert store.count(Column.DELTA) == len(rows)
        with store._env.begin() as txn:
            assert txn.get(b"store-layout", db=store._dbs[Column.META]) == b"7"
    finally:
        store.close()


def _as_layout_2(path: Path, rows: dict[bytes, bytes], *, seal: LmdbStore | None = None) -> None:
    """Make `path` hold `rows` in its delta column as a layout-2 store did: every value,
    empty ones too, in the log (sealed by `seal`'s cipher, if given), no `store-layout`."""
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        meta = env.open_db(Column.META.value.encode(), txn=txn)
        txn.delete(b"store-layout", db=meta)
        index = env.open_db(Column.DELTA.value.encode(), txn=txn)
        log = env.open_db(b"delta-log", txn=txn)
        txn.drop(index, delete=False)
        txn.drop(log, delete=False)
        for seq, (key, value) in enumerate(rows.items(), start=1):
            stored = value if seal is None else seal._seal(Column.DELTA, key, value)
            txn.put(key, seq.to_bytes(8, "big"), db=index)
            txn.put(seq.to_bytes(8, "big"), stored, db=log)
    env.close()


def _log_rows(path: Path) -> int:
    env = lmdb.open(str(path), max_dbs=16)
    try:
        with env.begin() as txn:
            return int(txn.stat(env.open_db(b"delta-log", txn=txn))["entries"])
    finally:
        env.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_empty_delta_values_of_a_layout_2_store_leave_the_log_when_opened(
    tmp_path: Path, encrypted: bool
) -> None:
    passphrase = "pw" if encrypted else None
    rows = {hashlib.sha256(b"%d" % i).digest() * 2: b"body %d " % i * 60 for i in range(200)}
    folded = sorted(rows)[::2]
    rows |= dict.fromkeys(folded, b"")
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    _as_layout_2(tmp_path / "db", rows, seal=store)
    store.close()
    assert _log_rows(tmp_path / "db") == len(rows)
    for _ in range(2):  # converted once; the second open finds layout 3
        store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
        try:
            assert store.scan(Column.DELTA) == sorted(rows.items())
            assert store.get_many(Column.DELTA, folded) == [b""] * len(folded)
            assert (
                store.get(Column.DELTA, max(set(rows) - set(folded)))
                == rows[max(set(rows) - set(folded))]
            )
        finally:
            store.close()
        assert _log_rows(tmp_path / "db") == len(rows) - len(folded)


@pytest.mark.parametrize("encrypted", [False, True])
def test_emptying_delta_values_gives_their_pages_back(tmp_path: Path, encrypted: bool) -> None:
    # Folding empties most delta rows of an old context: the bodies' pages must go with
    # them (a value replaced in place never merges pages), and the ids must stay.
    passphrase = "pw" if encrypted else None
    store = LmdbStore.open(
        tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF, initial_map_size=1 << 24
    )
    try:
        keys = [hashlib.sha256(b"%d" % i).digest() * 2 for i in range(2000)]
        for key in keys:
            store.put(Column.DELTA, key, b"\x01" * 500)
        full = store.stats().tree_bytes[Column.DELTA.value]
        for i in range(0, len(keys), 100):
            store.write([Put(Column.DELTA, key, b"") for key in keys[i : i + 100]])
        # What stays is the index: a 64-byte key per id (~1/6 of the bodies' pages).
        assert store.stats().tree_bytes[Column.DELTA.value] < 0.3 * full
        assert store.scan(Column.DELTA) == [(key, b"") for key in sorted(keys)]
        store.put(Column.DELTA, keys[0], b"again")
        assert store.get(Column.DELTA, keys[0]) == b"again"
    finally:
        store.close()


def test_a_store_of_a_newer_layout_is_refused_with_one_line(tmp_path: Path) -> None:
    LmdbStore.open(tmp_path / "db").close()
    env = lmdb.open(str(tmp_path / "db"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"store-layout", b"8", db=env.open_db(Column.META.value.encode(), txn=txn))
    env.close()
    for _ in range(2):  # (and the refusal wrote nothing)
        with pytest.raises(StorageError, match="has layout 8, which this trionode") as caught:
            LmdbStore.open(tmp_path / "db")
        assert "\n" not in str(caught.value)


def _context_rows(contexts: int) -> dict[Column, dict[bytes, bytes]]:
    """Rows as the context layer keys them (prefix ‖ context id ‖ rest), and a few that
    are too short to name a context or outside the numbered prefixes."""
    ids = [hashlib.sha256(b"context %d" % i).digest() for i in range(contexts)]
    entity = [hashlib.sha256(b"entity %d" % i).digest() for i in range(20)]
    return {
        Column.STATE: {c + e: b"record %d" % i for c in ids for i, e in enumerate(entity)}
        | {c + entity[0] + (7).to_bytes(4, "big"): b"journal" for c in ids}
        | {b"short": b"s"},
        Column.DELTA: {c + e: (b"delta %d " % i) * 20 for c in ids for i, e in enumerate(entity)}
        | {ids[0] + b"\xff" * 32: b""},
        Column.GENERIC: {b"base/" + c + e: b"" for c in ids for e in entity[:5]}
        | {b"ckvv/" + c + e: b"\x01vv" for c in ids for e in entity[5:8]}
        | {b"base/x": b"short", b"ws-event/1": b"event", b"bundle/a": b"b"},
        Column.CONFIG: dict.fromkeys(ids, b"record"),
    }


def _as_layout_3(path: Path, rows: dict[Column, dict[bytes, bytes]], store: LmdbStore) -> None:
    """Make `path` hold `rows` as a layout-3 store did: keys as they are, in the trees
    named after their columns (sealed by `store`'s cipher, if it has one)."""
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        meta = env.open_db(Column.META.value.encode(), txn=txn)
        txn.put(b"store-layout", b"3", db=meta)
        log = env.open_db(b"delta-log", txn=txn)
        for column, table in rows.items():
            db = env.open_db(column.value.encode(), txn=txn)
            for seq, (key, value) in enumerate(sorted(table.items()), start=1):
                _put_as_stored(
                    txn, (db, log), column, (key, key), value=value, seq=seq, store=store
                )
    env.close()


def _put_as_stored(
    txn: lmdb.Transaction,
    trees: tuple[object, object],
    column: Column,
    keys: tuple[bytes, bytes],
    *,
    value: bytes,
    seq: int,
    store: LmdbStore,
) -> None:
    """Put a row as an old layout kept it: `keys` = (the caller's key, the stored key);
    in the delta column an index row (`trees[0]`) and its value in the log (`trees[1]`)
    under `seq`, or an empty index value."""
    db, log = trees
    key, stored_key = keys
    stored = store._seal(column, key, value)
    if column is not Column.DELTA:
        txn.put(stored_key, stored, db=db)
    elif not value:
        txn.put(stored_key, b"", db=db)
    else:
        txn.put(stored_key, seq.to_bytes(8, "big"), db=db)
        txn.put(seq.to_bytes(8, "big"), stored, db=log)


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_layout_3_store_numbers_its_contexts_once_at_open(
    tmp_path: Path, encrypted: bool
) -> None:
    passphrase = "pw" if encrypted else None
    rows = _context_rows(3)
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    _as_layout_3(tmp_path / "db", rows, store)
    store.close()
    for reopen in range(2):  # converted once; the second open finds layout 6
        store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
        try:
            for column, table in rows.items():
                assert store.scan(column) == sorted(table.items()), column
                assert store.count(column) == len(table)
            context = min(k[:32] for k in rows[Column.CONFIG])
            in_state = sorted((k, v) for k, v in rows[Column.STATE].items() if k[:32] == context)
            assert store.scan(Column.STATE, prefix=context) == in_state
            assert (
                store.scan(Column.STATE, prefix=context, start=in_state[3][0], limit=2)
                == (in_state[3:5])
            )
            assert store.scan(Column.STATE, prefix=context, end=in_state[2][0]) == in_state[:2]
            base = b"base/" + context
            assert [k for k, _ in store.scan(Column.GENERIC, prefix=base)] == sorted(
                k for k in rows[Column.GENERIC] if k.startswith(base)
            )
            key = in_state[0][0]
            assert store.get(Column.STATE, key) == rows[Column.STATE][key]
            assert (
                store.get_many(Column.DELTA, list(rows[Column.DELTA])[:3])
                == list(rows[Column.DELTA].values())[:3]
            )
            if reopen == 0:  # the old trees went; keys hold 4-byte numbers, not ids
                with store._env.begin() as txn:
                    names = {k for k, _ in txn.cursor()}
                    assert not {c.value.encode() for c in NUMBERED} & names
                    stored = [k for k, _ in txn.cursor(db=store._dbs[Column.STATE])]
                assert max(len(k) for k in stored) == 1 + 32 + 4
        finally:
            store.close()


def test_context_numbers_are_given_in_the_writing_transaction_and_taken_back_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LmdbStore.open(tmp_path / "db", initial_map_size=1 << 20)
    first, second, third = (hashlib.sha256(b"%d" % i).digest() for i in range(3))

    def failing_put(*_: object) -> None:
        raise lmdb.Error("disk on fire")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(store._deltas, "put", failing_put)
            with pytest.raises(StorageError, match="disk on fire"):  # the write aborts whole
                store.write(
                    [Put(Column.STATE, first + b"e" * 32, b"v"), Put(Column.DELTA, first, b"x")]
                )
        assert store.get(Column.STATE, first + b"e" * 32) is None
        assert store.scan(Column.STATE, prefix=first) == []
        assert store._keys.numbers == {}  # the number it took went back
        store.write([Delete(Column.STATE, second + b"e" * 32)])  # no rows: no number
        assert store._keys.numbers == {}
        store.write([Put(Column.STATE, second + b"e" * 32, b"2"), Put(Column.DELTA, first, b"")])
        store.write([Put(Column.GENERIC, b"ckvv/" + first + b"d" * 32, b"1")])
        assert len(store._keys.numbers) == 2
        # A map too small for the write: it grows and the write is tried again.
        store.write([Put(Column.STATE, third + b"%032d" % i, b"x" * 1000) for i in range(2000)])
        assert len(store.scan(Column.STATE, prefix=third)) == 2000
        assert sorted(store._keys.ids) == [1, 2, 3]
    finally:
        store.close()
    store = LmdbStore.open(tmp_path / "db", initial_map_size=1 << 20)
    try:
        assert store.scan(Column.STATE, prefix=second) == [(second + b"e" * 32, b"2")]
        assert store.get(Column.DELTA, first) == b""
        assert store.scan(Column.GENERIC) == [(b"ckvv/" + first + b"d" * 32, b"1")]
        assert len(store.scan(Column.STATE)) == 2001
        assert len(store._keys.numbers) == 3
    finally:
        store.close()


def _as_layout_5(path: Path, rows: dict[Column, dict[bytes, bytes]], store: LmdbStore) -> None:
    """Make `path` hold `rows` as a layout-5 store did: contexts numbered in the order
    they first appear, every number in a 5-byte tag, in trees named `<column>@4`."""
    env = lmdb.open(str(path), max_dbs=16)
    numbers: dict[bytes, bytes] = {}
    with env.begin(write=True) as txn:
        meta = env.open_db(Column.META.value.encode(), txn=txn)
        txn.put(b"store-layout", b"5", db=meta)
        log = env.open_db(b"delta-log", txn=txn)
        for column, table in rows.items():
            name = f"{column.value}@4" if column in NUMBERED else column.value
            db = env.open_db(name.encode(), txn=txn)
            for seq, (key, value) in enumerate(sorted(table.items()), start=1):
                stored_key = key
                for prefix in NUMBERED.get(column, ()):
                    if key.startswith(prefix) and len(key) >= len(prefix) + 32:
                        context = key[len(prefix) : len(prefix) + 32]
                        if context not in numbers:
                            numbers[context] = (len(numbers) + 1).to_bytes(4, "big")
                            txn.put(b"context-number/" + context, numbers[context], db=meta)
                        stored_key = prefix + b"\x01" + numbers[context] + key[len(prefix) + 32 :]
                        break
                    if key.startswith(prefix):
                        stored_key = prefix + b"\x00" + key[len(prefix) :]
                        break
                _put_as_stored(
                    txn, (db, log), column, (key, stored_key), value=value, seq=seq, store=store
                )
    env.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_layout_5_store_moves_to_one_byte_context_tags_once_at_open(
    tmp_path: Path, encrypted: bool
) -> None:
    passphrase = "pw" if encrypted else None
    rows = _context_rows(130)  # (numbers past 127 keep their 5-byte tags)
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    _as_layout_5(tmp_path / "db", rows, store)
    store.close()
    for reopen in range(2):  # converted once; the second open finds layout 6
        store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
        try:
            for column, table in rows.items():
                assert store.scan(column) == sorted(table.items()), column
            for context in {k[:32] for k in rows[Column.CONFIG]}:
                in_state = sorted(
                    (k, v) for k, v in rows[Column.STATE].items() if k[:32] == context
                )
                assert store.scan(Column.STATE, prefix=context) == in_state
                assert store.get(Column.STATE, in_state[0][0]) == in_state[0][1]
            with store._env.begin() as txn:
                names = {k for k, _ in txn.cursor()}
                stored = [k for k, _ in txn.cursor(db=store._dbs[Column.STATE])]
            assert not {f"{c.value}@4".encode() for c in NUMBERED} & names
            lengths = {len(k) for k in stored}
            assert {1 + 32, 1 + 32 + 4, 5 + 32, 5 + 32 + 4} <= lengths
            assert sum(len(k) == 1 + 32 for k in stored) == 127 * 20
            if reopen == 1:  # the 131st context
                store.put(Column.STATE, b"\xab" * 32 + b"\xcd" * 32, b"new context")
                assert store.get(Column.STATE, b"\xab" * 32 + b"\xcd" * 32) == b"new context"
        finally:
            store.close()
