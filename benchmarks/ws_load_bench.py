"""WebSocket load (issue 11's reliability suite): 1,000 subscribers across 10 contexts while
20 writes per second flow for a minute (`--quick`: 100 subscribers, 5 seconds).

* **Node:** a real `trionode start` process on loopback (`api.max_websockets` raised to fit),
  so its memory is its own: RSS is read from /proc before the subscribers connect and after
  the run.
* **Subscribers:** trio-websocket clients in this process, spread evenly over the contexts,
  each subscribing to one. Each records the `deltaId` and receive time of every `delta`.
* **Writes:** `set` calls over JSON-RPC, round-robin over the contexts, paced at the target
  rate; the send time of each is kept. After the last write, subscribers have until every one
  has what it should (or a timeout) to drain.
* **Exactly once:** per subscriber, the writes to its context must each arrive once: missing
  and duplicated deliveries are counted (both should be 0).
* **Baseline (same run, same clients and pacing):** a minimal broadcaster, a trio-websocket
  server in its own process that forwards each message of a publisher connection to every
  subscriber of that "context". Figures: deliveries exactly once (%), and the write → last
  subscriber latency (p50).

Standalone: ``python -m benchmarks.ws_load_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from benchmarks.harness import Row, render

ROOT = Path(__file__).resolve().parent.parent
CONTEXTS = 10
RATE = 20.0
DRAIN_TIMEOUT = 60.0
OPENING = 32
"""WebSocket handshakes in flight at once while the subscribers connect."""

BROADCASTER = """
import json, sys, trio
from trio_websocket import serve_websocket, ConnectionClosed
rooms = {}
async def handler(request):
    ws = await request.accept()
    first = json.loads(await ws.get_message())
    if first["type"] == "publish":
        while True:
            try:
                text = await ws.get_message()
            except ConnectionClosed:
                return
            for peer in list(rooms.get(json.loads(text)["contextId"], ())):
                try:
                    await peer.send_message(text)
                except ConnectionClosed:
                    pass
    room = rooms.setdefault(first["contextIds"][0], set())
    room.add(ws)
    await ws.send_message(json.dumps({"type": "subscribed"}))
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        room.discard(ws)
async def main():
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        print(server.port, flush=True)
trio.run(main)
"""


@attrs.define
class Subscriber:
    context: str
    received: Counter[str] = attrs.field(factory=Counter)
    times: dict[str, float] = attrs.field(factory=dict)
    changed: trio.Event = attrs.field(factory=trio.Event)


@attrs.frozen
class Outcome:
    expected: int
    exactly_once: int
    missing: int
    duplicated: int
    latencies: list[float]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def _follow(
    url: str,
    sub: Subscriber,
    request: dict[str, Any],
    opening: trio.Semaphore,
    ready: Callable[[], None],
    *,
    headers: list[tuple[bytes, bytes]],
) -> None:
    await opening.acquire()  # a few handshakes at a time, not a thousand SYNs at once
    async with open_websocket_url(url, message_queue_size=10_000, extra_headers=headers) as ws:
        await ws.send_message(json.dumps(request))
        while True:
            try:
                message = json.loads(await ws.get_message())
            except ConnectionClosed:
                return
            if message["type"] in ("subscribed", "resync"):
                opening.release()
                ready()
            elif message["type"] == "delta":
                sub.received[message["deltaId"]] += 1
                sub.times.setdefault(message["deltaId"], time.perf_counter())
                sub.changed.set()
                sub.changed = trio.Event()


async def _load(
    url: str,
    contexts: list[str],
    subscribers: int,
    duration: float,
    write: Callable[[str, int], Awaitable[str]],
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Outcome:
    subs = [Subscriber(contexts[i % len(contexts)]) for i in range(subscribers)]
    written: dict[str, list[tuple[str, float]]] = {c: [] for c in contexts}
    async with trio.open_nursery() as nursery:
        connected = trio.Semaphore(0)
        opening = trio.Semaphore(OPENING)
        for sub in subs:
            request = {"type": "subscribe", "contextIds": [sub.context]}
            nursery.start_soon(
                partial(_follow, headers=headers or []),
                url,
                sub,
                request,
                opening,
                connected.release,
            )
        for _ in subs:
            await connected.acquire()
        started = trio.current_time()
        for n in range(int(duration * RATE)):
            await trio.sleep_until(started + n / RATE)
            context = contexts[n % len(contexts)]
            sent = time.perf_counter()
            written[context].append((await write(context, n), sent))
        with trio.move_on_after(DRAIN_TIMEOUT):
            for sub in subs:
                while len(sub.received) < len(written[sub.context]):
                    await sub.changed.wait()
        nursery.cancel_scope.cancel()
    expected = exactly_once = missing = duplicated = 0
    last_receive: dict[str, float] = {}
    for sub in subs:
        for delta_id, _ in written[sub.context]:
            expected += 1
            count = sub.received.get(delta_id, 0)
            exactly_once += count == 1
            missing += count == 0
            duplicated += max(count - 1, 0)
            if delta_id in sub.times:
                last_receive[delta_id] = max(last_receive.get(delta_id, 0.0), sub.times[delta_id])
    latencies = [
        last_receive[d] - sent
        for writes in written.values()
        for d, sent in writes
        if d in last_receive
    ]
    return Outcome(expected, exactly_once, missing, duplicated, latencies)


async def _cli(home: Path, *args: str) -> Any:
    result = await trio.run_process(
        [sys.executable, "-m", "trionode", *args, "--home", str(home), "--json"],
        capture_stdout=True,
        capture_stderr=True,
        cwd=ROOT,
    )
    return json.loads(result.stdout)


async def measure_trionode(subscribers: int, duration: float) -> tuple[Outcome, float, float]:
    """The outcome, and the node's RSS (MiB) before the subscribers and after the run."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "node"
        await _cli(home, "init", "--server-port", "0", "--swarm-port", "0", "--no-mdns")
        config = (home / "config.toml").read_text()
        config = config.replace(
            'listen = ["/ip4/0.0.0.0/tcp/0"]', 'listen = ["/ip4/127.0.0.1/tcp/0"]'
        )
        config = config.replace("max_websockets = 256", f"max_websockets = {subscribers + 16}")
        (home / "config.toml").write_text(config)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trionode", "start", "--home", str(home)],
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            async with trio.open_nursery() as nursery:
                started = trio.Event()
                nursery.start_soon(_drain_log, proc, started)
                await started.wait()
                outcome, before, after = await _run_against(proc, home, subscribers, duration)
                nursery.cancel_scope.cancel()
        finally:
            proc.terminate()
            await proc.wait()
    return outcome, before, after


