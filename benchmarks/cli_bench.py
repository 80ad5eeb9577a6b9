"""The CLI's start-up cost: wall time of one `trionode call` process (issue 14, part 3).

A node runs in this process with kv_store and a context holding one key. Each round runs, one
after the other, (a) the installed `trionode` script doing `call CTX get --args ...` with
`--api`/`--token` (it prints the result as a table), and (b) the baseline: a minimal Python
script (`python -c`, the same interpreter) that imports httpx, posts the same JSON-RPC
request and prints the result. Both are whole processes measured from spawn to exit, so
interpreter start-up, imports and the request all count; the figure is the median of the
rounds. The target is a ratio within 1.3x.

Standalone: ``python -m benchmarks.cli_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from benchmarks.harness import Row, render
from trionode.testing import open_test_node

APPS = Path(__file__).resolve().parent.parent / "apps"

MINIMAL_HTTPX = """
import sys, httpx
url, token, context = sys.argv[1:]
body = {"jsonrpc": "2.0", "id": 1, "method": "execute",
        "params": {"contextId": context, "method": "get", "argsJson": {"key": "a"}}}
reply = httpx.post(url + "/jsonrpc", json=body, headers={"Authorization": "Bearer " + token})
print(reply.json()["result"]["output"])
"""


def _trionode_command() -> list[str]:
    script = Path(sys.executable).with_name("trionode")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "trionode"]


async def _wall_time(argv: list[str]) -> float:
    started = time.perf_counter()
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {result.stderr.decode()}")
    return elapsed


async def run(*, quick: bool) -> list[Row]:
    rounds = 3 if quick else 15
    with tempfile.TemporaryDirectory() as tmp:
        async with open_test_node(Path(tmp) / "node") as test_node:
            async with test_node.client() as client:
                app = await client.install_application(str(APPS / "kv_store"))
                context = (await client.create_context(app.application_id)).context_id
                await client.call(context, "set", {"key": "a", "value": "1"})
            url, token = test_node.api_url, test_node.token
            cli = [
                *_trionode_command(),
                *("call", context, "get", "--args", '{"key": "a"}'),
                *("--api", url, "--token", token),
            ]
            baseline = [sys.executable, "-c", MINIMAL_HTTPX, url, token, context]
            await _wall_time(cli)  # warm the OS file cache for both
            await _wall_time(baseline)
            cli_times: list[float] = []
            baseline_times: list[float] = []
            for _ in range(rounds):  # interleaved, so load on the machine hits both alike
                cli_times.append(await _wall_time(cli))
                baseline_times.append(await _wall_time(baseline))
    return [
        Row(
            "trionode call: one process, median wall time",
            statistics.median(cli_times) * 1000,
            "ms",
            "minimal httpx script, same request",
            statistics.median(baseline_times) * 1000,
            higher_is_better=False,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_bench")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
