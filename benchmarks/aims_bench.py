"""Issue #16's aims in one run: every figure beside the baseline it is judged against,
measured in the same process on the same machine minutes apart.

* `kv_store.set` in process, sequential and durable, beside raw LMDB committing the same
  rows one durable transaction per call, the two **interleaved** (`_interleaved_sequential`):
  each call followed by the raw commit of its rows on the same disk, summed per short
  trial, the median of each and the spread of the per-trial ratios printed. This disk's
  fsync rate swings several times over between runs minutes apart (issue #16: raw LMDB
  519-3,184 calls/s in one evening), and both figures swing with it, so only a ratio
  measured this way can be judged. The bytes each side's commits wrote (LMDB's dirty
  pages and meta page) are printed too: a measure no load moves. 64 concurrent callers
  beside the sequential rate; over HTTP with 16 concurrent keep-alive clients beside
  `GET /admin-api/health` from the same clients; LMDB bytes per kv entry beside raw LMDB
  (`context_bench._node_rows`, which also prints where one call's time goes).
* The delta of one 100-byte `set` by component beside the format 3 envelope, the gossip
  envelope beside the delta, and the per-entry bytes by component (`bytes_bench`).
* A write on A applied on the last of 4 nodes, p50 and p99, beside raw gossip to the same
  nodes (`sync_bench._propagation`), and beside raw gossip after which each receiver
  commits one durable LMDB transaction of the delta's size in its own env: every node
  here shares one disk, so the last of 4 waits for four fsyncs, the floor a durable
  receive can reach on this machine. A received delta is shown while its commit runs
  (`trionode/context/pipeline.py`), so the first baseline is the one its aim is judged by.
* Every node of the propagation rows runs on this one event loop, so a write reaches the
  last receiver no sooner than the loop has run everything on the way, one step at a
  time: the loop's CPU per propagated write beside that of a raw gossip message of the
  same size, by kind of task (`_shared_loop_cpu`), says how much of the ratio is the
  work on the path rather than waiting. Raw gossip and the write share that harness.
* The same propagation rows with each node in its own process (`process_nodes.py`),
  where receivers work in parallel as far as the cores allow, as separate nodes do: the
  write and its raw gossip baseline both run in that harness. (Five processes share this
  machine's 2 cores, so under load the operating system's scheduling adds to both.) A
  run of its own then prints where their time goes (`process_nodes.timeline`): each
  stage on A and on the last receiver, with that process's loop CPU between stages and
  the task steps on the way, for the write and its raw gossip alike.

`python -m benchmarks --only aims` (``--quick``: small sizes).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final
from unittest.mock import patch

import lmdb
import trio
import trio.testing

from benchmarks.bytes_bench import _rows as _byte_rows
from benchmarks.context_bench import (
    KV_STORE,
    LMDB_MAP,
    _kv_items,
    _node_rows,
    _set_args,
    raw_commit,
)
from benchmarks.harness import Row, render
from benchmarks.process_nodes import (
    propagation as process_propagation,
    timeline as process_timeline,
)
from benchmarks.sync_bench import (
    NODES,
    RAW_TOPIC,
    _Arrivals,
    _bench_bundle,
    _items,
    _propagation,
    _read_hub,
    _set_many,
    _share,
    _wait_converged,
    _wait_raw_mesh,
    loopback_mesh,
    propagation_mesh,
    propagation_rows,
    wait_stored,
)
from benchmarks.transport_baseline import _percentile
from trionode.cli_node import freeze_startup_heap
from trionode.context.events import ContextEvent, EventHub
from trionode.context.pipeline import DeltaPipeline
from trionode.context.replication import Replicator
from trionode.net.events import GossipMessage
from trionode.node import Node
from trionode.store.lmdb_store import Column, LmdbStore, WriteOp
from trionode.store.store import AsyncStore
from trionode.testing import open_test_node

DELTA_BYTES: Final = 400
"""About one propagated delta's wire size (the propagation row logs the exact one)."""


