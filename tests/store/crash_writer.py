"""Run as a subprocess by test_crash_durability: writes batches forever, reporting each commit.

Batch i puts `N_KEYS` keys in two columns, every value carrying i. After the parent kills us
with SIGKILL, every batch must be present whole or not at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trionode.store.lmdb_store import Column, LmdbStore, Put

N_KEYS = 25


def batch_ops(i: int) -> list[Put]:
    value = b"batch-%08d" % i + b"." * 200
    ops = [Put(Column.STATE, b"%08d/%02d" % (i, k), value) for k in range(N_KEYS)]
    ops += [Put(Column.DELTA, b"%08d/%02d" % (i, k), value) for k in range(N_KEYS)]
    return ops


def main() -> None:
    store = LmdbStore.open(Path(sys.argv[1]), initial_map_size=1 << 20)
    i = 0
    while True:
        store.write(batch_ops(i))
        sys.stdout.write(f"{i}\n")
        sys.stdout.flush()
        i += 1


if __name__ == "__main__":
    main()
