"""Tests for the sans-IO Yamux connection: two ends wired together in memory, no Trio."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.yamux import (
    DEFAULT_WINDOW,
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER,
    MAX_DATA_FRAME,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    YamuxConfig,
    YamuxConnection,
    YamuxEvent,
)

KiB = 1024
MiB = 1024 * KiB
QUIET = YamuxConfig(keepalive_interval=None)

Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterable[bytes]:
    return (data,)


def random_chunker(rnd: random.Random) -> Chunker:
    """Cut bytes at random points: often mid-header, sometimes mid-body, sometimes not at all."""

    def chunker(data: bytes) -> Iterable[bytes]:
        pos = 0
        while pos < len(data):
            roll = rnd.random()
            if roll < 0.3:
                size = rnd.choice((1, 2, 5, 11, 12, 13, 24))
            elif roll < 0.5:
                size = len(data)
            else:
                size = rnd.randint(1, 70_000)
            yield data[pos : pos + size]
            pos += size

    return chunker


def frame(ftype: int, flags: int, stream_id: int, length: int, body: bytes = b"") -> bytes:
    return HEADER.pack(0, ftype, flags, stream_id, length) + body


def split_frames(data: bytes) -> list[tuple[tuple[int, int, int, int, int], bytes]]:
    frames = []
    pos = 0
    while pos < len(data):
        header = HEADER.unpack_from(data, pos)
        pos += HEADER.size
        size = header[4] if header[1] == TYPE_DATA else 0
        frames.append((header, data[pos : pos + size]))
        pos += size
    assert pos == len(data)
    return frames


def drain(conn: YamuxConnection) -> list[YamuxEvent]:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Pair:
    """A client and a server connected back to back (h11's ConnectionPair, for yamux)."""

    def __init__(
        self,
        client_config: YamuxConfig = QUIET,
        server_config: YamuxConfig = QUIET,
        chunker: Chunker = whole,
    ) -> None:
        self.client = YamuxConnection(is_client=True, config=client_config)
        self.server = YamuxConnection(is_client=False, config=server_config)
        self.chunker = chunker

    def peer(self, conn: YamuxConnection) -> YamuxConnection:
        return self.server if conn is self.client else self.client

    def pump(self) -> tuple[list[YamuxEvent], list[YamuxEvent]]:
        """Move bytes both ways until both sides are quiet; return (client, server) events."""
        client_events: list[YamuxEvent] = []
        server_events: list[YamuxEvent] = []
        while True:
            moved = False
            for src, dst in ((self.client, self.server), (self.server, self.client)):
                data = src.data_to_send()
                if data:
                    moved = True
                    for piece in self.chunker(data):
                        dst.receive_data(piece)
            client_events += drain(self.client)
            server_events += drain(self.server)
            if not moved:
                return client_events, server_events


def transfer(
    pair: Pair,
    plan: dict[tuple[YamuxConnection, int], bytes],
    *,
    close: bool = True,
    now: Callable[[], float | None] = lambda: None,
) -> dict[tuple[YamuxConnection, int], bytearray]:
    """Send each planned payload (respecting windows), acknowledging everything received."""
    offsets = dict.fromkeys(plan, 0)
    closed: set[tuple[YamuxConnection, int]] = set()
    received: dict[tuple[YamuxConnection, int], bytearray] = {}
    ended: set[tuple[YamuxConnection, int]] = set()
    while True:
        for key, data in plan.items():
            conn, stream_id = key
            if key in closed or stream_id not in conn.stream_ids():
                continue  # done, or the SYN has not arrived yet
            if offsets[key] < len(data):
                offsets[key] += conn.send_data(stream_id, memoryview(data)[offsets[key] :])
            if close and offsets[key] == len(data):
                conn.close_stream(stream_id)
                closed.add(key)
        client_events, server_events = pair.pump()
        for conn, events in ((pair.client, client_events), (pair.server, server_events)):
            for event in events:
                if isinstance(event, DataReceived):
                    assert (conn, event.stream_id) not in ended
                    received.setdefault((conn, event.stream_id), bytearray()).extend(event.data)
                    conn.acknowledge_received(event.stream_id, len(event.data), now=now())
                elif isinstance(event, StreamEnded):
                    ended.add((conn, event.stream_id))
        done = all(offsets[key] == len(data) for key, data in plan.items())
        if (
            done
            and (len(closed) == len(plan) or not close)
            and not (client_events or server_events)
        ):
            return received


# --------------------------------------------------------------------------- opening streams


def test_open_stream_wire_bytes_and_ack() -> None:
    pair = Pair()
    assert pair.client.open_stream() == 1
    syn = pair.client.data_to_send()
    assert syn == bytes.fromhex("00 01 0001 00000001 00000000")  # WindowUpdate{SYN}, delta 0
    pair.server.receive_data(syn)
    assert drain(pair.server) == [StreamOpened(1)]
    assert pair.server.data_to_send() == bytes.fromhex("00 01 0002 00000001 00000000")
    assert pair.server.data_to_send() == b""
    assert pair.server.open_stream() == 2
    client_events, server_events = pair.pump()
    assert client_events == [StreamOpened(2)]
    assert server_events == [StreamAccepted(2)]
    assert pair.client.open_stream() == 3


def test_ack_rides_on_the_first_frame_back() -> None:
    pair = Pair()
    pair.client.open_stream()
    pair.server.receive_data(pair.client.data_to_send())
    drain(pair.server)
    assert pair.server.send_data(1, b"hi") == 2
    assert pair.server.data_to_send() == frame(TYPE_DATA, FLAG_ACK, 1, 2, b"hi")
    pair.client.receive_data(frame(TYPE_DATA, FLAG_ACK, 1, 2, b"hi"))
    assert drain(pair.client) == [StreamAccepted(1), DataReceived(1, b"hi")]


def test_syn_on_a_data_frame_with_fin() -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    server.receive_data(frame(TYPE_DATA, FLAG_SYN | FLAG_FIN, 7, 3, b"abc"))
    assert drain(server) == [StreamOpened(7), DataReceived(7, b"abc"), StreamEnded(7)]
    server.acknowledge_received(7, 3)
    assert server.send_data(7, b"ok") == 2
    server.close_stream(7)
    assert server.statistics().open_streams == 0
    assert [h for h, _ in split_frames(server.data_to_send())] == [
        (0, TYPE_DATA, FLAG_ACK, 7, 2),
        (0, TYPE_WINDOW_UPDATE, FLAG_FIN, 7, 0),
    ]


def test_larger_initial_window_is_advertised_on_syn_and_ack() -> None:
    config = YamuxConfig(initial_window=1 * MiB, keepalive_interval=None)
    pair = Pair(config, config)
    stream_id = pair.client.open_stream()
    assert split_frames(pair.client.data_to_send())[0][0] == (
        0,
        TYPE_WINDOW_UPDATE,
        FLAG_SYN,
        1,
        1 * MiB - DEFAULT_WINDOW,
    )
    pair.server.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 1 * MiB - DEFAULT_WINDOW))
    client_events, _ = pair.pump()
    assert client_events == [StreamAccepted(1), WindowUpdated(1)]
    assert pair.server.send_window(stream_id) == 1 * MiB
    assert pair.client.send_window(stream_id) == 1 * MiB


