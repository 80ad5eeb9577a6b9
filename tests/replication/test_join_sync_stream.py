"""A join negotiates its first sync's stream while the inviter admits it (the inviter's
durable write), and its session runs on that stream: one round trip less between the
admission and the snapshot (trionode/context/join.py, issue 17)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.replication.test_sync_protocols import LIMIT, create, entries, install, put, quiet
from trionode.context.errors import NotPermitted
from trionode.context.replication import SYNC_PROTOCOL, OpenedStream
from trionode.net.host import Connection
from trionode.node import Node
from trionode.testing import open_cluster
from trionode.wire.keys import PeerId


def _record_opened(monkeypatch: pytest.MonkeyPatch, node: Node) -> list[OpenedStream]:
    """The sync streams `node`'s joins open early, as they are opened."""
    opened: list[OpenedStream] = []
    original = node.replicator.open_sync_stream

    async def open_sync_stream(conn: Connection) -> OpenedStream:
        stream = await original(conn)
        opened.append(stream)
        return stream

    monkeypatch.setattr(node.replicator, "open_sync_stream", open_sync_stream)
    return opened


async def test_a_joins_first_sync_runs_on_the_stream_it_opened_while_admitted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path, configure=quiet) as cluster:
            a, c = cluster
            context = await create(a)
            await put(a, context, "k")
            await install(c)
            opened = _record_opened(monkeypatch, c)
            given: list[OpenedStream | None] = []
            sync_now = c.joins.sync_session
            assert sync_now is not None

            async def session(
                context_id: bytes, peer: PeerId, *, opened: OpenedStream | None = None
            ) -> int:
                given.append(opened)
                return await sync_now(context_id, peer, opened=opened)

            c.joins.sync_session = session
            served: list[Connection] = []
            serve = a.replicator._server.serve  # (counts the sync streams a serves)

            async def counted(stream: trio.abc.HalfCloseableStream, conn: Connection) -> Any:
                served.append(conn)
                return await serve(stream, conn)

            monkeypatch.setattr(a.replicator._server, "serve", counted)
            await c.joins.join(await a.joins.invite(context))
            assert len(opened) == 1
            assert given == opened  # the session was handed the stream the join opened ...
            assert opened[0].conn is c.host.connections[a.host.peer_id]
            assert opened[0].protocol == SYNC_PROTOCOL
            assert len(served) == 1  # ... and ran on it: no other sync stream reached a
            assert await entries(c, context) == {"k": "v"}


async def test_a_refused_join_closes_the_stream_it_opened(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=quiet) as cluster:
            a, b, c = cluster
            context = await create(a)
            await install(b)
            await install(c)
            invitation = await a.joins.invite(context)
            await b.joins.join(invitation)
            opened = _record_opened(monkeypatch, c)
            with pytest.raises(NotPermitted):
                await c.joins.join(invitation)  # (spent by b)
            assert len(opened) == 1
            with pytest.raises(trio.ClosedResourceError):
                await opened[0].stream.send_all(b"\x00")


async def test_a_session_opens_its_own_stream_when_the_given_one_is_on_another_connection(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path, configure=quiet) as cluster:
            a, b, c = cluster
            context = await create(a)
            await put(a, context, "k")
            await install(c)
            await c.joins.join(await a.joins.invite(context))
            to_b = c.host.connections[b.host.peer_id]
            elsewhere = await c.replicator.open_sync_stream(to_b)
            async with elsewhere.stream:
                peer = a.host.peer_id
                async with c.replicator.session(peer, context, opened=elsewhere) as (channel, conn):
                    assert conn is c.host.connections[peer]
                    assert channel._stream is not elsewhere.stream
                    heads = await c.replicator.ask_heads_on(channel, context)
                    assert heads.heads == (await a.contexts.state(context))[1]
