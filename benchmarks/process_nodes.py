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
from trionode.context.events import ContextEvent
from trionode.net.events import GossipMessage
from trionode.node import Node
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
                say({"seen": event.delta_id, "at": time.perf_counter()})
    finally:
        sub.close()


async def _report_gossip(node: Node, say: Say) -> None:
    with node.events.observe(capacity=10_000) as seen:
        async for event in seen:
            if isinstance(event, GossipMessage) and event.topic == RAW_TOPIC:
                say({"seen": event.data.hex(), "at": time.perf_counter()})


if __name__ == "__main__":
    # The protocol owns stdout: anything else printed goes to stderr.
    protocol = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    trio.run(_serve, Path(sys.argv[1]), protocol)
