"""Members of a context meet through the DHT alone, and discovery redials a member at the
address the DHT knows when its stored one fails.

The nodes run on a memory network with no mDNS, no peer exchange between the two members
and no shared bootstrap: each member knows only a different DHT node.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import trio
import trio.testing
from msgspec.structs import replace

from trionode import schemas
from trionode.cli import _render_info
from trionode.config import FileConfig, NodeConfig
from trionode.net.memory import MemoryNetwork
from trionode.net.rendezvous import context_provider_key
from trionode.node import Node, open_node
from trionode.testing import cluster_file_config, make_test_config
from trionode.wire.multiaddr import Multiaddr

from .test_member_peers import _converged, _values, _wait

APPS = Path(__file__).resolve().parents[2] / "apps"


def _settings(file: FileConfig) -> FileConfig:
    file = cluster_file_config(file)
    kad = replace(file.network.kad, enabled=True)
    network = replace(file.network, listen=["/ip4/0.0.0.0/tcp/4001"], bootstrap=[], kad=kad)
    return replace(file, network=network)


def _config(home: Path, *, discovery: bool = False) -> NodeConfig:
    config, _ = make_test_config(home, api=False, configure=_settings)
    return replace(config, inline_store=True, discovery=discovery)


@asynccontextmanager
async def _node(config: NodeConfig, network: MemoryNetwork) -> AsyncIterator[Node]:
    async with open_node(config, transport=network.transport()) as node:
        yield node


async def _join_dht(node: Node, via: Node) -> None:
    conn = await node.host.connect(via.host.addresses()[0])
    await conn.identified.wait()


async def test_two_members_at_new_addresses_find_each_other_through_the_dht(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    a_config, b_config = _config(tmp_path / "a"), _config(tmp_path / "b")
    with trio.fail_after(900):
        async with (
            _node(_config(tmp_path / "d0"), network) as d0,
            _node(_config(tmp_path / "d1"), network) as d1,
            _node(_config(tmp_path / "d2"), network) as d2,
        ):
            assert d0.kad is not None
            for d in (d1, d2):
                await _join_dht(d, d0)
                assert d.kad is not None
                await d.kad.bootstrap()
            async with _node(a_config, network) as a, _node(b_config, network) as b:
                app = (await a.applications.install(str(APPS / "kv_store"))).application_id
                await b.applications.install(str(APPS / "kv_store"))
                context = (await a.contexts.create(app)).context_id
                await b.joins.join(await a.joins.invite(context))  # a direct dial, once
                record = await a.contexts.get(context)
                key = (await a.contexts.keys(context))[record.key_id]
                rendezvous = context_provider_key(context, key)
                # The DHT key is not derived from the context id alone.
                assert context not in rendezvous
                assert rendezvous != context_provider_key(context, bytes(32))
            # Both members are gone; both come back at new addresses that the other never
            # learned, each knowing a different DHT node and nothing else.
            async with _node(a_config, network) as a:
                await _join_dht(a, d0)
                assert a.rendezvous is not None
                rendezvous_a = a.rendezvous
                await _wait(a, lambda: rendezvous_a.rounds >= 1)
                await a.contexts.execute(context, "set", json.dumps({"key": "k", "value": "v"}))
                async with _node(b_config, network) as b:
                    assert a.host.peer_id not in b.host.connections
                    await _join_dht(b, d2)
                    await _wait(b, lambda: a.host.peer_id in b.host.connections)
                    while not await _converged([a, b], context):
                        await b.pubsub.wait_heartbeat()
                    assert await _values(b, context) == await _values(a, context)
                    # The DHT nodes hold records under the opaque key only.
                    for d in (d0, d1, d2):
                        assert d.kad is not None
                        held = d.kad.providers.get(context, trio.current_time())
                        assert held == []
                    stored = [
                        p.peer_id
                        for d in (d0, d1, d2)
                        if d.kad is not None
                        for p in d.kad.providers.get(rendezvous, trio.current_time())
                    ]
                    assert a.host.peer_id in stored


async def test_a_new_context_is_announced_on_the_dht_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Created or joined after the node's first rendezvous round: announced right away, not
    at the next republish (`network.kad.provider_republish`, 30 minutes)."""
    network = MemoryNetwork()
    with trio.fail_after(900):
        async with (
            _node(_config(tmp_path / "d0"), network) as d0,
            _node(_config(tmp_path / "a"), network) as a,
            _node(_config(tmp_path / "b"), network) as b,
        ):
            assert a.rendezvous is not None
            assert b.rendezvous is not None
            assert d0.kad is not None
            dht = d0.kad
            for node in (a, b):
                await _join_dht(node, d0)
            rendezvous_a, rendezvous_b = a.rendezvous, b.rendezvous
            await _wait(a, lambda: rendezvous_a.rounds >= 1 and rendezvous_b.rounds >= 1)
            app = (await a.applications.install(str(APPS / "kv_store"))).application_id
            await b.applications.install(str(APPS / "kv_store"))

            def holders(key: bytes) -> set[object]:
                return {p.peer_id for p in dht.providers.get(key, trio.current_time())}

            started = trio.current_time()
            context = (await a.contexts.create(app)).context_id
            record = await a.contexts.get(context)
            key = context_provider_key(context, (await a.contexts.keys(context))[record.key_id])
            await _wait(a, lambda: a.host.peer_id in holders(key))
            joined = trio.current_time()
            await b.joins.join(await a.joins.invite(context))
            await _wait(b, lambda: b.host.peer_id in holders(key))
            republish = a.config.network.kad.provider_republish
            # Each announcement took a heartbeat or two of virtual time, far below a
            # republish period (and no full round ran in between).
            assert joined - started < republish / 10
            assert trio.current_time() - joined < republish / 10
            assert rendezvous_a.announced == 1
            assert rendezvous_b.announced == 1
            # What `/admin-api/node` and `trionode info` show.
            status = b.dht_status()
            assert status.enabled
            assert status.protocol == "/trionode/kad/1.0.0"
            assert status.routing_table >= 1
            assert status.announced_contexts == 1
            assert status.last_announcement is not None
            assert status.last_bootstrap is not None
            assert d0.dht_status().provider_records >= 2  # a's and b's for the context
            # Both listen on the wildcard; what they handed out is dialable, never 0.0.0.0.
            for held in dht.providers.get(key, trio.current_time()):
                addrs = [str(Multiaddr.from_bytes(raw)) for raw in held.addrs]
                assert addrs
                assert all("/ip4/0.0.0.0/" not in addr for addr in addrs), addrs
            info = schemas.NodeInfo(
                peer_id=str(b.host.peer_id),
                version="x",
                addresses=[],
                reachability={"status": "unknown"},
                dht=status,
            )
            decoded = msgspec.json.decode(msgspec.json.encode(info), type=schemas.NodeInfo)
            assert decoded.dht == status
            rendered = _render_info(decoded)
            assert "dht announced contexts  1" in rendered


