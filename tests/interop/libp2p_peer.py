"""A py-libp2p 0.8.1 peer restricted to Noise + Yamux, for interop tests against trionode.

Usage::

    async with open_libp2p_peer() as a, open_libp2p_peer() as b:
        await b.connect(a.listen_addr, a.peer_id)     # or b.connect(a.p2p_addr)
        assert await b.echo(a.peer_id, payload) == payload
        rtts = await b.ping(a.peer_id, count=3)        # seconds, perf_counter based
        info = await b.identify(a.peer_id)             # IdentifyInfo

or, in a nursery: ``peer = await nursery.start(serve_libp2p_peer)``.

The host negotiates only ``/noise`` (security) and ``/yamux/1.0.0`` (muxer); it serves
``/echo/1.0.0`` (echo every byte until EOF, then FIN; RST on error) plus py-libp2p's default
``/ipfs/ping/1.0.0``, ``/ipfs/id/1.0.0`` and ``/ipfs/id/push/1.0.0``. No sleeps: ``host.run()``
awaits ``Swarm.listen()``, which returns once the socket is bound (``nursery.start``), so
``listen_addr`` has the real port when the context manager yields. Exiting closes every
connection first (``host.close()``), otherwise py-libp2p leaks the sockets (``ResourceWarning``).

What py-libp2p 0.8.1 does on the wire (what trionode must accept)
=================================================================
[probe] = seen on the wire with a hand-written mss/Noise/yamux peer (noiseprotocol + struct)
against this helper, both as dialer and as listener; [src] = read in the installed source.
Reference: /work/shared/reference/libp2p-wire.md.

multistream-select (``protocol_muxer/multiselect*.py``)
  * py as dialer never pipelines [probe]: it sends the ``/multistream/1.0.0`` header alone, waits
    for ours, sends one proposal, waits for the echo or ``na``, then tries the next one. Same on
    every yamux stream it opens, so a stream opened by py costs 2 RTTs before data flows.
    **Our listener must send its header when the dialer's header arrives (or unprompted)**; a
    listener that waits for header + proposal deadlocks with py (its mss timeout is 30 s; the
    outbound Noise handshake itself has no timeout, only this helper's ``default_timeout``).
  * py as listener sends its header immediately on connect and on every accepted stream, before
    reading [probe]; it answers ``ls``, and ``na`` for unknown protocols, then keeps reading [src].
  * py reads exact lengths, so everything may be pipelined to it [probe]: header + ``/noise`` +
    Noise msg1; Noise msg3 + header + ``/yamux/1.0.0`` in one TCP write; yamux SYN + DATA + FIN.
  * Each mss message py sends is a separate write: its own TCP segment, Noise frame, or yamux DATA
    frame (e.g. after Noise two Noise frames of 20 B and 14 B) [probe].
  * If a listener re-sends ``/multistream/1.0.0`` mid-selection, the py client redoes the
    handshake once (go-libp2p workaround) [src].

Noise (``security/noise/*``)
  * ``Noise_XX_25519_ChaChaPoly_SHA256``, empty prologue, msg1 = 32 B (empty payload) [probe].
    The Noise static key is made once per host (``new_swarm``), not per connection [src].
  * The payload holds ``identity_key`` (1) and ``identity_sig`` (2) only: **no extensions, no
    stream_muxers, no early data**; msg2 = 200 B and msg3 = 168 B (payload 104 B) [probe].
    py's NoiseExtensions proto has a non-standard ``early_data = 3``; it never sends it [src].
  * Extensions we send are ignored: py does not do inlined muxer negotiation and always runs mss
    for ``/yamux/1.0.0`` after Noise [probe]. The dialer checks the PeerId [src].
  * Transport frames: at most 65519 plaintext bytes; py does not coalesce: each upper-layer write
    (yamux frame, window update, mss message) is one Noise frame, or two if it is too long [probe].
  * **An empty Noise transport frame (16-byte tag only) closes the connection**: ``SecureSession``
    treats a decrypted ``b""`` as EOF [probe]. Never send py an empty Noise frame.
  * **A Noise frame that needs more than 100 ``recv`` calls kills the connection**: py's
    ``read_exactly`` retries only 100 times (``IncompleteReadError``: "expected 328 bytes but
    received 101") [probe]. This matters for 1-byte trickle tests over real sockets, not for
    normal traffic. There is no rekey [src].

Yamux (``stream_muxer/yamux/yamux.py``)
  * Dialer odd ids, listener even ids; py accepts streams we open as listener (even ids) [probe].
    It does not check the parity of inbound SYNs; a SYN for an id in use gets RST [src].
  * Open = ``WindowUpdate{SYN, 0}`` as its own frame, then the mss header as DATA without waiting
    for ACK; accept = ``WindowUpdate{ACK, 0}``; close = ``WindowUpdate{FIN, 0}``; reset =
    ``WindowUpdate{RST, 0}`` [probe]. FIN/RST are honoured on DATA and with SYN [src].
  * Initial window 256 KiB, never raised in SYN/ACK; py respects our window as a sender: with no
    WindowUpdate from us it stops at exactly 262144 bytes [probe].
  * **Window auto-tuning is on and aggressive**: every ``read()`` credits the bytes read
    (``PY_YAMUX_RELEASE_ON_READ=1``) and, while no RTT is measured, 1 ms is assumed, so the target
    doubles on almost every read up to 16 MiB. Right after the mss exchange it sends deltas of
    262145, 524307, 1048577, 2097164, ...: ~17.6 MB granted on a 1 MiB echo stream [probe].
    Our send window must grow without limit (no 256 KiB or 16 MiB cap assumptions).
  * DATA bodies are up to 65524 B, so a full yamux frame (65536 B) **spans two Noise frames**
    (65519 + 17) [probe]. Our yamux parser must reassemble frames across Noise frames.
  * py as receiver only logs window overruns (recv_window clamped to 0) and closes the connection
    for a DATA frame > 16 MiB [src]: **py will not catch our flow-control bugs** (js does).
  * py as sender with a zero window polls every 10 ms and gives up after 5 s (``MuxedStreamError``)
    without sending anything; this helper's echo handler then sends RST [probe]. So if trionode
    stops reading a py stream for > 5 s, that stream dies.
  * **Performance trap (not wire):** ``read()`` without a size drains the receive buffer in 64 KiB
    slices, concatenating with ``bytes +=`` and sending a WindowUpdate per slice. That is
    quadratic in the backlog, and the 16 MiB auto-tuned window lets a fast sender (trionode) build
    a large one: a trionode -> py echo of 32 MiB ran at 11 MB/s with ``read()`` and at 72 MB/s
    with ``read(256 KiB)`` [measured]. This helper (and the benchmark) always read at most
    ``READ_SIZE``; a stock py-libp2p app reading with ``read()`` will be slow against us.
  * Yamux ping: 0.5 s after the session starts, then every 30 s, py sends ``Ping{SYN, 1, 2, ...}``
    and expects ``Ping{ACK, same}``; it answers our ``Ping{SYN}`` with ``ACK`` [probe]. The RTT
    feeds auto-tuning. An unsolicited ACK is ignored [src].
  * **Any GoAway, even code 0, makes py drop the connection at once**: streams are reset, pending
    data is not delivered, TCP is closed (RST if unread bytes remain) [probe]. Send GoAway only
    when done with the connection. py sends ``GoAway(0)`` when it closes a connection [src].

Identify and ping
  * Identify is **not required** by py, but py asks: right after each new connection (inbound or
    outbound) it opens ``/ipfs/id/1.0.0`` to the remote (stream 1 if py dialled, stream 2 if it
    listened) [probe]. Refusing it (RST or ``na``) leaves the connection up but py logs an ERROR
    to stderr ("Failed to open stream to peer ...") [probe]. It reads one uvarint-prefixed
    protobuf (1 MiB cap), falling back to raw protobuf until EOF [src].
  * py's identify answer: one write of ``uvarint(len) || Identify`` then FIN; protocolVersion
    ``ipfs/0.1.0``, agentVersion ``py-libp2p/0.8.1``, publicKey, listenAddrs (binary, no
    ``/p2p``), observedAddr (``/ip4/<ip>/tcp/<port>`` of the requester), protocols
    (``/ipfs/id/1.0.0``, ``/ipfs/id/push/1.0.0``, ``/ipfs/ping/1.0.0`` + registered ones such as
    ``/echo/1.0.0``) and a signedPeerRecord (field 8) [src, checked by the self-check test].
  * Identify push is sent only when py starts listening on a new address; not in these tests [src].
  * Ping responder [src]: echoes 32-byte pings until EOF, then FIN; closes (FIN, not RST) after 10 s
    idle; resets a third concurrent inbound ping stream from the same peer. py's ``PingService``
    reports whole milliseconds; :meth:`Libp2pPeer.ping` here times with ``perf_counter``.

Host behaviour worth knowing (none of it is on the wire)
  * ``host.connect()`` uses happy eyeballs: after a *successful* dial it still waits 250 ms for a
    second one unless ``max_connections_per_peer`` is reached; this helper sets that to 1, so a
    loopback connect takes a few ms [src, measured].
  * A failed dial is retried 3 times with backoff (``new_host`` cannot change it; this helper sets
    ``Swarm.retry_config`` to 0 retries), then the peer is blocked for 60 s ("negative cache").
    py also dials only one TCP address per peer, preferring addresses already in its peerstore
    (kept 120 s), so a peer that restarts on a new port cannot be redialled [probe, src].
    :meth:`Libp2pPeer.connect` clears both before dialling.
  * Closing costs 0.1-0.3 s (``Yamux.close`` and ``SwarmConn._cleanup`` each ``trio.sleep(0.1)``).
  * Importing ``libp2p`` takes ~1 s, sets the ``libp2p`` logger to WARNING with
    ``propagate=False`` (warnings reach stderr via ``logging.lastResort``), and patches aioquic.
    py runs trio *system* tasks (TCP listener nursery, identify, resource-manager loop), so their
    errors are logged, not raised into the test. ``LIBP2P_DEBUG=DEBUG`` (or e.g.
    ``libp2p.stream_muxer.yamux:DEBUG``) logs every yamux frame (to stderr and a temp file).
  * The auto-connector only redials routable addresses, so it stays idle on loopback [src].

Typing: libp2p ships ``py.typed`` and its host/stream API is annotated, so no ``type: ignore`` is
needed; ``multiaddr`` 0.2.0 is untyped (``ignore_missing_imports``), hence a few ``Any``.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL, parse_identify_response
from libp2p.io.exceptions import IOException
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import (
    PROTOCOL_ID as NOISE_PROTOCOL,
    Transport as NoiseTransport,
)
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL, Yamux

__all__ = [
    "AGENT_VERSION_PREFIX",
    "ECHO_PROTOCOL",
    "IDENTIFY_PROTOCOL",
    "PING_PROTOCOL",
    "STREAM_ERRORS",
    "IdentifyInfo",
    "Libp2pPeer",
    "Libp2pStream",
    "open_libp2p_peer",
    "serve_libp2p_peer",
]

ECHO_PROTOCOL = TProtocol("/echo/1.0.0")
AGENT_VERSION_PREFIX = "py-libp2p/"
PING_SIZE = 32
DEFAULT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
_ECHO_WRITE_CHUNK = 256 * 1024
#: Bound for every read: py-libp2p's unbounded ``read()`` is quadratic in the backlog (docstring).
READ_SIZE = 256 * 1024

#: Errors py-libp2p raises on a broken / reset / closed stream or connection.
STREAM_ERRORS: tuple[type[Exception], ...] = (IOException, MuxedStreamError)


@dataclass(frozen=True, slots=True)
class IdentifyInfo:
    """The decoded ``/ipfs/id/1.0.0`` response of a peer."""

    protocol_version: str
    agent_version: str
    public_key: bytes
    """Serialized libp2p ``PublicKey`` protobuf (the same bytes the PeerId is derived from)."""
    listen_addrs: tuple[str, ...]
    observed_addr: str | None
    protocols: tuple[str, ...]
    has_signed_peer_record: bool

    @property
    def peer_id(self) -> str:
        """PeerId (base58) derived from :attr:`public_key`."""
        return _peer_id_from_public_key(self.public_key)


class Libp2pStream:
    """A negotiated py-libp2p stream with trio-flavoured helpers (EOF is ``b""``, not an error)."""

    def __init__(self, stream: INetStream, protocol: str) -> None:
        self.raw = stream
        self.protocol = protocol

    async def send_all(self, data: bytes) -> None:
        await self.raw.write(data)

    async def receive_some(self) -> bytes:
        """Return up to ``READ_SIZE`` available bytes (at least one), or ``b""`` after FIN."""
        try:
            return await self.raw.read(READ_SIZE)
        except StreamEOF:
            return b""

    async def receive_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = await self.raw.read(n - len(buf))
            except StreamEOF:
                chunk = b""
            if not chunk:
                raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    async def receive_until_eof(self) -> bytes:
        buf = bytearray()
        while chunk := await self.receive_some():
            buf += chunk
        return bytes(buf)

    async def close_write(self) -> None:
        """Half-close: send yamux FIN, keep reading."""
        if isinstance(self.raw, NetStream):
            await self.raw.close_write()
        else:  # pragma: no cover - only TCP+yamux streams are used here
            await self.raw.close()

    async def reset(self) -> None:
        await self.raw.reset()

    async def aclose(self) -> None:
        await self.raw.close()


class Libp2pPeer:
    """A running py-libp2p host. Create it with :func:`open_libp2p_peer`."""

    def __init__(self, host: IHost, *, default_timeout: float) -> None:
        self.host = host
        self.default_timeout = default_timeout
        self.echo_streams_served = 0
        """Number of inbound ``/echo/1.0.0`` streams that ran to completion (EOF, then FIN)."""
        self.echo_streams_failed = 0
        """Number of inbound ``/echo/1.0.0`` streams that ended in an error (then RST)."""
        self._echo_ended = trio.Event()

    # -- identity and addresses -------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def listen_addr(self) -> str:
        """The bound TCP address, e.g. ``/ip4/127.0.0.1/tcp/40483`` (no ``/p2p`` suffix)."""
        addrs = self.host.get_transport_addrs()
        if not addrs:
            raise RuntimeError("py-libp2p host is not listening")
        return str(addrs[0])

    @property
    def p2p_addr(self) -> str:
        """``listen_addr`` + ``/p2p/<peer id>``: what a dialer needs."""
        return f"{self.listen_addr}/p2p/{self.peer_id}"

    @property
    def listen_port(self) -> int:
        return int(multiaddr.Multiaddr(self.listen_addr).value_for_protocol("tcp"))

    @property
    def public_key(self) -> bytes:
        """Serialized libp2p ``PublicKey`` protobuf of this host."""
        return self.host.get_public_key().serialize()

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()]

    # -- connections and streams ------------------------------------------------------------

    async def connect(self, addr: str, peer_id: str | None = None) -> str:
        """Dial ``addr`` (``/ip4/.../tcp/...`` or with ``/p2p/<id>``); return the remote PeerId.

        Returns once the connection is upgraded (mss, Noise, mss, yamux) and py-libp2p is ready to
        open streams; an existing connection to that peer is reused. A dial whose Noise handshake
        proves a different PeerId fails. Failures raise ``SwarmException`` (one attempt, see
        ``dial_retries``). Unlike plain py-libp2p, a previous failure or a previously known
        address of the same peer does not affect this dial (see module docstring).
        """
        maddr: Any = multiaddr.Multiaddr(addr)
        in_addr = _p2p_component(maddr)
        if in_addr is not None:
            maddr = maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{in_addr}"))
            if peer_id is not None and peer_id != in_addr:
                raise ValueError(f"peer id {peer_id} does not match {addr}")
            peer_id = in_addr
        if peer_id is None:
            raise ValueError("need a peer id (argument or /p2p/ component)")
        pid = ID.from_base58(peer_id)
        if pid not in self.host.get_connected_peers():
            # py dials at most one TCP address per peer, preferring what the peerstore already
            # holds (kept 120 s), and refuses for 60 s to redial a peer whose last dial failed.
            self.host.get_peerstore().clear_addrs(pid)
            network = self.host.get_network()
            if isinstance(network, Swarm):
                network._negative_peer_cache.evict(str(pid))
        with trio.fail_after(self.default_timeout):
            await self.host.connect(PeerInfo(pid, [maddr]))
        return peer_id

    async def disconnect(self, peer_id: str) -> None:
        await self.host.disconnect(ID.from_base58(peer_id))

    async def open_stream(self, peer_id: str, *protocols: str) -> Libp2pStream:
        """Open a yamux stream on the existing connection and negotiate one of ``protocols``."""
        with trio.fail_after(self.default_timeout):
            stream = await self.host.new_stream(
                ID.from_base58(peer_id), [TProtocol(p) for p in protocols]
            )
        protocol = stream.get_protocol()
        return Libp2pStream(stream, str(protocol) if protocol is not None else protocols[0])

    def set_stream_handler(
        self, protocol: str, handler: Callable[[INetStream], Awaitable[None]]
    ) -> None:
        self.host.set_stream_handler(TProtocol(protocol), handler)

    # -- echo -------------------------------------------------------------------------------

    async def open_echo_stream(self, peer_id: str) -> Libp2pStream:
        return await self.open_stream(peer_id, ECHO_PROTOCOL)

    async def echo(self, peer_id: str, data: bytes) -> bytes:
        """Send ``data`` on a new ``/echo/1.0.0`` stream, half-close, return all bytes echoed back.

        Writing and reading run concurrently: the echo side can only write as fast as we read,
        and py-libp2p aborts a writer whose send window stays at zero for 5 s.
        """
        received = bytearray()
        with trio.fail_after(self.default_timeout):
            stream = await self.open_echo_stream(peer_id)

            async def reader() -> None:
                received.extend(await stream.receive_until_eof())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                view = memoryview(data)
                for start in range(0, len(data), _ECHO_WRITE_CHUNK):
                    await stream.send_all(bytes(view[start : start + _ECHO_WRITE_CHUNK]))
                await stream.close_write()
        return bytes(received)

    async def wait_echo_streams(self, served: int) -> None:
        """Wait until ``served`` inbound echo streams have ended well. The remote sees our
        FIN (and its echo returns) before py's ``close()`` returns here, so the counter
        may lag what the remote already knows."""
        while self.echo_streams_served < served:
            await self._echo_ended.wait()

    def _echo_stream_ended(self, *, ok: bool) -> None:
        if ok:
            self.echo_streams_served += 1
        else:
            self.echo_streams_failed += 1
        self._echo_ended.set()
        self._echo_ended = trio.Event()

    async def _serve_echo(self, stream: INetStream) -> None:
        try:
            while True:
                try:
                    data = await stream.read(READ_SIZE)
                except StreamEOF:
                    break
                await stream.write(data)
            await stream.close()
        except STREAM_ERRORS:
            # Reset by the remote, connection gone, or py's writer gave up after 5 s at a zero
            # send window (that last one sends nothing on the wire by itself). Reset so the
            # remote sees RST rather than a stream that silently stops; an exception escaping
            # here would tear down py-libp2p's per-connection nursery.
            with contextlib.suppress(*STREAM_ERRORS):
                await stream.reset()
            self._echo_stream_ended(ok=False)
            return
        self._echo_stream_ended(ok=True)

    # -- ping -------------------------------------------------------------------------------

    async def ping(self, peer_id: str, count: int = 1) -> list[float]:
        """Run ``count`` pings on one ``/ipfs/ping/1.0.0`` stream; return RTTs in seconds.

        Raises ``ValueError`` if a pong differs from its ping.
        """
        rtts: list[float] = []
        with trio.fail_after(self.default_timeout + count):
            stream = await self.open_stream(peer_id, PING_PROTOCOL)
            for _ in range(count):
                payload = secrets.token_bytes(PING_SIZE)
                start = time.perf_counter()
                await stream.send_all(payload)
                pong = await stream.receive_exactly(PING_SIZE)
                rtts.append(time.perf_counter() - start)
                if pong != payload:
                    await stream.reset()
                    raise ValueError(f"ping payload mismatch: {payload.hex()} != {pong.hex()}")
            await stream.close_write()
            # The responder answers our FIN with its own; wait for it so the stream ends cleanly.
            await stream.receive_until_eof()
        return rtts

    # -- identify ---------------------------------------------------------------------------

    async def identify(self, peer_id: str) -> IdentifyInfo:
        """Request ``/ipfs/id/1.0.0`` from ``peer_id`` and decode the answer."""
        with trio.fail_after(self.default_timeout):
            stream = await self.open_stream(peer_id, IDENTIFY_PROTOCOL)
            raw = await stream.receive_until_eof()
            await stream.aclose()
        msg = parse_identify_response(raw)
        return IdentifyInfo(
            protocol_version=msg.protocol_version,
            agent_version=msg.agent_version,
            public_key=bytes(msg.public_key),
            listen_addrs=tuple(str(multiaddr.Multiaddr(a)) for a in msg.listen_addrs),
            observed_addr=(
                str(multiaddr.Multiaddr(msg.observed_addr)) if msg.observed_addr else None
            ),
            protocols=tuple(msg.protocols),
            has_signed_peer_record=msg.HasField("signedPeerRecord"),
        )


def _p2p_component(maddr: Any) -> str | None:
    for proto in maddr.protocols():
        if proto.name == "p2p":
            return str(maddr.value_for_protocol("p2p"))
    return None


def _peer_id_from_public_key(public_key: bytes) -> str:
    return ID.from_pubkey(deserialize_public_key(public_key)).to_base58()


def _new_noise_yamux_host(
    key_seed: bytes | None, max_connections_per_peer: int, dial_retries: int
) -> IHost:
    key_pair = create_ed25519_key_pair(key_seed)
    # Passing sec_opt/muxer_opt replaces py-libp2p's defaults (noise, tls, secio, plaintext /
    # yamux, mplex) instead of adding to them: only /noise and /yamux/1.0.0 are offered/accepted.
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=max_connections_per_peer),
    )
    network = host.get_network()
    if isinstance(network, Swarm):  # new_host has no retry_config parameter; new_swarm does
        network.retry_config = RetryConfig(max_retries=dial_retries)
    return host


@asynccontextmanager
async def open_libp2p_peer(
    *,
    listen_addr: str = "/ip4/127.0.0.1/tcp/0",
    key_seed: bytes | None = None,
    max_connections_per_peer: int = 1,
    dial_retries: int = 0,
    default_timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[Libp2pPeer]:
    """Run a Noise+Yamux py-libp2p host listening on ``listen_addr``; yield it once it listens.

    ``key_seed`` (32 bytes) makes the Ed25519 identity, hence the PeerId, deterministic.
    ``max_connections_per_peer`` and ``dial_retries`` default to 1 and 0 instead of
    py-libp2p's 3 and 3 (see module docstring); neither changes anything on the wire.
    ``default_timeout`` bounds each helper operation (``trio.TooSlowError``).
    On exit all connections are closed (yamux GoAway(0), then TCP close), bounded by 5 s.
    """
    host = _new_noise_yamux_host(key_seed, max_connections_per_peer, dial_retries)
    peer = Libp2pPeer(host, default_timeout=default_timeout)
    host.set_stream_handler(ECHO_PROTOCOL, peer._serve_echo)
    async with host.run([multiaddr.Multiaddr(listen_addr)]):
        try:
            yield peer
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await host.close()


async def serve_libp2p_peer(
    *,
    listen_addr: str = "/ip4/127.0.0.1/tcp/0",
    key_seed: bytes | None = None,
    task_status: trio.TaskStatus[Libp2pPeer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Nursery flavour: ``peer = await nursery.start(serve_libp2p_peer)``; runs until cancelled."""
    async with open_libp2p_peer(listen_addr=listen_addr, key_seed=key_seed) as peer:
        task_status.started(peer)
        await trio.sleep_forever()