async def run(*, quick: bool) -> list[Row]:
    calls = 200 if quick else 3_000
    rounds = 30 if quick else 300
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trionode-aims-") as tmp:
        base = Path(tmp)
        rows += await _interleaved_sequential(
            SEQUENTIAL_TRIALS, calls // 4 if quick else 500, base / "interleaved"
        )
        # (its own sequential row's raw LMDB baseline ran once, apart from the row: the
        # interleaved rows above replace it)
        rows += [
            row
            for row in await _node_rows(calls, base / "calls")
            if not row.baseline_name.startswith("raw lmdb: same rows")
        ]
        print(await _sequential_trace(calls, base / "trace"))
        rows += await _byte_rows(calls, base / "bytes")
        writes, raw = await _propagation(rounds, base / "propagation", _bench_bundle(base / "b"))
        apart, raw_apart = await process_propagation(
            rounds, base / "processes", _bench_bundle(base / "b4"), NODES
        )
        print(
            await process_timeline(
                min(rounds, TIMELINE_ROUNDS), base / "timeline", _bench_bundle(base / "b5"), NODES
            )
        )
        floor = await _gossip_then_commit(rounds, base / "floor")
        print(await _propagation_stages(rounds, base / "stages", _bench_bundle(base / "b2")))
        print(await _shared_loop_cpu(rounds, base / "cpu", _bench_bundle(base / "b3")))
    return [
        *rows,
        *propagation_rows(writes, raw),
        Row(
            f"write on A -> applied on last of 4 (loopback, full mesh) p50, {rounds} rounds",
            _percentile(writes, 0.5) * 1000,
            "ms",
            "raw gossip -> last of 4 has committed it to LMDB (durable)",
            _percentile(floor, 0.5) * 1000,
            higher_is_better=False,
        ),
        Row(
            f"write on A -> applied on last of 4, each node its own process, p50, {rounds} "
            f"rounds (loadavg {os.getloadavg()[0]:.1f})",
            _percentile(apart, 0.5) * 1000,
            "ms",
            "raw gossip publish -> last of 4, the same processes",
            _percentile(raw_apart, 0.5) * 1000,
            higher_is_better=False,
        ),
        Row(
            f"write on A -> applied on last of 4, each node its own process, p99, {rounds} rounds",
            _percentile(apart, 0.99) * 1000,
            "ms",
            "raw gossip publish -> last of 4, the same processes",
            _percentile(raw_apart, 0.99) * 1000,
            higher_is_better=False,
        ),
    ]


TIMELINE_ROUNDS: Final = 100
"""Rounds of the per-process timeline (`process_nodes.timeline`), a run of its own."""

SEQUENTIAL_TRIALS: Final = 9
"""Trials of the sequential row and of its raw LMDB baseline, alternated."""