async def test_a_rotated_key_is_announced_before_the_next_republish(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Removing a member rotates the context key (the removed member cannot compute the
    new rendezvous key): the admin announces under the new key within
    `network.kad.key_check_interval`, not after the 30-minute republish."""
    network = MemoryNetwork()
    with trio.fail_after(900):
        async with (
            _node(_config(tmp_path / "d0"), network) as d0,
            _node(_config(tmp_path / "a"), network) as a,
            _node(_config(tmp_path / "b"), network) as b,
        ):
            assert a.rendezvous is not None
            assert d0.kad is not None
            dht = d0.kad
            for node in (a, b):
                await _join_dht(node, d0)
            app = (await a.applications.install(str(APPS / "kv_store"))).application_id
            await b.applications.install(str(APPS / "kv_store"))
            context = (await a.contexts.create(app)).context_id
            await b.joins.join(await a.joins.invite(context))

            def holders(key: bytes) -> set[object]:
                return {p.peer_id for p in dht.providers.get(key, trio.current_time())}

            async def current_key() -> bytes:
                record = await a.contexts.get(context)
                return context_provider_key(
                    context, (await a.contexts.keys(context))[record.key_id]
                )

            old = await current_key()
            await _wait(a, lambda: a.host.peer_id in holders(old))
            member_b = (await b.contexts.get(context)).our_member
            removed_at = trio.current_time()
            await a.contexts.remove_member(context, member_b)
            new = await current_key()
            assert new != old
            await _wait(a, lambda: a.host.peer_id in holders(new))
            waited = trio.current_time() - removed_at
            assert waited <= a.config.network.kad.key_check_interval * 2
            assert waited < a.config.network.kad.provider_republish / 10
            assert b.host.peer_id not in holders(new)  # b never got the new key
