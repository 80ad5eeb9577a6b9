"""State values with their repeated ids stored as numbers (store layout 5, `_ValueRefs`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lmdb
import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from trionode.errors import StorageError
from trionode.store.encryption import KdfParams
from trionode.store.lmdb_store import Column, LmdbStore, Put, PutMany, PutRun, _ValueRefs

FAST_KDF = KdfParams(time_cost=1, memory_kib=8 * 1024)
CONTEXT = hashlib.sha256(b"context").digest()
WRITERS = [hashlib.sha256(b"writer %d" % i).digest() for i in range(3)]
PARENTS = [hashlib.sha256(b"parent %d" % i).digest() for i in range(3)]


def v3_row(time: int, writer: bytes, parent: object, name: bytes, value: bytes) -> bytes:
    """A state row shaped as `crdt/compact.py` writes it (version 3)."""
    record = [1, parent, name, 2, msgspec.msgpack.Ext(5, b"\x00"), None, [None, value]]
    return msgspec.msgpack.encode([3, time, writer, record])


def v1_record(parent: bytes, name: bytes, value: bytes) -> bytes:
    return msgspec.msgpack.encode([1, parent, name, 2, None, None, [None, value]])


def _key(i: int) -> bytes:
    return CONTEXT + hashlib.sha256(b"entity %d" % i).digest()


def _stored(store: LmdbStore, key: bytes) -> bytes:
    """A state value as the B-tree holds it (unsealed)."""
    stored_key = store.stored_key(Column.STATE, key)
    assert stored_key is not None
    with store._env.begin(db=store._dbs[Column.STATE]) as txn:
        stored = txn.get(stored_key)
    assert stored is not None
    return store._unseal(Column.STATE, key, stored)


_times = st.one_of(st.integers(0, 0x7F), st.integers(0, 1 << 16), st.integers(0, (1 << 64) - 1))
_values = st.one_of(
    st.builds(
        v3_row,
        _times,
        st.sampled_from(WRITERS),
        st.sampled_from([*PARENTS, b"\x00" * 31]),
        st.binary(max_size=20),
        st.binary(max_size=200),
    ),
    st.builds(v1_record, st.sampled_from(PARENTS), st.binary(max_size=20), st.binary()),
    st.binary(max_size=120),
    st.binary(max_size=80).map(lambda b: b"\xc1" + b),  # looks packed: must stay as written
    st.binary(max_size=80).map(lambda b: b"\x94\x03" + b),
    st.builds(
        lambda b, w: b"\x94\x03\x05\xc4\x20" + w + b, st.binary(max_size=40), st.just(WRITERS[0])
    ),
)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(_values, min_size=1, max_size=8))
def test_every_value_reads_back_as_written(
    tmp_path_factory: pytest.TempPathFactory, values: list[bytes]
) -> None:
    path = tmp_path_factory.mktemp("db")
    store = LmdbStore.open(path)
    try:
        rows = {_key(i): v for i, v in enumerate(values)}
        store.write([PutMany(Column.STATE, list(rows.items()))])
        assert dict(store.scan(Column.STATE, prefix=CONTEXT)) == rows
        assert store.get_many(Column.STATE, list(rows)) == list(rows.values())
    finally:
        store.close()
    store = LmdbStore.open(path)  # (the numbers were stored with the rows)
    try:
        assert dict(store.scan(Column.STATE, prefix=CONTEXT)) == rows
    finally:
        store.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_rows_writer_and_parent_take_a_few_bytes(tmp_path: Path, encrypted: bool) -> None:
    passphrase = "pw" if encrypted else None
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    row = v3_row(1 << 60, WRITERS[0], PARENTS[0], b"user:1", b"v" * 100)
    joined = v1_record(PARENTS[0], b"user:2", b"w" * 100)
    try:
        store.write([Put(Column.STATE, _key(1), row), Put(Column.STATE, _key(2), joined)])
        assert len(_stored(store, _key(1))) <= len(row) - 2 * 34 + 6
        assert len(_stored(store, _key(2))) <= len(joined) - 34 + 4
        assert store.get(Column.STATE, _key(1)) == row
        assert store.get(Column.STATE, _key(2)) == joined
    finally:
        store.close()
    if encrypted:  # the ids a row refers to are sealed in the meta column too
        data = (tmp_path / "db" / "data.mdb").read_bytes()
        assert WRITERS[0] not in data
        assert PARENTS[0] not in data
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    try:
        assert store.get(Column.STATE, _key(1)) == row
    finally:
        store.close()


@settings(max_examples=100, deadline=None)
@given(
    time=st.integers(1 << 32, (1 << 64) - 1),
    writer=st.sampled_from(WRITERS),
    parent=st.sampled_from([*PARENTS, bytes(32), None]),
    name=st.binary(max_size=20),
    value=st.binary(max_size=200),
)
def test_a_local_writes_row_is_packed_in_the_documented_form(
    time: int, writer: bytes, parent: bytes | None, name: bytes, value: bytes
) -> None:
    """A row with a uint64 time, as every local write stages (`_ValueRefs.pack`'s quick
    case): `_PACKED` ‖ count ‖ (gap, number) per id ‖ the rest, as for any other value."""
    refs = _ValueRefs(None, 16)
    row = v3_row(
        time, writer, msgspec.msgpack.Ext(2, b"") if parent is None else parent, name, value
    )
    fresh: set[int] = set()
    packed = refs.pack(row, fresh)
    w = refs.numbers[writer]
    if parent is None:  # (the root as a compact reference: no id to cut)
        assert packed == bytes([0xC1, 1, 11, w]) + row[:11] + row[45:]
        assert fresh == {w}
    else:
        p = refs.numbers[parent]
        assert packed == bytes([0xC1, 2, 11, w, 2, p]) + row[:11] + row[45:47] + row[81:]
        assert fresh == {w, p}
    assert refs.unpack(packed) == row
    refs.committed(fresh)
    again: set[int] = set()
    assert refs.pack(row, again) == packed
    assert not again


def test_a_number_given_by_an_aborted_write_is_stored_by_the_next_that_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LmdbStore.open(tmp_path / "db")
    row = v3_row(7, WRITERS[1], PARENTS[1], b"k", b"v")

    def failing_put(*_: object) -> None:
        raise lmdb.Error("disk on fire")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(store._deltas, "put", failing_put)
            with pytest.raises(StorageError, match="disk on fire"):
                store.write([Put(Column.STATE, _key(1), row), Put(Column.DELTA, CONTEXT, b"x")])
        assert store.get(Column.STATE, _key(1)) is None
        store.write([Put(Column.STATE, _key(2), row)])
    finally:
        store.close()
    store = LmdbStore.open(tmp_path / "db")
    try:
        assert store.get(Column.STATE, _key(2)) == row
        assert len(_stored(store, _key(2))) < len(row) - 60
    finally:
        store.close()


def test_past_the_limit_ids_stay_in_the_values(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db", max_value_refs=2)
    rows = {_key(i): v3_row(5, WRITERS[0], PARENTS[i % 3], b"%d" % i, b"v") for i in range(6)}
    try:
        store.write([PutMany(Column.STATE, list(rows.items()))])
        assert len(store._refs.ids) == 2
        assert dict(store.scan(Column.STATE, prefix=CONTEXT)) == rows
        sizes = sorted(len(_stored(store, k)) for k in rows)
        assert sizes[0] < sizes[-1]  # (some rows keep one id whole)
    finally:
        store.close()


def test_damaged_stored_values_fail_as_storage_errors(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db")
    row = v3_row(5, WRITERS[0], PARENTS[0], b"k", b"v")
    try:
        store.put(Column.STATE, _key(0), row)
        packed = _stored(store, _key(0))
        assert packed[0] == 0xC1
        stored_key = store.stored_key(Column.STATE, _key(0))
        assert stored_key is not None
        damaged = [
            packed[:1],  # no count
            packed[:3],  # a count without its references
            packed[:2] + b"\xff\xff\xff\xff\xff",  # a varint that never ends
            packed[:2] + b"\x03\x7f" + packed[4:],  # an unknown number
            bytes([0xC1, 1, 0x7F, 1]),  # a gap past the end
        ]
        for value in damaged:
            with store._env.begin(write=True, db=store._dbs[Column.STATE]) as txn:
                txn.put(stored_key, value)
            with pytest.raises(StorageError):
                store.get(Column.STATE, _key(0))
            with pytest.raises(StorageError):
                store.scan(Column.STATE, prefix=CONTEXT)
    finally:
        store.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_layout_4_store_packs_its_state_values_once_at_open(
    tmp_path: Path, encrypted: bool
) -> None:
    passphrase = "pw" if encrypted else None
    rows = {
        _key(i): v3_row(1 << 50, WRITERS[i % 2], PARENTS[i % 3], b"%d" % i, b"x" * 100)
        for i in range(30)
    } | {_key(100): b"\xc1 as a journal row may start", _key(101): b"", _key(102): b"\x95\x04"}
    store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
    try:  # as layout 4 wrote them: values sealed as they are, no references
        store.write([Put(Column.GENERIC, b"x", b"y")])
        with store._env.begin(write=True) as txn:
            added: list[bytes] = []
            for key, value in rows.items():
                stored_key = store._keys.stored(Column.STATE, key, txn=txn, added=added)
                assert stored_key is not None
                sealed = store._seal(Column.STATE, key, value)
                txn.put(stored_key, sealed, db=store._dbs[Column.STATE])
            txn.put(b"store-layout", b"4", db=store._dbs[Column.META])
        before = store.stats().tree_bytes[Column.STATE.value]
    finally:
        store.close()
    for reopen in range(2):  # converted once; the second open finds layout 5
        store = LmdbStore.open(tmp_path / "db", passphrase=passphrase, kdf=FAST_KDF)
        try:
            assert dict(store.scan(Column.STATE, prefix=CONTEXT)) == rows
            assert store.get(Column.STATE, _key(100)) == rows[_key(100)]
            if reopen == 0:
                assert store.stats().tree_bytes[Column.STATE.value] <= before
                assert len(_stored(store, _key(0))) < len(rows[_key(0)]) - 60
                assert len(store._refs.ids) == 5
        finally:
            store.close()


OTHER = hashlib.sha256(b"other context").digest()
_many_keys = st.one_of(
    st.builds(_key, st.integers(0, 40)),
    st.builds(lambda i: OTHER + b"%d" % i, st.integers(0, 5)),
    st.binary(min_size=1, max_size=40),  # short, and no context at all
)
_generic_keys = st.one_of(
    st.builds(lambda i: b"base/" + _key(i), st.integers(0, 40)),
    st.builds(lambda i: b"base/" + OTHER + b"%d" % i, st.integers(0, 5)),
    st.builds(lambda i: b"ckvv/" + CONTEXT + hashlib.sha256(b"%d" % i).digest(), st.integers(0, 3)),
    st.binary(min_size=1, max_size=40),
)


def _contents(store: LmdbStore) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every B-tree as stored (keys and values as they lie on disk)."""
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    with store._env.begin() as txn:
        for name, db in [*((c.value, d) for c, d in store._dbs.items()), ("log", store._log_db)]:
            out[name] = list(txn.cursor(db=db).iternext())
    return out