# --------------------------------------------------------------------------- data both ways


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 100, MAX_DATA_FRAME, MAX_DATA_FRAME + 1, 300 * KiB]),
            st.integers(0, 70_000),
        ),
        min_size=1,
        max_size=4,
    ),
    rnd=st.randoms(use_true_random=False),
    server_opens=st.booleans(),
)
def test_data_flows_both_ways_exactly_under_any_chunking(
    sizes: list[tuple[int, int]], rnd: random.Random, server_opens: bool
) -> None:
    pair = Pair(chunker=random_chunker(rnd))
    plan: dict[tuple[YamuxConnection, int], bytes] = {}
    for index, (up, down) in enumerate(sizes):
        opener = pair.server if server_opens and index % 2 else pair.client
        stream_id = opener.open_stream()
        plan[opener, stream_id] = payload(2 * stream_id, up)
        plan[pair.peer(opener), stream_id] = payload(2 * stream_id + 1, down)
    received = transfer(pair, plan)
    for (conn, stream_id), data in plan.items():
        assert bytes(received.get((pair.peer(conn), stream_id), b"")) == data
    for conn in (pair.client, pair.server):
        stats = conn.statistics()
        assert stats.open_streams == stats.receive_window_total == 0


def test_data_frames_fit_one_noise_frame_each() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.pump()
    assert pair.client.send_data(stream_id, b"x" * 200_000) == 200_000
    pair.client.ping()
    assert pair.client.send_data(stream_id, b"y" * 10) == 10
    chunks = pair.client.chunks_to_send()
    assert all(len(chunk) <= MAX_DATA_FRAME + HEADER.size for chunk in chunks)
    frames = [split_frames(chunk) for chunk in chunks]  # every chunk holds whole frames
    bodies = [body for chunk_frames in frames for _, body in chunk_frames]
    assert b"".join(bodies) == b"x" * 200_000 + b"y" * 10
    assert max(map(len, bodies)) == MAX_DATA_FRAME
    assert [len(f) for f in frames] == [1, 1, 1, 3]  # last: 3479-byte Data, Ping, Data
    for chunk in chunks:
        pair.server.receive_data(chunk)
    assert b"".join(e.data for e in drain(pair.server) if isinstance(e, DataReceived)) == (
        b"x" * 200_000 + b"y" * 10
    )


def test_data_to_send_with_a_small_max_data_frame() -> None:
    config = YamuxConfig(max_data_frame=1000, keepalive_interval=None)
    pair = Pair(config, QUIET)
    stream_id = pair.client.open_stream()
    pair.client.send_data(stream_id, bytearray(b"z" * 2500))
    frames = split_frames(pair.client.data_to_send())
    assert [h[4] for h, _ in frames] == [0, 1000, 1000, 500]


