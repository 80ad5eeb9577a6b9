"""Misbehaving peers, built by hand from the transport's pieces, against a real Host.

Each attack is a raw client: TCP, multistream `/noise`, the Noise XX handshake, multistream
`/yamux/1.0.0`, then bytes no well-behaved peer would send. Each test checks three things:
the attacker is disconnected, the host counts it in its metrics, and a well-behaved peer
connected to the same host keeps working (it is pinged after the attack, both ways).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from trionode.errors import RemoteProtocolError
from trionode.net.host import Connection
from trionode.net.multistream import select_protocol
from trionode.net.noise_stream import NoiseStream, noise_handshake
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multistream import MULTISTREAM_PROTOCOL, encode_message
from trionode.wire.noise import NOISE_PROTOCOL_ID, NoiseHandshake
from trionode.wire.yamux import (
    DEFAULT_WINDOW,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER,
    HEADER_SIZE,
    PROTOCOL_ID as YAMUX_PROTOCOL_ID,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_WINDOW_UPDATE,
)

from .host_helpers import (
    RunningHost,
    open_host,
    read_until_eof,
    tcp_target,
    wait_connected,
    wait_for,
)

pytestmark = pytest.mark.real_network

SINK = "/trionode-test/sink/1.0.0"
"""A handler that never reads: the slow application flow control exists for."""


async def _sink(_stream: trio.abc.HalfCloseableStream, _conn: Connection) -> None:
    await trio.sleep_forever()


@asynccontextmanager
async def target_and_good_peer(
    **overrides: Any,
) -> AsyncIterator[tuple[RunningHost, RunningHost]]:
    """The host under attack, and a well-behaved peer already connected to it."""
    async with open_host(**overrides) as target, open_host() as good:
        target.host.set_handler(SINK, _sink)
        await good.host.connect(target.address)
        await wait_connected(good, target)
        yield target, good


async def assert_good_peer_unharmed(
    target: RunningHost, good: RunningHost, *, others: int = 0
) -> None:
    """The good peer still talks to the target both ways; `others` connections remain too."""
    assert good.host.peer_id in target.host.connections
    assert await good.host.ping(target.host.peer_id) > 0
    assert await target.host.ping(good.host.peer_id) > 0
    assert target.open_connections() == 1 + others


# -- the attacker -----------------------------------------------------------------------------


@attrs.define
class Attacker:
    peer_id: PeerId
    tcp: trio.SocketStream
    noise: NoiseStream
    muxed: trio.abc.Stream
    """Plaintext to the host's yamux session: write raw frames here."""

    async def read_until_closed(self) -> bytes:
        """Everything the host sends (decrypted) until it closes the connection."""
        received = bytearray()
        while True:
            try:
                chunk = await self.muxed.receive_some()
            except (trio.BrokenResourceError, RemoteProtocolError):
                return bytes(received)  # reset, or cut mid-frame
            if not chunk:
                return bytes(received)
            received += chunk


@asynccontextmanager
async def open_attacker(target: RunningHost) -> AsyncIterator[Attacker]:
    """Connect, authenticate and negotiate yamux by hand; yield once the host registered us."""
    key = PrivateKey.generate()
    async with await trio.open_tcp_stream(*tcp_target(target)) as tcp:
        _, stream = await select_protocol(tcp, [NOISE_PROTOCOL_ID])
        noise = await noise_handshake(
            stream, key, initiator=True, expected_peer_id=target.host.peer_id
        )
        _, muxed = await select_protocol(noise, [YAMUX_PROTOCOL_ID])
        attacker = Attacker(key.peer_id(), tcp, noise, muxed)
        await wait_for(lambda: attacker.peer_id in target.host.connections, target)
        yield attacker


async def assert_disconnected(target: RunningHost, attacker: Attacker) -> bytes:
    """The host dropped the attacker: it is gone from `connections` and the socket ends."""
    received = await attacker.read_until_closed()
    await wait_for(lambda: attacker.peer_id not in target.host.connections, target)
    return received


