"""Bench nodes each in its own process, driven over a line protocol (issue #16).

The in-process propagation rows (`sync_bench._propagation`) run every node on one event
loop, so a write reaches the last receiver no sooner than that one loop has run every
node's work on the way, one step at a time: it measures one loop's CPU as much as the
write path (`aims_bench._shared_loop_cpu`). Nodes are separate processes in production,
so here each node is a child process (`python -m benchmarks.process_nodes <home>`): its
receivers work in parallel, as far as the machine's cores allow, for the write and for
the raw gossip baseline alike.

The parent writes one JSON command per line to a child's stdin and reads one JSON line per
answer from its stdout; a child also writes unprompted arrival lines (`{"seen": ...}`) when
its hub shows a delta of a watched context or raw gossip arrives. Arrival times are
`time.perf_counter()`, CLOCK_MONOTONIC on Linux, so they compare across processes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import base58
import trio
import trio.testing

from benchmarks.sync_bench import RAW_TOPIC, _fast, _items, _set_many, wait_stored
from benchmarks.transport_baseline import _percentile
from trionode.context.events import ContextEvent, EventHub
from trionode.context.pipeline import DeltaPipeline
from trionode.context.replication import Replicator
from trionode.net.events import GossipMessage, NetworkEvents
from trionode.net.noise_stream import NoiseStream
from trionode.net.pubsub import PubSub
from trionode.net.yamux_session import YamuxStream
from trionode.node import Node
from trionode.store.store import AsyncStore
from trionode.testing import open_test_node

Say = Callable[[dict[str, Any]], None]

STARTUP: Final = 60.0
"""Seconds a child may take to start its node and answer."""


class Child:
    """One node process, as the parent sees it."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        assert process.stdin is not None
        assert process.stdout is not None
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._buffer = b""
        self._answers, self._answer_out = trio.open_memory_channel[dict[str, Any]](100)
        self.seen: dict[str, float] = {}
        """When this node saw each key (a delta id's hex, a gossip payload's hex)."""
        self.changed = trio.Event()

    async def read(self) -> None:
        """Sort the child's lines into answers and arrivals (a task, until it exits)."""
        while True:
            chunk = await self._stdout.receive_some(65536)
            if not chunk:
                return
            self._buffer += chunk
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if "seen" in message:
                    self.seen[message["seen"]] = message["at"]
                    self.changed.set()
                    self.changed = trio.Event()
                else:
                    await self._answers.send(message)

    async def ask(self, command: str, **args: Any) -> Any:
        await self._stdin.send_all(json.dumps({"do": command, **args}).encode() + b"\n")
        answer = await self._answer_out.receive()
        if "error" in answer:
            raise RuntimeError(f"{command}: {answer['error']}")
        return answer.get("value")


async def last_seen(children: Sequence[Child], key: str) -> float:
    """When the last of `children` saw `key`."""
    for child in children:
        while key not in child.seen:
            await child.changed.wait()
    return max(child.seen[key] for child in children)


@asynccontextmanager
async def open_children(base: Path, n: int) -> AsyncIterator[list[Child]]:
    """`n` node processes (homes under `base`), connected in a full mesh on loopback."""
    async with trio.open_nursery() as nursery:
        children: list[Child] = []
        for i in range(n):
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "benchmarks.process_nodes", str(base / f"node{i}")],
                stdin=-1,
                stdout=-1,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            child = Child(process)
            nursery.start_soon(child.read)
            children.append(child)
        try:
            with trio.fail_after(STARTUP):
                addresses = [await child.ask("address") for child in children]
                for i, child in enumerate(children):
                    for address in addresses[i + 1 :]:
                        await child.ask("connect", address=address)
            yield children
        finally:
            for child in children:
                with trio.move_on_after(10) as waited:
                    await child.ask("stop")
                    await child.process.wait()
                if waited.cancelled_caught:
                    child.process.kill()
            nursery.cancel_scope.cancel()


async def share(children: Sequence[Child], bundle: Path) -> str:
    """children[0] creates a context; every other installs the app, is invited, joins; every
    child then reports the context's hub events. Returns the context id (base58)."""
    app = ""
    for child in children:
        app = await child.ask("install", bundle=str(bundle))
    context = str(await children[0].ask("create", app=app))
    for child in children[1:]:
        await child.ask("join", invitation=await children[0].ask("invite", context=context))
    for child in children:
        await child.ask("watch", context=context)
    return context