# --------------------------------------------------------------------------- closing


def test_half_close_then_full_close_frees_state() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.client.send_data(stream_id, b"request")
    pair.client.close_stream(stream_id)
    pair.client.close_stream(stream_id)  # idempotent
    _, server_events = pair.pump()
    assert server_events == [
        StreamOpened(stream_id),
        DataReceived(stream_id, b"request"),
        StreamEnded(stream_id),
    ]
    with pytest.raises(LocalProtocolError) as excinfo:
        pair.client.send_data(stream_id, b"more")
    assert not isinstance(excinfo.value, StreamClosedError)
    assert pair.server.send_data(stream_id, b"response") == 8
    pair.server.close_stream(stream_id)
    assert pair.server.statistics().open_streams == 0
    client_events, _ = pair.pump()
    assert client_events == [
        DataReceived(stream_id, b"response"),
        StreamEnded(stream_id),
    ]
    assert pair.client.statistics().open_streams == 0
    with pytest.raises(StreamClosedError):
        pair.client.send_data(stream_id, b"late")
    pair.client.close_stream(stream_id)  # gone: a no-op
    pair.client.acknowledge_received(stream_id, 0)


def test_data_after_remote_fin_is_a_protocol_error() -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    server.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN | FLAG_FIN, 1, 0))
    server.receive_data(frame(TYPE_DATA, FLAG_FIN, 1, 0))  # a repeated FIN is harmless
    assert drain(server) == [StreamOpened(1), StreamEnded(1)]
    with pytest.raises(RemoteProtocolError, match="after its FIN"):
        server.receive_data(frame(TYPE_DATA, 0, 1, 1, b"!"))


def test_reset_frees_both_ends_and_late_frames_are_ignored() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.pump()
    pair.server.send_data(stream_id, b"in flight")
    pair.client.reset_stream(stream_id)
    pair.client.reset_stream(stream_id)  # idempotent
    assert pair.client.statistics().open_streams == 0
    client_events, server_events = pair.pump()
    assert client_events == []  # the data in flight was discarded
    assert server_events == [StreamReset(stream_id)]
    with pytest.raises(StreamClosedError):
        pair.server.send_data(stream_id, b"x")
    with pytest.raises(StreamClosedError):
        pair.server.send_window(stream_id)
    pair.server.reset_stream(stream_id)
    assert pair.server.data_to_send() == b""


def test_reset_in_the_middle_of_a_body_discards_the_rest() -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    server.receive_data(frame(TYPE_DATA, FLAG_SYN, 1, 10, b"abcd"))
    server.reset_stream(1)
    server.receive_data(b"efghij" + frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0))
    assert drain(server) == [StreamOpened(1), DataReceived(1, b"abcd"), StreamOpened(3)]


def test_misuse_raises_local_protocol_error() -> None:
    client = YamuxConnection(is_client=True, config=QUIET)
    for call in (
        lambda: client.send_data(1, b"x"),
        lambda: client.close_stream(3),
        lambda: client.reset_stream(2),
        lambda: client.acknowledge_received(5, 0),
        lambda: client.stream_statistics(0),
        lambda: client.go_away(-1),
    ):
        with pytest.raises(LocalProtocolError) as excinfo:
            call()
        assert not isinstance(excinfo.value, StreamClosedError)
    stream_id = client.open_stream()
    with pytest.raises(LocalProtocolError):
        client.acknowledge_received(stream_id, 1)
    client.receive_data(frame(TYPE_DATA, FLAG_ACK, stream_id, 5, b"12345"))
    with pytest.raises(LocalProtocolError):
        client.acknowledge_received(stream_id, -1)
    client.acknowledge_received(stream_id, 5)
    with pytest.raises(LocalProtocolError):
        client.acknowledge_received(stream_id, 1)


# --------------------------------------------------------------------------- flow control


