"""Tree comparison: two initialised replicas that diverged exchange what differs, both ways.

```
requester (I)                                    responder (R)
  SyncAuth, ProofRequest             ──────────▶  checks I's membership
                                     ◀──────────  PeerProof (R's member key)
  TreeStart(heads H_I, known K_I)    ──────────▶  reads together: its heads H_R, which of H_I
                                     ◀──────────  it has applied (K_R), its root
  NodeRequest([(id, after)…])        ──────────▶  under its context lock, per node: record,
                                     ◀──────────  Merkle hash, (child id, child hash)…
  (join R's records; queue children whose hashes differ; collect what R lacks)
  EntityPush(records)                ──────────▶  joined if I may write (members: if admin)
                                     ◀──────────  PushAck(changed, refused)
  … breadth-first from the root, only where hashes differ …
  TreeDone                           ──────────▶  R records H_I as checkpoints
                                     ◀──────────  TreeDoneAck(adopted, heads, root)
  I records H_R as checkpoints
```

Per node, I compares R's answer with its own: equal hashes end the descent; a record R holds
is joined here, and ours is pushed when joining it into R's would change R's; a child only R
has (or whose hash differs) is asked for next; a child only we have goes to R whole, with
everything below it. Big nodes list their children in pages (`after`).

**Heads afterwards.** Records exchanged this way belong to no delta, so the DAGs must learn
what they cover. When the walk is complete, each side holds the other's state as of the
heads it announced (R's answers were read after it announced H_R, I's pushes after it
announced H_I, and state only grows), so each records the other's heads as checkpoints
(`CausalDag.checkpoint`): applied here, bodies held elsewhere. Each also drops those of its
own heads the other had already applied (K): such a head lies below one of the other's heads,
so it is no longer maximal. Both end with heads = the maximal ids of the union of both
applied sets, so a later delta from either side (its parents are those heads) applies on
both at once, and a third node that lacks a checkpointed branch fetches it from a node that
holds its bodies (or reconciles by tree comparison itself). A side that refused records
(see Trust) or a walk cut short by the caps records nothing; what was joined stays joined,
and the next session continues where the hashes still differ.

**Limits.** Hidden entities (removed, or under a removed ancestor) are not part of any hash:
two replicas whose only difference is hidden (say, two tombstones of one key with different
removal times) look equal here. Such a difference is invisible until a later write makes it
visible, and then the hashes differ and the next comparison joins the records.

**Trust.** State arriving this way carries no signatures, so both sides check the other's
member key (the requester's `SyncAuth`, the responder's `PeerProof`) against the member set:
only writers' records are joined, and records of the member set itself only from admins (as
for deltas). Refused records are counted and keep that side from recording the other's heads.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Final

import attrs

from trionode.context.errors import NotPermitted
from trionode.context.manager import ContextManager
from trionode.context.snapshot import Channel, check_proof, expect, prove, serve_page
from trionode.crdt import Entity, decode_entities, decode_entity
from trionode.crdt.entity import ROOT_ID
from trionode.errors import RemoteProtocolError
from trionode.net.host import Connection
from trionode.wire.keys import PeerId
from trionode.wire.messages import (
    MAX_IDS,
    MAX_NODE_CHILDREN,
    MAX_PAGE_RECORDS,
    AuthRequest,
    AuthResponse,
    EntityPush,
    NodeQuery,
    NodeRequest,
    NodeResponse,
    PeerProof,
    ProofRequest,
    PushAck,
    SnapshotRequest,
    SyncMessage,
    TreeDone,
    TreeDoneAck,
    TreeNode,
    TreeStart,
    TreeStarted,
)

log = logging.getLogger(__name__)

REPLY_BYTES: Final = 3 * 1024 * 1024
"""Record bytes per node reply beyond its first node (which may hold one large record)."""
PUSH_BYTES: Final = 2 * 1024 * 1024
SERVE_MAX_REQUESTS: Final = 16384
"""Node requests a responder answers on one stream."""
SERVE_MAX_PUSHED: Final = 200_000
"""Records a responder takes on one stream."""


@attrs.frozen
class TreeLimits:
    max_round_trips: int = 1024
    """Node requests per session."""
    max_records: int = 100_000
    """Records pulled plus pushed per session."""


@attrs.define
class TreeResult:
    round_trips: int = 0
    pulled: int = 0
    """Records received and joined here."""
    pushed: int = 0
    """Records sent to the peer."""
    refused_here: int = 0
    refused_there: int = 0
    complete: bool = True
    """The walk reached every differing node within the caps."""
    adopted_here: bool = False
    adopted_there: bool = False
    bytes_received: int = 0
    bytes_sent: int = 0


def _adds(mine: Entity, theirs: Entity) -> bool:
    """Whether joining `mine` into `theirs` would change it."""
    return theirs.copy().merge(mine).changed


def _check_children(node: TreeNode, after: bytes | None) -> None:
    previous = after
    for child_id, _ in node.children:
        if previous is not None and child_id <= previous:
            raise RemoteProtocolError("node children out of order")
        previous = child_id
    if node.more and not node.children:
        raise RemoteProtocolError("a node with more children listed none")


async def compare(
    contexts: ContextManager,
    channel: Channel,
    conn: Connection,
    peer: PeerId,
    context_id: bytes,
    *,
    peer_heads: list[bytes],
    limits: TreeLimits | None = None,
) -> TreeResult:
    """Run a tree comparison as the requester over an authenticated sync `channel`.

    `peer_heads` are the heads the peer announced (`HeadsResponse`): we tell it which of
    them we have applied. Raises NotPermitted if the peer is not a writer of the context,
    RemoteProtocolError for malformed answers.
    """
    limits = limits or TreeLimits()
    await channel.send(ProofRequest())
    member = check_proof(conn, context_id, await expect(channel, PeerProof))
    writer, admin = await contexts.peer_rights(context_id, member)
    if not writer:
        raise NotPermitted(f"{peer} is not a writer of this context: no state from it")
    our_heads, known, _ = await contexts.capture(context_id, peer_heads)
    await channel.send(TreeStart(heads=our_heads[:MAX_IDS], known=known[:MAX_IDS]))
    started = await expect(channel, TreeStarted)
    result = TreeResult()
    queue: deque[tuple[bytes, bytes | None]] = deque([(ROOT_ID, None)])
    while queue:
        if (
            result.round_trips >= limits.max_round_trips
            or result.pulled + result.pushed >= limits.max_records
        ):
            result.complete = False
            break
        batch = [queue.popleft() for _ in range(min(len(queue), MAX_IDS))]
        await channel.send(NodeRequest(queries=[NodeQuery(id=i, after=a) for i, a in batch]))
        reply = await expect(channel, NodeResponse)
        result.round_trips += 1
        if not reply.nodes or len(reply.nodes) > len(batch):
            raise RemoteProtocolError("node reply answers no query or too many")
        answered = batch[: len(reply.nodes)]
        queue.extend(batch[len(reply.nodes) :])
        local = await contexts.tree_nodes(context_id, answered)
        pulls: list[Entity] = []
        pushes: list[bytes] = []
        push_roots: list[bytes] = []
        for (entity_id, after), remote, (record, own_hash, own_children, _) in zip(
            answered, reply.nodes, local, strict=True
        ):
            if remote.id != entity_id:
                raise RemoteProtocolError("node reply out of order")
            _check_children(remote, after)
            result.bytes_received += len(remote.record or b"") + 66 * len(remote.children)
            if remote.hash is not None and remote.hash == own_hash:
                continue  # the same subtree on both sides
            theirs: Entity | None = None
            if remote.record is not None:
                theirs = decode_entity(remote.record)
                if theirs.id != entity_id:
                    raise RemoteProtocolError("node record does not match its id")
                if after is None:
                    pulls.append(theirs)
            if record is not None and after is None:
                if theirs is None and entity_id != ROOT_ID:
                    push_roots.append(entity_id)  # the peer lacks it and all below it
                    continue
                if theirs is not None and _adds(decode_entity(record), theirs):
                    pushes.append(record)
            upto = remote.children[-1][0] if remote.more else None
            ours = dict(own_children)
            for child_id, child_hash in remote.children:
                if child_id in ours and ours[child_id] == child_hash:
                    continue  # equal, or hidden on both sides
                queue.append((child_id, None))
            listed = {child_id for child_id, _ in remote.children}
            push_roots.extend(
                child_id
                for child_id, _ in own_children
                if child_id not in listed and (upto is None or child_id <= upto)
            )
            if remote.more:
                queue.append((entity_id, upto))
        await _join_pulled(contexts, context_id, pulls, admin=admin, result=result)
        await _push(
            contexts,
            channel,
            context_id,
            records=pushes,
            roots=push_roots,
            limits=limits,
            result=result,
        )
    if result.complete:
        ops, vvs = await contexts.auth_export(context_id, our_heads[:MAX_IDS])
        await channel.send(TreeDone(ops=ops, vvs=vvs))
        done = await expect(channel, TreeDoneAck)
        result.adopted_there = done.adopted
        if not result.refused_here:
            await channel.send(AuthRequest(heads=started.heads[:MAX_IDS]))
            auth = await expect(channel, AuthResponse)
            await contexts.adopt_auth(context_id, auth.ops, auth.vvs)
            await contexts.adopt_heads(context_id, started.heads, started.known)
            result.adopted_here = True
    log.info(
        "tree comparison of %s with %s: %d round trips, %d pulled, %d pushed, %s",
        context_id.hex()[:12],
        peer,
        result.round_trips,
        result.pulled,
        result.pushed,
        "complete" if result.complete else "cut short",
    )
    return result


async def _join_pulled(
    contexts: ContextManager,
    context_id: bytes,
    pulls: list[Entity],
    *,
    admin: bool,
    result: TreeResult,
) -> None:
    if pulls:
        await contexts.merge_state(context_id, pulls)
        result.pulled += len(pulls)


async def _push(
    contexts: ContextManager,
    channel: Channel,
    context_id: bytes,
    *,
    records: list[bytes],
    roots: list[bytes],
    limits: TreeLimits,
    result: TreeResult,
) -> None:
    if roots:
        room = max(limits.max_records - result.pulled - result.pushed - len(records), 0)
        below, whole = await contexts.subtree_records(context_id, roots, room)
        records = records + below
        if not whole:
            result.complete = False
    start = 0
    while start < len(records):
        end = start + 1
        size = len(records[start])
        while (
            end < len(records)
            and end - start < MAX_PAGE_RECORDS
            and size + len(records[end]) <= PUSH_BYTES
        ):
            size += len(records[end])
            end += 1
        await channel.send(EntityPush(records=records[start:end]))
        ack = await expect(channel, PushAck)
        result.pushed += end - start
        result.refused_there += ack.refused
        result.bytes_sent += size
        start = end


class SessionResponder:
    """The responder side of snapshot and tree-comparison messages on one sync stream
    (`Replicator._serve_session` hands them here); `member` is the requester's proven key."""

    def __init__(
        self, contexts: ContextManager, conn: Connection, context_id: bytes, member: bytes
    ) -> None:
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
            return await serve_page(contexts, context_id, message)
        if isinstance(message, TreeStart):
            heads, known, root = await contexts.capture(context_id, message.heads)
            self._start = message
            return TreeStarted(heads=heads[:MAX_IDS], known=known[:MAX_IDS], root_hash=root)
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
            adopted = not self._refused
            if adopted:
                await contexts.adopt_auth(context_id, message.ops, message.vvs)
                root, heads = await contexts.adopt_heads(
                    context_id, self._start.heads, self._start.known
                )
            else:
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
