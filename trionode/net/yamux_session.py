"""Trio driver for the sans-IO YamuxConnection: streams as trio.abc.HalfCloseableStream.

Three tasks per session, all in the session's own nursery:

- the **reader** is the only task that receives from the transport. It feeds the machine,
  turns events into stream state and wakes whoever waits. It never writes, so it can never
  block on a peer that is itself blocked writing to us (the classic two-reader deadlock);
- the **writer** is the only task that sends: it flushes whatever the machine queued
  (data, window updates, ping replies) whenever it is woken;
- the **timer** runs the machine's keepalive ping and ping timeout on the Trio clock.

Backpressure: a stream's `send_all` queues only what its send window allows and then waits
for a WindowUpdated; the session also stops accepting data while more than
`HIGH_WATER` bytes wait for the writer, so a slow socket slows the senders down instead of
filling memory. A stream nobody reads stalls alone: its received bytes are credited back to
the peer only when the application consumes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from trionode.errors import RemoteProtocolError
from trionode.net.chunks import ChunkQueue, checked_max_bytes
from trionode.wire.yamux import (
    GO_AWAY_NORMAL,
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    PongReceived,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    YamuxConfig,
    YamuxConnection,
)

RECEIVE_SIZE = 256 * 1024
HIGH_WATER = 1024 * 1024
"""Bytes queued for the writer above which senders wait for it to catch up."""
FLUSH_TIMEOUT = 1.0
"""How long a closing session waits to get its GoAway out."""


class YamuxStream(trio.abc.HalfCloseableStream):
    """One multiplexed stream. Made by `YamuxSession.open_stream` / `accept_stream`."""

    def __init__(self, session: YamuxSession, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.protocol: str | None = None
        self._buffer = ChunkQueue()
        self._readable = trio.Event()
        self._writable = trio.Event()
        self._remote_ended = False
        self._local_ended = False
        self._reset = False
        self._closed = False
        self._sending = False
        self._receiving = False

    def __repr__(self) -> str:
        return f"<YamuxStream {self.stream_id} {self.protocol or ''}>"

    # -- called by the session's reader --------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self._buffer.append(data)
        self._readable.set()

    def _on_end(self) -> None:
        self._remote_ended = True
        self._readable.set()

    def _on_window(self) -> None:
        self._writable.set()

    def _on_reset(self) -> None:
        self._reset = True
        self._readable.set()
        self._writable.set()

    # -- trio.abc.HalfCloseableStream -----------------------------------------------------

    def _check_sendable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._local_ended:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        if self._reset or self.session.closed:
            raise trio.BrokenResourceError("stream was reset or its connection closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data)
            offset = 0
            while True:
                self._check_sendable()
                if offset < len(view):
                    self._writable = trio.Event()
                    try:
                        offset += self.session.conn.send_data(self.stream_id, view[offset:])
                    except StreamClosedError:
                        raise trio.BrokenResourceError("stream was reset") from None
                    self.session._wake_writer()  # noqa: SLF001 - the session's own stream
                if offset >= len(view):
                    break
                await self._writable.wait()
            await self.session._wait_drained()  # noqa: SLF001
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._check_sendable()
        if self.session.conn.send_window(self.stream_id) <= 0:
            self._writable = trio.Event()
            await self._writable.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._local_ended:
            return
        self._local_ended = True
        if not self._reset and not self.session.closed:
            self.session.conn.close_stream(self.stream_id)
            self.session._wake_writer()  # noqa: SLF001

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        max_bytes = checked_max_bytes(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream is closed")
                if self._buffer:
                    await trio.lowlevel.checkpoint()
                    return self._take(max_bytes)
                if self._reset:
                    raise trio.BrokenResourceError("stream was reset by the peer")
                if self._remote_ended:
                    await trio.lowlevel.checkpoint()
                    return b""
                if self.session.closed:
                    raise trio.BrokenResourceError("connection closed")
                self._readable = trio.Event()
                await self._readable.wait()
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        out = self._buffer.take(max_bytes)
        n = len(out)
        session = self.session
        if not session.closed:
            session.conn.acknowledge_received(self.stream_id, n, now=trio.current_time())
            session._wake_writer_if_needed()  # noqa: SLF001 (a window update, now and then)
        return out

    async def aclose(self) -> None:
        """Close as TCP does: the peer sees EOF (FIN) after everything we sent; if data is
        left unread, or arrives later, the stream is reset so the peer's sends fail.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        session = self.session
        session._forget(self.stream_id)  # noqa: SLF001
        if not self._reset and not session.closed:
            if self._buffer:  # data we will never read: the peer must learn it was lost
                session.conn.reset_stream(self.stream_id)
            else:
                session.conn.close_stream(self.stream_id)
            session._wake_writer()  # noqa: SLF001
        self._buffer.clear()
        self._readable.set()
        self._writable.set()
        await trio.lowlevel.checkpoint()


