"""Gossipsub across processes: 5 nodes, each its own OS process, on loopback TCP (issue 4).

The same figures as `benchmarks.pubsub_bench` (publish → last subscriber p50/p99, messages/s)
with every node in its own Python process, beside, in the same run, the same 5-node topology
in one process (`pubsub_bench.measure_trionode`, same sizes) as the baseline. Between the two,
the hops cross process boundaries and the nodes run in parallel on the machine's cores
(``nproc`` matters: with fewer cores than nodes the workers share them with the coordinator).

* **Workers:** ``python -m benchmarks.pubsub_procs worker --pubsub JSON --topic T``, each a
  `Host` + `PubSub` with `pubsub_bench.PUBSUB` (sent as JSON, so both sides run one
  configuration) listening on ``/ip4/127.0.0.1/tcp/0`` and subscribed to the topic. Workers do
  not import py-libp2p (the coordinator imports `pubsub_bench` lazily), so they start fast.
* **Control:** JSON lines. Worker → coordinator (stdout): ``listening`` (address, peer id),
  ``ready``, and one ``recv`` per delivered message (seq, publish and receive timestamps).
  Coordinator → worker (stdin): ``dial`` (addresses to dial, neighbours to wait for),
  ``publish`` (seq); end of stdin means exit. Readiness is only ever learnt from these lines:
  a worker says ``ready`` once every neighbour is known to subscribe and its mesh holds
  ``min(d_lo, degree)`` peers (checked after each heartbeat; pubsub_bench's condition).
* **Topology:** `pubsub_bench.topology` (5 nodes: ring + chord 0-2; every node is within two
  hops of every other).
* **Clock:** the payload (128 bytes) starts with the seq and ``time.time_ns()`` taken just
  before ``publish`` (so signing counts); subscribers take ``time.time_ns()`` in their event
  handler (where pubsub_bench stops its clock). CLOCK_REALTIME is one clock for every process
  on the machine, so a latency is two readings of one clock with no pipe in between.
* **Latency:** ``rounds`` messages from node 0, one at a time (the coordinator waits for every
  subscriber's ``recv`` before asking for the next); latency = the last subscriber's receive
  time minus the publish time.
* **Throughput:** ``messages`` messages from node 0 with at most `WINDOW` in flight (as
  pubsub_bench); messages/s = messages / (last delivery - first publish).

Differences from the baseline worth knowing: one publisher here, publishers in turn there; and
the window is kept by the coordinator, so each completion → next publish crosses two pipes
(in-process: a trio event). Neither enters the latency figure.

Standalone: ``python -m benchmarks.pubsub_procs [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import trio

from benchmarks.harness import Row, render
from trionode.config import NetworkSection, PubsubSection
from trionode.net.events import GossipMessage, NetworkEvent, NetworkEvents
from trionode.net.host import Host
from trionode.net.metrics import NetMetrics
from trionode.net.pubsub import PubSub
from trionode.wire.keys import PrivateKey

NODES = 5
PUBLISHER = 0
PAYLOAD = 128
WINDOW = 16
LISTEN = "/ip4/127.0.0.1/tcp/0"
HEADER = struct.Struct(">QQ")
"""Payload prefix: seq, publish time (ns since the epoch)."""
ROOT = Path(__file__).resolve().parent.parent
"""The repository, the workers' working directory (so ``-m benchmarks...`` resolves)."""
STOP_GRACE = 10.0
"""Seconds workers get to exit after their stdin closes before they are killed."""

Report = dict[str, Any]


class _LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> bytes | None:
        """The next line without its newline; None at the end of the stream."""
        while (end := self._buffer.find(b"\n")) < 0:
            chunk = await self._stream.receive_some()
            if not chunk:
                return None  # an unterminated last line is a worker dying mid-write: dropped
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line


def _line(**fields: object) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


# -- worker -----------------------------------------------------------------------------------


def _payload(seq: int) -> bytes:
    return HEADER.pack(seq, time.time_ns()).ljust(PAYLOAD, b"\0")