def test_sender_blocks_at_256_kib_until_the_receiver_acknowledges() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.pump()
    assert pair.client.send_data(stream_id, bytes(1 * MiB)) == DEFAULT_WINDOW
    assert pair.client.send_data(stream_id, b"x") == 0
    assert pair.client.send_window(stream_id) == 0
    _, server_events = pair.pump()
    assert sum(len(e.data) for e in server_events if isinstance(e, DataReceived)) == (
        DEFAULT_WINDOW
    )
    assert pair.server.stream_statistics(stream_id).receive_credit == 0
    # Less than half the window consumed: nothing is re-granted yet.
    pair.server.acknowledge_received(stream_id, DEFAULT_WINDOW // 2 - 1)
    assert pair.pump() == ([], [])
    assert pair.client.send_data(stream_id, b"x") == 0
    pair.server.acknowledge_received(stream_id, 1)
    client_events, _ = pair.pump()
    assert client_events == [WindowUpdated(stream_id)]
    assert pair.client.send_window(stream_id) == DEFAULT_WINDOW // 2
    # A slow reader on one stream does not hold up another; data may follow SYN at once.
    other = pair.client.open_stream()
    assert pair.client.send_data(other, b"y" * 1000) == 1000
    _, server_events = pair.pump()
    assert server_events == [StreamOpened(other), DataReceived(other, b"y" * 1000)]


def test_has_data_to_send_says_whether_data_to_send_has_anything() -> None:
    """A driver wakes its writer only when it is true: it must never be false with frames
    queued (a lost frame) and is false after acknowledgements that grant nothing."""
    pair = Pair()

    def wants(conn: YamuxConnection) -> bool:
        return conn.has_data_to_send  # (a call: mypy would narrow the property for good)

    assert not wants(pair.client)
    stream_id = pair.client.open_stream()
    assert wants(pair.client)  # the SYN
    pair.server.receive_data(pair.client.data_to_send())
    assert not wants(pair.client)
    assert wants(pair.server)  # the ACK owed for the SYN
    pair.pump()
    assert not wants(pair.client)
    assert not wants(pair.server)
    pair.client.send_data(stream_id, bytes(DEFAULT_WINDOW))
    pair.pump()
    pair.server.acknowledge_received(stream_id, DEFAULT_WINDOW // 2 - 1)
    assert not wants(pair.server)  # under half the window: no update yet
    assert pair.server.data_to_send() == b""
    pair.server.acknowledge_received(stream_id, 1)
    assert wants(pair.server)
    assert pair.server.data_to_send()
    assert not wants(pair.server)


def _grow(pair: Pair, stream_id: int, rounds: int, step: float) -> list[int]:
    """Stream client -> server for `rounds` exchanges; the reader acks at time `i * step`."""
    windows = []
    chunk = memoryview(bytes(4 * MiB))
    clock = 0.0
    for _ in range(rounds):
        while pair.client.send_data(stream_id, chunk):
            pass
        clock += step
        _, server_events = pair.pump()
        for event in server_events:
            if isinstance(event, DataReceived):
                pair.server.acknowledge_received(stream_id, len(event.data), now=clock)
        stats = pair.server.stream_statistics(stream_id)
        assert stats.receive_window <= 16 * MiB
        assert pair.client.send_window(stream_id) <= stats.receive_window
        windows.append(stats.receive_window)
    pair.pump()
    return windows


def test_autotuning_doubles_up_to_16_mib_and_never_beyond() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.pump()
    windows = _grow(pair, stream_id, rounds=16, step=0.001)
    assert windows == sorted(windows)
    assert windows[-1] == 16 * MiB
    assert {w.bit_length() - DEFAULT_WINDOW.bit_length() for w in windows} <= set(range(7))
    assert all(w & (w - 1) == 0 for w in windows)  # doubling: powers of two
    assert pair.server.statistics().receive_window_total == 16 * MiB
    transfer(pair, {(pair.client, stream_id): b"x"})  # and the stream still works


def _trickle(pair: Pair, stream_id: int, rounds: int, step: float, per_round: int) -> list[int]:
    """A reader that consumes `per_round` bytes every `step` seconds."""
    windows = []
    chunk = memoryview(bytes(4 * MiB))
    clock = 0.0
    unacked = 0
    for _ in range(rounds):
        pair.client.send_data(stream_id, chunk)
        _, server_events = pair.pump()
        unacked += sum(len(e.data) for e in server_events if isinstance(e, DataReceived))
        clock += step
        count = min(per_round, unacked)
        pair.server.acknowledge_received(stream_id, count, now=clock)
        unacked -= count
        pair.pump()
        windows.append(pair.server.stream_statistics(stream_id).receive_window)
    return windows


def test_autotuning_leaves_a_slow_reader_alone() -> None:
    for per_round in (16 * KiB, DEFAULT_WINDOW // 2):
        pair = Pair()
        stream_id = pair.client.open_stream()
        pair.pump()
        assert set(_trickle(pair, stream_id, 8, 1.0, per_round)) == {DEFAULT_WINDOW}


def test_autotuning_uses_the_measured_rtt() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.server.ping(now=0.0)
    pair.client.receive_data(pair.server.data_to_send())
    pair.server.receive_data(pair.client.data_to_send(), now=0.5)
    assert drain(pair.server) == [StreamOpened(stream_id), PongReceived(0, 0.5)]
    assert pair.server.statistics().rtt == 0.5
    # Half a window per second is too slow for a 10 ms round trip, fast for 0.5 s.
    assert _trickle(pair, stream_id, 3, 1.0, DEFAULT_WINDOW // 2)[-1] > DEFAULT_WINDOW


def test_autotuning_respects_the_connection_budget() -> None:
    config = YamuxConfig(max_connection_window=1 * MiB, keepalive_interval=None)
    pair = Pair(QUIET, config)
    first = pair.client.open_stream()
    second = pair.client.open_stream()
    pair.pump()
    _grow(pair, first, rounds=8, step=0.001)
    _grow(pair, second, rounds=8, step=0.001)
    assert pair.server.statistics().receive_window_total == 1 * MiB
    assert pair.server.stream_statistics(first).receive_window == 1 * MiB - DEFAULT_WINDOW


def test_window_violation_is_a_remote_protocol_error_and_tears_down() -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    server.receive_data(frame(TYPE_DATA, FLAG_SYN, 1, 200 * KiB, bytes(200 * KiB)))
    # The header alone gives it away: no need to wait for the body.
    with pytest.raises(RemoteProtocolError, match="exceeds the receive window"):
        server.receive_data(frame(TYPE_DATA, 0, 1, 56 * KiB + 1))
    assert server.terminated
    assert server.data_to_send() == frame(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    with pytest.raises(StreamClosedError):
        server.send_data(1, b"x")


# --------------------------------------------------------------------------- ping, go-away, EOF


def test_ping_pong() -> None:
    pair = Pair()
    opaque = pair.client.ping(now=10.0)
    pair.server.receive_data(pair.client.data_to_send())
    assert drain(pair.server) == [PingReceived(opaque)]
    reply = pair.server.data_to_send()
    assert reply == frame(TYPE_PING, FLAG_ACK, 0, opaque)
    pair.client.receive_data(reply, now=10.25)
    assert drain(pair.client) == [PongReceived(opaque, 0.25)]
    pair.client.receive_data(reply)  # an unsolicited pong is ignored
    assert drain(pair.client) == []
    second = pair.client.ping()  # no `now`: no RTT
    assert second != opaque
    assert pair.pump() == ([PongReceived(second, None)], [PingReceived(second)])


def test_go_away_refuses_new_streams_and_lets_old_ones_finish() -> None:
    pair = Pair()
    old = pair.client.open_stream()
    pair.pump()
    pair.server.go_away()
    pair.server.go_away()  # only one frame
    client_events, _ = pair.pump()
    assert client_events == [GoAwayReceived(0)]
    for conn in (pair.client, pair.server):
        with pytest.raises(LocalProtocolError):
            conn.open_stream()
    assert pair.client.statistics().remote_go_away == 0
    assert pair.server.statistics().local_go_away
    received = transfer(pair, {(pair.client, old): b"still", (pair.server, old): b"works"})
    assert received == {(pair.server, old): b"still", (pair.client, old): b"works"}


def test_syn_after_our_go_away_is_refused_with_rst() -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    server.go_away()
    server.data_to_send()
    server.receive_data(frame(TYPE_DATA, FLAG_SYN, 1, 3, b"abc"))
    assert drain(server) == []
    assert server.data_to_send() == frame(TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0)
    assert server.statistics().refused_streams == 1


def test_eof_terminates_the_connection() -> None:
    pair = Pair()
    pair.client.open_stream()
    pair.server.go_away(2)
    pair.pump()
    pair.client.receive_data(b"")
    assert drain(pair.client) == [ConnectionTerminated("connection closed by peer", 2)]
    assert pair.client.terminated
    assert pair.client.statistics().open_streams == 0
    assert pair.client.get_timer() is None
    with pytest.raises(LocalProtocolError):
        pair.client.open_stream()


def test_eof_in_the_middle_of_a_frame_is_a_protocol_error() -> None:
    for partial in (frame(TYPE_PING, FLAG_SYN, 0, 1)[:5], frame(TYPE_DATA, FLAG_SYN, 1, 9, b"x")):
        server = YamuxConnection(is_client=False, config=QUIET)
        server.receive_data(partial)
        with pytest.raises(RemoteProtocolError, match="middle of a frame"):
            server.receive_data(b"")


def test_keepalive_pings_and_timeout() -> None:
    config = YamuxConfig(keepalive_interval=30.0, ping_timeout=10.0)
    pair = Pair(config, QUIET)
    client = pair.client
    assert client.get_timer() is None  # no clock yet
    client.handle_timer(100.0)  # the first ping measures the RTT at once
    assert client.get_timer() == 110.0  # the ping's deadline
    pair.server.receive_data(client.data_to_send())
    client.receive_data(pair.server.data_to_send(), now=100.5)
    assert drain(client) == [PongReceived(0, 0.5)]
    assert client.get_timer() == 130.0
    client.handle_timer(120.0)  # early: nothing happens
    assert client.data_to_send() == b""
    client.handle_timer(130.0)
    assert client.data_to_send() == frame(TYPE_PING, FLAG_SYN, 0, 1)
    assert client.get_timer() == 140.0
    client.handle_timer(140.0)
    assert drain(client) == [ConnectionTerminated("ping timeout", None)]
    assert client.terminated
    assert client.get_timer() is None


# --------------------------------------------------------------------------- limits and bad input


def test_inbound_streams_beyond_the_limit_are_reset_and_counted() -> None:
    pair = Pair(QUIET, YamuxConfig(max_inbound_streams=2, keepalive_interval=None))
    ids = [pair.client.open_stream() for _ in range(3)]
    client_events, server_events = pair.pump()
    assert server_events == [StreamOpened(1), StreamOpened(3)]
    assert client_events == [StreamReset(5), StreamAccepted(1), StreamAccepted(3)]
    assert pair.server.statistics().refused_streams == 1
    assert pair.client.stream_ids() == ids[:2]
    pair.client.reset_stream(1)
    pair.client.open_stream()
    _, server_events = pair.pump()
    assert server_events == [StreamReset(1), StreamOpened(7)]


def test_pending_outbound_streams_are_bounded() -> None:
    pair = Pair(YamuxConfig(max_pending_outbound=2, keepalive_interval=None), QUIET)
    pair.client.open_stream()
    pair.client.open_stream()
    with pytest.raises(LocalProtocolError, match="await the peer's ACK"):
        pair.client.open_stream()
    pair.pump()
    assert pair.client.statistics().pending_outbound == 0
    assert pair.client.open_stream() == 5


def test_frames_for_unknown_streams_are_skipped() -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    server.receive_data(
        frame(TYPE_DATA, 0, 9, 4, b"gone")
        + frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 4, 100)
        + frame(TYPE_DATA, FLAG_FIN | FLAG_RST, 11, 0)
        + frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
    )
    assert drain(server) == [StreamOpened(1)]
    with pytest.raises(RemoteProtocolError):
        server.receive_data(frame(TYPE_DATA, 0, 13, 16 * MiB + 1))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (HEADER.pack(1, TYPE_PING, FLAG_SYN, 0, 0), "version"),
        (HEADER.pack(0, 4, 0, 0, 0), "type"),
        (frame(TYPE_DATA, FLAG_SYN, 0, 0), "stream 0"),
        (frame(TYPE_WINDOW_UPDATE, 0, 0, 5), "stream 0"),
        (frame(TYPE_PING, FLAG_SYN, 1, 0), "Ping frame on stream"),
        (frame(TYPE_PING, 0, 0, 0), "flags"),
        (frame(TYPE_PING, FLAG_SYN | FLAG_ACK, 0, 0), "flags"),
        (frame(TYPE_GO_AWAY, 0, 3, 0), "GoAway frame on stream"),
        (frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0), "parity"),
        (frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) * 2, "reused"),
        (frame(TYPE_DATA, FLAG_SYN, 1, DEFAULT_WINDOW + 1), "exceeds"),
    ],
)
def test_bad_frames_are_remote_protocol_errors(data: bytes, message: str) -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    with pytest.raises(RemoteProtocolError, match=message):
        server.receive_data(data)
    assert server.data_to_send().endswith(frame(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))