class YamuxSession:
    """A multiplexed connection over `transport`. Run it with `run` in a nursery."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        is_client: bool,
        config: YamuxConfig | None = None,
        accept_backlog: int = 64,
        on_stream_refused: Callable[[], None] | None = None,
    ) -> None:
        self.transport = transport
        self.conn = YamuxConnection(is_client=is_client, config=config)
        self.closed = False
        self.close_reason: str | None = None
        self.last_rtt: float | None = None
        self._streams: dict[int, YamuxStream] = {}
        self._stream_gone = trio.Event()
        """Set (and replaced by `wait_idle`) when a stream leaves `_streams`."""
        self._send_inbound, self._receive_inbound = trio.open_memory_channel[YamuxStream](
            accept_backlog
        )
        self._write_wanted = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._queued = 0
        self._timer_moved = trio.Event()
        self._timer_deadline: float | None = None
        """What the timer task sleeps until: the reader wakes it only when that changes."""
        self._writes_started = 0
        self._writes_done = 0
        self._write_done = trio.Event()
        self._finished = trio.Event()
        self.on_stream_refused = on_stream_refused
        self._refused_reported = 0
        self._cancel_scope: trio.CancelScope | None = None
        self._reader_scope: trio.CancelScope | None = None

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- public API ------------------------------------------------------------------------

    async def open_stream(self) -> YamuxStream:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.BrokenResourceError("connection closed")
        stream_id = self.conn.open_stream()
        stream = YamuxStream(self, stream_id)
        self._streams[stream_id] = stream
        self._wake_writer()
        return stream

    async def accept_stream(self) -> YamuxStream:
        """The next stream the peer opened; EndOfChannel once the session is over."""
        return await self._receive_inbound.receive()

    async def aclose(self) -> None:
        """Say GoAway, flush (briefly), and close the transport; every stream breaks."""
        try:
            if not self.closed and not self.conn.terminated:
                self.conn.go_away(GO_AWAY_NORMAL)
                if self._cancel_scope is None:
                    # run() never started (e.g. the loser of a simultaneous dial): there
                    # is no writer to flush for us, so write the GoAway here.
                    with trio.move_on_after(FLUSH_TIMEOUT):
                        await self.transport.send_all(self.conn.data_to_send())
                else:
                    await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            # Even when cancelled mid-flush: never leak the socket.
            self._shutdown("closed locally")
            if self._cancel_scope is not None:
                self._cancel_scope.cancel()
            await self.transport.aclose()

    async def wait_closed(self) -> None:
        await self._finished.wait()

    async def wait_idle(self) -> None:
        """Wait until no stream is open (both directions), or the session is closed."""
        while self._streams and not self.closed:
            self._stream_gone = trio.Event()
            await self._stream_gone.wait()
        await trio.lowlevel.checkpoint()

    # -- internals used by streams ---------------------------------------------------------

    def _wake_writer(self) -> None:
        self._write_wanted.set()

    def _wake_writer_if_needed(self) -> None:
        # Most reads and acknowledgements queue nothing; waking the writer for nothing was
        # a task switch per chunk on every connection (all of them share one thread).
        if self.conn.has_data_to_send:
            self._write_wanted.set()

    async def _wait_drained(self) -> None:
        if self._queued > HIGH_WATER and not self.closed:
            # Several streams may wait at once: share one event rather than replace it,
            # or the writer wakes only the last waiter and the others hang forever.
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()
        else:
            await trio.lowlevel.checkpoint()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        self._stream_gone.set()

    def _shutdown(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        # Keep a GoAway that arrived first: it tells a deliberate close from a failure.
        self.close_reason = (
            reason if self.close_reason is None else f"{self.close_reason}, {reason}"
        )
        for stream in list(self._streams.values()):
            stream._on_reset()  # noqa: SLF001
        self._streams.clear()
        self._stream_gone.set()
        self._send_inbound.close()
        self._drained.set()
        self._write_wanted.set()
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    # -- tasks -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run reader, writer and timer until the connection ends; then close the transport.

        Raises RemoteProtocolError when the peer broke the protocol (after sending GoAway).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timer)
                task_status.started()
                try:
                    await self._reader()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._shutdown("connection ended")
            self._finished.set()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.transport.aclose()

    async def _reader(self) -> None:
        conn = self.conn
        while not self.closed:
            # `_shutdown` (a ping timeout in the timer task, a local close) cancels this
            # wait: the session ends then, not when the silent peer next sends a byte.
            with trio.CancelScope() as scope:
                self._reader_scope = scope
                try:
                    data = await self.transport.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._shutdown("transport broken")
                    return
            if scope.cancelled_caught or conn.terminated:
                return  # bytes that raced the shutdown are not fed to a terminated machine
            try:
                conn.receive_data(data, now=trio.current_time())
            except RemoteProtocolError as exc:
                await self._flush()  # the GoAway(protocol error) the machine queued
                self._shutdown(f"protocol error: {exc}")
                raise
            self._report_refusals()
            self._dispatch()
            self._wake_writer_if_needed()
            if conn.get_timer() != self._timer_deadline:
                self._timer_moved.set()  # a ping answered or timed: the timer re-arms
            if not data:
                self._shutdown("peer closed the connection")
                return

    def _report_refusals(self) -> None:
        # The machine itself refuses streams beyond max_inbound_streams (RST, no event):
        # report those too, or a peer could flood us with streams unnoticed.
        callback = self.on_stream_refused
        if callback is None:
            return
        refused = self.conn.refused_streams
        for _ in range(refused - self._refused_reported):
            callback()
        self._refused_reported = refused

    def _dispatch(self) -> None:
        conn = self.conn
        streams = self._streams
        while (event := conn.next_event()) is not None:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is None:
                    # We closed it, so nobody will read this: reset, as TCP answers data
                    # for a closed socket with RST, so the sender learns it is talking to
                    # no one. (A no-op if the stream is already gone.)
                    conn.reset_stream(event.stream_id)
                else:
                    stream._on_data(event.data)  # noqa: SLF001
            elif isinstance(event, WindowUpdated):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_window()  # noqa: SLF001
            elif isinstance(event, StreamOpened):
                stream = YamuxStream(self, event.stream_id)
                try:
                    self._send_inbound.send_nowait(stream)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    # Nobody keeps up with accepting: refuse rather than queue without bound.
                    conn.reset_stream(event.stream_id)
                    if self.on_stream_refused is not None:
                        self.on_stream_refused()
                else:
                    streams[event.stream_id] = stream
            elif isinstance(event, StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_end()  # noqa: SLF001
            elif isinstance(event, StreamReset):
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._on_reset()  # noqa: SLF001
                    self._stream_gone.set()
            elif isinstance(event, PongReceived):
                if event.rtt is not None:
                    self.last_rtt = event.rtt
            elif isinstance(event, GoAwayReceived):
                self.close_reason = f"peer sent GoAway({event.error_code})"
            elif isinstance(event, ConnectionTerminated):
                self._shutdown(event.reason)

    async def _writer(self) -> None:
        conn = self.conn
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
            self._writes_started += 1
            data = conn.data_to_send()
            if data:
                self._queued = len(data)
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._shutdown("transport broken while writing")
                    return
                finally:
                    self._queued = 0
            self._writes_done = self._writes_started
            self._drained.set()
            done, self._write_done = self._write_done, trio.Event()
            done.set()
            if self.closed:
                return

    async def _flush(self) -> None:
        """Wait (at most FLUSH_TIMEOUT) until everything queued so far has been written."""
        target = self._writes_started + 1
        self._wake_writer()
        with trio.move_on_after(FLUSH_TIMEOUT):
            while self._writes_done < target and not self._finished.is_set():
                await self._write_done.wait()

    async def _timer(self) -> None:
        conn = self.conn
        while not self.closed:
            deadline = self._timer_deadline = conn.get_timer()
            self._timer_moved = trio.Event()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._timer_moved.wait()
                continue
            conn.handle_timer(trio.current_time())
            self._dispatch()
            self._wake_writer_if_needed()
