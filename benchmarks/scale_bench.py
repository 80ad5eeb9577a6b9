"""Scale: many idle contexts on one node, and many nodes in one context.

* **Idle contexts.** Two in-process nodes (`open_cluster`, memory network, real clock, the
  node's default gossip and sync timers) share ``n`` contexts: node 0 creates each one and
  node 1 joins it, as members do. Then nothing happens for a measured window. Rows:
  - CPU the process spends per second of idle time (both nodes), beside the same two nodes
    sharing no context (what the transport and gossipsub cost on their own);
  - resident memory of the two nodes with ``n`` contexts, beside the same two nodes before
    the first context (the case names the increase per context);
  - bytes per second crossing the network between the two nodes while idle (sync
    heartbeats, gossipsub control traffic), beside ``n`` times what one shared context costs
    over the same window (so a ratio above 1 means contexts share their traffic, below 1
    that each costs more than it does alone).
* **Many nodes.** ``m`` in-process nodes on a memory network, each dialing 4 random earlier
  nodes (a sparse random graph, as discovery would leave it), all members of one context.
  ``w`` writes (one ``set_many`` key each, no event handlers) from random members, one after
  another; the time from the first write until every node has the same root and heads, beside
  the time the writes take on their writers alone (until the last one returned). Gossip
  copies sent per write (the routers' ``forwarded`` counts: publishes, forwards and IWANT
  replies, summed over nodes) beside gossipsub's expectation of ``D x m`` (every node
  relays each message to its ``D`` mesh peers). The nodes run their default sync timers (a
  lost gossip copy is repaired by a heartbeat's session), so the copies counted include
  the heartbeats sent while the writes flow: one per node per `sync.heartbeat` seconds.

Standalone: ``python -m benchmarks.scale_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import trio
from msgspec.structs import replace

from benchmarks.harness import Row, render
from benchmarks.sync_bench import _bench_bundle, _items, _set_many, _share, _wait_converged
from trionode.config import FileConfig, NetworkSection, PubsubSection, SyncSection
from trionode.net.memory import MemoryNetwork
from trionode.node import Node
from trionode.testing import Topology, open_cluster

IDLE_WINDOW: Final = 20.0
"""Seconds of idle time measured (several sync heartbeats and many gossipsub heartbeats)."""
QUICK_IDLE_WINDOW: Final = 6.0
EDGES_PER_NODE: Final = 4
SEED: Final = 16


def _log(message: str) -> None:
    print(f"  scale: {message}", file=sys.stderr, flush=True)


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _default_timers(file: FileConfig) -> FileConfig:
    """Undo the cluster's short test timers: an idle node measured as it ships."""
    defaults = NetworkSection()
    network = replace(
        file.network,
        ping_interval=defaults.ping_interval,
        ping_timeout=defaults.ping_timeout,
        target_peers=0,
    )
    return replace(file, network=network, pubsub=PubsubSection(), sync=SyncSection())


def _no_dial_target(file: FileConfig) -> FileConfig:
    """Only the benchmark's random graph: no dialing toward a peer target."""
    return replace(file, network=replace(file.network, target_peers=0))


class _Idle:
    """What one idle window cost: process CPU seconds, wire bytes, wall seconds."""

    def __init__(self, cpu: float, wire: int, wall: float) -> None:
        self.cpu = cpu
        self.wire = wire
        self.wall = wall

    @property
    def cpu_share(self) -> float:
        return self.cpu / self.wall

    @property
    def bytes_per_second(self) -> float:
        return self.wire / self.wall


async def _measure_idle(network: MemoryNetwork, window: float) -> _Idle:
    wire = network.statistics().bytes_sent
    cpu = time.process_time()
    started = time.perf_counter()
    await trio.sleep(window)
    wall = time.perf_counter() - started
    return _Idle(time.process_time() - cpu, network.statistics().bytes_sent - wire, wall)


async def _share_many(a: Node, b: Node, app_id: bytes, n: int) -> None:
    for i in range(n):
        context = (await a.contexts.create(app_id)).context_id
        await b.joins.join(await a.joins.invite(context))
        if (i + 1) % 200 == 0:
            _log(f"{i + 1:,} contexts shared")


