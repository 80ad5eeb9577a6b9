"""DCUtR: the message codec, the sans-IO exchange, and hole punching under NAT models."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st

from trionode.config import DcutrSection, RelaySection
from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.net.dcutr import HolePuncher
from trionode.net.host import Host
from trionode.net.memory import MemoryNetwork, NatKind
from trionode.net.relay import RelayClient
from trionode.node import Node, open_node
from trionode.wire import dcutr as wire
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import Multiaddr

from .test_relay import _host as relay_host, _node_config

APPS = Path(__file__).resolve().parents[2] / "apps"
PEER = PrivateKey.generate().peer_id()
OTHER = PrivateKey.generate().peer_id()
A1 = Multiaddr.from_string("/ip4/192.0.2.1/tcp/4001")
A2 = Multiaddr.from_string("/ip4/192.0.2.2/tcp/4002")

# -- the codec ---------------------------------------------------------------------------------


def test_the_spec_bytes() -> None:
    # CONNECT is type 100 (08 64), SYNC 300 (08 ac 02), each behind a uvarint length.
    assert wire.encode_hole_punch(wire.HolePunch(wire.HolePunchType.SYNC)).hex() == "0308ac02"
    connect = wire.HolePunch(wire.HolePunchType.CONNECT, (A1.to_bytes(),))
    framed = wire.encode_hole_punch(connect) + b"rest"
    assert framed[:3].hex() == f"{len(framed) - 5:02x}0864"
    assert wire.decode_hole_punch_frame(framed) == (connect, len(framed) - 4)
    assert wire.decode_hole_punch_frame(framed[:3]) is None


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (bytes.fromhex("00"), "without a type"),
        (bytes.fromhex("020801"), "unknown hole punch message type 1"),
        (b"\xfe\x7f" + b"\x00" * 10, "too large|exceeds|limit"),
        (
            bytes([2 * (wire.MAX_ADDRS + 1) + 2, 8, 100]) + b"\x12\x00" * (wire.MAX_ADDRS + 1),
            "repeated more than",
        ),
    ],
)
def test_hostile_frames_are_typed_errors(frame: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        wire.decode_hole_punch_frame(frame)


@given(st.binary(max_size=300))
def test_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    with suppress(RemoteProtocolError):
        wire.decode_hole_punch_frame(data)


def test_we_never_send_more_addresses_than_a_peer_accepts() -> None:
    many = wire.HolePunch(wire.HolePunchType.CONNECT, (A1.to_bytes(),) * (wire.MAX_ADDRS + 1))
    with pytest.raises(LocalProtocolError):
        wire.encode_hole_punch(many)
    ours = [Multiaddr.from_tcp("192.0.2.1", port) for port in range(1, 40)]
    exchange = wire.HolePunchInitiator(PEER, ours)
    exchange.start(0.0)
    sent = wire.decode_hole_punch_frame(exchange.data_to_send())
    assert sent is not None
    assert len(sent[0].addrs) == wire.MAX_ADDRS


def test_usable_addresses_drop_relays_strangers_and_junk() -> None:
    raw = [
        A1.to_bytes(),
        A1.with_peer_id(PEER).to_bytes(),  # js appends /p2p/<self>: same address
        A2.with_peer_id(OTHER).to_bytes(),  # names someone else
        Multiaddr.from_string(f"{A2}/p2p/{OTHER}/p2p-circuit").to_bytes(),
        Multiaddr.from_string("/ip4/192.0.2.3/udp/1").to_bytes(),
        b"\xff\xff junk",
    ]
    assert wire.usable_addresses(raw, PEER) == [A1]


# -- the exchange ------------------------------------------------------------------------------


def _frame(kind: wire.HolePunchType, *addrs: Multiaddr) -> bytes:
    return wire.encode_hole_punch(wire.HolePunch(kind, tuple(a.to_bytes() for a in addrs)))


def test_both_sides_of_one_exchange() -> None:
    b = wire.HolePunchInitiator(PEER, [A2])
    a = wire.HolePunchResponder(OTHER, [A1])
    b.start(now=10.0)
    connect = b.data_to_send()
    # Byte by byte: nothing happens before a whole frame.
    for i in range(len(connect) - 1):
        assert a.receive_data(connect[i : i + 1]) is None
    assert a.receive_data(connect[-1:]) is None
    answer = a.data_to_send()
    assert wire.decode_hole_punch_frame(answer) == (
        wire.HolePunch(wire.HolePunchType.CONNECT, (A1.to_bytes(),)),
        len(answer),
    )
    dial_after = b.receive_data(answer, now=10.3)
    assert dial_after is not None
    assert dial_after.addrs == (A1,)
    assert dial_after.delay == pytest.approx(0.15)  # half the measured round trip
    sync = b.data_to_send()
    assert sync == _frame(wire.HolePunchType.SYNC)
    assert a.receive_data(sync) == wire.DialNow((A2,))
    assert a.done
    assert b.done


@pytest.mark.parametrize(
    "frames",
    [
        [_frame(wire.HolePunchType.SYNC)],  # SYNC before CONNECT
        [_frame(wire.HolePunchType.CONNECT, A1), _frame(wire.HolePunchType.CONNECT, A1)],
        [_frame(wire.HolePunchType.CONNECT)],  # no address
        [_frame(wire.HolePunchType.CONNECT, A1) + _frame(wire.HolePunchType.SYNC) + b"\x00"],
    ],
)
def test_the_responder_refuses_out_of_order_or_empty_messages(frames: list[bytes]) -> None:
    a = wire.HolePunchResponder(OTHER, [A1])
    for frame in frames[:-1]:
        a.receive_data(frame)
    with pytest.raises(RemoteProtocolError):
        a.receive_data(frames[-1])


def test_the_initiator_refuses_sync_and_data_after_the_end() -> None:
    b = wire.HolePunchInitiator(PEER, [A2])
    with pytest.raises(LocalProtocolError):
        b.receive_data(b"", now=0.0)
    b.start(now=0.0)
    with pytest.raises(RemoteProtocolError, match="expected CONNECT"):
        b.receive_data(_frame(wire.HolePunchType.SYNC), now=1.0)
    b = wire.HolePunchInitiator(PEER, [A2])
    b.start(now=0.0)
    assert b.receive_data(_frame(wire.HolePunchType.CONNECT, A1), now=1.0) is not None
    with pytest.raises(RemoteProtocolError, match="after the exchange"):
        b.receive_data(b"\x00", now=2.0)


# -- hole punching between Hosts on a memory network with NAT models ---------------------------


@asynccontextmanager
async def _host(
    network: MemoryNetwork, stack: AsyncExitStack, nursery: trio.Nursery, **overrides: Any
) -> AsyncIterator[tuple[Host, RelayClient, HolePuncher]]:
    """The relay tests' host, hole punching too."""
    async with relay_host(network, stack, nursery, **overrides) as (host, client, _):
        puncher = HolePuncher(host, host.config)
        stop = trio.Event()
        stack.callback(stop.set)
        await nursery.start(puncher.run, stop)
        yield host, client, puncher


