"""Blob routes: streaming upload, download with HTTP Range, list, show, delete.

```
POST   /admin-api/blobs?context=CTX&name=NAME   body = the bytes     → the blob's info
GET    /admin-api/blobs                                              → {"blobs": [...]}
GET    /admin-api/blobs/<id>                                         → info
GET    /admin-api/blobs/<id>/content   (Range: bytes=a-b)            → the bytes (200/206)
POST   /admin-api/blobs/<id>/fetch     {"contextId": CTX}            → info, once fetched from
                                                                       members of CTX
DELETE /admin-api/blobs/<id>                                         → {"deleted": id}
PUT    /admin-api/blobs/<id>/pin       DELETE …/pin                 → info (GC keeps pinned blobs)
```
Blob ids are base58, like context and application ids.

The upload never holds the body: Quart buffers a request body as fast as the server hands
it over, whatever the handler consumes, so `POST /admin-api/blobs` is served by a small
ASGI layer in front of Quart (`wrap_upload`) that takes the body message by message and
writes chunk by chunk. Hypercorn stops reading the socket while its queue to the app is
full, so a fast client waits for the disk instead of filling memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from contextlib import aclosing
from typing import Any, Final, Protocol
from urllib.parse import parse_qs

import base58
import msgspec
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    HTTPScope,
    Scope,
)
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.http import parse_range_header

from trionode import schemas
from trionode.api.openapi import Operation, Operations, Query, View, reply, typed_body
from trionode.blobs.manifest import BlobNotFoundError, BlobTooLargeError
from trionode.blobs.store import BlobInfo, BlobStore
from trionode.blobs.transfer import BlobTransfer, BlobUnavailableError
from trionode.errors import ReadOnlyError, StorageError

log = logging.getLogger(__name__)

AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]

UPLOAD_PATH: Final = "/admin-api/blobs"
DRAIN_LIMIT: Final = 16 * 1024 * 1024
"""Bytes of a refused upload still read so the client sees the answer (beyond: close)."""


class BlobApi(Protocol):
    @property
    def blobs(self) -> BlobStore: ...

    @property
    def blob_transfer(self) -> BlobTransfer: ...

    def knows_context(self, context_id_b58: str) -> bool: ...


class BlobRequestError(Exception):
    """A bad blob request: the message goes to the client with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _ClientGone(Exception):
    """The uploading client disconnected before the end of the body."""


def b58(raw: bytes) -> str:
    return base58.b58encode(raw).decode("ascii")


def parse_blob_id(text: str, what: str = "blob id") -> bytes:
    try:
        raw = base58.b58decode(text)
    except ValueError:
        raise BlobRequestError(f"{what} {text[:80]!r} is not base58") from None
    if len(raw) != 32:
        raise BlobRequestError(f"{what} {text[:80]!r} is not 32 bytes")
    return raw


def blob_reply(info: BlobInfo) -> schemas.Blob:
    return schemas.Blob(
        blob_id=b58(info.blob_id),
        size=info.size,
        chunks=info.chunks,
        created_at=info.created_at,
        name=info.name,
        pinned=info.pinned,
        contexts=[b58(c) for c in info.contexts],
    )


