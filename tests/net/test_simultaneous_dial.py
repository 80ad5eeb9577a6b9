"""Two hosts that dial each other at the same instant (both ends of a healed partition do).

Both keep the connection the smaller peer id initiated; the other one is retired, not cut:
a stream either end opened on it before it learned which one won runs to its end. Hosts on
the in-process memory network under `autojump_clock`: the interleaving is the same on every
run, and the seconds a session takes are virtual.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from trionode.net.host import Connection, Host
from trionode.net.memory import MemoryNetwork
from trionode.net.metrics import NetMetrics
from trionode.net.transport import Transport
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multiaddr import Multiaddr

from .host_helpers import network as network_section

SESSION = "/trionode-test/session/1"
WORK = 0.5
"""Virtual seconds the serving side works on a request (a sync session's storage reads)."""


async def _serve_session(stream: trio.abc.HalfCloseableStream, _conn: Connection) -> None:
    """Three request/answer rounds, each answered after `WORK` seconds."""
    while request := await stream.receive_some(1024):
        await trio.sleep(WORK)
        await stream.send_all(b"re:" + bytes(request))
    await stream.send_eof()


async def _session(host: Host, peer: PeerId) -> list[bytes]:
    """What a sync session does: open a stream to `peer` on the connection it has now and
    run a few round trips on it."""
    _, stream = await host.new_stream(peer, [SESSION])
    answers = []
    async with stream:
        for i in range(3):
            await stream.send_all(b"q%d" % i)
            answers.append(bytes(await stream.receive_some(1024)))
        await stream.send_eof()
        assert await stream.receive_some(1024) == b""
    return answers


def _open(registry: CollectorRegistry) -> float:
    return sum(
        registry.get_sample_value("trionode_p2p_connections", {"direction": d}) or 0.0
        for d in ("inbound", "outbound")
    )


@asynccontextmanager
async def _two_hosts(**overrides: Any) -> AsyncIterator[list[tuple[Host, CollectorRegistry]]]:
    network = MemoryNetwork()
    settings: dict[str, Any] = {"listen": ["/ip4/0.0.0.0/tcp/4001"]}
    settings.update(overrides)
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stop = trio.Event()
        stack.callback(stop.set)
        out = []
        for _ in range(2):
            registry = CollectorRegistry()
            host = Host(
                PrivateKey.generate(),
                network_section(**settings),
                NetMetrics(registry),
                transport=network.transport(),
            )
            host.set_handler(SESSION, _serve_session)
            await nursery.start(host.run, stop)
            out.append((host, registry))
        yield out


def _address(host: Host) -> str:
    return str(host.listen_addrs[0].with_peer_id(host.peer_id))


class _SlowDials:
    """A transport whose dials wait `delay` seconds before connecting (a longer path)."""

    def __init__(self, inner: Transport, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    async def listen(
        self, addr: Multiaddr
    ) -> tuple[Sequence[trio.abc.Listener[trio.abc.Stream]], list[Multiaddr]]:
        return await self.inner.listen(addr)

    async def dial(self, addr: Multiaddr) -> trio.abc.Stream:
        await trio.sleep(self.delay)
        return await self.inner.dial(addr)

    def remote_address(self, stream: trio.abc.Stream) -> Multiaddr | None:
        return self.inner.remote_address(stream)


@pytest.mark.parametrize("slow", ["smaller", "larger"])
async def test_dialling_each_other_at_once_keeps_one_connection_and_both_sessions_succeed(
    slow: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Both dial at once; one dial takes a little longer (`_SlowDials`), so the other end's
    connection is up first and a session starts on it at once. When the slower one arrives,
    the connection the smaller peer id initiated wins on both ends: when that is the later
    one, the session already running on the earlier one must still finish."""
    with trio.fail_after(60):
        async with _two_hosts() as hosts:
            (a, a_metrics), (b, b_metrics) = hosts
            small, large = sorted((a, b), key=lambda h: bytes(h.peer_id.multihash))
            late = small if slow == "smaller" else large
            late.transport = _SlowDials(late.transport, WORK / 5)
            results: dict[PeerId, list[bytes]] = {}

            async def dial_then_session(host: Host, other: Host) -> None:
                await host.connect(_address(other))
                results[host.peer_id] = await _session(host, other.peer_id)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(dial_then_session, a, b)
                nursery.start_soon(dial_then_session, b, a)
            # Neither session was cut by the other end closing the connection it ran on.
            answers = [b"re:q0", b"re:q1", b"re:q2"]
            assert results == {a.peer_id: answers, b.peer_id: answers}

            await trio.sleep(a.config.replaced_connection_grace)
            await trio.testing.wait_all_tasks_blocked()
            # One connection each, the same one: the one the smaller peer id initiated.
            a_conn, b_conn = a.connections[b.peer_id], b.connections[a.peer_id]
            assert a_conn.initiator(a.peer_id) == small.peer_id == b_conn.initiator(b.peer_id)
            assert a_conn.outbound != b_conn.outbound
            assert _open(a_metrics) == _open(b_metrics) == 1
            assert not a_conn.closed
            assert not b_conn.closed
            assert await _session(a, b.peer_id) == answers
            assert await _session(b, a.peer_id) == answers


async def test_a_retired_connection_closes_when_idle_and_a_stream_cannot_hold_it_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The loser of a simultaneous dial stays open while a stream on it runs, closes once
    none is open, and a stream that never ends is cut at `replaced_connection_drain`: a
    peer cannot keep a second connection for good."""
    with trio.fail_after(120):
        async with _two_hosts(replaced_connection_grace=1.0, replaced_connection_drain=10.0) as (
            (a, _),
            (b, _),
        ):
            small, large = sorted((a, b), key=lambda h: bytes(h.peer_id.multihash))
            release = trio.Event()

            async def hold(stream: trio.abc.HalfCloseableStream, _conn: Connection) -> None:
                await stream.send_all(b"held")
                await release.wait()
                await stream.send_eof()

            small.set_handler("/trionode-test/hold/1", hold)
            for forever in (False, True):
                # The larger peer id's connection is up first; the smaller's dial wins later.
                first = await large.connect(_address(small))
                _, stream = await first.new_stream(["/trionode-test/hold/1"])
                assert await stream.receive_some(10) == b"held"
                # (`connect` would reuse `first`: this dials even while connected.)
                winner = await small.dial_direct(
                    large.listen_addrs[0], large.peer_id, initiator=True
                )
                assert small.connections[large.peer_id] is winner
                await trio.testing.wait_all_tasks_blocked()
                retired_at = trio.current_time()
                kept = large.connections[small.peer_id]  # new streams go to the winner
                assert kept is not first
                assert kept.initiator(large.peer_id) == small.peer_id
                await trio.sleep(5.0)
                assert not first.closed  # its stream is still open
                if not forever:
                    release.set()
                    assert await stream.receive_some(10) == b""
                    await stream.aclose()
                await first.session.wait_closed()
                took = trio.current_time() - retired_at
                if forever:
                    assert took == pytest.approx(10.0, abs=0.1)  # the drain limit
                    with pytest.raises(trio.BrokenResourceError):
                        await stream.receive_some(10)
                else:
                    assert took == pytest.approx(5.0, abs=0.1)  # as soon as it was idle
                # The winner carries on; drop it so the next round dials afresh.
                assert not winner.closed
                await winner.aclose()
                await trio.testing.wait_all_tasks_blocked()
                release = trio.Event()