@asynccontextmanager
async def _two_homes(
    kind: NatKind,
) -> AsyncIterator[tuple[MemoryNetwork, Host, HolePuncher, Host, HolePuncher, str]]:
    """A public relay R; home A (reserved on R) and home B behind NATs of ``kind``; B dialed
    A's relay address, so A received the relayed connection and drives the punch."""
    network = MemoryNetwork()
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        r, _, _ = await stack.enter_async_context(
            _host(network, stack, nursery, relay=RelaySection(serve=True))
        )
        network.set_nat(f"{network.subnet}.2", kind)
        network.set_nat(f"{network.subnet}.3", kind)
        a, a_client, a_puncher = await stack.enter_async_context(
            _host(network, stack, nursery, relays=[r.addresses()[0]])
        )
        b, _, b_puncher = await stack.enter_async_context(_host(network, stack, nursery))
        while not a_client.circuit_addrs:
            await a_client.wait_changed()
        await b.connect(r.addresses()[0])  # B's NAT maps its port as R sees it
        await b.connections[r.peer_id].identified.wait()
        circuit = next(addr for addr in a.addresses() if "p2p-circuit" in addr)
        yield network, a, a_puncher, b, b_puncher, circuit


async def test_endpoint_independent_nats_are_punched_and_the_relay_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(120):
        async with _two_homes(NatKind.ENDPOINT_INDEPENDENT) as (network, a, ap, b, bp, circuit):
            public = network.hosts()[0]  # R's IP: no NAT
            with pytest.raises(trio.TooSlowError):  # no way in without a punch: A's NAT filters
                with trio.fail_after(5):
                    await network.dial(public, a.listen_addrs[0])
            relayed = await b.connect(circuit)
            assert relayed.relayed
            while ap.upgraded == 0:
                await ap.wait_changed()
            direct = b.connections[a.peer_id]
            assert not direct.relayed
            assert not a.connections[b.peer_id].relayed
            # DCUtR's roles: B (dialed through the relay) is the initiator above TCP.
            assert direct.outbound
            assert not a.connections[b.peer_id].outbound
            assert await b.ping(a.peer_id) >= 0
            assert network.connections_between(a.transport.host, b.transport.host) == 1  # type: ignore[attr-defined]
            # The relayed connection closes once the handover grace has passed.
            while not relayed.closed:
                await b.wait_connection_changed()
            assert (ap.failed, bp.failed) == (0, 0)
            # A's plain dial to B (DCUtR's first step) found B's NAT closed: it took the punch.
            assert ap.outcomes == {"hole_punch": 1}


