"""A fresh node joins a context of 100,000 and of a million entries (`python -m benchmarks
--only join`; `--quick` runs it with 20,000): time beside a raw copy of the same bytes, and
the joiner's peak memory beside the same node restarted with that state loaded.

* **Member** (in this process, on loopback): a `kv_store` context (the bench bundle of
  `sync_bench`) with 1,000 entries written through the app in two writes, the first (the
  map and 999 entries) folded into final state, the second left a head (the tail a joiner
  syncs after its snapshot, as on a live member); then ``n`` - 1,000 more entries made
  from one of those records (same parent, same value, other keys) and stored as final
  state (base rows, as a snapshot would leave them), in id order. So the snapshot carries
  the map with its entries, and its root covers every one of them. Populating
  a million entries through app calls would take hours (`sync_bench` explains why); what a
  joiner receives is the same either way: final-state records in id order. The member's
  root is computed before the clock starts (a live member's is current), its *final*
  state is not: the first snapshot after a start builds it (trionode/context/final_state.py),
  and that build is inside the timed join.
* **Joiner**: a real `trionode start` process (its own memory), which joins with
  ``trionode context join`` (the streamed snapshot, then the tail). Timed: the command's
  wall time, including its own start (~0.3 s). Its peak RSS (VmHWM) is read once the join
  returned. Up to 100,000 entries, `JOINS` fresh joiners (each its own home and process)
  join one after another and the figure is their median, as the baseline is a median of
  copies: one join swings as much as one copy. The later joiners find the member's final
  state built (each join's time line is printed). Then the last joiner is stopped,
  started again on the same home, asked for the
  context's size (which loads the replica from its state rows), and its peak RSS read again.
* **Breakdown**: where the join's seconds went, printed (stderr) with each row: the
  joiner's `join of …` time line from its log and the member's `snapshot of … served` one
  (trionode/context/join_timeline.py) on one axis with the command's start and return;
  then how the joiner's stream of pages spent them (storing batches, waiting for pages,
  taking pages in: `trionode.sync.driver.TakeTimes`).
* **Baselines** (same run): copying the member's state rows of the context (key + value
  bytes) over one Noise+Yamux stream (`sync_bench.copy_seconds`; the median of `COPIES`
  copies, each printed: one swings 2x on a loaded machine), and the restarted node's peak
  RSS.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

import attrs
import trio

from benchmarks.harness import Row
from benchmarks.sync_bench import (
    _bench_bundle,
    _folding,
    _items,
    _row_bytes,
    _set_many,
    copy_seconds,
)
from trionode.context import join_timeline
from trionode.context.folding import fold_all
from trionode.crdt import Entity, encode_entity
from trionode.crdt.entity import child_id
from trionode.node import Node
from trionode.sync import driver
from trionode.testing import open_test_node

ROOT: Final = Path(__file__).resolve().parents[1]
TEMPLATE_ENTRIES: Final = 1000
STORE_BATCH: Final = 20_000
COPIES: Final = 5
"""Raw copies timed for the baseline (its median)."""
JOINS: Final = 3
"""Joins timed for the figure (its median), each by a fresh joiner, up to `JOINS_UP_TO`
entries; a larger join (a million: ~15 s and ~1.5 GB restarted) is timed once."""
JOINS_UP_TO: Final = 100_000


def _log(message: str) -> None:
    print(f"  join: {message}", file=sys.stderr, flush=True)


async def _populate(member: Node, bundle: Path, n: int) -> bytes:
    app_id = (await member.applications.install(str(bundle))).application_id
    context = (await member.contexts.create(app_id)).context_id
    # Two writes: the first (the map and all but one entry) folds into final state, the
    # second stays a head (a head never folds), as a live context's newest write does, and
    # is the tail a joiner syncs after the snapshot.
    await _set_many(member, context, _items("key", 0, TEMPLATE_ENTRIES - 1))
    await _set_many(member, context, _items("key", TEMPLATE_ENTRIES - 1, 1))
    folded = await fold_all(member.contexts.replicas, retention=0.0, max_batch=1024)
    assert folded, "the template entries did not fold: the snapshot would not carry the map"
    replica = await member.contexts.replica(context)
    template: Entity | None = None
    marker = b"key:00000000"
    for entity in replica.tree.entities():
        if marker in entity.name:
            template = entity
            break
    assert template is not None, "no kv_store entry record to copy"
    # In id order, as state rows are stored: each batch extends the tree's sorted child
    # lists instead of inserting into the middle of a million-entry one.
    names = sorted(
        (child_id(template.parent, template.name.replace(marker, f"key:{i:08d}".encode())), i)
        for i in range(TEMPLATE_ENTRIES, n)
    )
    for start in range(0, len(names), STORE_BATCH):
        entities: list[Entity] = []
        records: list[bytes] = []
        for _, i in names[start : start + STORE_BATCH]:
            name = template.name.replace(marker, f"key:{i:08d}".encode())
            clone = Entity(template.parent, name, template.kind)
            body = template.copy().body  # each its own, as decoded rows would be
            clone.body, clone.added, clone.removed = body, template.added, template.removed
            entities.append(clone)
            records.append(encode_entity(clone))
        stored = await member.contexts.store_snapshot_batch(context, entities, records)
        assert stored == len(entities)
    del names
    count = (await member.contexts.execute(context, "len", "{}")).result
    assert count == n, f"populated {count} entries, wanted {n}"
    return context


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`trionode ARGS --home HOME`, its output (raises with its error if it fails)."""
    done = subprocess.run(
        [sys.executable, "-m", "trionode", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"trionode {args[0]} {args[1:2]} failed: {done.stderr.strip()}")
    return done


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Joiner:
    """A `trionode start` process on `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.timelines: list[str] = []
        """The `join of …` time lines it logged."""
        self.takes: list[str] = []
        """Its `snapshot pages of … taken: …` lines (where the stream of pages spent its
        time: `trionode.sync.driver.TakeTimes`)."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trionode", "start", "--home", str(self.home)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        stderr = self.proc.stderr
        assert stderr is not None
        for line in stderr:
            if b"started: peer id" in line:
                break
        # Keep reading its log so it never blocks on a full pipe.
        threading.Thread(target=self._read_log, args=(stderr,), daemon=True).start()

    def _read_log(self, stderr: IO[bytes]) -> None:
        for raw in stderr:
            line = raw.decode(errors="replace")
            if "join of " in line and " t0=" in line:
                self.timelines.append(line)
            elif "snapshot pages of " in line and " taken: " in line:
                self.takes.append(line.split(" taken: ", 1)[1].strip())

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=900)
        self.proc = None


