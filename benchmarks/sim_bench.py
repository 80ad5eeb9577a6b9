"""What one simulated node costs: event-loop CPU per propagated write and per idle node.

``m`` nodes in one process on a memory network (`open_cluster`, the timers a node ships
with, each node dialing 4 random earlier ones as in `scale_bench`), all members of one
context. Process CPU (``time.process_time``: every node's crypto, framing, routing and
storage share the one thread) is what limits how large a simulation one core can run;
the wall clock on a shared machine is not. Rows:

* **CPU per propagated write**: ``w`` writes from random members, one after another, CPU
  from the first until every node holds the same state, divided by ``w``; beside raw
  gossip in the same cluster afterwards: random payloads of each delta's size from the same
  writers, CPU until every node saw every one, per payload. The difference is what a write
  costs beyond carrying its bytes to everyone (signatures, storage, DAG, sync).
* **Gossip copies per write** (publishes, forwards and IWANT replies summed over the
  routers) beside the raw gossip's, and beside gossipsub's ``D x m``.
* **Idle CPU per node** and **idle wire bytes per node per second** (heartbeats, pings,
  gossipsub control) over a window after the writes, beside the same nodes over the same
  window before they shared the context (what the transport and gossipsub cost alone).

Standalone: ``python -m benchmarks.sim_bench [--quick] [--nodes M ...] [--writes W]``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from benchmarks.harness import Row, render
from benchmarks.scale_bench import (
    SEED,
    _default_timers,
    _forwarded,
    _random_edges,
    _raw_gossip,
    _share_retrying,
    _wait_all_converged,
)
from benchmarks.sync_bench import _bench_bundle, _items, _set_many
from trionode.net.memory import MemoryNetwork
from trionode.node import Node
from trionode.testing import open_cluster

IDLE_WINDOW: Final = 10.0
"""Seconds of idle time measured (two sync heartbeats, ten gossipsub heartbeats)."""
SETTLE: Final = 2.0
"""Seconds let pass before an idle window (identify, mesh joins, the last acks)."""


def _log(message: str) -> None:
    print(f"  sim: {message}", flush=True)


async def _idle(
    nodes: Sequence[Node], network: MemoryNetwork, window: float
) -> tuple[float, float]:
    """(CPU share per node, wire bytes per node per second) over ``window`` seconds."""
    await trio.sleep(SETTLE)
    cpu, wire = time.process_time(), network.statistics().bytes_sent
    started = time.perf_counter()
    await trio.sleep(window)
    wall = time.perf_counter() - started
    n = len(nodes)
    return (
        (time.process_time() - cpu) / wall / n,
        (network.statistics().bytes_sent - wire) / wall / n,
    )


async def _rows(m: int, w: int, base: Path, window: float) -> list[Row]:
    bundle = _bench_bundle(base / "bundle")
    rng = random.Random(SEED)
    network = MemoryNetwork()
    async with open_cluster(
        m,
        base / "nodes",
        network=network,
        connect=_random_edges(m, rng),
        configure=_default_timers,
    ) as cluster:
        nodes = list(cluster)
        bare_cpu, bare_wire = await _idle(nodes, network, window)
        context = await _share_retrying(nodes, bundle)
        await _wait_all_converged(nodes, context, limit=1800)
        copies = _forwarded(nodes)
        made: list[tuple[float, int, bytes]] = []
        cpu = time.process_time()
        first = time.perf_counter()
        for i in range(w):
            writer = rng.randrange(m)
            delta = await _set_many(nodes[writer], context, _items("s", i, 1))
            made.append((time.perf_counter() - first, writer, delta))
        await _wait_all_converged(nodes, context, limit=3600)
        write_cpu = time.process_time() - cpu
        write_copies = _forwarded(nodes) - copies
        idle_cpu, idle_wire = await _idle(nodes, network, window)
        schedule = [
            (offset, i, len(await nodes[i].contexts.read_delta(context, delta_id) or b""))
            for offset, i, delta_id in made
        ]
        cpu = time.process_time()
        raw = await _raw_gossip(nodes, network, schedule, limit=1800)
        raw_cpu = time.process_time() - cpu
        degree = nodes[0].config.pubsub.d
    _log(
        f"{m} nodes, {w} writes: CPU per write {1000 * write_cpu / w:.1f} ms "
        f"(raw gossip {1000 * raw_cpu / w:.1f} ms), copies per write {write_copies / w:.0f} "
        f"(raw {raw.copies / w:.0f}); idle per node {100 * idle_cpu:.2f} % CPU, "
        f"{idle_wire:,.0f} B/s (no context: {100 * bare_cpu:.2f} %, {bare_wire:,.0f} B/s)"
    )
    return [
        Row(
            f"loop CPU per propagated write, {m} nodes in one process",
            1000 * write_cpu / w,
            "ms",
            "raw gossip, same payload sizes and writers",
            1000 * raw_cpu / w,
            higher_is_better=False,
        ),
        Row(
            f"gossip copies per write, {m} nodes",
            write_copies / w,
            "msgs",
            f"gossipsub's D x N (D={degree})",
            float(degree * m),
            higher_is_better=False,
        ),
        Row(
            f"idle loop CPU per node, {m} nodes sharing a context",
            100 * idle_cpu,
            "% CPU",
            "same nodes before the context",
            100 * bare_cpu,
            higher_is_better=False,
        ),
        Row(
            f"idle wire traffic per node, {m} nodes sharing a context",
            idle_wire,
            "B/s",
            "same nodes before the context",
            bare_wire,
            higher_is_better=False,
        ),
    ]


async def run(
    *, quick: bool, sizes: Sequence[int] | None = None, writes: int | None = None
) -> list[Row]:
    """Each size in ``sizes`` (default 30 and 60 nodes; 10 when quick), ``writes`` writes."""
    sizes = sizes or ((10,) if quick else (30, 60))
    w = writes or (20 if quick else 100)
    window = 3.0 if quick else IDLE_WINDOW
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trionode-sim-") as tmp:
        for m in sizes:
            rows += await _rows(m, w, Path(tmp) / str(m), window)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_bench")
    parser.add_argument("--quick", action="store_true", help="10 nodes, 20 writes")
    parser.add_argument("--nodes", type=int, nargs="+", help="cluster sizes (default 30 60)")
    parser.add_argument("--writes", type=int, help="writes per cluster (default 100)")
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick, sizes=args.nodes, writes=args.writes))))


if __name__ == "__main__":
    main()