@settings(max_examples=60, deadline=None)
@given(
    # Rows of one context (its number found once), or of any keys at all.
    state=st.lists(st.tuples(st.builds(_key, st.integers(0, 40)), _values), max_size=12)
    | st.lists(st.tuples(_many_keys, _values), max_size=12),
    generic=st.lists(
        st.tuples(st.builds(lambda i: b"base/" + _key(i), st.integers(0, 40)), st.binary()),
        max_size=8,
    )
    | st.lists(st.tuples(_generic_keys, st.binary(max_size=40)), max_size=8),
    limit=st.sampled_from([1, 2, 1000]),
)
def test_rows_put_many_at_once_are_stored_as_put_one_by_one(
    tmp_path_factory: pytest.TempPathFactory,
    state: list[tuple[bytes, bytes]],
    generic: list[tuple[bytes, bytes]],
    limit: int,
) -> None:
    """A PutMany whose keys name one context has its context's number found once and its
    joined records' parents numbered once per parent (`pack_many`): the B-trees it leaves
    are byte for byte those of the same rows put one by one, whatever the rows (several
    contexts, checkpoint rows, short keys, ids past the limit of numbers)."""
    stores = [LmdbStore.open(tmp_path_factory.mktemp("db"), max_value_refs=limit) for _ in range(2)]
    try:
        stores[0].write([PutMany(Column.STATE, state), PutMany(Column.GENERIC, generic)])
        stores[1].write(
            [Put(Column.STATE, k, v) for k, v in state]
            + [Put(Column.GENERIC, k, v) for k, v in generic]
        )
        assert _contents(stores[0]) == _contents(stores[1])
        expected = dict(state)
        assert dict(stores[0].scan(Column.STATE)) == expected
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("limit", [1, 1000])
def test_runs_of_rows_of_one_parent_are_stored_as_put_one_by_one(
    tmp_path_factory: pytest.TempPathFactory, limit: int
) -> None:
    """`pack_many` knows a row of the parent of the row before by its head alone: runs of
    one parent, broken by another parent's rows (past the limit of numbers: kept whole), by
    a row of another shape, and a row that is only the head, are stored as put one by one."""
    first, second = PARENTS[0], PARENTS[1]
    values = [
        *(v1_record(first, b"a%d" % i, b"x" * i) for i in range(3)),
        v1_record(second, b"b", b"y"),
        v1_record(second, b"c", b"z"),
        v3_row(5, WRITERS[0], first, b"d", b"w"),
        v1_record(first, b"e", b""),
        v1_record(first, b"f", b"v")[:36],  # (the head and the parent, nothing after)
        v1_record(first, b"g", b"u"),
    ]
    rows = [(_key(i), value) for i, value in enumerate(values)]
    stores = [LmdbStore.open(tmp_path_factory.mktemp("db"), max_value_refs=limit) for _ in range(2)]
    try:
        stores[0].write([PutMany(Column.STATE, rows)])
        stores[1].write([Put(Column.STATE, k, v) for k, v in rows])
        assert _contents(stores[0]) == _contents(stores[1])
        assert dict(stores[0].scan(Column.STATE)) == dict(rows)
    finally:
        for store in stores:
            store.close()


