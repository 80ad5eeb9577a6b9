"""The responder side of the state-based sync requests on one sync stream: the proof a
snapshot asks for, and tree comparison of final state (snapshots themselves stream:
`trionode.sync.snapshot`). The requester of a tree comparison is the sans-IO
machine `trionode.sync.treecmp.TreeCompare` (its module doc has the protocol and the trust
rule); this answers it from the replica's *final* view (`SyncServing.final_start`,
`tree_nodes`, `subtree_records`), so no record of a delta whose body we hold, final or
not, is ever served unsigned.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from trionode.context.manager import ContextManager
from trionode.context.snapshot import prove
from trionode.crdt import decode_entities
from trionode.errors import RemoteProtocolError
from trionode.net.host import Connection
from trionode.wire.messages import (
    MAX_IDS,
    MAX_NODE_CHILDREN,
    AuthRequest,
    AuthResponse,
    EntityPush,
    NodeRequest,
    NodeResponse,
    ProofRequest,
    PushAck,
    SnapshotRequest,
    SyncError,
    SyncMessage,
    TreeDone,
    TreeDoneAck,
    TreeNode,
    TreeStart,
    TreeStarted,
)

log = logging.getLogger(__name__)

TakeAck = Callable[[bytes, bytes], Awaitable[bool]]
"""Take one signed ack for a context (`AckBook.receive`): whether it was kept."""

REPLY_BYTES: Final = 3 * 1024 * 1024
"""Record bytes per node reply beyond its first node (which may hold one large record)."""
SERVE_MAX_REQUESTS: Final = 16384
"""Node requests a responder answers on one stream."""
SERVE_MAX_PUSHED: Final = 200_000
"""Records a responder takes on one stream."""
OLD_SNAPSHOT_REFUSED: Final = "page-by-page snapshots are no longer served: open a streamed one"


class SessionResponder:
    """The responder side of snapshot and tree-comparison messages on one sync stream
    (the driver's `SyncServer` hands them here); `member` is the requester's proven key.
    Pushed records are joined only while that key is a writer in our own resolution."""

    def __init__(
        self,
        contexts: ContextManager,
        conn: Connection,
        context_id: bytes,
        member: bytes,
        *,
        acks: TakeAck | None = None,
    ) -> None:
        self.acks = acks
        """Where a requester's signed acks go when our final frontiers differ (the AckBook)."""
        self.contexts = contexts
        self.conn = conn
        self.context_id = context_id
        self.member = member
        self._start: TreeStart | None = None
        self._requests = 0
        self._pushed = 0
        self._refused = 0

    async def handle(self, message: SyncMessage) -> SyncMessage:
        contexts, context_id = self.contexts, self.context_id
        if isinstance(message, ProofRequest):
            return await prove(contexts, self.conn, context_id)
        if isinstance(message, SnapshotRequest):
            # The page-by-page snapshot (one round trip per page) is gone: snapshots stream
            # (`SnapshotOpen`). A node too old to open one hears why, not a torn stream.
            return SyncError(message=OLD_SNAPSHOT_REFUSED)
        if isinstance(message, TreeStart):
            side, known = await contexts.final_start(context_id, message.heads)
            self._start = message
            differ = dict(message.frontier) != dict(side.frontier)
            if differ and self.acks is not None:
                for ack in message.acks:
                    await self.acks(context_id, ack)  # (drops and counts a bad one)
            return TreeStarted(
                heads=list(side.boundary[:MAX_IDS]),
                known=known[:MAX_IDS],
                root_hash=side.root,
                frontier=sorted(side.frontier.items()),
                acks=list(side.acks) if differ else [],
            )
        if isinstance(message, NodeRequest):
            self._requests += 1
            if self._requests > SERVE_MAX_REQUESTS:
                raise RemoteProtocolError("too many node requests on one stream")
            queries = [(q.id, q.after) for q in message.queries]
            nodes = await contexts.tree_nodes(
                context_id, queries, max_children=MAX_NODE_CHILDREN, max_bytes=REPLY_BYTES
            )
            return NodeResponse(
                nodes=[
                    TreeNode(id=q[0], record=r, hash=h, children=c, more=m)
                    for q, (r, h, c, m) in zip(queries, nodes, strict=False)
                ]
            )
        if isinstance(message, EntityPush):
            return await self._take_push(message)
        if isinstance(message, AuthRequest):
            ops, vvs = await contexts.auth_export(context_id, message.heads)
            return AuthResponse(ops=ops, vvs=vvs)
        if isinstance(message, TreeDone):
            if self._start is None:
                raise RemoteProtocolError("tree comparison done before it started")
            # The requester's final state, as of the boundary it announced, is joined here
            # (unless we refused some of it): its boundary becomes checkpoints.
            adopted = not self._refused
            if adopted and self._start.heads:
                await contexts.adopt_auth(context_id, message.ops, message.vvs)
                await contexts.adopt_heads(context_id, self._start.heads)
            heads, _, root = await contexts.capture(context_id, ())
            self._start = None
            return TreeDoneAck(adopted=adopted, heads=heads[:MAX_IDS], root_hash=root)
        raise RemoteProtocolError(f"unexpected {type(message).__name__} on sync stream")

    async def _take_push(self, push: EntityPush) -> PushAck:
        self._pushed += len(push.records)
        if self._pushed > SERVE_MAX_PUSHED:
            raise RemoteProtocolError("too many records pushed on one stream")
        entities = decode_entities(push.records)
        writer, _ = await self.contexts.peer_rights(self.context_id, self.member)
        allowed = entities if writer else []
        refused = len(entities) - len(allowed)
        if refused:
            self._refused += refused
            log.warning(
                "refused %d pushed records from member %s in %s",
                refused,
                self.member.hex()[:12],
                self.context_id.hex()[:12],
            )
        changed = await self.contexts.merge_state(self.context_id, allowed) if allowed else 0
        return PushAck(changed=changed or 0, refused=refused)
