"""Sans-IO Yamux (``/yamux/1.0.0``): stream multiplexing over one reliable byte stream.

Theory of operation
-------------------
:class:`YamuxConnection` owns no socket, no clock and no task. The driver feeds it the
bytes it read (``receive_data``), pulls events (``next_event``), writes what it is given
(``data_to_send``/``chunks_to_send``), and calls the command methods (``open_stream``,
``send_data``, ``close_stream``, ``reset_stream``, ``ping``, ``go_away``) on behalf of the
application. Time is a parameter: methods that care take ``now`` (seconds, any monotonic
origin) and ``get_timer()``/``handle_timer(now)`` drive keepalive pings.

Wire format: every frame starts with a 12-byte header ``>BBHII`` = version (0), type
(Data, WindowUpdate, Ping, GoAway), flags (SYN, ACK, FIN, RST), stream id, length. Only
Data frames carry a body (``length`` bytes); for WindowUpdate the length is a window
*delta*, for Ping an opaque value, for GoAway an error code.

Parsing is eager and incremental: ``receive_data`` parses every complete header at once,
and streams Data bodies out as :class:`DataReceived` events as their bytes arrive, so the
only bytes ever kept between calls are up to 11 bytes of an incomplete header. A body
is copied exactly once (out of the caller's buffer into the event).

Flow control, receive side. Per stream we keep

* ``recv_window``  -- the window we have committed to (256 KiB to start, grows),
* ``recv_credit``  -- bytes the peer may still send: what we granted minus what arrived,
* ``recv_inflight`` -- bytes a Data header announced that have not arrived yet,
* ``recv_unacked`` -- bytes handed out in events that the application has not yet
  acknowledged with ``acknowledge_received``.

``recv_credit + recv_inflight + recv_unacked <= recv_window`` always holds; the difference
is credit the application has released but we have not yet re-granted. Once that reaches
half of ``recv_window`` -- the window actually granted, never a larger target, which is
what keeps the threshold deadlock-free -- a WindowUpdate re-grants it. Data beyond
``recv_credit`` is a window violation: :class:`RemoteProtocolError`, and a GoAway(1) is
queued for the driver to flush before it closes the transport. Because bytes are only
re-granted when the application acknowledges them, a stream the application stops
reading stalls on its own, while the driver keeps calling ``receive_data`` for the others.

Auto-tuning: when the update is sent less than ``autotune_rtt_factor`` round trips after
the previous one (the window, not the reader, is the bottleneck), the window doubles, up
to ``max_window`` per stream and ``max_connection_window`` for all streams together. The
round-trip time comes from pings, and is never taken to be below ``autotune_min_rtt``.

Flow control, send side: ``send_window`` starts at 256 KiB and grows with every delta
received. ``send_data`` queues at most that much, cut into Data frames of at most
``max_data_frame`` body bytes (by default one yamux frame fills one Noise frame), and
returns the count; the driver waits for :class:`WindowUpdated` before sending the rest.

Streams: we open odd ids if we are the client (the dialer), even ones otherwise; the
first frame of a stream carries SYN, the peer's first frame back carries ACK. We send SYN
at once (as js-libp2p does: ``WindowUpdate{SYN}``); our ACK rides on the first frame we
send on that stream, or goes out as a bare ``WindowUpdate{ACK}`` at the next
``data_to_send``. FIN half-closes one direction; the stream's state is freed when both
FINs have passed or on RST. Frames for unknown (e.g. already freed) streams are ignored.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.yamux_events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    YamuxEvent,
)

__all__ = [
    "DEFAULT_WINDOW",
    "FLAG_ACK",
    "FLAG_FIN",
    "FLAG_RST",
    "FLAG_SYN",
    "GO_AWAY_INTERNAL_ERROR",
    "GO_AWAY_NORMAL",
    "GO_AWAY_PROTOCOL_ERROR",
    "HEADER",
    "HEADER_SIZE",
    "MAX_DATA_FRAME",
    "PROTOCOL_ID",
    "TYPE_DATA",
    "TYPE_GO_AWAY",
    "TYPE_PING",
    "TYPE_WINDOW_UPDATE",
    "ConnectionTerminated",
    "DataReceived",
    "GoAwayReceived",
    "PingReceived",
    "PongReceived",
    "StreamAccepted",
    "StreamClosedError",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "StreamStatistics",
    "WindowUpdated",
    "YamuxConfig",
    "YamuxConnection",
    "YamuxEvent",
    "YamuxStatistics",
]

PROTOCOL_ID: Final = "/yamux/1.0.0"

HEADER: Final = struct.Struct(">BBHII")
"""version, type, flags, stream id, length -- all big-endian."""
HEADER_SIZE: Final = HEADER.size

VERSION: Final = 0

TYPE_DATA: Final = 0
TYPE_WINDOW_UPDATE: Final = 1
TYPE_PING: Final = 2
TYPE_GO_AWAY: Final = 3

FLAG_SYN: Final = 0x1
FLAG_ACK: Final = 0x2
FLAG_FIN: Final = 0x4
FLAG_RST: Final = 0x8

GO_AWAY_NORMAL: Final = 0
GO_AWAY_PROTOCOL_ERROR: Final = 1
GO_AWAY_INTERNAL_ERROR: Final = 2

DEFAULT_WINDOW: Final = 256 * 1024
"""The receive window both ends assume for a new stream before any WindowUpdate."""

NOISE_MAX_PLAINTEXT: Final = 65535 - 16
MAX_DATA_FRAME: Final = NOISE_MAX_PLAINTEXT - HEADER_SIZE
"""65507: the largest body for which header + body fill exactly one Noise frame."""

MAX_STREAM_ID: Final = 0xFFFFFFFF
_MAX_U32: Final = 0xFFFFFFFF
_MAX_ID_GAPS: Final = 1024


class StreamClosedError(LocalProtocolError):
    """The stream no longer exists: the peer reset it, it closed fully, or the connection ended.

    Distinct from a plain :class:`LocalProtocolError` (a bug on our side, e.g. sending after
    our own FIN) because a driver may race with a reset it has not processed yet.
    """


@dataclass(frozen=True, slots=True)
class YamuxConfig:
    """Limits and tuning for one connection. Both ends of a test pair may differ."""

    initial_window: int = DEFAULT_WINDOW
    """Receive window granted on each new stream; anything above 256 KiB rides on SYN/ACK."""
    max_window: int = 16 * 1024 * 1024
    """Auto-tuning never grows one stream's receive window beyond this."""
    max_connection_window: int = 64 * 1024 * 1024
    """Auto-tuning stops once all streams' receive windows together would exceed this.

    Received data is buffered (here and in the driver) only up to each stream's window,
    so a peer can make us hold at most ``open streams * initial_window`` plus this.
    """
    max_data_frame: int = MAX_DATA_FRAME
    """Largest Data body we send (65507: one yamux frame fills one Noise frame)."""
    max_inbound_streams: int = 1000
    """Inbound streams beyond this many open at once are refused with RST and counted."""
    max_pending_outbound: int = 256
    """Streams we opened that the peer has not acknowledged yet (go-yamux's backlog)."""
    autotune: bool = True
    """Grow receive windows when the application drains them within a few round trips."""
    autotune_rtt_factor: float = 4.0
    autotune_min_rtt: float = 0.01
    """Floor for the round-trip estimate used by auto-tuning (and its value before a pong)."""
    keepalive_interval: float | None = 30.0
    """Send a ping this often (the first as soon as the clock is known); None disables."""
    ping_timeout: float | None = 20.0
    """Terminate the connection when a ping stays unanswered this long; None disables."""

    def __post_init__(self) -> None:
        if not DEFAULT_WINDOW <= self.initial_window <= self.max_window <= _MAX_U32:
            raise ValueError("need 256 KiB <= initial_window <= max_window < 4 GiB")
        if self.max_data_frame < 1:
            raise ValueError("max_data_frame must be positive")
        if self.max_inbound_streams < 0 or self.max_pending_outbound < 1:
            raise ValueError("stream limits must be positive")
        if self.keepalive_interval is not None and self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be positive or None")


