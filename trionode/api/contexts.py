"""Routes for applications, contexts, JSON-RPC calls and the WebSocket.

Ids in the API: context ids, application ids and member keys are base58; delta ids and root
hashes are hex.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import base58
import msgspec
import trio
from quart import Response, g, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge

from trionode import schemas
from trionode.api.context_errors import JSONRPC_FORBIDDEN, http_status, jsonrpc_code
from trionode.api.jsonio import BadInput, typed
from trionode.api.openapi import Operations, Query, reply, typed_body
from trionode.api.sse import EventRequestError, event_stream_response
from trionode.api.tokens import Principal
from trionode.api.ws import serve_websocket
from trionode.blobs.calls import BlobCalls
from trionode.config import ApiSection
from trionode.context.errors import AlreadyExists, ContextError, PeerFailed
from trionode.context.events import EventHub
from trionode.context.finality import finality_json
from trionode.context.invitations import InvitationError, parse_invitation
from trionode.context.join import JoinService
from trionode.context.manager import ContextManager, b58
from trionode.context.records import ApplicationRecord, ContextRecord
from trionode.context.sync import PeerSyncStatus, SyncManager
from trionode.errors import (
    PeerError,
    ProtocolError,
    ReadOnlyError,
    StorageError,
    TrionodeError,
    describe,
)
from trionode.sdk.app import EntryKind
from trionode.sdk.errors import AppError
from trionode.wire.keys import PeerId

log = logging.getLogger(__name__)

JSONRPC_PARSE_ERROR = -32700
JSONRPC_INVALID_REQUEST = -32600
JSONRPC_METHOD_NOT_FOUND = -32601
JSONRPC_INVALID_PARAMS = -32602
JSONRPC_READ_ONLY = -32003
JSONRPC_INTERNAL = -32603
MAX_JSONRPC_ID_LENGTH: Final = 256
MAX_BUNDLE_NAME: Final = 255


class Applications(Protocol):
    async def install(self, path: str) -> ApplicationRecord: ...
    async def install_packed(self, data: bytes, source: str) -> ApplicationRecord: ...
    async def installed(self) -> list[ApplicationRecord]: ...
    async def get(self, application_id: bytes) -> ApplicationRecord: ...
    async def load(self, application_id: bytes) -> Any: ...
    async def uninstall(self, application_id: bytes) -> ApplicationRecord: ...


class ContextApi(Protocol):
    @property
    def contexts(self) -> ContextManager: ...

    @property
    def joins(self) -> JoinService: ...

    @property
    def sync(self) -> SyncManager: ...

    @property
    def applications(self) -> Applications: ...

    @property
    def hub(self) -> EventHub: ...

    @property
    def blob_calls(self) -> BlobCalls: ...

    def knows_context(self, context_id_b58: str) -> bool: ...

    async def collect_garbage(self) -> dict[str, int]: ...


def parse_id(text: object, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise ContextError(f"{what} must be a base58 string")
    try:
        raw = base58.b58decode(text)
    except ValueError:
        raise ContextError(f"{what} {text!r} is not base58") from None
    if len(raw) != 32:
        raise ContextError(f"{what} {text!r} is not 32 bytes")
    return raw


def member_reply(member: Any) -> schemas.Member:
    return schemas.Member(public_key=b58(member.public_key), role=member.role)


def context_reply(
    record: ContextRecord, waits: Mapping[bytes, str] | None = None
) -> schemas.Context:
    return schemas.Context(
        context_id=b58(record.context_id),
        application_id=b58(record.application_id),
        created_at=record.created_at,
        root_hash=record.root_hash.hex(),
        heads=[h.hex() for h in record.heads],
        members=[member_reply(m) for m in record.members],
        member_public_key=b58(record.our_member),
        waiting_for_app=None if waits is None else waits.get(record.context_id),
    )


def application_reply(record: ApplicationRecord) -> schemas.Application:
    return schemas.Application(
        application_id=b58(record.application_id),
        name=record.name,
        version=record.version,
        path=record.path,
        installed_at=record.installed_at,
        trusted=record.trusted,
        bundle_blob_id=None if record.bundle_blob_id is None else b58(record.bundle_blob_id),
        signer=None if record.signer is None else b58(record.signer),
    )


def application_detail(record: ApplicationRecord, app: Any) -> schemas.ApplicationDetail:
    """What an app offers callers: its state fields and entry points, with parameter types
    and docstrings (`app show`)."""
    description = app.describe()
    entries = {e.name: e for e in app.entry_points()}
    return schemas.ApplicationDetail(
        **msgspec.structs.asdict(application_reply(record)),
        state=description["state"],
        entry_points=[
            msgspec.convert(
                {**entry, "doc": inspect.getdoc(entries[entry["name"]].fn) or ""},
                schemas.EntryPoint,
            )
            for entry in description["entry_points"]
        ],
    )


def peer_sync_json(
    peer: PeerId, status: PeerSyncStatus | None, *, connected: bool
) -> dict[str, Any]:
    """One peer's line of `GET /admin-api/contexts/ID/sync` (times: Unix seconds)."""
    out: dict[str, Any] = {
        "peerId": str(peer),
        "connected": connected,
        "lastAttemptAt": None,
        "outcome": None,
        "lastSync": None,
        "lastError": None,
    }
    if status is None:
        return out
    out.update(lastAttemptAt=status.last_attempt, outcome=status.outcome)
    if status.last_success is not None:
        out["lastSync"] = {
            "at": status.last_success,
            "protocol": status.protocol,
            "deltas": status.deltas,
        }
    if status.last_error is not None:
        out["lastError"] = {"at": status.last_error_at, "message": status.last_error}
    return out


