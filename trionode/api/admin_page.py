"""The node's own web page at `/admin/`, its sign-in session, and the routes only it needs.

The page is static HTML, CSS and JavaScript shipped in the package (`trionode/api/static/`);
nothing is fetched from anywhere else. Signing in posts the admin token once to
`POST /admin/session`; the node answers with a random session id in a cookie that is
HttpOnly (page scripts can't read it, so an injected script can't steal it) and
SameSite=Strict (no other site's page can make the browser send it). The token is never
put in a URL and the page never stores it. Sessions live in memory: a restart signs
everyone out.

Cookie-authenticated requests that change something must also come from the node's own
origin (checked on `Origin`), in case a browser ignores SameSite.
"""

from __future__ import annotations

import secrets
from importlib import resources
from typing import Any, Final, Protocol

import trio
from quart import Response, jsonify, redirect, request
from quart_trio import QuartTrio

from trionode import schemas
from trionode.api.context_errors import http_status
from trionode.api.contexts import parse_id
from trionode.api.openapi import Operations, Query
from trionode.api.tokens import token_matches
from trionode.context.errors import ContextError
from trionode.context.manager import ContextManager, b58
from trionode.context.records import PENDING
from trionode.dag.delta import decode_delta, verify_delta
from trionode.errors import ProtocolError
from trionode.store.store import AsyncStore

SESSION_COOKIE: Final = "trionode_session"
PAGE_PREFIX: Final = "/admin"
STATIC_FILES: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "index.html": "text/html; charset=utf-8",
}
MAX_DAG_NODES: Final = 500
DEFAULT_DAG_NODES: Final = 60
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class SessionBook:
    """Signed-in browser sessions, on the Trio clock; a bounded number at once."""

    def __init__(self, *, ttl: float, capacity: int) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._sessions: dict[str, float] = {}

    @property
    def ttl(self) -> float:
        return self._ttl

    def open(self) -> str:
        now = trio.current_time()
        self._sessions = {s: t for s, t in self._sessions.items() if t > now}
        if len(self._sessions) >= self._capacity:
            # The oldest session gives way: signing in must always work for the operator.
            del self._sessions[min(self._sessions, key=self._sessions.__getitem__)]
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + self._ttl
        return session

    def valid(self, session: str) -> bool:
        expires = self._sessions.get(session)
        return expires is not None and expires > trio.current_time()

    def close(self, session: str) -> None:
        self._sessions.pop(session, None)


class PageApi(Protocol):
    """What the page's own routes need from a node."""

    @property
    def token_sha256(self) -> str: ...

    @property
    def contexts(self) -> ContextManager: ...

    @property
    def store(self) -> AsyncStore: ...

    @property
    def sessions(self) -> SessionBook: ...

    def knows_context(self, context_id_b58: str) -> bool: ...


def is_page_route(path: str) -> bool:
    """The page and its files are public (they hold no data); everything they load is not."""
    return path in (PAGE_PREFIX, f"{PAGE_PREFIX}/", f"{PAGE_PREFIX}/session") or (
        path.startswith(f"{PAGE_PREFIX}/static/")
    )


def same_origin(origin: str | None) -> bool:
    """A request with no Origin, or with this node's own (the page's) origin."""
    return origin is None or origin == f"{request.scheme}://{request.host}"


def session_refusal(
    sessions: SessionBook, session: str, *, changes_state: bool, same_origin: bool
) -> tuple[int, str] | None:
    """Why a request carrying the page's session cookie is refused (status, message), or
    None: the session must be live, and a request that changes state must come from the
    page's own origin (SameSite=Strict already keeps other sites out; this is in case a
    browser ignores it)."""
    if not sessions.valid(session):
        return 401, "the page session has ended: sign in again"
    if changes_state and not same_origin:
        return 403, "cross-origin request with the page's session"
    return None


def _static(name: str) -> Response:
    body = resources.files("trionode.api").joinpath("static", name).read_bytes()
    response = Response(body, content_type=STATIC_FILES[name])
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": {"code": status, "message": message}})
    response.status_code = status
    return response