@dataclass(frozen=True, slots=True)
class StreamStatistics:
    """A snapshot of one stream's state."""

    stream_id: int
    outbound: bool
    accepted: bool
    """For streams we opened: whether the peer's ACK arrived. Always true for inbound ones."""
    local_closed: bool
    remote_closed: bool
    send_window: int
    receive_window: int
    receive_credit: int
    receive_in_flight: int
    receive_unacknowledged: int


@dataclass(frozen=True, slots=True)
class YamuxStatistics:
    """A snapshot of the connection's state."""

    open_streams: int
    inbound_streams: int
    outbound_streams: int
    pending_outbound: int
    """Streams we opened that the peer has not acknowledged yet."""
    refused_streams: int
    """Inbound streams refused with RST (over the limit, or after our GoAway)."""
    receive_window_total: int
    rtt: float | None
    outstanding_pings: int
    local_go_away: bool
    remote_go_away: int | None
    terminated: bool
    bytes_to_send: int
    events_pending: int


class _Stream:
    __slots__ = (
        "accepted",
        "epoch_start",
        "freed",
        "local_closed",
        "outbound",
        "recv_credit",
        "recv_inflight",
        "recv_unacked",
        "recv_window",
        "remote_closed",
        "send_window",
        "stream_id",
    )

    def __init__(
        self, stream_id: int, *, outbound: bool, recv_window: int, now: float | None
    ) -> None:
        self.stream_id = stream_id
        self.outbound = outbound
        self.accepted = not outbound
        self.local_closed = False
        self.remote_closed = False
        self.freed = False
        self.send_window = DEFAULT_WINDOW
        self.recv_window = recv_window
        self.recv_credit = recv_window
        self.recv_inflight = 0
        self.recv_unacked = 0
        self.epoch_start = now


