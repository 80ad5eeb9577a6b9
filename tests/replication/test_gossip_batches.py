"""Deltas committed together are gossiped together: one `DeltaBatch` message (one pubsub
signature) per context, and a receiver submits a message's deltas together, so they
commit together there too; a bad delta in a batch fails alone. Deltas of one author that
chain go as a `SharedDeltaBatch`, sharing the author's key and their parents' ids."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from trionode.context.replication import batch_of, topic_for
from trionode.dag.delta import SignedDelta, decode_delta
from trionode.errors import RemoteProtocolError
from trionode.net.events import GossipMessage
from trionode.node import Node
from trionode.testing import open_cluster
from trionode.wire.messages import (
    MAX_GOSSIP_DELTAS,
    DeltaBatch,
    DeltaGossip,
    SharedDeltaBatch,
    TopicDelta,
    decode_gossip,
    encode_gossip,
)

from .cluster_helpers import LIMIT, call, deltas, install, share, wait_converged

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
            written: list[bytes | None] = []

            async def post(i: int) -> None:
                result = await a.contexts.execute(context, "post", json.dumps({"text": f"m{i}"}))
                written.append(result.delta_id)

            with b.events.observe() as seen:
                async with trio.open_nursery() as nursery:
                    for i in range(32):
                        nursery.start_soon(post, i)
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
                len(m.deltas) if isinstance(m, DeltaBatch | SharedDeltaBatch) else 1
                for m in messages
                if isinstance(m, DeltaBatch | SharedDeltaBatch | TopicDelta)
            ]
            # Calls that queued together are one delta (`pipeline._Merge`): every delta
            # gossiped once, far fewer deltas and messages than posts. (Several deltas in one
            # shared batch: `test_a_shared_batch_arrives_and_a_forged_one_does_not`.)
            deltas = {d for d in written if d is not None}
            assert len(written) == 32
            assert sum(carried) == len(deltas) < 32
            assert len(carried) < 32
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
            wires = [d.encode() for d in await _chain_of_two(a, context)]
            invalid = deltas(b, "rejected_invalid")
            tampered = wires[1][:-1] + bytes([wires[1][-1] ^ 1])
            await b.replicator.receive_from(a.host.peer_id, context, wires[0], tampered, wires[1])
            assert deltas(b, "rejected_invalid") == invalid + 1
            assert await call(b, context, "get", key="x") == "x"
            assert await call(b, context, "get", key="y") == "y"


async def _chain_of_two(a: Node, context: bytes) -> list[SignedDelta]:
    out = []
    for key in ("x", "y"):
        result = await a.contexts.execute(context, "set", _set(key))
        assert result.delta_id is not None
        wire = await a.contexts.read_delta(context, result.delta_id)
        assert wire is not None
        out.append(decode_delta(wire))
    return out


def _gossip(
    a: Node,
    context: bytes,
    message: SharedDeltaBatch | TopicDelta | DeltaGossip,
) -> GossipMessage:
    return GossipMessage(
        topic=topic_for(context),
        data=encode_gossip(message),
        author=a.host.peer_id,
        seqno=1,
        message_id=b"m",
        received_from=a.host.peer_id,
    )


async def test_a_shared_batch_arrives_and_a_forged_one_does_not(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context = await share(cluster, [0, 1])
            await cluster.partition([1])
            chain = await _chain_of_two(a, context)
            good = batch_of(context, chain)
            assert isinstance(good, SharedDeltaBatch)
            plain = encode_gossip(DeltaBatch(context, [d.encode() for d in chain]))
            assert len(encode_gossip(good)) < len(plain) - 32  # the key and a parent id
            # Refs to nothing: the message is malformed, nothing of it applies.
            malformed = deltas(b, "rejected_malformed")
            broken = SharedDeltaBatch(context, good.shared, [good.deltas[0], [*good.deltas[1], 9]])
            await b.replicator.on_gossip(_gossip(a, context, broken))
            assert deltas(b, "rejected_malformed") == malformed + 1
            assert await call(b, context, "get", key="x") is None
            # A forged second delta (a flipped byte in a literal part) fails its signature
            # alone; the first applies.
            invalid = deltas(b, "rejected_invalid")
            last = good.deltas[1][-1]
            assert isinstance(last, bytes)
            forged = [*good.deltas[1][:-1], last[:-1] + bytes([last[-1] ^ 1])]
            await b.replicator.on_gossip(
                _gossip(
                    a, context, SharedDeltaBatch(context, good.shared, [good.deltas[0], forged])
                )
            )
            assert deltas(b, "rejected_invalid") == invalid + 1
            assert await call(b, context, "get", key="x") == "x"
            assert await call(b, context, "get", key="y") is None
            # The batch as sent applies whole.
            await b.replicator.on_gossip(_gossip(a, context, good))
            assert await call(b, context, "get", key="y") == "y"


async def test_one_delta_goes_as_a_topic_delta_and_the_old_map_still_applies(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context = await share(cluster, [0, 1])
            await cluster.partition([1])
            x, y = await _chain_of_two(a, context)
            message = batch_of(context, [x])
            assert message == TopicDelta(x.encode())
            old = encode_gossip(DeltaGossip(context, x.encode()))
            assert len(encode_gossip(message)) == len(x.encode()) + 5  # array, tag, bin16
            assert len(encode_gossip(message)) <= len(old) - 60
            # (One of another context on this topic is invalid: test_scenarios' hostile
            # gossip sends this form.)
            await b.replicator.on_gossip(_gossip(a, context, message))
            assert await call(b, context, "get", key="x") == "x"
            # The map older nodes send: still taken, and still refused naming another context.
            other = b"\x09" * 32
            malformed = deltas(b, "rejected_malformed")
            await b.replicator.on_gossip(_gossip(a, context, DeltaGossip(other, y.encode())))
            assert deltas(b, "rejected_malformed") == malformed + 1
            assert await call(b, context, "get", key="y") is None
            await b.replicator.on_gossip(_gossip(a, context, DeltaGossip(context, y.encode())))
            assert await call(b, context, "get", key="y") == "y"


def test_topic_delta_is_checked_on_decode() -> None:
    encoder = msgspec.msgpack.Encoder()
    assert decode_gossip(encoder.encode([1, b"d"])) == TopicDelta(b"d")
    for hostile in (
        encoder.encode([1]),  # no delta
        encoder.encode([1, b"d", b"e"]),  # a field too many
        encoder.encode([2, b"d"]),  # an unknown tag
        encoder.encode([1, 7]),  # not bytes
        encoder.encode([1, "d"]),
        encoder.encode([]),
        b"\x92\x01",  # cut short
        b"\xdd\xff\xff\xff\xff\x01",  # an array longer than the message
        encoder.encode({"type": 1, "delta": b"d"}),  # the tag belongs to the array form
    ):
        with pytest.raises(RemoteProtocolError):
            decode_gossip(hostile)
    assert decode_gossip(encode_gossip(TopicDelta(b"x" * 70_000))) == TopicDelta(b"x" * 70_000)


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


async def test_a_lone_nodes_writes_are_counted_unpublished_as_they_commit_and_it_subscribes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Issue #16: with nobody on a context's topic, a delta this node authors is counted
    # `unpublished` when it is handed over (the broadcaster is not woken for it), and the
    # topic is subscribed, as the broadcaster did, so that peers that come later find it.
    with trio.fail_after(LIMIT):
        async with open_cluster(1, tmp_path) as cluster:
            (a,) = cluster
            app_id = await install(a, "kv_store")
            before = deltas(a, "unpublished")
            context = (await a.contexts.create(app_id)).context_id
            assert topic_for(context) in a.pubsub.topics()
            for key in ("a", "b"):
                await call(a, context, "set", key=key, value="v")
            assert deltas(a, "unpublished") == before + 3  # (the create's delta too)
            assert deltas(a, "published") == 0


async def test_a_write_no_peer_hears_is_not_signed_and_a_later_peer_still_gets_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Issue #16: with nobody on the topic, building and signing a gossip message is
    # wasted work; heads (heartbeats) and sync bring the delta to whoever comes later.
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context = await share(cluster, [0, 1])
            published, unpublished = deltas(a, "published"), deltas(a, "unpublished")
            signed = a.pubsub.statistics().published
            await cluster.partition([0], [1])
            assert not a.pubsub.has_topic_peers(topic_for(context))
            await call(a, context, "set", key="alone", value="v")
            await trio.testing.wait_all_tasks_blocked()  # (the broadcaster has had its turn)
            assert deltas(a, "unpublished") == unpublished + 1
            assert deltas(a, "published") == published
            assert a.pubsub.statistics().published == signed  # nothing signed
            await cluster.heal()
            await wait_converged(cluster, [a, b], context)
            assert await call(b, context, "get", key="alone") == "v"
            # With the peer back on the topic, writes are gossiped again.
            await cluster.wait_mesh(topic_for(context))
            await call(a, context, "set", key="back", value="w")
            await trio.testing.wait_all_tasks_blocked()
            assert deltas(a, "published") == published + 1
