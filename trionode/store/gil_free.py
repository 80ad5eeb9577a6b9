"""Bulk puts into an LMDB write transaction with the GIL released once, not once per row
(`_lmdb_bulk.c` says why and how; issue #17). `putter` gives one for an environment, or
None when the extension is not built or does not fit the py-lmdb in use: the store then
puts rows with `Cursor.putmulti`, the same rows either way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

import lmdb

INTERFACE: Final = 2
"""The extension's calling convention this module is written for (`_lmdb_bulk.c`'s)."""

try:
    from trionode.store import _lmdb_bulk

    # (A build of an older source, left beside a newer checkout, takes other arguments:
    # it is passed over, not called.)
    _BUILT = getattr(_lmdb_bulk, "INTERFACE", None) == INTERFACE
except ImportError:  # (not built: no compiler when installing)
    _BUILT = False

MAP_FULL: Final = -30792
"""LMDB's MDB_MAP_FULL: the store grows the map and writes again (`LmdbStore.write`)."""

Packer = tuple[bytes, int, Callable[[bytes], bytes | None], Callable[[bytes], bytes]]
"""(record_head, id_end, resolve, pack): how a batch's state values are stored, as
`_ValueRefs.pack_many` stores them: a value that starts with `record_head` is
`resolve(parent)` (its bytes after `record_head` up to `id_end`) and the value after
`id_end`, or itself if that is None (a run of one parent resolved once); any other is
`pack(value)`."""


class BulkPut(Protocol):
    """put(txn, database name, prefix, keys, values): `prefix + keys[i]` -> `values[i]`
    (as `packer` packs it, if one is given)."""

    def __call__(
        self,
        txn: lmdb.Transaction,
        name: bytes,
        prefix: bytes,
        keys: Sequence[bytes],
        values: Sequence[bytes],
        /,
        *,
        packer: Packer | None = None,
    ) -> None: ...


def _bound() -> bool:
    """Bind the extension to py-lmdb's loaded C module (once: whether it could)."""
    if not _BUILT or not lmdb.__version__.startswith("1."):
        # (py-lmdb 2 guards its environment against a concurrent resize around each call:
        # calls from here would go around that guard.)
        return False
    native = getattr(lmdb, "cpython", None)
    if native is None or lmdb.Transaction is not getattr(native, "Transaction", None):
        return False  # (py-lmdb's cffi variant)
    try:
        _lmdb_bulk.bind(native.__file__, native.Transaction, native.Environment)
    except (OSError, TypeError):
        return False
    return True


_BOUND: Final = _bound()


def available() -> bool:
    """Whether `putter` gives a putter in this process."""
    return _BOUND


def putter(env: lmdb.Environment) -> BulkPut | None:
    """The bulk put of `env`'s write transactions, or None (module docs)."""
    if not _BOUND:
        return None
    put_run = _lmdb_bulk.put_run

    def put(
        txn: lmdb.Transaction,
        name: bytes,
        prefix: bytes,
        keys: Sequence[bytes],
        values: Sequence[bytes],
        /,
        *,
        packer: Packer | None = None,
    ) -> None:
        done, code = put_run(txn, env, name, prefix, keys, values, packer)
        if code == MAP_FULL:
            raise lmdb.MapFullError(f"mdb_cursor_put: row {done}: the map is full")
        if code:
            raise lmdb.Error(f"mdb_cursor_put: row {done}: LMDB error {code}")

    return put
