"""Issue #16's aims in one run: every figure beside the baseline it is judged against,
measured in the same process on the same machine minutes apart.

* `kv_store.set` in process, sequential and durable, beside raw LMDB committing the same
  rows one transaction per call; 64 concurrent callers beside the sequential rate; over
  HTTP with 16 concurrent keep-alive clients beside `GET /admin-api/health` from the same
  clients; LMDB bytes per kv entry beside raw LMDB (`context_bench._node_rows`, which also
  prints where one call's time goes).
* The delta of one 100-byte `set` by component beside the format 3 envelope, the gossip
  envelope beside the delta, and the per-entry bytes by component (`bytes_bench`).
* A write on A applied on the last of 4 nodes, p50 and p99, beside raw gossip to the same
  nodes (`sync_bench._propagation`).

`python -m benchmarks --only aims` (``--quick``: small sizes).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import trio

from benchmarks.bytes_bench import _rows as _byte_rows
from benchmarks.context_bench import _node_rows
from benchmarks.harness import Row, render
from benchmarks.sync_bench import _bench_bundle, _propagation, propagation_rows


async def run(*, quick: bool) -> list[Row]:
    calls = 200 if quick else 3_000
    rounds = 30 if quick else 300
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trionode-aims-") as tmp:
        base = Path(tmp)
        rows += await _node_rows(calls, base / "calls")
        rows += await _byte_rows(calls, base / "bytes")
        writes, raw = await _propagation(rounds, base / "propagation", _bench_bundle(base / "b"))
    return rows + propagation_rows(writes, raw)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aims_bench")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
