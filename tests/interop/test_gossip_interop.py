"""trionode's gossipsub against py-libp2p 0.8.1's (`libp2p.pubsub.gossipsub.GossipSub` under
`libp2p.pubsub.pubsub.Pubsub`, StrictSign), on loopback with the real clock.

py-libp2p's pubsub set-up (0.8.1, as in its `examples/pubsub/pubsub.py`): build `GossipSub`
(its heartbeat defaults to 120 s, so set it), wrap it in `Pubsub(host, router,
strict_signing=True)` *before* connecting (Pubsub registers a network notifee and opens its
pubsub stream to every new connection), then run both as services with
`libp2p.tools.anyio_service.background_trio_service`. `Pubsub.wait_for_subscription` and
`wait_for_mesh` wait on events (no polling). py attaches a signed peer record
(`senderRecord`, RPC field 4) to every RPC: our decoder skips the unknown field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
from libp2p.abc import ISubscriptionAPI
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import signature_validator
from libp2p.tools.anyio_service import background_trio_service
from prometheus_client import CollectorRegistry

from trionode.config import NetworkSection, PubsubSection
from trionode.net.events import GossipMessage, NetworkEvent, NetworkEvents
from trionode.net.host import Host
from trionode.net.metrics import NetMetrics
from trionode.net.pubsub import PubSub, PubSubMetrics
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.pubsub_pb import PubsubMessage, verify_message

from .libp2p_peer import Libp2pPeer, open_libp2p_peer

pytestmark = [pytest.mark.interop, pytest.mark.real_network]

TOPIC = "trionode/context/interop"
TIMEOUT = 30


@attrs.define(eq=False)
class PyGossip:
    peer: Libp2pPeer
    pubsub: Pubsub
    router: GossipSub


@asynccontextmanager
async def open_py_gossip() -> AsyncIterator[PyGossip]:
    async with open_libp2p_peer() as peer:
        router = GossipSub(
            protocols=[TProtocol(PROTOCOL_ID_V11)],
            degree=4,
            degree_low=2,
            degree_high=8,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=1,
        )
        pubsub = Pubsub(peer.host, router, strict_signing=True)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            yield PyGossip(peer, pubsub, router)


@attrs.define(eq=False)
class Ours:
    host: Host
    pubsub: PubSub
    received: list[GossipMessage] = attrs.field(factory=list)
    arrived: trio.Event = attrs.field(factory=trio.Event)

    async def on_event(self, event: NetworkEvent) -> None:
        if isinstance(event, GossipMessage):
            self.received.append(event)
            self.arrived.set()
            self.arrived = trio.Event()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_ours() -> AsyncIterator[Ours]:
    registry = CollectorRegistry()
    host = Host(
        PrivateKey.generate(),
        NetworkSection(listen=["/ip4/127.0.0.1/tcp/0"], ping_interval=60.0),
        NetMetrics(registry),
    )
    events = NetworkEvents(100, registry)
    config = PubsubSection(heartbeat_interval=0.2)
    ours = Ours(host, PubSub(host, host.key, config, PubSubMetrics(registry), events=events))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(events.run, ours.on_event)
        await nursery.start(ours.pubsub.run)
        yield ours
        nursery.cancel_scope.cancel()


async def next_from_others(subscription: ISubscriptionAPI, me: ID) -> rpc_pb2.Message:
    """The next message on a py subscription that py did not publish itself (py delivers its
    own publications to its local subscribers)."""
    while True:
        message = await subscription.get()
        if message.from_id != me.to_bytes():
            return message


@pytest.mark.parametrize("we_dial", [True, False], ids=["trionode-dials", "py-dials"])
async def test_messages_cross_both_ways_with_valid_signatures(we_dial: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_py_gossip() as py, open_ours() as ours:
            py_id = PeerId.from_string(py.peer.peer_id)
            our_py_id = ID(ours.host.peer_id.multihash)
            py_subscription = await py.pubsub.subscribe(TOPIC)
            ours.pubsub.subscribe(TOPIC)
            if we_dial:
                await ours.host.connect(py.peer.p2p_addr)
            else:
                await py.peer.connect(ours.host.addresses()[0])
            # Both sides learn the other's subscription, and py grafts us into its mesh
            # (its own publishes go to its mesh only).
            await py.pubsub.wait_for_subscription(our_py_id, TOPIC, timeout=TIMEOUT)
            await py.pubsub.wait_for_mesh(our_py_id, TOPIC, timeout=TIMEOUT)
            while py_id not in ours.pubsub.mesh_peers(TOPIC):
                await ours.pubsub.wait_heartbeat()

            # py -> trionode: our router verified the StrictSign signature (else no delivery).
            await py.pubsub.publish(TOPIC, b"hello from py-libp2p")
            while not ours.received:
                await ours.arrived.wait()
            [got] = ours.received
            assert got.data == b"hello from py-libp2p"
            assert got.author == py_id
            assert got.received_from == py_id
            assert got.topic == TOPIC
            stats = ours.pubsub.statistics()
            assert stats.invalid == {}
            assert stats.received == 1

            # trionode -> py: py (strict_signing) verified it too; check again by hand.
            message_id = ours.pubsub.publish(TOPIC, b"hello from trionode")
            py_self = py.peer.host.get_id()
            message = await next_from_others(py_subscription, py_self)
            assert message.data == b"hello from trionode"
            assert message.from_id == ours.host.peer_id.multihash
            assert list(message.topicIDs) == [TOPIC]
            assert message.from_id + message.seqno == message_id
            assert signature_validator(message)
            ours_view = PubsubMessage(
                from_peer=message.from_id,
                data=message.data,
                seqno=message.seqno,
                topic=message.topicIDs[0],
                signature=message.signature,
                key=message.key or None,
            )
            assert verify_message(ours_view) == ours.host.peer_id

            # A few more each way, interleaved: every one arrives once, in both directions.
            for k in range(5):
                await py.pubsub.publish(TOPIC, b"py %d" % k)
                ours.pubsub.publish(TOPIC, b"trionode %d" % k)
            got_py = {(await next_from_others(py_subscription, py_self)).data for _ in range(5)}
            assert got_py == {b"trionode %d" % k for k in range(5)}
            while len(ours.received) < 6:
                await ours.arrived.wait()
            assert sorted(e.data for e in ours.received[1:]) == [b"py %d" % k for k in range(5)]
            assert ours.pubsub.statistics().invalid == {}
