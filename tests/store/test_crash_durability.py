from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.store.crash_writer import N_KEYS, batch_ops
from trionode.store.lmdb_store import Column, LmdbStore


def test_sigkill_mid_batches_leaves_only_whole_batches(tmp_path: Path) -> None:
    db = tmp_path / "db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.store.crash_writer", str(db)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    last_acknowledged = -1
    # Let it commit a few hundred batches (growing the map on the way), then kill it mid-write.
    for line in proc.stdout:
        last_acknowledged = int(line)
        if last_acknowledged >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    store = LmdbStore.open(db, initial_map_size=1 << 20)
    try:
        state = dict(store.scan(Column.STATE))
        delta = dict(store.scan(Column.DELTA))
    finally:
        store.close()
    batches = {int(k.split(b"/")[0]) for k in state} | {int(k.split(b"/")[0]) for k in delta}
    # Every acknowledged batch survived, and the ones present form a gap-free prefix.
    assert batches == set(range(max(batches) + 1))
    assert max(batches) >= last_acknowledged
    for i in batches:
        for op in batch_ops(i):
            table = state if op.column is Column.STATE else delta
            assert table.get(op.key) == op.value, f"batch {i} is partial"
    assert len(state) == len(delta) == len(batches) * N_KEYS
