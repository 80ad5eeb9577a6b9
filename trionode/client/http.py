"""HTTP client over httpx: every call returns a typed answer (`trionode.schemas`) or raises
ApiError."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Any, Protocol, TypeVar

import httpx
import msgspec
import trio  # httpx imports it anyway (its connection pool supports Trio)

from trionode import schemas
from trionode.errors import TrionodeError

T = TypeVar("T")


class ApiError(TrionodeError):
    """The node answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Http(Protocol):
    """The part of httpx.AsyncClient that Client uses."""

    @property
    def base_url(self) -> httpx.URL: ...

    async def request(self, method: str, url: str, *, json: Any = None) -> httpx.Response: ...

    async def get(self, url: str) -> httpx.Response: ...


class BlockingHttp:
    """An httpx.Client behind Client's async interface: every await completes at once.

    The CLI runs one request per process; with this transport a client coroutine never
    suspends, so it can be driven to completion without starting an event loop (see
    `run_blocking`), and the command does not pay for importing Trio.
    """

    def __init__(self, http: httpx.Client) -> None:
        self._http = http

    @property
    def base_url(self) -> httpx.URL:
        return self._http.base_url

    async def request(self, method: str, url: str, *, json: Any = None) -> httpx.Response:
        return self._http.request(method, url, json=json)

    async def get(self, url: str) -> httpx.Response:
        return self._http.get(url)


