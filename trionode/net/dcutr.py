"""DCUtR driver: turn a relayed connection into a direct one by a synchronised hole punch.

```
HolePuncher.run ── its nursery (started by open_node)
   ├─ follow_connections          each new *inbound relayed* connection (we are B) whose
   │                              peer speaks /libp2p/dcutr → _drive(conn)
   └─ _drive(conn)                up to `dcutr.attempts` attempts, each within
                                  `dcutr.attempt_timeout`: a /libp2p/dcutr stream on the
                                  relayed connection (wire/dcutr.py does the exchange), then
                                  dial A's addresses as the *responder* after rtt/2
handler /libp2p/dcutr (we are A; runs in the relayed connection's stream task):
   answer CONNECT with our addresses; on SYNC dial B's addresses as the *initiator*
```

Both sides dial from their listen port (``network.tcp_reuse_port``), so each side's SYN opens
its own NAT for the other's. Whichever dial connects, A is the initiator above TCP: a
simultaneous open (the SYNs cross) gives one socket per side with consistent roles; a SYN that
reaches A's listener instead meets two responders and times out, while A's own dial to B's
listener works. The first direct connection registered replaces the relayed one (Host keeps a
direct connection over a relayed one; the relayed one closes after `dcutr.handover_grace`).
When every attempt fails the relayed connection simply stays.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence

import trio
from prometheus_client import CollectorRegistry, Counter

from trionode.config import NetworkSection
from trionode.errors import PeerError, ProtocolError, RemoteProtocolError
from trionode.net.events import follow_connections
from trionode.net.host import Connection, Host
from trionode.wire import dcutr as wire
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

log = logging.getLogger(__name__)

_FAILURES = (
    PeerError,
    ProtocolError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class HolePuncher:
    """Both DCUtR roles for one Host. Constructing it installs the handler."""

    def __init__(
        self, host: Host, config: NetworkSection, registry: CollectorRegistry | None = None
    ) -> None:
        self._host = host
        self._config = config
        self._limiter = trio.CapacityLimiter(config.dcutr.max_concurrent)
        self.upgraded = 0
        """Relayed connections replaced by a direct one (either role)."""
        self.failed = 0
        """Relayed connections we drove that stayed relayed after every attempt."""
        self.outcomes: collections.Counter[str] = collections.Counter()
        """Relayed connections we drove, by outcome (as the metric below)."""
        self._metrics = Counter(
            "trionode_dcutr_outcomes",
            "Relayed connections we received, by what became of them: direct_dial (the peer "
            "was dialable), hole_punch (DCUtR made it direct), relayed (it stays relayed)",
            ["outcome"],
            registry=registry,
        )
        self._changed = trio.Event()
        host.set_handler(wire.PROTOCOL, self._serve)

    async def wait_changed(self) -> None:
        """Until a hole punch we drove ends, either way (tests)."""
        await self._changed.wait()

    def _outcome(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self._metrics.labels(outcome).inc()
        self._ended(upgraded=outcome != "relayed")

    def _ended(self, *, upgraded: bool) -> None:
        if upgraded:
            self.upgraded += 1
        else:
            self.failed += 1
        self._changed.set()
        self._changed = trio.Event()

    async def run(
        self,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:

            def opened(conn: Connection) -> None:
                if conn.relayed and not conn.outbound:  # we received it: we are B, we drive
                    nursery.start_soon(self._drive, conn, name=f"dcutr {conn.peer_id}")

            await nursery.start(follow_connections, self._host, opened, lambda _conn: None)
            task_status.started()
            if shutdown_requested is not None:
                await shutdown_requested.wait()
                nursery.cancel_scope.cancel(reason="node shutting down")

    def _our_addresses(self) -> list[Multiaddr]:
        """What we tell the peer to dial: advertised direct addresses, then the addresses
        peers observed us at (a NAT's mapping of our listen port)."""
        out: list[Multiaddr] = []
        candidates = list(self._host.advertised_addrs) + [
            conn.observed_addr
            for conn in self._host.connections.values()
            if conn.observed_addr is not None and not conn.relayed
        ]
        for addr in candidates:
            if addr.is_circuit():
                continue
            if addr.tcp_host_port() is not None and addr not in out:
                out.append(addr)
        return out[: wire.MAX_ADDRS]

    def _direct(self, peer: PeerId) -> bool:
        conn = self._host.connections.get(peer)
        return conn is not None and not conn.closed and not conn.relayed

    # -- B: we received the relayed connection and drive ------------------------------------

    async def _drive(self, conn: Connection) -> None:
        dcutr = self._config.dcutr
        with trio.move_on_after(self._config.negotiation_timeout):
            await conn.identified.wait()
        if not dcutr.enabled:
            return
        async with self._limiter:
            # The spec's first step: the peer may simply be dialable (a public node dialed us
            # through our relay). A normal dial, we are its initiator.
            if await self._dial_directly(conn):
                log.info("%s: direct connection (it is dialable)", conn.peer_id)
                self._outcome("direct_dial")
                return
            if wire.PROTOCOL not in conn.protocols:
                return
            for attempt in range(1, dcutr.attempts + 1):
                if conn.closed or self._direct(conn.peer_id):
                    break
                try:
                    with trio.fail_after(dcutr.attempt_timeout):
                        if await self._attempt(conn):
                            log.info("%s: direct connection after hole punching", conn.peer_id)
                            self._outcome("hole_punch")
                            return
                except _FAILURES as exc:
                    log.info(
                        "hole punch to %s, attempt %d: %s",
                        conn.peer_id,
                        attempt,
                        str(exc) or "timeout",
                    )
        if self._direct(conn.peer_id):
            self._outcome("hole_punch")  # the peer's dial won while ours was failing
        else:
            log.info("%s stays relayed: hole punching failed", conn.peer_id)
            self._outcome("relayed")

    async def _dial_directly(self, conn: Connection) -> bool:
        addrs = [
            addr.without_peer_id()
            for addr in conn.listen_addrs
            if addr.tcp_host_port() is not None and not addr.is_circuit()
        ][: wire.MAX_ADDRS]
        if not addrs:
            return False
        with trio.move_on_after(self._config.dcutr.direct_dial_timeout):
            return await self._dial_all(conn.peer_id, addrs, initiator=True)
        return False

    async def _attempt(self, conn: Connection) -> bool:
        exchange = wire.HolePunchInitiator(conn.peer_id, self._our_addresses())
        _, stream = await conn.new_stream(
            [wire.PROTOCOL], negotiation_timeout=self._config.negotiation_timeout
        )
        async with stream:
            exchange.start(trio.current_time())
            await stream.send_all(exchange.data_to_send())
            dial = None
            while dial is None:
                data = await stream.receive_some(wire.MAX_MESSAGE_SIZE)
                if not data:
                    raise RemoteProtocolError("hole punch stream ended before CONNECT")
                dial = exchange.receive_data(data, trio.current_time())
            await stream.send_all(exchange.data_to_send())
        await trio.sleep(min(dial.delay, self._config.dcutr.max_sync_delay))
        return await self._dial_all(conn.peer_id, dial.addrs, initiator=False)

    # -- A: we dialed through the relay and answer -------------------------------------------

    async def _serve(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        if not conn.relayed or not self._config.dcutr.enabled:
            return  # a direct connection needs no punching; closing the stream says no
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            exchange = wire.HolePunchResponder(conn.peer_id, self._our_addresses())
            with trio.fail_after(self._config.dcutr.attempt_timeout):
                dial = None
                while dial is None:
                    data = await stream.receive_some(wire.MAX_MESSAGE_SIZE)
                    if not data:
                        return
                    dial = exchange.receive_data(data)
                    if reply := exchange.data_to_send():
                        await stream.send_all(reply)
                if await self._dial_all(conn.peer_id, dial.addrs, initiator=True):
                    log.info("%s: direct connection after hole punching", conn.peer_id)
                    self._ended(upgraded=True)
        finally:
            self._limiter.release()

    # -- both ----------------------------------------------------------------------------------

    async def _dial_all(self, peer: PeerId, addrs: Sequence[Multiaddr], *, initiator: bool) -> bool:
        """Dial every address at once; True as soon as a direct connection to ``peer`` exists
        (ours, or the peer's dial that our listener accepted). The rest are cancelled."""
        won = False
        async with trio.open_nursery() as nursery:

            async def dial(addr: Multiaddr) -> None:
                try:
                    await self._host.dial_direct(addr, peer, initiator=initiator)
                except _FAILURES as exc:
                    log.debug("hole punch dial %s: %s", addr, exc)

            async def watch() -> None:
                nonlocal won
                while not self._direct(peer):
                    await self._host.wait_connection_changed()
                won = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            async with trio.open_nursery() as dials:
                for addr in addrs:
                    dials.start_soon(dial, addr)
            won = self._direct(peer)
            nursery.cancel_scope.cancel()
        return won