async def _drain_log(proc: trio.Process, started: trio.Event) -> None:
    """Read the node's log (so its pipe never fills); `started` once it says so."""
    assert proc.stderr is not None
    seen = b""
    while chunk := await proc.stderr.receive_some():
        if not started.is_set():
            seen += chunk
            if b"started: peer id" in seen:
                started.set()
    raise RuntimeError(f"the node exited: {seen[-2000:].decode(errors='replace')}")


async def _run_against(
    proc: trio.Process, home: Path, subscribers: int, duration: float
) -> tuple[Outcome, float, float]:
    api = (home / "api.url").read_text().strip()
    token = (home / "api-token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=30) as http:
        app = (
            await http.post(
                "/admin-api/applications", json={"path": str(ROOT / "apps" / "kv_store")}
            )
        ).json()
        contexts = [
            (
                await http.post("/admin-api/contexts", json={"applicationId": app["applicationId"]})
            ).json()["contextId"]
            for _ in range(CONTEXTS)
        ]

        async def write(context: str, n: int) -> str:
            body = {
                "jsonrpc": "2.0",
                "id": n,
                "method": "execute",
                "params": {
                    "contextId": context,
                    "method": "set",
                    "argsJson": {"key": f"k{n % 50}", "value": str(n)},
                },
            }
            reply = (await http.post("/jsonrpc", json=body)).json()
            return str(reply["result"]["deltaId"])

        before = _rss_mib(proc.pid)
        # Not a browser: the token goes in the Authorization header (no `?token=`).
        url = api.replace("http", "ws", 1) + "/ws"
        outcome = await _load(
            url,
            contexts,
            subscribers,
            duration,
            write,
            headers=[(b"Authorization", f"Bearer {token}".encode())],
        )
        after = _rss_mib(proc.pid)
    return outcome, before, after


async def measure_baseline(subscribers: int, duration: float) -> Outcome:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", BROADCASTER], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        port = int((await proc.stdout.receive_some(64)).decode().strip())
        url = f"ws://127.0.0.1:{port}/"
        contexts = [f"c{i}" for i in range(CONTEXTS)]
        async with open_websocket_url(url) as publisher:
            await publisher.send_message(json.dumps({"type": "publish"}))

            async def write(context: str, n: int) -> str:
                delta_id = f"{n:064x}"
                message = {"type": "delta", "contextId": context, "deltaId": delta_id}
                await publisher.send_message(json.dumps(message))
                return delta_id

            return await _load(url, contexts, subscribers, duration, write)
    finally:
        proc.terminate()
        await proc.wait()


def _percent(outcome: Outcome) -> float:
    return 100.0 * outcome.exactly_once / outcome.expected if outcome.expected else 0.0


async def run(*, quick: bool) -> list[Row]:
    subscribers, duration = (100, 5.0) if quick else (1000, 60.0)
    _raise_fd_limit(2 * subscribers + 256)
    ours, before, after = await measure_trionode(subscribers, duration)
    base = await measure_baseline(subscribers, duration)
    label = f"ws load ({subscribers} subs, {CONTEXTS} contexts, {RATE:g} writes/s, {duration:g} s)"
    print(
        f"{label}: trionode expected {ours.expected}, exactly once {ours.exactly_once}, "
        f"missing {ours.missing}, duplicated {ours.duplicated}; node RSS {before:.0f} MiB "
        f"before, {after:.0f} MiB after; baseline missing {base.missing}, "
        f"duplicated {base.duplicated}",
        file=sys.stderr,
    )
    return [
        Row(
            f"{label}: delivered exactly once",
            _percent(ours),
            "%",
            "minimal broadcaster",
            _percent(base),
        ),
        Row(
            f"{label}: write -> last subscriber p50",
            statistics.median(ours.latencies) * 1000 if ours.latencies else float("nan"),
            "ms",
            "minimal broadcaster",
            statistics.median(base.latencies) * 1000 if base.latencies else float("nan"),
            higher_is_better=False,
        ),
        Row(
            f"{label}: node RSS after the run",
            after,
            "MiB",
            "node RSS before subscribers",
            before,
            higher_is_better=False,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ws_load_bench")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