_run_prefixes = st.sampled_from(
    [
        (Column.STATE, CONTEXT),  # a context's rows: its number found once
        (Column.STATE, OTHER[:20]),  # keys that are not all one context's
        (Column.STATE, b"\x00"),
        (Column.GENERIC, b"base/" + CONTEXT),
        (Column.GENERIC, b"ckvv/" + CONTEXT),  # checkpoint rows: one by one
        (Column.GENERIC, b"base/"),
        (Column.GENERIC, b"other/"),
        (Column.CONFIG, b"x"),  # a column without numbers
    ]
)


@settings(max_examples=40, deadline=None)
@given(
    prefixed=_run_prefixes,
    rows=st.dictionaries(
        st.binary(min_size=0, max_size=40) | st.builds(_key, st.integers(0, 40)),
        _values,
        max_size=12,
    ),
    limit=st.sampled_from([1, 1000]),
    encrypted=st.booleans(),
)
def test_a_run_of_rows_under_one_prefix_is_stored_as_put_one_by_one(
    tmp_path_factory: pytest.TempPathFactory,
    prefixed: tuple[Column, bytes],
    rows: dict[bytes, bytes],
    limit: int,
    encrypted: bool,
) -> None:
    """A PutRun (a snapshot batch: keys after one prefix, no tuple per row) leaves the same
    rows as the same puts one by one, whatever the prefix names (a context, part of one, no
    context, checkpoint rows, a column without numbers); a key past LMDB's limit is refused
    and nothing of the write is stored."""
    column, prefix = prefixed
    passphrase = "pw" if encrypted else None
    stores = [
        LmdbStore.open(
            tmp_path_factory.mktemp("db"), max_value_refs=limit, passphrase=passphrase, kdf=FAST_KDF
        )
        for _ in range(2)
    ]
    try:
        keys = sorted(rows)
        if not prefix and any(not k for k in keys):
            return
        stores[0].write([PutRun(column, prefix, keys, [rows[k] for k in keys])])
        stores[1].write([Put(column, prefix + k, rows[k]) for k in keys])
        for store in stores:
            assert dict(store.scan(column, prefix=prefix)) == {
                prefix + k: v for k, v in rows.items()
            }
        if not encrypted:
            assert _contents(stores[0]) == _contents(stores[1])
        with pytest.raises(StorageError):
            stores[0].write(
                [PutRun(column, prefix, [*keys, b"k" * 600], [*(rows[k] for k in keys), b"v"])]
            )
        assert dict(stores[0].scan(column, prefix=prefix)) == {
            prefix + k: v for k, v in rows.items()
        }
    finally:
        for store in stores:
            store.close()


