"""Routes for applications, contexts, JSON-RPC calls and the WebSocket.

Ids in the API: context ids, application ids and member keys are base58; delta ids and root
hashes are hex.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Callable
from typing import Any, Final, Protocol

import base58
import trio
from quart import Response, g, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge

from trionode.api.context_errors import JSONRPC_FORBIDDEN, http_status, jsonrpc_code
from trionode.api.jsonio import BadInput, number_field
from trionode.api.sse import EventRequestError, event_stream_response
from trionode.api.tokens import Principal
from trionode.api.ws import serve_websocket
from trionode.blobs.calls import BlobCalls
from trionode.config import ApiSection
from trionode.context.errors import AlreadyExists, ContextError, PeerFailed
from trionode.context.events import EventHub
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


def context_json(record: ContextRecord) -> dict[str, Any]:
    return {
        "contextId": b58(record.context_id),
        "applicationId": b58(record.application_id),
        "createdAt": record.created_at,
        "rootHash": record.root_hash.hex(),
        "heads": [h.hex() for h in record.heads],
        "members": [{"publicKey": b58(m.public_key), "role": m.role} for m in record.members],
        "memberPublicKey": b58(record.our_member),
    }


def application_json(record: ApplicationRecord) -> dict[str, Any]:
    return {
        "applicationId": b58(record.application_id),
        "name": record.name,
        "version": record.version,
        "path": record.path,
        "installedAt": record.installed_at,
        "trusted": record.trusted,
        "bundleBlobId": None if record.bundle_blob_id is None else b58(record.bundle_blob_id),
        "signer": None if record.signer is None else b58(record.signer),
    }


def app_interface(app: Any) -> dict[str, Any]:
    """What an app offers callers: its state fields and entry points, with parameter types
    and docstrings (`app show`)."""
    description = app.describe()
    entries = {e.name: e for e in app.entry_points()}
    return {
        "state": description["state"],
        "entryPoints": [
            {**entry, "doc": inspect.getdoc(entries[entry["name"]].fn) or ""}
            for entry in description["entry_points"]
        ],
    }


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


async def json_object_body() -> dict[str, Any]:
    """The request body as a JSON object, decoded strictly (see `StrictJSONProvider`).

    Raises:
        BadInput: not JSON (whatever the Content-Type), too deep, or not an object.
    """
    body = await request.get_json(force=True)
    if not isinstance(body, dict):
        raise BadInput("body must be a JSON object")
    return body


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
    context_id = parse_id(params.get("contextId"), "contextId")
    method = params.get("method")
    if not isinstance(method, str) or not method:
        raise ContextError("params.method must be a non-empty string")
    args = params.get("argsJson", {})
    if isinstance(args, str):
        decode(args)  # the app parses it again: refuse here what our decoder refuses anywhere
        args_json = args
    else:
        args_json = json.dumps(args)
    executor_text = params.get("executorPublicKey")
    executor = None if executor_text is None else parse_id(executor_text, "executorPublicKey")
    return context_id, method, args_json, executor


async def _is_view(node: ContextApi, context_id: bytes, method: str) -> bool:
    record = await node.contexts.get(context_id)
    app = await node.applications.load(record.application_id)
    entry = app.entry(method)
    return entry is not None and entry.kind is EntryKind.VIEW


def register_context_routes(app: QuartTrio, node: ContextApi, settings: ApiSection) -> None:
    @app.errorhandler(ContextError)
    async def context_error(exc: ContextError) -> Response:  # noqa: ASYNC124
        return _error(http_status(exc), str(exc))

    # -- applications ----------------------------------------------------------------------

    @app.post("/admin-api/applications")
    async def install_application() -> Response:
        body = await json_object_body()
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise ContextError('body must be {"path": "<bundle directory or archive>"}')
        return jsonify(application_json(await node.applications.install(path)))

    @app.post("/admin-api/applications/bundle")
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
        return jsonify(application_json(record))

    @app.get("/admin-api/applications")
    async def list_applications() -> Response:
        records = await node.applications.installed()
        return jsonify({"applications": [application_json(r) for r in records]})

    @app.get("/admin-api/applications/<application_id>")
    async def show_application(application_id: str) -> Response:
        raw = parse_id(application_id, "application id")
        record = await node.applications.get(raw)
        return jsonify(
            {**application_json(record), **app_interface(await node.applications.load(raw))}
        )

    @app.delete("/admin-api/applications/<application_id>")
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
        return jsonify(
            {"uninstalled": application_id, "contexts": [b58(r.context_id) for r in users]}
        )

    # -- contexts --------------------------------------------------------------------------

    @app.post("/admin-api/contexts")
    async def create_context() -> Response:
        body = await json_object_body()
        application_id = parse_id(body.get("applicationId"), "applicationId")
        init_args = body.get("initArgs")
        args_json = None if init_args is None else json.dumps(init_args)
        try:
            record = await node.contexts.create(application_id, args_json)
        except AppError as exc:
            return _error(400, f"init failed: {exc.message}")
        return jsonify(context_json(record))

    @app.get("/admin-api/contexts")
    async def list_contexts() -> Response:
        records = await node.contexts.records()
        return jsonify({"contexts": [context_json(r) for r in records]})

    @app.get("/admin-api/contexts/<context_id>")
    async def show_context(context_id: str) -> Response:
        return jsonify(context_json(await node.contexts.get(parse_id(context_id, "context id"))))

    @app.delete("/admin-api/contexts/<context_id>")
    async def delete_context(context_id: str) -> Response:
        await node.contexts.delete(parse_id(context_id, "context id"))
        return jsonify({"deleted": context_id})

    @app.post("/admin-api/contexts/<context_id>/invitations")
    async def invite(context_id: str) -> Response:
        body = await json_object_body()
        role = body.get("role", "member")
        if not isinstance(role, str):
            raise ContextError('body: {"role": "member", "expiresIn": <seconds>, "invitee": <key>}')
        expires_in = number_field(
            body, "expiresIn", default=7 * 86400.0, maximum=settings.max_invitation_lifetime
        )
        invitee = body.get("invitee")
        text = await node.joins.invite(
            parse_id(context_id, "context id"),
            role=role,
            expires_in=expires_in,
            invitee=None if invitee is None else parse_id(invitee, "invitee"),
        )
        return jsonify({"invitation": text})

    @app.post("/admin-api/contexts/join")
    async def join() -> Response:
        body = await json_object_body()
        text = body.get("invitation")
        trust_app = body.get("trustApp")
        if not isinstance(text, str) or not isinstance(trust_app, (str, type(None))):
            raise ContextError('body must be {"invitation": "trinv1...", "trustApp": <app id>}')
        try:
            record = await node.joins.join(
                text,
                trust_app=None if trust_app is None else parse_id(trust_app, "trustApp"),
            )
        except (PeerError, ProtocolError) as exc:
            raise PeerFailed(f"joining failed: {exc}") from None
        return jsonify(context_json(record))

    @app.get("/admin-api/contexts/<context_id>/sync")
    async def sync_status(context_id: str) -> Response:
        raw = parse_id(context_id, "context id")
        await node.contexts.get(raw)  # 404 for an unknown context
        return jsonify(
            {
                "contextId": context_id,
                "running": node.sync.is_running(raw),
                "peers": [
                    peer_sync_json(peer, status, connected=connected)
                    for peer, connected, status in node.sync.peer_status(raw)
                ],
            }
        )

    @app.post("/admin-api/contexts/<context_id>/sync")
    async def sync_context(context_id: str) -> Response:
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
            raise PeerFailed(f"sync failed: {exc}") from None
        root, heads, pending = await node.contexts.state(raw)
        return jsonify(
            {
                "applied": applied,
                "rootHash": root.hex(),
                "heads": [h.hex() for h in heads],
                "pending": pending,
            }
        )

    @app.get("/admin-api/contexts/<context_id>/members")
    async def list_members(context_id: str) -> Response:
        record = await node.contexts.get(parse_id(context_id, "context id"))
        return jsonify(
            {"members": [{"publicKey": b58(m.public_key), "role": m.role} for m in record.members]}
        )

    @app.delete("/admin-api/contexts/<context_id>/members/<member>")
    async def remove_member(context_id: str, member: str) -> Response:
        delta = await node.contexts.remove_member(
            parse_id(context_id, "context id"), parse_id(member, "member")
        )
        return jsonify({"removed": member, "deltaId": delta.id.hex()})

    @app.post("/admin-api/contexts/<context_id>/members/<member>/role")
    async def set_role(context_id: str, member: str) -> Response:
        role = (await json_object_body()).get("role")
        if role not in ("admin", "member", "read-only"):
            raise ContextError('body must be {"role": "admin" | "member" | "read-only"}')
        delta = await node.contexts.change_members(
            parse_id(context_id, "context id"), [(parse_id(member, "member"), role)]
        )
        return jsonify({"member": member, "role": role, "deltaId": delta.id.hex()})

    @app.post("/admin-api/contexts/<context_id>/leave")
    async def leave(context_id: str) -> Response:
        delta = await node.contexts.leave(parse_id(context_id, "context id"))
        return jsonify({"left": context_id, "deltaId": delta.id.hex()})

    @app.post("/admin-api/contexts/<context_id>/invitations/revoke")
    async def revoke_invitation(context_id: str) -> Response:
        text = (await json_object_body()).get("invitation")
        if not isinstance(text, str):
            raise ContextError('body must be {"invitation": "trinv1..."}')
        try:
            _, invitation = parse_invitation(text)
        except InvitationError as exc:
            raise ContextError(str(exc)) from None
        raw = parse_id(context_id, "context id")
        if invitation.context_id != raw:
            raise ContextError("the invitation is for another context")
        delta = await node.contexts.revoke_invitation(raw, invitation.id)
        return jsonify({"revoked": invitation.id.hex(), "deltaId": delta.id.hex()})

    @app.post("/admin-api/gc")
    async def run_gc() -> Response:
        return jsonify(await node.collect_garbage())

    # -- JSON-RPC --------------------------------------------------------------------------

    @app.post("/jsonrpc")
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
        return jsonify(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "result": {
                    "output": result.result,
                    "deltaId": None if result.delta_id is None else result.delta_id.hex(),
                    "rootHash": result.root_hash.hex(),
                },
            }
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

    @app.get("/events")
    async def events() -> Response:  # noqa: ASYNC124
        try:
            return event_stream_response(node.hub, followable(), settings.sse_keepalive)
        except EventRequestError as exc:
            extra = {"resync": True} if exc.resync else {}
            return _error(exc.status, str(exc), **extra)
