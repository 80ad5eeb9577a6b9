"""The API's request and response bodies, as msgspec Structs.

One definition serves three readers: the routes decode request bodies into these types
(after the strict JSON decoder's size and depth limits) and encode their answers from them;
`trionode.api.openapi` turns them into the OpenAPI document's schemas; and the Python client
(`trionode.client`) decodes the node's answers into them. This module imports only msgspec,
so the CLI can use it without loading the node.

Field names are camelCase on the wire (`rename="camel"`). Requests refuse unknown fields (a
typo is a 400, not a silently ignored option); responses accept them, so an older client
keeps working against a newer node.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

BASE58_ID: Final = "^[1-9A-HJ-NP-Za-km-z]{32,44}$"
Base58Id = Annotated[
    str,
    msgspec.Meta(
        pattern=BASE58_ID,
        description="32 bytes in base58 (context, application, member and blob ids)",
        examples=["6pnwRnpbGZ8yCDd4X3yVr3ZpwJbL2XExXC1aJ8uvfGLs"],
    ),
]
Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]*$", description="bytes in hex")]
Role = Literal["admin", "member", "read-only"]
Seconds = Annotated[float, msgspec.Meta(gt=0, description="seconds")]
UnixTime = Annotated[float, msgspec.Meta(description="Unix time in seconds")]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

SEVEN_DAYS: Final = 7 * 86400.0


class Request(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """A request body: a JSON object with exactly these fields."""


class Reply(msgspec.Struct, kw_only=True, rename="camel"):
    """A response body."""


# -- errors -----------------------------------------------------------------------------------


class ErrorDetail(Reply, kw_only=True):
    code: int
    """The HTTP status again."""
    message: str
    """One line saying what to fix."""
    reason: str | None = None
    """A machine-readable reason where one helps: `read-only` (the node's mode refused)."""


class ErrorReply(Reply, kw_only=True):
    """Every error answer of the REST API."""

    error: ErrorDetail


# -- the node ---------------------------------------------------------------------------------


class Health(Reply, kw_only=True):
    status: str


class Ready(Reply, kw_only=True):
    ready: bool
    peer_id: str
    version: str


class DhtStatus(Reply, kw_only=True):
    """The Kademlia DHT as this node sees it (`network.kad`)."""

    enabled: bool
    protocol: str | None = None
    server: bool = False
    """Whether we answer DHT requests (server mode) or only ask."""
    routing_table: int = 0
    """Peers in the routing table."""
    provider_records: int = 0
    """Provider records held (for others, and our own as a server)."""
    announced_contexts: int = 0
    """Our contexts announced (under their private keys) since the last republish."""
    last_bootstrap: float | None = None
    """Unix time the last bootstrap (a lookup of our own id) ended; null before the first."""
    last_announcement: float | None = None
    """Unix time the last announcement round ended; null before the first."""


class NodeInfo(Reply, kw_only=True):
    peer_id: str
    version: str
    addresses: list[str]
    reachability: dict[str, Any]
    """AutoNAT's view: `{"status": "public" | "private" | "unknown" | "disabled", ...}`."""
    mode: Literal["read-write", "read-only"] = "read-write"
    dht: DhtStatus = msgspec.field(default_factory=lambda: DhtStatus(enabled=False))


class PeerList(Reply, kw_only=True):
    peers: list[dict[str, Any]]
    """Connected peers: peer id, address, direction, streams, topics."""
    listen_addrs: list[str]


class TopicList(Reply, kw_only=True):
    topics: list[dict[str, Any]]


class ConnectRequest(Request, kw_only=True):
    address: Annotated[str, msgspec.Meta(min_length=1, examples=["/ip4/127.0.0.1/tcp/2428"])]


class Connected(Reply, kw_only=True):
    peer_id: str


# -- applications -----------------------------------------------------------------------------


class InstallRequest(Request, kw_only=True):
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    """A bundle directory or archive, read by the node (an absolute path)."""


class Application(Reply, kw_only=True):
    application_id: Base58Id
    name: str
    version: str
    path: str
    installed_at: UnixTime
    trusted: bool
    bundle_blob_id: Base58Id | None = None
    """The bundle, stored as a pinned blob (members joining fetch it from here)."""
    signer: Base58Id | None = None
    """The key that signed the bundle (None: unsigned)."""


class ApplicationList(Reply, kw_only=True):
    applications: list[Application]


class Parameter(Reply, kw_only=True):
    name: str
    type: str
    required: bool


class EntryPoint(Reply, kw_only=True):
    name: str
    kind: str
    """`method`, `view`, `init`, `handler` (and, for apps that have one, `migrate`)."""
    params: list[Parameter] = msgspec.field(default_factory=list)
    returns: str | None = None
    events: list[str] = msgspec.field(default_factory=list)
    """A handler's event names."""
    doc: str = ""


class ApplicationDetail(Application, kw_only=True):
    """An application with what it offers callers (`app show`)."""

    state: dict[str, Any] = msgspec.field(default_factory=dict)
    """The state's fields and their CRDT types."""
    entry_points: list[EntryPoint] = msgspec.field(default_factory=list)


class Uninstalled(Reply, kw_only=True):
    uninstalled: Base58Id
    contexts: list[Base58Id]
    """Contexts that used it (only with `force`): they stop working."""


# -- contexts ---------------------------------------------------------------------------------


class Member(Reply, kw_only=True):
    public_key: Base58Id
    role: str


class Context(Reply, kw_only=True):
    context_id: Base58Id
    application_id: Base58Id
    created_at: UnixTime
    root_hash: Hex
    heads: list[Hex]
    members: list[Member]
    member_public_key: Base58Id
    """This node's member key in the context."""
    waiting_for_app: str | None = None
    """Why this node cannot run the context's app yet (it was upgraded to a version being
    fetched, or one this node may not run; calls answer 503 / -32004); null when it runs."""


class Dag(Reply, kw_only=True):
    root_hash: Hex
    heads: list[Hex]
    pending_count: int
    nodes: list[dict[str, Any]]
    """`{"id", "parents", "author", "hlc", "pending"}`, or `{"id", "checkpoint": true}`."""


class ContextList(Reply, kw_only=True):
    contexts: list[Context]


class CreateContextRequest(Request, kw_only=True):
    application_id: Base58Id
    init_args: dict[str, Any] | None = None
    """The app's `init` arguments, by name."""


class Deleted(Reply, kw_only=True):
    deleted: Base58Id


class InviteRequest(Request, kw_only=True):
    role: Role = "member"
    expires_in: Seconds = SEVEN_DAYS
    invitee: Base58Id | None = None
    """Only this member key may use the invitation."""


class InvitationText(Reply, kw_only=True):
    invitation: str
    """`trinv1…`: hand it to the invitee."""


class JoinRequest(Request, kw_only=True):
    invitation: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)]
    trust_app: Base58Id | None = None
    """Run the invited app even if no trusted signer signed it (after `invitation show`)."""