def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"code": status, "message": message}}).encode()


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (start, stop) a Range header asks for, None for the whole blob.

    BlobRequestError(416) when it cannot be satisfied; several ranges are not supported.
    """
    if header is None:
        return None
    parsed = parse_range_header(header)
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) != 1:
        raise BlobRequestError("only one range of bytes is supported", 416)
    bounds = parsed.range_for_length(size)
    if bounds is None:
        raise BlobRequestError(f"range not satisfiable for {size} bytes", 416)
    return bounds


# -- upload (raw ASGI) ----------------------------------------------------------------------


UploadAuth = Callable[[Mapping[str, str], str], tuple[int, str] | None]
"""(the request's headers, lowercased names; its own origin) → None when it may upload,
else the refusal (status, message)."""


def wrap_upload(
    asgi_app: ASGIFramework,
    node: BlobApi,
    authorize: UploadAuth,
    on_done: Callable[[int], None],
) -> AsgiApp:
    """Serve `POST /admin-api/blobs` before Quart sees it; everything else goes to Quart.

    `on_done(status)` records the request (Quart's hooks do not run for it).
    """

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"].rstrip("/") != UPLOAD_PATH
        ):
            await asgi_app(scope, receive, send)
            return
        request_body = _RequestBody(receive)
        try:
            try:
                status, body = await _upload(scope, request_body, node, authorize)
            except BlobRequestError as exc:
                status, body = exc.status, _error_body(exc.status, str(exc))
                # Read (a bounded amount of) what the client is still sending, so that it
                # gets to read the answer and may keep the connection.
                await request_body.drain(DRAIN_LIMIT)
        except _ClientGone:
            on_done(499)
            return
        on_done(status)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if not request_body.finished:
            headers.append((b"connection", b"close"))
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": status,
            "headers": headers,
        }
        await send(start)
        end: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": body,
            "more_body": False,
        }
        await send(end)

    return app


class _RequestBody:
    """The request body, message by message, remembering whether it was read to the end."""

    def __init__(self, receive: ASGIReceiveCallable) -> None:
        self._receive = receive
        self.finished = False

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        while not self.finished:
            message = await self._receive()
            if message["type"] != "http.request":
                raise _ClientGone  # http.disconnect
            self.finished = not message.get("more_body", False)
            if message["body"]:
                yield message["body"]

    async def drain(self, limit: int) -> None:
        """Discard up to `limit` more bytes of body."""
        read = 0
        async with aclosing(self.pieces()) as pieces:
            async for piece in pieces:
                read += len(piece)
                if read > limit:
                    return


async def _upload(
    scope: HTTPScope,
    body: _RequestBody,
    node: BlobApi,
    authorize: UploadAuth,
) -> tuple[int, bytes]:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    refusal = authorize(headers, f"{scope['scheme']}://{headers.get('host', '')}")
    if refusal is not None:
        raise BlobRequestError(refusal[1], refusal[0])
    query = parse_qs(scope["query_string"].decode("latin-1"), max_num_fields=8)
    context_id = None
    if "context" in query:
        text = query["context"][0]
        context_id = parse_blob_id(text, "context id")
        if not node.knows_context(text):
            raise BlobRequestError(f"unknown context {text}", 404)
    name = query.get("name", [None])[0]
    if name is not None and len(name) > 255:
        raise BlobRequestError("name is longer than 255 characters")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > node.blobs.max_size:
        raise BlobRequestError(f"blob exceeds the limit of {node.blobs.max_size} bytes", 413)

    try:
        info = await node.blobs.add(body.pieces(), context_id=context_id, name=name)
    except BlobTooLargeError as exc:
        raise BlobRequestError(str(exc), 413) from None
    except ReadOnlyError as exc:
        raise BlobRequestError(str(exc), 403) from None
    except StorageError as exc:
        log.error("blob upload failed: %s", exc)  # noqa: TRY400 - no traceback
        raise BlobRequestError(f"storage failed: {exc}", 500) from None
    return 200, msgspec.json.encode(blob_reply(info))


# -- everything else (Quart routes) ---------------------------------------------------------


def register_blob_routes(app: QuartTrio, node: BlobApi, ops: Operations) -> None:
    ops.record(
        Operation(
            method="POST",
            path=UPLOAD_PATH,
            summary="Upload a blob (the body is the bytes, streamed; chunked or with a length)",
            tag="blobs",
            body=None,
            body_content="application/octet-stream",
            returns=schemas.Blob,
            errors=(400, 403, 404, 413),
            query=(
                Query("context", "share it with this context's members"),
                Query("name", "a file name to keep with it"),
            ),
        )
    )

    @app.errorhandler(BlobRequestError)
    async def blob_request_error(exc: BlobRequestError) -> Response:  # noqa: ASYNC124
        return _json_error(exc.status, str(exc))

    @app.errorhandler(BlobNotFoundError)
    async def blob_not_found(exc: BlobNotFoundError) -> Response:  # noqa: ASYNC124
        return _json_error(404, str(exc))

    def blob_route(method: str, path: str, summary: str, **kwargs: Any) -> Callable[[View], View]:
        return ops.route(app, method, path, summary=summary, tag="blobs", **kwargs)

    @blob_route("GET", "/admin-api/blobs", "Blobs held here", returns=schemas.BlobList)
    async def list_blobs() -> Response:
        return reply(schemas.BlobList(blobs=[blob_reply(i) for i in await node.blobs.list_blobs()]))

    @blob_route(
        "GET", "/admin-api/blobs/<blob_id>", "One blob", returns=schemas.Blob, errors=(400, 404)
    )
    async def show_blob(blob_id: str) -> Response:
        return reply(blob_reply(await _info(node, parse_blob_id(blob_id))))

    @blob_route(
        "DELETE",
        "/admin-api/blobs/<blob_id>",
        "Delete a blob held here",
        returns=schemas.BlobDeleted,
        errors=(400, 404),
    )
    async def delete_blob(blob_id: str) -> Response:
        if not await node.blobs.delete(parse_blob_id(blob_id)):
            raise BlobNotFoundError(f"blob {blob_id} is not stored here")
        return reply(schemas.BlobDeleted(deleted=blob_id))

    @blob_route(
        "PUT",
        "/admin-api/blobs/<blob_id>/pin",
        "Pin a blob: garbage collection never removes it",
        returns=schemas.Blob,
        errors=(400, 404),
    )
    async def pin_blob(blob_id: str) -> Response:
        info = await _info(node, parse_blob_id(blob_id))
        await node.blobs.pin(info.blob_id)
        return reply(blob_reply(await _info(node, info.blob_id)))

    @blob_route(
        "DELETE",
        "/admin-api/blobs/<blob_id>/pin",
        "Unpin a blob",
        returns=schemas.Blob,
        errors=(400, 404),
    )
    async def unpin_blob(blob_id: str) -> Response:
        info = await _info(node, parse_blob_id(blob_id))
        await node.blobs.pin(info.blob_id, pinned=False)
        return reply(blob_reply(await _info(node, info.blob_id)))

    @blob_route(
        "POST",
        "/admin-api/blobs/<blob_id>/fetch",
        "Fetch a blob this node lacks from a context's members",
        body=schemas.FetchBlobRequest,
        returns=schemas.Blob,
        errors=(400, 404),
    )
    async def fetch_blob(blob_id: str) -> Response:
        context = (await typed_body(schemas.FetchBlobRequest)).context_id
        context_id = parse_blob_id(context, "context id")
        if not node.knows_context(context):
            raise BlobRequestError(f"unknown context {context}", 404)
        try:
            info = await node.blob_transfer.fetch(parse_blob_id(blob_id), context_id)
        except BlobUnavailableError as exc:
            raise BlobRequestError(str(exc), 404) from None
        return reply(blob_reply(info))

    @blob_route(
        "GET",
        "/admin-api/blobs/<blob_id>/content",
        "The blob's bytes (`Range: bytes=N-` resumes: 206)",
        content="application/octet-stream",
        errors=(400, 404),
    )
    async def blob_content(blob_id: str) -> Response:
        info = await _info(node, parse_blob_id(blob_id))
        bounds = byte_range(request.headers.get("Range"), info.size)
        start, stop = bounds if bounds is not None else (0, info.size)
        chunks = await node.blobs.read(info.blob_id, start, stop)
        response = Response(_guarded(chunks), content_type="application/octet-stream")
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["Content-Length"] = str(stop - start)
        if bounds is not None:
            response.status_code = 206
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{info.size}"
        return response


async def _info(node: BlobApi, blob_id: bytes) -> BlobInfo:
    info = await node.blobs.info(blob_id)
    if info is None:
        raise BlobNotFoundError(f"blob {b58(blob_id)} is not stored here")
    return info


async def _guarded(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # Headers are already sent when a damaged chunk shows up: all we can do is log it and
    # cut the response short, so the client sees fewer bytes than Content-Length.
    try:
        async for piece in chunks:
            yield piece
    except StorageError as exc:
        log.error("serving a blob failed: %s", exc)  # noqa: TRY400 - no traceback


def _json_error(status: int, message: str) -> Response:
    response = jsonify({"error": {"code": status, "message": message}})
    response.status_code = status
    return response
