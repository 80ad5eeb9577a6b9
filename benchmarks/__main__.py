"""`make bench`: run every benchmark and print one table (`--quick` for a CI smoke run)."""

from __future__ import annotations

import argparse
import sys

import trio

from benchmarks import (
    aims_bench,
    auth_bench,
    blob_bench,
    bytes_bench,
    cli_bench,
    context_bench,
    hostile_bench,
    join_bench,
    kad_bench,
    multiaddr_bench,
    pubsub_bench,
    pubsub_procs,
    relay_bench,
    scale_bench,
    sim_bench,
    store_bench,
    sync_bench,
    transport_bench,
    ws_load_bench,
)
from benchmarks.harness import Row, render


async def run_all(*, quick: bool, only: str | None) -> list[Row]:
    suites = {
        "store": store_bench.run,
        "transport": transport_bench.run,
        "pubsub": pubsub_bench.run,
        "pubsub-procs": pubsub_procs.run,
        "contexts": context_bench.run,
        "bytes": bytes_bench.run,
        "sync": sync_bench.run,
        "join": join_bench.run,
        "hostile": hostile_bench.run,
        "cli": cli_bench.run,
        "blobs": blob_bench.run,
        "auth": auth_bench.run,
        "ws-load": ws_load_bench.run,
        "relay": relay_bench.run,
        "scale": scale_bench.run,
        "sim": sim_bench.run,
        "kad": kad_bench.run,
        "multiaddr": multiaddr_bench.run,
        "aims": aims_bench.run,
    }
    rows: list[Row] = []
    for name, suite in suites.items():
        if only is not None and only != name:
            continue
        print(f"running {name} ...", file=sys.stderr)
        rows += await suite(quick=quick)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", help="run one suite")
    args = parser.parse_args()
    rows = trio.run(lambda: run_all(quick=args.quick, only=args.only))
    print(render(rows))


if __name__ == "__main__":
    main()