async def _idle_rows(n: int, window: float, base: Path) -> list[Row]:
    bundle = _bench_bundle(base / "bundle")
    network = MemoryNetwork()
    async with open_cluster(2, base / "idle", network=network, configure=_default_timers) as c:
        a, b = c[0], c[1]
        app_id = b""
        for node in (a, b):
            app_id = (await node.applications.install(str(bundle))).application_id
        await trio.sleep(2.0)  # let start-up work (identify, mesh joins) finish before measuring
        bare = await _measure_idle(network, window)
        rss_before = _rss()
        await _share_many(a, b, app_id, 1)
        one = await _measure_idle(network, window)
        started = time.perf_counter()
        await _share_many(a, b, app_id, n - 1)
        _log(f"{n:,} contexts shared in {time.perf_counter() - started:.1f}s")
        await trio.sleep(2.0)
        many = await _measure_idle(network, window)
        rss_after = _rss()
    per_context_kib = (rss_after - rss_before) / n / 1024
    _log(
        f"idle CPU: none {bare.cpu_share:.2%}, one {one.cpu_share:.2%}, "
        f"{n:,} {many.cpu_share:.2%}; wire B/s: none {bare.bytes_per_second:,.0f}, "
        f"one {one.bytes_per_second:,.0f}, {n:,} {many.bytes_per_second:,.0f}"
    )
    return [
        Row(
            f"idle CPU, 2 nodes sharing {n:,} contexts",
            100 * many.cpu_share,
            "% CPU",
            "same 2 nodes, no context",
            100 * bare.cpu_share,
            higher_is_better=False,
        ),
        Row(
            f"RSS, 2 nodes with {n:,} idle contexts (+{per_context_kib:,.0f} KiB each)",
            rss_after / 2**20,
            "MiB",
            "same 2 nodes, no context",
            rss_before / 2**20,
            higher_is_better=False,
        ),
        Row(
            f"idle wire traffic, {n:,} shared contexts",
            many.bytes_per_second - bare.bytes_per_second,
            "B/s",
            f"{n:,} x one context's",
            n * max(one.bytes_per_second - bare.bytes_per_second, 0.0),
            higher_is_better=False,
        ),
    ]


def _random_edges(m: int, rng: random.Random) -> list[tuple[int, int]]:
    edges: set[tuple[int, int]] = set()
    for j in range(1, m):
        for i in rng.sample(range(j), min(EDGES_PER_NODE, j)):
            edges.add((i, j))
    return sorted(edges)


def _forwarded(nodes: Sequence[Node]) -> int:
    return sum(node.pubsub.statistics().forwarded for node in nodes)


async def _many_rows(m: int, w: int, base: Path) -> list[Row]:
    bundle = _bench_bundle(base / "bundle")
    rng = random.Random(SEED)
    topology: Topology = _random_edges(m, rng)
    configure: Callable[[FileConfig], FileConfig] = _no_dial_target
    started = time.perf_counter()
    async with open_cluster(m, base / "many", connect=topology, configure=configure) as c:
        nodes = list(c)
        _log(f"{m} nodes up in {time.perf_counter() - started:.1f}s")
        context = await _share(nodes, bundle)
        await _wait_converged(nodes, context, limit=600)
        _log(f"{m} members joined after {time.perf_counter() - started:.1f}s")
        degree = nodes[0].config.pubsub.d
        copies = _forwarded(nodes)
        first = time.perf_counter()
        for i in range(w):
            await _set_many(rng.choice(nodes), context, _items("scale", i, 1))
        written = time.perf_counter()
        await _wait_converged(nodes, context, limit=1800)
        converged = time.perf_counter()
        per_write = (_forwarded(nodes) - copies) / w
    _log(
        f"{w:,} writes in {written - first:.1f}s, converged {converged - written:.2f}s later; "
        f"{per_write:,.0f} gossip copies per write (D={degree}, m={m})"
    )
    return [
        Row(
            f"{w:,} writes on {m} nodes: first write -> all converged",
            converged - first,
            "s",
            "the writes on their writers alone",
            written - first,
            higher_is_better=False,
        ),
        Row(
            f"gossip copies per write, {m} nodes",
            per_write,
            "msgs",
            f"gossipsub's D x N (D={degree})",
            float(degree * m),
            higher_is_better=False,
        ),
    ]


async def run(*, quick: bool) -> list[Row]:
    contexts = 100 if quick else 1000
    window = QUICK_IDLE_WINDOW if quick else IDLE_WINDOW
    nodes, writes = (20, 100) if quick else (100, 1000)
    with tempfile.TemporaryDirectory(prefix="trionode-scale-") as tmp:
        base = Path(tmp)
        rows = await _idle_rows(contexts, window, base / "idle")
        rows += await _many_rows(nodes, writes, base / "many")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_bench")
    parser.add_argument("--quick", action="store_true", help="100 contexts, 20 nodes")
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
