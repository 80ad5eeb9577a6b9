"""Self-check of the py-libp2p fixture: two py-libp2p hosts from ``libp2p_peer`` talk to each other.

These prove the helper works (listen address, dial, echo, ping, identify, shutdown) so that a
failure of the same helper against trionode points at trionode. Everything runs on loopback
with the real clock, in one trio run per test.
"""

from __future__ import annotations

import os

import pytest
import trio
from libp2p.host.exceptions import StreamFailure
from libp2p.network.exceptions import SwarmException

from .libp2p_peer import (
    AGENT_VERSION_PREFIX,
    ECHO_PROTOCOL,
    IDENTIFY_PROTOCOL,
    PING_PROTOCOL,
    Libp2pPeer,
    open_libp2p_peer,
    serve_libp2p_peer,
)

pytestmark = [pytest.mark.interop, pytest.mark.real_network]

# Generous: a stuck test must fail, not hang CI. Typical run time is ~1 s per test.
TEST_TIMEOUT = 60


async def _connected_pair_roundtrips(dialer: Libp2pPeer, listener: Libp2pPeer) -> None:
    """Echo on 8 concurrent streams in both directions of one connection.

    The payloads stay small (about 32 KiB each way in all) on purpose. py-libp2p 0.8's yamux
    read loop writes frames itself (a new stream's ACK, a ping's answer) under the
    connection's write lock; when both hosts' writers block on full TCP buffers, neither
    read loop gets that lock, neither reads, and the two py-libp2p hosts deadlock (seen here
    under load with 64 KiB payloads). That is a py-libp2p limit, not the helper's: large
    transfers are checked one stream at a time by ``test_one_mib_echo``, and trionode's own
    yamux, whose reader never waits for a write, is checked against py-libp2p with large
    concurrent payloads in ``test_trionode_interop``.
    """
    payloads = [os.urandom(2 * 1024 + i) for i in range(8)]
    results: dict[tuple[str, int], bytes] = {}

    async def one(src: Libp2pPeer, dst: Libp2pPeer, i: int) -> None:
        results[src.peer_id, i] = await src.echo(dst.peer_id, payloads[i])

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, dialer, listener, i)
            nursery.start_soon(one, listener, dialer, i)  # listener-opened (even-id) streams
    for (_src, i), got in results.items():
        assert got == payloads[i]
    assert len(results) == 16
    # Each side's count of served streams may lag the echo its remote already received.
    for side in (listener, dialer):
        await side.wait_echo_streams(8)
        assert (side.echo_streams_served, side.echo_streams_failed) == (8, 0)


async def test_listen_addr_is_real_and_dialable() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_libp2p_peer(key_seed=b"\x01" * 32) as a, open_libp2p_peer() as b:
            assert a.listen_addr.startswith("/ip4/127.0.0.1/tcp/")
            assert a.listen_port > 0
            assert a.p2p_addr == f"{a.listen_addr}/p2p/{a.peer_id}"
            # A fixed seed gives a fixed Ed25519 PeerId ("12D3KooW...").
            assert a.peer_id.startswith("12D3KooW")
            async with open_libp2p_peer(key_seed=b"\x01" * 32) as a_again:
                assert a_again.peer_id == a.peer_id
                assert a_again.listen_port != a.listen_port

            assert await b.connect(a.p2p_addr) == a.peer_id
            assert a.peer_id in b.connected_peers()
            # Connecting again reuses the connection.
            assert await b.connect(a.listen_addr, a.peer_id) == a.peer_id


async def test_echo_ping_identify_between_two_libp2p_hosts() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_libp2p_peer() as a, open_libp2p_peer() as b:
            await b.connect(a.listen_addr, a.peer_id)

            await _connected_pair_roundtrips(b, a)

            rtts = await b.ping(a.peer_id, count=5)
            assert len(rtts) == 5
            assert all(rtt > 0 for rtt in rtts)  # how fast is for the benchmark, not a test
            assert (await a.ping(b.peer_id))[0] > 0  # ping from the listener side too

            info = await b.identify(a.peer_id)
            assert info.agent_version.startswith(AGENT_VERSION_PREFIX)
            assert info.protocol_version == "ipfs/0.1.0"
            assert info.peer_id == a.peer_id
            assert info.public_key == a.public_key
            assert {ECHO_PROTOCOL, PING_PROTOCOL, IDENTIFY_PROTOCOL} <= set(info.protocols)
            assert a.listen_addr in info.listen_addrs
            assert info.observed_addr is not None
            assert info.observed_addr.startswith("/ip4/127.0.0.1/tcp/")
            assert info.has_signed_peer_record


async def test_one_mib_echo() -> None:
    data = os.urandom(1024 * 1024)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_libp2p_peer() as a, open_libp2p_peer() as b:
            await a.connect(b.p2p_addr)
            assert await a.echo(b.peer_id, data) == data


async def test_stream_helpers_and_unknown_protocol(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        a: Libp2pPeer = await nursery.start(serve_libp2p_peer)
        async with open_libp2p_peer() as b:
            await b.connect(a.p2p_addr)

            stream = await b.open_echo_stream(a.peer_id)
            assert stream.protocol == ECHO_PROTOCOL
            for _ in range(3):  # request/response on one stream, as the RTT benchmark does
                await stream.send_all(b"x" * 32)
                assert await stream.receive_exactly(32) == b"x" * 32
            await stream.close_write()
            assert await stream.receive_until_eof() == b""

            # mss answers "na" to everything it does not know; the dial side gives up.
            with pytest.raises(StreamFailure, match="failed to open a stream"):
                await b.open_stream(a.peer_id, "/does-not-exist/1.0.0")
            # ...and the connection survives it.
            assert await b.echo(a.peer_id, b"still here") == b"still here"
        # pytest-trio cancels the ``nursery`` fixture (and so stops ``a``) after the test.


async def test_dial_failures_are_fast_and_not_sticky() -> None:
    """A failed dial fails at once and does not poison the next dial to the same peer id."""
    seed = b"\x02" * 32
    with trio.fail_after(TEST_TIMEOUT):
        async with open_libp2p_peer() as b:
            async with open_libp2p_peer(key_seed=seed) as gone:
                gone_id, stale_addr = gone.peer_id, gone.p2p_addr
            with pytest.raises(SwarmException):  # nobody listens there any more
                await b.connect(stale_addr)

            async with open_libp2p_peer() as c:
                # c's address with another peer id: Noise proves c's identity, so the dial fails.
                with pytest.raises(SwarmException):
                    await b.connect(c.listen_addr, gone_id)
                assert c.peer_id not in b.connected_peers()

            # Same identity back on a new port: py-libp2p alone would redial the stale address
            # (peerstore) or refuse for 60 s (negative cache); the helper's connect() does not.
            async with open_libp2p_peer(key_seed=seed) as back:
                assert back.peer_id == gone_id
                assert await b.connect(back.p2p_addr) == gone_id
                assert await b.echo(gone_id, b"back") == b"back"