@settings(max_examples=40, deadline=None)
@given(
    state=st.dictionaries(st.integers(0, 30), _values, max_size=10),
    bases=st.dictionaries(st.integers(0, 30), st.binary(max_size=8), max_size=10),
    start=st.none() | st.integers(0, 30),
)
def test_a_scan_of_base_markers_reads_each_marker_as_its_state_row(
    tmp_path_factory: pytest.TempPathFactory,
    state: dict[int, bytes],
    bases: dict[int, bytes],
    start: int | None,
) -> None:
    """A snapshot page's read: base rows of one context, an empty one (a marker) filled with
    the state row of its id when there is one, the others as they are, from any start."""
    store = LmdbStore.open(tmp_path_factory.mktemp("db"))
    prefix = b"base/" + CONTEXT
    try:
        store.write(
            [
                PutMany(Column.STATE, [(_key(i), v) for i, v in sorted(state.items())]),
                PutMany(Column.GENERIC, [(b"base/" + _key(i), v) for i, v in bases.items()]),
                Put(Column.GENERIC, b"base/" + OTHER + b"x", b""),  # another context's
                Put(Column.STATE, OTHER + b"x", b"other"),
            ]
        )
        low = None if start is None else b"base/" + _key(start)
        expected = sorted(
            (b"base/" + _key(i), v or state.get(i, v))
            for i, v in bases.items()
            if low is None or b"base/" + _key(i) >= low
        )
        assert store.scan(Column.GENERIC, prefix=prefix, start=low, fill=(Column.STATE, 5)) == (
            expected
        )
    finally:
        store.close()