def _error(status: int, message: str, **extra: Any) -> Response:
    response = jsonify({"error": {"code": status, "message": message, **extra}})
    response.status_code = status
    return response


def _rpc_error(request_id: Any, code: int, message: str, data: Any = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return jsonify({"jsonrpc": "2.0", "id": request_id, "error": error})


def _valid_jsonrpc_id(value: object) -> bool:
    # JSON-RPC 2.0: a string, a number or null. We also bound strings, since ids are echoed.
    if isinstance(value, str):
        return len(value) <= MAX_JSONRPC_ID_LENGTH
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return math.isfinite(value)
    return value is None


def _call_params(
    params: dict[str, Any], decode: Callable[[str], Any]
) -> tuple[bytes, str, str, bytes | None]:
    call = typed(params, schemas.ExecuteParams, "params")
    context_id = parse_id(call.context_id, "contextId")
    if isinstance(call.args_json, str):
        # The app parses it again: refuse here what our decoder refuses anywhere, and
        # anything but an object (arguments are by name).
        typed(decode(call.args_json), dict[str, Any], "params.argsJson")
        args_json = call.args_json
    else:
        args_json = json.dumps(call.args_json)
    executor = (
        None
        if call.executor_public_key is None
        else parse_id(call.executor_public_key, "executorPublicKey")
    )
    return context_id, call.method, args_json, executor


async def _is_view(node: ContextApi, context_id: bytes, method: str) -> bool:
    app = await node.contexts.running_app(context_id, method)
    entry = app.entry(method)
    return entry is not None and entry.kind is EntryKind.VIEW


def register_context_routes(
    app: QuartTrio, node: ContextApi, settings: ApiSection, ops: Operations
) -> None:
    @app.errorhandler(ContextError)
    async def context_error(exc: ContextError) -> Response:  # noqa: ASYNC124
        return _error(http_status(exc), str(exc))

    # -- applications ----------------------------------------------------------------------

    @ops.route(
        app,
        "POST",
        "/admin-api/applications",
        summary="Install an application bundle (validated completely)",
        tag="applications",
        body=schemas.InstallRequest,
        returns=schemas.Application,
        errors=(400,),
    )
    async def install_application() -> Response:
        body = await typed_body(schemas.InstallRequest)
        return reply(application_reply(await node.applications.install(body.path)))

    @ops.route(
        app,
        "POST",
        "/admin-api/applications/bundle",
        summary="Install an application from its archive, sent as the body",
        tag="applications",
        body_content="application/octet-stream",
        returns=schemas.Application,
        errors=(400, 413),
        query=(Query("name", "a name for the uploaded archive"),),
    )
    async def upload_application() -> Response:
        # The body is the archive itself (what a browser sends for a chosen file). Quart
        # refuses it past api.max_request_body while it arrives (Content-Length first);
        # the bundle reader then applies the bundle limits.
        name = request.args.get("name") or "uploaded bundle"
        if len(name) > MAX_BUNDLE_NAME:
            raise ContextError(f"name is longer than {MAX_BUNDLE_NAME} characters")
        try:
            data = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        except RequestEntityTooLarge:
            return _error(
                413,
                f"the bundle is larger than api.max_request_body ({settings.max_request_body} "
                "bytes); install it by path instead",
            )
        if not data:
            raise ContextError("the body must be a bundle archive (.tar.gz, .tar or .zip)")
        record = await node.applications.install_packed(data, f"upload:{name}")
        return reply(application_reply(record))

    @ops.route(
        app,
        "GET",
        "/admin-api/applications",
        summary="List installed applications",
        tag="applications",
        returns=schemas.ApplicationList,
    )
    async def list_applications() -> Response:
        records = await node.applications.installed()
        return reply(schemas.ApplicationList(applications=[application_reply(r) for r in records]))

    @ops.route(
        app,
        "GET",
        "/admin-api/applications/<application_id>",
        summary="An application with its state fields, methods and views",
        tag="applications",
        returns=schemas.ApplicationDetail,
        errors=(400, 404),
    )
    async def show_application(application_id: str) -> Response:
        raw = parse_id(application_id, "application id")
        record = await node.applications.get(raw)
        return reply(application_detail(record, await node.applications.load(raw)))

    @ops.route(
        app,
        "DELETE",
        "/admin-api/applications/<application_id>",
        summary="Uninstall an application (refused while a context uses it, unless force)",
        tag="applications",
        returns=schemas.Uninstalled,
        errors=(400, 404, 409),
        query=(Query("force", "`true`: uninstall even if contexts use it"),),
    )
    async def uninstall_application(application_id: str) -> Response:
        raw = parse_id(application_id, "application id")
        await node.applications.get(raw)  # 404 first if it is not installed
        users = [r for r in await node.contexts.records() if r.application_id == raw]
        if users and request.args.get("force") not in ("1", "true"):
            listed = ", ".join(b58(r.context_id) for r in users[:3])
            more = f" and {len(users) - 3} more" if len(users) > 3 else ""
            raise AlreadyExists(
                f"application {application_id} is used by {len(users)} context(s) "
                f"({listed}{more}): delete them first, or uninstall with force "
                "(`--force`; those contexts stop working)"
            )
        await node.applications.uninstall(raw)
        return reply(
            schemas.Uninstalled(
                uninstalled=application_id, contexts=[b58(r.context_id) for r in users]
            )
        )

    # -- contexts --------------------------------------------------------------------------

    @ops.route(
        app,
        "POST",
        "/admin-api/contexts",
        summary="Create a context running an installed application",
        tag="contexts",
        body=schemas.CreateContextRequest,
        returns=schemas.Context,
        errors=(400, 403, 404),
    )
    async def create_context() -> Response:
        body = await typed_body(schemas.CreateContextRequest)
        application_id = parse_id(body.application_id, "applicationId")
        args_json = None if body.init_args is None else json.dumps(body.init_args)
        try:
            record = await node.contexts.create(application_id, args_json)
        except AppError as exc:
            return _error(400, f"init failed: {exc.message}")
        return reply(context_reply(record))

    @ops.route(
        app,
        "GET",
        "/admin-api/contexts",
        summary="List the contexts this node is a member of",
        tag="contexts",
        returns=schemas.ContextList,
    )
    async def list_contexts() -> Response:
        records = await node.contexts.records()
        waits = node.contexts.replicas.app_waits
        return reply(schemas.ContextList(contexts=[context_reply(r, waits) for r in records]))

    @ops.route(
        app,
        "GET",
        "/admin-api/contexts/<context_id>",
        summary="One context",
        tag="contexts",
        returns=schemas.Context,
        errors=(400, 404),
    )
    async def show_context(context_id: str) -> Response:
        record = await node.contexts.get(parse_id(context_id, "context id"))
        return reply(context_reply(record, node.contexts.replicas.app_waits))

    @ops.route(
        app,
        "DELETE",
        "/admin-api/contexts/<context_id>",
        summary="Delete a context from this node (the others keep it)",
        tag="contexts",
        returns=schemas.Deleted,
        errors=(400, 404),
    )
    async def delete_context(context_id: str) -> Response:
        await node.contexts.delete(parse_id(context_id, "context id"))
        return reply(schemas.Deleted(deleted=context_id))

    @ops.route(
        app,
        "POST",
        "/admin-api/contexts/<context_id>/invitations",
        summary="Invite someone (admins only): returns the invitation text",
        tag="contexts",
        body=schemas.InviteRequest,
        returns=schemas.InvitationText,
        errors=(400, 403, 404),
    )
    async def invite(context_id: str) -> Response:
        body = await typed_body(schemas.InviteRequest)
        if body.expires_in > settings.max_invitation_lifetime:
            raise BadInput(
                f"expiresIn must be at most {settings.max_invitation_lifetime:g} seconds "
                "(api.max_invitation_lifetime)"
            )
        text = await node.joins.invite(
            parse_id(context_id, "context id"),
            role=body.role,
            expires_in=body.expires_in,
            invitee=None if body.invitee is None else parse_id(body.invitee, "invitee"),
        )
        return reply(schemas.InvitationText(invitation=text))

    @ops.route(
        app,
        "POST",
        "/admin-api/contexts/join",
        summary="Join a context with an invitation (dials the inviting node)",
        tag="contexts",
        body=schemas.JoinRequest,
        returns=schemas.Context,
        errors=(400, 403, 409, 412, 502),
    )
    async def join() -> Response:
        body = await typed_body(schemas.JoinRequest)
        try:
            record = await node.joins.join(
                body.invitation,
                trust_app=None if body.trust_app is None else parse_id(body.trust_app, "trustApp"),
            )
        except (PeerError, ProtocolError) as exc:
            raise PeerFailed(f"joining failed: {exc}") from None
        return reply(context_reply(record))

    @ops.route(
        app,
        "GET",
        "/admin-api/contexts/<context_id>/sync",
        summary="Sync status: whether a session runs, each peer's last sync, and finality",
        tag="contexts",
        returns=schemas.SyncStatus,
        errors=(400, 404),
    )
    async def sync_status(context_id: str) -> Response:
        raw = parse_id(context_id, "context id")
        await node.contexts.get(raw)  # 404 for an unknown context
        replica = await node.contexts.replica(raw)
        return reply(
            {
                "contextId": context_id,
                "running": node.sync.is_running(raw),
                "peers": [
                    peer_sync_json(peer, status, connected=connected)
                    for peer, connected, status in node.sync.peer_status(raw)
                ],
                "finality": finality_json(
                    replica.authority,
                    node.contexts.replicas.wall_clock(),
                    max_nonfinal_bytes=node.contexts.processor.max_nonfinal_bytes,
                ),
            }
        )

    @ops.route(
        app,
        "POST",
        "/admin-api/contexts/<context_id>/sync",
        summary="Sync the context with its members now",
        tag="contexts",
        body=schemas.EmptyRequest,
        returns=schemas.SyncResult,
        errors=(400, 404, 502),
        query=(Query("peer", "sync with this peer only"),),
    )
    async def sync_context(context_id: str) -> Response:
        await typed_body(schemas.EmptyRequest)
        raw = parse_id(context_id, "context id")
        peer = None
        if (text := request.args.get("peer")) is not None:
            try:
                peer = PeerId.from_base58(text)
            except ProtocolError:
                raise ContextError(f"peer {text[:80]!r} is not a peer id") from None
        try:
            applied = await node.sync.sync_now(raw, peer)
        except (PeerError, ProtocolError, trio.TooSlowError) as exc:
            raise PeerFailed(f"sync failed: {describe(exc)}") from None
        root, heads, pending = await node.contexts.state(raw)
        return reply(
            schemas.SyncResult(
                applied=applied,
                root_hash=root.hex(),
                heads=[h.hex() for h in heads],
                pending=pending,
            )
        )

    @ops.route(
        app,
        "GET",
        "/admin-api/contexts/<context_id>/members",
        summary="The context's members and their roles",
        tag="contexts",
        returns=schemas.MemberList,
        errors=(400, 404),
    )
    async def list_members(context_id: str) -> Response:
        record = await node.contexts.get(parse_id(context_id, "context id"))
        return reply(schemas.MemberList(members=[member_reply(m) for m in record.members]))

    @ops.route(
        app,
        "DELETE",
        "/admin-api/contexts/<context_id>/members/<member>",
        summary="Remove a member (admins only; a new key is sealed to the others)",
        tag="contexts",
        returns=schemas.MemberRemoved,
        errors=(400, 403, 404),
    )
    async def remove_member(context_id: str, member: str) -> Response:
        delta = await node.contexts.remove_member(
            parse_id(context_id, "context id"), parse_id(member, "member")
        )
        return reply(schemas.MemberRemoved(removed=member, delta_id=delta.id.hex()))

    @ops.route(
        app,
        "POST",
        "/admin-api/contexts/<context_id>/members/<member>/role",
        summary="Change a member's role (admins only)",
        tag="contexts",
        body=schemas.RoleRequest,
        returns=schemas.RoleChanged,
        errors=(400, 403, 404),
    )
    async def set_role(context_id: str, member: str) -> Response:
        body = await typed_body(schemas.RoleRequest)
        delta = await node.contexts.change_members(
            parse_id(context_id, "context id"), [(parse_id(member, "member"), body.role)]
        )
        return reply(schemas.RoleChanged(member=member, role=body.role, delta_id=delta.id.hex()))

    @ops.route(
        app,
        "POST",
        "/admin-api/contexts/<context_id>/upgrade",
        summary="Move the context to a newer version of its app (admins only); runs its "
        "@app.migrate hook here",
        tag="contexts",
        body=schemas.UpgradeRequest,
        returns=schemas.Upgraded,
        errors=(400, 403, 404, 409),
    )
    async def upgrade(context_id: str) -> Response:
        body = await typed_body(schemas.UpgradeRequest)
        try:
            done = await node.contexts.upgrade(
                parse_id(context_id, "context id"), parse_id(body.application_id, "applicationId")
            )
        except AppError as exc:
            return _error(400, f"the migration failed: {exc.message}")
        return reply(
            schemas.Upgraded(
                application_id=b58(done.application_id),
                delta_id=done.operation.id.hex(),
                migration_delta_id=None if done.migration is None else done.migration.id.hex(),
            )
        )

    @ops.route(
        app,
        "POST",
        "/admin-api/contexts/<context_id>/leave",
        summary="Leave the context (refused for its last admin)",
        tag="contexts",
        body=schemas.EmptyRequest,
        returns=schemas.Left,
        errors=(400, 403, 404),
    )
    async def leave(context_id: str) -> Response:
        await typed_body(schemas.EmptyRequest)
        delta = await node.contexts.leave(parse_id(context_id, "context id"))
        return reply(schemas.Left(left=context_id, delta_id=delta.id.hex()))

    @ops.route(
        app,
        "POST",
        "/admin-api/contexts/<context_id>/invitations/revoke",
        summary="Revoke an invitation (admins only): no admission may spend it after",
        tag="contexts",
        body=schemas.RevokeInvitationRequest,
        returns=schemas.InvitationRevoked,
        errors=(400, 403, 404),
    )
    async def revoke_invitation(context_id: str) -> Response:
        body = await typed_body(schemas.RevokeInvitationRequest)
        try:
            _, invitation = parse_invitation(body.invitation)
        except InvitationError as exc:
            raise ContextError(str(exc)) from None
        raw = parse_id(context_id, "context id")
        if invitation.context_id != raw:
            raise ContextError("the invitation is for another context")
        delta = await node.contexts.revoke_invitation(raw, invitation.id)
        return reply(
            schemas.InvitationRevoked(revoked=invitation.id.hex(), delta_id=delta.id.hex())
        )

    @ops.route(
        app,
        "POST",
        "/admin-api/gc",
        summary="Run one garbage collection pass now",
        tag="node",
        body=schemas.EmptyRequest,
        returns=schemas.GcResult,
    )
    async def run_gc() -> Response:
        await typed_body(schemas.EmptyRequest)
        return reply(await node.collect_garbage())

    # -- JSON-RPC --------------------------------------------------------------------------

    @ops.route(
        app,
        "POST",
        "/jsonrpc",
        summary="JSON-RPC 2.0: `execute` a method or view of a context's app",
        tag="calls",
        body=schemas.JsonRpcRequest,
        returns=schemas.JsonRpcReply,
        description="Errors are JSON-RPC errors in a 200 answer (docs/api.md lists the "
        "codes); a scoped token reaches only its contexts.",
    )
    async def jsonrpc() -> Response:
        raw = await request.get_data(as_text=True)
        try:
            message = app.json.loads(raw)
        except BadInput as exc:
            log.info("refused JSON-RPC request: %s", exc)
            return _rpc_error(None, JSONRPC_PARSE_ERROR, f"parse error: {exc}")
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _rpc_error(None, JSONRPC_INVALID_REQUEST, 'expected {"jsonrpc": "2.0", ...}')
        request_id = message.get("id")
        if not _valid_jsonrpc_id(request_id):
            return _rpc_error(
                None,
                JSONRPC_INVALID_REQUEST,
                f"id must be a string (at most {MAX_JSONRPC_ID_LENGTH} characters), "
                "a number or null",
            )
        if message.get("method") != "execute":
            return _rpc_error(
                request_id, JSONRPC_METHOD_NOT_FOUND, f"unknown method {message.get('method')!r}"
            )
        params = message.get("params")
        if not isinstance(params, dict):
            return _rpc_error(request_id, JSONRPC_INVALID_PARAMS, "params must be an object")
        try:
            context_id, method, args_json, executor = _call_params(params, app.json.loads)
        except (ContextError, BadInput) as exc:
            return _rpc_error(request_id, JSONRPC_INVALID_PARAMS, str(exc))
        principal: Principal = g.principal
        if not principal.is_admin:
            try:
                is_view = await _is_view(node, context_id, method)
            except ContextError:
                is_view = False
            if not principal.may_call(b58(context_id), is_view=is_view):
                what = "call methods of" if is_view is False else "read"
                return _rpc_error(
                    request_id, JSONRPC_FORBIDDEN, f"this token may not {what} that context"
                )
        try:
            result = await node.blob_calls.execute(context_id, method, args_json, executor=executor)
        except AppError as exc:
            error = exc.to_jsonrpc()
            return _rpc_error(request_id, error["code"], error["message"], error.get("data"))
        except ReadOnlyError as exc:
            return _rpc_error(request_id, JSONRPC_READ_ONLY, str(exc))
        except ContextError as exc:
            return _rpc_error(request_id, jsonrpc_code(exc), str(exc))
        except (StorageError, TrionodeError) as exc:
            return _rpc_error(request_id, JSONRPC_INTERNAL, f"call not committed: {exc}")
        return reply(
            schemas.JsonRpcReply(
                jsonrpc="2.0",
                id=request_id,
                result=schemas.CallResult(
                    output=result.result,
                    delta_id=None if result.delta_id is None else result.delta_id.hex(),
                    root_hash=result.root_hash.hex(),
                ),
            )
        )

    # -- WebSocket -------------------------------------------------------------------------

    def followable() -> Callable[[str], bool]:
        # A context the caller may not follow looks exactly like one that doesn't exist.
        principal: Principal = g.principal
        return lambda c: principal.may_follow(c) and node.knows_context(c)

    @app.websocket("/ws")
    async def ws() -> Response | None:
        # Checked and counted with no await in between (hub.open), so the cap is exact.
        if node.hub.subscribers >= settings.max_websockets:
            log.info("refused a WebSocket: %d open (api.max_websockets)", node.hub.subscribers)
            return _error(503, "too many WebSocket connections; try again later")
        await serve_websocket(node.hub, followable(), app.json.loads)
        return None

    @ops.route(
        app,
        "GET",
        "/events",
        summary="Follow contexts' applied deltas as Server-Sent Events",
        tag="events",
        content="text/event-stream",
        errors=(400, 404, 410, 503),
        query=(
            Query("context", "a context id to follow (repeat for more)"),
            Query("since", "resume after this sequence number"),
            Query("ticket", "a one-time ticket instead of the bearer header"),
        ),
    )
    async def events() -> Response:  # noqa: ASYNC124
        try:
            return event_stream_response(node.hub, followable(), settings.sse_keepalive)
        except EventRequestError as exc:
            extra = {"resync": True} if exc.resync else {}
            return _error(exc.status, str(exc), **extra)
