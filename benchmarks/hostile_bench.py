"""A member under attack: idle sockets and sybil connections against a real node.

Two real nodes on loopback TCP (``open_test_node``, default network limits): a *target*
that created a ``kv_store`` context and a *member* that joined it. One round is: the member
(disconnected) dials the target, runs a sync session with it (``sync_now``, what
``POST /contexts/{id}/sync`` does) and writes one entry; timed until the target has applied
the write. The figure is the median round with the attack running; the baseline is the
median round of the same two nodes before the attack starts, in the same run. The attacker
runs in the same process as both nodes, so the figure includes the CPU the attack takes
from them (on a real deployment the attacker pays for its own).

The attack, all from other loopback addresses than the member's 127.0.0.1:

* ``idle`` TCP sockets that never send a byte, spread over 127.0.0.2 to .4; each one the target
  closes is opened again at once, so the attacker keeps all it can;
* ``sybils`` throwaway identities (real Hosts that complete the handshake and answer pings,
  members of nothing) spread over 127.0.0.10 and up, 10 per address; each one refused or
  closed dials again after a short pause.

Standalone: ``python -m benchmarks.hostile_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio
from prometheus_client import CollectorRegistry

from benchmarks.harness import Row, render
from trionode.config import NetworkSection
from trionode.errors import PeerError, ProtocolError
from trionode.net.host import Host
from trionode.net.metrics import NetMetrics
from trionode.net.transport import TcpTransport
from trionode.node import Node
from trionode.testing import open_test_node
from trionode.wire.keys import PrivateKey
from trionode.wire.multiaddr import Multiaddr

KV_STORE: Final = Path(__file__).resolve().parents[1] / "apps" / "kv_store"
POLL: Final = 0.002
"""Seconds between checks of a condition (a benchmark may poll; tests never do)."""
SYBILS_PER_ADDRESS: Final = 10
REDIAL_PAUSE: Final = 0.2


class _FromAddress(TcpTransport):
    """TCP dials from one local loopback address (127.0.0.x)."""

    def __init__(self, source: str) -> None:
        self.source = source

    async def dial(self, addr: Multiaddr) -> trio.abc.Stream:
        hp = addr.tcp_host_port()
        assert hp is not None
        return await trio.open_tcp_stream(*hp, local_address=self.source)


async def _idle_socket(target: tuple[str, int], source: str) -> None:
    while True:
        try:
            tcp = await trio.open_tcp_stream(*target, local_address=source)
        except OSError:
            await trio.sleep(REDIAL_PAUSE)
            continue
        async with tcp:
            try:
                while await tcp.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass


async def _sybil(address: str, source: str) -> None:
    host = Host(
        PrivateKey.generate(),
        NetworkSection(listen=[], mdns=False, ping_interval=3600),
        NetMetrics(CollectorRegistry()),
        transport=_FromAddress(source),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, trio.Event())  # runs until cancelled
        while True:
            try:
                conn = await host.connect(address)
                await conn.session.wait_closed()
            except (PeerError, ProtocolError, trio.TooSlowError, OSError):
                pass
            await trio.sleep(REDIAL_PAUSE)


@asynccontextmanager
async def _attack(target: Node, idle: int, sybils: int) -> AsyncIterator[None]:
    hp = target.host.listen_addrs[0].tcp_host_port()
    assert hp is not None
    address = target.host.addresses()[0]
    async with trio.open_nursery() as nursery:
        for i in range(idle):
            nursery.start_soon(_idle_socket, hp, f"127.0.0.{2 + i % 3}")
        for i in range(sybils):
            nursery.start_soon(_sybil, address, f"127.0.0.{10 + i // SYBILS_PER_ADDRESS}")
        # Let the attack reach its steady state: the node full of sybils.
        with trio.move_on_after(30):
            while len(target.host.connections) < min(sybils, 64):  # noqa: ASYNC110
                await trio.sleep(0.05)
        yield
        nursery.cancel_scope.cancel()


async def _disconnect(member: Node, target: Node) -> None:
    conn = member.host.connections.get(target.host.peer_id)
    if conn is not None:
        await conn.aclose()
    while target.host.peer_id in member.host.connections or (  # noqa: ASYNC110
        member.host.peer_id in target.host.connections
    ):
        await trio.sleep(POLL)


async def _round(member: Node, target: Node, context: bytes, i: int) -> float:
    await _disconnect(member, target)
    key = f"round-{i}-{time.perf_counter_ns()}"
    started = time.perf_counter()
    await member.host.connect(target.host.addresses()[0])
    await member.sync.sync_now(context, target.host.peer_id)
    await member.contexts.execute(context, "set", json.dumps({"key": key, "value": "v"}))
    get = json.dumps({"key": key})
    while (await target.contexts.execute(context, "get", get)).result != "v":  # noqa: ASYNC110
        await trio.sleep(POLL)
    return time.perf_counter() - started


async def _rounds(member: Node, target: Node, context: bytes, n: int) -> float:
    with trio.fail_after(60 * n):
        return statistics.median([await _round(member, target, context, i) for i in range(n)])


def _log(message: str) -> None:
    print(f"  hostile: {message}", file=sys.stderr)


async def run(*, quick: bool) -> list[Row]:
    idle, sybils, rounds = (30, 20, 3) if quick else (300, 200, 10)
    with tempfile.TemporaryDirectory(prefix="trionode-hostile-bench-") as tmp:
        base = Path(tmp)
        async with (
            open_test_node(base / "target", api=False) as target_node,
            open_test_node(base / "member", api=False) as member_node,
        ):
            target, member = target_node.node, member_node.node
            app_id = (await target.applications.install(str(KV_STORE))).application_id
            await member.applications.install(str(KV_STORE))
            context = (await target.contexts.create(app_id)).context_id
            await member.joins.join(await target.joins.invite(context))
            baseline = await _rounds(member, target, context, rounds)
            _log(f"baseline round {baseline * 1000:.1f} ms")
            async with _attack(target, idle, sybils):
                _log(
                    f"attack running: {len(target.host.connections)} connections, "
                    f"{target.host.connmgr.statistics().pending_handshakes} pending handshakes"
                )
                attacked = await _rounds(member, target, context, rounds)
            _log(f"attacked round {attacked * 1000:.1f} ms")
    return [
        Row(
            f"member connect+sync+write, {idle} idle sockets + {sybils} sybils open (median)",
            attacked,
            "s",
            "same, no attack",
            baseline,
            higher_is_better=False,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hostile_bench")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
