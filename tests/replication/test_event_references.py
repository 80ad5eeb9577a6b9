"""Delta format 5 between real nodes: an app event that refers to its delta's record bytes
(kv_store's `Inserted` carries the key and value its records hold) travels by gossip and by
sync and opens to the same event everywhere; a member's delta whose event refers to a
piece its body lacks is refused, typed and counted, on every path, and changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest.mock import patch

import msgspec
import trio
import trio.testing
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

from trionode.context.replication import SYNC_PROTOCOL, _Channel
from trionode.crdt import Entity
from trionode.crdt.compact import EXT_CONTENT, EXT_LEAF, SealedRow
from trionode.dag.delta import (
    CompactBody5,
    CompactEvent,
    DeltaBody,
    SignedDelta,
    decode_delta,
    encode_compact_body,
    verify_delta,
)
from trionode.node import Node
from trionode.testing import open_cluster
from trionode.wire.messages import DeltaResponse

from .cluster_helpers import (
    LIMIT,
    body_of,
    call,
    deltas,
    drain,
    forge,
    gossip,
    member_key,
    share,
    subscribe,
    wait_converged,
    write,
)

VALUE = "v" * 100


async def compact_body(node: Node, context: bytes, delta_id: bytes) -> CompactBody5:
    """A stored delta's body as it travels (references not expanded)."""
    wire = await node.contexts.read_delta(context, delta_id)
    assert wire is not None
    delta = decode_delta(wire)
    header = verify_delta(delta, context_id=context)
    key = (await node.contexts.keys(context))[header.key_id]
    # (Format 4 and later bind the body to the context id and the header bytes.)
    plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
        delta.ciphertext, context + delta.header, header.nonce, key
    )
    return msgspec.msgpack.decode(plain, type=CompactBody5)


def inserted(events: list[Any]) -> list[dict[str, Any]]:
    return [e["payload"] for event in events for e in event.events if e["name"] == "Inserted"]


async def test_events_that_refer_to_record_bytes_arrive_whole_by_gossip_and_by_sync(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = nodes = list(cluster)
            context = await share(cluster, [0, 1, 2])
            seen_b, seen_c = subscribe(b, context), subscribe(c, context)
            by_gossip = await write(a, context, "set", key="gossiped", value=VALUE)
            await wait_converged(cluster, nodes, context)
            await cluster.partition([2])
            # Long enough for gossip's message cache to forget what follows: C can only
            # have it from a sync session once the partition heals.
            by_sync = await write(a, context, "set", key="synced", value=VALUE)
            await trio.sleep(60)
            await cluster.heal()
            await wait_converged(cluster, nodes, context)
            # Both deltas refer to their records from their events (format 5 pieces)...
            for delta_id in (by_gossip, by_sync):
                (event,) = (await compact_body(a, context, delta_id)).events
                assert not isinstance(event.payload, bytes)
                refs = [p for p in event.payload if isinstance(p, msgspec.msgpack.Ext)]
                assert refs
                assert {p.code for p in refs} <= {EXT_LEAF, EXT_CONTENT}
                assert sum(len(p) for p in event.payload if isinstance(p, bytes)) < len(VALUE)
            # ... and open whole on every node: subscribers, state and handler runs agree.
            shown_b, shown_c = inserted(drain(seen_b)), inserted(drain(seen_c))
            assert {"key": "gossiped", "value": VALUE} in shown_b
            assert {"key": "gossiped", "value": VALUE} in shown_c
            assert {"key": "synced", "value": VALUE} in shown_b
            assert {"key": "synced", "value": VALUE} in shown_c
            for node in nodes:
                assert await call(node, context, "get", key="synced") == VALUE
                assert deltas(node, "rejected_malformed") == 0


def _hostile(
    body: DeltaBody,
    *,
    author: bytes,
    hlc: int,
    version: int = 5,
    record_ids: Sequence[bytes] | None = None,
    entities: Sequence[Entity] | None = None,
    rows: dict[bytes, SealedRow] | None = None,
) -> bytes:
    """`body`'s plaintext as its author would write it, but with an event that refers to a
    byte string the body does not hold (a leaf index past the end)."""
    honest = msgspec.msgpack.decode(
        encode_compact_body(
            body,
            author=author,
            hlc=hlc,
            version=version,
            record_ids=record_ids,
            entities=entities,
            rows=rows,
        ),
        type=CompactBody5,
    )
    missing = msgspec.msgpack.Ext(EXT_LEAF, (200).to_bytes(1, "big"))
    events = [CompactEvent("Inserted", [b'{"key":"k","value":"', missing, b'"}'])]
    return msgspec.msgpack.encode(CompactBody5(honest.records, events))


async def forge_hostile(node: Node, context: bytes, donor: bytes) -> SignedDelta:
    """A delta by `node`'s own member (a real writer, signed, sealed with the real context
    key) carrying a real `set`'s records, whose event refers to a piece its body lacks."""
    records = await body_of(node, donor, await write(node, donor, "set", key="k", value=VALUE))
    body = DeltaBody(records.records, [])  # (`_hostile` writes the event)
    with patch("trionode.dag.delta.encode_compact_body", _hostile):
        return await forge(node, context, await member_key(node, context), body)


async def test_an_event_referring_to_a_missing_piece_is_refused_by_gossip_and_by_sync(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = nodes = list(cluster)
            context = await share(cluster, [0, 1, 2])
            await write(a, context, "set", key="before", value=VALUE)
            await wait_converged(cluster, nodes, context)
            before = {node: await node.contexts.state(context) for node in nodes}
            app_id = (await b.contexts.get(context)).application_id
            donor = (await b.contexts.create(app_id)).context_id
            hostile = await forge_hostile(b, context, donor)

            # By gossip: every receiver refuses it, counts it, stores nothing.
            counts = [deltas(n, "rejected_malformed") for n in (a, c)]
            gossip(b, context, hostile.encode())
            await cluster.settle()
            assert [deltas(n, "rejected_malformed") for n in (a, c)] == [x + 1 for x in counts]

            # Handed in directly: the typed refusal names what is wrong.
            received = await c.contexts.receive(context, hostile.encode())
            assert received.applied == []
            assert [(i, why) for i, why in received.rejected if i == hostile.id]
            (why,) = [why for i, why in received.rejected if i == hostile.id]
            assert "byte string the body lacks" in why

            # By sync: a peer that serves it when asked for it fares no better.
            async def serving_it(stream: trio.abc.HalfCloseableStream, _conn: Any) -> None:
                channel = _Channel(stream)
                await channel.receive()  # auth
                while await channel.receive(eof_ok=True) is not None:
                    await channel.send(DeltaResponse(deltas=[hostile.encode()], missing=[]))
                await stream.send_eof()

            b.host.set_handler(SYNC_PROTOCOL, serving_it)
            count = deltas(a, "rejected_malformed")
            assert await a.replicator.fetch(cluster.peer_ids[1], context, {hostile.id}) == 0
            assert deltas(a, "rejected_malformed") == count + 1
            b.host.set_handler(SYNC_PROTOCOL, b.replicator._serve_sync)

            for node in nodes:
                assert await node.contexts.read_delta(context, hostile.id) is None
                assert await node.contexts.state(context) == before[node]
                assert await call(node, context, "get", key="k") is None
            # The context goes on: a write after it reaches everyone.
            await write(b, context, "set", key="after", value=VALUE)
            await wait_converged(cluster, nodes, context)
            assert {await call(n, context, "get", key="after") for n in nodes} == {VALUE}