async def recent_dag(node: PageApi, context_id: bytes, limit: int) -> dict[str, Any]:
    """The newest `limit` deltas reachable from the heads, plus the pending ones.

    Walks parents breadth-first from the heads, reading each delta's signed header (no
    decryption: ids, parents, author and clock are all the graph needs). A delta applied
    as state (a checkpoint from a snapshot) has no body here and ends its branch.
    """
    root, heads, pending_count = await node.contexts.state(context_id)
    nodes: dict[bytes, dict[str, Any]] = {}
    queue = list(heads)
    while queue and len(nodes) < limit:
        delta_id = queue.pop(0)
        if delta_id in nodes:
            continue
        wire = await node.contexts.read_delta(context_id, delta_id)
        entry: dict[str, Any] = {"id": delta_id.hex(), "parents": [], "pending": False}
        if wire is None:
            entry["checkpoint"] = True
        else:
            header = verify_delta(decode_delta(wire), context_id=context_id)
            entry.update(
                parents=[p.hex() for p in header.parents],
                author=b58(header.author),
                hlc=header.hlc,
            )
            queue.extend(p for p in header.parents if any(p))
        nodes[delta_id] = entry
    for key, record in await node.store.scan(PENDING, prefix=context_id, limit=limit):
        delta_id = key[len(context_id) :]
        try:
            header = verify_delta(decode_delta(record.delta), context_id=context_id)
        except ProtocolError:
            continue
        nodes[delta_id] = {
            "id": delta_id.hex(),
            "parents": [p.hex() for p in header.parents],
            "author": b58(header.author),
            "hlc": header.hlc,
            "pending": True,
        }
    return {
        "rootHash": root.hex(),
        "heads": [h.hex() for h in heads],
        "pendingCount": pending_count,
        "nodes": list(nodes.values()),
    }


def register_page_routes(app: QuartTrio, node: PageApi, ops: Operations) -> None:
    @app.get(PAGE_PREFIX)
    async def page_redirect() -> Response:  # noqa: ASYNC124
        return redirect(f"{PAGE_PREFIX}/")  # type: ignore[return-value]

    @app.get(f"{PAGE_PREFIX}/")
    async def page() -> Response:  # noqa: ASYNC124
        return _static("index.html")

    @app.get(f"{PAGE_PREFIX}/static/<name>")
    async def static_file(name: str) -> Response:  # noqa: ASYNC124
        if name not in STATIC_FILES:
            return _error(404, "no such file")
        return _static(name)

    @app.post(f"{PAGE_PREFIX}/session")
    async def sign_in() -> Response:
        if not same_origin(request.headers.get("Origin")):
            return _error(403, "sign in from the node's own page")
        body = await request.get_json(silent=True)
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token_matches(token.strip(), node.token_sha256):
            return _error(401, "that is not this node's API token")
        session = node.sessions.open()
        response = jsonify({"signedIn": True, "expiresIn": node.sessions.ttl})
        response.set_cookie(
            SESSION_COOKIE,
            session,
            max_age=int(node.sessions.ttl),
            path="/",
            httponly=True,
            samesite="Strict",
        )
        return response

    @app.delete(f"{PAGE_PREFIX}/session")
    async def sign_out() -> Response:  # noqa: ASYNC124
        session = request.cookies.get(SESSION_COOKIE)
        if session is not None:
            node.sessions.close(session)
        response = jsonify({"signedIn": False})
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict")
        return response

    @ops.route(
        app,
        "GET",
        "/admin-api/contexts/<context_id>/dag",
        summary="The newest deltas of a context's graph, and the pending ones (the page's view)",
        tag="contexts",
        returns=schemas.Dag,
        errors=(400, 404),
        query=(Query("limit", f"at most this many deltas (1 to {MAX_DAG_NODES})"),),
    )
    async def context_dag(context_id: str) -> Response:
        if not node.knows_context(context_id):
            return _error(404, f"unknown context {context_id}")
        text = request.args.get("limit", str(DEFAULT_DAG_NODES))
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_DAG_NODES:
            return _error(400, f"limit must be an integer from 1 to {MAX_DAG_NODES}")
        try:
            return jsonify(await recent_dag(node, parse_id(context_id, "context id"), int(text)))
        except ContextError as exc:
            return _error(http_status(exc), str(exc))
