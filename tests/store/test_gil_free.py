"""The store's bulk puts with the GIL released once (`trionode.store.gil_free`, its C
extension `_lmdb_bulk`): the same rows as py-lmdb's own puts, the store's growth and
errors kept, and a transaction it cannot vouch for refused before any put."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings, strategies as st

from tests.extension_builds import beside, older_build
from trionode.errors import StorageError
from trionode.store import gil_free
from trionode.store.encryption import KdfParams
from trionode.store.lmdb_store import Column, LmdbStore, PutMany, PutRun

FAST_KDF = KdfParams(time_cost=1, memory_kib=8 * 1024)
CONTEXT = bytes(range(32))
_PARENTS = [bytes([n]) * 32 for n in range(3)]
_RECORD = b"\x97\x01\xc4\x20"
"""A joined record as received starts so, its parent's id next (`_RECORD_HEAD`)."""
_values = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda parent, rest: _RECORD + _PARENTS[parent] + rest,
        st.integers(0, 2),
        st.binary(max_size=80),
    ),
    st.builds(lambda n: _RECORD + b"\x01" * n, st.integers(0, 31)),  # (cut short)
)

needs_extension = pytest.mark.skipif(
    not gil_free.available(), reason="trionode/store/_lmdb_bulk.c is not built (`make`)"
)


def _trees(store: LmdbStore) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every row of every tree of the store's file, as stored."""
    env = store._env
    with env.begin() as txn:
        names = [bytes(name) for name, _ in txn.cursor()]
    trees = {}
    for name in names:
        db = env.open_db(name)
        with env.begin(db=db) as txn:
            trees[name.decode()] = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    return trees


@needs_extension
@settings(max_examples=25, deadline=None)
@given(
    rows=st.dictionaries(st.binary(min_size=1, max_size=40), _values, max_size=60),
    limit=st.sampled_from([1, 1000]),
    prefixed=st.sampled_from(
        [
            (Column.STATE, CONTEXT),
            (Column.GENERIC, b"base/" + CONTEXT),
            (Column.APPLICATION, b"p/"),
            (Column.STATE, CONTEXT[:5]),  # (not a whole context id: each key mapped)
        ]
    ),
    encrypted=st.booleans(),
    many=st.booleans(),
)
def test_bulk_rows_are_stored_as_putmulti_stores_them(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    rows: dict[bytes, bytes],
    limit: int,
    prefixed: tuple[Column, bytes],
    encrypted: bool,
    many: bool,
) -> None:
    """A `PutRun` or `PutMany` of a column numbered or not, plain or sealed, leaves the same
    rows in the file whether the extension or py-lmdb's `putmulti` put them: state values
    packed the same (joined records by runs of one parent, parents past the store's limit
    of numbers kept whole, any other value as `pack` does)."""
    column, prefix = prefixed
    passphrase = "pw" if encrypted else None
    keys = sorted(rows)
    op = (
        PutMany(column, [(prefix + k, rows[k]) for k in keys])
        if many
        else PutRun(column, prefix, keys, [rows[k] for k in keys])
    )
    stores = [
        LmdbStore.open(
            tmp_path_factory.mktemp("db"),
            passphrase=passphrase,
            kdf=FAST_KDF,
            gil_free_puts=free,
            max_value_refs=limit,
        )
        for free in (True, False)
    ]
    try:
        assert stores[0]._bulk_put is not None  # (the extension's path)
        assert stores[1]._bulk_put is None
        for store in stores:
            store.write([op])
            assert dict(store.scan(column, prefix=prefix)) == {
                prefix + k: v for k, v in rows.items()
            }
        if not encrypted:  # (sealed values differ by their nonces)
            assert _trees(stores[0]) == _trees(stores[1])
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("free", [True, False])
def test_a_bulk_write_past_the_map_grows_it(tmp_path: Path, free: bool) -> None:
    """A batch larger than the map fails its puts with MDB_MAP_FULL: the store grows the map
    and writes the whole batch again, by either path."""
    if free and not gil_free.available():
        pytest.skip("trionode/store/_lmdb_bulk.c is not built (`make`)")
    store = LmdbStore.open(
        tmp_path / "db", initial_map_size=1 << 20, max_map_size=64 << 20, gil_free_puts=free
    )
    try:
        keys = [i.to_bytes(4, "big") for i in range(3000)]
        values = [bytes([i % 251]) * 1000 for i in range(3000)]
        store.write([PutRun(Column.STATE, CONTEXT, keys, values)])
        assert store.stats().map_size > 1 << 20
        assert store.scan(Column.STATE, prefix=CONTEXT) == [
            (CONTEXT + k, v) for k, v in zip(keys, values, strict=True)
        ]
    finally:
        store.close()


