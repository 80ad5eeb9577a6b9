"""Transport baselines on loopback, one process: py-libp2p, and a plain TCP + AEAD ceiling.

* :func:`measure_libp2p` -- two py-libp2p 0.8.1 hosts (TCP, mss, Noise XX, Yamux; the same
  configuration as ``tests/interop/libp2p_peer.py``) echo ``total_bytes`` through one stream,
  then bounce 32-byte messages ``rtt_rounds`` times on another.
* :func:`measure_plain_tcp` -- the ceiling for a Noise transport written in Python on trio:
  a trio TCP echo where both directions carry Noise-style transport frames
  (``uint16 BE length || ChaCha20-Poly1305(k, nonce = 0^4 || LE64(n), ad = b"")``, at most
  65519 plaintext bytes per frame), encrypted on send and decrypted on receive, frames coalesced
  into one ``send_all`` per write. No handshake, no multiplexing, no flow control.

Both measure in the same way: throughput = ``total_bytes`` (one way) / time from the first byte
written to the last echoed byte received, in MB/s (10**6 bytes); latency = one 32-byte message
sent and the 32-byte echo received, p50/p99 over ``rtt_rounds`` after 20 warm-up rounds.
Both endpoints share one trio thread, so both ends' work on every byte runs on one core (a
two-process setup would be faster) and the RTT includes the peer's processing.

Standalone: ``python -m benchmarks.transport_baseline --bytes 67108864 [--rtt-rounds 1000]``.
The host setup mirrors ``tests/interop/libp2p_peer.py`` (keep them in step) so that the benchmark
does not depend on the test tree; that module's docstring lists py-libp2p's quirks.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial

import multiaddr
import trio
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IOException
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import (
    PROTOCOL_ID as NOISE_PROTOCOL,
    Transport as NoiseTransport,
)
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL, Yamux

__all__ = ["measure_libp2p", "measure_plain_tcp"]

ECHO_PROTOCOL = TProtocol("/echo/1.0.0")
RTT_MESSAGE = 32
WARMUP_ROUNDS = 20
WRITE_CHUNK = 1024 * 1024
# py-libp2p's unbounded read() drains its receive buffer with `bytes +=` per 64 KiB slice: quadratic
# in the backlog, which its auto-tuned windows let grow to 16 MiB. Bounded reads avoid that.
READ_SIZE = 256 * 1024
MAX_PLAINTEXT = 65519  # 65535 - 16-byte Poly1305 tag
_LEN = struct.Struct(">H")


def _timeout_for(total_bytes: int, rtt_rounds: int) -> float:
    # Generous (>= 1 MB/s and 10 ms per round trip): a wedged run fails instead of hanging.
    return 60.0 + total_bytes / 1e6 + rtt_rounds / 100


def _percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 1]."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _results(total_bytes: int, elapsed: float, rtts_s: list[float]) -> dict[str, float]:
    rtts_us = [r * 1e6 for r in rtts_s]
    return {
        "bytes": float(total_bytes),
        "echo_seconds": elapsed,
        "throughput_mb_s": total_bytes / elapsed / 1e6 if elapsed > 0 else math.inf,
        "rtt_rounds": float(len(rtts_us)),
        "rtt_p50_us": _percentile(rtts_us, 0.50) if rtts_us else math.nan,
        "rtt_p99_us": _percentile(rtts_us, 0.99) if rtts_us else math.nan,
    }


async def _bounce(
    send: Callable[[bytes], Awaitable[None]],
    receive_exactly: Callable[[int], Awaitable[bytes]],
    rounds: int,
) -> list[float]:
    """Warm up, then time ``rounds`` request/response round trips of RTT_MESSAGE bytes."""
    msg = os.urandom(RTT_MESSAGE)
    rtts: list[float] = []
    for i in range(WARMUP_ROUNDS + rounds):
        start = time.perf_counter()
        await send(msg)
        echoed = await receive_exactly(RTT_MESSAGE)
        if i >= WARMUP_ROUNDS:
            rtts.append(time.perf_counter() - start)
        if echoed != msg:
            raise RuntimeError("echo mismatch")
    return rtts


# ---------------------------------------------------------------------------------------------
# py-libp2p <-> py-libp2p
# ---------------------------------------------------------------------------------------------


def _libp2p_host() -> IHost:
    """Noise + Yamux only; 1 connection per peer so connect() skips the 250 ms happy-eyeballs."""
    key_pair = create_ed25519_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


async def _libp2p_echo_handler(stream: INetStream) -> None:
    try:
        while True:
            try:
                data = await stream.read(READ_SIZE)
            except StreamEOF:
                break
            await stream.write(data)
        await stream.close()
    except (IOException, MuxedStreamError):
        await stream.reset()


async def _libp2p_read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.read(n - len(buf))
    return bytes(buf)


async def _libp2p_throughput(host: IHost, server: IHost, total_bytes: int) -> float:
    stream = await host.new_stream(server.get_id(), [ECHO_PROTOCOL])
    payload = os.urandom(min(total_bytes, WRITE_CHUNK))
    received = 0

    async def writer() -> None:
        sent = 0
        while sent < total_bytes:
            chunk = payload[: total_bytes - sent]
            await stream.write(chunk)
            sent += len(chunk)
        assert isinstance(stream, NetStream)
        await stream.close_write()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        while received < total_bytes:
            received += len(await stream.read(READ_SIZE))
    elapsed = time.perf_counter() - start
    try:
        tail = await stream.read()
    except StreamEOF:
        tail = b""
    if tail:
        raise RuntimeError(f"echo returned {len(tail)} bytes too many")
    return elapsed


async def measure_libp2p(total_bytes: int, rtt_rounds: int) -> dict[str, float]:
    """py-libp2p <-> py-libp2p on loopback: echo throughput (MB/s one way) and 32-byte RTT (us).

    Returns ``bytes``, ``echo_seconds``, ``throughput_mb_s``, ``rtt_rounds``, ``rtt_p50_us``,
    ``rtt_p99_us`` and ``connect_ms`` (TCP + mss + Noise XX + mss + yamux, one process).
    """
    listen = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
    server, client = _libp2p_host(), _libp2p_host()
    server.set_stream_handler(ECHO_PROTOCOL, _libp2p_echo_handler)
    with trio.fail_after(_timeout_for(total_bytes, rtt_rounds)):
        async with server.run([listen]), client.run([listen]):
            try:
                start = time.perf_counter()
                await client.connect(PeerInfo(server.get_id(), server.get_transport_addrs()))
                connect_ms = (time.perf_counter() - start) * 1e3

                elapsed = await _libp2p_throughput(client, server, total_bytes)

                stream = await client.new_stream(server.get_id(), [ECHO_PROTOCOL])
                rtts = await _bounce(
                    stream.write, lambda n: _libp2p_read_exactly(stream, n), rtt_rounds
                )
                await stream.close()
            finally:
                # host.run() alone leaves the sockets open (ResourceWarning); close explicitly.
                with trio.move_on_after(5, shield=True):
                    await client.close()
                    await server.close()
    return {**_results(total_bytes, elapsed, rtts), "connect_ms": connect_ms}


# ---------------------------------------------------------------------------------------------
# Plain trio TCP with Noise-style AEAD framing: the ceiling
# ---------------------------------------------------------------------------------------------


class _FrameSender:
    """Encrypts into ``len16 || ct`` frames (<= 65519 plaintext bytes each), one counter."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._n = 0

    def seal(self, data: bytes) -> bytes:
        parts: list[bytes] = []
        view = memoryview(data)
        for start in range(0, len(data), MAX_PLAINTEXT):
            ct = self._aead.encrypt(
                b"\x00\x00\x00\x00" + self._n.to_bytes(8, "little"),
                view[start : start + MAX_PLAINTEXT],
                None,
            )
            self._n += 1
            parts += (_LEN.pack(len(ct)), ct)
        return b"".join(parts)