def test_a_closed_stream_id_cannot_be_reopened() -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    for stream_id in (3, 1, 7):  # out of order is fine (concurrent openers)
        server.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN | FLAG_RST, stream_id, 0))
    assert server.statistics().open_streams == 0
    for stream_id in (1, 3, 7):
        fresh = YamuxConnection(is_client=False, config=QUIET)
        for opened in (3, 1, 7):
            fresh.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN | FLAG_RST, opened, 0))
        with pytest.raises(RemoteProtocolError, match="reused"):
            fresh.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, 0))
    server.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 5, 0))
    assert drain(server)[-1] == StreamOpened(5)


def _feed(conn: YamuxConnection, data: bytes, rnd: random.Random) -> None:
    try:
        for piece in random_chunker(rnd)(data):
            conn.receive_data(piece)
            drain(conn)
    except RemoteProtocolError:
        assert conn.terminated


FUZZ_EXAMPLES = 5 * settings().max_examples


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(data=st.binary(max_size=2000), rnd=st.randoms(use_true_random=False), client=st.booleans())
def test_garbage_only_raises_remote_protocol_error(
    data: bytes, rnd: random.Random, client: bool
) -> None:
    _feed(YamuxConnection(is_client=client, config=QUIET), data, rnd)


def _transcript() -> bytes:
    """Everything a client sends in a short but busy session."""
    pair = Pair()
    sent = bytearray()
    streams = [pair.client.open_stream() for _ in range(3)]
    pair.client.send_data(streams[0], b"hello" * 20)
    pair.client.ping()
    sent += pair.client.data_to_send()
    pair.server.receive_data(sent)
    pair.server.send_data(streams[0], bytes(DEFAULT_WINDOW // 2 + 1))
    pair.client.receive_data(pair.server.data_to_send())
    drain(pair.client)
    pair.client.acknowledge_received(streams[0], DEFAULT_WINDOW // 2 + 1)
    pair.client.close_stream(streams[0])
    pair.client.reset_stream(streams[1])
    pair.client.send_data(streams[2], b"x" * 3000)
    pair.client.go_away()
    sent += pair.client.data_to_send()
    return bytes(sent)


TRANSCRIPT = _transcript()


def _header_positions(data: bytes) -> list[int]:
    positions: list[int] = []
    pos = 0
    for _, body in split_frames(data):
        positions += range(pos, pos + HEADER.size)
        pos += HEADER.size + len(body)
    return positions


HEADER_POSITIONS = _header_positions(TRANSCRIPT)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.large_base_example],
)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(HEADER_POSITIONS) | st.integers(0, len(TRANSCRIPT) - 1),
            st.integers(0, 255),
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    ),
    rnd=st.randoms(use_true_random=False),
)
def test_mutated_frames_only_raise_remote_protocol_error(
    edits: list[tuple[int, int, bool]], rnd: random.Random
) -> None:
    data = bytearray(TRANSCRIPT)
    for position, value, insert in edits:
        if insert:
            data.insert(position, value)
        else:
            data[position] = value
    _feed(YamuxConnection(is_client=False, config=QUIET), bytes(data), rnd)


