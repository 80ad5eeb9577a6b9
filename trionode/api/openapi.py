"""The OpenAPI 3.1 document, built from the routes themselves.

Routes are registered through `Operations.route`, which records the operation (method, path,
request and response types from `trionode.schemas`) before handing the view to Quart: the
document cannot list a route that does not exist, nor miss one registered this way, and its
schemas are the types the route decodes and encodes with. `GET /openapi.json` serves it
without authentication: it describes the interface, not anything held by the node.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import attrs
import msgspec
from quart import Response, current_app, request
from quart_trio import QuartTrio

from trionode import __version__
from trionode.api.jsonio import typed
from trionode.schemas import ErrorReply, Reply

OPENAPI_PATH: Final = "/openapi.json"
View = TypeVar("View", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")
_PARAM: Final = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


@attrs.frozen
class Query:
    """A query-string parameter."""

    name: str
    description: str
    schema: dict[str, Any] = attrs.field(factory=lambda: {"type": "string"})


@attrs.frozen
class Operation:
    method: str
    path: str
    """Quart's syntax (`/admin-api/contexts/<context_id>`)."""
    summary: str
    tag: str
    body: type[Any] | None
    returns: type[Any] | None
    """The JSON answer's type; None with `content` for other media types."""
    content: str | None = None
    """A non-JSON answer's media type (`text/event-stream`, `application/octet-stream`)."""
    body_content: str | None = None
    """A non-JSON request body's media type."""
    errors: tuple[int, ...] = ()
    query: tuple[Query, ...] = ()
    public: bool = False
    description: str = ""

    @property
    def openapi_path(self) -> str:
        return _PARAM.sub(r"{\1}", self.path)

    @property
    def path_params(self) -> list[str]:
        return _PARAM.findall(self.path)


@attrs.define
class Operations:
    """What `create_app` registered, in order."""

    items: list[Operation] = attrs.field(factory=list)

    def route(
        self,
        app: QuartTrio,
        method: str,
        path: str,
        *,
        summary: str,
        tag: str,
        body: type[Any] | None = None,
        returns: type[Any] | None = None,
        content: str | None = None,
        body_content: str | None = None,
        errors: Sequence[int] = (),
        query: Sequence[Query] = (),
        public: bool = False,
        description: str = "",
    ) -> Callable[[View], View]:
        operation = Operation(
            method=method.upper(),
            path=path,
            summary=summary,
            tag=tag,
            body=body,
            returns=returns,
            content=content,
            body_content=body_content,
            errors=tuple(errors),
            query=tuple(query),
            public=public,
            description=description,
        )
        self.items.append(operation)

        def register(view: View) -> View:
            app.route(path, methods=[operation.method])(view)
            return view

        return register

    def record(self, operation: Operation) -> None:
        """Document a route served outside Quart's routing (the streamed blob upload)."""
        self.items.append(operation)


_STATUS_TEXT: Final = {
    400: "bad request: the message says what to fix",
    401: "missing or invalid bearer token",
    403: "not allowed (a scoped token, a role, or a read-only node: `reason`)",
    404: "not found",
    409: "conflict",
    412: "a precondition is missing (for example the application is not installed)",
    413: "too large",
    502: "a peer failed or refused",
    503: "the node is starting or shutting down",
    504: "a peer did not answer in time",
}


def openapi_document(operations: Sequence[Operation]) -> dict[str, Any]:
    types: list[Any] = [ErrorReply]
    for op in operations:
        types += [t for t in (op.body, op.returns) if t is not None]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    by_type = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        item: dict[str, Any] = {
            "operationId": _operation_id(op),
            "summary": op.summary,
            "tags": [op.tag],
            "responses": _responses(op, by_type),
        }
        if op.description:
            item["description"] = op.description
        if op.public:
            item["security"] = []
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in op.path_params
        ] + [
            {"name": q.name, "in": "query", "required": False, "description": q.description}
            | {"schema": q.schema}
            for q in op.query
        ]
        if parameters:
            item["parameters"] = parameters
        if op.body is not None:
            item["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": by_type[op.body]}},
            }
        elif op.body_content is not None:
            item["requestBody"] = {
                "required": True,
                "content": {op.body_content: {"schema": {"type": "string", "format": "binary"}}},
            }
        paths.setdefault(op.openapi_path, {})[op.method.lower()] = item
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trionode",
            "version": __version__,
            "description": "A trionode's HTTP API: admin REST, JSON-RPC calls, events. "
            "The WebSocket (`/ws`) is described in docs/api.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation_id(op: Operation) -> str:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", op.openapi_path) if w and w != "admin"]
    return "_".join([op.method.lower(), *words])


def _responses(op: Operation, by_type: dict[Any, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if op.returns is not None:
        responses["200"] = {
            "description": "success",
            "content": {"application/json": {"schema": by_type[op.returns]}},
        }
    elif op.content is not None:
        responses["200"] = {
            "description": "success",
            "content": {op.content: {"schema": {"type": "string"}}},
        }
    error = {"content": {"application/json": {"schema": by_type[ErrorReply]}}}
    statuses = sorted({*op.errors, *(() if op.public else (401,))})
    for status in statuses:
        responses[str(status)] = {"description": _STATUS_TEXT.get(status, "error"), **error}
    return responses


async def typed_body(kind: type[T]) -> T:
    """The request body as `kind` (a `trionode.schemas.Request`), decoded strictly (see
    `StrictJSONProvider`); an empty body is `{}`, whatever the Content-Type.

    Raises:
        BadInput: not JSON, too deep or large, or not what `kind` describes.
    """
    raw = await request.get_data()
    value = {} if not raw.strip() else current_app.json.loads(raw)
    return typed(value, kind)


def reply(value: Reply | dict[str, Any], status: int = 200) -> Response:
    """A typed answer as JSON."""
    return Response(msgspec.json.encode(value), status=status, content_type="application/json")
