"""The sync driver (`trionode.sync.driver`) on a two-node in-process cluster: the limits the
responder machine enforces reach the stream, and a requester facing a hostile responder
fails with a typed error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from msgspec.structs import replace

from tests.net.host_helpers import read_until_eof
from tests.replication.cluster_helpers import LIMIT, call, metric, share, write
from trionode.config import FileConfig
from trionode.context.replication import SYNC_PROTOCOL
from trionode.errors import StreamEndedError
from trionode.node import Node
from trionode.sync.driver import SyncChannel
from trionode.sync.errors import AnswerMismatch, UnexpectedMessage
from trionode.testing import Cluster, open_cluster
from trionode.wire.messages import DeltaResponse, HeadsRequest, HeadsResponse


@asynccontextmanager
async def open_members(
    tmp_path: Path, **sync: Any
) -> AsyncIterator[tuple[Node, Node, bytes, Cluster]]:
    def configure(file: FileConfig) -> FileConfig:
        return replace(file, sync=replace(file.sync, **sync))

    async with open_cluster(2, tmp_path, configure=configure) as cluster:
        a, b = cluster
        yield a, b, await share(cluster, [0, 1]), cluster


@asynccontextmanager
async def member_stream(
    requester: Node, responder: Node, context: bytes
) -> AsyncIterator[tuple[trio.abc.HalfCloseableStream, SyncChannel]]:
    """A raw sync stream from `requester` on which it has proved its membership."""
    _, stream = await requester.host.new_stream(responder.host.peer_id, [SYNC_PROTOCOL])
    async with stream:
        conn = requester.host.connections[responder.host.peer_id]
        channel = SyncChannel(stream)
        await channel.send(await requester.replicator._auth(conn, context))
        yield stream, channel


def stream_errors(node: Node) -> float:
    return metric(node, "trionode_p2p_protocol_errors_total", layer="stream")


def stalled(node: Node) -> float:
    return metric(node, "trionode_p2p_streams_stalled_total", protocol=SYNC_PROTOCOL)


async def test_a_member_that_keeps_asking_is_cut_off_at_the_request_limit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_members(tmp_path, serve_max_requests=3) as (a, b, context, cluster):
            errors = stream_errors(a)
            async with member_stream(b, a, context) as (stream, channel):
                for _ in range(3):
                    await channel.send(HeadsRequest())
                    assert isinstance(await channel.receive(), HeadsResponse)
                await channel.send(HeadsRequest())
                await read_until_eof(stream)  # the fourth: no answer, the stream ends
            await cluster.settle()
            assert stream_errors(a) == errors + 1
            assert a.sync.limiter.borrowed_tokens == 0  # its session token came back
            # A violation costs the stream, not the member: it still syncs.
            assert b.host.peer_id in a.host.connections
            await write(b, context, "set", key="k", value="v")
            await a.sync.sync_now(context, b.host.peer_id)
            assert await call(a, context, "get", key="k") == "v"


async def test_a_served_session_ends_at_its_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_members(tmp_path, serve_timeout=25.0) as (a, b, context, cluster):
            idle = a.config.network.stream_idle_timeout
            assert idle > 10.0
            before = stalled(a)
            async with member_stream(b, a, context) as (stream, channel):
                started = trio.current_time()
                answered = 0
                # Each request well within the between-message deadline.
                with trio.move_on_after(10 * idle):
                    try:
                        while True:
                            await channel.send(HeadsRequest())
                            if await channel.receive(eof_ok=True) is None:
                                break
                            answered += 1
                            await trio.sleep(10.0)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, StreamEndedError):
                        pass  # the responder closed the stream
                assert 25.0 <= trio.current_time() - started < 25.0 + idle
                assert answered == 3  # at 0, 10 and 20 seconds
                await read_until_eof(stream)
            await cluster.settle()
            assert stalled(a) == before + 1
            assert a.sync.limiter.borrowed_tokens == 0


async def test_a_fetch_from_a_responder_that_answers_out_of_turn_fails_typed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_members(tmp_path) as (a, b, context, cluster):
            asked = bytes(range(32))
            replies = {
                "heads": HeadsResponse(heads=[], root_hash=bytes(32)),
                "short": DeltaResponse(deltas=[], missing=[]),
                "replayed": DeltaResponse(deltas=[], missing=[bytes(31) + b"\x09"]),
            }
            for name, error in [
                ("heads", UnexpectedMessage),
                ("short", AnswerMismatch),
                ("replayed", AnswerMismatch),
            ]:
                reply = replies[name]

                async def hostile(
                    stream: trio.abc.HalfCloseableStream, _conn: object, reply: Any = reply
                ) -> None:
                    channel = SyncChannel(stream)
                    await channel.receive()  # auth
                    while await channel.receive(eof_ok=True) is not None:
                        await channel.send(reply)

                a.host.set_handler(SYNC_PROTOCOL, hostile)
                with pytest.raises(error):
                    await b.replicator.fetch(a.host.peer_id, context, {asked})
            a.host.set_handler(SYNC_PROTOCOL, a.replicator._serve_sync)
            await cluster.settle()
            assert b.host.peer_id in a.host.connections


async def test_a_gap_of_large_deltas_arrives_over_several_answers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster.nodes
            context = await share(cluster, [0, 1])
            await cluster.partition([0], [1])
            # Deltas of about 60 KiB (an event carries the value, and events are bounded):
            # 150 of them are more than one frame holds.
            big = "x" * (60 * 1024)
            written = [await write(a, context, "set", key=f"k{i}", value=big) for i in range(150)]
            await cluster.heal()
            # One request for all: the answer carries what fits, the rest comes after.
            await b.replicator.fetch(a.host.peer_id, context, set(written))
            for delta_id in written:
                assert await b.contexts.read_delta(context, delta_id) is not None
            assert await call(b, context, "get", key="k149") == big
