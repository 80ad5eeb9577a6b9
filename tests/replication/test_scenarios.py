"""SCENARIOS 1-8 and 16-21 on in-process clusters (`open_cluster`, `autojump_clock`).

Every test bounds itself with `trio.fail_after` in virtual seconds and waits for
convergence on the full condition (`cluster_helpers.wait_converged`), never on a sleep.
Concurrent writes are made concurrent with `cluster_helpers.delayed`: gossip copies are held
back for a random virtual delay, so writes made without waiting cannot see each other.
Gossip loss and duplication come from `GossipFaults` (`applies=` restricts them to one
receiver or one delta).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import base58
import msgspec
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trionode.auth.model import Kind
from trionode.config import FileConfig
from trionode.context import invitations as inv
from trionode.context.authority import action
from trionode.context.events import ContextEvent
from trionode.context.manager import ContextError
from trionode.context.records import CONTEXTS, DELTAS
from trionode.context.replication import (
    SYNC_PROTOCOL,
    _Channel,
    auth_message,
    context_of,
    topic_for,
)
from trionode.dag.dag import Defer
from trionode.dag.delta import SignedDelta, decode_delta, open_delta, verify_delta
from trionode.errors import RemoteProtocolError
from trionode.net.events import GossipMessage, NetworkEvent
from trionode.net.memory import GossipFaults
from trionode.node import Node
from trionode.sdk.errors import ReadOnlyCallError
from trionode.store.lmdb_store import Column
from trionode.testing import Cluster, open_cluster
from trionode.wire.gossipsub import DropReason
from trionode.wire.keys import PeerId
from trionode.wire.messages import (
    DeltaBatch,
    DeltaGossip,
    DeltaRequest,
    DeltaResponse,
    SyncAuth,
    SyncError,
    TopicDelta,
    decode_gossip,
)
from trionode.wire.pubsub_pb import PubsubMessage

from .cluster_helpers import (
    LIMIT,
    body_of,
    call,
    delayed,
    deltas,
    drain,
    forge,
    gossip,
    header_of,
    install,
    member_key,
    metric,
    raw_delta_request,
    share,
    stack_depth,
    subscribe,
    sync_request,
    wait_converged,
    write,
)

# -- helpers ----------------------------------------------------------------------------------


def child_of(
    receiver: PeerId, parents: list[bytes]
) -> Callable[[PeerId, PeerId, PubsubMessage], bool]:
    """A fault filter: gossip to `receiver` of the delta whose parents are `parents` (the
    next delta written on those heads), whoever relays it. Decided from the message itself,
    so it holds however soon a peer reads it."""

    def applies(to: PeerId, _sender: PeerId, message: PubsubMessage) -> bool:
        if to != receiver or message.data is None:
            return False
        try:
            message_gossip = decode_gossip(message.data)
            if isinstance(message_gossip, TopicDelta | DeltaGossip):
                wires = [message_gossip.delta]
            elif isinstance(message_gossip, DeltaBatch):
                wires = message_gossip.deltas
            else:
                return False
            context = context_of(message.topic or "")
            return context is not None and any(
                verify_delta(decode_delta(w), context_id=context).parents == parents for w in wires
            )
        except RemoteProtocolError:
            return False

    return applies


def to_node(cluster: Cluster, index: int) -> Callable[[PeerId, PeerId, PubsubMessage], bool]:
    """A fault filter: every message node `index` receives."""
    peer = cluster.peer_ids[index]

    def applies(receiver: PeerId, _sender: PeerId, _message: PubsubMessage) -> bool:
        return receiver == peer

    return applies


def drain_channel(channel: trio.MemoryReceiveChannel[NetworkEvent]) -> list[NetworkEvent]:
    out: list[NetworkEvent] = []
    while True:
        try:
            out.append(channel.receive_nowait())
        except trio.WouldBlock:
            return out


def flip(data: bytes) -> bytes:
    """`data` with its last bit flipped."""
    return data[:-1] + bytes([data[-1] ^ 1])


def make_auth(context: bytes, key: Ed25519PrivateKey, signed: bytes) -> SyncAuth:
    """A sync membership proof for `context` by `key`, signing `signed`."""
    member = key.public_key().public_bytes_raw()
    return SyncAuth(context_id=context, member=member, signature=key.sign(signed))


def skewed_clock(skew: float) -> float:
    return time.time() + skew


def events_for(seen: list[ContextEvent], delta_id: bytes) -> list[ContextEvent]:
    return [event for event in seen if event.delta_id == delta_id.hex()]


# -- 1. linear propagation --------------------------------------------------------------------


async def test_1_linear_propagation(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], app="chat")
            subs = [subscribe(node, context) for node in cluster]
            before = {
                node: (deltas(node, "applied"), deltas(node, "duplicate")) for node in cluster
            }
            fetches = [metric(n, "trionode_delta_fetches_total", outcome="ok") for n in cluster]
            started = trio.current_time()

            d = await write(a, context, "set_topic", topic="hello")
            await cluster.settle()  # one gossip hop: no virtual time passes
            assert trio.current_time() == started
            for node in cluster:
                _, heads, pending = await node.contexts.state(context)
                assert (heads, pending) == ([d], 0)
                assert await call(node, context, "topic") == "hello"
            await wait_converged(cluster, [a, b, c], context)

            # B and C applied it once, from gossip (no fetch); A never applied its echo.
            assert deltas(a, "applied") == before[a][0]
            for node in (b, c):
                assert deltas(node, "applied") == before[node][0] + 1
            for node in cluster:
                assert deltas(node, "duplicate") == before[node][1]
            assert fetches == [
                metric(n, "trionode_delta_fetches_total", outcome="ok") for n in cluster
            ]
            for node, sub in zip(cluster, subs, strict=True):
                seen = events_for(drain(sub), d)
                assert [e.origin for e in seen] == (["local"] if node is a else ["remote"])


# -- 2. duplicates ----------------------------------------------------------------------------


async def test_2_duplicates_are_no_ops(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Every gossip copy is delivered twice to the routers (which must drop the second).
    faults = GossipFaults(duplicate=1.0, seed=2)
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, faults=faults) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], app="kv_store")
            subs = [subscribe(node, context) for node in cluster]
            handled = [metric(n, "trionode_handler_runs_total", outcome="ok") for n in cluster]
            d = await write(a, context, "set", key="k", value="v")
            await wait_converged(cluster, [a, b, c], context)
            assert faults.statistics().duplicated > 0
            state = await b.contexts.state(context)
            values = await call(b, context, "entries")
            for sub in subs:
                assert len(events_for(drain(sub), d)) == 1
            # kv_store's handler ran once on each receiving node, none on the author.
            ran = [metric(n, "trionode_handler_runs_total", outcome="ok") for n in cluster]
            assert [r - h for r, h in zip(ran, handled, strict=True)] == [0, 1, 1]

            # The same delta again, by sync (B fetches it from A) and by direct delivery.
            duplicates = deltas(b, "duplicate")
            assert await b.replicator.fetch(cluster.peer_ids[0], context, {d}) == 0
            assert deltas(b, "duplicate") == duplicates + 1
            wire = await a.contexts.read_delta(context, d)
            assert wire is not None
            again = await b.contexts.receive(context, wire)
            assert again.duplicate
            assert again.applied == []
            assert deltas(b, "duplicate") == duplicates + 2
            await wait_converged(cluster, [a, b, c], context)
            assert await b.contexts.state(context) == state
            assert await call(b, context, "entries") == values
            assert drain(subs[1]) == []  # no second event
            assert metric(b, "trionode_handler_runs_total", outcome="ok") == ran[1]


# -- 3. out of order --------------------------------------------------------------------------


async def test_3_out_of_order(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    faults = GossipFaults()
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, faults=faults) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], app="chat")
            # B hears no gossip for now: it gets d1 and d2 only as the test hands them over.
            faults.applies = to_node(cluster, 1)
            faults.drop = 1.0
            d1 = await write(a, context, "set_topic", topic="one")
            d2 = await write(a, context, "set_topic", topic="two")
            await cluster.settle()
            wire1 = await a.contexts.read_delta(context, d1)
            wire2 = await a.contexts.read_delta(context, d2)
            assert wire1 is not None
            assert wire2 is not None
            assert (await header_of(a, context, d2)).parents == [d1]
            _, heads_before, _ = await b.contexts.state(context)

            # d2 first: pending (persisted), and d1 is what B must ask for.
            pending_before = deltas(b, "pending")
            early = await b.contexts.receive(context, wire2)
            assert early.applied == []
            assert early.missing == frozenset({d1})
            _, heads, pending = await b.contexts.state(context)
            assert (heads, pending) == (heads_before, 1)
            assert await b.contexts.missing(context) == {d1}
            assert await b.contexts.read_delta(context, d2) is None
            assert deltas(b, "pending") == pending_before + 1

            # d1 arrives: both apply, in causal order, and the heads become [d2].
            cascaded = deltas(b, "cascaded")
            late = await b.contexts.receive(context, wire1)
            assert late.applied == [d1, d2]
            _, heads, pending = await b.contexts.state(context)
            assert (heads, pending) == ([d2], 0)
            assert await call(b, context, "topic") == "two"
            assert deltas(b, "cascaded") == cascaded + 1

            # Over the network: C gets d4 before d3 (d3's gossip to C is held back); C asks
            # the sender for d3 at once and applies both.
            faults.applies, faults.drop = None, 0.0
            await wait_converged(cluster, [a, b, c], context)
            faults.applies = child_of(cluster.peer_ids[2], [d2])
            faults.max_delay = 30.0
            pending_before = deltas(c, "pending")
            fetched = metric(c, "trionode_delta_fetches_total", outcome="ok")
            await write(a, context, "set_topic", topic="three")
            d4 = await write(a, context, "set_topic", topic="four")
            await wait_converged(cluster, [a, b, c], context)
            assert deltas(c, "pending") == pending_before + 1
            assert metric(c, "trionode_delta_fetches_total", outcome="ok") == fetched + 1
            _, heads, _ = await c.contexts.state(context)
            assert heads == [d4]
            assert await call(c, context, "topic") == "four"


# -- 4. missing parent pulled -----------------------------------------------------------------


async def test_4_missing_parent_pulled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faults = GossipFaults()
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, faults=faults) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], app="chat")
            # d1's gossip to B is lost (from A and from C's relay alike).
            _, heads, _ = await a.contexts.state(context)
            faults.applies = child_of(cluster.peer_ids[1], heads)
            faults.drop = 1.0
            fetched = metric(b, "trionode_delta_fetches_total", outcome="ok")
            d1 = await write(a, context, "set_topic", topic="1")
            wire1 = await a.contexts.read_delta(context, d1)
            await cluster.settle()
            assert faults.statistics().dropped >= 1
            assert await b.contexts.read_delta(context, d1) is None
            assert await call(b, context, "topic") == ""

            d2 = await write(a, context, "set_topic", topic="2")
            await wait_converged(cluster, [a, b, c], context)
            # B got d2, found d1 missing, pulled it from the sender over /trionode/sync/1.
            assert metric(b, "trionode_delta_fetches_total", outcome="ok") == fetched + 1
            assert await b.contexts.read_delta(context, d1) == wire1
            _, heads, _ = await b.contexts.state(context)
            assert heads == [d2]

            # A peer that lacks a requested delta says so (`missing`), it does not stay silent.
            unknown = bytes(range(32))
            reply = await raw_delta_request(b, cluster.peer_ids[0], context, [unknown, d1])
            assert reply.missing == [unknown]
            assert [decode_delta(w).id for w in reply.deltas] == [d1]


# -- 5. concurrent writes ---------------------------------------------------------------------


async def test_5_concurrent_writes(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, faults=GossipFaults(seed=5)) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], app="chat")
            _, common, _ = await a.contexts.state(context)
            with delayed(cluster):
                da = await write(a, context, "post", text="from a")
                db = await write(b, context, "post", text="from b")
                await wait_converged(cluster, [a, b, c], context)
            assert (await header_of(a, context, da)).parents == common
            assert (await header_of(a, context, db)).parents == common
            roots = set()
            for node in cluster:
                root, heads, _ = await node.contexts.state(context)
                assert heads == sorted([da, db])
                roots.add(root)
            assert len(roots) == 1

            # The next write anywhere has both as parents and collapses the heads.
            dc = await write(c, context, "post", text="after")
            assert (await header_of(c, context, dc)).parents == sorted([da, db])
            await wait_converged(cluster, [a, b, c], context)
            for node in cluster:
                _, heads, _ = await node.contexts.state(context)
                assert heads == [dc]
            texts = [m["text"] for m in await call(a, context, "messages")]
            assert sorted(texts[:2]) == ["from a", "from b"]
            assert texts[2] == "after"


# -- 6. order independence --------------------------------------------------------------------


def causal_order(context: bytes, wires: dict[bytes, bytes]) -> list[bytes]:
    """Delta ids, parents before children (Kahn's algorithm over the headers)."""
    parents = {
        i: set(verify_delta(decode_delta(w), context_id=context).parents) & wires.keys()
        for i, w in wires.items()
    }
    order: list[bytes] = []
    done: set[bytes] = set()
    while len(order) < len(wires):
        ready = sorted(i for i in wires if i not in done and parents[i] <= done)
        order += ready
        done.update(ready)
    return order


@pytest.mark.parametrize(
    "count", [pytest.param(150, id="150"), pytest.param(1000, id="1000", marks=pytest.mark.slow)]
)
async def test_6_order_independence(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, count: int
) -> None:
    """A and B write `count` deltas, partly concurrently (gossip between them is delayed);
    C, D and E, cut off from them, receive every delta in a different order (two random
    permutations and the exact reverse of causal order): all apply, they end with one
    head and the same state, and the cascades do not recurse."""

    def room(file: FileConfig) -> FileConfig:
        # Reversed, the whole history waits at once: pending (and each author's share of
        # it) must hold it.
        replication = msgspec.structs.replace(
            file.replication, max_pending=2 * count, max_pending_per_author=2 * count
        )
        return msgspec.structs.replace(file, replication=replication)

    with trio.fail_after(LIMIT * 4):
        async with open_cluster(
            5, tmp_path, faults=GossipFaults(seed=6), configure=room
        ) as cluster:
            a, b, c, d, e = cluster
            context = await share(cluster, [0, 1, 2, 3, 4], app="chat")
            message = await call(a, context, "post", text="react to me")
            await wait_converged(cluster, list(cluster), context)
            known = {
                key[32:] for key, _ in await a.store.scan(DELTAS, prefix=context)
            }  # what C, D and E already have
            await cluster.partition([2, 3, 4])
            rng = random.Random(6)
            with delayed(cluster, 1.0):
                written = 0
                while written < count - 1:
                    author = a if written % 2 == 0 else b
                    if rng.random() < 0.5:
                        await write(author, context, "react", message_id=message, emoji="+1")
                    else:
                        await write(author, context, "set_topic", topic=f"t{written}")
                    written += 1
                    if rng.random() < 0.1:
                        await trio.sleep(rng.uniform(0.2, 1.2))  # let some copies land
                await wait_converged(cluster, [a, b], context)
            last = await write(a, context, "set_topic", topic="final")  # merges every branch
            await wait_converged(cluster, [a, b], context)
            wires = {
                key[32:]: wire
                for key, wire in await a.store.raw_scan(Column.DELTA, prefix=context)
                if key[32:] not in known
            }
            assert len(wires) == count
            headers = [verify_delta(decode_delta(w), context_id=context) for w in wires.values()]
            assert any(len(h.parents) > 1 for h in headers), "no concurrency to merge"

            causal = causal_order(context, wires)
            orders = {
                c: rng.sample(causal, len(causal)),
                d: rng.sample(causal, len(causal)),
                e: causal[::-1],
            }
            assert len({tuple(o) for o in orders.values()}) == 3
            depths: list[int] = []
            original = e.contexts.processor.apply_one

            def measured(applying: Any, delta_id: bytes, delta: SignedDelta) -> bool | Defer:
                depths.append(stack_depth())
                return original(applying, delta_id, delta)

            e.contexts.processor.apply_one = measured  # type: ignore[method-assign]
            for node, order in orders.items():
                applied: list[bytes] = []
                for delta_id in order:
                    result = await node.contexts.receive(context, wires[delta_id])
                    assert not result.rejected
                    applied += result.applied
                assert sorted(applied) == sorted(wires)
                _, heads, pending = await node.contexts.state(context)
                assert (heads, pending) == ([last], 0)
            # Reverse order: everything waits for the first delta, which then releases the
            # whole history in one cascade, iteratively: every apply runs at the same depth.
            assert len(depths) == count
            assert max(depths) == min(depths)
            await wait_converged(cluster, list(cluster), context)
            reactions = (await call(e, context, "messages"))[0]["reactions"]
            assert await call(e, context, "topic") == "final"
            assert reactions == (await call(a, context, "messages"))[0]["reactions"]


# -- 7. LWW conflict --------------------------------------------------------------------------


async def test_7_lww_conflict(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, faults=GossipFaults(seed=7)) as cluster:
            nodes = list(cluster)
            context = await share(cluster, [0, 1, 2], app="kv_store")

            async def race(key: str) -> tuple[str, list[tuple[int, bytes]]]:
                """Each node writes `key` concurrently; returns the value of the highest
                (HLC, writer) and the stamps."""
                with delayed(cluster):
                    ids = [
                        await write(n, context, "set", key=key, value=f"{key}-{i}")
                        for i, n in enumerate(nodes)
                    ]
                    await wait_converged(cluster, nodes, context)
                stamps = []
                for delta_id in ids:
                    header = await header_of(nodes[0], context, delta_id)
                    stamps.append((header.hlc, header.author))
                winner = max(range(3), key=lambda i: stamps[i])
                for node in nodes:
                    assert await call(node, context, "get", key=key) == f"{key}-{winner}"
                return f"{key}-{winner}", stamps

            # Skewed physical clocks: the first writer's clock is ahead, so it wins although
            # its write is the oldest and reaches the others first.
            now = time.time()
            for skew, node in zip((3.0, 1.5, 0.0), nodes, strict=True):
                node.contexts.replicas.wall_clock = partial(skewed_clock, skew)
            value, stamps = await race("skewed")
            assert value == "skewed-0"
            assert stamps[0] > stamps[1] > stamps[2]

            # Frozen, equal physical clocks: all three stamps have the same HLC and the
            # writer id decides.
            frozen = now + 10.0
            for node in nodes:
                node.contexts.replicas.wall_clock = lambda: frozen
            value, stamps = await race("tied")
            assert len({hlc for hlc, _ in stamps}) == 1
            best = max(range(3), key=lambda i: stamps[i][1])
            assert value == f"tied-{best}"
            for node in nodes:
                node.contexts.replicas.wall_clock = time.time


# -- 8. counters and collections --------------------------------------------------------------


async def test_8_concurrent_increments_sum(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path, faults=GossipFaults(seed=8)) as cluster:
            nodes = list(cluster)
            context = await share(cluster, [0, 1, 2, 3], app="chat")
            message = await call(nodes[0], context, "post", text="count me")
            await wait_converged(cluster, nodes, context)
            with delayed(cluster):
                for _ in range(3):
                    for node in nodes:
                        await write(node, context, "react", message_id=message, emoji="+1")
                await write(nodes[1], context, "unreact", message_id=message, emoji="+1")
                await wait_converged(cluster, nodes, context)
            for node in nodes:
                (only,) = await call(node, context, "messages")
                assert only["reactions"] == {"+1": 4 * 3 - 1}


async def test_8_removed_key_set_again_is_live(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, faults=GossipFaults(seed=8)) as cluster:
            a, b, c = nodes = list(cluster)
            context = await share(cluster, [0, 1, 2], app="kv_store")
            await write(a, context, "set", key="k", value="v1")
            await wait_converged(cluster, nodes, context)
            # Removed on A; set again later on B, before B hears of the removal.
            with delayed(cluster):
                await write(a, context, "remove", key="k")
                await write(b, context, "set", key="k", value="v2")
                await wait_converged(cluster, nodes, context)
            for node in nodes:
                assert await call(node, context, "get", key="k") == "v2"
            # Removed on C (everyone sees it gone); set again on A: live everywhere.
            await write(c, context, "remove", key="k")
            await wait_converged(cluster, nodes, context)
            for node in nodes:
                assert await call(node, context, "get", key="k") is None
            await write(a, context, "set", key="k", value="v3")
            await wait_converged(cluster, nodes, context)
            for node in nodes:
                assert await call(node, context, "get", key="k") == "v3"
                assert "k" in await call(node, context, "entries")


async def test_8_concurrent_text_inserts_interleave_identically(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, faults=GossipFaults(seed=8)) as cluster:
            nodes = list(cluster)
            context = await share(cluster, [0, 1, 2], app="notes", init={"text": "[]"})
            runs = ["aaaa", "bbbb", "cccc"]
            with delayed(cluster):
                for node, run in zip(nodes, runs, strict=True):
                    await write(node, context, "insert", pos=1, text=run)
                await write(nodes[0], context, "insert", pos=1, text="xx")
                await wait_converged(cluster, nodes, context)
            texts = {await call(node, context, "text") for node in nodes}
            assert len(texts) == 1
            (text,) = texts
            assert text.startswith("[")
            assert text.endswith("]")
            assert len(text) == 2 + 4 * 3 + 2
            for run in [*runs, "xx"]:
                assert run in text  # each call's run stays together


# -- 16. invitation rules ---------------------------------------------------------------------


def tamper_invitation(text: str, **changes: Any) -> str:
    """The invitation string with fields of the signed invitation changed, signature kept."""
    signed, invitation = inv.parse_invitation(text)
    body = msgspec.msgpack.encode(msgspec.structs.replace(invitation, **changes))
    forged = msgspec.structs.replace(signed, invitation=body)
    return inv.PREFIX + base58.b58encode(msgspec.msgpack.encode(forged)).decode("ascii")


async def test_16_invitation_rules(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path) as cluster:
            a, b, c, d = cluster
            context = await share(cluster, [0, 1], app="kv_store")
            app_id = (await a.contexts.get(context)).application_id
            for node in (c, d):
                await install(node, "kv_store")
            other = (await a.contexts.create(app_id)).context_id

            async def refused(node: Node, text: str, match: str, **kwargs: Any) -> None:
                """`node` cannot join with `text`; neither side wrote anything."""
                before = [await n.contexts.state(context) for n in (a, b)]
                members_before = (await a.contexts.get(context)).members
                with pytest.raises(ContextError, match=match):
                    await node.joins.join(text, **kwargs)
                await cluster.settle()
                assert context not in node.contexts.known_ids()
                assert await node.store.get(CONTEXTS, context) is None
                assert await node.store.raw_scan(Column.IDENTITY, prefix=context) == []
                assert [await n.contexts.state(context) for n in (a, b)] == before
                assert (await a.contexts.get(context)).members == members_before

            # Expired: refused by the joiner before it dials, and by the inviter on its clock.
            await refused(c, await a.joins.invite(context, expires_in=-1), "has expired")
            text = await a.joins.invite(context, expires_in=60)
            a.joins.wall_clock = lambda: time.time() + 3600
            await refused(c, text, "refused: the invitation has expired")
            a.joins.wall_clock = time.time

            # Forged: a read-only invitation turned into an admin one; a damaged string; one
            # signed by a member that is not an admin, or by a stranger.
            read_only = await a.joins.invite(context, role="read-only")
            await refused(c, tamper_invitation(read_only, role="admin"), "not valid")
            await refused(c, read_only[:40], "damaged")
            _, invitation = inv.parse_invitation(read_only)
            for key in (await member_key(b, context), Ed25519PrivateKey.generate()):
                signed_by = inv.create_invitation(
                    admin_key=key,
                    context_id=context,
                    application_id=app_id,
                    role="member",
                    expires_at=time.time() + 60,
                    inviter_peer=invitation.inviter_peer,
                    inviter_addrs=invitation.inviter_addrs,
                )
                await refused(c, signed_by.text, "inviter is not an admin")
            with pytest.raises(ContextError, match="only admins"):
                await b.joins.invite(context)

            # Wrong context: signed by A's admin key of another context; naming a context the
            # node it points at is not a member of; bound to another member key.
            admin_of_other = await member_key(a, other)
            cross = inv.create_invitation(
                admin_key=admin_of_other,
                context_id=context,
                application_id=app_id,
                role="member",
                expires_at=time.time() + 60,
                inviter_peer=invitation.inviter_peer,
                inviter_addrs=invitation.inviter_addrs,
            )
            await refused(c, cross.text, "inviter is not an admin")
            elsewhere = inv.create_invitation(
                admin_key=await member_key(a, context),
                context_id=context,
                application_id=app_id,
                role="member",
                expires_at=time.time() + 60,
                inviter_peer=str(cluster.peer_ids[3]),
                inviter_addrs=[cluster.address(3).rsplit("/p2p/", maxsplit=1)[0]],
            )
            await refused(c, elsewhere.text, "not a member of that context")
            invitee = Ed25519PrivateKey.generate()
            bound = await a.joins.invite(context, invitee=invitee.public_key().public_bytes_raw())
            await refused(c, bound, "specific member key")
            await refused(
                c, bound, "for another member key", member_key=Ed25519PrivateKey.generate()
            )

            # Reused: a one-time invitation admits C, then refuses D.
            once = await a.joins.invite(context)
            await c.joins.join(once)
            await wait_converged(cluster, [a, b, c], context)
            await refused(d, once, "already used")
            roles = {m.role for m in (await a.contexts.get(context)).members}
            assert roles == {"admin", "member"}
            assert len((await a.contexts.get(context)).members) == 3
            # The invitation bound to a member key still admits the holder of that key.
            await d.joins.join(bound, member_key=invitee)
            await wait_converged(cluster, list(cluster), context)


# -- 17. non-members learn nothing ------------------------------------------------------------


async def test_17_non_members_relay_but_learn_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        # A - O - B: O (not a member) is the only path between A and B once their direct
        # link (made by B's join) is cut.
        async with open_cluster(3, tmp_path, connect="chain") as cluster:
            a, outsider, b = cluster
            context = await share(cluster, [0, 2], app="kv_store")
            await cluster.partition([0], [2])
            outsider.pubsub.subscribe(topic_for(context))  # relays the topic
            await cluster.wait_mesh(topic_for(context))
            a_peer = cluster.peer_ids[0]

            with outsider.events.observe() as seen:
                d = await write(a, context, "set", key="secret", value="s3cr3t-value")
                await wait_converged(cluster, [a, b], context)
                relayed = [
                    decode_gossip(event.data)
                    for event in drain_channel(seen)
                    if isinstance(event, GossipMessage) and event.topic == topic_for(context)
                ]
            assert await call(b, context, "get", key="secret") == "s3cr3t-value"
            # O relayed it, could read the header, not the body.
            wires = [g.delta for g in relayed if isinstance(g, TopicDelta | DeltaGossip)]
            (wire,) = [w for w in wires if decode_delta(w).id == d]
            assert b"s3cr3t-value" not in wire
            header = verify_delta(decode_delta(wire), context_id=context)
            assert header.context_id == context
            with pytest.raises(RemoteProtocolError, match="does not decrypt"):
                open_delta(decode_delta(wire), header, os.urandom(32))
            assert context not in outsider.contexts.known_ids()
            assert deltas(outsider, "applied") == 0

            # Its sync requests are refused, and counted.
            with pytest.raises(ContextError, match="no context"):
                await outsider.replicator.fetch(a_peer, context, {d})  # it has no member key
            refused = metric(a, "trionode_sync_refused_total")
            stranger = Ed25519PrivateKey.generate()
            conn = outsider.host.connections[a_peer]
            handshake = conn.noise.remote.handshake_hash
            nowhere = os.urandom(32)
            for auth, problem in (
                (make_auth(context, stranger, auth_message(handshake, context)), "not a member"),
                (make_auth(context, stranger, b"another message"), "bad membership proof"),
                (make_auth(nowhere, stranger, auth_message(handshake, nowhere)), "unknown context"),
            ):
                reply = await sync_request(
                    outsider, a_peer, context, DeltaRequest(ids=[d]), auth=auth
                )
                assert reply == SyncError(message=problem)
            assert metric(a, "trionode_sync_refused_total") == refused + 3

            # Even posing as a member (a made-up member key and context key) gets nothing.
            await install(outsider, "kv_store")
            await outsider.contexts.adopt(
                context_id=context,
                application_id=(await a.contexts.get(context)).application_id,
                member_key=stranger,
                keys={0: os.urandom(32)},
                key_id=0,
            )
            with pytest.raises(ContextError, match="refused: not a member"):
                await outsider.replicator.fetch(a_peer, context, {d})
            assert metric(a, "trionode_sync_refused_total") >= refused + 4
            assert await outsider.contexts.read_delta(context, d) is None


# -- 18. forged deltas ------------------------------------------------------------------------


def not_forwarded(node: Node) -> int:
    """Gossip messages `node` received and did not forward: found invalid."""
    return node.pubsub.router.statistics().dropped.get(DropReason.REJECTED, 0)


async def test_18_forged_deltas_are_rejected(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path) as cluster:
            a, b, _c, r = nodes = list(cluster)
            context = await share(cluster, [0, 1, 2, 3], app="chat", roles={3: "read-only"})
            # Real delta bodies to forge with, taken from a second context of A's (entity
            # ids do not depend on the context): a topic change and a membership change.
            app_id = (await a.contexts.get(context)).application_id
            donor = (await a.contexts.create(app_id)).context_id
            evil_topic = await body_of(a, donor, await write(a, donor, "set_topic", topic="evil"))
            promote = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
            grant = await a.contexts.change_members(donor, [(promote, "admin")])
            evil_grant = await body_of(a, donor, grant.id)
            await cluster.settle()
            before = {node: await node.contexts.state(context) for node in nodes}

            legit = await forge(a, context, await member_key(a, context), evil_topic)
            bad_signature = msgspec.structs.replace(legit, signature=flip(legit.signature))
            bad_ciphertext = msgspec.structs.replace(legit, ciphertext=flip(legit.ciphertext))
            unknown = await forge(b, context, Ed25519PrivateKey.generate(), evil_topic)
            read_only = await forge(r, context, await member_key(r, context), evil_topic)
            # A membership operation by a member that is not an admin.
            not_admin = await forge(
                b,
                context,
                await member_key(b, context),
                evil_grant,
                auth=action(Kind.GRANT, member=promote, role="admin"),
            )
            # A genuine delta of another context, replayed on this context's topic.
            replayed = await a.contexts.read_delta(donor, grant.id)
            assert replayed is not None
            cases = [
                (a, decode_delta(replayed), "rejected_invalid"),
                (a, bad_signature, "rejected_invalid"),
                (a, bad_ciphertext, "rejected_invalid"),
                (b, unknown, "rejected_author"),
                (r, read_only, "rejected_author"),
                (b, not_admin, "rejected_role"),
            ]
            for sender, forged, outcome in cases:
                receivers = [n for n in nodes if n is not sender]
                counts = [deltas(n, outcome) for n in receivers]
                held_back = [not_forwarded(n) for n in receivers]
                gossip(sender, context, forged.encode())
                await cluster.settle()
                assert [deltas(n, outcome) for n in receivers] == [x + 1 for x in counts], outcome
                # An invalid delta is not passed on (pubsub forwards a context topic's
                # message once judged); one refused by authorization is, each node judging
                # it by what it knows.
                dropped = int(outcome == "rejected_invalid")
                assert [not_forwarded(n) for n in receivers] == [x + dropped for x in held_back], (
                    outcome
                )
                for node in nodes:
                    assert await node.contexts.read_delta(context, forged.id) is None
                    assert await node.contexts.state(context) == before[node]

            # A fetch response carrying a delta that was not asked for (here a perfectly
            # valid one) is rejected: the id must be one of those requested.
            asked = hashlib.sha256(b"some delta").digest()

            async def lying(stream: trio.abc.HalfCloseableStream, _conn: Any) -> None:
                channel = _Channel(stream)
                await channel.receive()  # auth
                while await channel.receive(eof_ok=True) is not None:
                    await channel.send(DeltaResponse(deltas=[legit.encode()], missing=[]))
                await stream.send_eof()

            a.host.set_handler(SYNC_PROTOCOL, lying)
            invalid = deltas(b, "rejected_invalid")
            assert await b.replicator.fetch(cluster.peer_ids[0], context, {asked}) == 0
            assert deltas(b, "rejected_invalid") == invalid + 1
            assert await b.contexts.read_delta(context, legit.id) is None
            a.host.set_handler(SYNC_PROTOCOL, a.replicator._serve_sync)
            for node in nodes:
                assert await node.contexts.state(context) == before[node]
                assert await call(node, context, "topic") == ""

            # The same body from a writer applies everywhere: the forgeries carried a real
            # change, and nothing of them stuck.
            assert (await a.contexts.receive(context, legit.encode())).applied == [legit.id]
            gossip(a, context, legit.encode())
            await wait_converged(cluster, nodes, context)
            for node in nodes:
                assert await call(node, context, "topic") == "evil"
                assert (await node.contexts.role(context, promote)) is None


# -- 19. read-only member ---------------------------------------------------------------------


async def test_19_read_only_member(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, reader = nodes = list(cluster)
            context = await share(cluster, [0, 1, 2], app="kv_store", roles={2: "read-only"})
            assert (
                await reader.contexts.role(context, (await reader.contexts.member_key(context))[0])
                == "read-only"
            )
            sub = subscribe(reader, context)
            d = await write(a, context, "set", key="k", value="v")
            await wait_converged(cluster, nodes, context)
            # Reads and subscriptions work.
            assert await call(reader, context, "get", key="k") == "v"
            assert [e.delta_id for e in drain(sub) if e.events] == [d.hex()]
            # Its node could not run kv_store's handler (which writes): only B counted.
            assert await call(reader, context, "handler_calls") == 1
            assert metric(reader, "trionode_handler_runs_total", outcome="failed") == 1

            # Writes fail locally, with a clear error (JSON-RPC -32011), and write nothing.
            state = await reader.contexts.state(context)
            published = deltas(reader, "published")
            with pytest.raises(ReadOnlyCallError, match="read-only member") as caught:
                await call(reader, context, "set", key="k", value="mine")
            assert caught.value.to_jsonrpc()["code"] == -32011
            with pytest.raises(ContextError, match="only admins"):
                await reader.joins.invite(context)
            await cluster.settle()
            assert await reader.contexts.state(context) == state
            assert deltas(reader, "published") == published
            assert drain(sub) == []

            # A delta it forges anyway (its own key, the real context key) is rejected.
            donor = (
                await a.contexts.create((await a.contexts.get(context)).application_id)
            ).context_id
            body = await body_of(a, donor, await write(a, donor, "set", key="k", value="mine"))
            forged = await forge(reader, context, await member_key(reader, context), body)
            counts = [deltas(n, "rejected_author") for n in (a, b)]
            gossip(reader, context, forged.encode())
            await wait_converged(cluster, nodes, context)
            assert [deltas(n, "rejected_author") for n in (a, b)] == [x + 1 for x in counts]
            for node in nodes:
                assert await call(node, context, "get", key="k") == "v"
                assert await node.contexts.read_delta(context, forged.id) is None


# -- 20. removal and key rotation -------------------------------------------------------------


async def test_20_removal_rotates_the_key(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path) as cluster:
            a, b, removed, late = cluster
            context = await share(cluster, [0, 1, 2], app="kv_store")
            old = await write(a, context, "set", key="old", value="1")
            await wait_converged(cluster, [a, b, removed], context)
            gone, _ = await removed.contexts.member_key(context)
            first_key = (await a.contexts.get(context)).key_id
            removal = await a.contexts.remove_member(context, gone)
            new_key = (await header_of(a, context, removal.id)).auth.key_id  # type: ignore[union-attr]
            assert new_key is not None
            assert new_key != first_key
            new = await write(a, context, "set", key="new", value="2")
            assert (await header_of(a, context, new)).key_id == new_key
            await wait_converged(cluster, [a, b], context)

            # The remaining members read old and new deltas, and write with the new key.
            for node in (a, b):
                assert await call(node, context, "get", key="old") == "1"
                assert await call(node, context, "get", key="new") == "2"
                assert sorted(await node.contexts.keys(context)) == sorted([first_key, new_key])
            handler_delta = await write(b, context, "set", key="by-b", value="3")
            assert (await header_of(b, context, handler_delta)).key_id == new_key
            await wait_converged(cluster, [a, b], context)

            # The removed member got the removal, but no key and nothing after it.
            await cluster.settle()
            assert await removed.contexts.read_delta(context, removal.id) is not None
            assert await removed.contexts.read_delta(context, old) is not None
            assert await removed.contexts.read_delta(context, new) is None
            assert sorted(await removed.contexts.keys(context)) == [first_key]
            assert deltas(removed, "rejected_key") >= 1
            with pytest.raises(ContextError, match="no longer"):
                await call(removed, context, "get", key="old")
            refused = metric(a, "trionode_sync_refused_total")
            with pytest.raises(ContextError, match="not a member"):
                await removed.replicator.fetch(cluster.peer_ids[0], context, {new})
            assert metric(a, "trionode_sync_refused_total") == refused + 1

            # Someone joining after the rotation gets every key and reads the whole history.
            await install(late, "kv_store")
            await late.joins.join(await a.joins.invite(context))
            await wait_converged(cluster, [a, b, late], context)
            assert sorted(await late.contexts.keys(context)) == sorted([first_key, new_key])
            assert await call(late, context, "entries") == {"by-b": "3", "new": "2", "old": "1"}


async def test_20_removed_member_cannot_write(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, removed = cluster
            context = await share(cluster, [0, 1, 2], app="kv_store")
            gone, _ = await removed.contexts.member_key(context)
            removal = await a.contexts.remove_member(context, gone)
            await wait_converged(cluster, [a, b], context)
            await cluster.settle()
            assert await removed.contexts.read_delta(context, removal.id) is not None
            # It writes on top of its own removal, with the only key it has.
            donor = await a.contexts.create((await a.contexts.get(context)).application_id)
            body = await body_of(
                a, donor.context_id, await write(a, donor.context_id, "set", key="k", value="x")
            )
            forged = await forge(removed, context, await member_key(removed, context), body)
            gossip(removed, context, forged.encode())
            await cluster.settle()
            for node in (a, b):
                assert await node.contexts.read_delta(context, forged.id) is None


# -- 21. events -------------------------------------------------------------------------------


async def test_21_events_once_handlers_once_per_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Duplicated and reordered gossip must not duplicate events or handler runs.
    faults = GossipFaults(duplicate=0.5, seed=21)
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, faults=faults) as cluster:
            nodes = list(cluster)
            a, b, c = nodes
            context = await share(cluster, [0, 1, 2], app="kv_store")
            subs = {node: [subscribe(node, context), subscribe(node, context)] for node in nodes}
            ran = {
                node: metric(node, "trionode_handler_runs_total", outcome="ok") for node in nodes
            }
            calls = await call(a, context, "handler_calls")
            with delayed(cluster, 2.0):
                writes = {
                    await write(a, context, "set", key="k1", value="1"): (a, "Inserted"),
                    await write(b, context, "set", key="k2", value="2"): (b, "Inserted"),
                    await write(a, context, "set", key="k1", value="1b"): (a, "Updated"),
                }
                await wait_converged(cluster, nodes, context)
            members = {node: (await node.contexts.member_key(context))[0] for node in nodes}
            for node in nodes:
                expected_runs = sum(1 for author, _ in writes.values() if author is not node)
                assert (
                    metric(node, "trionode_handler_runs_total", outcome="ok") - ran[node]
                    == expected_runs
                )
                streams = [drain(sub) for sub in subs[node]]
                assert streams[0] == streams[1]  # every subscriber sees the same, once
                seen = streams[0]
                assert len({e.delta_id for e in seen}) == len(seen)
                for delta_id, (author, name) in writes.items():
                    (event,) = events_for(seen, delta_id)
                    assert [e["name"] for e in event.events] == [name]
                    assert event.origin == ("local" if author is node else "remote")
                # The handler's own deltas: authored by this node's member, one per run.
                own = [
                    bytes.fromhex(e.delta_id) for e in seen if e.origin == "local" and not e.events
                ]
                assert len(own) == expected_runs
                for delta_id in own:
                    assert (await header_of(node, context, delta_id)).author == members[node]
            total = sum(1 for _ in writes) * 2  # each write runs the handler on 2 other nodes
            for node in nodes:
                assert await call(node, context, "handler_calls") == calls + total

            # Delivered again (by sync): no event, no handler run.
            again = next(iter(writes))
            ran_c = metric(c, "trionode_handler_runs_total", outcome="ok")
            await c.replicator.fetch(cluster.peer_ids[0], context, {again})
            await wait_converged(cluster, nodes, context)
            assert drain(subs[c][0]) == []
            assert metric(c, "trionode_handler_runs_total", outcome="ok") == ran_c