class SyncResult(Reply, kw_only=True):
    applied: int
    root_hash: Hex
    heads: list[Hex]
    pending: int


class SyncStatus(Reply, kw_only=True):
    context_id: Base58Id
    running: bool
    """A sync session of this context is running now."""
    peers: list[dict[str, Any]]
    """Per peer: connected, last success (protocol, deltas), last error."""
    finality: dict[str, Any] | None = None
    """Final and non-final data deltas, their bytes against `auth.max_nonfinal_bytes`, the
    age of the oldest non-final one, the admin whose acknowledgement lags most
    (`oldestUnackedAdmin`), the admins finality waits for (`ackSet`, `waitingFor`,
    `retired`) and the final frontier."""


class MemberList(Reply, kw_only=True):
    members: list[Member]


class RoleRequest(Request, kw_only=True):
    role: Role


class MemberRemoved(Reply, kw_only=True):
    removed: Base58Id
    delta_id: Hex


class RoleChanged(Reply, kw_only=True):
    member: Base58Id
    role: Role
    delta_id: Hex


class Left(Reply, kw_only=True):
    left: Base58Id
    delta_id: Hex


class RevokeInvitationRequest(Request, kw_only=True):
    invitation: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)]


class InvitationRevoked(Reply, kw_only=True):
    revoked: Hex
    """The invitation's id."""
    delta_id: Hex


class UpgradeRequest(Request, kw_only=True):
    application_id: Base58Id
    """A newer version of the context's app, installed on this node."""


class Upgraded(Reply, kw_only=True):
    application_id: Base58Id
    """The context's application now (a concurrent upgrade to a higher version may have
    won over this one)."""
    delta_id: Hex
    """The upgrade operation."""
    migration_delta_id: Hex | None
    """The `@app.migrate` hook's writes (None: no hook, or it wrote nothing)."""


class EmptyRequest(Request, kw_only=True):
    """No fields (`{}`); an empty body is accepted too."""


# -- JSON-RPC ---------------------------------------------------------------------------------


class ExecuteParams(Request, kw_only=True):
    context_id: Base58Id
    method: NonEmpty
    args_json: dict[str, Any] | str = msgspec.field(default_factory=dict)
    """The arguments by name: an object, or that object as a JSON string."""
    executor_public_key: Base58Id | None = None


class JsonRpcRequest(Request, kw_only=True):
    jsonrpc: Literal["2.0"]
    id: str | int | float | None = None
    method: Literal["execute"]
    params: ExecuteParams


class CallResult(Reply, kw_only=True):
    output: Any
    """What the method or view returned."""
    delta_id: Hex | None
    """The delta the call wrote (None: it wrote nothing)."""
    root_hash: Hex


class JsonRpcError(Reply, kw_only=True):
    code: int
    message: str
    data: Any = None


class JsonRpcReply(Reply, kw_only=True, omit_defaults=True):
    jsonrpc: Literal["2.0"]
    id: str | int | float | None
    result: CallResult | None = None
    error: JsonRpcError | None = None


# -- tokens and tickets -----------------------------------------------------------------------


class TokenRequest(Request, kw_only=True):
    contexts: list[Base58Id]
    scope: Literal["read", "call"]
    expires_in: Seconds | None = None


class TokenRecord(Reply, kw_only=True):
    id: str
    contexts: list[Base58Id]
    scope: str
    created_at: UnixTime
    expires_at: UnixTime | None
    expired: bool


class TokenCreated(TokenRecord, kw_only=True):
    token: str
    """The secret: shown once, only its hash is kept."""


class TokenList(Reply, kw_only=True):
    tokens: list[TokenRecord]


class TokenRevoked(Reply, kw_only=True):
    revoked: str


class Ticket(Reply, kw_only=True):
    ticket: str
    expires_in: float


# -- blobs ------------------------------------------------------------------------------------


class Blob(Reply, kw_only=True):
    blob_id: Base58Id
    size: int
    chunks: int
    created_at: UnixTime
    name: str | None
    pinned: bool
    contexts: list[Base58Id]


class BlobList(Reply, kw_only=True):
    blobs: list[Blob]


class BlobDeleted(Reply, kw_only=True):
    deleted: Base58Id


class FetchBlobRequest(Request, kw_only=True):
    context_id: Base58Id


# -- maintenance ------------------------------------------------------------------------------

GcResult = dict[str, int]
"""What one garbage-collection pass removed, by kind."""