async def _write_lines(
    stream: trio.abc.SendStream, lines: trio.MemoryReceiveChannel[bytes]
) -> None:
    """Copy queued lines to ``stream``, everything queued so far in one write."""
    async for line in lines:
        batch = [line]
        while True:
            try:
                batch.append(lines.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        await stream.send_all(b"".join(batch))


async def _wait_ready(pubsub: PubSub, topic: str, neighbours: set[str]) -> None:
    want = min(pubsub.config.d_lo, len(neighbours))
    while not (
        neighbours <= {str(p) for p in pubsub.topic_peers(topic)}
        and len(pubsub.mesh_peers(topic)) >= want
    ):
        await pubsub.wait_heartbeat()


async def _worker(config: PubsubSection, topic: str) -> None:
    """One node: report, obey stdin until it closes, report every delivery."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    send_line, lines = trio.open_memory_channel[bytes](math.inf)

    async def on_event(event: NetworkEvent) -> None:
        if isinstance(event, GossipMessage) and event.topic == topic:
            received = time.time_ns()
            seq, sent = HEADER.unpack_from(event.data)
            send_line.send_nowait(_line(ev="recv", seq=seq, sent=sent, recv=received))
        await trio.lowlevel.checkpoint()

    host = Host(
        PrivateKey.generate(),
        NetworkSection(listen=[LISTEN], ping_interval=3600.0),
        NetMetrics(None),
    )
    events = NetworkEvents(1_000_000)
    pubsub = PubSub(host, host.key, config, events=events)
    async with stdin, stdout, trio.open_nursery() as nursery:
        nursery.start_soon(_write_lines, stdout, lines)
        await nursery.start(host.run)
        await nursery.start(events.run, on_event)
        await nursery.start(pubsub.run)
        pubsub.subscribe(topic)
        send_line.send_nowait(
            _line(ev="listening", addr=host.addresses()[0], peer=str(host.peer_id))
        )
        commands = _LineReader(stdin)
        while (line := await commands.readline()) is not None:
            command = json.loads(line)
            if command["cmd"] == "publish":
                pubsub.publish(topic, _payload(command["seq"]))
            elif command["cmd"] == "dial":
                for addr in command["addrs"]:
                    await host.connect(addr)
                await _wait_ready(pubsub, topic, set(command["neighbours"]))
                send_line.send_nowait(_line(ev="ready"))
            else:
                raise ValueError(f"unknown command {command!r}")
        nursery.cancel_scope.cancel()  # stdin closed: the coordinator is done (or gone)


# -- coordinator ------------------------------------------------------------------------------


class _Cluster:
    """The worker processes, their reports (one channel, tagged by worker index) and their
    stderr (forwarded to ours, one prefixed line at a time)."""

    def __init__(self, n: int, config: PubsubSection, topic: str) -> None:
        self.n = n
        self.command = [
            sys.executable,
            "-m",
            "benchmarks.pubsub_procs",
            "worker",
            "--pubsub",
            msgspec.json.encode(config).decode(),
            "--topic",
            topic,
        ]
        self.processes: list[trio.Process] = []
        self._send, self._reports = trio.open_memory_channel[tuple[int, Report | None]](math.inf)

    async def start(self, nursery: trio.Nursery) -> None:
        for i in range(self.n):
            process = await trio.lowlevel.open_process(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=ROOT,
            )
            self.processes.append(process)
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(self._read_reports, i, process.stdout)
            nursery.start_soon(self._forward_stderr, i, process.stderr)

    async def _read_reports(self, i: int, stream: trio.abc.ReceiveStream) -> None:
        reader = _LineReader(stream)
        while (line := await reader.readline()) is not None:
            self._send.send_nowait((i, json.loads(line)))
        self._send.send_nowait((i, None))

    @staticmethod
    async def _forward_stderr(i: int, stream: trio.abc.ReceiveStream) -> None:
        reader = _LineReader(stream)
        while (line := await reader.readline()) is not None:
            print(f"[pubsub worker {i}] {line.decode(errors='replace')}", file=sys.stderr)

    async def next_report(self, kind: str) -> tuple[int, Report]:
        """The next report from any worker, which must be of ``kind``."""
        i, report = await self._reports.receive()
        if report is None:
            with trio.move_on_after(2):
                await self.processes[i].wait()
            code = self.processes[i].returncode
            raise RuntimeError(f"pubsub worker {i} stopped early (exit code {code}, stderr above)")
        if report.get("ev") != kind:
            raise RuntimeError(f"pubsub worker {i}: expected {kind!r}, got {report!r}")
        return i, report

    async def tell(self, i: int, *commands: bytes) -> None:
        stdin = self.processes[i].stdin
        assert stdin is not None
        await stdin.send_all(b"".join(commands))

    async def stop(self) -> None:
        """Close every worker's stdin, wait for them to exit, insist they exit cleanly."""
        for process in self.processes:
            assert process.stdin is not None
            await process.stdin.aclose()
        with trio.fail_after(STOP_GRACE):
            for process in self.processes:
                await process.wait()
        failed = [i for i, p in enumerate(self.processes) if p.returncode != 0]
        if failed:
            codes = [self.processes[i].returncode for i in failed]
            raise RuntimeError(f"pubsub workers {failed} exited with {codes} (stderr above)")

    async def kill(self) -> None:
        """Kill whatever still runs and reap everything; safe to call at any point."""
        with trio.CancelScope(shield=True):
            for process in self.processes:
                if process.returncode is None:
                    process.kill()
            for process in self.processes:
                await process.wait()
                for pipe in (process.stdin, process.stdout, process.stderr):
                    if pipe is not None:
                        await pipe.aclose()


async def _measure(
    cluster: _Cluster, edges: list[tuple[int, int]], rounds: int, messages: int
) -> tuple[list[float], float]:
    """Wire the cluster up, then run both phases; returns (latencies in s, throughput elapsed)."""
    n = cluster.n
    addrs: dict[int, str] = {}
    peers: dict[int, str] = {}
    while len(addrs) < n:
        i, report = await cluster.next_report("listening")
        addrs[i], peers[i] = report["addr"], report["peer"]
    for i in range(n):
        dial = [addrs[b] for a, b in edges if a == i]
        neighbours = [peers[b if a == i else a] for a, b in edges if i in (a, b)]
        await cluster.tell(i, _line(cmd="dial", addrs=dial, neighbours=neighbours))
    ready: set[int] = set()
    while len(ready) < n:
        i, _ = await cluster.next_report("ready")
        ready.add(i)

    # seq -> subscriber -> (publish ns, receive ns)
    deliveries: defaultdict[int, dict[int, tuple[int, int]]] = defaultdict(dict)

    async def delivery() -> int | None:
        """Take one delivery report; the message's seq if it has now reached everyone."""
        i, report = await cluster.next_report("recv")
        seq = report["seq"]
        if i == PUBLISHER or i in deliveries[seq]:
            raise RuntimeError(f"message {seq} delivered twice to worker {i} (or to its author)")
        deliveries[seq][i] = (report["sent"], report["recv"])
        return seq if len(deliveries[seq]) == n - 1 else None

    latencies: list[float] = []
    for seq in range(rounds):
        await cluster.tell(PUBLISHER, _line(cmd="publish", seq=seq))
        while await delivery() != seq:
            pass
        times = deliveries[seq].values()
        latencies.append((max(r for _, r in times) - min(s for s, _ in times)) / 1e9)

    first, end = rounds, rounds + messages
    next_seq, done = first, 0
    while done < messages:
        batch: list[bytes] = []
        while next_seq < end and next_seq - first - done < WINDOW:
            batch.append(_line(cmd="publish", seq=next_seq))
            next_seq += 1
        if batch:
            await cluster.tell(PUBLISHER, *batch)
        if await delivery() is not None:
            done += 1
    window = [t for seq in range(first, end) for t in deliveries[seq].values()]
    elapsed = (max(r for _, r in window) - min(s for s, _ in window)) / 1e9
    return latencies, elapsed


async def measure_processes(n: int, rounds: int, messages: int) -> dict[str, float]:
    """p50/p99 publish → last subscriber and messages/s, every node its own process."""
    # Imported here, not at the top: pubsub_bench pulls in py-libp2p, which workers never need.
    from benchmarks.pubsub_bench import PUBSUB, TOPIC, _results, topology  # noqa: PLC0415

    cluster = _Cluster(n, PUBSUB, TOPIC)
    try:
        with trio.fail_after(60 + messages / 20):
            async with trio.open_nursery() as nursery:
                await cluster.start(nursery)
                latencies, elapsed = await _measure(cluster, topology(n), rounds, messages)
                await cluster.stop()
            return _results(latencies, messages, elapsed)
    finally:
        await cluster.kill()


# -- the suite --------------------------------------------------------------------------------


async def run(*, quick: bool) -> list[Row]:
    from benchmarks.pubsub_bench import measure_trionode  # noqa: PLC0415 (see measure_processes)

    rounds = 20 if quick else 200
    messages = 200 if quick else 2000
    procs = await measure_processes(NODES, rounds, messages)
    one = await measure_trionode(NODES, rounds, messages)
    baseline = f"trionode, same {NODES} nodes in one process"
    where = f"{NODES} nodes as processes"
    return [
        Row(
            f"gossip publish→last subscriber p50, {where}",
            procs["p50_ms"],
            "ms",
            baseline,
            one["p50_ms"],
            higher_is_better=False,
        ),
        Row(
            f"gossip publish→last subscriber p99, {where}",
            procs["p99_ms"],
            "ms",
            baseline,
            one["p99_ms"],
            higher_is_better=False,
        ),
        Row(
            f"gossip throughput, {where}",
            procs["messages_per_s"],
            "msg/s",
            baseline,
            one["messages_per_s"],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pubsub_procs")
    sub = parser.add_subparsers(dest="role")
    worker = sub.add_parser("worker", help="one node (started by the benchmark, not by hand)")
    worker.add_argument("--pubsub", required=True, help="PubsubSection as JSON")
    worker.add_argument("--topic", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.role == "worker":
        config = msgspec.json.decode(args.pubsub, type=PubsubSection)
        trio.run(_worker, config, args.topic)
    else:
        print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