async def _interleaved_sequential(trials: int, per_trial: int, base: Path) -> list[Row]:
    """Sequential durable `kv_store.set` beside raw LMDB committing the same rows, one
    durable transaction per call, interleaved call by call (module docs).

    Each call on the node is followed at once by one synced transaction of the rows that
    call committed, in a bare LMDB env in the same directory; the two are timed apart and
    summed per trial of `per_trial` calls, so both rates of a trial come from the same
    second of the disk's life. Rows: the median of the trials' rates for each, the median
    and spread of the trials' ratios, and the process CPU per call (every thread's: the
    raw transactions' CPU is taken out by timing them with `process_time` too)."""
    node_rates: list[float] = []
    raw_rates: list[float] = []
    cpu: list[float] = []
    written = [0, 0]
    """Bytes the node's commits and the raw ones wrote (`_written`)."""
    calls = _set_args(_kv_items(trials * per_trial, "seq"))
    await trio.to_thread.run_sync(lambda: base.mkdir(parents=True, exist_ok=True))
    env = lmdb.open(str(base / "raw"), map_size=LMDB_MAP, max_dbs=len(Column) + 1)
    try:
        dbs = {col: env.open_db(col.value.encode()) for col in Column}

        async with open_test_node(base / "node", api=False) as test_node:
            node = test_node.node
            app = await node.applications.install(str(KV_STORE))
            context = (await node.contexts.create(app.application_id)).context_id
            for args in _set_args(_kv_items(20, "warm")):
                await node.contexts.execute(context, "set", args)
            captured: list[list[WriteOp]] = []
            raw_write = node.store.raw.write

            def recording_write(ops: Sequence[WriteOp]) -> None:
                # (Taken at the LMDB store: a commit on the loop's thread, in the writer
                # thread or by a lone caller's `AsyncStore.write_now` comes here alike.)
                if any(op.column is Column.DELTA for op in ops):  # (not the event log's)
                    captured.append(list(ops))
                    before = _written()
                    raw_write(ops)
                    written[0] += _written() - before
                    return
                raw_write(ops)

            with patch.object(node.store.raw, "write", recording_write):
                for t in range(trials):
                    node_wall = node_cpu = raw_wall = 0.0
                    for args in calls[t * per_trial : (t + 1) * per_trial]:
                        captured.clear()
                        began, began_cpu = time.perf_counter(), time.process_time()
                        await node.contexts.execute(context, "set", args)
                        ended, ended_cpu = time.perf_counter(), time.process_time()
                        node_wall += ended - began
                        node_cpu += ended_cpu - began_cpu
                        if len(captured) != 1:
                            raise RuntimeError("aims bench: expected one store write per call")
                        before = _written()
                        raw_commit(env, dbs, captured[0])
                        raw_wall += time.perf_counter() - ended
                        written[1] += _written() - before
                    node_rates.append(per_trial / node_wall)
                    raw_rates.append(per_trial / raw_wall)
                    cpu.append(node_cpu / per_trial)
    finally:
        env.close()
    ratios = sorted(n / r for n, r in zip(node_rates, raw_rates, strict=True))
    node_p50, raw_p50 = statistics.median(node_rates), statistics.median(raw_rates)
    print(
        f"sequential durable kv_store.set, {trials} trials of {per_trial} calls, each call "
        "followed by raw LMDB committing the same rows in one durable txn (loadavg "
        f"{os.getloadavg()[0]:.1f}):\n"
        f"  trionode calls/s: median {node_p50:,.0f}, {min(node_rates):,.0f}-"
        f"{max(node_rates):,.0f}; raw LMDB: median {raw_p50:,.0f}, {min(raw_rates):,.0f}-"
        f"{max(raw_rates):,.0f}\n"
        f"  per-trial ratio: median {statistics.median(ratios):.2f}x, "
        f"{ratios[0]:.2f}x-{ratios[-1]:.2f}x; process CPU per call: median "
        f"{statistics.median(cpu) * 1e6:.0f} us\n"
        f"  written per commit (LMDB's pages and meta, load-independent): trionode "
        f"{written[0] / (trials * per_trial) / 4096:.2f}, raw LMDB "
        f"{written[1] / (trials * per_trial) / 4096:.2f} pages of 4 KiB"
    )
    label = f"kv_store.set in process, sequential durable, {trials} trials x {per_trial} calls"
    return [
        Row(
            f"{label}, median (interleaved)",
            node_p50,
            "calls/s",
            "raw lmdb: same rows, 1 durable txn/call, interleaved",
            raw_p50,
        ),
        Row(
            f"{label}, median per-trial ratio (spread {ratios[0]:.2f}-{ratios[-1]:.2f}x)",
            statistics.median(ratios),
            "x",
            "raw lmdb in the same trial (aim: 0.5x)",
            1.0,
        ),
        Row(
            f"{label}: process CPU per call, median of trials",
            statistics.median(cpu) * 1e6,
            "us",
            "raw lmdb: wall time per durable txn (median)",
            1e6 / raw_p50,
            higher_is_better=False,
        ),
    ]


