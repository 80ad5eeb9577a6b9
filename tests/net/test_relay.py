"""Circuit Relay v2: codec, then hosts on a memory network where A accepts no inbound
connections (the "no inbound" NAT model) and is reached through relay R."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st
from msgspec.structs import replace
from prometheus_client import CollectorRegistry

from trionode.cli_invitations import describe_invitation
from trionode.config import FileConfig, NodeConfig, RelaySection
from trionode.errors import PeerError, RemoteProtocolError
from trionode.net.autonat import Reachability
from trionode.net.host import Host
from trionode.net.memory import MemoryNetwork, NatKind
from trionode.net.metrics import NetMetrics
from trionode.net.relay import RelayClient, RelayServer, split_circuit
from trionode.node import open_node
from trionode.testing import cluster_file_config, make_test_config
from trionode.wire import relay as wire
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import Multiaddr

from .host_helpers import network as network_section

APPS = Path(__file__).resolve().parents[2] / "apps"

# -- the codec ---------------------------------------------------------------------------------


def test_captured_js_bytes() -> None:
    # The frames js-libp2p's relay and client put on the wire (reference §1.8).
    assert wire.encode_hop(wire.HopMessage(wire.HopType.RESERVE)).hex() == "020800"
    ok = wire.StopMessage(wire.StopType.STATUS, status=wire.Status.OK)
    assert wire.encode_stop(ok).hex() == "0408012064"
    reply = bytes.fromhex("0e 08 02 22 08 08 c0a907 10 808008 28 64".replace(" ", ""))
    decoded = wire.decode_hop_frame(reply)
    assert decoded is not None
    message, used = decoded
    assert used == len(reply)
    assert message.status is wire.Status.OK
    assert message.limit == wire.Limit(duration=120000, data=131072)


def test_round_trips_and_leftover() -> None:
    peer = PrivateKey.generate().peer_id().multihash
    message = wire.HopMessage(
        wire.HopType.STATUS,
        reservation=wire.Reservation(expire=1_800_000_000, addrs=(b"\x04\x7f\x00\x00\x01",)),
        limit=wire.Limit(duration=60, data=1 << 20),
        status=wire.Status.OK,
    )
    framed = wire.encode_hop(message) + b"/multistream"
    decoded = wire.decode_hop_frame(framed)
    assert decoded is not None
    assert decoded[0] == message
    assert framed[decoded[1] :] == b"/multistream"
    stop = wire.StopMessage(wire.StopType.CONNECT, peer=wire.Peer(peer), limit=wire.Limit())
    got = wire.decode_stop_frame(wire.encode_stop(stop))
    assert got is not None
    assert got[0] == stop


@pytest.mark.parametrize(
    ("hex_", "message"),
    [("00", "lacks its hop type"), ("020809", "unknown relay hop type"), ("0408022863", "status")],
)
def test_bad_hop_messages(hex_: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        wire.decode_hop_frame(bytes.fromhex(hex_))


@given(st.binary(max_size=200))
def test_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    for decode in (wire.decode_hop_frame, wire.decode_stop_frame):
        try:
            decode(data)
        except RemoteProtocolError:
            continue


def test_split_circuit() -> None:
    r, a = (PrivateKey.generate().peer_id() for _ in range(2))
    relay_part, relay, target = split_circuit(
        Multiaddr.from_string(f"/ip4/10.0.0.1/tcp/1/p2p/{r}/p2p-circuit/p2p/{a}")
    )
    assert (str(relay_part), relay, target) == (f"/ip4/10.0.0.1/tcp/1/p2p/{r}", r, a)
    with pytest.raises(PeerError):
        split_circuit(Multiaddr.from_string(f"/p2p-circuit/p2p/{a}"))


# -- a relay on a memory network ----------------------------------------------------------------


@asynccontextmanager
async def _host(
    network: MemoryNetwork, stack: AsyncExitStack, nursery: trio.Nursery, **overrides: Any
) -> AsyncIterator[tuple[Host, RelayClient, RelayServer | None]]:
    settings: dict[str, Any] = {"listen": ["/ip4/0.0.0.0/tcp/4001"]}
    settings.update(overrides)
    host = Host(
        PrivateKey.generate(),
        network_section(**settings),
        NetMetrics(CollectorRegistry()),
        transport=network.transport(),
    )
    server = RelayServer(host, host.config) if host.config.relay.serve else None
    client = RelayClient(host, host.config)
    stop = trio.Event()
    stack.callback(stop.set)
    await nursery.start(host.run, stop)
    await nursery.start(client.run, stop)
    yield host, client, server


@asynccontextmanager
async def _relay_and_private_node(
    network: MemoryNetwork, **relay_overrides: Any
) -> AsyncIterator[tuple[Host, RelayServer, Host, RelayClient, Host]]:
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        r, _, server = await stack.enter_async_context(
            _host(network, stack, nursery, relay=RelaySection(serve=True, **relay_overrides))
        )
        assert server is not None
        relay_addr = r.addresses()[0]
        a_transport_host = f"{network.subnet}.2"
        network.block_inbound(a_transport_host)
        a, a_client, _ = await stack.enter_async_context(
            _host(network, stack, nursery, relays=[relay_addr])
        )
        assert a.transport.host == a_transport_host  # type: ignore[attr-defined]
        b, _, _ = await stack.enter_async_context(_host(network, stack, nursery))
        while not a_client.circuit_addrs:
            await a_client.wait_changed()
        yield r, server, a, a_client, b


async def test_a_private_node_is_reached_through_its_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with _relay_and_private_node(network) as (r, server, a, a_client, b):
        circuit = f"{r.advertised_addrs[0]}/p2p/{r.peer_id}/p2p-circuit"
        assert [str(c) for c in a_client.circuit_addrs[r.peer_id]] == [circuit]
        assert f"{circuit}/p2p/{a.peer_id}" in a.addresses()  # advertised (identify, invites)
        with pytest.raises(PeerError):
            await b.connect(a.listen_addrs[0].with_peer_id(a.peer_id))  # the NAT says no
        conn = await b.connect(f"{circuit}/p2p/{a.peer_id}")
        assert conn.relayed
        assert conn.peer_id == a.peer_id  # Noise proved it end to end
        with trio.fail_after(10):
            await conn.identified.wait()
        assert conn.observed_addr is None  # never learned through a relay
        assert await b.ping(a.peer_id) >= 0
        assert a.connections[b.peer_id].relayed
        assert server.circuits_opened == 1
        # A relayed connection ends when the relay connection does.
        await r.connections[a.peer_id].aclose()
        with trio.fail_after(30):
            while b.peer_id in a.connections:
                await a.wait_connection_changed()


async def test_circuits_are_cut_at_the_byte_limit(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    async with _relay_and_private_node(network, circuit_data=64 * 1024) as hosts:
        r, server, a, _, b = hosts
        conn = await b.connect(
            f"{r.advertised_addrs[0]}/p2p/{r.peer_id}/p2p-circuit/p2p/{a.peer_id}"
        )
        with trio.fail_after(60):
            while not conn.closed:  # pings and identify alone use the budget up, eventually
                try:
                    await b.ping(a.peer_id)
                except (PeerError, trio.BrokenResourceError, trio.ClosedResourceError):
                    break
            while b.connections.get(a.peer_id) is conn:
                await b.wait_connection_changed()
        assert conn.closed
        assert server.circuits_cut == 1


async def test_relay_refusals(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    async with _relay_and_private_node(network, max_reservations=1) as hosts:
        r, _, _, _, b = hosts
        conn = await b.connect(r.addresses()[0])
        # B has no reservation: nobody can be connected to it through R.
        nobody = PrivateKey.generate().peer_id()
        with pytest.raises(PeerError, match="NO_RESERVATION"):
            await b.connect(f"{r.addresses()[0]}/p2p-circuit/p2p/{nobody}")
        # The table is full (A holds the only slot).
        client = RelayClient.__new__(RelayClient)  # only its reserve(), on B's connection
        client._host, client._config = b, b.config
        client.circuit_addrs = {}
        client._changed = trio.Event()
        with pytest.raises(PeerError, match="RESERVATION_REFUSED"):
            await client.reserve(conn)
        # Garbage on the hop stream: MALFORMED_MESSAGE, and the connection survives.
        _, stream = await conn.new_stream([wire.HOP_PROTOCOL])
        async with stream:
            await stream.send_all(b"\x03\x08\x09\x00")
            data = await stream.receive_some(100)
        decoded = wire.decode_hop_frame(data)
        assert decoded is not None
        assert decoded[0].status is wire.Status.MALFORMED_MESSAGE
        assert await b.ping(r.peer_id) >= 0


# -- whole nodes: invite, join and converge through a relay -------------------------------------


def _node_config(home: Path, **network: Any) -> NodeConfig:
    def settings(file: FileConfig) -> FileConfig:
        file = cluster_file_config(file)
        settings: dict[str, Any] = {"listen": ["/ip4/0.0.0.0/tcp/4001"], "bootstrap": []}
        net = replace(file.network, **(settings | network))
        return replace(file, network=net)

    config, _ = make_test_config(home, api=False, configure=settings)
    return replace(config, inline_store=True)


async def test_a_private_node_invites_and_a_peer_joins_through_the_relay(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    relay_config = _node_config(tmp_path / "r", relay=RelaySection(serve=True))
    with trio.fail_after(300):
        async with open_node(relay_config, transport=network.transport()) as r:
            a_transport = network.transport()
            network.block_inbound(a_transport.host)
            a_config = _node_config(tmp_path / "a", relays=[r.host.addresses()[0]])
            async with (
                open_node(a_config, transport=a_transport) as a,
                open_node(_node_config(tmp_path / "b"), transport=network.transport()) as b,
            ):
                while not a.relay_client.circuit_addrs:
                    await a.relay_client.wait_changed()
                app = (await a.applications.install(str(APPS / "kv_store"))).application_id
                await b.applications.install(str(APPS / "kv_store"))
                context = (await a.contexts.create(app)).context_id
                await a.contexts.execute(context, "set", json.dumps({"key": "x", "value": "1"}))
                text = await a.joins.invite(context)
                # The invitation alone: A's direct address (unreachable) and its relay address.
                shown = describe_invitation(text)["addresses"]
                assert any("/p2p-circuit" in address for address in shown)
                await b.joins.join(text)
                assert r.relay_server is not None
                assert r.relay_server.circuits_opened == 1  # the join came through R
                await b.contexts.execute(context, "set", json.dumps({"key": "y", "value": "2"}))
                await a.contexts.execute(context, "set", json.dumps({"key": "z", "value": "3"}))
                want = {"x": "1", "y": "2", "z": "3"}
                for node in (a, b):
                    while (await node.contexts.execute(context, "entries", "{}")).result != want:
                        await node.pubsub.wait_heartbeat()
                # B is dialable: the first step of DCUtR (A dials B's own addresses) makes
                # the connection direct, and the relayed one goes.
                while a.hole_puncher.upgraded == 0:
                    await a.hole_puncher.wait_changed()
                assert not b.host.connections[a.host.peer_id].relayed
                sample = a.metrics.registry.get_sample_value(
                    "trionode_dcutr_outcomes_total", {"outcome": "direct_dial"}
                )
                assert sample == 1


async def test_a_private_node_without_relays_learns_one_from_its_peers_and_is_joined_through_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    # The memory network's addresses are private ones: let AutoNAT dial them back.
    relay_config = _node_config(
        tmp_path / "r", relay=RelaySection(serve=True), autonat_allow_private=True
    )
    with trio.fail_after(300):
        async with open_node(relay_config, transport=network.transport()) as r:
            a_transport = network.transport()
            network.set_nat(a_transport, NatKind.NO_INBOUND)
            a_config = _node_config(
                tmp_path / "a", bootstrap=[r.host.addresses()[0]], autonat_confirmations=1
            )
            async with (
                open_node(a_config, transport=a_transport) as a,
                open_node(_node_config(tmp_path / "b"), transport=network.transport()) as b,
            ):
                assert a.autonat is not None
                assert a.config.network.relays == []
                while not a.relay_client.circuit_addrs:
                    await a.relay_client.wait_changed()
                assert a.autonat.is_private()
                assert a.relay_client.learned == {r.host.peer_id}
                assert any("/p2p-circuit" in address for address in a.host.addresses())
                app = (await a.applications.install(str(APPS / "kv_store"))).application_id
                await b.applications.install(str(APPS / "kv_store"))
                context = (await a.contexts.create(app)).context_id
                await a.contexts.execute(context, "set", json.dumps({"key": "x", "value": "1"}))
                text = await a.joins.invite(context)
                assert any("/p2p-circuit" in x for x in describe_invitation(text)["addresses"])
                await b.joins.join(text)
                assert r.relay_server is not None
                assert r.relay_server.circuits_opened >= 1  # the join came through R
                while (await b.contexts.execute(context, "entries", "{}")).result != {"x": "1"}:
                    await b.pubsub.wait_heartbeat()
                # The relay goes away: its circuit addresses are no longer handed out.
                await a.host.connections[r.host.peer_id].aclose()
                while a.relay_client.circuit_addrs:
                    await a.relay_client.wait_changed()
                assert not any("/p2p-circuit" in address for address in a.host.addresses())


async def test_a_public_node_learns_no_relay(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    relay_config = _node_config(
        tmp_path / "r", relay=RelaySection(serve=True), autonat_allow_private=True
    )
    with trio.fail_after(300):
        async with open_node(relay_config, transport=network.transport()) as r:
            a_config = _node_config(
                tmp_path / "a", bootstrap=[r.host.addresses()[0]], autonat_confirmations=1
            )
            async with open_node(a_config, transport=network.transport()) as a:
                assert a.autonat is not None
                while a.autonat.status().status is Reachability.UNKNOWN:
                    await a.autonat.wait_status_changed()
                assert a.autonat.status().status is Reachability.PUBLIC
                await trio.sleep(60)
                assert (a.relay_client.learned, a.relay_client.circuit_addrs) == (set(), {})