async def wait_converged(children: Sequence[Child], context: str, limit: float = 120) -> None:
    """Until every child holds the same heads and root, and nothing pending."""
    with trio.fail_after(limit):
        while True:
            states = [await child.ask("state", context=context) for child in children]
            if all(s == states[0] for s in states) and states[0][2] == 0:
                return
            await children[0].ask("heartbeat")


async def wait_raw_mesh(children: Sequence[Child]) -> None:
    with trio.fail_after(30):
        for child in children:
            while not await child.ask("raw_mesh", others=len(children) - 1):
                await child.ask("heartbeat")


async def propagation(
    rounds: int, base: Path, bundle: Path, nodes: int
) -> tuple[list[float], list[float]]:
    """(write latencies, raw gossip latencies) in seconds, each node in its own process,
    interleaved round by round as `sync_bench._propagation` does in one process: A's call
    returns → the last receiver's hub shows the delta; A publishes raw gossip of the delta's
    size → the last receiver has it. Each round starts once every receiver stored the
    delta."""
    writes: list[float] = []
    raw: list[float] = []
    async with open_children(base, nodes) as children:
        context = await share(children, bundle)
        await wait_converged(children, context)
        await wait_raw_mesh(children)
        writer, receivers = children[0], children[1:]
        size = 0
        for r in range(rounds):
            delta, committed = await writer.ask("write", context=context, prefix="proc", round=r)
            writes.append(await last_seen(receivers, delta) - committed)
            for child in receivers:
                await child.ask("stored", context=context, delta=delta)
            if not size:
                size = await writer.ask("size", context=context, delta=delta)
            payload = os.urandom(size).hex()
            started = await writer.ask("publish", payload=payload)
            raw.append(await last_seen(receivers, payload) - started)
    return writes, raw


# -- the timeline ------------------------------------------------------------------------------

_STAGES: Final = (
    # (stage, label, on the writer A or a receiver)
    ("broadcast", "A: the broadcaster takes the delta (Replicator.broadcast)", "A"),
    ("published", "A: signed and queued (PubSub.publish returned)", "A"),
    ("sent", "A: first gossip frame leaves (NoiseStream.send_all)", "A"),
    ("wire", "receiver: the frame's bytes decrypted (NoiseStream.receive_some)", "R"),
    ("read", "receiver: pubsub reads them (YamuxStream.receive_some)", "R"),
    ("emitted", "receiver: delivered to the event channel (NetworkEvents.emit)", "R"),
    ("arrived", "receiver: the gossip handler has it (Replicator.on_gossip)", "R"),
    ("queued", "receiver: verified, queued for the delta processor", "R"),
    ("batch", "receiver: the delta processor takes it (its batch starts)", "R"),
    ("shown", "receiver: staged and shown (EventHub.show_early)", "R"),
    ("seen", "receiver: the bench's reader has the hub event", "R"),
    ("forwarded", "receiver: judged, forwarded (PubSub.validated)", "R"),
    ("commit", "receiver: its commit begins", "R"),
    ("durable", "receiver: committed (after it is shown)", "R"),
)
_RAW_STAGES: Final = (
    ("raw published", "A: signed and queued (PubSub.publish called)", "A"),
    ("raw sent", "A: first gossip frame leaves", "A"),
    ("raw wire", "receiver: the frame's bytes decrypted", "R"),
    ("raw read", "receiver: pubsub reads them", "R"),
    ("raw emitted", "receiver: delivered to the event channel", "R"),
    ("raw seen", "receiver: the bench's observer has it", "R"),
)
_MARKS: dict[str, tuple[float, float]] = {}
"""A child's marks this round, once traced: stage -> (perf_counter, the loop thread's CPU)."""
_TRACE: list[bool] = [False]
_STEPS: list[tuple[str, float, float]] = []
"""A traced child's task steps this round: (task name, when it began, its thread CPU)."""
MAX_STEPS: Final = 5000


class _StepLog(trio.abc.Instrument):
    def __init__(self) -> None:
        self._began = (0.0, 0.0)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = (time.perf_counter(), time.thread_time())

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if len(_STEPS) < MAX_STEPS:
            _STEPS.append((task.name, self._began[0], time.thread_time() - self._began[1]))


def _mark(stage: str) -> None:
    if _TRACE[0] and stage not in _MARKS:
        _MARKS[stage] = (time.perf_counter(), time.thread_time())