def _written() -> int:
    """Bytes this thread has written (`wchar`: every write call's, page cache or not):
    around a commit, what its pages and meta page took."""
    with open("/proc/thread-self/io", "rb") as io:
        for line in io:
            if line.startswith(b"wchar:"):
                return int(line.split()[1])
    return 0


class _Steps(trio.abc.Instrument):
    """Task steps, their wall and CPU time per task name, and the time the loop sat
    waiting for I/O (a worker thread's commit, a socket), while `on`."""

    def __init__(self) -> None:
        self.on = False
        self.steps: collections.Counter[str] = collections.Counter()
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.idle = 0.0
        self._began = (0.0, 0.0)
        self._waiting = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = (time.perf_counter(), time.thread_time())

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            wall, cpu = self._began
            self.steps[task.name] += 1
            self.wall[task.name] += time.perf_counter() - wall
            self.cpu[task.name] += time.thread_time() - cpu

    def before_io_wait(self, timeout: float) -> None:
        self._waiting = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        if self.on:
            self.idle += time.perf_counter() - self._waiting


async def _sequential_trace(n: int, base: Path) -> str:
    """Where one sequential durable `kv_store.set`'s wall time goes (issue #16): the part
    before its commit starts (the job's trip to the delta processor, the app call, sealing,
    staging), the commit in its worker thread (LMDB transaction and fsync), the part after
    it (the thread's report back, the answer, announcing); the event loop's CPU and idle
    time; task steps per call by task; garbage collection. A `trio.abc.Instrument`
    times the steps, a wrapper times the commits in their thread."""
    commits: list[tuple[float, float]] = []
    collections_: list[tuple[int, float]] = []
    started_gc = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started_gc[0] = time.perf_counter()
        else:
            collections_.append((info["generation"], time.perf_counter() - started_gc[0]))

    raw_write = LmdbStore.write

    def timed_write(self: LmdbStore, ops: Sequence[WriteOp]) -> None:
        began = time.perf_counter()
        raw_write(self, ops)
        commits.append((began, time.perf_counter()))

    steps = _Steps()
    calls = [json.dumps({"key": f"trace:{i:08d}", "value": "v" * 100}) for i in range(n)]
    spans: list[tuple[float, float]] = []
    trio.lowlevel.add_instrument(steps)
    gc.callbacks.append(on_gc)
    try:
        with patch.object(LmdbStore, "write", timed_write):
            async with open_test_node(base, api=False) as test_node:
                node = test_node.node
                app = await node.applications.install(str(KV_STORE))
                context = (await node.contexts.create(app.application_id)).context_id
                for args in calls[:20]:  # warm-up
                    await node.contexts.execute(context, "set", args)
                freeze_startup_heap()  # as `trionode start` does once the node is up
                await trio.lowlevel.checkpoint()  # (that step is not one of the calls')
                commits.clear()
                collections_.clear()
                steps.on = True
                inline = node.store.inline_commits
                cpu = time.process_time()
                for args in calls[20:]:
                    began = time.perf_counter()
                    await node.contexts.execute(context, "set", args)
                    spans.append((began, time.perf_counter()))
                cpu = time.process_time() - cpu
                steps.on = False
                inline = node.store.inline_commits - inline
    finally:
        trio.lowlevel.remove_instrument(steps)
        gc.callbacks.remove(on_gc)
    k = len(spans)
    before, during, after = [], [], []
    for began, ended in spans:
        inside = [c for c in commits if began <= c[0] <= ended]
        if inside:
            before.append(inside[0][0] - began)
            during.append(sum(end - start for start, end in inside))
            after.append(ended - inside[-1][1])
    wall = sum(end - start for start, end in spans) / k

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:7.0f} us"

    lines = [
        f"one sequential durable kv_store.set, {k} calls (loadavg {os.getloadavg()[0]:.1f}): "
        f"{wall * 1e6:.0f} us wall, {cpu / k * 1e6:.0f} us process CPU per call",
        f"  before its commit starts (to the processor, call, seal, stage), p50 "
        f"{us(statistics.median(before))}",
        f"  commit, inline or in the writer thread (LMDB txn, fsync), p50     "
        f"{us(statistics.median(during))}",
        f"  after the commit (thread reports back if any, answer, announce), p50"
        f"{us(statistics.median(after))}",
        f"  event loop: CPU {us(sum(steps.cpu.values()) / k)}, in steps "
        f"{us(sum(steps.wall.values()) / k)}, waiting for I/O {us(steps.idle / k)} per call",
        f"  commits on the event loop's thread (nothing else runnable): {inline} of {k}",
        f"  garbage collection: {len(collections_)} collections, "
        f"{sum(d for _, d in collections_) * 1e3:.1f} ms in all, longest "
        f"{max((d for _, d in collections_), default=0.0) * 1e3:.1f} ms",
    ]
    for name, count in steps.steps.most_common(8):
        lines.append(f"  {count / k:5.2f} steps/call, CPU {us(steps.cpu[name] / k)}/call: {name}")
    return "\n".join(lines)


