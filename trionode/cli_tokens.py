"""`trionode token create | ls | revoke`: scoped tokens for browser apps."""

from __future__ import annotations

import argparse
import time
from typing import Any

from trionode import schemas
from trionode.cli_contexts import (
    Spec,
    _duration as duration,  # the parser of invite --expires
    table,
)
from trionode.client import Client

SCOPES = ("read", "call")
"""As `trionode.api.tokens.SCOPES` (not imported: client commands never load the server)."""


async def _create(client: Client, args: argparse.Namespace) -> Any:
    return await client.create_token(args.context, args.scope, args.expires)


async def _list(client: Client, _args: argparse.Namespace) -> Any:
    return await client.tokens()


async def _revoke(client: Client, args: argparse.Namespace) -> Any:
    return await client.revoke_token(args.token_id)


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


def _render_created(result: schemas.TokenCreated) -> str:
    return (
        f"{result.token}\n"
        f"(id {result.id}, scope {result.scope}, expires {_when(result.expires_at)}; "
        "this is the only time the token is shown)"
    )


def _render_list(result: schemas.TokenList) -> str:
    rows = [
        (
            t.id,
            t.scope,
            "expired" if t.expired else _when(t.expires_at),
            ", ".join(t.contexts),
        )
        for t in result.tokens
    ]
    return table(rows, ("id", "scope", "expires", "contexts"))


def _create_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--context", action="append", required=True, help="a context id (repeat for more)"
    )
    parser.add_argument("--scope", choices=SCOPES, required=True, help="read: events and views")
    parser.add_argument(
        "--expires", type=duration, help="lifetime such as 30d, 12h or 45m (default: never)"
    )


def _revoke_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("token_id", help="the id shown by `token ls`")


COMMANDS: list[Spec] = [
    (
        "token create",
        "make a token that only reaches JSON-RPC and events of the named contexts",
        _create,
        _render_created,
        _create_args,
    ),
    ("token ls", "list scoped tokens (never the tokens themselves)", _list, _render_list, None),
    ("token revoke", "revoke a scoped token by id", _revoke, None, _revoke_args),
]