def _trace(node: Node) -> None:
    """Mark the stages of `_STAGES` in this process (one node: its classes' methods are
    wrapped; each stage's first time in a round counts)."""
    if _TRACE[0]:
        return
    _TRACE[0] = True
    trio.lowlevel.add_instrument(_StepLog())
    wrapped: dict[str, Any] = {}
    read_at: dict[str, tuple[float, float]] = {}

    def wrap(cls: Any, name: str, make: Callable[[Any], Any]) -> None:
        wrapped[name] = getattr(cls, name)
        setattr(cls, name, make(wrapped[name]))

    def broadcast(inner: Any) -> Any:
        def run(self: Any, context_id: bytes, deltas: Any) -> None:
            _mark("broadcast")
            inner(self, context_id, deltas)
            _mark("published")

        return run

    def publish(inner: Any) -> Any:
        def run(self: Any, topic: str, data: Any) -> bytes:
            if topic == RAW_TOPIC:
                _mark("raw published")
            return inner(self, topic, data)  # type: ignore[no-any-return]

        return run

    def send_all(inner: Any) -> Any:
        async def run(self: Any, data: Any) -> None:
            await inner(self, data)
            if "published" in _MARKS:
                _mark("sent")
            if "raw published" in _MARKS:
                _mark("raw sent")

        return run

    def receive_some(inner: Any, stage: str) -> Any:
        async def run(self: Any, max_bytes: int | None = None) -> Any:
            data = await inner(self, max_bytes)
            read_at[stage] = (time.perf_counter(), time.thread_time())
            return data

        return run

    def emit(inner: Any) -> Any:
        def run(self: Any, event: Any) -> bool:
            if isinstance(event, GossipMessage):
                raw = event.topic == RAW_TOPIC
                prefix = "raw " if raw else ""
                for stage in ("wire", "read"):
                    if _TRACE[0] and prefix + stage not in _MARKS and stage in read_at:
                        _MARKS[prefix + stage] = read_at[stage]
                _mark(prefix + "emitted")
            return inner(self, event)  # type: ignore[no-any-return]

        return run

    def on_gossip(inner: Any) -> Any:
        async def run(self: Any, message: Any) -> None:
            _mark("arrived")
            await inner(self, message)

        return run

    def send_job(inner: Any) -> Any:
        async def run(self: Any, job: Any) -> None:
            await inner(self, job)
            _mark("queued")

        return run

    def run_batch(inner: Any) -> Any:
        async def run(self: Any, jobs: Any, **kwargs: Any) -> Any:
            _mark("batch")
            return await inner(self, jobs, **kwargs)

        return run

    def show_early(inner: Any) -> Any:
        def run(self: Any, events: Any) -> None:
            inner(self, events)
            if events:
                _mark("shown")

        return run

    def validated(inner: Any) -> Any:
        def run(self: Any, message_id: bytes, *, accept: bool) -> None:
            if accept:
                _mark("forwarded")
            inner(self, message_id, accept=accept)

        return run

    def write(inner: Any) -> Any:
        async def run(self: Any, ops: Any, *, settle: bool = True) -> None:
            _mark("commit")
            await inner(self, ops, settle=settle)
            _mark("durable")

        return run

    wrap(Replicator, "broadcast", broadcast)
    wrap(PubSub, "publish", publish)
    wrap(NoiseStream, "send_all", send_all)
    wrap(NoiseStream, "receive_some", lambda inner: receive_some(inner, "wire"))
    wrap(YamuxStream, "receive_some", lambda inner: receive_some(inner, "read"))
    wrap(NetworkEvents, "emit", emit)
    wrap(Replicator, "on_gossip", on_gossip)
    wrap(DeltaPipeline, "_send_job", send_job)
    wrap(DeltaPipeline, "_run_batch", run_batch)
    wrap(EventHub, "show_early", show_early)
    wrap(PubSub, "validated", validated)
    wrap(AsyncStore, "write", write)
    del node


