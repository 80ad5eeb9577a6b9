"""Peers that share a context with us: never forgotten, redialled soon, kept across restarts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig, NodeConfig
from trionode.net import member_peers
from trionode.net.host import Connection
from trionode.net.member_peers import MEMBER_PEERS, PREFIX, StoredMemberPeer
from trionode.net.memory import MemoryNetwork, MemoryTransport
from trionode.node import Node, open_node
from trionode.testing import cluster_file_config, make_test_config
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

from .test_discovery import FakeClock, _peer, _store, _tcp

APPS = Path(__file__).resolve().parents[2] / "apps"

# -- the peer store's rules for members -------------------------------------------------------


def test_a_member_is_never_forgotten_and_its_backoff_stays_low() -> None:
    clock = FakeClock()
    store, forgotten = _store(clock, member_max_backoff=2.0, max_backoff=60.0)
    store.add(_peer(1), [_tcp(1)], source="exchange")
    store.add(_peer(2), [_tcp(2)], source="exchange")
    store.set_members([_peer(1)])
    for _ in range(50):  # far past max_failures (3)
        assert not store.record_failure(_peer(1))
        assert store.next_dial_time(members_only=True) - clock.now <= 2.0
        clock.now = store.next_dial_time(members_only=True)
    known = store.get(_peer(1))
    assert known is not None
    assert known.member
    assert known.failures == 50
    # The non-member is forgotten after three failures, as before.
    for _ in range(3):
        store.record_failure(_peer(2))
    assert forgotten == [(_peer(2), "unreachable")]
    # A member outlives the TTL and is never the one evicted.
    clock.now += 10_000
    assert store.expire() == []
    for n in range(3, 20):
        store.add(_peer(n), [_tcp(n)], source="identify")
    assert _peer(1) in store
    assert len(store) == 10


def test_members_are_dial_candidates_first_and_their_backoff_is_cut() -> None:
    clock = FakeClock()
    store, _ = _store(clock, member_max_backoff=2.0, max_backoff=60.0)
    for n in (1, 2, 3):
        store.add(_peer(n), [_tcp(n)], source="identify")
    store.add(_peer(4), [_tcp(4)], source="stored")
    store.record_failure(_peer(4))
    store.record_failure(_peer(4))  # backing off 2 s, with the most failures of all
    clock.now += 2.0
    assert store.dial_candidates(5)[-1] == _peer(4)
    for _ in range(3):
        store.record_failure(_peer(4))  # still not forgotten: backoff now 32 s, or gone
        if _peer(4) not in store:
            break
    assert _peer(4) not in store  # ordinary peer: forgotten; a member would not be
    store.add(_peer(4), [_tcp(4)], source="stored")
    for _ in range(2):
        store.record_failure(_peer(4))  # backing off 2 s under the ordinary rules
    store.set_members([_peer(4)])
    assert store.next_dial_time(members_only=True) <= clock.now + 2.0
    clock.now += 2.0
    assert store.dial_candidates(1) == [_peer(4)]  # first, despite its failures
    store.set_members([])
    assert store.dial_candidates(5)[-1] == _peer(4)  # ordinary rules again


# -- a node that restarts somewhere else finds its members again --------------------------------


def _settings(file: FileConfig) -> FileConfig:
    file = cluster_file_config(file)
    # No bootstrap, no mDNS: the wildcard listener is made concrete by the memory network.
    network = replace(
        file.network, listen=["/ip4/0.0.0.0/tcp/4001"], bootstrap=[], member_redial_max_backoff=3.0
    )
    return replace(file, network=network)


def _config(home: Path) -> NodeConfig:
    config, _ = make_test_config(home, api=False, configure=_settings)
    return replace(config, inline_store=True, discovery=True)


@asynccontextmanager
async def _node(config: NodeConfig, transport: MemoryTransport) -> AsyncIterator[Node]:
    async with open_node(config, transport=transport) as node:
        yield node


async def _wait(node: Node, predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await node.pubsub.wait_heartbeat()


def _members(node: Node) -> set[PeerId]:
    return {p for p in node.peerstore.peers() if node.peerstore.is_member(p)}


async def _values(node: Node, context: bytes) -> object:
    return (await node.contexts.execute(context, "entries", "{}")).result


async def _converged(nodes: list[Node], context: bytes) -> bool:
    states = [await n.contexts.state(context) for n in nodes]
    return all(s == states[0] and s[2] == 0 for s in states)


async def test_restarted_member_at_a_new_address_reconnects_and_converges(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    configs = [_config(tmp_path / name) for name in "abc"]
    with trio.fail_after(600):
        async with (
            _node(configs[0], network.transport()) as a,
            _node(configs[2], network.transport()) as c,
        ):
            app = (await a.applications.install(str(APPS / "kv_store"))).application_id
            await c.applications.install(str(APPS / "kv_store"))
            context = (await a.contexts.create(app)).context_id
            await c.joins.join(await a.joins.invite(context))
            b_transport = network.transport()
            async with _node(configs[1], b_transport) as b:
                await b.applications.install(str(APPS / "kv_store"))
                await b.joins.join(await a.joins.invite(context))
                # b and c were introduced by nobody but a (peer exchange) ...
                await _wait(b, lambda: c.host.peer_id in b.host.connections)
                # ... and both are stored as member peers of b.
                await _wait(
                    b,
                    lambda: {a.host.peer_id, c.host.peer_id} <= _members(b),
                )
                b_id = b.host.peer_id
            # b is gone (as if killed). a and c write meanwhile and keep failing to dial it,
            # far longer than it takes to forget an ordinary peer.
            for i in range(5):
                await a.contexts.execute(context, "set", json.dumps({"key": f"a{i}", "value": "1"}))
                await c.contexts.execute(context, "set", json.dumps({"key": f"c{i}", "value": "1"}))
            await trio.sleep(120)
            for node in (a, c):
                known = node.peerstore.get(b_id)
                assert known is not None, "a member peer must never be forgotten"
                assert known.member
                assert known.failures >= 3
            # b comes back on a new virtual IP that nobody knows: only its stored member
            # peers can bring it back.
            new_transport = network.transport()
            assert new_transport.host != b_transport.host
            async with _node(configs[1], new_transport) as b:
                await _wait(b, lambda: {a.host.peer_id, c.host.peer_id} <= set(b.host.connections))
                while not await _converged([a, b, c], context):
                    await b.pubsub.wait_heartbeat()
                assert await _values(b, context) == await _values(a, context)
                # a and c now know b's new address (identify), so it is stored again.
                rows = dict(await a.store.scan(MEMBER_PEERS, prefix=PREFIX))
                row = rows[PREFIX + b_id.multihash]
                assert isinstance(row, StoredMemberPeer)
                assert any(new_transport.host in addr for addr in row.addrs)


async def test_a_joiner_killed_in_its_first_sync_finds_its_inviter_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Found by the kill -9 matrix: a joiner killed during its first sync (its snapshot),
    before the member-peer tracker's first heartbeat, restarted knowing no peer at all
    (no bootstrap, no mDNS) and never finished its snapshot. The join now stores the
    inviter as a member peer before that sync begins."""
    network = MemoryNetwork()
    a_config, b_config = _config(tmp_path / "a"), _config(tmp_path / "b")
    with trio.fail_after(600):
        async with _node(a_config, network.transport()) as a:
            app = (await a.applications.install(str(APPS / "kv_store"))).application_id
            context = (await a.contexts.create(app)).context_id
            for i in range(5):
                await a.contexts.execute(context, "set", json.dumps({"key": f"k{i}", "value": "v"}))
            stored_at_first_sync: list[object] = []
            async with _node(b_config, network.transport()) as b:
                await b.applications.install(str(APPS / "kv_store"))
                first_sync = trio.Event()

                async def stuck_first_sync(
                    context_id: bytes, peer: PeerId, *, opened: object = None
                ) -> int:
                    rows = dict(await b.store.scan(MEMBER_PEERS, prefix=PREFIX))
                    stored_at_first_sync.append(rows.get(PREFIX + peer.multihash))
                    first_sync.set()
                    await trio.sleep_forever()
                    raise AssertionError("unreachable")

                b.joins.sync_session = stuck_first_sync
                invitation = await a.joins.invite(context)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(b.joins.join, invitation)
                    await first_sync.wait()
                    nursery.cancel_scope.cancel()  # b goes down in the middle of its join
            row = stored_at_first_sync[0]
            assert isinstance(row, StoredMemberPeer)
            assert row.addrs
            # b comes back somewhere else; only the stored inviter can bring it back, and
            # the snapshot its join began completes with it.
            async with _node(b_config, network.transport()) as b:
                await _wait(b, lambda: a.host.peer_id in b.host.connections)
                while not await _converged([a, b], context):
                    await b.pubsub.wait_heartbeat()
                assert await _values(b, context) == await _values(a, context)