class _ServedLines(logging.Handler):
    """The member's `snapshot of … served` time lines (it runs in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " served: t0=" in message:
            self.lines.append(message)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        logger = logging.getLogger(driver.__name__)
        level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)


def _breakdown(started: float, ended: float, joiner: list[str], member: list[str]) -> list[str]:
    """The join's phases on one axis (seconds since the command started, and each phase's
    share): the CLI's own start until the node saw the request, then the joiner's and the
    member's marks (`trionode/context/join_timeline.py`), then the command's return."""
    events: list[tuple[float, str]] = []
    for side, lines in (("joiner", joiner[-1:]), ("member", member[-1:])):
        for text in lines:
            parsed = join_timeline.parse(text)
            if parsed is None:
                continue
            t0, marks = parsed
            opened = "request reached the node" if side == "joiner" else "snapshot stream opened"
            events.append((t0, f"{side}: {opened}"))
            events += [(t0 + at, f"{side}: {phase}") for phase, at in marks]
    events.append((ended, "command returned"))
    events.sort()
    out = ["breakdown (s since `context join` started; + since the previous mark):"]
    previous = started
    for at, what in events:
        out.append(f"  {at - started:7.3f}  +{at - previous:6.3f}  {what}")
        previous = at
    return out


@attrs.frozen
class _Joined:
    """One fresh joiner's join (`_join_once`)."""

    seconds: float
    peak_rss: int
    home: Path
    context_b58: str
    same_root: bool