@settings(max_examples=60, deadline=None)
@given(
    state=st.dictionaries(st.integers(0, 40), _values, max_size=16),
    bases=st.dictionaries(st.integers(0, 40), st.binary(max_size=8), max_size=16),
    others=st.lists(st.integers(0, 40), max_size=4),
    start=st.none() | st.integers(0, 40),
    limit=st.integers(1, 20),
    encrypted=st.booleans(),
)
def test_a_page_of_base_markers_walked_beside_the_state_rows_is_the_scan_of_them(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    state: dict[int, bytes],
    bases: dict[int, bytes],
    others: list[int],
    start: int | None,
    limit: int,
    encrypted: bool,
) -> None:
    """`scan_filled` (a snapshot page's read: the base rows and the state rows walked side
    by side) gives what `scan` with `fill` gives, keys less the prefix: whatever state rows
    lie between the markers' (ids without a base row, another context's rows), markers
    without a state row, base rows with a value, from any start, at any limit, sealed or
    not."""
    store = LmdbStore.open(
        tmp_path_factory.mktemp("db"), passphrase="pw" if encrypted else None, kdf=FAST_KDF
    )
    prefix = b"base/" + CONTEXT
    try:
        store.write(
            [
                Put(Column.STATE, OTHER + b"x" * 32, b"other"),  # (another context first)
                PutMany(Column.STATE, [(_key(i), v) for i, v in sorted(state.items())]),
                PutMany(Column.GENERIC, [(b"base/" + _key(i), v) for i, v in bases.items()]),
                *(Put(Column.STATE, OTHER + _key(i)[32:], b"o") for i in others),
                Put(Column.GENERIC, b"base/" + OTHER + b"x" * 32, b""),
            ]
        )
        low = None if start is None else prefix + _key(start)[32:]
        expected = store.scan(
            Column.GENERIC, prefix=prefix, start=low, limit=limit, fill=(Column.STATE, 5)
        )
        assert store.scan_filled(
            Column.GENERIC, prefix=prefix, start=low, limit=limit, fill=(Column.STATE, 5)
        ) == [(k[len(prefix) :], v) for k, v in expected]
    finally:
        store.close()


