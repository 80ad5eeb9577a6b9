"""Circuit Relay v2 on loopback TCP: one stream's echo throughput and the time to connect,
through a trionode relay beside the same peers connected directly (measured in the same run).

Three hosts: R (relay.serve), A (reserved on R), B. "direct" is B dialing A's TCP address;
"relayed" is B dialing `<R>/p2p-circuit/p2p/<A>`: the relayed connection's Noise and yamux
run inside one yamux stream of each relay connection, so every byte crosses R's process.

**Join to first sync.** Whole nodes (R, inviter A, joiner B; fresh ones every round) on the
in-memory network under the wall clock: A creates a context, writes one entry and invites;
timed from B's ``joins.join(invitation)`` until B reads A's entry. "relayed": A is behind the
no-inbound NAT model with R as its relay, so the join dials the invitation's circuit
address; baseline "direct": the same without the NAT (the invitation's direct address
works). DCUtR is off so that the relayed round measures the relay and nothing else.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio
from msgspec.structs import replace
from prometheus_client import CollectorRegistry

from benchmarks.harness import Row
from trionode.config import DcutrSection, FileConfig, NetworkSection, NodeConfig, RelaySection
from trionode.net.host import Connection, Host
from trionode.net.memory import MemoryNetwork, NatKind
from trionode.net.metrics import NetMetrics
from trionode.net.relay import RelayClient, RelayServer
from trionode.node import open_node
from trionode.testing import cluster_file_config, make_test_config
from trionode.wire.keys import PeerId, PrivateKey

APPS = Path(__file__).resolve().parents[1] / "apps"

ECHO = "/bench/echo/1.0.0"
READ_SIZE = 256 * 1024


async def _echo(stream: trio.abc.Stream, _conn: Connection) -> None:
    while data := await stream.receive_some(READ_SIZE):
        await stream.send_all(data)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


@asynccontextmanager
async def _host(**settings: object) -> AsyncIterator[tuple[Host, RelayClient]]:
    config = NetworkSection(
        listen=["/ip4/127.0.0.1/tcp/0"],
        ping_interval=3600,
        **settings,  # type: ignore[arg-type]
    )
    host = Host(PrivateKey.generate(), config, NetMetrics(CollectorRegistry()))
    host.set_handler(ECHO, _echo)
    client = RelayClient(host, config)
    if config.relay.serve:
        RelayServer(host, config)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run, stop)
        await nursery.start(client.run, stop)
        yield host, client
        stop.set()


async def _echo_mb_per_s(conn: Connection, total: int) -> float:
    _, stream = await conn.new_stream([ECHO])
    chunk = b"\x5a" * (1 << 20)
    received = 0

    async def reader() -> None:
        nonlocal received
        while received < total and (data := await stream.receive_some(READ_SIZE)):
            received += len(data)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        sent = 0
        while sent < total:
            n = min(len(chunk), total - sent)
            await stream.send_all(chunk[:n])
            sent += n
        await stream.send_eof()
    elapsed = time.perf_counter() - started
    await stream.aclose()
    return total / elapsed / 1e6


async def _connect_ms(b: Host, address: str, peer: PeerId) -> tuple[float, Connection]:
    existing = b.connections.get(peer)
    if existing is not None:
        await existing.aclose()
        while peer in b.connections:
            await b.wait_connection_changed()
    started = time.perf_counter()
    conn = await b.connect(address)
    return (time.perf_counter() - started) * 1000, conn


def _node_config(home: Path, **network: object) -> NodeConfig:
    def settings(file: FileConfig) -> FileConfig:
        file = cluster_file_config(file)
        base: dict[str, object] = {
            "listen": ["/ip4/0.0.0.0/tcp/4001"],
            "bootstrap": [],
            "dcutr": DcutrSection(enabled=False),
        }
        return replace(file, network=replace(file.network, **(base | network)))

    config, _ = make_test_config(home, api=False, configure=settings)
    return replace(config, inline_store=True)


async def _join_to_first_sync_ms(base: Path, *, relayed: bool) -> float:
    network = MemoryNetwork()
    r_config = _node_config(base / "r", relay=RelaySection(serve=True))
    async with open_node(r_config, transport=network.transport()) as r:
        a_transport = network.transport()
        a_settings: dict[str, object] = {}
        if relayed:
            network.set_nat(a_transport, NatKind.NO_INBOUND)
            a_settings["relays"] = [r.host.addresses()[0]]
        async with (
            open_node(_node_config(base / "a", **a_settings), transport=a_transport) as a,
            open_node(_node_config(base / "b"), transport=network.transport()) as b,
        ):
            while relayed and not a.relay_client.circuit_addrs:
                await a.relay_client.wait_changed()
            app = (await a.applications.install(str(APPS / "kv_store"))).application_id
            await b.applications.install(str(APPS / "kv_store"))
            context = (await a.contexts.create(app)).context_id
            await a.contexts.execute(context, "set", json.dumps({"key": "x", "value": "1"}))
            invitation = await a.joins.invite(context)
            started = time.perf_counter()
            await b.joins.join(invitation)
            while (await b.contexts.execute(context, "entries", "{}")).result != {"x": "1"}:
                await b.pubsub.wait_heartbeat()
            elapsed = time.perf_counter() - started
            assert b.host.connections[a.host.peer_id].relayed == relayed
            return elapsed * 1000


async def _join_rows(rounds: int) -> Row:
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="trionode-relay-bench-") as tmp:
        for i in range(rounds):
            for relayed in (False, True):  # interleaved: both see the same machine load
                base = Path(tmp) / f"{i}-{relayed}"
                times[relayed].append(await _join_to_first_sync_ms(base, relayed=relayed))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return Row(
        "relay: join to first sync, median ms (in-memory network, wall clock)",
        median[True],
        "ms",
        "same nodes, direct",
        median[False],
        higher_is_better=False,
    )


async def run(*, quick: bool) -> list[Row]:
    total = (8 if quick else 64) << 20
    rounds = 3 if quick else 10
    with trio.fail_after(600):
        async with AsyncExitStack() as stack:
            r, _ = await stack.enter_async_context(
                _host(relay=RelaySection(serve=True, circuit_data=1 << 40))
            )
            a, a_client = await stack.enter_async_context(_host(relays=[r.addresses()[0]]))
            b, _ = await stack.enter_async_context(_host())
            while not a_client.circuit_addrs:
                await a_client.wait_changed()
            direct_addr = a.listen_addrs[0].with_peer_id(a.peer_id)
            relayed_addr = f"{a_client.circuit_addrs[r.peer_id][0]}/p2p/{a.peer_id}"
            times: dict[str, list[float]] = {"direct": [], "relayed": []}
            speed: dict[str, float] = {}
            for kind, address in (("direct", str(direct_addr)), ("relayed", relayed_addr)):
                conn: Connection | None = None
                for _ in range(rounds):
                    ms, conn = await _connect_ms(b, address, a.peer_id)
                    times[kind].append(ms)
                assert conn is not None
                assert conn.relayed == (kind == "relayed")
                speed[kind] = await _echo_mb_per_s(conn, total)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    join = await _join_rows(3 if quick else 7)
    return [
        Row(
            f"relay: echo {total >> 20} MiB through one stream (MB/s)",
            speed["relayed"],
            "MB/s",
            "same peers, direct TCP",
            speed["direct"],
        ),
        Row(
            "relay: connect (dial + Noise + yamux), median ms",
            median["relayed"],
            "ms",
            "same peers, direct TCP",
            median["direct"],
            higher_is_better=False,
        ),
        join,
    ]
