"""The per-(context, peer) sync status the page shows: recorded by the sessions themselves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.errors import PeerError
from trionode.testing import open_cluster

from .cluster_helpers import share, write


def _quiet(file: FileConfig) -> FileConfig:
    # No session but the ones the test asks for: no ticks, heartbeats or join sessions.
    sync = replace(file.sync, interval=10_000.0, heartbeat=10_000.0, on_join=False)
    return replace(file, sync=sync)


async def test_a_session_records_its_peer_protocol_deltas_and_errors(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=_quiet) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1], app="chat")
        peer_a = a.host.peer_id
        # Joining ran a session with the inviting peer already (a snapshot of its state).
        [(peer, connected, status)] = b.sync.peer_status(context)
        assert (peer, connected) == (peer_a, True)
        assert status is not None
        assert (status.outcome, status.protocol, status.last_error) == ("ok", "snapshot", None)
        joined_at = status.last_success
        await cluster.partition([0], [1])
        for i in range(3):
            await write(a, context, "post", text=f"while apart {i}")
        # Syncing with a peer that can't be reached: the error is kept, with its time.
        before = time.time()
        with pytest.raises(PeerError):
            await b.sync.sync_now(context, peer_a)
        [(peer, connected, status)] = b.sync.peer_status(context)
        assert (peer, connected) == (peer_a, False)
        assert status is not None
        assert status.outcome == "failed"
        assert status.last_error
        assert status.last_error_at is not None
        assert status.last_error_at >= before
        assert status.last_success == joined_at
        failed_at = status.last_error_at

        await cluster.heal()
        assert await b.sync.sync_now(context, peer_a) == 3
        [(peer, connected, status)] = b.sync.peer_status(context)
        assert (peer, connected) == (peer_a, True)
        assert status is not None
        assert (status.outcome, status.protocol, status.deltas) == ("ok", "delta", 3)
        assert status.last_success is not None
        assert status.last_success >= failed_at
        assert status.last_error_at == failed_at  # the last error stays visible

        # In sync now: a session that had nothing to do is a success too.
        assert await b.sync.sync_now(context) == 0
        [(_, _, status)] = b.sync.peer_status(context)
        assert status is not None
        assert (status.outcome, status.protocol, status.deltas) == ("ok", "none", 0)
        # A's own view: connected to b, never synced with it (b pulled from a).
        [(peer, connected, status)] = a.sync.peer_status(context)
        assert (peer, connected, status) == (b.host.peer_id, True, None)


async def test_the_record_is_bounded_per_context(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    def one_peer(file: FileConfig) -> FileConfig:
        file = _quiet(file)
        return replace(file, sync=replace(file.sync, max_peer_status=1))

    async with open_cluster(3, tmp_path, configure=one_peer) as cluster:
        a, b, c = cluster.nodes
        context = await share(cluster, [0, 1, 2], app="chat")
        await a.sync.sync_now(context, b.host.peer_id)
        await a.sync.sync_now(context, c.host.peer_id)
        remembered = [p for p, _, status in a.sync.peer_status(context) if status is not None]
        assert remembered == [c.host.peer_id]
