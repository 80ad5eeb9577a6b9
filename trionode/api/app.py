"""The Quart-Trio application: routes, auth, JSON errors and metrics.

Handlers reach the node only through `NodeApi`, a narrow Protocol, so the app can be tested
with `app.test_client()` and no sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol

import trio
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from quart import Response, g, jsonify, request, websocket
from quart.json.provider import DefaultJSONProvider
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers, MultiDict
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_cookie

from trionode import __version__, schemas
from trionode.api.admin_page import (
    SAFE_METHODS,
    SESSION_COOKIE,
    SessionBook,
    is_page_route,
    register_page_routes,
    same_origin,
    session_refusal,
)
from trionode.api.blobs import UPLOAD_PATH, BlobApi, register_blob_routes, wrap_upload
from trionode.api.contexts import ContextApi, register_context_routes
from trionode.api.cors import install_cors
from trionode.api.jsonio import BadInput, decode_json
from trionode.api.openapi import OPENAPI_PATH, Operations, openapi_document, reply, typed_body
from trionode.api.tokens import (
    ADMIN,
    Principal,
    TicketBook,
    TokenError,
    TokenStore,
    token_matches,
)
from trionode.config import NodeConfig
from trionode.errors import PeerError, ProtocolError, ReadOnlyError
from trionode.metrics import NodeMetrics
from trionode.store.store import AsyncStore

PUBLIC_ROUTES: Final = frozenset({"/admin-api/health", OPENAPI_PATH})
SCOPED_ROUTES: Final = frozenset({"/jsonrpc", "/events", "/admin-api/tickets"})
"""All a scoped token reaches (each route then checks the contexts)."""
TICKET_ROUTES: Final = frozenset({"/ws", "/events"})
"""Where a one-time ticket in the URL stands in for a bearer header."""

log = logging.getLogger(__name__)


class NodeApi(ContextApi, BlobApi, Protocol):
    """What the API needs from a node."""

    @property
    def config(self) -> NodeConfig: ...

    @property
    def peer_id(self) -> str: ...

    @property
    def metrics(self) -> NodeMetrics: ...

    @property
    def token_sha256(self) -> str: ...

    @property
    def tokens(self) -> TokenStore: ...

    @property
    def tickets(self) -> TicketBook: ...

    @property
    def sessions(self) -> SessionBook: ...

    @property
    def store(self) -> AsyncStore: ...

    def is_ready(self) -> bool: ...

    def peers(self) -> list[dict[str, Any]]: ...

    def listen_addresses(self) -> list[str]: ...
    def reachability(self) -> dict[str, Any]: ...
    def dht_status(self) -> schemas.DhtStatus: ...

    def topics(self) -> list[dict[str, Any]]: ...

    async def connect(self, address: str) -> str: ...

    async def refresh_metrics(self) -> None: ...


def error_response(status: int, message: str, **extra: Any) -> Response:
    body = {"error": {"code": status, "message": message, **extra}}
    response = jsonify(body)
    response.status_code = status
    return response


def _principal(
    node: NodeApi, headers: Headers, args: MultiDict[str, str], path: str
) -> Principal | None:
    """Who is asking: a bearer token (admin or scoped), else a one-time ticket in the URL."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        if token_matches(token, node.token_sha256):
            return ADMIN
        return node.tokens.principal(token)
    # Only EventSource and WebSocket need tickets; elsewhere a ticket is not a credential.
    ticket = args.get("ticket")
    if ticket and path in TICKET_ROUTES:
        return node.tickets.redeem(ticket)
    return None


class StrictJSONProvider(DefaultJSONProvider):
    """Quart's JSON, but every parse (`request.get_json` included) goes through `decode_json`:
    a route added later can't forget the nesting limit or accept NaN."""

    def __init__(self, app: QuartTrio, *, max_depth: int, max_size: int) -> None:
        super().__init__(app)
        self.max_depth = max_depth
        self.max_size = max_size

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        # Callers' parser options (kwargs) are ignored on purpose: only the strict ones apply.
        return decode_json(s, max_depth=self.max_depth, max_size=self.max_size)