def test_a_page_of_base_markers_of_a_context_without_rows_is_empty(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db")
    try:
        store.write([Put(Column.GENERIC, b"base/" + OTHER + b"x", b"")])
        prefix = b"base/" + CONTEXT
        assert (
            store.scan_filled(Column.GENERIC, prefix=prefix, limit=5, fill=(Column.STATE, 5)) == []
        )
        # (Not one context's rows: read by `scan`.)
        assert store.scan_filled(
            Column.GENERIC, prefix=b"base/", limit=5, fill=(Column.STATE, 5)
        ) == [(OTHER + b"x", b"")]
    finally:
        store.close()


@settings(max_examples=60, deadline=None)
@given(
    state=st.dictionaries(st.integers(0, 40), _values, max_size=16),
    journal=st.lists(st.integers(0, 40), max_size=4),
    bases=st.dictionaries(
        st.integers(0, 40), st.sampled_from([b"", b"\xc1", b"r1", b"record 2"]), max_size=16
    ),
    others=st.lists(st.integers(0, 40), max_size=4),
    start=st.none() | st.integers(0, 40),
    limit=st.integers(1, 20),
    encrypted=st.booleans(),
)
def test_a_page_of_base_rows_where_the_state_rows_are_the_base_merges_the_two(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    state: dict[int, bytes],
    journal: list[int],
    bases: dict[int, bytes],
    others: list[int],
    start: int | None,
    limit: int,
    encrypted: bool,
) -> None:
    """`scan_filled` with `implicit` (a context whose state rows are its base): every id
    with a base row or an entity's state row, in id order from any start, at any limit: a
    base row as it is, a marker as its state row, an `absent` row left out, no base row
    as the state row; journal rows (longer keys) and other contexts' rows never count."""
    store = LmdbStore.open(
        tmp_path_factory.mktemp("db"), passphrase="pw" if encrypted else None, kdf=FAST_KDF
    )
    prefix = b"base/" + CONTEXT
    try:
        store.write(
            [
                Put(Column.STATE, OTHER + b"x" * 32, b"other"),
                PutMany(Column.STATE, [(_key(i), v) for i, v in sorted(state.items())]),
                *(Put(Column.STATE, _key(i) + b"\x00" * 8, b"journal") for i in journal),
                PutMany(Column.GENERIC, [(b"base/" + _key(i), v) for i, v in bases.items()]),
                *(Put(Column.STATE, OTHER + _key(i)[32:], b"o") for i in others),
                *(Put(Column.GENERIC, b"base/" + OTHER + _key(i)[32:], b"b") for i in others),
            ]
        )
        model: list[tuple[bytes, bytes]] = []
        for i in set(state) | set(bases):
            entity_id = _key(i)[32:]
            base = bases.get(i)
            if base == b"\xc1":
                continue
            value = base or state.get(i, b"")
            model.append((entity_id, value))
        model.sort()
        low = None if start is None else prefix + _key(start)[32:]
        if low is not None:
            model = [(i, v) for i, v in model if prefix + i >= low]
        assert (
            store.scan_filled(
                Column.GENERIC,
                prefix=prefix,
                start=low,
                limit=limit,
                fill=(Column.STATE, 5),
                implicit=(32, b"\xc1"),
            )
            == model[:limit]
        )
    finally:
        store.close()


def test_an_implicit_page_of_a_context_without_rows_is_empty(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "db")
    try:
        store.write([Put(Column.STATE, OTHER + b"x" * 32, b"o")])
        prefix = b"base/" + CONTEXT
        page = store.scan_filled(
            Column.GENERIC, prefix=prefix, limit=5, fill=(Column.STATE, 5), implicit=(32, b"-")
        )
        assert page == []
        with pytest.raises(ValueError, match="one context"):
            store.scan_filled(
                Column.GENERIC, prefix=b"base/", limit=5, fill=(Column.STATE, 5), implicit=(32, b"")
            )
    finally:
        store.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_write_of_puts_that_grows_the_map_packs_its_rows_alike(
    tmp_path: Path, encrypted: bool
) -> None:
    """A batch of puts alone (a delta's) is packed as it is put; when the map must grow
    and the write is tried again, its rows are packed again with the same numbers, and
    they read back as written, after a reopen too."""
    path = tmp_path / "db"
    passphrase = "pw" if encrypted else None
    store = LmdbStore.open(path, initial_map_size=1 << 20, passphrase=passphrase, kdf=FAST_KDF)
    rows = {
        _key(i): v3_row(0x1234_5678 + i, WRITERS[i % 3], PARENTS[i % 2], b"n%d" % i, b"v" * 900)
        for i in range(3000)
    }
    try:
        store.write([Put(Column.STATE, key, value) for key, value in rows.items()])
        assert store.stats().map_size > 1 << 20  # (it grew: the write was tried again)
        assert all(store.get(Column.STATE, key) == value for key, value in rows.items())
    finally:
        store.close()
    store = LmdbStore.open(path, passphrase=passphrase, kdf=FAST_KDF)
    try:
        assert all(store.get(Column.STATE, key) == value for key, value in rows.items())
        assert len(store.scan(Column.STATE)) == len(rows)
    finally:
        store.close()
