"""The `trionode` command: node management (init, start) and client commands over the API.

Client commands find the node through `--home` (API URL and token read from the home) or
`--api URL --token T`; they print a readable table, or one JSON document with `--json`, and
exit non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from trionode import __version__
from trionode.cli_blobs import COMMANDS as BLOB_COMMANDS
from trionode.cli_contexts import COMMANDS as CONTEXT_COMMANDS, table as _table
from trionode.cli_invitations import add_invitation_commands
from trionode.client import ApiError, Client, open_client
from trionode.config import (
    DEFAULT_HOME,
    DEFAULT_SERVER_PORT,
    DEFAULT_SWARM_PORT,
    NodeConfig,
    load_config,
)
from trionode.errors import ConfigError, StorageError, TrionodeError, WrongPassphraseError
from trionode.home import init_home, read_api_url, read_token
from trionode.node import open_node

log = logging.getLogger("trionode")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"trionode: {message}", file=sys.stderr)
    return code


# -- init / start -------------------------------------------------------------------------


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
    return EXIT_OK


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


async def run_until_signalled(config: NodeConfig) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, shutdown, nursery.cancel_scope)
        async with open_node(config) as node:
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
    _configure_logging(args.log_level or config.node.log_level)
    try:
        trio.run(run_until_signalled, config)
    except (OSError, TrionodeError) as exc:
        return _fail(f"cannot start: {exc}")
    except BaseExceptionGroup as group:
        # A service that cannot start (a port in use, a bad `network.announce`) fails inside
        # the node's nursery: one line for the user, a traceback only for anything else.
        expected, rest = group.split((OSError, TrionodeError))
        if rest is not None or expected is None:
            raise
        return _fail(f"cannot start: {_first_leaf(expected)}")
    return EXIT_OK


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def cmd_demo(args: argparse.Namespace) -> int:
    from trionode.demo import run_demo  # noqa: PLC0415 - only the demo needs it

    _configure_logging("WARNING")
    result = trio.run(lambda: run_demo(args.nodes, say=(lambda _: None) if args.json else print))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return EXIT_OK


# -- client commands ----------------------------------------------------------------------


def _api_target(args: argparse.Namespace) -> tuple[str, str]:
    home = Path(args.home)
    url = args.api
    if url is None:
        url = read_api_url(home)
    if url is None:
        config = load_config(home, env={}) if home.is_dir() else None
        if config is None:
            raise ConfigError(f"no node home at {home}: pass --home DIR or --api URL --token T")
        host = "127.0.0.1" if config.api.host in ("0.0.0.0", "::") else config.api.host  # noqa: S104
        url = f"http://{host}:{config.api.port}"
    token = args.token if args.token is not None else read_token(home)
    return url, token


def _render_mapping(data: dict[str, Any]) -> str:
    return _table(list(data.items()), ("key", "value"))


ClientAction = Callable[[Client, argparse.Namespace], Awaitable[Any]]
Renderer = Callable[[Any], str]


@attrs.frozen
class ClientCommand:
    help: str
    action: ClientAction
    render: Renderer | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


async def _health(client: Client, _args: argparse.Namespace) -> Any:
    return await client.health()


async def _ready(client: Client, _args: argparse.Namespace) -> Any:
    return await client.ready()


async def _info(client: Client, _args: argparse.Namespace) -> Any:
    return await client.node_info()


def _render_info(result: Any) -> str:
    rows = [(k, v) for k, v in result.items() if k not in ("addresses", "reachability")]
    rows += [("address", a) for a in result.get("addresses", [])]
    reach = result.get("reachability")
    if isinstance(reach, dict):
        rows.append(("reachability", reach.get("status", "?")))
        rows += [("confirmed address", a) for a in reach.get("confirmedAddresses", [])]
    return _table(rows, ("key", "value"))


async def _peers(client: Client, _args: argparse.Namespace) -> Any:
    return await client.peers()


def _render_peers(result: Any) -> str:
    rows = [
        (
            p["peer_id"],
            p["address"] or "-",
            p["direction"],
            p["agent"] or "-",
            p["streams"],
            "-" if p["ping_rtt_ms"] is None else f"{p['ping_rtt_ms']:.2f}",
            len(p.get("topics", ())),
        )
        for p in result["peers"]
    ]
    table = _table(
        rows, ("peer id", "address", "direction", "agent", "streams", "rtt ms", "topics")
    )
    listen = "\n".join(f"listening on {a}" for a in result["listenAddrs"])
    return f"{table}\n{listen}" if listen else table


async def _topics(client: Client, _args: argparse.Namespace) -> Any:
    return await client.topics()


def _render_topics(result: Any) -> str:
    rows = [
        (
            t["topic"],
            "yes" if t["subscribed"] else "no",
            len(t["meshPeers"]),
            len(t["subscribers"]),
            " ".join(t["meshPeers"]) or "-",
        )
        for t in result["topics"]
    ]
    if not rows:
        return "no topics"
    return _table(rows, ("topic", "subscribed", "mesh", "subscribers", "mesh peers"))


async def _connect(client: Client, args: argparse.Namespace) -> Any:
    return await client.connect(args.address)


def _connect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="multiaddr, e.g. /ip4/127.0.0.1/tcp/2428/p2p/12D3KooW...")


CLIENT_COMMANDS: dict[str, ClientCommand] = {
    "health": ClientCommand("check that the node's API answers", _health),
    "ready": ClientCommand("check that the node has started every service", _ready),
    "info": ClientCommand(
        "show the node's peer id, version and the addresses it hands out", _info, _render_info
    ),
    "peers": ClientCommand("list connected peers", _peers, _render_peers),
    "connect": ClientCommand("dial a peer", _connect, arguments=_connect_args),
    "topics": ClientCommand(
        "list pubsub topics with their mesh peers and subscribers", _topics, _render_topics
    ),
}


CLIENT_COMMANDS.update(
    {
        name: ClientCommand(help_text, action, render, arguments)
        for name, help_text, action, render, arguments in [*CONTEXT_COMMANDS, *BLOB_COMMANDS]
    }
)


def run_client_command(args: argparse.Namespace) -> int:
    url, token = _api_target(args)
    command = CLIENT_COMMANDS[args.client_command]
    action = command.action

    async def go() -> Any:
        async with open_client(url, token, request_timeout=args.timeout) as client:
            return await action(client, args)

    result = trio.run(go)
    if result is None:  # streaming commands (watch) printed as they went
        return EXIT_OK
    if args.json:
        print(json.dumps(result, indent=None, sort_keys=True))
    elif command.render is not None:
        print(command.render(result))
    elif isinstance(result, dict):
        print(_render_mapping(result))
    else:
        print(result)
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trionode", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"trionode {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home", default=DEFAULT_HOME, help=f"node home directory (default {DEFAULT_HOME})"
    )
    common.add_argument("--json", action="store_true", help="print one JSON document")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create a node home")
    init.add_argument("--swarm-port", type=int, default=DEFAULT_SWARM_PORT)
    init.add_argument("--server-port", type=int, default=DEFAULT_SERVER_PORT)
    init.add_argument(
        "--force", action="store_true", help="replace an existing home (its data is deleted)"
    )
    init.add_argument(
        "--no-mdns", action="store_true", help="do not announce or look for peers by mDNS"
    )
    init.set_defaults(func=cmd_init)

    start = sub.add_parser("start", parents=[common], help="run the node until SIGINT/SIGTERM")
    start.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    start.set_defaults(func=cmd_start)

    demo = sub.add_parser(
        "demo", parents=[common], help="run 3 nodes in this process and watch them converge"
    )
    demo.add_argument("--nodes", type=int, default=3, choices=range(2, 9), metavar="N")
    demo.set_defaults(func=cmd_demo)

    add_invitation_commands(sub, common)

    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument("--api", help="API base URL (default: read from --home)")
    client.add_argument("--token", help="bearer token (default: read from --home)")
    client.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    groups: dict[str, Any] = {}
    for name, spec in CLIENT_COMMANDS.items():
        group, _, leaf = name.partition(" ")
        if leaf:  # "app install": a sub-command of a group parser
            if group not in groups:
                parent = sub.add_parser(group, help=f"{group} commands")
                groups[group] = parent.add_subparsers(
                    dest=f"{group}_command", required=True, metavar="COMMAND"
                )
            cmd = groups[group].add_parser(leaf, parents=[client], help=spec.help)
        else:
            cmd = sub.add_parser(name, parents=[client], help=spec.help)
        if spec.arguments is not None:
            spec.arguments(cmd)
        cmd.set_defaults(func=run_client_command, client_command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, WrongPassphraseError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (ApiError, StorageError, TrionodeError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
