"""Keepalive pings judge the peer, not our own event loop: a ping missed while our loop ran
late (a node too busy to read its connections) is excused a few times in a row; a peer
that stays silent while we run on time is still disconnected after two misses.

A late loop is simulated on the mock clock: `clock.jump` moves time past the ping's
deadline in one step, as a loop stuck in other work for that long would see it."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.net.host import Connection
from trionode.node import Node
from trionode.testing import open_cluster
from trionode.wire.identify import PING_PROTOCOL_ID

EXCUSED = 2


def _pings(file: FileConfig) -> FileConfig:
    network = replace(file.network, ping_excused_misses=EXCUSED)
    return replace(file, network=network)


def missed(node: Node, verdict: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "trionode_p2p_pings_missed_total", {"verdict": verdict}
    )
    return 0.0 if value is None else value


class _Silent:
    """A ping handler that never answers, and says when a ping arrived."""

    def __init__(self) -> None:
        self.arrived = trio.Event()

    async def __call__(self, stream: trio.abc.HalfCloseableStream, _conn: Connection) -> None:
        self.arrived.set()
        await trio.sleep_forever()


async def test_pings_missed_while_our_loop_ran_late_are_excused_a_few_times(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=_pings) as cluster:
        await cluster.wait_connected()
        a, b = cluster.nodes
        timeout = a.config.network.ping_timeout
        b_id = cluster.peer_ids[1]
        for round_ in range(EXCUSED + 2):
            silent = _Silent()
            b.host.set_handler(PING_PROTOCOL_ID, silent)
            await silent.arrived.wait()
            await trio.testing.wait_all_tasks_blocked()  # A's ping waits for B's answer
            autojump_clock.jump(timeout + 1)  # ...and our loop is stuck past its deadline
            await trio.testing.wait_all_tasks_blocked()
            if round_ < EXCUSED:
                assert missed(a, "excused") == round_ + 1
                assert missed(a, "counted") == 0
                assert b_id in a.host.connections
        # Past the excused misses, late or not, two count and close the connection.
        assert missed(a, "excused") == EXCUSED
        assert missed(a, "counted") == 2
        assert missed(a, "disconnected") == 1


async def test_a_silent_peer_is_still_disconnected_when_our_loop_is_on_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=_pings) as cluster:
        await cluster.wait_connected()
        a, b = cluster.nodes
        b.host.set_handler(PING_PROTOCOL_ID, _Silent())
        interval = a.config.network.ping_interval + a.config.network.ping_timeout
        with trio.fail_after(3 * interval):
            while cluster.peer_ids[1] in a.host.connections:
                await a.host.wait_connection_changed()
        assert missed(a, "disconnected") == 1
        assert missed(a, "excused") == 0
        assert missed(a, "counted") == 2
