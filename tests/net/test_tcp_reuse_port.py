"""The TCP transport dials from its listen port (SO_REUSEPORT), the ground hole punching
stands on. Real sockets, loopback only."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trionode.net.transport import TcpTransport
from trionode.wire.multiaddr import Multiaddr

LOOPBACK = Multiaddr.from_string("/ip4/127.0.0.1/tcp/0")


async def _accepting(
    nursery: trio.Nursery, transport: TcpTransport
) -> tuple[Multiaddr, trio.MemoryReceiveChannel[Multiaddr | None]]:
    """Listen on loopback; each accepted connection's remote address goes to the channel."""
    listeners, bound = await transport.listen(LOOPBACK)
    send, receive = trio.open_memory_channel[Multiaddr | None](16)

    async def handler(stream: trio.abc.Stream) -> None:
        await send.send(transport.remote_address(stream))
        await trio.sleep_forever()  # keep it open: serve_listeners closes it on return

    for listener in listeners:
        nursery.start_soon(trio.serve_listeners, handler, [listener])
    return bound[0], receive


async def test_dials_leave_from_the_listen_port_and_peers_see_it() -> None:
    a, b = TcpTransport(reuse_port=True), TcpTransport(reuse_port=True)
    async with trio.open_nursery() as nursery:
        a_addr, _ = await _accepting(nursery, a)
        b_addr, b_accepted = await _accepting(nursery, b)
        stream = await a.dial(b_addr)
        # B sees A connect from A's listen address: what a port-keeping NAT would map.
        assert await b_accepted.receive() == a_addr
        assert a.source_port_dials == 1
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_second_dial_to_the_same_address_falls_back_to_an_ephemeral_port() -> None:
    a, b = TcpTransport(reuse_port=True), TcpTransport(reuse_port=True)
    async with trio.open_nursery() as nursery:
        a_addr, _ = await _accepting(nursery, a)
        b_addr, b_accepted = await _accepting(nursery, b)
        first = await a.dial(b_addr)
        second = await a.dial(b_addr)  # same 4-tuple taken by the first: EADDRNOTAVAIL
        remotes = {await b_accepted.receive() for _ in range(2)}
        assert a_addr in remotes
        assert len(remotes) == 2
        assert a.source_port_dials == 1
        await first.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()


async def test_the_other_direction_over_an_open_connection_still_dials() -> None:
    # B dialing A from B's port to A's port is the 4-tuple of A's connection to B.
    a, b = TcpTransport(reuse_port=True), TcpTransport(reuse_port=True)
    async with trio.open_nursery() as nursery:
        a_addr, a_accepted = await _accepting(nursery, a)
        b_addr, b_accepted = await _accepting(nursery, b)
        to_b = await a.dial(b_addr)
        assert await b_accepted.receive() == a_addr
        to_a = await b.dial(a_addr)
        assert await a_accepted.receive() not in {None, b_addr}
        await to_b.aclose()
        await to_a.aclose()
        nursery.cancel_scope.cancel()


async def test_another_node_cannot_listen_on_a_port_we_share_with_our_dials() -> None:
    ours = TcpTransport(reuse_port=True)
    async with trio.open_nursery() as nursery:
        addr, _ = await _accepting(nursery, ours)
        for other in (TcpTransport(reuse_port=True), TcpTransport()):
            with pytest.raises(OSError, match="in use"):
                await other.listen(addr)
        nursery.cancel_scope.cancel()


async def test_without_reuse_dials_come_from_ephemeral_ports() -> None:
    a, b = TcpTransport(), TcpTransport()
    async with trio.open_nursery() as nursery:
        a_addr, _ = await _accepting(nursery, a)
        b_addr, b_accepted = await _accepting(nursery, b)
        stream = await a.dial(b_addr)
        assert await b_accepted.receive() != a_addr
        await stream.aclose()
        assert a.source_port_dials == 0
        nursery.cancel_scope.cancel()