def _rare_heartbeats(file: FileConfig) -> FileConfig:
    file = _settings(file)
    return replace(file, pubsub=replace(file.pubsub, heartbeat_interval=RARE))


RARE = 1000.0
"""Seconds between pubsub heartbeats: none comes within the test's bound."""


async def test_a_member_is_recorded_when_it_subscribes_not_at_the_next_heartbeat(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A node partitioned right after another joined must already count it as a member:
    # an ordinary peer is forgotten after three failed dials.
    network = MemoryNetwork()
    configs = []
    for name in "ab":
        config, _ = make_test_config(tmp_path / name, api=False, configure=_rare_heartbeats)
        configs.append(replace(config, inline_store=True, discovery=True))
    with trio.fail_after(RARE / 2):
        async with (
            _node(configs[0], network.transport()) as a,
            _node(configs[1], network.transport()) as b,
        ):
            app = (await a.applications.install(str(APPS / "kv_store"))).application_id
            await b.applications.install(str(APPS / "kv_store"))
            context = (await a.contexts.create(app)).context_id
            await b.joins.join(await a.joins.invite(context))
            # Within a few (virtual) seconds of the join, far from the next heartbeat.
            await trio.sleep(5)
            assert b.host.peer_id in _members(a)
            rows = dict(await a.store.scan(MEMBER_PEERS, prefix=PREFIX))
            assert PREFIX + b.host.peer_id.multihash in rows


async def test_a_heartbeat_rebuilds_only_the_rows_of_peers_whose_addresses_changed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Building a row parses and prints every address of the peer: done for every member on
    # every pubsub heartbeat, it was most of an idle node's work at 100 members.
    network = MemoryNetwork()
    configs = []
    for name in "abc":
        config, _ = make_test_config(tmp_path / name, api=False, configure=_settings)
        configs.append(replace(config, inline_store=True, discovery=True))
    built: list[PeerId] = []
    addresses = member_peers._addresses

    def counted(conn: Connection, known: Collection[Multiaddr]) -> list[Multiaddr]:
        built.append(conn.peer_id)
        return addresses(conn, known)

    monkeypatch.setattr(member_peers, "_addresses", counted)
    with trio.fail_after(120):
        async with (
            _node(configs[0], network.transport()) as a,
            _node(configs[1], network.transport()) as b,
            _node(configs[2], network.transport()) as c,
        ):
            app = (await a.applications.install(str(APPS / "kv_store"))).application_id
            for joiner in (b, c):
                await joiner.applications.install(str(APPS / "kv_store"))
                context = (await a.contexts.create(app)).context_id
                await joiner.joins.join(await a.joins.invite(context))
            await _wait(a, lambda: {b.host.peer_id, c.host.peer_id} <= _members(a))
            for _ in range(3):
                await a.pubsub.wait_heartbeat()
            built.clear()
            for _ in range(5):
                await a.pubsub.wait_heartbeat()
            assert built == []  # 5 heartbeats of 3 nodes, nothing changed: no row built
            # b reports a new listen address (identify again): only b's row is rebuilt.
            conn = a.host.connections[b.host.peer_id]
            moved = Multiaddr.from_string("/ip4/10.9.9.9/tcp/4009")
            conn.listen_addrs = (*conn.listen_addrs, moved)
            await a.pubsub.wait_heartbeat()
            await a.pubsub.wait_heartbeat()
            assert set(built) == {b.host.peer_id}
            row = await a.store.get(MEMBER_PEERS, PREFIX + b.host.peer_id.multihash)
            assert row is not None
            assert str(moved) in row.addrs
