"""AutoNAT v1: the codec against hostile bytes, the server's rules, and verdicts on a memory
network whose "no inbound" NAT model makes a host unreachable from outside."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st
from prometheus_client import CollectorRegistry

from trionode.errors import RemoteProtocolError
from trionode.net.autonat import AutoNat, AutoNatMetrics, Reachability
from trionode.net.host import Host
from trionode.net.memory import MemoryNetwork
from trionode.net.metrics import NetMetrics
from trionode.wire import autonat as wire
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import Multiaddr

from .host_helpers import network as network_section

# -- the codec ---------------------------------------------------------------------------------


def test_request_and_response_round_trip() -> None:
    addr = Multiaddr.from_string("/ip4/203.0.113.5/tcp/2428").to_bytes()
    request = wire.DialRequest(peer_id=PrivateKey.generate().peer_id().multihash, addrs=(addr,))
    framed = wire.encode_request(request)
    assert wire.decode_request_frame(framed[:-1]) is None  # incomplete
    assert wire.decode_request_frame(framed) == request
    assert framed[1:3] == b"\x08\x00"  # type=DIAL written although it is 0
    for response in (
        wire.DialResponse(wire.Status.OK, addr=addr),
        wire.DialResponse(wire.Status.E_DIAL_ERROR, text="no"),
    ):
        assert wire.decode_response_frame(wire.encode_response(response)) == response


@pytest.mark.parametrize(
    ("hex_body", "message"),
    [
        ("0801", "not a DIAL"),  # a response where a request belongs
        ("0800", "lacks dial"),
        ("08001200", "lacks dial.peer"),
        ("080012020a00", "lacks dial.peer.id"),
    ],
)
def test_bad_requests_are_remote_protocol_errors(hex_body: str, message: str) -> None:
    body = bytes.fromhex(hex_body)
    with pytest.raises(RemoteProtocolError, match=message):
        wire.decode_request_frame(bytes([len(body)]) + body)


def test_unknown_status_and_oversized_frames_are_refused() -> None:
    inner = bytes.fromhex("0807")  # status 7
    body = bytes.fromhex("0801") + b"\x1a" + bytes([len(inner)]) + inner
    with pytest.raises(RemoteProtocolError, match="unknown AutoNAT status"):
        wire.decode_response_frame(bytes([len(body)]) + body)
    with pytest.raises(RemoteProtocolError):
        wire.decode_request_frame(b"\xff\xff\x01")  # declares 32 KiB: refused before it arrives


@given(st.binary(max_size=200))
def test_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    for decode in (wire.decode_request_frame, wire.decode_response_frame):
        with suppress(RemoteProtocolError):
            decode(data)


# -- hosts on a memory network ----------------------------------------------------------------


@asynccontextmanager
async def _hosts(
    network: MemoryNetwork, n: int, **overrides: Any
) -> AsyncIterator[list[tuple[Host, AutoNat]]]:
    settings: dict[str, Any] = {
        "listen": ["/ip4/0.0.0.0/tcp/4001"],
        "autonat_allow_private": True,  # the memory network's addresses are 10.42.0.x
        "autonat_confirmations": 3,
    }
    settings.update(overrides)
    out: list[tuple[Host, AutoNat]] = []
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
            autonat = AutoNat(host, host.config, AutoNatMetrics(registry))
            await nursery.start(host.run, stop)
            out.append((host, autonat))
        yield out


async def _connect_identified(client: Host, servers: list[Host]) -> None:
    for server in servers:
        # The listen address, not the advertised one (some tests announce a stale one).
        conn = await client.connect(server.listen_addrs[0].with_peer_id(server.peer_id))
        await conn.identified.wait()


async def test_a_reachable_host_is_public_after_three_dial_backs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with _hosts(network, 4) as hosts:
        (client, autonat), *servers = hosts
        await _connect_identified(client, [h for h, _ in servers])
        assert autonat.status().status is Reachability.UNKNOWN
        assert await autonat.check_once() == 3
        status = autonat.status()
        assert status.status is Reachability.PUBLIC
        assert status.ok_peers == 3
        assert status.confirmed == (str(client.advertised_addrs[0]),)
        # The dial-backs were fresh connections under throwaway identities, closed at once:
        # the client still has exactly its three connections.
        assert set(client.connections) == {h.peer_id for h, _ in servers}
        served = sum(s.status().ok_peers for _, s in servers)
        assert served == 0  # servers do not judge themselves from serving


async def test_a_host_behind_a_no_inbound_nat_is_private(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with _hosts(network, 4) as hosts:
        (client, autonat), *servers = hosts
        network.block_inbound(client.transport.host)  # type: ignore[attr-defined]
        await _connect_identified(client, [h for h, _ in servers])  # outbound still works
        assert await autonat.check_once() == 3
        status = autonat.status()
        assert status.status is Reachability.PRIVATE
        assert status.failed_peers == 3
        assert status.confirmed == ()
        # The port opens (a forward): the next round flips the verdict to public.
        network.block_inbound(client.transport.host, blocked=False)  # type: ignore[attr-defined]
        await autonat.check_once()
        assert autonat.status().status is Reachability.PUBLIC


async def test_an_unannounced_working_address_is_confirmed_and_then_advertised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with _hosts(
        network, 4, announce=["/dns/stale.example.org/tcp/9"], announce_replace=True
    ) as hosts:
        (client, autonat), *servers = hosts
        assert [str(a) for a in client.advertised_addrs] == ["/dns/stale.example.org/tcp/9"]
        await _connect_identified(client, [h for h, _ in servers])
        await autonat.check_once()
        # Peers saw us at 10.42.0.1; with our listen port that is dialable: confirmed.
        real = f"/ip4/{client.transport.host}/tcp/4001"  # type: ignore[attr-defined]
        assert autonat.status().confirmed == (real,)
        assert real in [str(a) for a in client.advertised_addrs]


async def _raw_request(client: Host, server: Host, request: wire.DialRequest) -> wire.DialResponse:
    conn = await client.connect(server.addresses()[0])
    _, stream = await conn.new_stream([wire.PROTOCOL_ID])
    async with stream:
        await stream.send_all(wire.encode_request(request))
        data = bytearray()
        while (response := wire.decode_response_frame(data)) is None:
            data += await stream.receive_some(1024)
        return response


async def test_server_rules(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    async with _hosts(network, 2, autonat_allow_private=False) as hosts:
        (client, _), (server, server_nat) = hosts
        me = client.peer_id.multihash
        own = client.advertised_addrs[0].to_bytes()
        elsewhere = Multiaddr.from_string("/ip4/10.42.0.99/tcp/4001").to_bytes()
        someone = PrivateKey.generate().peer_id().multihash
        cases = [
            (wire.DialRequest(someone, (own,)), wire.Status.E_BAD_REQUEST),
            # Another IP than the one the request came from: we dial nobody else for you.
            (wire.DialRequest(me, (elsewhere,)), wire.Status.E_DIAL_REFUSED),
            # A private address with autonat_allow_private off.
            (wire.DialRequest(me, (own,)), wire.Status.E_DIAL_REFUSED),
            (wire.DialRequest(me, (b"\xff\xff",)), wire.Status.E_DIAL_REFUSED),
        ]
        for request, expected in cases:
            assert (await _raw_request(client, server, request)).status is expected
        registry = server_nat._metrics.served
        assert registry.labels("refused")._value.get() == 3
        assert registry.labels("bad_request")._value.get() == 1


async def test_rounds_that_every_server_refuses_come_less_and_less_often(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Private addresses and servers that do not dial them: every answer is a refusal, which
    says nothing about us, so the client backs off (30, 60, 120, 240, then 300 s) instead
    of asking every server again every 30 s for ever (in a 100-node simulation, 25 refused
    streams a second)."""
    network = MemoryNetwork()
    async with _hosts(network, 2, autonat_allow_private=False) as hosts:
        (client, autonat), (server, server_nat) = hosts
        await _connect_identified(client, [server])
        refused = server_nat._metrics.served.labels("refused")
        asked_at: list[float] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(autonat.run)
            while trio.current_time() < 1000:
                seen = refused._value.get()
                await trio.sleep(1)
                if refused._value.get() > seen:
                    asked_at.append(trio.current_time())
            nursery.cancel_scope.cancel()
        gaps = [round(b - a) for a, b in itertools.pairwise(asked_at)]
        assert gaps[:4] == [30, 60, 120, 240]
        assert set(gaps[4:]) == {300}
        assert autonat.status().status is Reachability.UNKNOWN


async def test_a_garbage_request_costs_the_stream_not_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with _hosts(network, 2) as hosts:
        (client, _), (server, _) = hosts
        conn = await client.connect(server.addresses()[0])
        _, stream = await conn.new_stream([wire.PROTOCOL_ID])
        async with stream:
            await stream.send_all(b"\x05\x08\x01\x12\x00\x00")  # a response, not a request
            assert await stream.receive_some(100) == b""
        assert not conn.closed
        assert await client.ping(server.peer_id) >= 0