class _FrameReceiver:
    """Buffers ciphertext, returns the plaintext of every complete frame."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._n = 0
        self._buf = bytearray()

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        buf, pos, parts = self._buf, 0, []
        with memoryview(buf) as view:
            while len(buf) - pos >= 2:
                (length,) = _LEN.unpack_from(buf, pos)
                if len(buf) - pos - 2 < length:
                    break
                nonce = b"\x00\x00\x00\x00" + self._n.to_bytes(8, "little")
                parts.append(self._aead.decrypt(nonce, view[pos + 2 : pos + 2 + length], None))
                self._n += 1
                pos += 2 + length
        del buf[:pos]
        return b"".join(parts)


class _AeadStream:
    """Client side of the framed connection: plaintext in, plaintext out."""

    def __init__(self, stream: trio.SocketStream, send_key: bytes, receive_key: bytes) -> None:
        self._stream = stream
        self._sender = _FrameSender(send_key)
        self._receiver = _FrameReceiver(receive_key)
        self._pending = bytearray()

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(self._sender.seal(data))

    async def receive_some(self) -> bytes:
        if self._pending:
            out = bytes(self._pending)
            self._pending.clear()
            return out
        while True:
            data = await self._stream.receive_some(256 * 1024)
            if not data:
                return b""
            if plain := self._receiver.feed(data):
                return plain

    async def receive_exactly(self, n: int) -> bytes:
        while len(self._pending) < n:
            chunk = await self.receive_some()
            if not chunk:
                raise EOFError("connection closed")
            self._pending += chunk
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out


async def _aead_echo_server(
    stream: trio.SocketStream, client_to_server: bytes, server_to_client: bytes
) -> None:
    receiver, sender = _FrameReceiver(client_to_server), _FrameSender(server_to_client)
    async with stream:
        while data := await stream.receive_some(256 * 1024):
            if plain := receiver.feed(data):
                await stream.send_all(sender.seal(plain))


async def measure_plain_tcp(total_bytes: int, rtt_rounds: int) -> dict[str, float]:
    """Plain trio TCP echo with Noise-style ChaCha20-Poly1305 framing, same method and keys as
    :func:`measure_libp2p` (``bytes``, ``echo_seconds``, ``throughput_mb_s``, ``rtt_*``)."""
    c2s, s2c = ChaCha20Poly1305.generate_key(), ChaCha20Poly1305.generate_key()

    async def handler(stream: trio.SocketStream) -> None:
        await _aead_echo_server(stream, c2s, s2c)

    with trio.fail_after(_timeout_for(total_bytes, rtt_rounds)):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with await trio.open_tcp_stream("127.0.0.1", port) as tcp:
                conn = _AeadStream(tcp, c2s, s2c)
                payload = os.urandom(min(total_bytes, WRITE_CHUNK))
                received = 0

                async def writer() -> None:
                    sent = 0
                    while sent < total_bytes:
                        chunk = payload[: total_bytes - sent]
                        await conn.send_all(chunk)
                        sent += len(chunk)

                start = time.perf_counter()
                async with trio.open_nursery() as inner:
                    inner.start_soon(writer)
                    while received < total_bytes:
                        received += len(await conn.receive_some())
                elapsed = time.perf_counter() - start

                rtts = await _bounce(conn.send_all, conn.receive_exactly, rtt_rounds)
            nursery.cancel_scope.cancel()
    return _results(total_bytes, elapsed, rtts)


# ---------------------------------------------------------------------------------------------


def _format(name: str, result: dict[str, float]) -> str:
    line = (
        f"{name:>9}: {result['bytes'] / 2**20:.0f} MiB echoed in {result['echo_seconds']:.2f} s"
        f" = {result['throughput_mb_s']:.1f} MB/s one way;"
        f" {RTT_MESSAGE}-byte RTT p50 {result['rtt_p50_us']:.0f} us,"
        f" p99 {result['rtt_p99_us']:.0f} us ({result['rtt_rounds']:.0f} rounds)"
    )
    if "connect_ms" in result:
        line += f"; connect {result['connect_ms']:.1f} ms"
    return line


async def _main(total_bytes: int, rtt_rounds: int, which: str) -> None:
    if which in {"both", "tcp"}:
        print(_format("plain TCP", await measure_plain_tcp(total_bytes, rtt_rounds)), flush=True)
    if which in {"both", "libp2p"}:
        print(_format("py-libp2p", await measure_libp2p(total_bytes, rtt_rounds)), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--bytes", type=int, default=64 * 2**20, help="bytes to echo")
    parser.add_argument("--rtt-rounds", type=int, default=1000, help="32-byte round trips")
    parser.add_argument("--only", choices=["both", "libp2p", "tcp"], default="both")
    args = parser.parse_args(argv)
    trio.run(_main, args.bytes, args.rtt_rounds, args.only)


if __name__ == "__main__":
    main()
