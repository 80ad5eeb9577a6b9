"""`trionode invitation show INVITATION`: what an invitation says, without joining.

It runs offline (no node, no API): the string carries everything, signed by the inviting
admin. The signature is checked, so what is shown is what that admin wrote; whether the
admin still has the right to invite is only known to the context's members, at join time.

It also shows the context's app as the invitation describes it (id, name, version, signer):
what `context join` will fetch and run if the app is not installed, and what to check
before trusting it with `--trust-app`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Any

from trionode.cli_contexts import table

EXIT_OK = 0


def _b58(raw: bytes) -> str:
    import base58  # noqa: PLC0415 - see describe_invitation

    return base58.b58encode(raw).decode("ascii")


def describe_invitation(text: str, *, now: float | None = None) -> dict[str, Any]:
    """The invitation's fields as a JSON-ready document.

    Raises:
        InvitationError: not an invitation, damaged, or its signature does not verify.
    """
    # Imported here: `trionode.cli` registers this command for every run, and the
    # invitation code loads the crypto libraries that other client commands must not pay for.
    from trionode.context.invitations import parse_invitation  # noqa: PLC0415

    signed, invitation = parse_invitation(text)
    now = time.time() if now is None else now
    app = invitation.app
    expires = dt.datetime.fromtimestamp(invitation.expires_at, dt.UTC)
    return {
        "contextId": _b58(invitation.context_id),
        "applicationId": _b58(invitation.application_id),
        "role": invitation.role,
        "expiresAt": expires.isoformat(timespec="seconds"),
        "expired": invitation.expires_at < now,
        "inviter": _b58(invitation.inviter),
        "inviterPeer": invitation.inviter_peer,
        "addresses": list(invitation.inviter_addrs),
        "invitee": None if invitation.invitee is None else _b58(invitation.invitee),
        "oneTimeSecret": signed.secret is not None,
        "invitationId": _b58(invitation.id),
        "app": None
        if app is None
        else {
            "applicationId": _b58(app.application_id),
            "name": app.name,
            "version": app.version,
            "signer": None if app.signer is None else _b58(app.signer),
            "bundleBlobId": _b58(app.bundle_blob_id),
        },
    }


def _render(doc: dict[str, Any]) -> str:
    invitee = doc["invitee"] or "whoever holds it (one use)"
    expires = f"{doc['expiresAt']}{' (EXPIRED)' if doc['expired'] else ''}"
    rows: list[tuple[str, str]] = [
        ("context", doc["contextId"]),
        ("application", doc["applicationId"]),
        *_app_rows(doc["app"]),
        ("role", doc["role"]),
        ("expires", expires),
        ("inviter", doc["inviter"]),
        ("inviter peer", doc["inviterPeer"]),
        ("for", invitee),
    ]
    rows += [("address", a) for a in doc["addresses"]] or [("address", "none (unreachable)")]
    return table(rows, ("field", "value"))


def _app_rows(app: dict[str, Any] | None) -> list[tuple[str, str]]:
    if app is None:
        return [("app", "not described (install it before joining)")]
    return [
        ("app", f"{app['name']} v{app['version']}"),
        ("app signer", app["signer"] or "unsigned"),
        ("app bundle", app["bundleBlobId"]),
    ]


def cmd_invitation_show(args: argparse.Namespace) -> int:
    doc = describe_invitation(args.invitation)  # InvitationError: one line from cli.main
    print(json.dumps(doc, sort_keys=True) if args.json else _render(doc))
    return EXIT_OK


def add_invitation_commands(
    sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Register `trionode invitation show` on the top-level sub-parsers."""
    group = sub.add_parser("invitation", help="invitation commands (offline)")
    leaves = group.add_subparsers(dest="invitation_command", required=True, metavar="COMMAND")
    show = leaves.add_parser(
        "show", parents=[common], help="decode an invitation (context, role, expiry, addresses)"
    )
    show.add_argument("invitation", metavar="INVITATION", help="the trinv1... string")
    show.set_defaults(func=cmd_invitation_show)