def create_app(node: NodeApi) -> QuartTrio:
    settings = node.config.api
    app = QuartTrio("trionode")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_body
    app.json = StrictJSONProvider(
        app, max_depth=settings.max_json_depth, max_size=settings.max_request_body
    )
    metrics = node.metrics
    allowed_origins = frozenset(settings.cors_origins)

    @app.before_websocket
    async def authenticate_websocket() -> Response | None:  # noqa: ASYNC124
        # Browsers send Origin on every WebSocket handshake and let any page open one to any
        # host (no same-origin policy here), so a page the user merely visits could reach the
        # node. Only listed origins pass; a client without Origin is not a browser.
        origin = websocket.headers.get("Origin")
        if origin is not None and origin not in allowed_origins:
            return error_response(403, f"origin {origin!r} is not in api.cors_origins")
        # Browsers cannot set headers on a WebSocket handshake: they bring a one-time ticket.
        principal = _principal(node, websocket.headers, websocket.args, websocket.path)
        if principal is None:
            return error_response(401, "missing or invalid bearer token or ticket")
        g.principal = principal
        return None

    @app.before_request
    async def authenticate() -> Response | None:  # noqa: ASYNC124 - Quart hooks are async
        g.started = time.perf_counter()
        g.principal = None
        if (
            request.path in PUBLIC_ROUTES
            or is_page_route(request.path)
            or request.method == "OPTIONS"
        ):
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        bearer = scheme.lower() == "bearer" and bool(token.strip())
        session = request.cookies.get(SESSION_COOKIE)
        if not bearer and session is not None:
            # The page's session cookie: the admin, but only from the page's own origin for
            # anything that changes state (SameSite=Strict already keeps other sites out).
            refusal = session_refusal(
                node.sessions,
                session,
                changes_state=request.method not in SAFE_METHODS,
                same_origin=same_origin(request.headers.get("Origin")),
            )
            if refusal is not None:
                return error_response(*refusal)
            g.principal = ADMIN
            return None
        if not bearer and "ticket" not in request.args:
            return error_response(401, "missing bearer token")
        principal = _principal(node, request.headers, request.args, request.path)
        if principal is None:
            what = "bearer token" if bearer else "ticket (unknown, used or expired)"
            return error_response(401, f"invalid {what}")
        if not principal.is_admin and request.path not in SCOPED_ROUTES:
            return error_response(403, "this token only allows JSON-RPC and events on its contexts")
        g.principal = principal
        return None

    @app.after_request
    async def count(response: Response) -> Response:  # noqa: ASYNC124
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(request.method, rule, str(response.status_code)).inc()
        started = getattr(g, "started", None)
        if started is not None:
            metrics.http_latency.labels(rule).observe(time.perf_counter() - started)
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:  # noqa: ASYNC124
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(BadInput)
    async def bad_input(exc: BadInput) -> Response:  # noqa: ASYNC124
        # A client's mistake (or attack): one line, no traceback, and a 400 it can read.
        log.info("refused %s %s: %s", request.method, request.path, exc)
        return error_response(400, str(exc))

    @app.errorhandler(ReadOnlyError)
    async def read_only(exc: ReadOnlyError) -> Response:  # noqa: ASYNC124
        return error_response(403, str(exc), reason="read-only")

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:  # noqa: ASYNC124
        app.logger.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
        return error_response(500, "internal error", type=type(exc).__name__)

    ops = Operations()

    @ops.route(
        app,
        "GET",
        "/admin-api/health",
        summary="Liveness (no token needed)",
        tag="node",
        returns=schemas.Health,
        public=True,
    )
    async def health() -> Response:  # noqa: ASYNC124
        return reply(schemas.Health(status="ok"))

    @ops.route(
        app,
        "GET",
        "/admin-api/ready",
        summary="Readiness: 503 while starting or shutting down",
        tag="node",
        returns=schemas.Ready,
        errors=(503,),
    )
    async def ready() -> Response:  # noqa: ASYNC124
        if node.is_ready():
            return reply(schemas.Ready(ready=True, peer_id=node.peer_id, version=__version__))
        return error_response(503, "node is starting or shutting down", ready=False)

    @ops.route(
        app,
        "GET",
        "/admin-api/node",
        summary="This node: peer id, version, addresses, reachability, mode, DHT",
        tag="node",
        returns=schemas.NodeInfo,
    )
    async def node_info() -> Response:  # noqa: ASYNC124
        return reply(
            schemas.NodeInfo(
                peer_id=node.peer_id,
                version=__version__,
                addresses=node.listen_addresses(),
                reachability=node.reachability(),
                mode=node.config.node.mode,
                dht=node.dht_status(),
            )
        )

    @ops.route(
        app,
        "GET",
        "/admin-api/peers",
        summary="Connected peers",
        tag="node",
        returns=schemas.PeerList,
    )
    async def peers() -> Response:  # noqa: ASYNC124
        return reply(schemas.PeerList(peers=node.peers(), listen_addrs=node.listen_addresses()))

    @ops.route(
        app,
        "GET",
        "/admin-api/topics",
        summary="Gossipsub topics known to this node",
        tag="node",
        returns=schemas.TopicList,
    )
    async def topics() -> Response:  # noqa: ASYNC124
        return reply(schemas.TopicList(topics=node.topics()))

    @ops.route(
        app,
        "POST",
        "/admin-api/peers",
        summary="Dial a peer by multiaddr",
        tag="node",
        body=schemas.ConnectRequest,
        returns=schemas.Connected,
        errors=(400, 502, 504),
    )
    async def connect() -> Response:
        address = (await typed_body(schemas.ConnectRequest)).address
        try:
            peer_id = await node.connect(address)
        except PeerError as exc:
            status = 400 if "not a multiaddr" in str(exc) or "TCP" in str(exc) else 502
            return error_response(status, str(exc))
        except ProtocolError as exc:
            return error_response(502, f"handshake failed: {exc}")
        except trio.TooSlowError:
            return error_response(504, "handshake timed out")
        return reply(schemas.Connected(peer_id=peer_id))

    @app.errorhandler(TokenError)
    async def token_error(exc: TokenError) -> Response:  # noqa: ASYNC124
        return error_response(exc.status, str(exc))

    @ops.route(
        app,
        "POST",
        "/admin-api/tokens",
        summary="Create a scoped token for some contexts (shown once)",
        tag="tokens",
        body=schemas.TokenRequest,
        returns=schemas.TokenCreated,
        errors=(400, 404, 409),
    )
    async def create_token() -> Response:
        body = await typed_body(schemas.TokenRequest)
        unknown = [c for c in body.contexts if not node.knows_context(c)]
        if unknown:
            raise TokenError(f"unknown context ids: {', '.join(unknown[:5])}", 404)
        token, record = await node.tokens.create(body.contexts, body.scope, body.expires_in)
        return reply({"token": token, **record.to_json(node.tokens.now())})

    @ops.route(
        app,
        "GET",
        "/admin-api/tokens",
        summary="List scoped tokens (never their secrets)",
        tag="tokens",
        returns=schemas.TokenList,
    )
    async def list_tokens() -> Response:  # noqa: ASYNC124
        now = node.tokens.now()
        return reply({"tokens": [r.to_json(now) for r in node.tokens.records()]})

    @ops.route(
        app,
        "DELETE",
        "/admin-api/tokens/<token_id>",
        summary="Revoke a scoped token",
        tag="tokens",
        returns=schemas.TokenRevoked,
        errors=(400, 404),
    )
    async def revoke_token(token_id: str) -> Response:
        await node.tokens.revoke(token_id)
        return reply(schemas.TokenRevoked(revoked=token_id))

    @ops.route(
        app,
        "POST",
        "/admin-api/tickets",
        summary="A one-time ticket for /ws or /events (browsers cannot set headers there)",
        tag="tokens",
        returns=schemas.Ticket,
    )
    async def issue_ticket() -> Response:  # noqa: ASYNC124
        principal: Principal = g.principal
        ticket = node.tickets.issue(principal)
        return reply(schemas.Ticket(ticket=ticket, expires_in=node.tickets.ttl))

    register_context_routes(app, node, settings, ops)
    register_page_routes(app, node, ops)
    install_cors(app, settings.cors_origins)
    register_blob_routes(app, node, ops)

    def authorize_upload(headers: Mapping[str, str], own_origin: str) -> tuple[int, str] | None:
        # The admin token, or the page's session (the page uploads with its cookie).
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            if token_matches(token.strip(), node.token_sha256):
                return None
            return 401, "invalid bearer token"
        session = parse_cookie(headers.get("cookie", "")).get(SESSION_COOKIE)
        if session is None:
            return 401, "missing bearer token"
        origin = headers.get("origin")
        return session_refusal(
            node.sessions,
            session,
            changes_state=True,
            same_origin=origin is None or origin == own_origin,
        )

    app.asgi_app = wrap_upload(  # type: ignore[method-assign,assignment]  # Quart's hook
        app.asgi_app,
        node,
        authorize_upload,
        lambda status: metrics.http_requests.labels("POST", UPLOAD_PATH, str(status)).inc(),
    )

    @ops.route(
        app,
        "GET",
        "/metrics",
        summary="Prometheus metrics (text format)",
        tag="node",
        content="text/plain",
    )
    async def prometheus() -> Response:
        await node.refresh_metrics()
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    document = openapi_document(ops.items)

    @app.get(OPENAPI_PATH)
    async def openapi() -> Response:  # noqa: ASYNC124
        return reply(document)

    return app
