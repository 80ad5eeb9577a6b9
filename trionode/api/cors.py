"""CORS for browser apps on other origins, limited to the routes such an app needs.

A web app served from another origin may call JSON-RPC and follow a context's events, nothing
else: the admin routes never answer a cross-origin browser, whatever its origin. Only origins
listed in `api.cors_origins` get the headers; an unlisted origin gets a response without
them, which the browser then refuses to hand to the page. Credentials (cookies) are never
allowed cross-origin: a browser app authenticates with a scoped token or a one-time ticket.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from quart import Response, request
from quart_trio import QuartTrio

CORS_ROUTES: Final = frozenset({"/jsonrpc", "/events", "/admin-api/tickets"})
"""What a browser app on another origin may reach (with a scoped token or a ticket)."""
ALLOWED_METHODS: Final = "GET, POST, OPTIONS"
ALLOWED_HEADERS: Final = "Authorization, Content-Type, Last-Event-ID"
PREFLIGHT_MAX_AGE: Final = "600"


def install_cors(app: QuartTrio, origins: Iterable[str]) -> None:
    """Add CORS headers for `origins` on `CORS_ROUTES` (preflights included)."""
    allowed = frozenset(origins)

    @app.after_request
    async def add_cors_headers(response: Response) -> Response:  # noqa: ASYNC124
        if request.path not in CORS_ROUTES:
            return response
        # Caches must not hand one origin's answer to another.
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if origin is None or origin not in allowed:
            return response
        response.headers["Access-Control-Allow-Origin"] = origin
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        return response
