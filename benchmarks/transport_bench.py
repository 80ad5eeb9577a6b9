"""Transport: 64 MiB echoed through one stream and 32-byte round trips, on loopback TCP.

trionode↔trionode (TCP → mss → Noise → mss → Yamux) beside py-libp2p↔py-libp2p (the same
stack, measured in the same run) and the ceiling: plain Trio TCP with the same AEAD framing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from prometheus_client import CollectorRegistry

from benchmarks.harness import Row
from benchmarks.transport_baseline import (
    READ_SIZE,
    _bounce,
    _results,
    _timeout_for,
    measure_libp2p,
    measure_plain_tcp,
)
from trionode.config import NetworkSection
from trionode.net.host import Connection, Host
from trionode.net.metrics import NetMetrics
from trionode.wire.keys import PrivateKey

ECHO = "/bench/echo/1.0.0"


async def _echo(stream: trio.abc.Stream, _conn: Connection) -> None:
    while data := await stream.receive_some(READ_SIZE):
        await stream.send_all(data)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


@asynccontextmanager
async def _host() -> AsyncIterator[Host]:
    host = Host(
        PrivateKey.generate(),
        NetworkSection(listen=["/ip4/127.0.0.1/tcp/0"], ping_interval=3600),
        NetMetrics(CollectorRegistry()),
    )
    host.set_handler(ECHO, _echo)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, stop)
        yield host
        stop.set()


async def measure_trionode(total_bytes: int, rtt_rounds: int) -> dict[str, float]:
    with trio.fail_after(_timeout_for(total_bytes, rtt_rounds)):
        async with AsyncExitStack() as stack:
            server = await stack.enter_async_context(_host())
            client = await stack.enter_async_context(_host())
            conn = await client.connect(server.addresses()[0])
            _, stream = await conn.new_stream([ECHO])
            chunk = b"\x5a" * (1 << 20)
            received = 0

            async def reader() -> None:
                nonlocal received
                while received < total_bytes:
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        break
                    received += len(data)

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                sent = 0
                while sent < total_bytes:
                    n = min(len(chunk), total_bytes - sent)
                    await stream.send_all(chunk[:n])
                    sent += n
            elapsed = time.perf_counter() - started
            assert received == total_bytes
            await stream.send_eof()
            await stream.aclose()

            _, rtt_stream = await conn.new_stream([ECHO])
            buffer = bytearray()

            async def receive_exactly(n: int) -> bytes:
                while len(buffer) < n:
                    buffer.extend(await rtt_stream.receive_some(READ_SIZE))
                out = bytes(buffer[:n])
                del buffer[:n]
                return out

            rtts = await _bounce(rtt_stream.send_all, receive_exactly, rtt_rounds)
            await rtt_stream.send_eof()
            await rtt_stream.aclose()
    return _results(total_bytes, elapsed, rtts)


async def run(*, quick: bool) -> list[Row]:
    total = (4 if quick else 64) * 1024 * 1024
    rounds = 200 if quick else 2000
    ours = await measure_trionode(total, rounds)
    libp2p = await measure_libp2p(total, rounds)
    ceiling = await measure_plain_tcp(total, rounds)
    mib = total // (1024 * 1024)
    rows = []
    for name, base in (("py-libp2p", libp2p), ("plain TCP+AEAD ceiling", ceiling)):
        rows.append(
            Row(
                f"echo {mib} MiB, one stream",
                ours["throughput_mb_s"],
                "MB/s",
                name,
                base["throughput_mb_s"],
            )
        )
        rows.append(
            Row(
                "32-byte round trip p50",
                ours["rtt_p50_us"],
                "µs",
                name,
                base["rtt_p50_us"],
                higher_is_better=False,
            )
        )
        rows.append(
            Row(
                "32-byte round trip p99",
                ours["rtt_p99_us"],
                "µs",
                name,
                base["rtt_p99_us"],
                higher_is_better=False,
            )
        )
    return rows