async def _gossip_then_commit(rounds: int, base: Path) -> list[float]:
    """Seconds from a raw gossip publish until the last of 4 receivers has committed the
    payload in one durable LMDB transaction of its own env (see the module docstring)."""
    latencies: list[float] = []
    envs = _open_envs(base, NODES - 1)
    try:
        async with AsyncExitStack() as stack:
            nodes = await loopback_mesh(stack, base)
            for node in nodes:
                node.pubsub.subscribe(RAW_TOPIC)
            await _wait_raw_mesh(nodes)
            committed = _Arrivals(NODES - 1)
            async with trio.open_nursery() as readers:
                for node, env in zip(nodes[1:], envs, strict=True):
                    ready = trio.Event()
                    readers.start_soon(_commit_gossip, node, env, committed, ready)
                    await ready.wait()
                await trio.testing.wait_all_tasks_blocked()
                for _ in range(rounds):
                    payload = os.urandom(DELTA_BYTES)
                    started = time.perf_counter()
                    nodes[0].pubsub.publish(RAW_TOPIC, payload)
                    latencies.append(await committed.last(payload) - started)
                readers.cancel_scope.cancel()
    finally:
        for env in envs:
            env.close()
    return latencies


_STAGES: Final = (
    ("gossip message reaches its replicator", "arrived"),
    ("verified, queued for the delta processor", "queued"),
    ("the delta processor takes it (its batch starts)", "batch"),
    ("staged and shown to subscribers (the hub event)", "shown"),
    ("its commit begins (once whom the show woke ran)", "commit"),
    ("committed (one LMDB transaction, fsync; after it is shown)", "durable"),
)