class _RemoteIds:
    """Which of the peer's stream ids have been used, so a reused id can be spotted.

    Ids normally arrive in increasing order, but concurrent openers (go-yamux) may put
    SYNs on the wire slightly out of order, so this is not a simple high-water mark:
    everything at or below ``floor`` is used, plus the ids in ``above``. If the peer
    leaves too many gaps, they are given up on (treated as used) to bound memory.
    """

    __slots__ = ("above", "floor")

    def __init__(self, first: int) -> None:
        self.floor = first - 2
        self.above: set[int] = set()

    def seen(self, stream_id: int) -> bool:
        return stream_id <= self.floor or stream_id in self.above

    def add(self, stream_id: int) -> bool:
        """Record ``stream_id``; False if it was used before."""
        if self.seen(stream_id):
            return False
        above = self.above
        if stream_id == self.floor + 2:
            floor = stream_id
            while floor + 2 in above:
                floor += 2
                above.discard(floor)
            self.floor = floor
        else:
            above.add(stream_id)
            if len(above) > _MAX_ID_GAPS:
                self.floor = max(above)
                above.clear()
        return True


class YamuxConnection:
    """One end of a Yamux session, as a sans-IO state machine.

    Args:
        is_client: True for the side that dialed the underlying connection; it opens odd
            stream ids, the listener even ones.
        config: limits and tuning; defaults to :class:`YamuxConfig()`.
    """

    def __init__(self, *, is_client: bool, config: YamuxConfig | None = None) -> None:
        self._config = config = config if config is not None else YamuxConfig()
        self._is_client = is_client
        self._local_parity = 1 if is_client else 0
        self._next_stream_id = 1 if is_client else 2
        self._remote_ids = _RemoteIds(2 if is_client else 1)
        self._streams: dict[int, _Stream] = {}
        self._events: deque[YamuxEvent] = deque()
        self._out: list[bytes] = []
        self._pending_acks: dict[int, None] = {}
        # Parser state: a partial header, and the Data body being streamed out.
        self._rbuf = bytearray()
        self._body_left = 0
        self._body_stream: _Stream | None = None
        self._body_flags = 0
        # Counters.
        self._inbound_count = 0
        self._outbound_count = 0
        self._pending_outbound = 0
        self._refused_streams = 0
        self._recv_window_total = 0
        # Session state.
        self._local_go_away = False
        self._remote_go_away: int | None = None
        self._terminated = False
        # Time, pings, keepalive.
        self._now: float | None = None
        self._receive_now: float | None = None  # `now` given to the current receive_data()
        self._rtt: float | None = None
        self._pings: dict[int, float | None] = {}
        self._next_ping = 0
        self._keepalive_at: float | None = None
        self._initial_extra = config.initial_window - DEFAULT_WINDOW
        self._max_data_frame = config.max_data_frame

    # ------------------------------------------------------------------ introspection

    @property
    def is_client(self) -> bool:
        return self._is_client

    @property
    def config(self) -> YamuxConfig:
        return self._config

    @property
    def terminated(self) -> bool:
        """True once the connection failed, hit EOF or timed out; nothing more will happen."""
        return self._terminated

    @property
    def refused_streams(self) -> int:
        """Inbound streams refused so far (``statistics().refused_streams``, without building
        the whole snapshot: a driver reads it after every chunk it feeds)."""
        return self._refused_streams

    @property
    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` would return anything: a driver wakes its writer
        only then (most reads and window acknowledgements queue no frame)."""
        return bool(self._out or self._pending_acks)

    def statistics(self) -> YamuxStatistics:
        return YamuxStatistics(
            open_streams=len(self._streams),
            inbound_streams=self._inbound_count,
            outbound_streams=self._outbound_count,
            pending_outbound=self._pending_outbound,
            refused_streams=self._refused_streams,
            receive_window_total=self._recv_window_total,
            rtt=self._rtt,
            outstanding_pings=len(self._pings),
            local_go_away=self._local_go_away,
            remote_go_away=self._remote_go_away,
            terminated=self._terminated,
            bytes_to_send=sum(map(len, self._out)) + HEADER_SIZE * len(self._pending_acks),
            events_pending=len(self._events),
        )

    def stream_ids(self) -> list[int]:
        """Ids of the streams that still have state, in the order they were created."""
        return list(self._streams)

    def stream_statistics(self, stream_id: int) -> StreamStatistics:
        stream = self._lookup(stream_id)
        return StreamStatistics(
            stream_id=stream_id,
            outbound=stream.outbound,
            accepted=stream.accepted,
            local_closed=stream.local_closed,
            remote_closed=stream.remote_closed,
            send_window=stream.send_window,
            receive_window=stream.recv_window,
            receive_credit=stream.recv_credit,
            receive_in_flight=stream.recv_inflight,
            receive_unacknowledged=stream.recv_unacked,
        )

    def send_window(self, stream_id: int) -> int:
        """How many bytes ``send_data`` would accept on this stream right now.

        Raises:
            StreamClosedError: the stream is gone (reset, fully closed, connection over).
            LocalProtocolError: the stream never existed, or we already sent FIN on it.
        """
        return self._sendable(stream_id).send_window

    # ------------------------------------------------------------------ receiving

    def receive_data(
        self, data: bytes | bytearray | memoryview, *, now: float | None = None
    ) -> None:
        """Feed bytes read from the transport; ``b""`` means the transport hit EOF.

        Events become available from ``next_event()``; replies (ping ACKs, window
        updates, RSTs for refused streams) from ``data_to_send()``.

        Raises:
            RemoteProtocolError: the peer broke the protocol. A GoAway(protocol error) has
                been queued in ``data_to_send()``; the connection is terminated and the
                driver should flush that and close the transport.
            LocalProtocolError: called after the connection terminated.
        """
        if now is not None:
            self._advance_clock(now)
        if self._terminated:
            raise LocalProtocolError("receive_data() after the connection terminated")
        self._receive_now = now
        try:
            if len(data):
                self._parse(data)
            else:
                self._receive_eof()
        except RemoteProtocolError:
            self._fail(GO_AWAY_PROTOCOL_ERROR)
            raise

    def next_event(self) -> YamuxEvent | None:
        """The oldest pending event, or None when the driver should read more data."""
        events = self._events
        return events.popleft() if events else None

    def _receive_eof(self) -> None:
        if self._rbuf or self._body_left:
            raise RemoteProtocolError("connection closed in the middle of a frame")
        self._terminate("connection closed by peer")

    def _parse(self, data: bytes | bytearray | memoryview) -> None:
        # A body that spans the whole of an immutable `data` is handed out without a copy.
        whole = data if type(data) is bytes else None
        with memoryview(data) as view:
            end = len(view)
            pos = 0
            rbuf = self._rbuf
            if rbuf:
                # Complete the pending partial header from the front of `data`.
                need = HEADER_SIZE - len(rbuf)
                if end < need:
                    rbuf += view
                    return
                rbuf += view[:need]
                pos = need
                header = HEADER.unpack(rbuf)
                rbuf.clear()
                self._on_header(*header)
            unpack_from = HEADER.unpack_from
            on_header = self._on_header
            while True:
                if self._body_left:
                    if pos >= end:
                        break
                    pos = self._on_body(view, pos, end, whole)
                    continue
                if end - pos < HEADER_SIZE:
                    break
                version, ftype, flags, stream_id, length = unpack_from(view, pos)
                pos += HEADER_SIZE
                if version == VERSION and ftype == TYPE_DATA and not flags and length:
                    # Fast path: a plain Data frame on an established stream.
                    stream = self._streams.get(stream_id)
                    if (
                        stream is not None
                        and not stream.remote_closed
                        and length <= stream.recv_credit
                    ):
                        stream.recv_credit -= length
                        stream.recv_inflight += length
                        self._body_left = length
                        self._body_stream = stream
                        self._body_flags = 0
                        continue
                on_header(version, ftype, flags, stream_id, length)
            if pos < end:
                rbuf += view[pos:]

    def _on_body(self, view: memoryview, pos: int, end: int, whole: bytes | None) -> int:
        left = self._body_left
        take = min(left, end - pos)
        left -= take
        self._body_left = left
        stream = self._body_stream
        if stream is not None and not stream.freed:
            chunk = whole if take == end and whole is not None else view[pos : pos + take].tobytes()
            stream.recv_inflight -= take
            stream.recv_unacked += take
            self._events.append(DataReceived(stream.stream_id, chunk))
            if not left:
                self._body_stream = None
                if self._body_flags:
                    self._on_end_flags(stream, self._body_flags)
        elif not left:
            self._body_stream = None
        return pos + take

    def _on_header(self, version: int, ftype: int, flags: int, stream_id: int, length: int) -> None:
        if version != VERSION:
            raise RemoteProtocolError(f"unsupported yamux version {version}")
        if ftype == TYPE_DATA:
            self._on_data_header(flags, stream_id, length)
        elif ftype == TYPE_WINDOW_UPDATE:
            self._on_window_update(flags, stream_id, length)
        elif ftype == TYPE_PING:
            self._on_ping(flags, stream_id, length)
        elif ftype == TYPE_GO_AWAY:
            self._on_go_away(stream_id, length)
        else:
            raise RemoteProtocolError(f"unknown yamux frame type {ftype}")

    def _on_data_header(self, flags: int, stream_id: int, length: int) -> None:
        if stream_id == 0:
            raise RemoteProtocolError("Data frame on stream 0")
        stream = self._stream_for_frame(flags, stream_id)
        if stream is None:
            # A late frame for a stream we freed (or refused): no window left to check it
            # against, but nothing we ever granted exceeds max_window.
            if length > self._config.max_window:
                raise RemoteProtocolError(f"{length}-byte Data frame on unknown stream {stream_id}")
            self._body_left = length
            self._body_stream = None
            return
        if length:
            if stream.remote_closed:
                raise RemoteProtocolError(f"data on stream {stream_id} after its FIN")
            if length > stream.recv_credit:
                raise RemoteProtocolError(
                    f"stream {stream_id}: {length}-byte Data frame exceeds the receive "
                    f"window ({stream.recv_credit} bytes granted)"
                )
            stream.recv_credit -= length
            stream.recv_inflight += length
            self._body_left = length
            self._body_stream = stream
            self._body_flags = flags & (FLAG_FIN | FLAG_RST)
        elif flags & (FLAG_FIN | FLAG_RST):
            self._on_end_flags(stream, flags)

    def _on_window_update(self, flags: int, stream_id: int, delta: int) -> None:
        if stream_id == 0:
            raise RemoteProtocolError("WindowUpdate frame on stream 0")
        stream = self._stream_for_frame(flags, stream_id)
        if stream is None:
            return
        if delta:
            stream.send_window += delta
            if not flags & FLAG_SYN and not stream.local_closed:
                self._events.append(WindowUpdated(stream_id))
        if flags & (FLAG_FIN | FLAG_RST):
            self._on_end_flags(stream, flags)

    def _stream_for_frame(self, flags: int, stream_id: int) -> _Stream | None:
        """The stream a Data/WindowUpdate frame is for, after handling SYN and ACK."""
        if flags & FLAG_SYN:
            return self._on_syn(stream_id)
        stream = self._streams.get(stream_id)
        if stream is not None and flags & FLAG_ACK and not stream.accepted:
            stream.accepted = True
            self._pending_outbound -= 1
            self._events.append(StreamAccepted(stream_id))
        return stream

    def _on_syn(self, stream_id: int) -> _Stream | None:
        if stream_id & 1 == self._local_parity:
            raise RemoteProtocolError(f"peer opened stream {stream_id}, which has our parity")
        if not self._remote_ids.add(stream_id):
            raise RemoteProtocolError(f"peer reused stream id {stream_id}")
        if self._local_go_away or self._inbound_count >= self._config.max_inbound_streams:
            self._refused_streams += 1
            self._queue(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
            return None
        window = self._config.initial_window
        stream = _Stream(stream_id, outbound=False, recv_window=window, now=self._now)
        self._streams[stream_id] = stream
        self._inbound_count += 1
        self._recv_window_total += window
        self._events.append(StreamOpened(stream_id))
        if self._initial_extra:
            self._queue(TYPE_WINDOW_UPDATE, FLAG_ACK, stream_id, self._initial_extra)
        else:
            self._pending_acks[stream_id] = None
        return stream

    def _on_end_flags(self, stream: _Stream, flags: int) -> None:
        if flags & FLAG_FIN and not stream.remote_closed:
            stream.remote_closed = True
            self._events.append(StreamEnded(stream.stream_id))
            if stream.local_closed:
                self._free(stream)
        if flags & FLAG_RST and not stream.freed:
            self._free(stream)
            self._events.append(StreamReset(stream.stream_id))

    def _on_ping(self, flags: int, stream_id: int, opaque: int) -> None:
        if stream_id != 0:
            raise RemoteProtocolError(f"Ping frame on stream {stream_id}")
        if flags == FLAG_SYN:
            self._queue(TYPE_PING, FLAG_ACK, 0, opaque)
            self._events.append(PingReceived(opaque))
        elif flags == FLAG_ACK:
            if opaque not in self._pings:
                return  # unsolicited or duplicate pong: harmless, ignore
            sent = self._pings.pop(opaque)
            now = self._receive_now
            rtt = None
            if sent is not None and now is not None:
                rtt = self._rtt = max(0.0, now - sent)
            self._events.append(PongReceived(opaque, rtt))
        else:
            raise RemoteProtocolError(f"Ping frame with flags {flags:#x}")

    def _on_go_away(self, stream_id: int, code: int) -> None:
        if stream_id != 0:
            raise RemoteProtocolError(f"GoAway frame on stream {stream_id}")
        if self._remote_go_away is None:
            self._remote_go_away = code
            self._events.append(GoAwayReceived(code))

    # ------------------------------------------------------------------ commands

    def open_stream(self) -> int:
        """Open a stream (queues ``WindowUpdate{SYN}``); data may follow at once.

        Raises:
            LocalProtocolError: after a GoAway either way, when ``max_pending_outbound``
                streams await their ACK, when ids are exhausted, or after termination.
        """
        self._check_alive()
        if self._local_go_away:
            raise LocalProtocolError("open_stream() after go_away()")
        if self._remote_go_away is not None:
            raise LocalProtocolError("open_stream() after the peer sent GoAway")
        if self._pending_outbound >= self._config.max_pending_outbound:
            raise LocalProtocolError(
                f"{self._pending_outbound} opened streams still await the peer's ACK"
            )
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted")
        self._next_stream_id = stream_id + 2
        window = self._config.initial_window
        stream = _Stream(stream_id, outbound=True, recv_window=window, now=self._now)
        self._streams[stream_id] = stream
        self._outbound_count += 1
        self._pending_outbound += 1
        self._recv_window_total += window
        self._queue(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, self._initial_extra)
        return stream_id

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the stream's send window allows.

        Returns:
            How many bytes (a prefix of ``data``) were queued. When it is less than
            ``len(data)``, wait for :class:`WindowUpdated` on this stream and send the rest.

        Raises:
            StreamClosedError: the stream is gone (reset, fully closed, connection over).
            LocalProtocolError: unknown stream id, or we already sent FIN on it.
        """
        stream = self._sendable(stream_id)
        with memoryview(data) as view:
            total = view.nbytes
            count = min(total, stream.send_window)
            if count <= 0:
                return 0
            stream.send_window -= count
            flags = self._take_ack(stream_id)
            pack = HEADER.pack
            out = self._out
            max_frame = self._max_data_frame
            if count <= max_frame:
                body = data if count == total and isinstance(data, bytes) else view[:count]
                out.append(pack(VERSION, TYPE_DATA, flags, stream_id, count) + body)
                return count
            for offset in range(0, count, max_frame):
                size = min(max_frame, count - offset)
                header = pack(VERSION, TYPE_DATA, flags, stream_id, size)
                out.append(header + view[offset : offset + size])
                flags = 0
            return count

    def close_stream(self, stream_id: int) -> None:
        """Half-close: send FIN, after which ``send_data`` on this stream is an error.

        Idempotent, and a no-op on a stream that is already gone (e.g. reset by the peer).

        Raises:
            LocalProtocolError: the stream id was never used.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_existed(stream_id)
            return
        if stream.local_closed:
            return
        stream.local_closed = True
        flags = FLAG_FIN | self._take_ack(stream_id)
        self._queue(TYPE_WINDOW_UPDATE, flags, stream_id, 0)
        if stream.remote_closed:
            self._free(stream)

    def reset_stream(self, stream_id: int) -> None:
        """Abort both directions with RST and forget the stream at once.

        Data still arriving for it is discarded. A no-op on a stream that is already gone.

        Raises:
            LocalProtocolError: the stream id was never used.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_existed(stream_id)
            return
        self._queue(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
        self._free(stream)

    def acknowledge_received(self, stream_id: int, count: int, *, now: float | None = None) -> None:
        """Tell the connection the application consumed ``count`` received bytes.

        This returns receive window to the peer (a WindowUpdate once half the window is
        free) and, given ``now``, lets auto-tuning grow the window. A no-op on a stream
        that is already gone.

        Raises:
            LocalProtocolError: ``count`` is negative or more than was delivered and not
                yet acknowledged, or the stream id was never used.
        """
        if now is not None:
            self._advance_clock(now)
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._terminated:
                self._check_existed(stream_id)
            return
        if not 0 <= count <= stream.recv_unacked:
            raise LocalProtocolError(
                f"stream {stream_id}: acknowledged {count} bytes, "
                f"{stream.recv_unacked} delivered and unacknowledged"
            )
        stream.recv_unacked -= count
        if stream.remote_closed:
            return  # the peer will send nothing more: no window to return
        window = stream.recv_window
        owed = window - stream.recv_credit - stream.recv_unacked - stream.recv_inflight
        if owed * 2 < window:
            return
        config = self._config
        if config.autotune and now is not None:
            epoch_start = stream.epoch_start
            stream.epoch_start = now
            rtt = max(self._rtt or 0.0, config.autotune_min_rtt)
            if epoch_start is not None and now - epoch_start < config.autotune_rtt_factor * rtt:
                grow = min(
                    window,
                    config.max_window - window,
                    config.max_connection_window - self._recv_window_total,
                )
                if grow > 0:
                    stream.recv_window = window + grow
                    self._recv_window_total += grow
                    owed += grow
        stream.recv_credit += owed
        self._queue(TYPE_WINDOW_UPDATE, self._take_ack(stream_id), stream_id, owed)

    def ping(self, *, now: float | None = None) -> int:
        """Queue a ``Ping{SYN}``; returns its opaque value, echoed in :class:`PongReceived`.

        The round-trip time is measured if ``now`` is given here and to the
        ``receive_data`` call that delivers the answer.
        """
        self._check_alive()
        if now is not None:
            self._advance_clock(now)
        opaque = self._next_ping
        self._next_ping = (opaque + 1) & _MAX_U32
        self._pings[opaque] = now
        self._queue(TYPE_PING, FLAG_SYN, 0, opaque)
        return opaque

    def go_away(self, error_code: int = GO_AWAY_NORMAL) -> None:
        """Queue a GoAway: no new streams either way from now on; open ones may finish.

        Only the first call sends a frame; after termination this is a no-op.
        """
        if not 0 <= error_code <= _MAX_U32:
            raise LocalProtocolError(f"GoAway code {error_code} does not fit in 32 bits")
        if self._local_go_away or self._terminated:
            return
        self._local_go_away = True
        self._queue(TYPE_GO_AWAY, 0, 0, error_code)

    # ------------------------------------------------------------------ output and timers

    def data_to_send(self) -> bytes:
        """All bytes queued for the transport, in order (empty if none)."""
        if self._pending_acks:
            self._flush_acks()
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def chunks_to_send(self, max_size: int | None = None) -> list[bytes]:
        """Like ``data_to_send`` but as whole frames grouped into chunks of at most ``max_size``.

        With the defaults every chunk fits one Noise transport message (65519 bytes), so a
        Noise driver can encrypt chunk by chunk and the receiver gets whole yamux frames.
        A single frame larger than ``max_size`` (only if ``max_data_frame`` is larger) is
        a chunk of its own.
        """
        if self._pending_acks:
            self._flush_acks()
        limit = max_size if max_size is not None else self._max_data_frame + HEADER_SIZE
        chunks: list[bytes] = []
        group: list[bytes] = []
        size = 0
        for frame in self._out:
            if size + len(frame) > limit and group:
                chunks.append(group[0] if len(group) == 1 else b"".join(group))
                group = []
                size = 0
            group.append(frame)
            size += len(frame)
        if group:
            chunks.append(group[0] if len(group) == 1 else b"".join(group))
        self._out.clear()
        return chunks

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next be called, or None if nothing is scheduled."""
        if self._terminated:
            return None
        deadline = self._keepalive_at
        timeout = self._config.ping_timeout
        if timeout is not None:
            for sent in self._pings.values():
                if sent is not None:
                    expiry = sent + timeout
                    if deadline is None or expiry < deadline:
                        deadline = expiry
                    break  # insertion order: the first timed ping is the oldest
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run due timers: terminate on an unanswered ping, send a keepalive ping.

        Calling it early is harmless; call it once at start-up to start keepalives.
        """
        self._advance_clock(now)
        if self._terminated:
            return
        timeout = self._config.ping_timeout
        if timeout is not None:
            for sent in self._pings.values():
                if sent is not None:
                    if now - sent >= timeout:
                        self._terminate("ping timeout")
                        return
                    break
        interval = self._config.keepalive_interval
        if interval is not None and self._keepalive_at is not None and now >= self._keepalive_at:
            self._keepalive_at = now + interval
            self.ping(now=now)

    # ------------------------------------------------------------------ helpers

    def _queue(self, ftype: int, flags: int, stream_id: int, length: int) -> None:
        self._out.append(HEADER.pack(VERSION, ftype, flags, stream_id, length))

    def _take_ack(self, stream_id: int) -> int:
        pending = self._pending_acks
        if pending and stream_id in pending:
            del pending[stream_id]
            return FLAG_ACK
        return 0

    def _flush_acks(self) -> None:
        for stream_id in self._pending_acks:
            self._queue(TYPE_WINDOW_UPDATE, FLAG_ACK, stream_id, 0)
        self._pending_acks.clear()

    def _advance_clock(self, now: float) -> None:
        if self._now is None:
            self._now = now
            if self._config.keepalive_interval is not None and not self._terminated:
                self._keepalive_at = now  # measure the RTT right away
        elif now > self._now:
            self._now = now

    def _free(self, stream: _Stream) -> None:
        stream.freed = True
        stream_id = stream.stream_id
        del self._streams[stream_id]
        self._pending_acks.pop(stream_id, None)
        self._recv_window_total -= stream.recv_window
        if stream.outbound:
            self._outbound_count -= 1
            if not stream.accepted:
                self._pending_outbound -= 1
        else:
            self._inbound_count -= 1

    def _existed(self, stream_id: int) -> bool:
        if not 0 < stream_id <= MAX_STREAM_ID:
            return False
        if stream_id & 1 == self._local_parity:
            return stream_id < self._next_stream_id
        return self._remote_ids.seen(stream_id)

    def _check_existed(self, stream_id: int) -> None:
        if not self._existed(stream_id):
            raise LocalProtocolError(f"no stream {stream_id} was ever opened")

    def _check_alive(self) -> None:
        if self._terminated:
            raise LocalProtocolError("the connection has terminated")

    def _lookup(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._terminated or self._existed(stream_id):
                raise StreamClosedError(f"stream {stream_id} is closed")
            raise LocalProtocolError(f"no stream {stream_id} was ever opened")
        return stream

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self._lookup(stream_id)
        if stream.local_closed:
            raise LocalProtocolError(f"stream {stream_id}: send after close_stream()")
        return stream

    def _drop_state(self) -> None:
        for stream in self._streams.values():
            stream.freed = True
        self._streams.clear()
        self._pending_acks.clear()
        self._pings.clear()
        self._inbound_count = self._outbound_count = self._pending_outbound = 0
        self._recv_window_total = 0
        self._body_left = 0
        self._body_stream = None
        self._rbuf.clear()
        self._keepalive_at = None
        self._terminated = True

    def _terminate(self, reason: str) -> None:
        self._drop_state()
        self._events.append(ConnectionTerminated(reason, self._remote_go_away))

    def _fail(self, error_code: int) -> None:
        self._drop_state()
        self._queue(TYPE_GO_AWAY, 0, 0, error_code)
        self._local_go_away = True
