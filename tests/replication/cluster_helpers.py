"""Helpers for replication scenarios on in-process clusters (`open_cluster` + `autojump_clock`).

Convergence is the full condition of SCENARIOS.md, checked after `Cluster.settle()` (every
task blocked: no bytes in flight on any stream, no event queued, no handler running) and
re-checked at each pubsub heartbeat (virtual time passes only while everything waits):

* no message in flight: no delayed gossip copy held by the fault policy, no missing-parent
  fetch and no sync session running;
* no pending delta and no queued event-handler run on any node;
* every node reports the same root hash, the same heads and the same visible values (the
  app's views) for the context.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any, Final

import base58
import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trionode.config import FileConfig
from trionode.context.events import ContextEvent, Subscription
from trionode.context.records import HANDLER_PREFIX, HANDLER_RUNS
from trionode.context.replication import SYNC_PROTOCOL, _Channel, topic_for
from trionode.crdt import ntp64_from_unix
from trionode.dag.delta import (
    AuthAction,
    DeltaBody,
    DeltaHeader,
    SignedDelta,
    decode_delta,
    open_delta,
    seal_delta,
    verify_delta,
)
from trionode.node import Node
from trionode.testing import Cluster
from trionode.wire.keys import PeerId
from trionode.wire.messages import (
    DeltaRequest,
    DeltaResponse,
    SyncAuth,
    SyncMessage,
    TopicDelta,
    encode_gossip,
)

APPS: Final = Path(__file__).resolve().parents[2] / "apps"
LIMIT: Final = 300.0
"""Virtual seconds a scenario may take (autojump makes a generous bound free)."""

VIEWS: Final[dict[str, list[tuple[str, dict[str, Any]]]]] = {
    "kv_store": [("entries", {}), ("handler_calls", {})],
    "chat": [("messages", {"limit": 1000}), ("topic", {})],
    "notes": [("snapshot", {})],
}
"""The views whose results are a context's visible values, per app."""


def b58(raw: bytes) -> str:
    return base58.b58encode(raw).decode("ascii")


# -- setting up -------------------------------------------------------------------------------


def no_sync_timers(file: FileConfig) -> FileConfig:
    """No session but the ones a test runs or gossip's fetches: no ticks, heartbeats or
    greetings."""
    sync = msgspec.structs.replace(file.sync, interval=10_000.0, heartbeat=10_000.0, on_join=False)
    return msgspec.structs.replace(file, sync=sync)


async def install(node: Node, app: str) -> bytes:
    record = await node.applications.install(str(APPS / app))
    return record.application_id


async def share(
    cluster: Cluster,
    members: Sequence[int],
    app: str = "kv_store",
    *,
    roles: dict[int, str] | None = None,
    init: dict[str, Any] | None = None,
) -> bytes:
    """`members[0]` creates a context of `app`; the others are invited (with `roles`, default
    "member") and join, one by one. Returns once they have converged and gossip on the
    context's topic reaches every member."""
    roles = roles or {}
    nodes = [cluster[i] for i in members]
    app_id = b""
    for node in nodes:
        app_id = await install(node, app)
    creator = nodes[0]
    record = await creator.contexts.create(app_id, None if init is None else json.dumps(init))
    context = record.context_id
    for i in members[1:]:
        text = await creator.joins.invite(context, role=roles.get(i, "member"))
        await cluster[i].joins.join(text)
    await cluster.wait_mesh(topic_for(context))
    await wait_converged(cluster, nodes, context)
    return context


async def call(node: Node, context: bytes, method: str, **args: Any) -> Any:
    return (await node.contexts.execute(context, method, json.dumps(args))).result


async def write(node: Node, context: bytes, method: str, **args: Any) -> bytes:
    """Call a method that writes; returns the id of the delta it produced."""
    result = await node.contexts.execute(context, method, json.dumps(args))
    assert result.delta_id is not None, f"{method} wrote nothing"
    return result.delta_id


