"""Kademlia on an in-process memory network of 50 hosts: the time of one lookup (FIND_NODE for
a random key, alpha=3, k=20) beside one direct request/response round on the same network
(a FIND_NODE to one already-connected peer), measured in the same run.

Every host joins through host 0 and runs one bootstrap lookup (its own id); the lookups are
then timed from random hosts toward random keys, each followed by one baseline round.
Connections made by earlier lookups stay open, as on a running node, so this is the steady
state: a lookup is about 19 requests in rounds of alpha=3, and almost never a dial. Real
clock; the memory network has no latency of its own, so the figure is our CPU cost per
lookup (yamux, multistream, protobuf, scheduling), not the network's.
"""

from __future__ import annotations

import random
import time
from contextlib import AsyncExitStack

import trio
from prometheus_client import CollectorRegistry

from benchmarks.harness import Row
from trionode.config import NetworkSection
from trionode.net.host import Host
from trionode.net.kad import Kademlia, KadMetrics, read_message
from trionode.net.memory import MemoryNetwork
from trionode.net.metrics import NetMetrics
from trionode.wire import kad as wire
from trionode.wire.keys import PrivateKey


async def run(*, quick: bool) -> list[Row]:
    n = 20 if quick else 50
    lookups = 10 if quick else 40
    rng = random.Random(12)
    network = MemoryNetwork()
    config = NetworkSection(
        listen=["/ip4/0.0.0.0/tcp/4001"], ping_interval=3600, max_connections=4 * n
    )
    with trio.fail_after(900):
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            stop = trio.Event()
            stack.callback(stop.set)
            hosts: list[tuple[Host, Kademlia]] = []
            for _ in range(n):
                host = Host(
                    PrivateKey.generate(),
                    config,
                    NetMetrics(CollectorRegistry()),
                    transport=network.transport(),
                )
                kad = Kademlia(host, config, KadMetrics(None))
                await nursery.start(host.run, stop)
                hosts.append((host, kad))
            seed = hosts[0][0]
            for host, kad in hosts[1:]:
                conn = await host.connect(seed.listen_addrs[0].with_peer_id(seed.peer_id))
                await conn.identified.wait()
                await kad.bootstrap()
            # The baseline round runs right after each lookup, so both see the same load.
            asker = hosts[1][0]
            conn = asker.connections[seed.peer_id]
            request = wire.encode_message(
                wire.KadMessage(wire.MessageType.FIND_NODE, rng.randbytes(34))
            )
            lookup_ms: list[float] = []
            round_ms: list[float] = []
            for _ in range(lookups):
                _, kad = rng.choice(hosts)
                started = time.perf_counter()
                found = await kad.closest_peers(rng.randbytes(34))
                lookup_ms.append((time.perf_counter() - started) * 1000)
                assert len(found) == min(20, n - 1)
                started = time.perf_counter()
                _, stream = await conn.new_stream([config.kad.protocol])
                async with stream:
                    await stream.send_all(request)
                    await read_message(stream)
                round_ms.append((time.perf_counter() - started) * 1000)
    return [
        Row(
            f"kad: lookup in a {n}-node memory network (median ms)",
            sorted(lookup_ms)[len(lookup_ms) // 2],
            "ms",
            "one FIND_NODE round, same net",
            sorted(round_ms)[len(round_ms) // 2],
            higher_is_better=False,
        )
    ]