async def _join_once(member: Node, context: bytes, bundle: Path, home: Path) -> _Joined:
    """A fresh `trionode start` process on `home` joins `context` from `member` with
    `context join`, timed from the command's start to its return; it is stopped again."""
    _cli(home, "init", "--server-port", "0", "--swarm-port", "0", "--no-mdns")
    joiner = _Joiner(home)
    joiner.start()
    try:
        await trio.to_thread.run_sync(_cli, home, "app", "install", str(bundle))
        invitation = await member.joins.invite(context)
        await member.contexts.state(context)  # a live member's root is current
        assert joiner.proc is not None
        cpu = (_cpu_seconds(joiner.proc.pid), time.process_time())
        served = _ServedLines()
        started, wall = time.perf_counter(), time.time()
        with served.capturing():
            joined = await trio.to_thread.run_sync(
                _cli, home, "context", "join", invitation, "--json", "--timeout", "3600"
            )
        seconds = time.perf_counter() - started
        breakdown = _breakdown(wall, wall + seconds, joiner.timelines, served.lines)
        joiner_cpu = _cpu_seconds(joiner.proc.pid) - cpu[0]
        member_cpu = time.process_time() - cpu[1]
        joined_rss = _peak_rss(joiner.proc.pid)
        context_b58 = json.loads(joined.stdout)["contextId"]
        shown = await trio.to_thread.run_sync(_cli, home, "context", "show", context_b58, "--json")
        ours = json.loads(shown.stdout)
        theirs, _, _ = await member.contexts.state(context)
        same = ours["rootHash"] == theirs.hex()
        _log(
            f"joined in {seconds:.2f}s (CPU: joiner {joiner_cpu:.2f}s, member "
            f"{member_cpu:.2f}s), peak RSS {joined_rss / 1e6:.0f} MB, same root {same}"
        )
        for text in breakdown:
            _log(text)
        for text in joiner.takes[-1:]:
            _log(f"joiner's stream of pages: {text}")
    finally:
        joiner.stop()
    return _Joined(seconds, joined_rss, home, context_b58, same)


async def _row(n: int, base: Path, joins: int) -> list[Row]:
    bundle = _bench_bundle(base / "bundle")
    async with open_test_node(base / "member", api=False, configure=_folding) as member_node:
        member = member_node.node
        started = time.perf_counter()
        context = await _populate(member, bundle, n)
        state_bytes, _ = await _row_bytes(member, context)
        _log(f"{n:,} entries made in {time.perf_counter() - started:.1f}s; {state_bytes:,} B")
        # One join swings as much as one copy does: like the copies below, the median of
        # several, each by a fresh joiner (its own home and process), all printed.
        runs = [
            await _join_once(member, context, bundle, base / f"joiner-{i}") for i in range(joins)
        ]
        seconds = statistics.median(run.seconds for run in runs)
        if joins > 1:
            _log(f"joins: {', '.join(f'{r.seconds:.3f}' for r in runs)} s (median {seconds:.3f} s)")
        last = runs[-1]
        joiner = _Joiner(last.home)
        joiner.start()
        try:
            # The first call loads the replica from its rows (a million: minutes on a loaded
            # machine), so it gets the join's generous timeout.
            size = await trio.to_thread.run_sync(
                _cli, last.home, "call", last.context_b58, "len", "--json", "--timeout", "3600"
            )
            assert json.loads(size.stdout)["output"] == n
            assert joiner.proc is not None
            loaded_rss = _peak_rss(joiner.proc.pid)
        finally:
            joiner.stop()
    # One copy swings 2x on a loaded machine: the median of several, all printed.
    copies = [await copy_seconds(state_bytes) for _ in range(COPIES)]
    copy = statistics.median(copies)
    _log(f"raw copies: {', '.join(f'{c:.3f}' for c in copies)} s (median {copy:.3f} s)")
    label = "" if all(run.same_root for run in runs) else " (ROOTS DIFFER)"
    joined = f" (median of {joins})" if joins > 1 else ""
    return [
        Row(
            f"fresh member joins {n:,}-entry context (separate process, `context join`)"
            f"{joined}{label}",
            seconds,
            "s",
            f"copy member's state rows ({state_bytes / 1e6:.0f} MB) over 1 noise+yamux stream"
            f" (median of {COPIES})",
            copy,
            higher_is_better=False,
        ),
        Row(
            f"joiner's peak RSS taking {n:,} entries",
            last.peak_rss / 1e6,
            "MB",
            "same node restarted, that state loaded",
            loaded_rss / 1e6,
            higher_is_better=False,
        ),
    ]


async def run(*, quick: bool) -> list[Row]:
    sizes = [20_000] if quick else [100_000, 1_000_000]
    rows: list[Row] = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="trionode-join-bench-") as tmp:
            rows += await _row(n, Path(tmp), JOINS if n <= JOINS_UP_TO else 1)
    return rows
