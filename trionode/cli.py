"""The `trionode` command: node management (init, start) and client commands over the API.

Client commands find the node through `--home` (API URL and token read from the home) or
`--api URL --token T`; they print a readable table, or one JSON document with `--json`, and
exit non-zero with a one-line reason on failure.

Start-up time matters here: a client command imports only argparse, httpx and the client,
and runs without an event loop (see `run_blocking`); the node (`cli_node`) and Trio are
imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from trionode import __version__, schemas
from trionode.cli_apps_sign import add_app_sign_commands
from trionode.cli_blobs import COMMANDS as BLOB_COMMANDS
from trionode.cli_contexts import COMMANDS as CONTEXT_COMMANDS, mapping_rows, table as _table
from trionode.cli_invitations import add_invitation_commands
from trionode.cli_tokens import COMMANDS as TOKEN_COMMANDS
from trionode.client import ApiError, Client, open_blocking_client, run_blocking
from trionode.errors import ConfigError, TrionodeError, WrongPassphraseError
from trionode.layout import (
    DEFAULT_SERVER_PORT,
    DEFAULT_SWARM_PORT,
    default_home,
    read_api_url,
    read_token,
)


class UsageError(TrionodeError):
    """The command line asks for something that cannot be done (exit status 2)."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

NEEDS_EVENT_LOOP = frozenset({"watch", "blob add", "blob get", "context join"})
"""Client commands that stream (WebSocket, blob bodies, file I/O in Trio) and so run under
trio.run with the async client; the others run without an event loop."""


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    # One line, whatever the message holds (some library errors span several).
    print(f"trionode: {' '.join(message.split())}", file=sys.stderr)
    return code


# -- init / start / demo: run node code, imported only when used ------------------------


def _node_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from trionode import cli_node  # noqa: PLC0415 - loads the whole node

        command: Callable[[argparse.Namespace], int] = getattr(cli_node, name)
        return command(args)

    return run


# -- client commands ----------------------------------------------------------------------


def _api_target(args: argparse.Namespace) -> tuple[str, str]:
    home = Path(args.home)
    url = args.api
    if url is None:
        url = read_api_url(home)
    if url is None:
        from trionode.config import load_config  # noqa: PLC0415 - only when api.url is missing

        config = load_config(home, env={}) if home.is_dir() else None
        if config is None:
            raise ConfigError(f"no node home at {home}: pass --home DIR or --api URL --token T")
        host = "127.0.0.1" if config.api.host in ("0.0.0.0", "::") else config.api.host  # noqa: S104
        url = f"http://{host}:{config.api.port}"
    token = args.token if args.token is not None else read_token(home)
    return url, token


def _render_mapping(data: dict[str, Any]) -> str:
    return _table(mapping_rows(data), ("key", "value"))


ClientAction = Callable[[Client, argparse.Namespace], Coroutine[Any, Any, Any]]
Renderer = Callable[[Any], str]


@dataclass(frozen=True)
class ClientCommand:
    help: str
    action: ClientAction
    render: Renderer | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


async def _health(client: Client, _args: argparse.Namespace) -> Any:
    return await client.health()


async def _ready(client: Client, _args: argparse.Namespace) -> Any:
    return await client.ready()


def _ready_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="keep asking until the node is up and ready, for at most this long",
    )


async def _info(client: Client, _args: argparse.Namespace) -> Any:
    return await client.node_info()


def _render_info(result: schemas.NodeInfo) -> str:
    rows: list[tuple[str, Any]] = [
        ("peerId", result.peer_id),
        ("version", result.version),
        ("mode", result.mode),
    ]
    rows += [("address", a) for a in result.addresses]
    reach = result.reachability
    rows.append(("reachability", reach.get("status", "?")))
    rows += [("confirmed address", a) for a in reach.get("confirmedAddresses", [])]
    rows += _dht_rows(result.dht)
    return _table(rows, ("key", "value"))


