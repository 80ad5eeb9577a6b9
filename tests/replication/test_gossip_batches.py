"""Deltas committed together are gossiped together: one `DeltaBatch` message (one pubsub
signature) per context, and a receiver submits a message's deltas together, so they
commit together there too; a bad delta in a batch fails alone."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from trionode.context.replication import topic_for
from trionode.errors import RemoteProtocolError
from trionode.net.events import GossipMessage
from trionode.testing import open_cluster
from trionode.wire.messages import (
    MAX_GOSSIP_DELTAS,
    DeltaBatch,
    DeltaGossip,
    decode_gossip,
    encode_gossip,
)

from .cluster_helpers import LIMIT, call, deltas, share, wait_converged

CONTEXT = b"\x07" * 32


def _set(key: str) -> str:
    return json.dumps({"key": key, "value": key})


async def test_concurrent_writes_go_out_in_fewer_messages_and_arrive(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context = await share(cluster, [0, 1], app="chat")
            with b.events.observe() as seen:
                async with trio.open_nursery() as nursery:
                    for i in range(32):
                        nursery.start_soon(
                            a.contexts.execute, context, "post", json.dumps({"text": f"m{i}"})
                        )
                await wait_converged(cluster, [a, b], context)
                messages = []
                while True:
                    try:
                        event = seen.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if isinstance(event, GossipMessage) and event.topic == topic_for(context):
                        messages.append(decode_gossip(event.data))
            carried = [
                len(m.deltas) if isinstance(m, DeltaBatch) else 1
                for m in messages
                if isinstance(m, DeltaBatch | DeltaGossip)
            ]
            assert sum(carried) == 32  # every delta gossiped once...
            assert len(carried) < 32  # ... in fewer messages: batches of what committed together
            assert max(carried) > 1
            texts = [m["text"] for m in await call(b, context, "messages")]
            assert sorted(texts) == sorted(f"m{i}" for i in range(32))


async def test_a_bad_delta_in_a_batch_fails_alone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context = await share(cluster, [0, 1])
            await cluster.partition([1])
            wires = []
            for key in ("x", "y"):
                result = await a.contexts.execute(context, "set", _set(key))
                assert result.delta_id is not None
                wire = await a.contexts.read_delta(context, result.delta_id)
                assert wire is not None
                wires.append(wire)
            invalid = deltas(b, "rejected_invalid")
            tampered = wires[1][:-1] + bytes([wires[1][-1] ^ 1])
            await b.replicator.receive_from(a.host.peer_id, context, wires[0], tampered, wires[1])
            assert deltas(b, "rejected_invalid") == invalid + 1
            assert await call(b, context, "get", key="x") == "x"
            assert await call(b, context, "get", key="y") == "y"


def test_batch_limits_are_enforced_on_decode() -> None:
    encoder = msgspec.msgpack.Encoder()

    def raw(deltas: list[bytes]) -> bytes:
        return encoder.encode({"type": "deltas/1", "context_id": CONTEXT, "deltas": deltas})

    assert decode_gossip(raw([b"d"] * MAX_GOSSIP_DELTAS)) == DeltaBatch(
        CONTEXT, [b"d"] * MAX_GOSSIP_DELTAS
    )
    for hostile in (
        raw([]),  # an empty batch
        raw([b"d"] * (MAX_GOSSIP_DELTAS + 1)),  # too many
        encoder.encode({"type": "deltas/1", "context_id": CONTEXT[:5], "deltas": [b"d"]}),
        encoder.encode({"type": "deltas/1", "context_id": CONTEXT, "deltas": [7]}),
        encoder.encode({"type": "deltas/1", "context_id": CONTEXT, "deltas": [b"d"], "extra": 1}),
        encoder.encode({"type": "deltas/2", "context_id": CONTEXT, "deltas": [b"d"]}),
    ):
        with pytest.raises(RemoteProtocolError):
            decode_gossip(hostile)
    batch = DeltaBatch(CONTEXT, [b"a", b"b"])
    assert decode_gossip(encode_gossip(batch)) == batch
