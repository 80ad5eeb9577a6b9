"""SCENARIOS 22-23: restarts restore heads, pending deltas and unfinished handler runs;
pending deltas whose parents never come are evicted without blocking the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from msgspec.structs import replace

from trionode.config import FileConfig, NodeConfig
from trionode.context.records import HANDLER_PREFIX, HANDLER_RUNS, HandlerRun
from trionode.dag.delta import decode_delta, stored_header, verify_delta
from trionode.node import Node, open_node
from trionode.testing import make_test_config

from .helpers import APPS

pytestmark = pytest.mark.real_network


def _alone(file: FileConfig) -> FileConfig:
    # Nobody redials the peer the test disconnected: no discovery toward a peer target, and
    # members (dialed past any target once a pubsub heartbeat recorded them) not for an hour.
    network = replace(
        file.network, target_peers=0, redial_initial_backoff=3600.0, redial_max_backoff=3600.0
    )
    return replace(file, network=network)


async def _disconnect(a: Node, b: Node) -> None:
    conn = b.host.connections[a.host.peer_id]
    await conn.aclose()
    with trio.fail_after(10):
        # A host drops a connection from its table when the connection's task ends (its
        # streams cancelled), which is after `aclose` returns, and may be after the far end
        # has noticed the close: wait for each end.
        for here, there in ((b, a), (a, b)):
            while there.host.peer_id in here.host.connections:
                await here.host.wait_connection_changed()


async def _two_deltas(node: Node, context: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Two deltas written in a row on `node`: (id1, wire1, id2, wire2), the second a child."""
    out: list[bytes] = []
    for i in range(2):
        result = await node.contexts.execute(
            context, "set", json.dumps({"key": f"k{i}", "value": str(i)})
        )
        assert result.delta_id is not None
        wire = await node.contexts.read_delta(context, result.delta_id)
        assert wire is not None
        out += [result.delta_id, wire]
    assert verify_delta(decode_delta(out[3]), context_id=context).parents == [out[0]]
    return out[0], out[1], out[2], out[3]


async def test_restart_restores_heads_pending_and_handler_runs(tmp_path: Path) -> None:
    config_a, _ = make_test_config(tmp_path / "a", api=False, configure=_alone)
    config_b, _ = make_test_config(tmp_path / "b", api=False, configure=_alone)
    with trio.fail_after(60):
        async with open_node(config_a) as a:
            app = await a.applications.install(str(APPS / "kv_store"))
            context = (await a.contexts.create(app.application_id)).context_id
            async with open_node(config_b) as b:
                await b.applications.install(str(APPS / "kv_store"))
                await b.host.connect(a.host.addresses()[0])
                await b.joins.join(await a.joins.invite(context))
                heads_before = (await b.contexts.state(context))[1]
                # Disconnect first so that gossip cannot deliver a's next deltas to b.
                await _disconnect(a, b)
                # a writes two deltas while b is "elsewhere": b only ever gets the second.
                id1, wire1, id2, wire2 = await _two_deltas(a, context)
                received = await b.contexts.receive(context, wire2)
                assert received.missing == {id1}
                # An event whose handler had not run when the node stopped.
                await b.store.put(
                    HANDLER_RUNS,
                    HANDLER_PREFIX + context + id2 + (0).to_bytes(4, "big"),
                    HandlerRun(name="Inserted", payload=b'{"key": "k1", "value": "1"}'),
                )
                b.contexts.wake_handlers()  # (the runner may already take it)
        # With a stopped: b remembers a as a member peer (its inviter) and would redial it
        # at once, and a sync could fill the gap before the checks below run.
        await _restart_and_check(config_b, context, heads_before, id1, wire1, id2)


async def _restart_and_check(  # noqa: PLR0917
    config: NodeConfig,
    context: bytes,
    heads_before: list[bytes],
    id1: bytes,
    wire1: bytes,
    id2: bytes,
) -> None:
    async with open_node(config) as b:
        _, _, pending = await b.contexts.state(context)
        assert pending == 1  # the pending delta survived the restart
        # The unfinished handler run runs exactly once after the restart (the runner does it
        # at start; running the queue again finds nothing left to run).
        await b.contexts.run_pending_handlers()
        assert await b.store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX) == []
        calls = (await b.contexts.execute(context, "handler_calls", "{}")).result
        assert calls == 1
        # Restored, nothing re-applied: the one new head is the run's delta, written on the
        # heads from before the restart. (Whether the runner has taken the run when the node
        # is up is a race, so the heads are compared once it surely has.)
        root, (run_delta,), _ = await b.contexts.state(context)
        wire = await b.contexts.read_delta(context, run_delta)
        assert wire is not None
        assert stored_header(decode_delta(wire), context_id=context).parents == heads_before
        # The missing parent arrives: both apply, in order.
        received = await b.contexts.receive(context, wire1)
        assert received.applied == [id1, id2]
        _, heads, pending = await b.contexts.state(context)
        assert pending == 0
        assert id2 in heads
        assert root != (await b.contexts.state(context))[0]


async def test_pending_eviction_does_not_block_others(tmp_path: Path) -> None:
    config, _ = make_test_config(tmp_path / "a", api=False, configure=_alone)
    with trio.fail_after(60):
        async with open_node(config) as a:
            app = await a.applications.install(str(APPS / "chat"))
            context = (await a.contexts.create(app.application_id)).context_id
            config_b, _ = make_test_config(tmp_path / "b", api=False, configure=_alone)
            async with open_node(config_b) as b:
                await b.applications.install(str(APPS / "chat"))
                await b.host.connect(a.host.addresses()[0])
                await b.joins.join(await a.joins.invite(context))
                await _disconnect(a, b)
                ids: list[bytes] = []
                wires: list[bytes] = []
                for text in ("one", "two", "three"):
                    result = await a.contexts.execute(context, "post", json.dumps({"text": text}))
                    assert result.delta_id is not None
                    wire = await a.contexts.read_delta(context, result.delta_id)
                    assert wire is not None
                    ids.append(result.delta_id)
                    wires.append(wire)
                # b gets the third (parent: the second, which never comes) ...
                assert (await b.contexts.receive(context, wires[2])).missing == {ids[1]}
                registry = b.metrics.registry
                evicted = registry.get_sample_value("trionode_deltas_total", {"outcome": "evicted"})
                assert await b.contexts.expire_pending(0.0) == 1
                assert (
                    registry.get_sample_value("trionode_deltas_total", {"outcome": "evicted"})
                    == (evicted or 0) + 1
                )
                # ... and the first, which does not depend on it, applies normally.
                assert (await b.contexts.receive(context, wires[0])).applied == [ids[0]]
                assert (await b.contexts.state(context))[2] == 0
