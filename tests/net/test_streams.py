"""Driver contract tests: NoiseStream and YamuxStream behave as trio streams should."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from trionode.errors import RemoteProtocolError
from trionode.net.noise_stream import NoiseStream, noise_handshake
from trionode.net.yamux_session import YamuxSession, YamuxStream
from trionode.wire.keys import PrivateKey
from trionode.wire.yamux import YamuxConfig


async def _noise_pair(
    left: trio.abc.Stream, right: trio.abc.Stream
) -> tuple[NoiseStream, NoiseStream]:
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    results: dict[str, NoiseStream] = {}

    async def side(name: str, stream: trio.abc.Stream, key: PrivateKey, initiator: bool) -> None:
        expected = b_key.peer_id() if initiator else None
        results[name] = await noise_handshake(
            stream, key, initiator=initiator, expected_peer_id=expected
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "a", left, a_key, True)
        nursery.start_soon(side, "b", right, b_key, False)
    assert results["a"].remote_peer_id == b_key.peer_id()
    assert results["b"].remote_peer_id == a_key.peer_id()
    return results["a"], results["b"]


async def test_noise_stream_contract() -> None:
    async def maker() -> tuple[NoiseStream, NoiseStream]:
        return await _noise_pair(*trio.testing.memory_stream_pair())

    async def clogged() -> tuple[NoiseStream, NoiseStream]:
        return await _noise_pair(*trio.testing.lockstep_stream_pair())

    await trio.testing.check_half_closeable_stream(maker, clogged)


async def test_noise_rejects_the_wrong_peer() -> None:
    left, right = trio.testing.memory_stream_pair()
    impostor = PrivateKey.generate()

    async def responder() -> None:
        with contextlib.suppress(RemoteProtocolError, trio.BrokenResourceError):
            await noise_handshake(right, impostor, initiator=False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder)
        with pytest.raises(RemoteProtocolError, match="dialled"):
            await noise_handshake(
                left,
                PrivateKey.generate(),
                initiator=True,
                expected_peer_id=PrivateKey.generate().peer_id(),
            )
        await left.aclose()


async def test_noise_garbage_is_a_protocol_error() -> None:
    left, right = trio.testing.memory_stream_pair()
    _a, b = await _noise_pair(left, right)
    await left.send_all(b"\x00\x20" + os.urandom(32))  # a frame that fails authentication
    with pytest.raises(RemoteProtocolError):
        await b.receive_some()


@asynccontextmanager
async def yamux_pair() -> AsyncIterator[tuple[YamuxSession, YamuxSession]]:
    left, right = trio.testing.memory_stream_pair()
    a_noise, b_noise = await _noise_pair(left, right)
    client = YamuxSession(a_noise, is_client=True)
    server = YamuxSession(b_noise, is_client=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        yield client, server
        nursery.cancel_scope.cancel()


async def test_yamux_stream_contract() -> None:
    async with trio.open_nursery() as outer:
        sessions: list[YamuxSession] = []

        async def maker() -> tuple[YamuxStream, YamuxStream]:
            left, right = trio.testing.memory_stream_pair()
            a_noise, b_noise = await _noise_pair(left, right)
            client = YamuxSession(a_noise, is_client=True)
            server = YamuxSession(b_noise, is_client=False)
            await outer.start(client.run)
            await outer.start(server.run)
            sessions.extend([client, server])
            a = await client.open_stream()
            await a.send_all(b"")  # nothing on the wire yet: open is lazy on the peer side
            b = await server.accept_stream()
            return a, b

        await trio.testing.check_half_closeable_stream(maker, None)
        outer.cancel_scope.cancel()


async def test_many_streams_and_a_large_transfer() -> None:
    payload = os.urandom(8 * 1024 * 1024)
    async with yamux_pair() as (client, server):

        async def echo_server() -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(9):
                    stream = await server.accept_stream()
                    nursery.start_soon(echo, stream)

        async def echo(stream: YamuxStream) -> None:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()
            await stream.aclose()

        async def roundtrip(data: bytes) -> None:
            stream = await client.open_stream()
            received = bytearray()

            async def reader() -> None:
                while chunk := await stream.receive_some():
                    received.extend(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await stream.send_all(data)
                await stream.send_eof()
            await stream.aclose()
            assert received == data

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_server)
            for i in range(8):
                nursery.start_soon(roundtrip, b"stream %d " % i * 1000)
            nursery.start_soon(roundtrip, payload)


async def test_a_ping_timeout_ends_the_session_and_later_bytes_do_not_crash_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that stops answering pings: the session ends at the ping timeout, at once and
    cleanly, and bytes that reach a reader already waiting are not fed to the terminated
    machine (that raised LocalProtocolError out of `run` and stopped the node)."""
    ours, theirs = trio.testing.memory_stream_pair()
    config = YamuxConfig(keepalive_interval=5.0, ping_timeout=2.0)
    session = YamuxSession(ours, is_client=True, config=config)
    ended = trio.Event()

    async def run() -> None:
        await session.run()
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(60):
            # A ping from the peer starts our clock, and our keepalive ping goes out at
            # once (after the pong); the peer never answers it.
            await theirs.send_all(bytes([0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7]))
            assert await theirs.receive_some(1024)
            await ended.wait()
        assert session.closed
        assert session.close_reason == "ping timeout"
        # The peer's late bytes find no reader to break.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await theirs.send_all(b"\x00" * 12)