def metric(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def sync_sessions(node: Node) -> float:
    """Sync sessions `node` ran, whatever their protocol and outcome."""
    return sum(
        sample.value
        for family in node.metrics.registry.collect()
        if family.name == "trionode_sync_sessions"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def deltas(node: Node, outcome: str) -> float:
    """`trionode_deltas_total{outcome=...}` on `node`."""
    return metric(node, "trionode_deltas_total", outcome=outcome)


async def header_of(node: Node, context: bytes, delta_id: bytes) -> DeltaHeader:
    wire = await node.contexts.read_delta(context, delta_id)
    assert wire is not None, f"{node.peer_id} lacks delta {delta_id.hex()[:12]}"
    return verify_delta(decode_delta(wire), context_id=context, expected_id=delta_id)


async def body_of(node: Node, context: bytes, delta_id: bytes) -> DeltaBody:
    wire = await node.contexts.read_delta(context, delta_id)
    assert wire is not None
    delta = decode_delta(wire)
    header = verify_delta(delta, context_id=context)
    keys = await node.contexts.keys(context)
    return open_delta(delta, header, keys[header.key_id])


# -- gossip faults ----------------------------------------------------------------------------


@contextmanager
def delayed(cluster: Cluster, max_delay: float = 1.0) -> Iterator[None]:
    """While the block runs, every gossip copy a node reads is held for up to `max_delay`
    virtual seconds. Writes made in the block without waiting are then concurrent: none
    of them reaches another node before the test task blocks (the mock clock only moves
    when every task waits). Leave the block after waiting for convergence."""
    faults = cluster.faults
    assert faults is not None, "open the cluster with faults=GossipFaults()"
    previous = faults.max_delay
    faults.max_delay = max_delay
    try:
        yield
    finally:
        faults.max_delay = previous


def gossip_in_flight(cluster: Cluster) -> int:
    """Gossip copies the fault policy is still holding back (delayed deliveries)."""
    faults = cluster.faults
    if faults is None:
        return 0
    return sum(len(nursery.child_tasks) for nursery in faults._nurseries.values())


# -- convergence ------------------------------------------------------------------------------


async def visible_values(node: Node, context: bytes) -> dict[str, Any]:
    record = await node.contexts.get(context)
    app = (await node.applications.get(record.application_id)).name
    return {
        name: (await node.contexts.execute(context, name, json.dumps(args))).result
        for name, args in VIEWS[app]
    }


async def _busy(node: Node) -> str | None:
    if node.replicator._fetching:
        return f"{len(node.replicator._fetching)} deltas being fetched"
    # Sync sessions: ours (scheduled or running) and incoming ones (they share the limiter).
    if node.sync._running or node.sync.limiter.borrowed_tokens:
        return "sync sessions running"
    runs = await node.store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX)
    if runs:
        return f"{len(runs)} event-handler runs queued"
    return None


async def divergence(cluster: Cluster, nodes: Sequence[Node], context: bytes) -> str | None:
    """Why `nodes` have not converged on `context` (None: they have)."""
    in_flight = gossip_in_flight(cluster)
    if in_flight:
        return f"{in_flight} gossip copies in flight"
    first: tuple[bytes, list[bytes], dict[str, Any]] | None = None
    for node in nodes:
        busy = await _busy(node)
        if busy is not None:
            return f"{node.peer_id}: {busy}"
        root, heads, pending = await node.contexts.state(context)
        if pending:
            return f"{node.peer_id}: {pending} pending deltas"
        values = await visible_values(node, context)
        if first is None:
            first = (root, heads, values)
            continue
        if (root, heads) != first[:2]:
            return f"{node.peer_id}: root/heads differ"
        if values != first[2]:
            return f"{node.peer_id}: values differ: {values} != {first[2]}"
    return None


async def wait_converged(
    cluster: Cluster, nodes: Sequence[Node], context: bytes, limit: float = LIMIT
) -> None:
    """Wait for the full convergence condition (module docstring); fail after `limit`
    virtual seconds, saying what still differs."""
    problem: str | None = "not checked"
    try:
        with trio.fail_after(limit):
            while True:
                await cluster.settle()
                problem = await divergence(cluster, nodes, context)
                if problem is None:
                    return
                # Let virtual time move to the next pubsub heartbeat (delayed gossip lands,
                # timers fire), then re-check.
                await cluster[0].pubsub.wait_heartbeat()
    except trio.TooSlowError:
        raise AssertionError(f"no convergence after {limit} virtual seconds: {problem}") from None


# -- events -----------------------------------------------------------------------------------


def subscribe(node: Node, context: bytes) -> Subscription:
    sub = node.hub.open()
    node.hub.add_contexts(sub, [b58(context)], since=None)
    return sub


def drain(sub: Subscription) -> list[ContextEvent]:
    events: list[ContextEvent] = []
    while True:
        try:
            event = sub.receive.receive_nowait()
        except trio.WouldBlock:
            return events
        if isinstance(event, ContextEvent):  # not transient notices (blob progress)
            events.append(event)


def stack_depth() -> int:
    """Python frames below the caller (to show that a cascade does not recurse)."""
    depth = 0
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return depth


# -- raw sync streams -------------------------------------------------------------------------


async def sync_request(
    node: Node,
    peer: PeerId,
    context: bytes,
    message: SyncMessage | None = None,
    *,
    auth: SyncAuth | None = None,
) -> SyncMessage | None:
    """Open `/trionode/sync/1` from `node` to `peer`, send `auth` (default: `node`'s own
    membership proof) and `message`; return the first reply."""
    _, stream = await node.host.new_stream(peer, [SYNC_PROTOCOL])
    async with stream:
        conn = node.host.connections[peer]
        channel = _Channel(stream)
        await channel.send(auth if auth is not None else await node.replicator._auth(conn, context))
        if message is not None:
            await channel.send(message)
        reply = await channel.receive(eof_ok=True)
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_eof()
    return reply


async def raw_delta_request(
    node: Node, peer: PeerId, context: bytes, ids: list[bytes]
) -> DeltaResponse:
    reply = await sync_request(node, peer, context, DeltaRequest(ids=ids))
    assert isinstance(reply, DeltaResponse), reply
    return reply


# -- forged deltas ----------------------------------------------------------------------------


async def forge(
    node: Node,
    context: bytes,
    author: Ed25519PrivateKey,
    body: DeltaBody,
    *,
    parents: Sequence[bytes] | None = None,
    auth: AuthAction | None = None,
    key_id: int | None = None,
) -> SignedDelta:
    """A delta over `node`'s current heads (or `parents`), sealed with its current context
    key, signed by `author` (any key: a member's, a stranger's), with the sequence number
    and version vector an honest writer on those parents would use."""
    record = await node.contexts.get(context)
    keys = await node.contexts.keys(context)
    if parents is None:
        _, heads, _ = await node.contexts.state(context)
        parents = heads
    loaded = await node.contexts.replica(context)
    vv, _ = loaded.authority.merged_vv(parents)
    seq = vv.get(author.public_key().public_bytes_raw()[:8], 0) + 1
    key_id = record.key_id if key_id is None else key_id
    if auth is not None:
        auth = msgspec.structs.replace(auth, parents=loaded.authority.auth_parents(vv))
    return seal_delta(
        context_id=context,
        parents=list(parents),
        author=author,
        hlc=ntp64_from_unix(time.time()),
        key_id=key_id,
        context_key=keys[key_id],
        body=body,
        seq=seq,
        vv=vv,
        auth=auth,
    )


def gossip(node: Node, context: bytes, wire: bytes) -> None:
    """Publish delta bytes on the context's topic from `node`, as a relay or author would."""
    message = encode_gossip(TopicDelta(wire))
    node.pubsub.publish(topic_for(context), message)


async def member_key(node: Node, context: bytes) -> Ed25519PrivateKey:
    _, key = await node.contexts.member_key(context)
    return key
