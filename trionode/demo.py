"""`trionode demo`: three nodes in one process, one shared kv_store context, converging.

The quickest way to see trionode work: it starts the nodes on free loopback ports with
throw-away homes, installs kv_store, creates a context on the first node, invites and joins
the other two, writes a key on each, waits until every node holds the same state, and
prints it with the time each step took.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import base58
import trio
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.errors import TrionodeError
from trionode.node import Node
from trionode.testing import open_test_node

APPS = Path(__file__).resolve().parent.parent / "apps"


def _demo_config(file: FileConfig) -> FileConfig:
    return replace(
        file,
        pubsub=replace(file.pubsub, heartbeat_interval=0.2),
        sync=replace(file.sync, heartbeat=1.0, interval=2.0, min_interval=1.0),
        network=replace(file.network, mdns=False, target_peers=0),
    )


async def _converged(nodes: list[Node], context: bytes) -> bool:
    states = [await n.contexts.state(context) for n in nodes]
    return all(s == states[0] for s in states) and states[0][2] == 0


async def _wait_converged(nodes: list[Node], context: bytes, limit: float) -> None:
    with trio.fail_after(limit):
        while not await _converged(nodes, context):
            # Wake on the next applied delta anywhere, or re-check at the next heartbeat.
            await nodes[0].pubsub.wait_heartbeat()


async def run_demo(count: int = 3, *, say: Callable[[str], None] = print) -> dict[str, object]:
    kv_store = APPS / "kv_store"
    if not (kv_store / "manifest.json").is_file():
        raise TrionodeError(f"the demo needs the kv_store app bundle at {kv_store}")
    started = time.perf_counter()
    steps: list[tuple[str, float]] = []

    def step(name: str) -> None:
        steps.append((name, time.perf_counter() - started))
        say(f"[{time.perf_counter() - started:6.2f}s] {name}")

    with tempfile.TemporaryDirectory(prefix="trionode-demo-") as tmp:
        async with AsyncExitStack() as stack:
            nodes = [
                (
                    await stack.enter_async_context(
                        open_test_node(Path(tmp) / f"node{i}", api=False, configure=_demo_config)
                    )
                ).node
                for i in range(count)
            ]
            step(f"started {count} nodes: " + ", ".join(n.peer_id[:16] + "…" for n in nodes))
            for i, a in enumerate(nodes):
                for b in nodes[i + 1 :]:
                    await a.host.connect(b.host.addresses()[0])
            step("connected them (noise + yamux over loopback TCP)")
            apps = [await node.applications.install(str(kv_store)) for node in nodes]
            app = apps[0]
            step(f"installed kv_store ({base58.b58encode(app.application_id).decode()[:12]}…)")
            record = await nodes[0].contexts.create(app.application_id)
            context = record.context_id
            step(f"node0 created context {base58.b58encode(context).decode()}")
            for node in nodes[1:]:
                await node.joins.join(await nodes[0].joins.invite(context))
            step(f"nodes 1..{count - 1} joined with one-time invitations")
            for i, node in enumerate(nodes):
                await node.contexts.execute(
                    context, "set", json.dumps({"key": f"from-node{i}", "value": f"hello {i}"})
                )
            step(f"each node wrote a key ({count} signed, encrypted deltas gossiped)")
            await _wait_converged(nodes, context, limit=60)
            step("converged")
            root, heads, _ = await nodes[0].contexts.state(context)
            entries = (await nodes[-1].contexts.execute(context, "entries", "{}")).result
            say("")
            say(f"every node: root {root.hex()[:16]}…, {len(heads)} head(s)")
            for key, value in sorted(dict(entries).items()):
                say(f"  {key} = {value}")
            return {
                "nodes": count,
                "context": base58.b58encode(context).decode(),
                "rootHash": root.hex(),
                "entries": dict(entries),
                "seconds": round(time.perf_counter() - started, 3),
                "steps": [{"step": n, "at": round(t, 3)} for n, t in steps],
            }
