"""Member peers: the peers that share a context with us, remembered across restarts.

Without this, a node restarted where neither mDNS nor bootstrap peers reach anyone is alone
for good (its peer store lives in memory), and the others give up on it after a few failed
redials while it was down. So:

- A peer *shares a context* with us while it is subscribed to the gossip topic of a context
  we hold (pubsub tells us; every member node subscribes to its contexts' topics).
- On every pubsub heartbeat, and as soon as a peer subscribes to a topic (so a member that
  just joined is known before a partition that follows at once, or it would be forgotten
  after a few failed dials), for each such connected peer, the addresses it can be dialed at
  are written to LMDB (``GENERIC`` column, ``member-peer/<peer id>``) with the topics we
  share — only when they changed, so a quiet network writes nothing. The address we dialed
  it at (when we dialed) comes first: it is known to work.
- At start, before discovery dials anyone, the stored peers whose topics we still hold go
  into the peer store (source ``stored``); rows whose topics we no longer hold are deleted.
- The peer store is told the member set (stored and live): it never forgets them and caps
  their redial backoff low (``network.member_redial_max_backoff``); discovery dials them first.

When a member comes back at a new address, it dials us (it has our stored address), identify
tells us its new addresses, and the next heartbeat stores them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Final

import msgspec
import trio

from trionode.errors import ProtocolError, StorageError
from trionode.net.discovery import identified_addrs
from trionode.net.host import Connection, Host
from trionode.net.peerstore import MAX_ADDRS_PER_PEER, PeerStore, is_dialable
from trionode.net.pubsub import PubSub
from trionode.store.lmdb_store import Column
from trionode.store.store import AsyncStore, BytesCodec, MsgpackCodec, Table, WriteBatch
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

log = logging.getLogger(__name__)

PREFIX: Final = b"member-peer/"
MAX_STORED_TOPICS: Final = 64
"""Shared topics remembered per peer (a bound on a row's size, not on contexts)."""


class StoredMemberPeer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    addrs: list[str]
    """Dialable multiaddrs, without /p2p, best first."""
    topics: list[str]
    """Gossip topics of the contexts we shared when it was last connected."""


MEMBER_PEERS = Table(Column.GENERIC, BytesCodec(), MsgpackCodec(StoredMemberPeer))


def context_topics(pubsub: PubSub, prefix: str) -> Callable[[], Collection[str]]:
    """Our subscribed topics that belong to contexts (``prefix`` is the context topic prefix)."""
    return lambda: [t for t in pubsub.topics() if t.startswith(prefix)]


async def serve_member_peers(
    host: Host,
    pubsub: PubSub,
    peerstore: PeerStore,
    store: AsyncStore,
    our_topics: Callable[[], Collection[str]],
    *,
    shutdown_requested: trio.Event | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Load stored member peers into ``peerstore``, then keep the stored set up to date.

    Start it after the context topics are subscribed (the Replicator does that as it starts)
    and before discovery. Ready once the stored peers are in the peer store.
    """
    tracker = _MemberPeers(host, pubsub, peerstore, store, our_topics)
    await tracker.load()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracker.run, name=f"{host.peer_id}:member-peers")
        task_status.started()
        if shutdown_requested is not None:
            await shutdown_requested.wait()
            nursery.cancel_scope.cancel(reason="node shutting down")


class _MemberPeers:
    def __init__(
        self,
        host: Host,
        pubsub: PubSub,
        peerstore: PeerStore,
        store: AsyncStore,
        our_topics: Callable[[], Collection[str]],
    ) -> None:
        self._host = host
        self._pubsub = pubsub
        self._peerstore = peerstore
        self._store = store
        self._our_topics = our_topics
        self._stored: dict[PeerId, StoredMemberPeer] = {}
        self._inputs: dict[PeerId, tuple[Connection, tuple[Multiaddr, ...], object, object]] = {}
        """Per connected member peer, what its row was last built from (its connection,
        the listen addresses identify reported, the peer store's addresses and the shared
        topics): a heartbeat rebuilds only the rows of peers where one of them changed.
        Building a row parses and prints every address; at 100 members, on every pubsub
        heartbeat, that was most of what an idle node did."""

    async def load(self) -> None:
        ours = set(self._our_topics())
        batch = WriteBatch()
        try:
            rows = await self._store.scan(MEMBER_PEERS, prefix=PREFIX)
        except StorageError as exc:
            # One unreadable row must not keep the node from starting: start from scratch.
            log.warning("stored member peers are unreadable (%s); starting without them", exc)
            return
        for key, row in rows:
            peer = _peer_of(key)
            if peer is None or not ours.intersection(row.topics):
                batch.delete(MEMBER_PEERS, key)
                continue
            self._stored[peer] = row
            addrs = _parse(row.addrs)
            if addrs:
                self._peerstore.add(peer, addrs, source="stored")
        if len(batch):
            await self._store.write(batch)
        self._peerstore.set_members(self._stored)
        log.info("member peers: %d remembered", len(self._stored))

    async def run(self) -> None:
        while True:
            # (Subscriptions in a burst, a peer's topics at connection, make one update.)
            await self._pubsub.wait_heartbeat_or_subscribed()
            await self.update()

    async def update(self) -> None:
        """Store what changed about connected member peers; refresh the member set."""
        ours = set(self._our_topics())
        batch = WriteBatch()
        live: set[PeerId] = set()
        for topic in ours:
            live.update(self._pubsub.topic_peers(topic))
        for peer in live:
            conn = self._host.connections.get(peer)
            if conn is None or conn.closed:
                continue
            shared = sorted(ours.intersection(self._pubsub.peer_topics(peer)))
            known = self._peerstore.addresses(peer)
            inputs = (conn, conn.listen_addrs, known, shared)
            last = self._inputs.get(peer)
            if (
                last is not None
                and last[0] is conn
                and last[1] is conn.listen_addrs
                and last[2:] == inputs[2:]
            ):
                continue  # built from the same things: the same row
            self._inputs[peer] = inputs
            addrs = _addresses(conn, known)
            if not addrs:
                continue  # nothing to dial it at (identify not done yet): when it reports
            row = StoredMemberPeer(addrs=[str(a) for a in addrs], topics=shared[:MAX_STORED_TOPICS])
            if self._stored.get(peer) != row:
                log.info("member peer %s stored at %s", peer, " ".join(row.addrs))
                self._stored[peer] = row
                batch.put(MEMBER_PEERS, PREFIX + peer.multihash, row)
        for peer, row in list(self._stored.items()):
            if not ours.intersection(row.topics):  # we left every context we shared
                del self._stored[peer]
                batch.delete(MEMBER_PEERS, PREFIX + peer.multihash)
        if len(self._inputs) > 2 * len(live) + 16:
            for peer in [p for p in self._inputs if p not in live]:
                del self._inputs[peer]
        if len(batch):
            await self._store.write(batch)
        self._peerstore.set_members(self._stored)


async def remember(
    store: AsyncStore, conn: Connection, topic: str, known: Collection[str] = ()
) -> Callable[[WriteBatch], None]:
    """What stores the peer of ``conn`` as a member peer for ``topic`` (with the multiaddrs
    ``known`` for it), keeping what was stored about it, in the caller's batch: for a join's
    inviter, committed with the context it joins. Until the tracker's next heartbeat stores
    it, a node that crashes would restart knowing no peer of that context (and, without
    mDNS or bootstrap peers, stay alone)."""
    key = PREFIX + conn.peer_id.multihash
    old = await store.get(MEMBER_PEERS, key)
    parsed = [a.without_peer_id() for a in _parse(list(known))]
    addrs = [str(a) for a in _addresses(conn, parsed)]
    if old is not None:
        addrs = list(dict.fromkeys([*addrs, *old.addrs]))
    topics = [topic, *(t for t in (old.topics if old else []) if t != topic)]
    row = StoredMemberPeer(addrs=addrs[:MAX_ADDRS_PER_PEER], topics=topics[:MAX_STORED_TOPICS])

    def stage(batch: WriteBatch) -> None:
        if addrs:
            batch.put(MEMBER_PEERS, key, row)

    return stage


def _addresses(conn: Connection, known: Collection[Multiaddr]) -> list[Multiaddr]:
    first: list[Multiaddr] = []
    if conn.outbound and conn.remote_addr is not None and is_dialable(conn.remote_addr):
        first.append(conn.remote_addr.without_peer_id())
    merged = dict.fromkeys([*first, *identified_addrs(conn), *known])
    return list(merged)[:MAX_ADDRS_PER_PEER]


def _parse(texts: list[str]) -> list[Multiaddr]:
    addrs: list[Multiaddr] = []
    for text in texts:
        try:
            addrs.append(Multiaddr.from_string(text))
        except ProtocolError:
            continue
    return addrs


def _peer_of(key: bytes) -> PeerId | None:
    try:
        return PeerId.from_bytes(key[len(PREFIX) :])
    except (ProtocolError, ValueError):
        return None