@pytest.mark.parametrize("kind", [NatKind.ENDPOINT_DEPENDENT, NatKind.NO_INBOUND])
async def test_without_a_predictable_mapping_the_relayed_connection_stays(
    kind: NatKind, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(300):
        async with _two_homes(kind) as (network, a, ap, b, _bp, circuit):
            relayed = await b.connect(circuit)
            while ap.failed == 0:
                await ap.wait_changed()
            assert ap.upgraded == 0
            assert ap.outcomes == {"relayed": 1}
            assert b.connections[a.peer_id] is relayed
            assert not relayed.closed
            assert await b.ping(a.peer_id) >= 0  # still works, through R
            assert network.connections_between(a.transport.host, b.transport.host) == 0  # type: ignore[attr-defined]


async def test_dcutr_off_keeps_relayed_connections(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        off = DcutrSection(enabled=False)
        r, _, _ = await stack.enter_async_context(
            _host(network, stack, nursery, relay=RelaySection(serve=True))
        )
        network.set_nat(f"{network.subnet}.2", NatKind.ENDPOINT_INDEPENDENT)
        a, a_client, ap = await stack.enter_async_context(
            _host(network, stack, nursery, relays=[r.addresses()[0]], dcutr=off)
        )
        b, _, _ = await stack.enter_async_context(_host(network, stack, nursery, dcutr=off))
        while not a_client.circuit_addrs:
            await a_client.wait_changed()
        circuit = next(addr for addr in a.addresses() if "p2p-circuit" in addr)
        relayed = await b.connect(circuit)
        await relayed.identified.wait()
        await trio.sleep(60)
        assert b.connections[a.peer_id] is relayed
        assert (ap.upgraded, ap.failed) == (0, 0)


# -- whole nodes behind NAT models: invite, join through the relay, converge, punch ------------


async def _converge(nodes: Sequence[Node], context: bytes, want: dict[str, str]) -> None:
    for node in nodes:
        while (await node.contexts.execute(context, "entries", "{}")).result != want:
            await node.pubsub.wait_heartbeat()


@pytest.mark.parametrize("kind", list(NatKind))
async def test_two_homes_join_through_the_relay_and_converge_then_punch_where_the_nat_allows(
    kind: NatKind, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    network = MemoryNetwork()
    relay_config = _node_config(tmp_path / "r", relay=RelaySection(serve=True))
    with trio.fail_after(600):
        async with open_node(relay_config, transport=network.transport()) as r:
            a_transport, b_transport = network.transport(), network.transport()
            network.set_nat(a_transport, kind)
            network.set_nat(b_transport, kind)
            relay = r.host.addresses()[0]
            async with (
                open_node(_node_config(tmp_path / "a", relays=[relay]), transport=a_transport) as a,
                open_node(_node_config(tmp_path / "b"), transport=b_transport) as b,
            ):
                while not a.relay_client.circuit_addrs:
                    await a.relay_client.wait_changed()
                app = (await a.applications.install(str(APPS / "kv_store"))).application_id
                await b.applications.install(str(APPS / "kv_store"))
                context = (await a.contexts.create(app)).context_id
                await a.contexts.execute(context, "set", json.dumps({"key": "x", "value": "1"}))
                await b.joins.join(await a.joins.invite(context))
                await b.contexts.execute(context, "set", json.dumps({"key": "y", "value": "2"}))
                await _converge((a, b), context, {"x": "1", "y": "2"})
                # A received the relayed connection: A drives the hole punch.
                puncher = a.hole_puncher
                while puncher.upgraded + puncher.failed == 0:
                    await puncher.wait_changed()
                conn = b.host.connections[a.host.peer_id]
                outcomes = {
                    sample.labels["outcome"]: sample.value
                    for metric in a.metrics.registry.collect()
                    for sample in metric.samples
                    if sample.name == "trionode_dcutr_outcomes_total"
                }
                if kind is NatKind.ENDPOINT_INDEPENDENT:
                    # B's join first tried A's direct address, which left a mapping in B's
                    # NAT toward A: A's plain dial (DCUtR's first step) may already get in.
                    assert sum(outcomes.get(o, 0) for o in ("direct_dial", "hole_punch")) == 1
                else:
                    assert outcomes == {"relayed": 1}
                if kind is NatKind.ENDPOINT_INDEPENDENT:
                    assert (puncher.upgraded, puncher.failed) == (1, 0)
                    assert not conn.relayed
                else:
                    assert (puncher.upgraded, puncher.failed) == (0, 1)
                    assert conn.relayed
                # Either way the two keep converging (over the direct or the relayed one).
                await a.contexts.execute(context, "set", json.dumps({"key": "z", "value": "3"}))
                await _converge((a, b), context, {"x": "1", "y": "2", "z": "3"})
                assert b.host.connections[a.host.peer_id] is conn


async def test_a_hostile_hole_punch_costs_its_stream_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(120):
        async with _two_homes(NatKind.NO_INBOUND) as (_network, a, ap, b, _bp, circuit):
            relayed = await b.connect(circuit)
            # B opens /libp2p/dcutr itself (A drives on this connection) and sends a frame
            # over the size limit: A refuses it, counts a protocol error, keeps the connection.
            _, stream = await relayed.new_stream([wire.PROTOCOL])
            await stream.send_all(b"\xff\x7f" + b"\x00" * 64)
            assert await stream.receive_some(100) == b""
            assert await b.ping(a.peer_id) >= 0
            assert _stream_errors(a) == 1  # counted once
            # A CONNECT whose addresses are all useless (relay ones) gets no answer either.
            _, stream = await relayed.new_stream([wire.PROTOCOL])
            useless = Multiaddr.from_string(f"{circuit}")
            await stream.send_all(_frame(wire.HolePunchType.CONNECT, useless))
            assert await stream.receive_some(100) == b""
            # Over a direct connection there is nothing to punch: the stream is closed unread.
            r = next(conn for conn in b.connections.values() if not conn.relayed)
            _, stream = await r.new_stream([wire.PROTOCOL])
            await stream.send_all(_frame(wire.HolePunchType.CONNECT, A1))
            assert await stream.receive_some(100) == b""
            while ap.outcomes["relayed"] == 0:
                await ap.wait_changed()
            assert not relayed.closed


def _stream_errors(host: Host) -> float:
    return sum(
        sample.value
        for metric in host.metrics.protocol_errors.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels == {"layer": "stream"}
    )
