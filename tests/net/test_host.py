"""The Host over real loopback sockets: connect, identify, ping, streams, one connection per
peer, bootstrap redial, limits and shutdown; then the same through a node's API and CLI.

Every test binds port 0 on 127.0.0.1, runs on the real clock and is bounded by fail_after;
nothing sleeps to wait for readiness (waits are on events: `nursery.start`,
`conn.identified`, `host.wait_connection_changed()`).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
import trio

from trionode import schemas
from trionode.cli import main
from trionode.client import ApiError
from trionode.errors import PeerError, ProtocolError, RemoteProtocolError
from trionode.net.host import AGENT_VERSION, Connection, Host
from trionode.testing import open_test_node
from trionode.wire.identify import IDENTIFY_PROTOCOL_ID, PING_PROTOCOL_ID
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multiaddr import Multiaddr

from .host_helpers import RunningHost, endpoints, open_host, wait_connected, wait_for

pytestmark = pytest.mark.real_network

ECHO = "/trionode-test/echo/1.0.0"


async def _echo(stream: trio.abc.HalfCloseableStream, _conn: Connection) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


async def test_connect_identify_ping_and_peers() -> None:
    with trio.fail_after(10):
        async with open_host() as a, open_host() as b:
            conn = await a.host.connect(b.address)
            assert conn.peer_id == b.host.peer_id
            assert conn.outbound
            a_conn, b_conn = await wait_connected(a, b)
            assert a_conn is conn
            assert not b_conn.outbound
            # Identify runs both ways: agent, protocols and listen addresses.
            await a_conn.identified.wait()
            await b_conn.identified.wait()
            for mine, other in ((a_conn, b), (b_conn, a)):
                assert mine.agent == AGENT_VERSION
                assert {PING_PROTOCOL_ID, IDENTIFY_PROTOCOL_ID} <= set(mine.protocols)
                assert list(mine.listen_addrs) == other.host.listen_addrs
            # Ping answers with a round-trip time, which peers() then reports.
            rtt = await a.host.ping(b.host.peer_id)
            assert rtt > 0  # a measured round trip (its size is for the bench, not a test)
            (row,) = a.host.peers()
            assert row.peer_id == str(b.host.peer_id)
            assert row.direction == "outbound"
            assert row.agent == AGENT_VERSION
            assert row.ping_rtt_ms is not None
            assert row.ping_rtt_ms > 0
            assert row.address is not None
            assert Multiaddr.from_string(row.address).peer_id() == b.host.peer_id
            (back,) = b.host.peers()
            assert back.peer_id == str(a.host.peer_id)
            assert back.direction == "inbound"
            # Connecting again reuses the connection.
            assert await a.host.connect(b.address) is conn
            assert a.open_connections() == b.open_connections() == 1
            assert a.sample("trionode_p2p_dials_total", outcome="ok") == 1


async def test_custom_protocol_echoes_over_eight_concurrent_streams() -> None:
    with trio.fail_after(15):
        async with open_host() as a, open_host() as b:
            b.host.set_handler(ECHO, _echo)
            await a.host.connect(b.address)
            results: dict[int, bytes] = {}

            async def roundtrip(i: int) -> None:
                # More than one 256 KiB window, so flow control is exercised on each stream.
                payload = bytes([i]) * (300_000 + i)
                protocol, stream = await a.host.new_stream(b.host.peer_id, [ECHO])
                assert protocol == ECHO
                received = bytearray()

                async def reader() -> None:
                    while chunk := await stream.receive_some(65536):
                        received.extend(chunk)

                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    await stream.send_all(payload)
                    await stream.send_eof()
                results[i] = bytes(received)

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(roundtrip, i)
            assert results == {i: bytes([i]) * (300_000 + i) for i in range(8)}
            # An unknown protocol is refused without harming the connection.
            with pytest.raises(PeerError, match="supports none"):
                await a.host.new_stream(b.host.peer_id, ["/nobody/1.0.0"])
            assert await a.host.ping(b.host.peer_id) > 0


async def test_dialling_the_wrong_peer_id_fails_clearly_and_is_counted() -> None:
    with trio.fail_after(10):
        async with open_host() as a, open_host() as b:
            impostor = PrivateKey.generate().peer_id()
            wrong = b.host.listen_addrs[0].with_peer_id(impostor)
            with pytest.raises(RemoteProtocolError, match=f"dialled {impostor}"):
                await a.host.connect(wrong)
            assert (
                a.sample("trionode_p2p_handshake_failures_total", reason="dialled_wrong_peer") == 1
            )
            assert a.host.connections == {}
            assert a.sample("trionode_p2p_dials_total", outcome="ok") == 0
            # The right id still works afterwards.
            conn = await a.host.connect(b.address)
            assert conn.peer_id == b.host.peer_id


async def test_simultaneous_dial_ends_with_one_shared_connection() -> None:
    with trio.fail_after(10):
        async with open_host() as a, open_host() as b:
            returned: dict[str, Connection] = {}

            async def dial(name: str, src: RunningHost, dst: RunningHost) -> None:
                returned[name] = await src.host.connect(dst.address)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(dial, "a", a, b)
                nursery.start_soon(dial, "b", b, a)
            assert returned["a"].peer_id == b.host.peer_id
            assert returned["b"].peer_id == a.host.peer_id

            def settled() -> bool:
                a_conn = a.host.connections.get(b.host.peer_id)
                b_conn = b.host.connections.get(a.host.peer_id)
                return (
                    a_conn is not None
                    and b_conn is not None
                    and a.open_connections() == 1
                    and b.open_connections() == 1
                    and endpoints(a_conn) == endpoints(b_conn)[::-1]
                )

            await wait_for(settled, a, b)
            a_conn, b_conn = await wait_connected(a, b)
            # Both kept the connection the smaller peer id initiated.
            smaller = min(a.host.peer_id, b.host.peer_id, key=lambda p: bytes(p.multihash))
            assert a_conn.initiator(a.host.peer_id) == smaller
            assert b_conn.initiator(b.host.peer_id) == smaller
            assert a_conn.outbound != b_conn.outbound
            # And the survivor works.
            assert await a.host.ping(b.host.peer_id) > 0
            assert await b.host.ping(a.host.peer_id) > 0
            assert not a_conn.closed
            assert not b_conn.closed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_bootstrap_peer_down_at_first_is_connected_once_it_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = PrivateKey.generate()
    port = _free_port()
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    bootstrap = f"{listen}/p2p/{key.peer_id()}"
    failed = trio.Event()
    original = Host.connect

    async def observed_connect(self: Host, address: str | Multiaddr) -> Connection:
        try:
            return await original(self, address)
        except PeerError:
            failed.set()
            raise

    monkeypatch.setattr(Host, "connect", observed_connect)
    with trio.fail_after(15):
        async with open_host(
            bootstrap=[bootstrap], redial_initial_backoff=0.05, redial_max_backoff=0.2
        ) as b:
            await failed.wait()  # the bootstrap peer is down: dials fail and are retried
            assert b.host.connections == {}
            assert b.sample("trionode_p2p_dials_total", outcome="unreachable") >= 1

            async with open_host(key, listen=[listen]) as a:
                _, a_conn = await wait_connected(b, a)
                assert not a_conn.outbound  # b dialled a
            # a went away; b notices ...
            await wait_for(lambda: a.host.peer_id not in b.host.connections, b)
            # ... and re-dials it when it is back on the same address.
            async with open_host(key, listen=[listen]) as a:
                b_conn, _ = await wait_connected(b, a)
                assert b_conn.outbound
                assert await b.host.ping(a.host.peer_id) > 0


async def test_connection_limit_refuses_extra_inbound() -> None:
    with trio.fail_after(10):
        async with (
            open_host(max_connections=1) as a,
            open_host() as b,
            open_host() as c,
        ):
            await b.host.connect(a.address)
            await wait_connected(a, b)
            with pytest.raises((PeerError, ProtocolError)):
                await c.host.connect(a.address)
            assert a.sample("trionode_p2p_handshake_failures_total", reason="connection_limit") == 1
            assert list(a.host.connections) == [b.host.peer_id]
            assert c.host.connections == {}
            # Outbound is bounded by the same limit.
            with pytest.raises(PeerError, match="connection limit"):
                await a.host.connect(c.address)
            # The existing connection is untouched.
            assert await b.host.ping(a.host.peer_id) > 0
            assert await a.host.ping(b.host.peer_id) > 0


async def test_shutdown_closes_connections_and_peers_see_it() -> None:
    with trio.fail_after(10):
        async with open_host() as a, open_host() as b, open_host() as c:
            await b.host.connect(a.address)
            await c.host.connect(a.address)
            b_conn, _ = await wait_connected(b, a)
            c_conn, _ = await wait_connected(c, a)
            a.shutdown.set()
            await a.done.wait()
            await wait_for(lambda: a.host.peer_id not in b.host.connections, b)
            await wait_for(lambda: a.host.peer_id not in c.host.connections, c)
            for conn in (b_conn, c_conn):
                await conn.session.wait_closed()
                assert conn.closed
                assert conn.session.close_reason is not None
                assert "GoAway(0)" in conn.session.close_reason
            assert b.open_connections() == c.open_connections() == 0
            assert a.open_connections() == 0
            # The others still talk to each other.
            await b.host.connect(c.address)
            assert await b.host.ping(c.host.peer_id) > 0


# -- through the node: admin API and CLI ----------------------------------------------------------


async def test_node_api_connects_and_lists_peers(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_test_node(tmp_path / "a") as a,
            open_test_node(tmp_path / "b") as b,
        ):
            (b_addr,) = b.node.listen_addresses()
            async with a.client() as client:
                result = await client.connect(b_addr)
                assert result == schemas.Connected(peer_id=b.node.peer_id)
                listing = await client.peers()
            assert listing.listen_addrs == a.node.listen_addresses()
            (row,) = listing.peers
            assert row["peer_id"] == b.node.peer_id
            assert row["direction"] == "outbound"
            assert set(row) >= {"address", "agent", "streams", "ping_rtt_ms"}
            # b lists a too (once its side has registered the connection).
            a_id = PeerId.from_string(a.node.peer_id)
            while a_id not in b.node.host.connections:
                await b.node.host.wait_connection_changed()
            async with b.client() as client:
                (back,) = (await client.peers()).peers
            assert back["peer_id"] == a.node.peer_id
            assert back["direction"] == "inbound"

            # A bad multiaddr is a 400 with a JSON error body.
            async with httpx.AsyncClient(
                base_url=a.api_url, headers={"Authorization": f"Bearer {a.token}"}
            ) as http:
                response = await http.post("/admin-api/peers", json={"address": "/ip4/nope"})
                assert response.status_code == 400
                error = response.json()["error"]
                assert error["code"] == 400
                assert "not a multiaddr" in error["message"]
                response = await http.post("/admin-api/peers", json={})
                assert response.status_code == 400
            async with a.client() as client:
                with pytest.raises(ApiError) as info:
                    await client.connect("/dns4/example.com")
                assert info.value.status == 400


async def test_cli_peers_and_connect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*argv: str) -> int:
        return main(list(argv))

    with trio.fail_after(30):
        async with (
            open_test_node(tmp_path / "a") as a,
            open_test_node(tmp_path / "b") as b,
        ):
            target = ["--api", a.api_url, f"--token={a.token}"]
            (b_addr,) = b.node.listen_addresses()
            assert await trio.to_thread.run_sync(cli, "connect", b_addr, "--json", *target) == 0
            assert json.loads(capsys.readouterr().out) == {"peerId": b.node.peer_id}
            assert await trio.to_thread.run_sync(cli, "peers", "--json", *target) == 0
            listing = json.loads(capsys.readouterr().out)
            assert [p["peer_id"] for p in listing["peers"]] == [b.node.peer_id]
            assert await trio.to_thread.run_sync(cli, "peers", *target) == 0
            table = capsys.readouterr().out
            assert b.node.peer_id in table
            assert "outbound" in table
            # A bad address: exit 1 and a one-line reason.
            assert await trio.to_thread.run_sync(cli, "connect", "/ip4/nope", *target) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1
            assert err[0].startswith("trionode: 400:")


async def test_a_failing_handler_costs_one_stream_not_the_node() -> None:
    async def broken(stream: trio.abc.HalfCloseableStream, _conn: Connection) -> None:
        await stream.receive_some()
        raise KeyError("a bug in a handler")

    with trio.fail_after(15):
        async with open_host() as a, open_host() as b:
            b.host.set_handler("/broken/1.0.0", broken)
            await a.host.connect(b.address)
            _, stream = await a.host.new_stream(b.host.peer_id, ["/broken/1.0.0"])
            await stream.send_all(b"boom")
            assert await stream.receive_some() == b""  # the handler's stream was closed
            assert (
                b.registry.get_sample_value(
                    "trionode_p2p_handler_errors_total", {"protocol": "/broken/1.0.0"}
                )
                == 1.0
            )
            assert await a.host.ping(b.host.peer_id) > 0  # the connection and node live on