async def _propagation_stages(rounds: int, base: Path, bundle: Path) -> str:
    """Where the time goes from A's durable write to the last of the 3 receivers showing
    it: each stage's p50 on that last receiver, in ms after A's call returned (the stages
    are timed by wrapping the receive path's methods, which adds a little to each). A
    received delta is shown while its commit runs (`pipeline.py`), so the commit's end
    comes after the row that is measured.

    Every node runs on this one loop, so beside each stage is the loop's CPU from the
    stage before (task steps of every node) and how much of it was delta processors':
    a stage that waits is mostly the loop running the other receivers' work."""
    marks: dict[tuple[int, str], float] = {}
    cpu_at: dict[tuple[int, str], tuple[float, float]] = {}
    owner: dict[int, int] = {}
    steps = _Steps()

    def mark(of: object, stage: str) -> None:
        who = owner.get(id(of))
        if who is not None and (who, stage) not in marks:
            marks[(who, stage)] = time.perf_counter()
            cpu_at[(who, stage)] = (sum(steps.cpu.values()), steps.cpu["delta-processor"])

    on_gossip, send_job = Replicator.on_gossip, DeltaPipeline._send_job  # noqa: SLF001
    run_batch, write = DeltaPipeline._run_batch, AsyncStore.write  # noqa: SLF001
    show_early = EventHub.show_early

    async def arrived(self: Replicator, message: GossipMessage) -> None:
        mark(self, "arrived")
        await on_gossip(self, message)

    async def queued(self: DeltaPipeline, job: Any) -> None:
        await send_job(self, job)
        mark(self, "queued")

    async def batch(self: DeltaPipeline, jobs: Any, **kwargs: Any) -> Any:
        mark(self, "batch")
        return await run_batch(self, jobs, **kwargs)

    async def committed(self: AsyncStore, ops: Any, *, settle: bool = True) -> None:
        mark(self, "commit")
        await write(self, ops, settle=settle)
        mark(self, "durable")

    def shown(self: EventHub, events: list[ContextEvent]) -> None:
        show_early(self, events)
        if events:
            mark(self, "shown")

    per_stage: dict[str, list[float]] = {stage: [] for _, stage in _STAGES}
    cpu_stage: dict[str, list[tuple[float, float]]] = {stage: [] for _, stage in _STAGES}
    trio.lowlevel.add_instrument(steps)
    steps.on = True
    with (
        patch.object(Replicator, "on_gossip", arrived),
        patch.object(DeltaPipeline, "_send_job", queued),
        patch.object(DeltaPipeline, "_run_batch", batch),
        patch.object(AsyncStore, "write", committed),
        patch.object(EventHub, "show_early", shown),
        trio.fail_after(120 + rounds),
    ):
        async with AsyncExitStack() as stack:
            nodes = await loopback_mesh(stack, base)
            context = await _share(nodes, bundle)
            await _wait_converged(nodes, context)
            for i, node in enumerate(nodes):
                for part in (node.replicator, node.contexts.pipeline, node.store, node.hub):
                    owner[id(part)] = i
            applied = _Arrivals(NODES - 1)
            async with trio.open_nursery() as readers:
                for node in nodes[1:]:
                    readers.start_soon(_read_hub, node, context, applied)
                await trio.testing.wait_all_tasks_blocked()
                for r in range(rounds):
                    delta_id = await _set_many(nodes[0], context, _items("stages", r, 1))
                    marks.clear()  # (A's own marks are before this)
                    cpu_at.clear()
                    started = time.perf_counter()
                    cpu_started = (sum(steps.cpu.values()), steps.cpu["delta-processor"])
                    await applied.last(delta_id)
                    last = max(range(1, NODES), key=lambda i: marks.get((i, "shown"), 0.0))
                    await wait_stored(nodes[1:], context, delta_id)  # (the next round starts idle)
                    cpu_before = cpu_started
                    for _, stage in _STAGES:
                        if (last, stage) in marks:
                            per_stage[stage].append(marks[(last, stage)] - started)
                            cpu = cpu_at[(last, stage)]
                            cpu_stage[stage].append(
                                (cpu[0] - cpu_before[0], cpu[1] - cpu_before[1])
                            )
                            cpu_before = cpu
                readers.cancel_scope.cancel()
    trio.lowlevel.remove_instrument(steps)
    lines = [
        f"write on A -> shown on the last of {NODES - 1} receivers, {rounds} rounds: p50 of "
        "each stage on that receiver, ms after A's call returned (loadavg "
        f"{os.getloadavg()[0]:.1f}); the loop's CPU since the stage before (every node's "
        "task steps), of which delta processors'"
    ]
    before = 0.0
    for label, stage in _STAGES:
        if per_stage[stage]:
            at = _percentile(per_stage[stage], 0.5) * 1000
            loop = _percentile([c for c, _ in cpu_stage[stage]], 0.5) * 1000
            processors = _percentile([p for _, p in cpu_stage[stage]], 0.5) * 1000
            lines.append(
                f"  {label:<54} {at:7.2f}   (+{at - before:5.2f})   "
                f"loop CPU {loop:5.2f}, processors {processors:5.2f}"
            )
            before = at
    return "\n".join(lines)


