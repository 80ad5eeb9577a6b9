"""Kademlia on a memory network: 50 hosts converge, providers are found, hostile peers cost
only themselves (garbage, endless or far-away peers, forged and expired records)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from trionode.config import KadSection
from trionode.net.discovery import serve_discovery
from trionode.net.host import Connection, Host
from trionode.net.kad import Kademlia, KadMetrics, read_message
from trionode.net.memory import MemoryNetwork
from trionode.net.metrics import NetMetrics
from trionode.net.peerstore import PeerStore
from trionode.wire import kad as wire
from trionode.wire.kad_table import bucket_index
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multiaddr import Multiaddr

from .host_helpers import network as network_section

PROTOCOL = "/trionode/kad/1.0.0"


class Dht:
    def __init__(self, host: Host, kad: Kademlia, registry: CollectorRegistry) -> None:
        self.host = host
        self.kad = kad
        self.registry = registry

    @property
    def address(self) -> Multiaddr:
        return self.host.listen_addrs[0].with_peer_id(self.host.peer_id)

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def open_dhts(
    network: MemoryNetwork,
    n: int,
    *,
    wall_clock: Callable[[], float] | None = None,
    **overrides: Any,
) -> AsyncIterator[list[Dht]]:
    settings: dict[str, Any] = {"listen": ["/ip4/0.0.0.0/tcp/4001"], "max_connections": 200}
    settings.update(overrides)
    out: list[Dht] = []
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stop = trio.Event()
        stack.callback(stop.set)
        for _ in range(n):
            registry = CollectorRegistry()
            host = Host(
                PrivateKey.generate(),
                network_section(**settings),
                NetMetrics(registry),
                transport=network.transport(),
            )
            extra = {} if wall_clock is None else {"wall_clock": wall_clock}
            kad = Kademlia(host, host.config, KadMetrics(registry), **extra)
            await nursery.start(host.run, stop)
            out.append(Dht(host, kad, registry))
        yield out


async def join(dhts: list[Dht], seed: Dht) -> None:
    """Each node connects to ``seed`` only, then bootstraps (a lookup of its own id)."""
    for dht in dhts:
        if dht is seed:
            continue
        conn = await dht.host.connect(seed.address)
        await conn.identified.wait()
        await dht.kad.bootstrap()


def true_closest(
    dhts: list[Dht], key: bytes, k: int, exclude: PeerId | None = None
) -> list[PeerId]:
    target = wire.kad_id(key)
    peers = [d.host.peer_id for d in dhts if d.host.peer_id != exclude]
    return sorted(peers, key=lambda p: wire.kad_id(p.multihash) ^ target)[:k]


async def test_fifty_nodes_lookups_converge_to_the_true_closest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    rng = random.Random(7)
    async with open_dhts(network, 50) as dhts:
        await join(dhts, dhts[0])
        for dht in dhts:
            assert 0 < len(dht.kad.table) <= 50  # bounded by the network, never self
            assert dht.host.peer_id not in dht.kad.table
        for _ in range(10):
            asker = rng.choice(dhts)
            key = rng.randbytes(34)
            found = [c.peer_id for c in await asker.kad.closest_peers(key)]
            expected = true_closest(dhts, key, 20, exclude=asker.host.peer_id)
            assert found[:5] == expected[:5]
            assert len(set(found) & set(expected)) >= 18
        # Peer routing: any node finds any other's address by its id.
        for _ in range(10):
            asker, wanted = rng.sample(dhts, 2)
            for conn in list(asker.host.connections.values()):
                if conn.peer_id == wanted.host.peer_id:
                    await conn.aclose()  # make it a lookup, not a glance at our connections
            addrs = await asker.kad.find_peer(wanted.host.peer_id)
            assert wanted.host.listen_addrs[0] in addrs


async def test_providers_are_found_and_signed_records_checked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with open_dhts(network, 20) as dhts:
        await join(dhts, dhts[0])
        key = wire.sha256_multihash(b"some context")
        provider, seeker = dhts[5], dhts[17]
        assert await provider.kad.provide(key) > 0
        found = await seeker.kad.find_providers(key, signed_only=True)
        assert [p.peer_id for p in found] == [provider.host.peer_id]
        assert found[0].signed
        assert provider.host.listen_addrs[0] in found[0].addrs
        # Another key finds nothing.
        assert await seeker.kad.find_providers(wire.sha256_multihash(b"other")) == []


async def test_expired_and_forged_provider_records_are_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    wall = [1_000_000.0]
    async with open_dhts(
        network, 8, wall_clock=lambda: wall[0], kad=KadSection(provider_ttl=3600)
    ) as dhts:
        await join(dhts, dhts[0])
        key = wire.sha256_multihash(b"ctx")
        honest, forger, seeker = dhts[1], dhts[2], dhts[3]
        await honest.kad.provide(key)
        # The forger announces the honest peer's record under another key, a record of its
        # own with addresses swapped in after signing, and an unsigned announcement.
        stolen = honest.kad.provider_record(key)
        other_key = wire.sha256_multihash(b"other ctx")
        tampered = forger.kad.provider_record(key).replace(
            forger.host.listen_addrs[0].to_bytes(), Multiaddr.from_tcp("10.9.9.9", 1).to_bytes()
        )
        for target in dhts:
            if target is forger:
                continue
            conn = await forger.host.connect(target.address)
            _, stream = await conn.new_stream([PROTOCOL])
            async with stream:
                for message in (
                    wire.KadMessage(
                        wire.MessageType.ADD_PROVIDER,
                        other_key,
                        providers=(
                            wire.KadPeer(
                                forger.host.peer_id.multihash, (b"x",), provider_record=stolen
                            ),
                        ),
                    ),
                    wire.KadMessage(
                        wire.MessageType.ADD_PROVIDER,
                        key,
                        providers=(
                            wire.KadPeer(
                                forger.host.peer_id.multihash,
                                (forger.host.listen_addrs[0].to_bytes(),),
                                provider_record=tampered,
                            ),
                        ),
                    ),
                ):
                    await stream.send_all(wire.encode_message(message))
                await stream.send_eof()
        await trio.testing.wait_all_tasks_blocked()
        found = await seeker.kad.find_providers(key, signed_only=True)
        assert [p.peer_id for p in found] == [honest.host.peer_id]
        assert await seeker.kad.find_providers(other_key, signed_only=True) == []
        assert (
            sum(
                d.sample("trionode_kad_provider_records_rejected_total", reason="forged")
                for d in dhts
            )
            > 0
        )
        # Past its expiry (wall clock), the honest record is dropped by readers.
        wall[0] += 3601
        assert await seeker.kad.find_providers(key, signed_only=True) == []


# -- hostile DHT servers ----------------------------------------------------------------------


async def _hostile(
    dhts: list[Dht], handler: Callable[[trio.abc.HalfCloseableStream, Connection], Awaitable[None]]
) -> Dht:
    """Make ``dhts[-1]`` answer every DHT request with ``handler``."""
    bad = dhts[-1]
    bad.host.set_handler(PROTOCOL, handler)
    return bad


async def test_garbage_answers_cost_the_sender_only(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    async with open_dhts(network, 12) as dhts:
        await join(dhts, dhts[0])

        async def garbage(stream: trio.abc.HalfCloseableStream, _conn: Connection) -> None:
            await read_message(stream)
            await stream.send_all(b"\x05\xff\xff\xff\xff\xff")  # a frame that is no protobuf

        bad = await _hostile(dhts, garbage)
        asker = dhts[3]
        asker.kad.table.add(bad.host.peer_id, (bad.host.listen_addrs[0],), trio.current_time())
        key = bad.host.peer_id.multihash  # the bad node is the nearest: it is surely asked
        found = [c.peer_id for c in await asker.kad.closest_peers(key)]
        assert bad.host.peer_id not in found
        assert bad.host.peer_id not in asker.kad.table
        assert asker.sample("trionode_kad_requests_total", outcome="bad_answer") >= 1
        assert asker.sample("trionode_p2p_misbehaving_peers_total", reason="kad") >= 1
        expected = true_closest(dhts[:-1], key, 20, exclude=asker.host.peer_id)
        assert set(found) == set(expected)


async def test_endless_far_away_peers_do_not_prolong_a_lookup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with open_dhts(network, 12) as dhts:
        await join(dhts, dhts[0])
        asked = 0

        async def endless(stream: trio.abc.HalfCloseableStream, _conn: Connection) -> None:
            # Every answer names 40 fresh, unreachable peers (40 is the most a message may
            # carry; more is refused by the decoder).
            nonlocal asked
            while (request := await read_message(stream, allow_eof=True)) is not None:
                asked += 1
                peers = tuple(
                    wire.KadPeer(
                        PrivateKey.generate().peer_id().multihash,
                        (Multiaddr.from_tcp("10.99.0.1", 1000 + i).to_bytes(),),
                    )
                    for i in range(wire.MAX_PEERS)
                )
                await stream.send_all(
                    wire.encode_message(wire.KadMessage(request.type, request.key, closer=peers))
                )

        bad = await _hostile(dhts, endless)
        asker = dhts[3]
        asker.kad.table.add(bad.host.peer_id, (bad.host.listen_addrs[0],), trio.current_time())
        start = trio.current_time()
        found = await asker.kad.closest_peers(b"\x12\x20" + bytes(32))
        assert trio.current_time() - start <= asker.host.config.kad.lookup_timeout
        assert asker.kad.metrics is not None
        assert asked >= 1
        # The bounded walk sent at most kad_max_lookup_queries requests in all.
        requests = sum(
            asker.sample("trionode_kad_requests_total", outcome=o)
            for o in ("ok", "failed", "bad_answer")
        )
        assert requests <= asker.host.config.kad.max_lookup_queries
        assert {c.peer_id for c in found} <= {d.host.peer_id for d in dhts}


async def test_oversized_and_malformed_requests_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with open_dhts(network, 2) as dhts:
        client, server = dhts
        conn = await client.host.connect(server.address)
        for payload in (
            b"\xff\xff\xff\x7f",  # declares 256 MiB: refused from the prefix
            b"\x02\x08\x09",  # type 9
            wire.encode_message(wire.KadMessage(wire.MessageType.FIND_NODE, b"k" * 200)),
        ):
            _, stream = await conn.new_stream([PROTOCOL])
            async with stream:
                await stream.send_all(payload)
                assert await stream.receive_some(100) == b""  # closed, no answer
        # The server is fine and still answers a good request.
        _, stream = await conn.new_stream([PROTOCOL])
        async with stream:
            await stream.send_all(wire.encode_message(wire.KadMessage(wire.MessageType.PING)))
            reply = await read_message(stream)
        assert reply is not None
        assert reply.type is wire.MessageType.PING


async def test_client_mode_asks_but_does_not_serve(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    async with (
        open_dhts(network, 6) as servers,
        open_dhts(network, 1, kad=KadSection(server=False)) as clients,
    ):
        await join(servers, servers[0])
        client = clients[0]
        conn = await client.host.connect(servers[2].address)
        await conn.identified.wait()
        found = await client.kad.closest_peers(b"\x12\x20" + bytes(32))
        assert {c.peer_id for c in found} == {s.host.peer_id for s in servers}
        assert PROTOCOL not in client.host.protocols
        # Servers never admit the client to their tables.
        assert all(client.host.peer_id not in s.kad.table for s in servers)


# -- peer routing for discovery ---------------------------------------------------------------


async def test_discovery_redials_a_member_at_the_address_the_dht_knows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with open_dhts(network, 8) as dhts:
        await join(dhts[:-1], dhts[0])
        member, seeker = dhts[-2], dhts[-1]
        conn = await seeker.host.connect(dhts[0].address)
        await conn.identified.wait()
        store = PeerStore.from_config(seeker.host.config, local_peer=seeker.host.peer_id)
        stale = Multiaddr.from_tcp("10.42.9.9", 4001)  # where it was: nobody listens there
        store.add(member.host.peer_id, [stale], source="stored")
        store.set_members([member.host.peer_id])
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_discovery,
                    seeker.host,
                    store,
                    seeker.host.config,
                    resolve=seeker.kad.find_peer,
                    shutdown_requested=stop,
                )
            )
            while member.host.peer_id not in seeker.host.connections:
                await seeker.host.wait_connection_changed()
            stop.set()
        assert member.host.listen_addrs[0] in store.addresses(member.host.peer_id)


async def test_a_full_bucket_keeps_a_live_contact_and_evicts_a_silent_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """k = 1: a second peer in the bucket makes the table ping the first (a FIND_NODE); a
    first that answers stays, and once it is gone the newcomer takes its place."""
    own = PrivateKey.generate()
    position = wire.kad_id(own.peer_id().multihash)
    same_bucket: list[PrivateKey] = []
    while len(same_bucket) < 2:  # keys whose ids fall in our farthest bucket (half of all)
        key = PrivateKey.generate()
        if bucket_index(position, wire.kad_id(key.peer_id().multihash)) == 0:
            same_bucket.append(key)
    network = MemoryNetwork()
    config = network_section(listen=["/ip4/0.0.0.0/tcp/4001"], kad=KadSection(bucket_size=1))
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            stops = [trio.Event() for _ in range(3)]
            dhts: list[Dht] = []
            for key, stop in zip([own, *same_bucket], stops, strict=True):
                registry = CollectorRegistry()
                host = Host(key, config, NetMetrics(registry), transport=network.transport())
                await nursery.start(host.run, stop)
                dhts.append(Dht(host, Kademlia(host, config, KadMetrics(registry)), registry))
            observer, first, second = dhts
            await nursery.start(observer.kad.run, stops[0])

            async def meet(other: Dht) -> None:
                conn = await observer.host.connect(other.address)
                await conn.identified.wait()
                observer.kad.admit_connected()

            async def probes(outcome: str, count: int) -> None:
                while observer.sample("trionode_kad_bucket_probes_total", outcome=outcome) < count:
                    await trio.testing.wait_all_tasks_blocked()
                    await trio.sleep(1)

            await meet(first)
            assert first.host.peer_id in observer.kad.table
            await meet(second)
            await probes("kept", 1)
            assert first.host.peer_id in observer.kad.table
            assert second.host.peer_id not in observer.kad.table
            stops[1].set()  # the first goes away for good
            while first.host.peer_id in observer.host.connections:
                await observer.host.wait_connection_changed()
            observer.kad.admit_connected()  # the second, still connected, asks again
            await probes("evicted", 1)
            assert first.host.peer_id not in observer.kad.table
            assert second.host.peer_id in observer.kad.table
            for stop in stops:
                stop.set()