async def send_until_broken(stream: trio.abc.SendStream, data: bytes) -> None:
    with pytest.raises(trio.BrokenResourceError):  # noqa: PT012 - the loop is the statement
        while True:
            await stream.send_all(data)


def frame(ftype: int, flags: int, stream_id: int, length: int, body: bytes = b"") -> bytes:
    return HEADER.pack(0, ftype, flags, stream_id, length) + body


def go_away_codes(plaintext: bytes) -> list[int]:
    """The error codes of the GoAway frames in a stream of yamux frames."""
    codes = []
    pos = 0
    while pos + HEADER_SIZE <= len(plaintext):
        _, ftype, _, _, length = HEADER.unpack_from(plaintext, pos)
        pos += HEADER_SIZE
        if ftype == TYPE_DATA:
            pos += length
        elif ftype == TYPE_GO_AWAY:
            codes.append(length)
    return codes


def protocol_errors(host: RunningHost, layer: str) -> float:
    return host.sample("trionode_p2p_protocol_errors_total", layer=layer)


# -- attacks after the handshake --------------------------------------------------------------


async def test_garbage_after_the_handshake() -> None:
    with trio.fail_after(10):
        async with target_and_good_peer() as (target, good):
            async with open_attacker(target) as attacker:
                # A well-formed Noise frame length, then bytes that fail authentication.
                await attacker.tcp.send_all(b"\x00\x40" + os.urandom(64))
                await assert_disconnected(target, attacker)
                assert protocol_errors(target, "noise") == 1
            await assert_good_peer_unharmed(target, good)


async def test_oversized_noise_frame_of_junk() -> None:
    with trio.fail_after(10):
        async with target_and_good_peer() as (target, good):
            async with open_attacker(target) as attacker:
                # The largest length a Noise frame can announce, filled with junk.
                await attacker.tcp.send_all(b"\xff\xff" + os.urandom(0xFFFF))
                await assert_disconnected(target, attacker)
                assert protocol_errors(target, "noise") == 1
            await assert_good_peer_unharmed(target, good)


async def test_oversized_yamux_data_frame() -> None:
    with trio.fail_after(10):
        async with target_and_good_peer() as (target, good):
            async with open_attacker(target) as attacker:
                # A new stream whose first Data frame announces more than the 256 KiB window.
                await attacker.muxed.send_all(frame(TYPE_DATA, FLAG_SYN, 1, DEFAULT_WINDOW + 1))
                received = await assert_disconnected(target, attacker)
                # The host read all we sent, so it closed cleanly, saying why.
                assert go_away_codes(received) == [GO_AWAY_PROTOCOL_ERROR]
                assert protocol_errors(target, "yamux") == 1
            await assert_good_peer_unharmed(target, good)


async def test_window_violation() -> None:
    with trio.fail_after(10):
        async with target_and_good_peer() as (target, good):
            async with open_attacker(target) as attacker:
                negotiation = encode_message(MULTISTREAM_PROTOCOL) + encode_message(SINK)
                chunk = 65536
                flood = b"".join(
                    frame(TYPE_DATA, 0, 1, chunk, bytes(chunk))
                    for _ in range(2 * DEFAULT_WINDOW // chunk)
                )
                # Open a stream to the sink (it never reads, so the window is never re-granted)
                # and send twice the window, in frames each small enough on its own.
                await attacker.muxed.send_all(
                    frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
                    + frame(TYPE_DATA, 0, 1, len(negotiation), negotiation)
                )
                await send_until_broken(attacker.muxed, flood)  # until the host hangs up
                await assert_disconnected(target, attacker)
                assert protocol_errors(target, "yamux") == 1
            await assert_good_peer_unharmed(target, good)


async def test_stream_flood() -> None:
    max_streams, max_refused = 4, 3
    with trio.fail_after(10):
        async with target_and_good_peer(
            max_streams_per_connection=max_streams, max_refused_streams=max_refused
        ) as (target, good):
            async with open_attacker(target) as attacker:
                # Open streams and keep them open (never negotiate, never close).
                syns = b"".join(
                    frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2 * i + 1, 0)
                    for i in range(max_streams + max_refused)
                )
                await attacker.muxed.send_all(syns)
                received = await assert_disconnected(target, attacker)
                assert go_away_codes(received) == [GO_AWAY_PROTOCOL_ERROR]
                assert target.sample("trionode_p2p_streams_refused_total") == max_refused
                assert protocol_errors(target, "stream_flood") == 1
            await assert_good_peer_unharmed(target, good)


