"""The commands that run node code in this process: `init`, `start` and `demo`.

`trionode.cli` imports this module only when one of them runs: it loads the node (Quart,
Hypercorn, LMDB, crypto), which client commands must not pay for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from logging.handlers import MemoryHandler
from pathlib import Path

import trio

from trionode import __version__
from trionode.config import NodeConfig, load_config
from trionode.crdt.bulk import freeze_heap
from trionode.home import init_home
from trionode.node import open_node

log = logging.getLogger("trionode")


_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=_LOG_FORMAT,
        stream=sys.stderr,
        force=True,
    )


class _StartupLog:
    """Holds back INFO/DEBUG records until the node has started.

    A start that fails (a port in use, a wrong passphrase) then shows only its one-line
    reason, not the services' start-up chatter before it; warnings and errors pass at once
    (they flush what was held). Once the node is up, `started()` prints what was held and
    records go straight to stderr.
    """

    def __init__(self, level: str) -> None:
        self._stream = logging.StreamHandler(sys.stderr)
        self._stream.setFormatter(logging.Formatter(_LOG_FORMAT))
        self._held = MemoryHandler(
            capacity=10_000, flushLevel=logging.WARNING, target=self._stream, flushOnClose=False
        )
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        root.addHandler(self._held)
        root.setLevel(getattr(logging, level, logging.INFO))

    def discard(self) -> None:
        """Drop what is held (the start failed; the interpreter would flush it at exit)."""
        self._held.acquire()
        try:
            self._held.buffer.clear()
        finally:
            self._held.release()

    def started(self) -> None:
        root = logging.getLogger()
        self._held.flush()
        root.removeHandler(self._held)
        root.addHandler(self._stream)


def cmd_init(args: argparse.Namespace) -> int:
    result = init_home(
        Path(args.home),
        swarm_port=args.swarm_port,
        server_port=args.server_port,
        force=args.force,
        mdns=not args.no_mdns,
    )
    if args.json:
        print(json.dumps({"home": str(result.home), "peerId": result.peer_id}))
    else:
        print(f"initialised {result.home}")
        print(f"peer id   {result.peer_id}")
        print(f"api token {result.home / 'api-token'} (keep it private)")
    return 0


async def _watch_signals(
    shutdown: trio.Event,
    abort: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """First SIGINT/SIGTERM: graceful shutdown. A second one: stop now."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second %s: stopping without waiting", signal.Signals(signum).name)
                abort.cancel()
                return
            log.info("%s received: shutting down", signal.Signals(signum).name)
            shutdown.set()


def freeze_startup_heap() -> None:
    """Collect once, then keep everything alive now (modules, the config, app bundles,
    pools) out of the collector's sight for good (`gc.freeze`): later collections scan
    only what the node made since. Under a write load the full collections took ~90 ms
    each, most of it walking objects that live as long as the process (issue #16)."""
    freeze_heap()  # (snapshots keep it so: crdt/bulk.py)


async def run_until_signalled(
    config: NodeConfig, on_started: Callable[[], None] = lambda: None
) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, shutdown, nursery.cancel_scope)
        async with open_node(config) as node:
            freeze_startup_heap()
            on_started()
            log.info(
                "trionode %s started: peer id %s, API %s, p2p %s",
                __version__,
                node.peer_id,
                node.api_url if node.api_urls else "off",
                " ".join(node.listen_addresses()),
            )
            await shutdown.wait()
        log.info("trionode stopped cleanly")
        nursery.cancel_scope.cancel()


def cmd_start(args: argparse.Namespace) -> int:
    config = load_config(Path(args.home), env=dict(os.environ))
    startup_log = _StartupLog(args.log_level or config.node.log_level)
    # Errors raised in the node's nurseries arrive here inside exception groups;
    # `trionode.cli.main` unwraps them into one line.
    try:
        trio.run(run_until_signalled, config, startup_log.started)
    finally:
        startup_log.discard()  # nothing is held once the node has started
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trionode.demo import run_demo  # noqa: PLC0415 - only the demo needs it

    _configure_logging("WARNING")
    result = trio.run(lambda: run_demo(args.nodes, say=(lambda _: None) if args.json else print))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0
