"""Client commands for applications, contexts, calls, events and GC (`trionode app …` etc.)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from trionode.client import Client

Action = Callable[[Client, argparse.Namespace], Coroutine[Any, Any, Any]]
Spec = tuple[
    str, str, Action, Callable[[Any], str] | None, Callable[[argparse.ArgumentParser], None] | None
]


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Rows as aligned text columns (the CLI's default output)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (`--args '{"key": "a"}'`)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number"
        )
        raise argparse.ArgumentTypeError(
            f"must be a JSON object like '{{\"key\": 1}}', not {kind}: {text!r}"
        )
    return value


# -- applications ---------------------------------------------------------------------------


async def _app_install(client: Client, args: argparse.Namespace) -> Any:
    # The node reads the bundle itself, so give it an absolute path.
    return await client.install_application(os.path.abspath(args.path))  # noqa: ASYNC240 - no I/O


async def _app_list(client: Client, _args: argparse.Namespace) -> Any:
    return await client.applications()


async def _app_show(client: Client, args: argparse.Namespace) -> Any:
    return await client.application(args.application_id)


def _render_apps(result: Any) -> str:
    rows = [
        (a["applicationId"], a["name"], a["version"], a["path"]) for a in result["applications"]
    ]
    return table(rows, ("application id", "name", "version", "installed from"))


# -- contexts -------------------------------------------------------------------------------


async def _context_create(client: Client, args: argparse.Namespace) -> Any:
    return await client.create_context(args.application_id, args.args)


async def _context_list(client: Client, _args: argparse.Namespace) -> Any:
    return await client.contexts()


async def _context_show(client: Client, args: argparse.Namespace) -> Any:
    return await client.context(args.context_id)


async def _context_delete(client: Client, args: argparse.Namespace) -> Any:
    return await client.delete_context(args.context_id)


def _render_contexts(result: Any) -> str:
    rows = [
        (c["contextId"], c["applicationId"], len(c["heads"]), c["rootHash"][:16], len(c["members"]))
        for c in result["contexts"]
    ]
    return table(rows, ("context id", "application id", "heads", "root hash", "members"))


def _render_context(c: Any) -> str:
    lines = [
        f"context id      {c['contextId']}",
        f"application id  {c['applicationId']}",
        f"root hash       {c['rootHash']}",
        f"heads           {', '.join(c['heads']) or '-'}",
        f"our member      {c['memberPublicKey']}",
        "members:",
    ]
    lines += [f"  {m['publicKey']}  {m['role']}" for m in c["members"]]
    return "\n".join(lines)


# -- members and invitations ----------------------------------------------------------------


def _duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `7d` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (e.g. 90s, 15m, 12h, 7d)"
        ) from None


async def _invite(client: Client, args: argparse.Namespace) -> Any:
    return await client.invite(args.context_id, role=args.role, expires_in=args.expires)


def _render_invitation(result: Any) -> str:
    return str(result["invitation"])


async def _join(client: Client, args: argparse.Namespace) -> Any:
    return await client.join(args.invitation)


async def _sync(client: Client, args: argparse.Namespace) -> Any:
    return await client.sync(args.context_id)


async def _members(client: Client, args: argparse.Namespace) -> Any:
    return await client.members(args.context_id)


def _render_members(result: Any) -> str:
    return table([(m["publicKey"], m["role"]) for m in result["members"]], ("member", "role"))


async def _remove(client: Client, args: argparse.Namespace) -> Any:
    return await client.remove_member(args.context_id, args.member)


def _invite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context_id", metavar="CONTEXT")
    p.add_argument("--role", default="member", choices=["admin", "member", "read-only"])
    p.add_argument("--expires", type=_duration, default=7 * 86400.0, help="e.g. 12h, 7d")


def _join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("invitation", metavar="INVITATION", help="the trinv1... string")


def _remove_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context_id", metavar="CONTEXT")
    p.add_argument("member", metavar="MEMBER", help="member public key (base58)")


# -- calls, events, gc ------------------------------------------------------------------------


async def _call(client: Client, args: argparse.Namespace) -> Any:
    return await client.call(args.context_id, args.method, args.args or {})


def _render_call(result: Any) -> str:
    output = json.dumps(result["output"], indent=2, sort_keys=True)
    delta = result["deltaId"] or "none (read-only)"
    return f"{output}\ndelta {delta}\nroot  {result['rootHash']}"


async def _watch(client: Client, args: argparse.Namespace) -> Any:
    async for event in client.watch(args.context_id, since=args.since):
        if args.json:
            print(json.dumps(event, sort_keys=True), flush=True)
        else:
            names = ", ".join(e["name"] for e in event["events"]) or "no events"
            print(
                f"#{event['seq']} {event['contextId']} delta {event['deltaId'][:16]} "
                f"root {event['rootHash'][:16]} ({event['origin']}): {names}",
                flush=True,
            )
            for e in event["events"]:
                print(f"    {e['name']} {json.dumps(e['payload'], sort_keys=True)}", flush=True)
    print("trionode: the node closed the event stream", file=sys.stderr)
    return None


async def _gc(client: Client, _args: argparse.Namespace) -> Any:
    return await client.collect_garbage()


# -- argument setup ---------------------------------------------------------------------------


def _path_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="bundle directory, .tar.gz or .zip")


def _app_id_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("application_id", metavar="APP_ID")


def _create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("application_id", metavar="APP_ID")
    p.add_argument("--args", type=json_object, help="JSON object of arguments for the app's init")


def _context_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("context_id", metavar="CONTEXT")


def _call_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context_id", metavar="CONTEXT")
    p.add_argument("method", metavar="METHOD")
    p.add_argument(
        "--args", type=json_object, help='JSON object of arguments, e.g. \'{"key": "a"}\''
    )


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context_id", metavar="CONTEXT")
    p.add_argument("--since", type=int, help="replay events after this sequence number first")


COMMANDS: list[Spec] = [
    (
        "app install",
        "install an application bundle from a local path",
        _app_install,
        None,
        _path_arg,
    ),
    ("app list", "list installed applications", _app_list, _render_apps, None),
    ("app show", "show one installed application", _app_show, None, _app_id_arg),
    ("context create", "create a context running APP_ID", _context_create, None, _create_args),
    ("context list", "list contexts", _context_list, _render_contexts, None),
    (
        "context show",
        "show a context's app, root hash, heads and members",
        _context_show,
        _render_context,
        _context_arg,
    ),
    (
        "context delete",
        "delete a context and its data from this node",
        _context_delete,
        None,
        _context_arg,
    ),
    (
        "context invite",
        "print an invitation to CONTEXT (one-time, signed by us)",
        _invite,
        _render_invitation,
        _invite_args,
    ),
    (
        "context join",
        "join a context with an invitation string",
        _join,
        _render_context,
        _join_args,
    ),
    ("context sync", "sync CONTEXT with a member peer now", _sync, None, _context_arg),
    (
        "context members",
        "list CONTEXT's members and roles",
        _members,
        _render_members,
        _context_arg,
    ),
    ("context remove", "remove MEMBER from CONTEXT (rotates the key)", _remove, None, _remove_args),
    ("call", "call METHOD of CONTEXT with --args JSON", _call, _render_call, _call_args),
    (
        "watch",
        "print CONTEXT's applied deltas and app events as they happen",
        _watch,
        None,
        _watch_args,
    ),
    ("gc", "run garbage collection once", _gc, None, None),
]