_NETWORK_TASKS: Final = ("yamux", "Host._handle_stream", "network-events", "pubsub")


async def _shared_loop_cpu(rounds: int, base: Path, bundle: Path) -> str:
    """What the propagation rows measure besides the write path: every bench node runs on
    this one event loop, so a write reaches the last receiver no sooner than the loop has
    run everything on the way, on every node, one step at a time. This sums the loop's CPU
    per write (A's call, the 4 receivers' delta processors, every node's network tasks)
    and per raw gossip message of the same size, by kind of task, over `rounds` of each
    (each round waits until every node is idle, so nothing of one round runs in the next).
    """
    steps = _Steps()
    per_write: dict[str, float] = collections.defaultdict(float)
    per_raw: dict[str, float] = collections.defaultdict(float)
    switches = {"write": [0, 0], "raw": [0, 0]}  # (voluntary, involuntary)
    until_last: dict[str, list[tuple[float, int]]] = {"write": [], "raw": []}
    """Per round: the loop's CPU and task steps from A's call returning (the raw publish)
    until the last receiver has it: the work on the path, without the waiting."""

    def kind(name: str) -> str:
        if name == "delta-processor":
            return f"delta processors (A's write, {NODES - 1} receives)"
        if any(part in name for part in _NETWORK_TASKS):
            return "network (yamux, streams, gossipsub)"
        if name.startswith(("benchmarks.", "__main__")):
            return "the bench's own readers"
        return "other node tasks (watchers, gossip broadcaster, timers)"

    def take(into: dict[str, float]) -> None:
        for name, cpu in steps.cpu.items():
            into[kind(name)] += cpu
        steps.cpu.clear()
        steps.wall.clear()
        steps.steps.clear()

    trio.lowlevel.add_instrument(steps)
    try:
        async with propagation_mesh(base, bundle) as mesh:
            nodes, context = mesh.nodes, mesh.context
            size = 0
            for r in range(rounds):
                await trio.testing.wait_all_tasks_blocked()
                steps.on = True
                before = _context_switches()
                delta_id = await _set_many(nodes[0], context, _items("cpu", r, 1))
                began = (sum(steps.cpu.values()), steps.steps.total())
                await mesh.applied.last(delta_id)
                _count_switches(switches["write"], before)
                _note_until(until_last["write"], steps, began)
                await wait_stored(nodes[1:], context, delta_id)
                await trio.testing.wait_all_tasks_blocked()
                steps.on = False
                take(per_write)
                if not size:
                    size = len(await nodes[0].contexts.read_delta(context, delta_id) or b"")
                payload = os.urandom(size)
                steps.on = True
                before = _context_switches()
                began = (sum(steps.cpu.values()), steps.steps.total())
                nodes[0].pubsub.publish(RAW_TOPIC, payload)
                await mesh.gossiped.last(payload)
                _count_switches(switches["raw"], before)
                _note_until(until_last["raw"], steps, began)
                await trio.testing.wait_all_tasks_blocked()
                steps.on = False
                take(per_raw)
    finally:
        trio.lowlevel.remove_instrument(steps)
    write_total = sum(per_write.values()) / rounds * 1e6
    raw_total = sum(per_raw.values()) / rounds * 1e6
    lines = [
        f"event-loop CPU per propagated write, all {NODES} nodes on one loop, {rounds} rounds "
        f"(loadavg {os.getloadavg()[0]:.1f}): write {write_total:.0f} us, raw gossip of the "
        f"same size {raw_total:.0f} us ({write_total / max(raw_total, 1e-9):.1f}x)"
    ]
    lines += [
        f"  {name:<58} write {per_write[name] / rounds * 1e6:6.0f} us   "
        f"raw {per_raw[name] / rounds * 1e6:6.0f} us"
        for name in sorted(per_write.keys() | per_raw.keys())
    ]
    write_cpu = statistics.median(cpu for cpu, _ in until_last["write"]) * 1e6
    raw_cpu = statistics.median(cpu for cpu, _ in until_last["raw"]) * 1e6
    lines.append(
        f"  until the last of {NODES - 1} has it (p50 per round; the work on the path, not "
        f"the waiting, so steadier under load than the latency rows): loop CPU write "
        f"{write_cpu:.0f} us in "
        f"{statistics.median(n for _, n in until_last['write']):.0f} task steps, raw gossip "
        f"{raw_cpu:.0f} us in {statistics.median(n for _, n in until_last['raw']):.0f} steps "
        f"({write_cpu / max(raw_cpu, 1e-9):.2f}x)"
    )
    write_voluntary, write_preempted = switches["write"]
    raw_voluntary, raw_preempted = switches["raw"]
    lines.append(
        f"  the loop thread's context switches until the last of {NODES - 1} has it, per "
        f"round: write {write_voluntary / rounds:.1f} waits (the GIL, I/O), "
        f"{write_preempted / rounds:.1f} preempted; raw gossip {raw_voluntary / rounds:.1f} "
        f"waits, {raw_preempted / rounds:.1f} preempted (under load each can cost a time "
        "slice; a write wakes each node's commit thread, which then wants the GIL, raw gossip "
        "wakes no thread)"
    )
    return "\n".join(lines)