async def timeline(rounds: int, base: Path, bundle: Path, nodes: int) -> str:
    """Where the time goes in `propagation`'s rounds, each node in its own process: every
    child marks when the write (and its raw gossip baseline) passes each stage of
    `_STAGES` (by wrapping the methods named, which adds a little to each), and the
    loop thread's CPU in that process since the stage before; printed as each stage's
    p50 in ms after A's call returned (raw gossip: after A called publish), on A and on
    the receiver that showed it last; then the task steps in those processes from A's
    publish to its first frame, from the last receiver's first bytes to its reader having
    the event, and from then to its commit's end (what an earlier receiver still does
    while the last one works: these processes share the machine's cores)."""
    at: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    tasks: dict[tuple[str, str], dict[str, list[float]]] = {}
    async with open_children(base, nodes) as children:
        context = await share(children, bundle)
        await wait_converged(children, context)
        await wait_raw_mesh(children)
        for child in children:
            await child.ask("trace")
        writer, receivers = children[0], children[1:]
        size = 0
        for r in range(rounds):
            for child in children:
                await child.ask("marks")  # (cleared: the round starts)
            delta, committed = await writer.ask("write", context=context, prefix="trace", round=r)
            await last_seen(receivers, delta)
            last = max(receivers, key=lambda child: child.seen[delta])
            for child in receivers:
                await child.ask("stored", context=context, delta=delta)
            if not size:
                size = await writer.ask("size", context=context, delta=delta)
            payload = os.urandom(size).hex()
            started = await writer.ask("publish", payload=payload)
            await last_seen(receivers, payload)
            raw_last = max(receivers, key=lambda child: child.seen[payload])
            taken_a = await writer.ask("marks")
            taken_raw = await raw_last.ask("marks")
            taken_r = taken_raw if last is raw_last else await last.ask("marks")
            for stages, origin, taken in (
                (_STAGES, committed, taken_r),
                (_RAW_STAGES, started, taken_raw),
            ):
                previous: dict[str, float] = {}
                for stage, _, where in stages:
                    marks = (taken_a if where == "A" else taken)["marks"]
                    if stage not in marks:
                        continue
                    when, thread = marks[stage]
                    at.setdefault(stage, []).append(when - origin)
                    if where in previous:
                        cpu.setdefault(stage, []).append(thread - previous[where])
                    previous[where] = thread
            for window, taken in (
                (("published", "sent"), taken_a),
                (("raw published", "raw sent"), taken_a),
                (("wire", "seen"), taken_r),
                (("seen", "durable"), taken_r),
                (("raw wire", "raw seen"), taken_raw),
            ):
                _note_steps(tasks.setdefault(window, {}), taken, *window)
    lines = [
        f"write on A -> shown on the last of {nodes - 1} receivers, each node its own "
        f"process, {rounds} rounds (loadavg {os.getloadavg()[0]:.1f}): p50 of each stage, "
        "ms after A's call returned (raw gossip: after A called publish), on A and on the "
        "receiver that had it last; the CPU of that process's loop thread since its stage "
        "before"
    ]
    for stages in (_STAGES, _RAW_STAGES):
        for stage, label, _ in stages:
            if stage in at:
                ms = _percentile(at[stage], 0.5) * 1000
                spent = f"{_percentile(cpu[stage], 0.5) * 1e6:6.0f} us" if stage in cpu else ""
                lines.append(f"  {label:<74} {ms:6.2f}   {spent}")
    published = at.get("published", [])
    late = [t for t in published if t > 0]
    if published:
        lines.append(
            f"  A published the delta after its call returned in {len(late)} of "
            f"{len(published)} rounds (Trio runs the caller and the broadcaster it woke in "
            f"either order), by p50 {_percentile(late, 0.5) * 1000 if late else 0:.2f} ms"
        )
    for (first, then), by_task in tasks.items():
        lines.append(
            f"  task steps from {first!r} to {then!r} in that process, per round: CPU us, steps"
        )
        ranked = sorted(by_task.items(), key=lambda item: -sum(item[1][0::2]))
        for name, steps in ranked[:8]:
            lines.append(
                f"    {sum(steps[0::2]) / rounds * 1e6:7.0f} us  {len(steps) // 2 / rounds:5.1f}  "
                f"{name}"
            )
    return "\n".join(lines)


def _note_steps(into: dict[str, list[float]], taken: dict[str, Any], first: str, then: str) -> None:
    """Add the task steps that began between marks `first` and `then` (CPU, 1 per step)."""
    marks = taken["marks"]
    if first not in marks or then not in marks:
        return
    began, ended = marks[first][0], marks[then][0]
    for name, at, spent in taken["steps"]:
        if began <= at < ended:
            into.setdefault(_task_kind(name), []).extend((spent, 1.0))


def _task_kind(name: str) -> str:
    """A task's name without the peer id some names start with."""
    head, _, tail = name.partition(":")
    return tail if tail and len(head) > 40 else name