def _dht_rows(dht: schemas.DhtStatus) -> list[tuple[str, Any]]:
    if not dht.enabled:
        return [("dht", "disabled")]

    def when(unix: float | None) -> str:
        return "never" if unix is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))

    return [
        ("dht", f"{dht.protocol} ({'server' if dht.server else 'client'})"),
        ("dht routing table", f"{dht.routing_table} peers"),
        ("dht provider records", dht.provider_records),
        ("dht announced contexts", dht.announced_contexts),
        ("dht last bootstrap", when(dht.last_bootstrap)),
        ("dht last announcement", when(dht.last_announcement)),
    ]


async def _peers(client: Client, _args: argparse.Namespace) -> Any:
    return await client.peers()


def _render_peers(result: schemas.PeerList) -> str:
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
        for p in result.peers
    ]
    table = _table(
        rows, ("peer id", "address", "direction", "agent", "streams", "rtt ms", "topics")
    )
    listen = "\n".join(f"listening on {a}" for a in result.listen_addrs)
    return f"{table}\n{listen}" if listen else table


async def _topics(client: Client, _args: argparse.Namespace) -> Any:
    return await client.topics()


def _render_topics(result: schemas.TopicList) -> str:
    rows = [
        (
            t["topic"],
            "yes" if t["subscribed"] else "no",
            len(t["meshPeers"]),
            len(t["subscribers"]),
            " ".join(t["meshPeers"]) or "-",
        )
        for t in result.topics
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
    "ready": ClientCommand(
        "check that the node has started every service", _ready, arguments=_ready_args
    ),
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
        for name, help_text, action, render, arguments in [
            *CONTEXT_COMMANDS,
            *BLOB_COMMANDS,
            *TOKEN_COMMANDS,
        ]
    }
)


def _run_blocking_until_up(args: argparse.Namespace, action: ClientAction) -> Any:
    """`ready --wait S`: retry until the node answers ready, for scripts that just started
    one (its api.url may not exist yet). Polling is fine here: a person or a script waits."""
    deadline = time.monotonic() + args.wait
    while True:
        try:
            url, token = _api_target(args)
            with open_blocking_client(url, token, request_timeout=args.timeout) as client:
                return run_blocking(action(client, args))
        except (ApiError, ConfigError) as exc:
            if time.monotonic() >= deadline or getattr(exc, "status", None) in (401, 403):
                raise
        time.sleep(0.1)


def run_client_command(args: argparse.Namespace) -> int:
    name: str = args.client_command
    command = CLIENT_COMMANDS[name]
    action = command.action
    if getattr(args, "wait", None):
        result = _run_blocking_until_up(args, action)
        return _print_result(args, command, result)
    url, token = _api_target(args)
    if name in NEEDS_EVENT_LOOP:
        import trio  # noqa: PLC0415

        from trionode.client import open_client  # noqa: PLC0415

        async def go() -> Any:
            async with open_client(url, token, request_timeout=args.timeout) as client:
                return await action(client, args)

        result = trio.run(go)
    else:
        with open_blocking_client(url, token, request_timeout=args.timeout) as client:
            result = run_blocking(action(client, args))
    return _print_result(args, command, result)