def _note_until(into: list[tuple[float, int]], steps: _Steps, began: tuple[float, int]) -> None:
    """The loop's CPU and task steps since `began` (`_shared_loop_cpu`)."""
    into.append((sum(steps.cpu.values()) - began[0], steps.steps.total() - began[1]))


def _context_switches() -> tuple[int, int]:
    """This thread's (voluntary, involuntary) context switches so far (0, 0 where Linux's
    /proc/thread-self is not there)."""
    counts = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    with contextlib.suppress(OSError), open("/proc/thread-self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in counts:
                counts[name] = int(value)
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def _count_switches(into: list[int], before: tuple[int, int]) -> None:
    after = _context_switches()
    into[0] += after[0] - before[0]
    into[1] += after[1] - before[1]


def _open_envs(base: Path, n: int) -> list[lmdb.Environment]:
    base.mkdir(parents=True, exist_ok=True)
    return [lmdb.open(str(base / f"lmdb{i}"), map_size=1 << 26) for i in range(n)]


async def _commit_gossip(
    node: Node, env: lmdb.Environment, committed: _Arrivals, ready: trio.Event
) -> None:
    def commit(data: bytes) -> None:
        with env.begin(write=True) as txn:
            txn.put(data[:32], data)

    with node.events.observe(capacity=10_000) as seen:
        ready.set()
        async for event in seen:
            if isinstance(event, GossipMessage) and event.topic == RAW_TOPIC:
                await trio.to_thread.run_sync(commit, event.data)
                committed.arrived(event.data)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aims_bench")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--sequential", action="store_true", help="only the interleaved sequential rows"
    )
    args = parser.parse_args()
    if args.sequential:
        with tempfile.TemporaryDirectory(prefix="trionode-aims-") as tmp:
            per_trial = 50 if args.quick else 500
            rows = trio.run(_interleaved_sequential, SEQUENTIAL_TRIALS, per_trial, Path(tmp))
    else:
        rows = trio.run(lambda: run(quick=args.quick))
    print(render(rows))


if __name__ == "__main__":
    main()
