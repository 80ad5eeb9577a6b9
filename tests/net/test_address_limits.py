"""Per-address shares of the handshake and connection slots, against a real Host.

127.0.0.0/8 is all loopback, so a client socket bound to 127.0.0.2, 127.0.0.3 … connects
from a different address (a different group) than the good peers, which use 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from trionode.net.multistream import select_protocol
from trionode.net.noise_stream import noise_handshake
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.noise import NOISE_PROTOCOL_ID
from trionode.wire.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID

from .host_helpers import (
    RunningHost,
    open_host,
    read_until_eof,
    tcp_target,
    wait_connected,
    wait_for,
)

pytestmark = pytest.mark.real_network


async def until(predicate: Callable[[], bool]) -> None:
    """Wait until `predicate()` holds: re-check whenever every task is blocked (on I/O)."""
    while not predicate():
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)


@attrs.frozen
class Sybil:
    peer_id: PeerId
    tcp: trio.SocketStream


@asynccontextmanager
async def open_sybil(target: RunningHost, source: str) -> AsyncIterator[Sybil | None]:
    """A throwaway identity from `source`: handshake by hand, then stay silent. Yields None
    when the handshake failed (the target closed the socket first); a refusal right after
    the handshake is only seen by the target."""
    key = PrivateKey.generate()
    tcp = await trio.open_tcp_stream(*tcp_target(target), local_address=source)
    async with tcp:
        try:
            _, stream = await select_protocol(tcp, [NOISE_PROTOCOL_ID])
            noise = await noise_handshake(
                stream, key, initiator=True, expected_peer_id=target.host.peer_id
            )
            await select_protocol(noise, [YAMUX_PROTOCOL_ID])
        except Exception:  # noqa: BLE001 - any failure here means "refused"
            yield None
            return
        yield Sybil(key.peer_id(), tcp)


async def test_idle_sockets_from_one_address_leave_handshake_slots_for_others() -> None:
    idle, per_address = 40, 4
    with trio.fail_after(20):
        # Handshakes would time out long after the test: only the per-address share helps.
        async with open_host(handshake_timeout=60) as target, open_host() as good:
            closed = 0
            extras_closed = trio.Event()

            async def stall() -> None:
                nonlocal closed
                tcp = await trio.open_tcp_stream(*tcp_target(target), local_address="127.0.0.2")
                async with tcp:
                    await read_until_eof(tcp)
                closed += 1
                if closed == idle - per_address:
                    extras_closed.set()

            async with trio.open_nursery() as nursery:
                for _ in range(idle):
                    nursery.start_soon(stall)
                await extras_closed.wait()
                assert (
                    target.sample(
                        "trionode_p2p_handshake_failures_total",
                        reason="too_many_pending_from_address",
                    )
                    == idle - per_address
                )
                assert target.host.connmgr.statistics().pending_handshakes == per_address
                # A peer from another address still gets in, and talks (the target registers
                # the connection a moment after the dialer's connect returns).
                await good.host.connect(target.address)
                await wait_connected(target, good)
                assert await good.host.ping(target.host.peer_id) > 0
                assert await target.host.ping(good.host.peer_id) > 0
                nursery.cancel_scope.cancel()


async def test_throwaway_identities_from_one_address_cannot_fill_max_connections() -> None:
    per_address, attempts = 3, 8
    with trio.fail_after(20):
        async with (
            open_host(max_connections=6, max_connections_per_address=per_address) as target,
            open_host() as good,
            trio.open_nursery() as nursery,
        ):

            async def hold(source: str) -> None:
                async with open_sybil(target, source):
                    await trio.sleep_forever()

            def refused() -> float:
                # Before the handshake (the address's handshake share) or right after it
                # (its connection share).
                return sum(
                    target.sample("trionode_p2p_handshake_failures_total", reason=reason)
                    for reason in ("address_limit", "too_many_pending_from_address")
                )

            for _ in range(attempts):
                nursery.start_soon(hold, "127.0.0.2")
            await until(lambda: refused() == attempts - per_address)
            await wait_for(lambda: len(target.host.connections) == per_address, target)
            # Other addresses still have room: a second crowd from 127.0.0.3 gets its
            # own share, and a good peer from 127.0.0.1 connects on top.
            for _ in range(per_address):
                nursery.start_soon(hold, "127.0.0.3")
            await wait_for(lambda: len(target.host.connections) == 2 * per_address, target)
            await good.host.connect(target.address)
            await wait_connected(target, good)
            assert await good.host.ping(target.host.peer_id) > 0
            # The cap (6) was full of sybils from two crowded groups; one was displaced.
            assert len(target.host.connections) == 6
            assert target.sample("trionode_p2p_closed_for_room_total", reason="displaced") == 1
            nursery.cancel_scope.cancel()


async def test_idle_sockets_from_many_addresses_give_way_to_a_real_handshake() -> None:
    addresses, per_address = 10, 4  # 40 idle sockets for 32 slots
    with trio.fail_after(20):
        async with open_host(handshake_timeout=60) as target, open_host() as good:
            opened = 0

            async def stall(source: str) -> None:
                nonlocal opened
                tcp = await trio.open_tcp_stream(*tcp_target(target), local_address=source)
                opened += 1
                async with tcp:
                    await read_until_eof(tcp)

            async with trio.open_nursery() as nursery:
                for i in range(addresses * per_address):
                    nursery.start_soon(stall, f"127.0.0.{2 + i % addresses}")

                def evicted() -> float:
                    return target.sample(
                        "trionode_p2p_handshake_failures_total", reason="evicted_pending"
                    )

                # Wait for what the *target* has seen: a client's connect can return before
                # the target's kernel has queued the socket (a loaded machine defers that),
                # so `opened` alone says nothing about the target. Each socket beyond the 32
                # slots took the slot of the oldest socket of a crowded address.
                extra = addresses * per_address - 32
                await until(
                    lambda: (
                        opened == addresses * per_address
                        and target.host.connmgr.statistics().pending_handshakes == 32
                        and evicted() == extra
                    )
                )
                # Every slot is held by an idle socket, yet a real handshake gets one the
                # same way.
                await good.host.connect(target.address)
                assert await good.host.ping(target.host.peer_id) > 0
                assert evicted() == extra + 1
                nursery.cancel_scope.cancel()