async def test_streams_over_the_limit_are_refused_but_not_yet_a_flood() -> None:
    with trio.fail_after(10):
        async with (
            target_and_good_peer(max_streams_per_connection=4, max_refused_streams=3) as (
                target,
                good,
            ),
            open_attacker(target) as attacker,
        ):
            # Two over the limit: refused and counted, but one short of a flood.
            await attacker.muxed.send_all(
                b"".join(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2 * i + 1, 0) for i in range(6))
            )
            conn = target.host.connections[attacker.peer_id]
            while conn.refused_streams < 2:
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            assert target.sample("trionode_p2p_streams_refused_total") == 2
            assert protocol_errors(target, "stream_flood") == 0
            assert not conn.closed
            assert attacker.peer_id in target.host.connections
            await assert_good_peer_unharmed(target, good, others=1)


# -- attacks during the handshake -------------------------------------------------------------


async def test_stalled_handshake_is_dropped_after_the_timeout() -> None:
    timeout = 0.3
    with trio.fail_after(10):
        async with target_and_good_peer(handshake_timeout=timeout) as (target, good):
            started = trio.current_time()
            async with await trio.open_tcp_stream(*tcp_target(target)) as tcp:
                _, stream = await select_protocol(tcp, [NOISE_PROTOCOL_ID])
                handshake = NoiseHandshake(PrivateKey.generate(), initiator=True)
                await stream.send_all(handshake.data_to_send())  # msg1 ... and then nothing
                await read_until_eof(stream)
            assert trio.current_time() - started >= timeout
            assert target.sample("trionode_p2p_handshake_failures_total", reason="timeout") == 1
            assert target.host.connections.keys() == {good.host.peer_id}
            await assert_good_peer_unharmed(target, good)


async def test_too_many_pending_handshakes_are_closed_at_once() -> None:
    limit, extra = 2, 3
    with trio.fail_after(10):
        # The stalled handshakes would time out long after this test's deadline.
        async with target_and_good_peer(max_pending_handshakes=limit, handshake_timeout=60) as (
            target,
            good,
        ):
            closed = 0
            all_extras_closed = trio.Event()

            async def stall() -> None:
                nonlocal closed
                async with await trio.open_tcp_stream(*tcp_target(target)) as tcp:
                    await read_until_eof(tcp)
                closed += 1
                if closed == extra:
                    all_extras_closed.set()

            async with trio.open_nursery() as nursery:
                for _ in range(limit + extra):
                    nursery.start_soon(stall)
                await all_extras_closed.wait()
                assert closed == extra  # `limit` of them are still waiting, half-open
                assert (
                    target.sample(
                        "trionode_p2p_handshake_failures_total", reason="too_many_pending"
                    )
                    == extra
                )
                await assert_good_peer_unharmed(target, good)
                nursery.cancel_scope.cancel()  # the stalled ones give up ...
            # ... and the host notices: their handshakes fail and free their slots.
            while target.host.connmgr.statistics().pending_handshakes > 0:
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            # Once they are gone, new peers can connect again.
            async with open_host() as late:
                await late.host.connect(target.address)
                assert await late.host.ping(target.host.peer_id) > 0