@needs_extension
def test_a_failed_bulk_put_leaves_nothing(tmp_path: Path) -> None:
    """A put LMDB refuses (the map full at the store's maximum) fails the write as a whole:
    none of its rows, nor the ops before them, are stored."""
    store = LmdbStore.open(tmp_path / "db", initial_map_size=1 << 20, max_map_size=2 << 20)
    try:
        keys = [i.to_bytes(4, "big") for i in range(3000)]
        with pytest.raises(StorageError, match="full"):
            store.write(
                [
                    PutMany(Column.APPLICATION, [(b"first", b"1")]),
                    PutRun(Column.STATE, CONTEXT, keys, [b"v" * 1000] * len(keys)),
                ]
            )
        assert store.get(Column.APPLICATION, b"first") is None
        assert store.scan(Column.STATE, prefix=CONTEXT) == []
    finally:
        store.close()


@needs_extension
def test_only_a_live_write_transaction_of_its_environment_is_taken(tmp_path: Path) -> None:
    """The extension checks what it is given before it puts anything: a read transaction,
    one that has ended, one of another environment, a tree that does not exist, rows that
    are not bytes or do not pair up are refused, a packer's error is raised, and nothing
    is written."""
    env = lmdb.open(str(tmp_path / "a"), max_dbs=2)
    other = lmdb.open(str(tmp_path / "b"), max_dbs=2)
    try:
        db = env.open_db(b"t")
        put = gil_free.putter(env)
        assert put is not None
        with env.begin() as txn, pytest.raises(ValueError, match="write transaction"):
            put(txn, b"t", b"", [b"k"], [b"v"])
        ended = env.begin(write=True)
        ended.abort()
        with pytest.raises(ValueError, match="write transaction"):
            put(ended, b"t", b"", [b"k"], [b"v"])
        with other.begin(write=True) as txn, pytest.raises(ValueError, match="write transaction"):
            put(txn, b"t", b"", [b"k"], [b"v"])
        with env.begin(write=True) as txn:
            with pytest.raises(TypeError, match="bytes"):
                put(txn, b"t", b"", [b"k", "k2"], [b"v", b"v2"])  # type: ignore[list-item]
            with pytest.raises(ValueError, match="one value per key"):
                put(txn, b"t", b"", [b"k", b"k2"], [b"v"])
            with pytest.raises(lmdb.Error):
                put(txn, b"no such tree", b"", [b"k"], [b"v"])

            def refuse(value: bytes) -> bytes:
                raise KeyError(value)

            packer = (b"\x97\x01", 4, lambda _: None, refuse)
            with pytest.raises(KeyError):  # (the packer's error, before any put)
                put(txn, b"t", b"", [b"k", b"l"], [b"\x97\x01ab", b"v"], packer=packer)
        with env.begin(db=db) as txn:
            assert list(txn.cursor()) == []
        with env.begin(write=True) as txn:
            put(txn, b"t", b"p", [b"a", b"b"], [b"1", b"2"])
        with env.begin(db=db) as txn:
            assert list(txn.cursor()) == [(b"pa", b"1"), (b"pb", b"2")]
    finally:
        env.close()
        other.close()


def _refuse_seven(*args: object) -> tuple[int, int]:
    raise TypeError(f"function takes exactly 6 arguments ({len(args)} given)")


def test_a_build_of_an_older_source_is_passed_over_not_called(tmp_path: Path) -> None:
    """A checkout updated without `make` keeps the extension built from the older source
    beside it: the store then puts its bulk rows through py-lmdb, instead of failing each
    join's batch on a call the old build cannot take."""
    was_available = gil_free.available()
    stale = older_build("trionode.store._lmdb_bulk", bind=lambda *args: None, put_run=_refuse_seven)
    with beside(gil_free, stale):
        assert not gil_free.available()
        store = LmdbStore.open(tmp_path / "db")
        try:
            assert store._bulk_put is None
            keys = [i.to_bytes(4, "big") for i in range(50)]
            values = [bytes([i]) * 40 for i in range(50)]
            store.write([PutRun(Column.STATE, CONTEXT, keys, values)])
            assert store.scan(Column.STATE, prefix=CONTEXT) == [
                (CONTEXT + k, v) for k, v in zip(keys, values, strict=True)
            ]
        finally:
            store.close()
    assert gil_free.available() == was_available
