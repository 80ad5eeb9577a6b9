"""A received delta is shown to subscribers while its commit runs (`pipeline.py`, issue #16),
and nothing that needs its durability runs ahead of that commit: a local write built on
it is answered only once both are on disk; a failed commit or a crash before it loses the
delta only here, where it comes back from the peers, and subscribers are told to resync.

Node 1's context-layer writes are held at a gate (`GatedWrites`), so "while its commit
runs" is a state the test can stand in, on an in-process cluster under `autojump_clock`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from tests.context.test_pipeline import GatedWrites
from tests.replication.cluster_helpers import (
    LIMIT,
    b58,
    call,
    deltas,
    drain,
    header_of,
    share,
    subscribe,
    wait_converged,
    write,
)
from trionode.context.events import ContextEvent, Notice, Subscription
from trionode.context.records import DELTAS
from trionode.net.events import GossipMessage, NetworkEvent
from trionode.node import Node
from trionode.store.lmdb_store import Put
from trionode.store.store import WriteBatch
from trionode.testing import Cluster, open_cluster


@asynccontextmanager
async def _two_members(
    tmp_path: Path, *, restartable: bool = False
) -> AsyncIterator[tuple[Cluster, bytes, Subscription]]:
    """Two members of a kv_store context, and a subscription to it on node 1 that has
    heard nothing yet."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, restartable=restartable) as cluster:
            context = await share(cluster, [0, 1])
            sub = subscribe(cluster[1], context)
            drain(sub)
            yield cluster, context, sub


async def _next_event(sub: Subscription) -> ContextEvent | Notice:
    item = await sub.receive.receive()
    assert isinstance(item, ContextEvent | Notice), item
    return item


async def _set(node: Node, context: bytes, key: str) -> None:
    await write(node, context, "set", key=key, value="b")


def _batch_of(writes: GatedWrites, delta_id: bytes) -> int:
    """Which held write stores `delta_id`'s row."""
    for i, batch in enumerate(writes.batches):
        for op in batch.ops:
            if isinstance(op, Put) and op.column is DELTAS.column and op.key.endswith(delta_id):
                return i
    raise AssertionError(f"no write stored {delta_id.hex()[:16]}")


