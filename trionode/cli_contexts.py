"""Client commands for applications, contexts, calls, events and GC (`trionode app …` etc.)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Final

from trionode import schemas
from trionode.cli_early import JOIN_PATH, EarlyJoin, claim
from trionode.client import ApiError, Client

if TYPE_CHECKING:
    from trionode.cli_progress import ProgressLine

PROGRESS_POLL: Final = 0.2
"""Seconds between checks for the joined context (its snapshot's progress follows)."""

Action = Callable[[Client, argparse.Namespace], Coroutine[Any, Any, Any]]
Spec = tuple[
    str, str, Action, Callable[[Any], str] | None, Callable[[argparse.ArgumentParser], None] | None
]


def cell(value: object) -> str:
    """One value as people read it: no Python reprs, no escaped Unicode."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def iso_time(unix_seconds: float) -> str:
    """`2026-12-06T01:52:03Z` (UTC, to the second)."""
    moment = dt.datetime.fromtimestamp(unix_seconds, dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def mapping_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    """A JSON object as (key, value) rows; `…At` times (Unix seconds) shown as ISO 8601."""
    return [
        (
            key,
            iso_time(value)
            if key.endswith("At") and isinstance(value, int | float) and not isinstance(value, bool)
            else cell(value),
        )
        for key, value in data.items()
    ]


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Rows as aligned text columns (the CLI's default output)."""
    cells = [[str(h) for h in headers], *[[cell(c) for c in row] for row in rows]]
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


_BASE58: Final = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def context_id_text(text: str) -> str:
    """An argparse type: what a context id looks like (32 bytes in base58)."""
    if not 32 <= len(text) <= 44 or not set(text) <= _BASE58:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a context id (base58, as `trionode context list` prints)"
        )
    return text


