"""trionode's transport against py-libp2p 0.8.1 (PyPI `libp2p`), in both roles.

Everything py-libp2p does on the wire that matters here is written down in
`libp2p_peer.py`'s docstring. Each test runs on loopback with the real clock.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from prometheus_client import CollectorRegistry

from trionode.config import NetworkSection
from trionode.net.host import Connection, Host
from trionode.net.metrics import NetMetrics
from trionode.wire.keys import PeerId, PrivateKey

from .libp2p_peer import ECHO_PROTOCOL, open_libp2p_peer

pytestmark = [pytest.mark.interop, pytest.mark.real_network]

TEST_TIMEOUT = 120
BIG = 64 * 1024 * 1024


async def _echo_handler(stream: trio.abc.Stream, _conn: Connection) -> None:
    while data := await stream.receive_some(256 * 1024):
        await stream.send_all(data)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


@asynccontextmanager
async def open_host() -> AsyncIterator[Host]:
    host = Host(
        PrivateKey.generate(),
        NetworkSection(listen=["/ip4/127.0.0.1/tcp/0"], ping_interval=3600),
        NetMetrics(CollectorRegistry()),
    )
    host.set_handler(str(ECHO_PROTOCOL), _echo_handler)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, stop)
        yield host
        stop.set()


async def _echo_through(host: Host, peer: PeerId, data: bytes) -> bytes:
    _, stream = await host.new_stream(peer, [str(ECHO_PROTOCOL)])
    received = bytearray()

    async def reader() -> None:
        while chunk := await stream.receive_some():
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        view = memoryview(data)
        for start in range(0, len(data), 1 << 20):
            await stream.send_all(view[start : start + (1 << 20)])
        await stream.send_eof()
    await stream.aclose()
    return bytes(received)


async def test_trionode_dials_py_libp2p() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_libp2p_peer() as py, open_host() as host:
            conn = await host.connect(py.p2p_addr)
            assert str(conn.peer_id) == py.peer_id
            # identify: ours of them ...
            await conn.identified.wait()
            assert conn.agent is not None
            assert conn.agent.startswith("py-libp2p/")
            assert str(ECHO_PROTOCOL) in conn.protocols
            # ... and theirs of us.
            info = await py.identify(str(host.peer_id))
            assert info.agent_version.startswith("trionode/")
            assert info.peer_id == str(host.peer_id)
            assert "/ipfs/ping/1.0.0" in info.protocols
            # ping
            rtt = await host.ping(conn.peer_id)
            assert rtt > 0  # how fast is for the benchmark, not a test
            # echo over 8 concurrent streams
            payloads = [os.urandom(100_000 + i) for i in range(8)]
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = await _echo_through(host, conn.peer_id, payloads[i])

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            assert [results[i] for i in range(8)] == payloads
            # 64 MiB through one stream, both directions at once (flow control both ways)
            big = os.urandom(BIG)
            assert await _echo_through(host, conn.peer_id, big) == big
            assert py.echo_streams_failed == 0


async def test_py_libp2p_dials_trionode() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_host() as host, open_libp2p_peer() as py:
            our_addr = host.addresses()[0]
            assert await py.connect(our_addr) == str(host.peer_id)
            info = await py.identify(str(host.peer_id))
            assert info.agent_version.startswith("trionode/")
            assert str(ECHO_PROTOCOL) in info.protocols
            rtts = await py.ping(str(host.peer_id), count=3)
            assert len(rtts) == 3
            # Our side learns who they are too.
            conn = host.connections[PeerId.from_string(py.peer_id)]
            assert not conn.outbound
            await conn.identified.wait()
            assert conn.agent is not None
            assert conn.agent.startswith("py-libp2p/")
            payloads = [os.urandom(100_000 + i) for i in range(8)]
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = await py.echo(str(host.peer_id), payloads[i])

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            assert [results[i] for i in range(8)] == payloads
            big = os.urandom(BIG)
            assert await py.echo(str(host.peer_id), big) == big