def _print_result(args: argparse.Namespace, command: ClientCommand, result: Any) -> int:
    if result is None:  # streaming commands (watch) printed as they went
        return EXIT_OK
    if args.field is not None or args.json or command.render is None:
        # Typed answers (trionode.schemas) as the node sent them: camelCase JSON.
        result = msgspec.to_builtins(result)
    if args.field is not None:
        # `APP=$(trionode app install DIR --field applicationId)`: one value, for scripts.
        if not isinstance(result, dict) or args.field not in result:
            fields = ", ".join(sorted(result)) if isinstance(result, dict) else "none"
            raise UsageError(f"--field {args.field}: the result has no such field ({fields})")
        value = result[args.field]
        print(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        return EXIT_OK
    if args.json:
        print(json.dumps(result, indent=None, sort_keys=True, ensure_ascii=False))
    elif command.render is not None:
        print(command.render(result))
    elif isinstance(result, dict):
        print(_render_mapping(result))
    else:
        print(result)
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------


EXAMPLES: dict[str, str] = {
    "init": "trionode init --home ~/node-a --swarm-port 2428 --server-port 2528",
    "start": "TRIONODE_HOME=~/node-a trionode start --log-level DEBUG",
    "demo": "trionode demo --nodes 3",
    "invitation show": "trionode invitation show trinv1...",
    "health": "trionode health --api http://127.0.0.1:2528",
    "ready": "trionode ready --home ~/node-a --wait 30",
    "info": "trionode info --json",
    "peers": "trionode peers",
    "connect": "trionode connect /ip4/192.168.1.20/tcp/2428/p2p/12D3KooW...",
    "topics": "trionode topics",
    "app install": "APP=$(trionode app install apps/kv_store --field applicationId)",
    "app list": "trionode app list",
    "app show": "trionode app show APP_ID",
    "app uninstall": "trionode app uninstall APP_ID --force",
    "app keygen": "trionode app keygen --key ~/keys/apps.key",
    "app sign": "trionode app sign apps/kv_store --key ~/keys/apps.key",
    "context create": 'trionode context create APP_ID --args \'{"title": "notes"}\'',
    "context list": "trionode context list --json",
    "context show": "trionode context show CONTEXT",
    "context delete": "trionode context delete CONTEXT",
    "context invite": "trionode context invite CONTEXT --role read-only --expires 12h",
    "context join": "trionode context join trinv1... --home ~/node-b",
    "context sync": "trionode context sync CONTEXT",
    "context members": "trionode context members CONTEXT",
    "context remove": "trionode context remove CONTEXT MEMBER_KEY",
    "context role": "trionode context role CONTEXT MEMBER_KEY read-only",
    "context leave": "trionode context leave CONTEXT",
    "context upgrade": "trionode context upgrade CONTEXT NEW_APP_ID",
    "context revoke": "trionode context revoke CONTEXT trinv1...",
    "call": 'trionode call CONTEXT set --args \'{"key": "a", "value": "1"}\'',
    "watch": "trionode watch CONTEXT --since 41",
    "gc": "trionode gc",
    "blob add": "trionode blob add photo.jpg --context CONTEXT",
    "blob get": "trionode blob get BLOB_ID -o photo.jpg --context CONTEXT",
    "blob ls": "trionode blob ls",
    "blob show": "trionode blob show BLOB_ID",
    "blob rm": "trionode blob rm BLOB_ID",
    "blob pin": "trionode blob pin BLOB_ID",
    "blob unpin": "trionode blob unpin BLOB_ID",
    "token create": "trionode token create --context CONTEXT --scope call --expires 30d",
    "token ls": "trionode token ls",
    "token revoke": "trionode token revoke TOKEN_ID",
}
"""One example per command, shown at the end of its --help."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help; the epilog (the example) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default in (None, False, argparse.SUPPRESS)
            or "default" in text
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {default})".lstrip()


def _example(name: str) -> str | None:
    example = EXAMPLES.get(name)
    return None if example is None else f"example:\n  {example}"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first).

    Sub-commands get `--help` with every default and the command's example (EXAMPLES).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        if self.epilog is None and self.prog.startswith("trionode "):
            self.epilog = _example(self.prog.removeprefix("trionode "))

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trionode", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"trionode {__version__}")
    home = _Parser(add_help=False)
    home.add_argument(
        "--home",
        default=default_home(),
        help="node home directory (default: $TRIONODE_HOME, else .trionode)",
    )
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON document")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", parents=[home, as_json], help="create a node home")
    init.add_argument(
        "--swarm-port",
        type=int,
        default=DEFAULT_SWARM_PORT,
        help="TCP port for peers (network.listen); 0 picks a free one",
    )
    init.add_argument(
        "--server-port",
        type=int,
        default=DEFAULT_SERVER_PORT,
        help="API port on 127.0.0.1 (api.port); 0 picks a free one",
    )
    init.add_argument(
        "--force", action="store_true", help="replace an existing home (its data is deleted)"
    )
    init.add_argument(
        "--no-mdns", action="store_true", help="do not announce or look for peers by mDNS"
    )
    init.set_defaults(func=_node_command("cmd_init"))

    start = sub.add_parser("start", parents=[home], help="run the node until SIGINT/SIGTERM")
    start.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="overrides node.log_level in config.toml",
    )
    start.set_defaults(func=_node_command("cmd_start"))

    demo = sub.add_parser(
        "demo", parents=[as_json], help="run 3 nodes in this process and watch them converge"
    )
    demo.add_argument(
        "--nodes", type=int, default=3, choices=range(2, 9), metavar="N", help="nodes, 2 to 8"
    )
    demo.set_defaults(func=_node_command("cmd_demo"))

    add_invitation_commands(sub, _Parser(add_help=False, parents=[home, as_json]))

    client = _Parser(add_help=False, parents=[home, as_json])
    client.add_argument("--api", help="API base URL (default: read from --home)")
    client.add_argument("--token", help="bearer token (default: read from --home)")
    client.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    client.add_argument(
        "--field", metavar="NAME", help="print only this field of the result (for scripts)"
    )
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
    add_app_sign_commands(groups["app"], _Parser(add_help=False, parents=[home, as_json]))
    return parser


# -- the boundary: every error a user can cause becomes one line --------------------------


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [error]


def _explain(error: BaseException) -> tuple[str, int] | None:
    """The one line and exit status for an error a user can cause; None for a bug."""
    if isinstance(error, (ConfigError, WrongPassphraseError, UsageError)):
        return str(error), EXIT_USAGE
    if isinstance(error, TrionodeError):
        return str(error), EXIT_FAILURE
    if isinstance(error, OSError):  # the environment: permissions, a full disk, ...
        return str(error), EXIT_FAILURE
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    return None


def _stdout_closed() -> int:
    # The reader went away (`trionode context list | head -1`): not an error worth a line.
    # Point stdout at /dev/null so the interpreter's final flush does not fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_FAILURE


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The `trionode` command (`python -m trionode`, the installed script): `main`, then
    exit with its status.

    A command that did not load the node (every client command: `call`, `context join`,
    ...) ends with `os._exit` once its output is flushed: the interpreter's own shutdown
    (tearing down the ~500 modules httpx, Trio and the client load) took 0.15 s on a quiet
    machine and 0.5 s on a loaded one, after the answer was already printed, and a client
    command holds nothing else to release (its connections and files are closed by then).
    A node command (`start`, `init`, `demo`) exits as usual. (`cli_early.main`, the
    installed script's and `python -m trionode`'s, runs this.)"""
    code = main(argv)
    if "trionode.cli_node" not in sys.modules:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # (a reader gone since: `main` already said all it could)
            code = code or EXIT_FAILURE
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # prints --help: may meet a closed pipe too
        func: Callable[[argparse.Namespace], int] = args.func
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows up here for short outputs
    except BaseException as error:
        # Trio raises whatever fails inside a nursery as an ExceptionGroup, so plain
        # `except ConfigError` would miss it: look at the leaves. Only if every leaf is
        # something a user caused is the group one line; anything else is a bug and keeps
        # its traceback.
        leaves = _leaves(error)
        if any(isinstance(leaf, BrokenPipeError) for leaf in leaves):
            return _stdout_closed()
        reasons = [reason for reason in map(_explain, leaves) if reason is not None]
        if len(reasons) != len(leaves):
            raise
        message, status = reasons[0]
        return _fail(message, status)
    return code


if __name__ == "__main__":
    sys.exit(main())