# -- the child ---------------------------------------------------------------------------------


async def _serve(home: Path, protocol: int) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(protocol)
    lines, line_out = trio.open_memory_channel[bytes](1000)

    async def write_lines() -> None:
        async for line in line_out:
            await stdout.send_all(line)

    def say(message: dict[str, Any]) -> None:
        lines.send_nowait(json.dumps(message).encode() + b"\n")

    async with (
        open_test_node(home, api=False, configure=_fast) as test_node,
        trio.open_nursery() as nursery,
    ):
        node = test_node.node
        nursery.start_soon(write_lines)
        node.pubsub.subscribe(RAW_TOPIC)
        nursery.start_soon(_report_gossip, node, say)
        buffer = b""
        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = json.loads(line)
                if command["do"] == "stop":
                    say({"value": None})
                    await trio.sleep(0.05)  # (the answer's line goes out first)
                    nursery.cancel_scope.cancel()
                    return
                try:
                    say({"value": await _do(node, command, nursery, say)})
                except Exception as exc:  # noqa: BLE001  # (reported to the parent)
                    say({"error": f"{type(exc).__name__}: {exc}"})


async def _do(node: Node, command: dict[str, Any], nursery: trio.Nursery, say: Say) -> Any:
    what = command["do"]
    if what == "address":
        return node.host.addresses()[0]
    if what == "connect":
        await node.host.connect(command["address"])
        return None
    if what == "install":
        return (await node.applications.install(command["bundle"])).application_id.hex()
    if what == "create":
        record = await node.contexts.create(bytes.fromhex(command["app"]))
        return base58.b58encode(record.context_id).decode()
    if what == "invite":
        return await node.joins.invite(base58.b58decode(command["context"]))
    if what == "join":
        await node.joins.join(command["invitation"])
        return None
    if what == "watch":
        nursery.start_soon(_report_hub, node, command["context"], say)
        return None
    if what == "state":
        root, heads, pending = await node.contexts.state(base58.b58decode(command["context"]))
        return [root.hex(), sorted(h.hex() for h in heads), pending]
    if what == "raw_mesh":  # (as `sync_bench._wait_raw_mesh` asks of each node)
        others = command["others"]
        mesh = len(node.pubsub.mesh_peers(RAW_TOPIC))
        return len(node.pubsub.topic_peers(RAW_TOPIC)) >= others and mesh >= min(
            node.config.pubsub.d_lo, others
        )
    if what == "size":
        wire = await node.contexts.read_delta(
            base58.b58decode(command["context"]), bytes.fromhex(command["delta"])
        )
        return len(wire or b"")
    if what == "heartbeat":
        await node.pubsub.wait_heartbeat()
        return None
    if what == "write":
        context = base58.b58decode(command["context"])
        delta_id = await _set_many(node, context, _items(command["prefix"], command["round"], 1))
        return [delta_id.hex(), time.perf_counter()]
    if what == "stored":
        await wait_stored(
            [node], base58.b58decode(command["context"]), bytes.fromhex(command["delta"])
        )
        return None
    if what == "publish":
        payload = bytes.fromhex(command["payload"])
        started = time.perf_counter()
        node.pubsub.publish(RAW_TOPIC, payload)
        return started
    if what == "trace":
        _trace(node)
        return None
    if what == "marks":
        taken = {stage: list(at) for stage, at in _MARKS.items()}
        steps = list(_STEPS)
        _MARKS.clear()
        _STEPS.clear()
        return {"marks": taken, "steps": steps}
    if what == "idle":
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        return None
    raise ValueError(f"unknown command {what!r}")


async def _report_hub(node: Node, context: str, say: Say) -> None:
    sub = node.hub.open()
    sub.contexts.add(context)
    try:
        async for event in sub.receive:
            if isinstance(event, ContextEvent):
                _mark("seen")
                say({"seen": event.delta_id, "at": time.perf_counter()})
    finally:
        sub.close()


async def _report_gossip(node: Node, say: Say) -> None:
    with node.events.observe(capacity=10_000) as seen:
        async for event in seen:
            if isinstance(event, GossipMessage) and event.topic == RAW_TOPIC:
                _mark("raw seen")
                say({"seen": event.data.hex(), "at": time.perf_counter()})


if __name__ == "__main__":
    # The protocol owns stdout: anything else printed goes to stderr.
    protocol = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    trio.run(_serve, Path(sys.argv[1]), protocol)
