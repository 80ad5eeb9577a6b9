"""Heartbeats go to each peer as one stream per interval naming every shared context
(`trionode/context/heartbeats.py`), not as one gossip message per context; what a beat
starts is unchanged, and a hostile peer's heartbeat streams are bounded."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

import pytest
import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.context.heartbeats import BURST, DIGEST_PROTOCOL, HEARTBEAT_PROTOCOL
from trionode.context.replication import topic_for
from trionode.errors import RemoteProtocolError
from trionode.net.framed import LENGTH
from trionode.net.memory import GossipFaults
from trionode.node import Node
from trionode.testing import Cluster, open_cluster
from trionode.wire.messages import (
    MAX_HEARTBEAT_BEATS,
    MAX_HEARTBEAT_FRAME,
    Beat,
    HeartbeatBatch,
    decode_heartbeats,
    encode_heartbeats,
)

from .cluster_helpers import call, metric, share, sync_sessions, wait_converged, write

HEARTBEAT = 2.0
CONTEXTS = 4


def _heartbeats_only(file: FileConfig) -> FileConfig:
    """Sessions start only from heartbeats: no ticks within the test, none on (re)join."""
    sync = replace(file.sync, heartbeat=HEARTBEAT, interval=3600.0, min_interval=1.0, on_join=False)
    return replace(file, sync=sync)


def batches(node: Node, direction: str) -> float:
    return metric(node, "trionode_heartbeat_batches_total", direction=direction)


def beats(node: Node, direction: str) -> float:
    return metric(node, "trionode_sync_heartbeats_total", direction=direction)


def heartbeat_bytes(node: Node, direction: str) -> float:
    return metric(node, "trionode_heartbeat_bytes_total", direction=direction)


def _v1_only(file: FileConfig) -> FileConfig:
    file = _heartbeats_only(file)
    return replace(file, sync=replace(file.sync, heartbeat_digests=False))


def _speaks_only_v1(node: Node) -> None:
    """`node` as a node from before digests: it neither serves nor proposes /2."""
    node.host.remove_handler(DIGEST_PROTOCOL)
    node.replicator.heartbeats.protocols = (HEARTBEAT_PROTOCOL,)


async def test_one_stream_per_peer_and_interval_names_every_context(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=_v1_only) as cluster:
        a, b = cluster.nodes
        for _ in range(CONTEXTS):
            await share(cluster, [0, 1])
        await trio.sleep(HEARTBEAT)  # past the first interval with every context shared
        sent, beats_sent = batches(a, "sent"), beats(a, "sent")
        got, beats_got = batches(b, "received"), beats(b, "received")
        intervals = 5
        await trio.sleep(intervals * HEARTBEAT)
        streams = batches(a, "sent") - sent
        assert intervals - 1 <= streams <= intervals + 1
        assert beats(a, "sent") - beats_sent == CONTEXTS * streams
        # B took exactly those: one stream each, each beat passed on to its sync manager.
        assert batches(b, "received") - got == streams
        assert beats(b, "received") - beats_got == CONTEXTS * streams
        assert batches(b, "refused") == 0


async def _idle_heartbeat_bytes(cluster: Cluster, contexts: int) -> tuple[float, float]:
    """Heartbeat streams A sent over five intervals once `contexts` are shared and idle,
    and the bytes those streams carried (both ways)."""
    a, b = cluster.nodes
    while len(a.contexts.known_ids()) < contexts:
        await share(cluster, [0, 1])
    await trio.sleep(2 * HEARTBEAT)  # (every context in the last beats sent both ways)
    streams, carried = (
        batches(a, "sent"),
        heartbeat_bytes(a, "sent") + heartbeat_bytes(a, "received"),
    )
    confirmed = beats(b, "confirmed")
    await trio.sleep(5 * HEARTBEAT)
    streams = batches(a, "sent") - streams
    assert 4 <= streams <= 6
    # Each of A's streams confirmed every context to B, and named none of them.
    assert beats(b, "confirmed") - confirmed == contexts * streams
    assert metric(b, "trionode_heartbeat_digests_total", side="answered", outcome="same") > 0
    carried = heartbeat_bytes(a, "sent") + heartbeat_bytes(a, "received") - carried
    return streams, carried


async def test_an_idle_heartbeat_is_a_digest_whatever_the_number_of_contexts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=_heartbeats_only) as cluster:
        streams_1, bytes_1 = await _idle_heartbeat_bytes(cluster, 1)
        streams_n, bytes_n = await _idle_heartbeat_bytes(cluster, CONTEXTS * 2)
        b = cluster.nodes[1]
        received = beats(b, "received")
        # A's stream (its digest, B's match) and B's (the same the other way) cost the
        # same bytes with one context as with eight: ~100 bytes an interval in all.
        assert bytes_1 / streams_1 == bytes_n / streams_n < 100
        assert beats(b, "received") == received


async def test_a_write_lost_to_gossip_reaches_the_peer_through_a_differing_bucket(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faults = GossipFaults(seed=16)
    async with open_cluster(2, tmp_path, configure=_heartbeats_only, faults=faults) as cluster:
        a, b = cluster.nodes
        contexts = [await share(cluster, [0, 1]) for _ in range(CONTEXTS)]
        await trio.sleep(2 * HEARTBEAT)
        faults.drop = 1.0
        await write(a, contexts[1], "set", key="k", value="only a digest tells b")
        await wait_converged(cluster, [a, b], contexts[1], limit=4 * HEARTBEAT)
        assert await call(b, contexts[1], "get", key="k") == "only a digest tells b"
        assert metric(a, "trionode_heartbeat_digests_total", side="offered", outcome="listed")


async def test_a_node_without_digests_still_hears_and_is_heard(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faults = GossipFaults(seed=16)
    async with open_cluster(2, tmp_path, configure=_heartbeats_only, faults=faults) as cluster:
        a, b = cluster.nodes
        _speaks_only_v1(a)
        context = await share(cluster, [0, 1])
        await trio.sleep(2 * HEARTBEAT)
        got_a, got_b = beats(a, "received"), beats(b, "received")
        await trio.sleep(2 * HEARTBEAT)
        # B proposes /2, A refuses it and takes /1; A sends /1: every beat crosses.
        assert beats(a, "received") > got_a
        assert beats(b, "received") > got_b
        assert metric(a, "trionode_heartbeat_digests_total", side="answered", outcome="same") == 0
        faults.drop = 1.0
        await write(a, context, "set", key="k", value="from the old node")
        await write(b, context, "set", key="j", value="from the new node")
        await wait_converged(cluster, [a, b], context, limit=4 * HEARTBEAT)
        assert batches(a, "refused") == batches(b, "refused") == 0


async def test_a_beat_still_starts_a_session_when_gossip_is_lost(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faults = GossipFaults(seed=16)
    async with open_cluster(2, tmp_path, configure=_heartbeats_only, faults=faults) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])
        faults.drop = 1.0  # every gossip message is lost from here on
        await write(a, context, "set", key="k", value="only a heartbeat tells b")
        await wait_converged(cluster, [a, b], context, limit=4 * HEARTBEAT)
        assert await call(b, context, "get", key="k") == "only a heartbeat tells b"


# -- the frame codec -------------------------------------------------------------------------


def _beat(i: int, heads: int = 1) -> Beat:
    return Beat(i.to_bytes(32, "big"), [os.urandom(32) for _ in range(heads)], bytes(32))


def test_beats_split_into_frames_that_fit() -> None:
    many = [_beat(i, heads=40) for i in range(800)]
    bodies = encode_heartbeats(many)
    assert len(bodies) > 1
    assert all(len(body) <= MAX_HEARTBEAT_FRAME for body in bodies)
    assert [b for body in bodies for b in decode_heartbeats(body).beats] == many
    counted = encode_heartbeats([_beat(i) for i in range(MAX_HEARTBEAT_BEATS + 1)])
    assert [len(decode_heartbeats(body).beats) for body in counted] == [MAX_HEARTBEAT_BEATS, 1]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x81\xa4type\xa2\x80\x80",  # a tag that is not UTF-8
        b"\x82\xa4type\xacheartbeats/1\xa5beats\x90",  # no beats
        bytes(MAX_HEARTBEAT_FRAME + 1),
    ],
)
def test_bad_frames_are_the_typed_error(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_heartbeats(body)


# -- hostile peers ---------------------------------------------------------------------------


async def _send_raw(cluster: Cluster, frames: list[bytes]) -> None:
    a = cluster.nodes[0]
    _, stream = await a.host.new_stream(cluster.peer_ids[1], [HEARTBEAT_PROTOCOL])
    async with stream:
        with suppress(trio.BrokenResourceError):  # (refused: reset under our feet)
            for body in frames:
                await stream.send_all(LENGTH.pack(len(body)) + body)
            await stream.send_eof()
        await trio.testing.wait_all_tasks_blocked()


QUIET = 60.0


def _quiet(file: FileConfig) -> FileConfig:
    """Heartbeats every minute (one stream per peer per half minute), at most 3 beats per
    stream; the nodes share no context, so they send none of their own."""
    sync = replace(_heartbeats_only(file).sync, heartbeat=QUIET, heartbeat_max_beats=3)
    return replace(file, sync=sync)


async def test_hostile_heartbeat_streams_are_refused_and_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=_quiet) as cluster:
        a, b = cluster.nodes
        await cluster.wait_connected()
        good = encode_heartbeats([_beat(1)])[0]
        await _send_raw(cluster, [b"\x00garbage"])
        assert batches(b, "refused") == 1
        await trio.sleep(QUIET / 2)  # the bucket is full again
        for _ in range(BURST):  # (greetings beside the periodic stream)
            await _send_raw(cluster, [good])
        await _send_raw(cluster, [good])  # no token left: closed unread
        assert (batches(b, "received"), batches(b, "refused")) == (BURST, 2)
        await trio.sleep(QUIET / 2)
        too_many = HeartbeatBatch([_beat(i) for i in range(4)])
        await _send_raw(cluster, encode_heartbeats(too_many.beats))
        assert batches(b, "refused") == 3
        await trio.sleep(QUIET / 2)
        await _send_raw(cluster, [bytes(MAX_HEARTBEAT_FRAME + 1)])
        assert batches(b, "refused") == 4
        # Unknown contexts in a beat start nothing, and the node carries on.
        assert cluster.peer_ids[0] in b.host.connections
        context = await share(cluster, [0, 1])
        await write(a, context, "set", key="k", value="v")
        await wait_converged(cluster, [a, b], context)


async def test_a_peer_too_slow_to_take_a_heartbeat_costs_only_its_stream(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_cluster(2, tmp_path, configure=_quiet) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])

        async def too_slow(*_: object) -> None:
            raise trio.TooSlowError  # (as a protocol negotiation that timed out does)

        monkeypatch.setattr(a.host, "new_stream", too_slow)
        sent = batches(a, "sent")
        beat = Beat(context, [], bytes(32))
        assert await a.replicator.heartbeats.send({topic_for(context): beat}) == 1  # (tried)
        assert batches(a, "sent") == sent
        monkeypatch.undo()
        await write(a, context, "set", key="k", value="v")  # the node carries on
        await wait_converged(cluster, [a, b], context)


def _ticking(file: FileConfig) -> FileConfig:
    """Ticks every 3 s, heartbeats every second: a tick always has a fresh heartbeat."""
    sync = replace(file.sync, heartbeat=1.0, interval=3.0, min_interval=1.0, on_join=False)
    return replace(file, sync=sync)


async def test_idle_contexts_a_heartbeat_confirmed_cost_no_tick_session(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=_ticking) as cluster:
        a, b = cluster.nodes
        contexts = [await share(cluster, [0, 1]) for _ in range(CONTEXTS)]
        for context in contexts:
            await wait_converged(cluster, [a, b], context)
        await trio.sleep(10.0)
        before = sync_sessions(a) + sync_sessions(b)
        await trio.sleep(30.0)  # ten ticks, thirty heartbeats
        assert sync_sessions(a) + sync_sessions(b) == before
        # A write: its gossip carries it; nothing else is needed.
        await write(a, contexts[0], "set", key="k", value="v")
        await wait_converged(cluster, [a, b], contexts[0])


async def test_sessions_that_apply_deltas_share_one_announcement_per_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faults = GossipFaults(seed=16)

    def configure(file: FileConfig) -> FileConfig:
        # Far beyond the heartbeats: should the clock jump while a commit runs in the
        # writer thread, it reaches a heartbeat first, not the shared announcement.
        file = _heartbeats_only(file)
        return replace(file, sync=replace(file.sync, announce_interval=10 * HEARTBEAT))

    async with open_cluster(2, tmp_path, configure=configure, faults=faults) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])
        faults.drop = 1.0  # B learns of A's writes only from its own sessions
        interval = b.config.sync.announce_interval
        # Past what the join's sessions announced, and whatever those scheduled next
        # (a timer due at the very deadline of a sleep may run after the sleeper).
        await trio.sleep(2 * interval)
        announced = beats(b, "announced")
        for i in range(5):
            await write(a, context, "set", key=f"k{i}", value="v")
            assert await b.sync.sync_now(context, cluster.peer_ids[0]) > 0
            await trio.testing.wait_all_tasks_blocked()
            # The first session's heads go out at once; the next four, within the
            # interval, wait for one more announcement together.
            assert beats(b, "announced") - announced == 1
        # The shared one is due `interval` after the first at the latest; sleeping exactly
        # that long ties with its timer, whose task may then run after this one.
        await trio.sleep(1.5 * interval)
        assert beats(b, "announced") - announced == 2


async def test_a_context_taking_a_snapshot_is_left_out_of_heartbeats(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Its root is a partial state's while the pages come (and hashing it rebuilds the
    hashes every page invalidated): the other contexts' beats go on, it has none."""
    async with open_cluster(2, tmp_path, configure=_v1_only) as cluster:
        a = cluster.nodes[0]
        for _ in range(CONTEXTS):
            await share(cluster, [0, 1])
        taking = min(a.contexts.known_ids())
        await trio.sleep(HEARTBEAT)
        with a.contexts.snapshot_guard(taking):
            await trio.sleep(HEARTBEAT)  # (a beat that began before the guard is out)
            sent, beats_sent = batches(a, "sent"), beats(a, "sent")
            await trio.sleep(4 * HEARTBEAT)
            streams = batches(a, "sent") - sent
            assert streams >= 3
            assert beats(a, "sent") - beats_sent == (CONTEXTS - 1) * streams
        await trio.sleep(HEARTBEAT)
        sent, beats_sent = batches(a, "sent"), beats(a, "sent")
        await trio.sleep(3 * HEARTBEAT)
        streams = batches(a, "sent") - sent
        assert streams >= 2
        assert beats(a, "sent") - beats_sent == CONTEXTS * streams