class Client:
    def __init__(self, http: Http, token: str = "") -> None:
        self._http = http
        self._token = token

    def _streaming_http(self) -> httpx.AsyncClient:
        """Streaming bodies need the async client: a Client from `open_client`."""
        if not isinstance(self._http, httpx.AsyncClient):
            raise TypeError("streaming needs a Client from open_client (under trio.run)")
        return self._http

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        """Any route, untyped: the decoded JSON answer."""
        return _checked(await self._send(method, path, json))

    async def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        if isinstance(body, msgspec.Struct):
            body = msgspec.to_builtins(body)
        try:
            return await self._http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise ApiError(f"{self._http.base_url}: timed out") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach node at {self._http.base_url}: {exc}") from None

    async def _typed(self, kind: type[T], method: str, path: str, body: Any = None) -> T:
        return _decoded(await self._send(method, path, body), kind)

    async def health(self) -> schemas.Health:
        return await self._typed(schemas.Health, "GET", "/admin-api/health")

    async def ready(self) -> schemas.Ready:
        return await self._typed(schemas.Ready, "GET", "/admin-api/ready")

    async def node_info(self) -> schemas.NodeInfo:
        return await self._typed(schemas.NodeInfo, "GET", "/admin-api/node")

    async def peers(self) -> schemas.PeerList:
        return await self._typed(schemas.PeerList, "GET", "/admin-api/peers")

    async def topics(self) -> schemas.TopicList:
        return await self._typed(schemas.TopicList, "GET", "/admin-api/topics")

    async def connect(self, address: str) -> schemas.Connected:
        body = schemas.ConnectRequest(address=address)
        return await self._typed(schemas.Connected, "POST", "/admin-api/peers", body)

    # -- applications and contexts ---------------------------------------------------------

    async def install_application(self, path: str) -> schemas.Application:
        body = schemas.InstallRequest(path=path)
        return await self._typed(schemas.Application, "POST", "/admin-api/applications", body)

    async def applications(self) -> schemas.ApplicationList:
        return await self._typed(schemas.ApplicationList, "GET", "/admin-api/applications")

    async def application(self, application_id: str) -> schemas.ApplicationDetail:
        path = f"/admin-api/applications/{application_id}"
        return await self._typed(schemas.ApplicationDetail, "GET", path)

    async def uninstall_application(
        self, application_id: str, *, force: bool = False
    ) -> schemas.Uninstalled:
        """Refused (409) while a context uses the application, unless `force`."""
        query = "?force=true" if force else ""
        path = f"/admin-api/applications/{application_id}{query}"
        return await self._typed(schemas.Uninstalled, "DELETE", path)

    async def create_context(
        self, application_id: str, init_args: dict[str, Any] | None = None
    ) -> schemas.Context:
        body = schemas.CreateContextRequest(application_id=application_id, init_args=init_args)
        return await self._typed(schemas.Context, "POST", "/admin-api/contexts", body)

    async def contexts(self) -> schemas.ContextList:
        return await self._typed(schemas.ContextList, "GET", "/admin-api/contexts")

    async def context(self, context_id: str) -> schemas.Context:
        return await self._typed(schemas.Context, "GET", f"/admin-api/contexts/{context_id}")

    async def delete_context(self, context_id: str) -> schemas.Deleted:
        return await self._typed(schemas.Deleted, "DELETE", f"/admin-api/contexts/{context_id}")

    async def invite(
        self,
        context_id: str,
        *,
        role: schemas.Role = "member",
        expires_in: float = schemas.SEVEN_DAYS,
        invitee: str | None = None,
    ) -> schemas.InvitationText:
        body = schemas.InviteRequest(role=role, expires_in=expires_in, invitee=invitee)
        path = f"/admin-api/contexts/{context_id}/invitations"
        return await self._typed(schemas.InvitationText, "POST", path, body)

    async def join(self, invitation: str, *, trust_app: str | None = None) -> schemas.Context:
        """`trust_app`: the app id to run even if no trusted signer signed it (after
        `trionode invitation show`)."""
        body = schemas.JoinRequest(invitation=invitation, trust_app=trust_app)
        return await self._typed(schemas.Context, "POST", "/admin-api/contexts/join", body)

    async def sync(self, context_id: str) -> schemas.SyncResult:
        path = f"/admin-api/contexts/{context_id}/sync"
        return await self._typed(schemas.SyncResult, "POST", path, {})

    async def members(self, context_id: str) -> schemas.MemberList:
        path = f"/admin-api/contexts/{context_id}/members"
        return await self._typed(schemas.MemberList, "GET", path)

    async def remove_member(self, context_id: str, member: str) -> schemas.MemberRemoved:
        path = f"/admin-api/contexts/{context_id}/members/{member}"
        return await self._typed(schemas.MemberRemoved, "DELETE", path)

    async def set_role(
        self, context_id: str, member: str, role: schemas.Role
    ) -> schemas.RoleChanged:
        path = f"/admin-api/contexts/{context_id}/members/{member}/role"
        body = schemas.RoleRequest(role=role)
        return await self._typed(schemas.RoleChanged, "POST", path, body)

    async def upgrade_context(self, context_id: str, application_id: str) -> schemas.Upgraded:
        """Move the context to a newer version of its app (admins only)."""
        path = f"/admin-api/contexts/{context_id}/upgrade"
        body = schemas.UpgradeRequest(application_id=application_id)
        return await self._typed(schemas.Upgraded, "POST", path, body)

    async def leave(self, context_id: str) -> schemas.Left:
        path = f"/admin-api/contexts/{context_id}/leave"
        return await self._typed(schemas.Left, "POST", path, {})

    async def revoke_invitation(
        self, context_id: str, invitation: str
    ) -> schemas.InvitationRevoked:
        path = f"/admin-api/contexts/{context_id}/invitations/revoke"
        body = schemas.RevokeInvitationRequest(invitation=invitation)
        return await self._typed(schemas.InvitationRevoked, "POST", path, body)

    async def collect_garbage(self) -> schemas.GcResult:
        return await self._typed(schemas.GcResult, "POST", "/admin-api/gc", {})

    # -- tokens ----------------------------------------------------------------------------

    async def create_token(
        self, contexts: list[str], scope: str, expires_in: float | None = None
    ) -> schemas.TokenCreated:
        """A scoped token for browser apps (`scope`: "read" or "call"); shown once."""
        body = {"contexts": contexts, "scope": scope, "expiresIn": expires_in}
        return await self._typed(schemas.TokenCreated, "POST", "/admin-api/tokens", body)

    async def tokens(self) -> schemas.TokenList:
        return await self._typed(schemas.TokenList, "GET", "/admin-api/tokens")

    async def revoke_token(self, token_id: str) -> schemas.TokenRevoked:
        path = f"/admin-api/tokens/{token_id}"
        return await self._typed(schemas.TokenRevoked, "DELETE", path)

    # -- calls -----------------------------------------------------------------------------

    async def call(
        self, context_id: str, method: str, args: dict[str, Any] | None = None
    ) -> schemas.CallResult:
        """JSON-RPC `execute`; returns the result, or raises ApiError with the JSON-RPC error
        code as its `status`."""
        params = schemas.ExecuteParams(context_id=context_id, method=method, args_json=args or {})
        body = schemas.JsonRpcRequest(jsonrpc="2.0", id=1, method="execute", params=params)
        answer = await self._typed(schemas.JsonRpcReply, "POST", "/jsonrpc", body)
        if answer.error is not None:
            error = answer.error
            raise ApiError(f"{error.code}: {error.message}", error.code)
        if answer.result is None:
            raise ApiError("the node answered JSON-RPC with neither a result nor an error")
        return answer.result

    async def watch(
        self, context_id: str, *, since: int | None = None
    ) -> AsyncGenerator[Any, None]:
        """Yield the context's applied-delta events from the WebSocket as they arrive."""
        async with aclosing(self._subscribe(context_id, since=since, kinds=("delta",))) as events:
            async for message in events:
                yield message

    async def notices(self, context_id: str, kind: str) -> AsyncGenerator[Any, None]:
        """Yield the context's transient notices of `kind` (e.g. "snapshot_progress")."""
        subscription = self._subscribe(context_id, since=None, kinds=(kind,), progress=True)
        async with aclosing(subscription) as events:
            async for message in events:
                yield message

    async def latest_notice(self, context_id: str, kind: str) -> Any | None:
        """The context's latest notice of `kind` as the node keeps it for a new subscriber
        (a snapshot's progress: `EventHub.notify`), or None. It comes before the
        subscription's answer, so this ends with the answer."""
        latest = None
        subscription = self._subscribe(
            context_id, since=None, kinds=(kind, "subscribed"), progress=True
        )
        async with aclosing(subscription) as messages:
            async for message in messages:
                if message.get("type") == "subscribed":
                    break
                latest = message
        return latest

    async def _subscribe(
        self,
        context_id: str,
        *,
        since: int | None,
        kinds: tuple[str, ...],
        progress: bool = False,
    ) -> AsyncGenerator[Any, None]:
        # Imported here: only watching needs WebSockets (and Trio), and the CLI's other
        # commands start faster without them.
        from trio_websocket import (  # noqa: PLC0415
            ConnectionClosed,
            HandshakeError,
            open_websocket_url,
        )

        url = str(self._http.base_url).replace("http", "ws", 1).rstrip("/") + "/ws"
        headers = [(b"Authorization", f"Bearer {self._token}".encode())]
        try:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                request: dict[str, Any] = {"type": "subscribe", "contextIds": [context_id]}
                if since is not None:
                    request["since"] = since
                if progress:  # the latest snapshot progress first (EventHub.add_contexts)
                    request["progress"] = True
                await ws.send_message(json.dumps(request))
                while True:
                    message = json.loads(await ws.get_message())
                    if message.get("type") == "error":
                        raise ApiError(str(message.get("message")))
                    if message.get("type") == "resync":  # `since` can't be served
                        raise ApiError(f"cannot resume: {message.get('reason')}")
                    if message.get("type") in kinds:
                        yield message
        except ConnectionClosed:
            return
        except (HandshakeError, OSError) as exc:
            raise ApiError(
                f"cannot watch {context_id} at {url}: {_handshake_reason(exc)}"
            ) from None

    # -- blobs ---------------------------------------------------------------------------------

    async def add_blob(
        self,
        content: AsyncIterator[bytes],
        *,
        size: int | None = None,
        context_id: str | None = None,
        name: str | None = None,
    ) -> schemas.Blob:
        """Upload a blob from an async byte stream (sent as it is produced, never whole)."""
        params = {k: v for k, v in (("context", context_id), ("name", name)) if v is not None}
        http = self._streaming_http()
        request = http.build_request("POST", "/admin-api/blobs", params=params)
        request.stream = _Upload(content)
        if size is None:
            del request.headers["Content-Length"]
            request.headers["Transfer-Encoding"] = "chunked"
        else:
            request.headers["Content-Length"] = str(size)
        try:
            response = await http.send(request)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot upload to {self._http.base_url}: {exc}") from None
        finally:
            if isinstance(content, AsyncGenerator):
                with trio.CancelScope(shield=True):
                    await content.aclose()
        return _decoded(response, schemas.Blob)

    async def blobs(self) -> schemas.BlobList:
        return await self._typed(schemas.BlobList, "GET", "/admin-api/blobs")

    async def blob(self, blob_id: str) -> schemas.Blob:
        return await self._typed(schemas.Blob, "GET", f"/admin-api/blobs/{blob_id}")

    async def delete_blob(self, blob_id: str) -> schemas.BlobDeleted:
        return await self._typed(schemas.BlobDeleted, "DELETE", f"/admin-api/blobs/{blob_id}")

    async def pin_blob(self, blob_id: str, *, pinned: bool = True) -> schemas.Blob:
        """Pin (or unpin) a blob: garbage collection never removes a pinned blob."""
        method = "PUT" if pinned else "DELETE"
        return await self._typed(schemas.Blob, method, f"/admin-api/blobs/{blob_id}/pin")

    async def fetch_blob(self, blob_id: str, context_id: str) -> schemas.Blob:
        """Have the node fetch a blob it lacks from members of `context_id`."""
        body = schemas.FetchBlobRequest(context_id=context_id)
        return await self._typed(schemas.Blob, "POST", f"/admin-api/blobs/{blob_id}/fetch", body)

    async def blob_content(self, blob_id: str, *, start: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from `start` on, as they arrive."""
        headers = {"Range": f"bytes={start}-"} if start else {}
        path = f"/admin-api/blobs/{blob_id}/content"
        try:
            async with self._streaming_http().stream("GET", path, headers=headers) as response:
                if response.is_error:
                    await response.aread()
                    _checked(response)
                async for piece in response.aiter_bytes():
                    yield piece
        except httpx.HTTPError as exc:
            raise ApiError(f"download from {self._http.base_url} failed: {exc}") from None

    async def metrics_text(self) -> str:
        try:
            response = await self._http.get("/metrics")
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach node at {self._http.base_url}: {exc}") from None
        if response.is_error:
            raise ApiError(
                f"{response.status_code}: {response.reason_phrase}", response.status_code
            )
        return response.text


class _Upload(httpx.AsyncByteStream):
    """A request body read from an async iterator. (httpx wraps a plain async iterable in an
    async generator of its own, left unfinished, and so warned about, when the server
    answers before the end of the body, e.g. 413.)"""

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self._source = source

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._source


def _checked(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_error:
        message = response.reason_phrase
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message", message))
        raise ApiError(f"{response.status_code}: {message}", response.status_code)
    return body


def answer_of(url: str, status: int, body: bytes, kind: type[T]) -> T:
    """The typed answer (or ApiError) of a request to `url` answered with `status` and
    `body` outside this client (a join sent before the CLI loaded it: `cli_early.py`)."""
    request = httpx.Request("POST", url)
    return _decoded(httpx.Response(status, content=body, request=request), kind)


def _decoded(response: httpx.Response, kind: type[T]) -> T:
    if response.is_error:
        _checked(response)  # raises with the node's message
    try:
        return msgspec.json.decode(response.content, type=kind)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ApiError(f"unexpected answer from {response.url.path}: {exc}") from None


def _handshake_reason(exc: BaseException) -> str:
    # trio-websocket's HandshakeError has no message of its own: the reason is its cause
    # (connection refused) or, for ConnectionRejected, the HTTP status.
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"the node answered HTTP {status}"
    return str(exc) or str(exc.__cause__ or exc.__context__ or "") or type(exc).__name__


def _verify(base_url: str) -> bool:
    """Whether the client loads the system's CA certificates: only for an https API. A
    client builds its TLS context when it is made, whatever the URL (0.1 to 0.2 s of every CLI
    command's start, for the plain-HTTP loopback API); without TLS there is nothing to
    verify."""
    return base_url.lower().startswith("https:")


@asynccontextmanager
async def open_client(
    base_url: str, token: str, *, request_timeout: float = 30.0
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=request_timeout, verify=_verify(base_url)
    ) as http:
        yield Client(http, token)


@contextmanager
def open_blocking_client(
    base_url: str, token: str, *, request_timeout: float = 30.0
) -> Iterator[Client]:
    """A Client over blocking HTTP, for `run_blocking` (no event loop, no Trio import)."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(
        base_url=base_url, headers=headers, timeout=request_timeout, verify=_verify(base_url)
    ) as http:
        yield Client(BlockingHttp(http), token)


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine whose awaits all complete at once (a Client over BlockingHttp).

    A coroutine that really suspends needs an event loop: it is closed and RuntimeError
    raised, which is a bug in the caller (use `open_client` under trio.run instead).
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError("this coroutine suspended: it needs an event loop (trio.run)")
