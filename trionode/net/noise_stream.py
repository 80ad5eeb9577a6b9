"""NoiseStream: an encrypted trio Stream over any transport stream, as trio's SSLStream is.

`noise_handshake()` runs the libp2p Noise XX handshake on a stream that has already agreed
on `/noise` by multistream-select and returns a NoiseStream plus the authenticated remote
identity. The stream's sends and receives may run in two different tasks at once (yamux
has a reader task and a writer task), but two concurrent sends or two concurrent receives
are a bug: trio's ConflictDetector turns them into BusyResourceError instead of garbage.
"""

from __future__ import annotations

import trio

from trionode.errors import RemoteProtocolError
from trionode.net.chunks import ChunkQueue, checked_max_bytes
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.noise import HandshakeComplete, NoiseHandshake, NoiseTransport

RECEIVE_SIZE = 256 * 1024


class NoiseProtocolError(RemoteProtocolError):
    """The peer's transport frames are malformed or fail authentication (garbage on the
    wire, a forged or replayed frame): the Noise layer, not the protocol above it, broke.
    """


class NoiseStream(trio.abc.HalfCloseableStream):
    """Plaintext in and out; Noise transport frames on the wire.

    Noise has no close message of its own, so `send_eof` half-closes the transport below
    (TCP FIN), which the peer reads as the end of the encrypted stream.
    """

    def __init__(
        self, transport_stream: trio.abc.Stream, noise: NoiseTransport, remote: HandshakeComplete
    ) -> None:
        self.transport_stream = transport_stream
        self.remote = remote
        self._noise = noise
        self._plaintext = ChunkQueue()
        self._sending = False
        self._receiving = False
        self._eof = False
        self._closed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def remote_peer_id(self) -> PeerId:
        return self.remote.remote_peer_id

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this NoiseStream")
        self._sending = True
        try:
            if not data:
                # An empty Noise frame means EOF to py-libp2p: never send one.
                if self._closed:
                    raise trio.ClosedResourceError("NoiseStream is closed")
                await trio.lowlevel.checkpoint()
                return
            frames = self._noise.encrypt(data)
            self.bytes_sent += len(frames)
            await self.transport_stream.send_all(frames)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this NoiseStream")
        self._sending = True
        try:
            await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        max_bytes = checked_max_bytes(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this NoiseStream")
        self._receiving = True
        try:
            awaited = False
            try:
                while True:
                    # Frames may already be buffered before we read anything: the initiator
                    # pipelines its first transport frame with msg3, so into_transport()
                    # hands us ciphertext the socket will never deliver again.
                    while (message := self._noise.next_message()) is not None:
                        self._plaintext.append(message)
                    if self._plaintext or self._eof:
                        break
                    ciphertext = await self.transport_stream.receive_some(RECEIVE_SIZE)
                    awaited = True
                    self.bytes_received += len(ciphertext)
                    self._noise.receive_data(ciphertext)
                    if not ciphertext:
                        self._eof = True
            except RemoteProtocolError as exc:
                raise NoiseProtocolError(str(exc)) from None
            if not awaited:
                await trio.lowlevel.checkpoint()  # every receive is a checkpoint
            return self._plaintext.take(max_bytes)
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this NoiseStream")
        if self._closed:
            raise trio.ClosedResourceError("NoiseStream is closed")
        if not isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
            raise trio.BrokenResourceError("the transport below cannot half-close")
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        await self.transport_stream.aclose()


async def noise_handshake(
    stream: trio.abc.Stream,
    identity: PrivateKey,
    *,
    initiator: bool,
    expected_peer_id: PeerId | None = None,
) -> NoiseStream:
    """Authenticate and encrypt `stream`. The caller bounds it with a timeout.

    Raises RemoteProtocolError when the peer breaks the protocol, fails authentication or
    turns out not to be `expected_peer_id`.
    """
    handshake = NoiseHandshake(identity, initiator=initiator, expected_peer_id=expected_peer_id)
    while True:
        event = handshake.next_event()  # processes what arrived, queueing our answer
        out = handshake.data_to_send()
        if out:
            await stream.send_all(out)
        if event is not None:
            return NoiseStream(stream, handshake.into_transport(), event)
        data = await stream.receive_some(RECEIVE_SIZE)
        handshake.receive_data(data)
        if not data:
            # next_event raises the precise error for EOF mid-handshake.
            handshake.next_event()
            raise RemoteProtocolError("peer closed the connection during the Noise handshake")
