"""Signed acks: how an admin tells the others what it has seen, so finality moves even
while it writes nothing (trionode/auth/finality.py; local-first-auth.md §5.4).

An ack is `{version, context_id, author, vv, hlc}` signed by the author's member key,
outside the DAG: it costs no delta, and an admin removed from the context can still send
one (which is how it leaves the AckSet). It travels as an `AckGossip` on the context's
topic; `serve_acks` publishes ours every `sync.ack_interval` seconds for each context
where we are an ever-admin and our frontier has moved since the last one. A round looks
only at the replicas in memory and, for each, first compares its frontier with our last
ack (a restart reads that from the store): it loads nothing and resolves no membership
unless something moved. The vector is
our frontier — every delta we hold — read under the replica's lock, so none of our own
writes is in flight: everything we write later has it in its past.

Receiving (`AckBook.receive`): the signature must be the author's, the context ours, the
author an ever-admin in our own resolution, and the vector well-formed and bounded
(`trionode.auth.acks`); anything else is dropped and counted. The latest ack per author (by
its hlc) is kept in memory and in the store (`ack/` ‖ context ‖ author tag), so finality
survives a restart. An ack naming deltas we lack waits there until we hold them.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Counter

from trionode.auth.acks import open_ack, sign_ack
from trionode.auth.finality import ever_admins
from trionode.auth.model import tag
from trionode.context.errors import ContextError
from trionode.context.replicas import ACK_PREFIX, AUX, Replica, ReplicaStore
from trionode.errors import RemoteProtocolError
from trionode.store.store import WriteBatch

log = logging.getLogger(__name__)


class AckMetrics(Protocol):
    def ack(self, outcome: str) -> None: ...


class PrometheusAckMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._acks = Counter(
            "trionode_acks",
            "Signed finality acks by outcome (sent, kept, stale, refused_<reason>)",
            ["outcome"],
            registry=registry,
        )

    def ack(self, outcome: str) -> None:
        self._acks.labels(outcome).inc()


class NoAckMetrics:
    def ack(self, outcome: str) -> None:
        pass


class AckBook:
    """Our acks out, peers' acks in (see the module doc)."""

    def __init__(self, replicas: ReplicaStore, metrics: AckMetrics | None = None) -> None:
        self._replicas = replicas
        self.metrics: AckMetrics = metrics or NoAckMetrics()
        self._sent: dict[bytes, dict[bytes, int]] = {}
        """Context → the vector of our last ack sent."""
        self._stamps: dict[tuple[bytes, bytes], int] = {}
        """(context, author tag) → hlc of the latest ack kept."""
        self.examined = 0
        """Contexts whose frontier had moved when a round looked (the rest cost a compare)."""

    async def receive(self, context_id: bytes, wire: bytes) -> bool:
        """Take a peer's ack; True if kept. Never raises for bad input: drops and counts."""
        if not self._replicas.knows(context_id):
            return False
        try:
            ack = open_ack(wire, context_id)
        except RemoteProtocolError as exc:
            self.metrics.ack("refused_malformed")
            log.info("refused ack in %s: %s", context_id.hex()[:12], exc)
            return False
        replica = await self._replicas.load(context_id)
        async with replica.lock:
            authority = replica.authority
            if ack.author not in ever_admins(authority.resolution()):
                self.metrics.ack("refused_not_admin")
                return False
            key = (context_id, tag(ack.author))
            if key not in self._stamps:
                self._stamps[key] = await self._stored_stamp(context_id, ack.author)
            if ack.hlc <= self._stamps[key]:
                self.metrics.ack("stale")
                return False
            batch = WriteBatch()
            batch.put(AUX, ACK_PREFIX + context_id + tag(ack.author), wire)
            await self._replicas.write(replica, batch)
            self._stamps[key] = ack.hlc
            authority.note_ack(ack.author, dict(ack.vv))
        self.metrics.ack("kept")
        return True

    async def _stored_stamp(self, context_id: bytes, author: bytes) -> int:
        stored = await self._replicas.store.get(AUX, ACK_PREFIX + context_id + tag(author))
        if stored is None:
            return -1
        try:
            return open_ack(stored, context_id).hlc
        except RemoteProtocolError:
            return -1

    async def ours(self, context_id: bytes) -> bytes | None:
        """Our signed ack for `context_id` if we are an ever-admin and our frontier moved
        since the last one (None otherwise)."""
        return await self.ours_of(await self._replicas.load(context_id))

    async def ours_of(self, replica: Replica) -> bytes | None:
        """`ours` for a replica in memory."""
        context_id = replica.context_id
        async with replica.lock:
            authority = replica.authority
            me = replica.member_key.public_key().public_bytes_raw()
            frontier = authority.frontier()
            # The cheap test first: resolving who was ever admin walks every op, and most
            # rounds find nothing moved. Our own stored ack counts as sent (a restart).
            sent = self._sent.get(context_id, authority.acks.get(tag(me)))
            if not frontier or sent == frontier:
                return None
            self.examined += 1
            if me not in ever_admins(authority.resolution()):
                self._sent[context_id] = frontier  # looked at; nothing to send until it moves
                return None
            hlc = replica.clock.now(self._replicas.physical_now()).time
            wire = sign_ack(replica.member_key, context_id, frontier, hlc)
            # Our own ack counts here too (and is kept like a peer's, for restarts).
            batch = WriteBatch()
            batch.put(AUX, ACK_PREFIX + context_id + tag(me), wire)
            await self._replicas.write(replica, batch)
            authority.note_ack(me, frontier)
            self._stamps[(context_id, tag(me))] = hlc
            self._sent[context_id] = frontier
        return wire


class Publish(Protocol):
    def __call__(self, context_id: bytes, wire: bytes) -> None: ...


async def serve_acks(
    book: AckBook,
    replicas: ReplicaStore,
    publish: Publish,
    interval: float,
    shutdown_requested: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every `interval` seconds, publish our ack of each context whose frontier moved;
    ends when the node is asked to shut down."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ack_loop, book, replicas, publish, interval)
        task_status.started()
        await shutdown_requested.wait()
        nursery.cancel_scope.cancel(reason="node shutting down")


async def _ack_loop(
    book: AckBook, replicas: ReplicaStore, publish: Publish, interval: float
) -> None:
    while True:
        await trio.sleep(interval)
        await ack_round(book, replicas, publish)


async def ack_round(book: AckBook, replicas: ReplicaStore, publish: Publish) -> int:
    """One round of `serve_acks`: our ack of each *loaded* context whose frontier moved;
    returns how many were sent.

    Only replicas in memory are looked at, never loaded for this: what we hold can only
    move while a replica is loaded (every delta is applied to one), and a context loaded
    again after a restart is compared with our stored ack (`AckBook.ours_of`)."""
    sent = 0
    for replica in sorted(replicas.loaded(), key=lambda r: r.context_id):
        try:
            wire = await book.ours_of(replica)
        except ContextError:
            continue
        if wire is not None:
            publish(replica.context_id, wire)
            book.metrics.ack("sent")
            sent += 1
    return sent