def sequence_number(text: str) -> int:
    """An argparse type: an event sequence number (an integer ≥ 0)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text!r}")
    return value


# -- applications ---------------------------------------------------------------------------


async def _app_install(client: Client, args: argparse.Namespace) -> Any:
    # The node reads the bundle itself, so give it an absolute path.
    return await client.install_application(os.path.abspath(args.path))  # noqa: ASYNC240 - no I/O


async def _app_list(client: Client, _args: argparse.Namespace) -> Any:
    return await client.applications()


async def _app_show(client: Client, args: argparse.Namespace) -> Any:
    return await client.application(args.application_id)


async def _app_uninstall(client: Client, args: argparse.Namespace) -> Any:
    return await client.uninstall_application(args.application_id, force=args.force)


def _render_uninstalled(result: schemas.Uninstalled) -> str:
    stranded = result.contexts
    note = f" ({len(stranded)} context(s) used it: {cell(stranded)})" if stranded else ""
    return f"uninstalled {result.uninstalled}{note}"


def _signature(entry: schemas.EntryPoint) -> str:
    params = ", ".join(
        f"{p.name}: {p.type}" + ("" if p.required else " = ...") for p in entry.params
    )
    return f"{entry.name}({params}) -> {entry.returns}"


def _render_app(a: schemas.ApplicationDetail) -> str:
    lines = [
        f"application id  {a.application_id}",
        f"name            {a.name} {a.version}",
        f"installed       {iso_time(a.installed_at)} from {a.path}",
        "state:",
        *[f"  {name}: {kind}" for name, kind in a.state.items()],
    ]
    titles = {"init": "init", "method": "methods", "view": "views", "handler": "event handlers"}
    for kind, title in titles.items():
        entries = [e for e in a.entry_points if e.kind == kind]
        if not entries:
            continue
        lines.append(f"{title}:")
        for e in entries:
            on = f"  (on {', '.join(e.events)})" if e.events else ""
            lines.append(f"  {_signature(e)}{on}")
            lines += [f"      {line}" for line in e.doc.splitlines()]
    return "\n".join(lines)


def _render_apps(result: schemas.ApplicationList) -> str:
    rows = [
        (a.application_id, a.name, a.version, iso_time(a.installed_at), a.path)
        for a in result.applications
    ]
    if not rows:
        return "no applications (install one with `trionode app install PATH`)"
    return table(rows, ("application id", "name", "version", "installed", "from"))


# -- contexts -------------------------------------------------------------------------------


async def _context_create(client: Client, args: argparse.Namespace) -> Any:
    return await client.create_context(args.application_id, args.args)


async def _context_list(client: Client, _args: argparse.Namespace) -> Any:
    return await client.contexts()


async def _context_show(client: Client, args: argparse.Namespace) -> Any:
    return await client.context(args.context_id)


async def _context_delete(client: Client, args: argparse.Namespace) -> Any:
    return await client.delete_context(args.context_id)


def _render_contexts(result: schemas.ContextList) -> str:
    rows = [
        (c.context_id, c.application_id, len(c.heads), c.root_hash[:16], len(c.members))
        for c in result.contexts
    ]
    return table(rows, ("context id", "application id", "heads", "root hash", "members"))


def _render_context(c: schemas.Context) -> str:
    lines = [
        f"context id      {c.context_id}",
        f"application id  {c.application_id}",
        f"root hash       {c.root_hash}",
        f"heads           {', '.join(c.heads) or '-'}",
        f"our member      {c.member_public_key}",
        "members:",
    ]
    lines += [f"  {m.public_key}  {m.role}" for m in c.members]
    if c.waiting_for_app is not None:
        lines.append(f"waiting         {c.waiting_for_app}")
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


def _render_invitation(result: schemas.InvitationText) -> str:
    return result.invitation


async def _join(client: Client, args: argparse.Namespace) -> Any:
    """Join, showing the snapshot's progress (entries, bytes, rate, ETA) on stderr while the
    node takes it: one updating line on a terminal, plain lines otherwise."""
    import trio  # noqa: PLC0415 - `context join` runs under trio (cli.NEEDS_EVENT_LOOP)

    from trionode.cli_progress import ProgressLine  # noqa: PLC0415

    early = claim(
        invitation=args.invitation,
        home=args.home,
        api=args.api,
        token=args.token,
        timeout=args.timeout,
        trust_app=args.trust_app,
    )

    async def join() -> schemas.Context:
        if early is None:
            return await client.join(args.invitation, trust_app=args.trust_app)
        return await _early_answer(early)

    context_id = _invited_context(args.invitation)
    if context_id is None:  # the node says what is wrong with it
        return await join()
    line = ProgressLine()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_follow_snapshot, client, context_id, line)
            result = await join()
            nursery.cancel_scope.cancel()
        if not line.finished:
            await _last_progress(client, context_id, line)
    finally:
        line.close()
    return result


async def _last_progress(client: Client, context_id: str, line: ProgressLine) -> None:
    """Show the snapshot's last word, which the follower has not shown: a join shorter
    than the command's start-up (its request went out before: cli_early.py) can be over
    before the follower subscribed, and the notices on the WebSocket may come after the
    join's answer. The node keeps a context's latest progress for a new subscriber."""
    import trio  # noqa: PLC0415

    from trionode.config import JOIN_LAST_PROGRESS_TIMEOUT  # noqa: PLC0415

    with trio.move_on_after(JOIN_LAST_PROGRESS_TIMEOUT):
        try:
            latest = await client.latest_notice(context_id, "snapshot_progress")
        except ApiError:
            return  # progress is a courtesy: the join's own answer is what counts
        if latest is not None:
            line.show(latest)


async def _early_answer(early: EarlyJoin) -> schemas.Context:
    """The answer to the join `python -m trionode` sent before the CLI loaded
    (trionode/cli_early.py), as `Client.join` gives it."""
    import trio  # noqa: PLC0415

    from trionode.client.http import answer_of  # noqa: PLC0415

    await trio.to_thread.run_sync(early.done.wait, abandon_on_cancel=True)
    if early.status is None:
        if isinstance(early.error, TimeoutError):
            raise ApiError(f"{early.url}: timed out")
        raise ApiError(f"cannot reach node at {early.url}: {early.error}")
    url = early.url.rstrip("/") + JOIN_PATH
    return answer_of(url, early.status, early.body, schemas.Context)


def _invited_context(text: str) -> str | None:
    from trionode.cli_invitations import describe_invitation  # noqa: PLC0415
    from trionode.errors import TrionodeError  # noqa: PLC0415

    try:
        context_id: str = describe_invitation(text)["contextId"]
    except TrionodeError:  # not an invitation, damaged: the node's answer says so
        return None
    return context_id


async def _follow_snapshot(client: Client, context_id: str, line: ProgressLine) -> None:
    """Show the join's snapshot progress: the context exists on the node as soon as the
    invitation is accepted, and its first sync (the snapshot) starts then."""
    import trio  # noqa: PLC0415

    try:
        while True:
            try:
                await client.context(context_id)
                break
            except ApiError:
                await trio.sleep(PROGRESS_POLL)
        async with aclosing(client.notices(context_id, "snapshot_progress")) as notices:
            async for notice in notices:
                line.show(notice)
    except ApiError:
        return  # progress is a courtesy: the join's own answer is what counts


async def _sync(client: Client, args: argparse.Namespace) -> Any:
    return await client.sync(args.context_id)


async def _members(client: Client, args: argparse.Namespace) -> Any:
    return await client.members(args.context_id)


def _render_members(result: schemas.MemberList) -> str:
    return table([(m.public_key, m.role) for m in result.members], ("member", "role"))


async def _remove(client: Client, args: argparse.Namespace) -> Any:
    return await client.remove_member(args.context_id, args.member)


async def _set_role(client: Client, args: argparse.Namespace) -> Any:
    return await client.set_role(args.context_id, args.member, args.role)


async def _leave(client: Client, args: argparse.Namespace) -> Any:
    return await client.leave(args.context_id)


async def _upgrade(client: Client, args: argparse.Namespace) -> Any:
    return await client.upgrade_context(args.context_id, args.application_id)


def _render_upgraded(result: schemas.Upgraded) -> str:
    migration = result.migration_delta_id or "none (no @app.migrate, or it wrote nothing)"
    return (
        f"application {result.application_id}\nupgrade   {result.delta_id}\nmigration {migration}"
    )


def _upgrade_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "context_id", metavar="CONTEXT", help="context id (base58; `trionode context list`)"
    )
    p.add_argument(
        "application_id",
        metavar="APP_ID",
        help="the newer version, installed (`trionode app list`)",
    )


async def _revoke(client: Client, args: argparse.Namespace) -> Any:
    return await client.revoke_invitation(args.context_id, args.invitation)


def _role_args(p: argparse.ArgumentParser) -> None:
    _remove_args(p)
    p.add_argument("role", choices=["admin", "member", "read-only"], help="the new role")


def _revoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "context_id", metavar="CONTEXT", help="context id (base58; `trionode context list`)"
    )
    p.add_argument("invitation", metavar="INVITATION", help="the trinv1... string to revoke")


def _invite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "context_id", metavar="CONTEXT", help="context id (base58; `trionode context list`)"
    )
    p.add_argument(
        "--role",
        default="member",
        choices=["admin", "member", "read-only"],
        help="the role the invitee gets",
    )
    p.add_argument(
        "--expires", type=_duration, default="7d", help="how long it can be used: 90s, 15m, 12h, 7d"
    )


def _join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("invitation", metavar="INVITATION", help="the trinv1... string")
    p.add_argument(
        "--trust-app",
        metavar="APP_ID",
        help="run this app (fetched from the inviter) even though no signer in "
        "apps.trusted_signers signed it: check it first with `trionode invitation show`",
    )


def _remove_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "context_id", metavar="CONTEXT", help="context id (base58; `trionode context list`)"
    )
    p.add_argument("member", metavar="MEMBER", help="member public key (base58)")


# -- calls, events, gc ------------------------------------------------------------------------


async def _call(client: Client, args: argparse.Namespace) -> Any:
    return await client.call(args.context_id, args.method, args.args or {})


def _render_call(result: schemas.CallResult) -> str:
    # The result on stdout (so `$(trionode call …)` is just the value); what the call did to
    # the context is a diagnostic, on stderr.
    delta = result.delta_id or "none (nothing written)"
    print(f"delta {delta}\nroot  {result.root_hash}", file=sys.stderr)
    return json.dumps(result.output, indent=2, sort_keys=True, ensure_ascii=False)


async def _watch(client: Client, args: argparse.Namespace) -> Any:
    async for event in client.watch(args.context_id, since=args.since):
        if args.json:
            print(json.dumps(event, sort_keys=True, ensure_ascii=False), flush=True)
        else:
            names = ", ".join(e["name"] for e in event["events"]) or "no events"
            print(
                f"#{event['seq']} {event['contextId']} delta {event['deltaId'][:16]} "
                f"root {event['rootHash'][:16]} ({event['origin']}): {names}",
                flush=True,
            )
            for e in event["events"]:
                payload = json.dumps(e["payload"], sort_keys=True, ensure_ascii=False)
                print(f"    {e['name']} {payload}", flush=True)
    print("trionode: the node closed the event stream", file=sys.stderr)
    return None


async def _gc(client: Client, _args: argparse.Namespace) -> Any:
    return await client.collect_garbage()


# -- argument setup ---------------------------------------------------------------------------


def _path_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="bundle directory, .tar.gz or .zip")


def _app_id_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("application_id", metavar="APP_ID", help="application id (`trionode app list`)")


def _uninstall_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("application_id", metavar="APP_ID", help="application id (`trionode app list`)")
    p.add_argument(
        "--force", action="store_true", help="even if contexts use it (they stop working)"
    )


def _create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("application_id", metavar="APP_ID", help="application id (`trionode app list`)")
    p.add_argument("--args", type=json_object, help="JSON object of arguments for the app's init")


def _context_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "context_id", metavar="CONTEXT", help="context id (base58; `trionode context list`)"
    )


def _call_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "context_id", metavar="CONTEXT", help="context id (base58; `trionode context list`)"
    )
    p.add_argument("method", metavar="METHOD", help="a method or view of the context's app")
    p.add_argument(
        "--args", type=json_object, help='JSON object of arguments, e.g. \'{"key": "a"}\''
    )


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "context_id",
        metavar="CONTEXT",
        type=context_id_text,
        help="context id (base58; `trionode context list`)",
    )
    p.add_argument(
        "--since", type=sequence_number, help="replay events after this sequence number first"
    )


COMMANDS: list[Spec] = [
    (
        "app install",
        "install an application bundle from a local path",
        _app_install,
        None,
        _path_arg,
    ),
    ("app list", "list installed applications", _app_list, _render_apps, None),
    (
        "app show",
        "show an installed application: its state, methods and views with their parameters",
        _app_show,
        _render_app,
        _app_id_arg,
    ),
    (
        "app uninstall",
        "remove an installed application (refused while a context uses it, unless --force)",
        _app_uninstall,
        _render_uninstalled,
        _uninstall_args,
    ),
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
    (
        "context role",
        "give MEMBER of CONTEXT a new ROLE (admins only)",
        _set_role,
        None,
        _role_args,
    ),
    ("context leave", "leave CONTEXT (its last admin cannot)", _leave, None, _context_arg),
    (
        "context upgrade",
        "move CONTEXT to APP_ID, a newer version of its app (admins only)",
        _upgrade,
        _render_upgraded,
        _upgrade_args,
    ),
    (
        "context revoke",
        "revoke an unused INVITATION to CONTEXT (admins only)",
        _revoke,
        None,
        _revoke_args,
    ),
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