async def test_a_received_delta_is_shown_before_its_commit_and_a_write_on_it_waits_for_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _two_members(tmp_path) as (cluster, context, sub):
        a, b = cluster
        writes = GatedWrites(b)
        received = await write(a, context, "set", key="k", value="from a")
        shown = await _next_event(sub)
        # Shown, with the heads it makes, while its commit is held: not stored yet. (The
        # commit begins once those the showing woke have run.)
        assert isinstance(shown, ContextEvent)
        assert (shown.delta_id, shown.origin) == (received.hex(), "remote")
        assert received.hex() in shown.heads
        await trio.testing.wait_all_tasks_blocked()
        assert writes.batches
        assert await b.contexts.read_delta(context, received) is None
        answered: list[bytes] = []

        async def write_on_b() -> None:
            answered.append(await write(b, context, "set", key="k2", value="from b"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_on_b)
            await trio.testing.wait_all_tasks_blocked()
            # The local write waits for the commit ahead of it; its event is not shown.
            assert answered == []
            assert drain(sub) == []
            writes.gate.set()
        writes.restore()
        (local,) = answered
        assert received in (await header_of(b, context, local)).parents
        # Its delta went to disk in a later transaction than the one it builds on.
        assert _batch_of(writes, local) > _batch_of(writes, received)
        assert await b.contexts.read_delta(context, received) is not None
        after = drain(sub)[0]  # (then whatever B writes on its own, e.g. an ack)
        assert (after.delta_id, after.origin, after.seq) == (
            local.hex(),
            "local",
            shown.seq + 1,
        )


async def test_a_local_write_in_the_same_batch_keeps_the_contexts_events_until_durable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _two_members(tmp_path) as (cluster, context, sub):
        a, b = cluster
        writes = GatedWrites(b)
        # Held: B's own write, then (queued behind it) A's delta and another write.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set, b, context, "first")
            await trio.testing.wait_all_tasks_blocked()
            received = await write(a, context, "set", key="k", value="from a")
            nursery.start_soon(_set, b, context, "second")
            await trio.testing.wait_all_tasks_blocked()
            assert drain(sub) == []
            writes.gate.set()
        writes.restore()
        events = drain(sub)
        # The batch holding A's delta also held B's own write: shown once durable, in order.
        assert received.hex() in [event.delta_id for event in events]
        seqs = [event.seq for event in events]
        assert seqs == sorted(seqs)
        assert len(events) == 3


async def test_a_failed_commit_after_showing_tells_subscribers_to_resync_and_heals(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _two_members(tmp_path) as (cluster, context, sub):
        a, b = cluster
        writes = GatedWrites(b)
        writes.fail_next = True
        received = await write(a, context, "set", key="k", value="from a")
        shown = await _next_event(sub)
        assert isinstance(shown, ContextEvent)
        assert shown.delta_id == received.hex()
        writes.gate.set()
        notice = await _next_event(sub)
        assert isinstance(notice, Notice)
        assert (notice.payload["type"], notice.payload["contextIds"]) == (
            "resync",
            [b58(context)],
        )
        writes.restore()
        # A client that saw it, or resumes from before it, must read the state again.
        for since in (shown.seq - 1, shown.seq):
            assert not b.hub.add_contexts(b.hub.open(), [b58(context)], since)
        assert await b.contexts.read_delta(context, received) is None
        # It comes back from the peer: A's next delta names it, B fetches it.
        await write(a, context, "set", key="k2", value="again")
        await wait_converged(cluster, [a, b], context)
        assert await call(b, context, "get", key="k") == "from a"
        assert await b.contexts.read_delta(context, received) is not None


async def test_a_crash_between_showing_and_committing_loses_nothing_the_peers_lack(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _two_members(tmp_path, restartable=True) as (cluster, context, sub):
        a, b = cluster
        GatedWrites(b)  # its commit never happens: the node dies first
        received = await write(a, context, "set", key="k", value="from a")
        shown = await _next_event(sub)
        assert isinstance(shown, ContextEvent)
        assert shown.delta_id == received.hex()
        await cluster.crash(1)
        # (Not waiting for the reconnection: the peers greet each other at once on it and
        # the session it starts may bring the delta back before we look.)
        b = await cluster.restart(1, wait=False)
        assert await b.contexts.read_delta(context, received) is None
        # What a client was shown is not taken as kept: resuming from it needs a resync.
        assert not b.hub.add_contexts(b.hub.open(), [b58(context)], shown.seq)
        # The peer still has it: the session the reconnect starts brings it back.
        await wait_converged(cluster, [a, b], context)
        assert await call(b, context, "get", key="k") == "from a"
        assert await b.contexts.read_delta(context, received) is not None


def _gossip_handled(seen: trio.MemoryReceiveChannel[NetworkEvent]) -> int:
    """Gossip messages the node's network-event handler finished with since last asked."""
    handled = 0
    while True:
        try:
            event = seen.receive_nowait()
        except trio.WouldBlock:
            return handled
        handled += isinstance(event, GossipMessage)


async def test_the_gossip_handler_goes_on_while_a_received_deltas_commit_is_held(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The handler takes every network event of the node in turn: waiting for each received
    # delta's fsync held all of them (the next gossip message too) behind the disk. Now it
    # waits only until its deltas are staged (a message that arrives during a commit still
    # waits for the processor to take it, which is after that commit).
    async with _two_members(tmp_path) as (cluster, context, sub):
        a, b = cluster
        writes = GatedWrites(b)
        with b.events.observe() as seen:
            first = await write(a, context, "set", key="k", value="first")
            shown = await _next_event(sub)
            assert isinstance(shown, ContextEvent)
            assert shown.delta_id == first.hex()
            await trio.testing.wait_all_tasks_blocked()
            assert _gossip_handled(seen) >= 1  # done with it while its commit is held
            assert await b.contexts.read_delta(context, first) is None
            second = await write(a, context, "set", key="k2", value="second")
            await trio.testing.wait_all_tasks_blocked()
            assert drain(sub) == []  # (its batch waits for the held commit)
            writes.gate.set()
            await wait_converged(cluster, [a, b], context)
            assert _gossip_handled(seen) >= 1
        writes.restore()
        assert await b.contexts.read_delta(context, first) is not None
        assert await b.contexts.read_delta(context, second) is not None
        assert [event.delta_id for event in drain(sub)][:1] == [second.hex()]


async def test_a_failed_commit_of_deltas_already_answered_is_counted_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _two_members(tmp_path) as (cluster, context, sub):
        a, b = cluster
        writes = GatedWrites(b)
        writes.fail_next = True
        failed = deltas(b, "store_failed")
        received = await write(a, context, "set", key="k", value="from a")
        await _next_event(sub)
        writes.gate.set()
        await _next_event(sub)  # the resync notice: the commit failed
        writes.restore()
        assert deltas(b, "store_failed") == failed + 1
        assert await b.contexts.read_delta(context, received) is None


async def test_subscribers_run_before_the_commit_and_services_hear_only_once_durable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Issue #16: on one event loop (the bench's nodes) everything a processor did after
    # showing a received delta (its rows, handing the commit off) came before the next
    # node's processor could show it, and the remote-only watchers (app follower, blob
    # fetcher) woke on the show. Now whom the show woke runs before the commit begins,
    # and those services are offered the event once it is durable (not if it is lost).
    async with _two_members(tmp_path) as (cluster, context, sub):
        a, b = cluster
        writes = GatedWrites(b)
        services = b.hub.watch(remote_only=True)
        read: list[ContextEvent | Notice] = []
        read_when_committing: list[list[ContextEvent | Notice]] = []
        gated_write = writes.write

        async def write_seen(batch: WriteBatch, *, settle: bool = True) -> None:
            read_when_committing.append(list(read))  # (before anything of the write yields)
            await gated_write(batch, settle=settle)

        writes.write = write_seen  # type: ignore[method-assign]

        async def reader() -> None:
            while True:
                read.append(await _next_event(sub))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            received = await write(a, context, "set", key="k", value="from a")
            await trio.testing.wait_all_tasks_blocked()
            ([shown],) = read_when_committing  # the reader had it before the commit began
            assert isinstance(shown, ContextEvent)
            assert shown.delta_id == received.hex()
            assert drain(services) == []  # held commit: not durable yet
            writes.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert [event.delta_id for event in drain(services)] == [received.hex()]
            # A shown delta whose commit fails never reaches the services.
            writes.gate = trio.Event()
            writes.fail_next = True
            lost = await write(a, context, "set", key="k2", value="lost here")
            await trio.testing.wait_all_tasks_blocked()
            assert [e.delta_id for e in read if isinstance(e, ContextEvent)][-1] == lost.hex()
            writes.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert drain(services) == []
            nursery.cancel_scope.cancel()
        writes.restore()
        services.close()