def test_unmutated_transcript_parses() -> None:
    server = YamuxConnection(is_client=False, config=QUIET)
    server.receive_data(TRANSCRIPT)
    events = drain(server)
    assert events[:3] == [StreamOpened(1), StreamOpened(3), StreamOpened(5)]
    assert events[-1] == GoAwayReceived(0)


# --------------------------------------------------------------------------- state machine

MACHINE_CONFIG = YamuxConfig(
    max_window=1 * MiB,
    autotune_min_rtt=0.3,  # two window updates within 1.2 s of each other grow the window
    max_connection_window=3 * MiB // 2,
    max_data_frame=16 * KiB,
    keepalive_interval=None,
)
PATTERN = bytes(range(251)) * (400 * KiB // 251 + 2)


def stream_bytes(sender: int, stream_id: int, offset: int, size: int) -> bytes:
    start = (offset + 7 * stream_id + 101 * sender) % 251
    return PATTERN[start : start + size]


SEND_SIZES = st.one_of(
    st.integers(0, 100),
    st.sampled_from([16 * KiB - 1, 16 * KiB + 1, 64 * KiB, 128 * KiB, DEFAULT_WINDOW, 300 * KiB]),
    st.integers(0, 300 * KiB),
)


class YamuxMachine(RuleBasedStateMachine):
    """Random interleavings of every command, with bytes moving in arbitrary pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.conns = (
            YamuxConnection(is_client=True, config=MACHINE_CONFIG),
            YamuxConnection(is_client=False, config=MACHINE_CONFIG),
        )
        self.wire = (bytearray(), bytearray())  # bytes side i sent that side 1-i hasn't read
        self.sent: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self.received: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self.unacked: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self.now = 0.0

    def _pick(self, side: int, pick: int, *, sendable: bool = False) -> int | None:
        conn = self.conns[side]
        ids = conn.stream_ids()
        if sendable:
            ids = [i for i in ids if not conn.stream_statistics(i).local_closed]
        return ids[pick % len(ids)] if ids else None

    def _deliver(self, side: int, size: int, split: int) -> None:
        """Move up to `size` bytes from side's outbox to the other side, in two pieces."""
        wire = self.wire[side]
        wire += self.conns[side].data_to_send()
        data = bytes(wire[:size])
        del wire[:size]
        receiver = 1 - side
        cut = split % (len(data) + 1)
        for piece in (data[:cut], data[cut:]):
            if piece:
                self.conns[receiver].receive_data(piece)
        self._handle_events(receiver)

    def _handle_events(self, side: int) -> None:
        sender = 1 - side
        for event in drain(self.conns[side]):
            match event:
                case StreamOpened(stream_id):
                    assert stream_id not in self.received[side]
                    self.received[side][stream_id] = 0
                case DataReceived(stream_id, data):
                    offset = self.received[side].get(stream_id, 0)
                    assert data == stream_bytes(sender, stream_id, offset, len(data))
                    self.received[side][stream_id] = offset + len(data)
                    self.unacked[side][stream_id] = self.unacked[side].get(stream_id, 0) + len(data)
                case StreamEnded(stream_id):
                    # FIN comes after all the data: everything sent has arrived, in order.
                    assert self.received[side].get(stream_id, 0) == self.sent[sender].get(
                        stream_id, 0
                    )
                case StreamReset(stream_id):
                    self.unacked[side].pop(stream_id, None)
                case _:
                    pass

    @initialize()
    def open_some_streams(self) -> None:
        self.conns[0].open_stream()
        self.conns[1].open_stream()

    @rule(side=st.integers(0, 1))
    def open_stream(self, side: int) -> None:
        conn = self.conns[side]
        stats = conn.statistics()
        if stats.local_go_away or stats.remote_go_away is not None:
            with pytest.raises(LocalProtocolError):
                conn.open_stream()
        else:
            conn.open_stream()

    @rule(side=st.integers(0, 1), pick=st.integers(0, 99), size=SEND_SIZES)
    def send(self, side: int, pick: int, size: int) -> None:
        stream_id = self._pick(side, pick, sendable=True)
        if stream_id is not None:
            self._send(side, stream_id, size)

    def _send(self, side: int, stream_id: int, size: int) -> None:
        conn = self.conns[side]
        window = conn.send_window(stream_id)
        offset = self.sent[side].get(stream_id, 0)
        count = conn.send_data(stream_id, stream_bytes(side, stream_id, offset, size))
        assert count == min(size, window)
        self.sent[side][stream_id] = offset + count

    @rule(
        side=st.integers(0, 1),
        pick=st.integers(0, 99),
        percent=st.sampled_from([1, 50, 100]) | st.integers(1, 100),
        elapsed=st.sampled_from([0.0, 0.001, 1.0]),
    )
    def acknowledge(self, side: int, pick: int, percent: int, elapsed: float) -> None:
        unacked = self.unacked[side]
        ids = [i for i in self.conns[side].stream_ids() if unacked.get(i)]
        if not ids:
            return
        stream_id = ids[pick % len(ids)]
        count = max(1, unacked[stream_id] * percent // 100)
        self.now += elapsed
        self.conns[side].acknowledge_received(stream_id, count, now=self.now)
        unacked[stream_id] -= count

    @rule(side=st.integers(0, 1), pick=st.integers(0, 99), elapsed=st.sampled_from([0.001, 1.0]))
    def burst(self, side: int, pick: int, elapsed: float) -> None:
        """Fill a stream's send window, deliver it, and have the reader consume everything."""
        stream_id = self._pick(side, pick, sendable=True)
        if stream_id is not None:
            self._send(side, stream_id, min(300 * KiB, self.conns[side].send_window(stream_id)))
            self._deliver(side, 10 * MiB, 0)
            self.read_everything(1 - side, elapsed)
            self._deliver(1 - side, 10 * MiB, 0)

    @rule(side=st.integers(0, 1), elapsed=st.sampled_from([0.001, 1.0]))
    def read_everything(self, side: int, elapsed: float) -> None:
        """A fast reader: consume all delivered data on every stream."""
        self.now += elapsed
        unacked = self.unacked[side]
        for stream_id in self.conns[side].stream_ids():
            if unacked.get(stream_id):
                self.conns[side].acknowledge_received(stream_id, unacked[stream_id], now=self.now)
                unacked[stream_id] = 0

    @rule(side=st.integers(0, 1), pick=st.integers(0, 99))
    def close(self, side: int, pick: int) -> None:
        stream_id = self._pick(side, pick)
        if stream_id is not None:
            self.conns[side].close_stream(stream_id)
            with pytest.raises(LocalProtocolError):
                self.conns[side].send_data(stream_id, b"x")

    @rule(side=st.integers(0, 1), pick=st.integers(0, 99))
    def reset(self, side: int, pick: int) -> None:
        stream_id = self._pick(side, pick)
        if stream_id is not None:
            self.conns[side].reset_stream(stream_id)
            self.unacked[side].pop(stream_id, None)

    @rule(side=st.integers(0, 1))
    def ping(self, side: int) -> None:
        self.conns[side].ping(now=self.now)

    @rule(side=st.integers(0, 1), code=st.sampled_from([0, 1, 2]), rare=st.integers(0, 3))
    def go_away(self, side: int, code: int, rare: int) -> None:
        if rare == 0:  # otherwise most runs would stop opening streams early
            self.conns[side].go_away(code)

    @rule(
        side=st.integers(0, 1),
        size=st.integers(0, 80_000) | st.just(10 * MiB),
        split=st.integers(0, 80_000),
    )
    def deliver_some(self, side: int, size: int, split: int) -> None:
        self._deliver(side, size, split)

    @rule(split=st.integers(0, 80_000))
    def deliver_all(self, split: int) -> None:
        while any(self.wire) or any(c.statistics().bytes_to_send for c in self.conns):
            for side in (0, 1):
                self._deliver(side, len(self.wire[side]) + 10 * MiB, split)
        client, server = self.conns
        # Quiet: both ends agree on which streams exist, on windows, and on the data.
        assert set(client.stream_ids()) == set(server.stream_ids())
        for stream_id in client.stream_ids():
            for side, (me, peer) in enumerate(((client, server), (server, client))):
                mine = me.stream_statistics(stream_id)
                theirs = peer.stream_statistics(stream_id)
                assert mine.send_window == theirs.receive_credit
                assert theirs.receive_in_flight == 0
                assert self.received[1 - side].get(stream_id, 0) == self.sent[side].get(
                    stream_id, 0
                )
        for conn in self.conns:
            assert conn.statistics().outstanding_pings == 0

    @invariant()
    def windows_are_sane(self) -> None:
        initial = MACHINE_CONFIG.initial_window
        for side, conn in enumerate(self.conns):
            growth = 0
            total = 0
            for stream_id in conn.stream_ids():
                stats = conn.stream_statistics(stream_id)
                assert stats.send_window >= 0
                assert stats.receive_credit >= 0
                buffered = stats.receive_in_flight + stats.receive_unacknowledged
                assert stats.receive_credit + buffered <= stats.receive_window
                assert initial <= stats.receive_window <= MACHINE_CONFIG.max_window
                assert stats.receive_unacknowledged == self.unacked[side].get(stream_id, 0)
                growth += stats.receive_window - initial
                total += stats.receive_window
            assert growth <= MACHINE_CONFIG.max_connection_window
            assert conn.statistics().receive_window_total == total
            assert not conn.terminated


YamuxMachine.TestCase.settings = settings(
    max_examples=max(100, settings().max_examples),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestYamuxMachine = YamuxMachine.TestCase
