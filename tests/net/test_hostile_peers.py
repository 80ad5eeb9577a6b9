"""Attacks by peers that complete the handshake, against nodes of an in-process cluster.

The attackers are bare Hosts (no contexts, so never members) on the cluster's
:class:`MemoryNetwork`; several of them may share one virtual IP, as throwaway identities
from one address do. Everything runs on the virtual clock (`autojump_clock`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from msgspec.structs import replace

from trionode.blobs.protocol import BLOB_PROTOCOL
from trionode.config import FileConfig, NetworkSection
from trionode.context.replication import SYNC_PROTOCOL, _Channel
from trionode.errors import PeerError, ProtocolError
from trionode.net.host import Host
from trionode.net.memory import MemoryNetwork, MemoryTransport
from trionode.node import Node
from trionode.testing import Cluster, ConfigureFn, open_cluster
from trionode.wire.keys import PrivateKey
from trionode.wire.messages import HeadsRequest

from ..replication.cluster_helpers import APPS, LIMIT, call, metric, share, wait_converged, write
from .host_helpers import read_until_eof


@asynccontextmanager
async def open_strangers(
    network: MemoryNetwork, ips: list[str], per_ip: int
) -> AsyncIterator[list[Host]]:
    """`per_ip` throwaway identities on each of `ips`: Hosts that answer pings and identify
    like any peer, but are members of nothing. They do not listen."""
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        stop = trio.Event()
        hosts = [
            Host(
                PrivateKey.generate(),
                NetworkSection(listen=[], mdns=False, ping_interval=60.0),
                transport=MemoryTransport(network, ip),
            )
            for ip in ips
            for _ in range(per_ip)
        ]
        for host in hosts:
            await nursery.start(host.run, stop)
        yield hosts
        stop.set()
        await stack.aclose()


@asynccontextmanager
async def open_members(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, bytes, Cluster]]:
    """Two connected nodes that share a kv_store context: (a, b, context, cluster)."""
    async with open_cluster(2, tmp_path) as cluster:
        a, b = cluster
        yield a, b, await share(cluster, [0, 1]), cluster


def stalled(node: Node) -> float:
    return metric(node, "trionode_p2p_streams_stalled_total", protocol=SYNC_PROTOCOL)


def busy(node: Node) -> float:
    return metric(node, "trionode_sync_busy_total")


# -- silent sync streams (the limiter) --------------------------------------------------------


async def test_silent_sync_streams_from_a_non_member_cost_members_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_members(tmp_path) as (a, b, context, cluster):
            first = a.config.network.stream_first_message_timeout
            async with open_strangers(cluster.network, ["10.66.0.1"], 1) as (stranger,):
                conn = await stranger.connect(cluster.address(0))
                opened_at = trio.current_time()
                # As many silent streams as the node runs sessions at once.
                streams = [
                    (await conn.new_stream([SYNC_PROTOCOL]))[1]
                    for _ in range(a.config.sync.max_concurrent)
                ]
                await cluster.settle()
                assert trio.current_time() - opened_at < first
                # Members still sync with the node under attack, both ways, and write.
                await write(b, context, "set", key="during", value="attack")
                await b.sync.sync_now(context, a.host.peer_id)
                await a.sync.sync_now(context, b.host.peer_id)
                await wait_converged(cluster, [a, b], context)
                assert await call(a, context, "get", key="during") == "attack"
                assert busy(a) == 0
                # The silent streams are closed once the first-message deadline passes.
                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        nursery.start_soon(read_until_eof, stream)
                assert trio.current_time() - opened_at >= first
                assert stalled(a) == len(streams)
                # Being slow is not misbehaviour: the stranger is still connected.
                assert stranger.peer_id in a.host.connections


async def test_a_non_member_cannot_make_the_node_buffer_large_frames(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_members(tmp_path) as (a, b, context, cluster),
            open_strangers(cluster.network, ["10.66.0.1"], 1) as (stranger,),
        ):
            conn = await stranger.connect(cluster.address(0))
            _, stream = await conn.new_stream([SYNC_PROTOCOL])
            # Announce an 8 MiB first frame, and start sending it.
            await stream.send_all((8 * 1024 * 1024).to_bytes(4, "big") + bytes(64 * 1024))
            await read_until_eof(stream)
            # Refused at the length: the stranger is disconnected and counted.
            while stranger.peer_id in a.host.connections:
                await a.host.wait_connection_changed()
            assert metric(a, "trionode_p2p_misbehaving_peers_total", reason="sync_before_auth") == 1
            # A member's session is not limited to small frames.
            async with b.replicator.session(a.host.peer_id, context) as (channel, _):
                await channel.send(HeadsRequest(heads=[]))
                assert await channel.receive() is not None


async def test_a_member_stream_that_goes_silent_mid_session_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_members(tmp_path) as (a, b, context, _):
            idle = a.config.network.stream_idle_timeout
            _, stream = await b.host.new_stream(a.host.peer_id, [SYNC_PROTOCOL])
            async with stream:
                conn = b.host.connections[a.host.peer_id]
                await _Channel(stream).send(await b.replicator._auth(conn, context))
                started = trio.current_time()
                # Authenticated, then nothing: the responder gives up after the idle deadline.
                await read_until_eof(stream)
                assert trio.current_time() - started >= idle
            assert stalled(a) == 1
            # A member is never punished for being slow.
            assert b.host.peer_id in a.host.connections


# -- sybils (the connection manager) ----------------------------------------------------------


def crowded(file: FileConfig) -> FileConfig:
    """A smaller node than the default so that the test stays quick: a cap of 48
    connections, 16 per address, trimming from 40 down to 24."""
    return replace(
        file,
        network=replace(
            file.network,
            max_connections=48,
            connections_high_water=40,
            connections_low_water=24,
            max_connections_per_address=16,
        ),
    )


async def sybils_against(cluster: Cluster, ips: int, per_ip: int) -> AsyncExitStack:
    """Open `ips * per_ip` sybil connections to node 0 (from 10.66.0.1 …); the ones the
    node refuses are simply not there."""
    stack = AsyncExitStack()
    hosts = await stack.enter_async_context(
        open_strangers(cluster.network, [f"10.66.0.{i + 1}" for i in range(ips)], per_ip)
    )
    for host in hosts:
        try:
            await host.connect(cluster.address(0))
        except (PeerError, ProtocolError, trio.TooSlowError):
            continue  # refused: expected for many of them
    await cluster.settle()
    return stack


@pytest.mark.parametrize(
    ("configure", "ips", "per_ip"),
    [
        pytest.param(crowded, 5, 12, id="60-sybils-cap-48"),
        pytest.param(None, 20, 10, id="200-sybils-default-limits", marks=pytest.mark.slow),
    ],
)
async def test_with_the_node_full_of_sybils_a_member_still_connects_syncs_and_writes(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    configure: ConfigureFn | None,
    ips: int,
    per_ip: int,
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=configure, connect="none") as cluster:
            a, b, c = cluster
            await cluster.connect(1, 0)
            context = await share(cluster, [0, 1])
            await c.applications.install(str(APPS / "kv_store"))
            async with await sybils_against(cluster, ips=ips, per_ip=per_ip):
                limits = a.host.connmgr.limits
                assert len(a.host.connections) == limits.max_connections
                assert a.host.connmgr.statistics().protected == 1  # b proved membership
                assert b.host.peer_id in a.host.connections
                # A new member (c, invited by a) connects to a through the crowd and syncs.
                text = await a.joins.invite(context)
                await c.joins.join(text)
                await c.sync.sync_now(context, a.host.peer_id)
                await write(c, context, "set", key="from", value="c")
                await wait_converged(cluster, [a, b, c], context)
                assert await call(a, context, "get", key="from") == "c"
                assert metric(a, "trionode_p2p_closed_for_room_total", reason="displaced") >= 1
                # a dials a member at the cap: another peer makes room.
                await a.host.connections[b.host.peer_id].aclose()
                await cluster.settle()
                async with open_strangers(cluster.network, ["10.66.2.1"], 1) as (filler,):
                    await filler.connect(cluster.address(0))
                    assert len(a.host.connections) == limits.max_connections
                    await a.host.connect(cluster.address(1), member=True)
                    await b.sync.sync_now(context, a.host.peer_id)
                    await wait_converged(cluster, [a, b, c], context)
                # Once their grace is over, sybils above the high water mark are trimmed.
                await trio.sleep(limits.grace)
                async with open_strangers(cluster.network, ["10.66.1.1"], 1) as (late,):
                    await late.connect(cluster.address(0))
                    await cluster.settle()  # the trimmed connections close
                    assert len(a.host.connections) == limits.low_water
                assert metric(a, "trionode_p2p_closed_for_room_total", reason="trimmed") > 0
                assert {b.host.peer_id, c.host.peer_id} <= set(a.host.connections)


# -- silent blob streams ----------------------------------------------------------------------


async def test_silent_blob_streams_from_a_non_member_hold_no_serving_slot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_members(tmp_path) as (a, b, context, cluster),
            open_strangers(cluster.network, ["10.66.0.1"], 1) as (stranger,),
        ):
            info = await a.blobs.add_bytes(b"x" * 100_000, context_id=context)
            conn = await stranger.connect(cluster.address(0))
            opened_at = trio.current_time()
            streams = [
                (await conn.new_stream([BLOB_PROTOCOL]))[1]
                for _ in range(a.config.blobs.max_serving)
            ]
            await cluster.settle()
            # A member still fetches the blob from the node under attack.
            fetched = await b.blob_transfer.fetch(info.blob_id, context)
            assert fetched.blob_id == info.blob_id
            # The silent streams are closed at the first-message deadline.
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(read_until_eof, stream)
            first = a.config.network.stream_first_message_timeout
            assert trio.current_time() - opened_at >= first
            assert metric(a, "trionode_p2p_streams_stalled_total", protocol=BLOB_PROTOCOL) == len(
                streams
            )
