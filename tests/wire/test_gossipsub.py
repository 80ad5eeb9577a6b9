"""GossipRouter: unit tests against a scripted peer, and a simulated 10-router network.

The simulation is pure Python (no Trio): :class:`Network` shuttles ``rpcs_to_send`` between
routers, round by round, and advances a fake clock for heartbeats. Every router is seeded,
so a failure reproduces exactly.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, strategies as st

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.gossipsub import (
    FLOODSUB,
    MESHSUB_1_0,
    MESHSUB_1_1,
    DropReason,
    GossipConfig,
    GossipEvent,
    GossipRouter,
    InvalidMessage,
    InvalidReason,
    MessageReceived,
    PeerMisbehaved,
    PeerSubscribed,
    PeerUnsubscribed,
)
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.pubsub_pb import (
    RPC,
    ControlGraft,
    ControlIHave,
    ControlIWant,
    ControlMessage,
    ControlPrune,
    PubsubMessage,
    RejectReason,
    SubOpts,
    decode_rpc,
    default_message_id,
    sign_message,
)
from trionode.wire.varint import decode_length_prefixed, encode_uvarint

from .strategies import chunkings

TOPIC = "trionode/context/test"


def _key(i: int) -> PrivateKey:
    return PrivateKey(i.to_bytes(4, "big") * 8)


def _deframe(data: bytes) -> bytes:
    decoded = decode_length_prefixed(data, max_size=1 << 21)
    assert decoded is not None
    assert decoded[1] == len(data)
    return decoded[0]


def _frame(body: bytes) -> bytes:
    return encode_uvarint(len(body)) + body


def _drain(router: GossipRouter) -> list[GossipEvent]:
    events: list[GossipEvent] = []
    while (event := router.next_event()) is not None:
        events.append(event)
    return events


def _sent(router: GossipRouter) -> dict[PeerId, list[RPC]]:
    out: dict[PeerId, list[RPC]] = {}
    for peer_id, data in router.rpcs_to_send():
        out.setdefault(peer_id, []).append(decode_rpc(_deframe(data)))
    return out


def _control(rpcs: Iterable[RPC]) -> ControlMessage:
    merged = ControlMessage()
    for rpc in rpcs:
        if rpc.control is not None:
            merged = ControlMessage(
                *(
                    getattr(merged, f.name) + getattr(rpc.control, f.name)
                    for f in dataclasses.fields(merged)
                )
            )
    return merged


# -- a scripted peer --------------------------------------------------------------------------


class Pair:
    """A router under test and a scripted remote peer (``remote``) that sends raw RPCs."""

    def __init__(
        self,
        config: GossipConfig | None = None,
        *,
        protocol: str = MESHSUB_1_1,
        remote_outbound: bool = False,
        subscribe: bool = True,
        hold: Callable[[str], bool] | None = None,
    ) -> None:
        self.now = 0.0
        self.key = _key(1)
        self.remote_key = _key(2)
        self.router = GossipRouter(
            self.key, initial_seqno=100, config=config, rng=random.Random(1), hold=hold
        )
        self.remote = self.remote_key.peer_id()
        # remote_outbound: we dialed the remote.
        self.router.add_peer(self.remote, protocol, outbound=remote_outbound)
        self.seqno = 0
        if subscribe:
            self.router.subscribe(TOPIC)
            self.send(RPC(subscriptions=(SubOpts(subscribe=True, topic=TOPIC),)))

    def send(self, rpc: RPC | bytes) -> list[GossipEvent]:
        body = rpc.encode() if isinstance(rpc, RPC) else rpc
        self.router.receive_rpc(self.remote, body, self.now)
        return _drain(self.router)

    def message(
        self, data: bytes = b"m", *, key: PrivateKey | None = None, topic: str = TOPIC
    ) -> PubsubMessage:
        key = key or self.remote_key
        self.seqno += 1
        unsigned = PubsubMessage(
            from_peer=key.peer_id().multihash,
            data=data,
            seqno=self.seqno.to_bytes(8, "big"),
            topic=topic,
        )
        return sign_message(key, unsigned)

    def heartbeat(self, seconds: float = 1.0) -> None:
        self.now += seconds
        self.router.heartbeat(self.now)

    def outbox(self) -> list[RPC]:
        return _sent(self.router).get(self.remote, [])


def test_hello_announces_subscriptions() -> None:
    pair = Pair()
    assert pair.router.topic_peers(TOPIC) == [pair.remote]
    hello = pair.outbox()
    assert hello[0].subscriptions == (SubOpts(subscribe=True, topic=TOPIC),)
    # Joining with a known topic peer grafts it at once (d=4 > 1 candidate).
    assert _control(hello).graft == ()  # remote subscribed after our subscribe()
    pair.heartbeat()
    assert _control(pair.outbox()).graft == (ControlGraft(TOPIC),)
    assert pair.router.mesh_peers(TOPIC) == [pair.remote]


def test_add_peer_errors() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.router.add_peer(pair.remote, MESHSUB_1_1, outbound=True)
    with pytest.raises(LocalProtocolError):
        pair.router.add_peer(pair.key.peer_id(), MESHSUB_1_1, outbound=True)
    with pytest.raises(LocalProtocolError):
        pair.router.add_peer(_key(9).peer_id(), "/meshsub/9.9.9", outbound=True)
    with pytest.raises(LocalProtocolError):
        GossipRouter(pair.key, initial_seqno=-1)


def test_subscription_events_and_unsubscribe() -> None:
    pair = Pair(subscribe=False)
    events = pair.send(RPC(subscriptions=(SubOpts(subscribe=True, topic="x"),)))
    assert events == [PeerSubscribed(pair.remote, "x")]
    assert pair.send(RPC(subscriptions=(SubOpts(subscribe=True, topic="x"),))) == []
    assert pair.router.peer_topics(pair.remote) == ["x"]
    events = pair.send(RPC(subscriptions=(SubOpts(subscribe=False, topic="x"),)))
    assert events == [PeerUnsubscribed(pair.remote, "x")]
    assert pair.router.topic_peers("x") == []
    assert pair.router.peer_topics(_key(9).peer_id()) == []


def test_receive_message_delivers_once() -> None:
    pair = Pair()
    message = pair.message(b"hello")
    events = pair.send(RPC(publish=(message,)))
    assert events == [
        MessageReceived(
            topic=TOPIC,
            data=b"hello",
            from_peer=pair.remote,
            seqno=1,
            message_id=pair.remote.multihash + (1).to_bytes(8, "big"),
            received_from=pair.remote,
        )
    ]
    assert pair.send(RPC(publish=(message,))) == []
    stats = pair.router.statistics()
    assert (stats.received, stats.duplicates) == (1, 1)
    # Not forwarded back to its source/author.
    assert all(not rpc.publish for rpc in pair.outbox())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"data": b"tampered"}, RejectReason.BAD_SIGNATURE),
        ({"signature": None}, RejectReason.MISSING_SIGNATURE),
        ({"topic": None}, InvalidReason.NO_TOPIC),
        ({"seqno": None}, RejectReason.MISSING_SEQNO),
    ],
)
def test_invalid_messages_are_dropped_and_counted(change: dict[str, object], reason: str) -> None:
    pair = Pair()
    genuine = pair.message(b"genuine")
    forged = dataclasses.replace(genuine, **change)  # type: ignore[arg-type]
    events = pair.send(RPC(publish=(forged,)))
    assert events == [InvalidMessage(pair.remote, reason, forged.topic)]
    assert pair.router.statistics().invalid == {reason: 1}
    # A forged copy does not shadow the genuine message (same id).
    events = pair.send(RPC(publish=(genuine,)))
    assert [type(e) for e in events] == [MessageReceived]


def test_too_many_invalid_messages_is_misbehaviour() -> None:
    pair = Pair(GossipConfig(max_peer_invalid_per_interval=3))
    bad = [dataclasses.replace(pair.message(), data=b"x") for _ in range(5)]
    events = pair.send(RPC(publish=tuple(bad)))
    assert sum(isinstance(e, InvalidMessage) for e in events) == 5
    assert [e for e in events if isinstance(e, PeerMisbehaved)] == [
        PeerMisbehaved(pair.remote, InvalidReason.INVALID_MESSAGES)
    ]


def test_oversized_message_is_invalid() -> None:
    pair = Pair(GossipConfig(max_message_size=10))
    events = pair.send(RPC(publish=(pair.message(b"x" * 11),)))
    assert events == [InvalidMessage(pair.remote, InvalidReason.MESSAGE_TOO_LARGE, TOPIC)]


def test_our_own_message_echoed_after_a_restart_is_ignored_without_penalty() -> None:
    # Signed with our key by our previous life: after a restart our seen cache is empty, so
    # a peer's IHAVE of a message we published before makes us ask for it. The peer that
    # answers is honest; it must not be counted as sending invalid messages.
    config = GossipConfig(max_peer_invalid_per_interval=3)
    pair = Pair(config)
    pair.router.heartbeat(pair.now)  # grafts the remote into our mesh
    _drain(pair.router)
    pair.outbox()
    echoes = [pair.message(key=pair.key) for _ in range(5)]
    ids = [default_message_id(m) for m in echoes]
    pair.send(RPC(control=ControlMessage(ihave=(ControlIHave(TOPIC, tuple(ids)),))))
    assert _control(pair.outbox()).iwant == (ControlIWant(tuple(ids)),)
    events = pair.send(RPC(publish=tuple(echoes)))
    assert events == []  # not delivered, not invalid, no misbehaviour
    stats = pair.router.statistics()
    assert stats.invalid == {}
    assert stats.dropped == {DropReason.OWN_MESSAGE: 5}
    assert all(not rpc.publish for rpc in pair.outbox())  # not forwarded either
    # Now seen: the next IHAVE for them asks for nothing.
    pair.send(RPC(control=ControlMessage(ihave=(ControlIHave(TOPIC, tuple(ids)),))))
    assert _control(pair.outbox()).iwant == ()


def test_a_forged_message_in_our_name_is_invalid() -> None:
    pair = Pair()
    forged = dataclasses.replace(pair.message(key=pair.key), data=b"not what we signed")
    events = pair.send(RPC(publish=(forged,)))
    assert events == [InvalidMessage(pair.remote, RejectReason.BAD_SIGNATURE, TOPIC)]


def test_unsubscribed_topics_are_dropped() -> None:
    pair = Pair()
    events = pair.send(RPC(publish=(pair.message(topic="elsewhere"),)))
    assert events == []
    assert pair.router.statistics().dropped == {DropReason.NOT_SUBSCRIBED: 1}


def test_malformed_and_oversized_rpcs() -> None:
    config = GossipConfig(max_message_size=1000)
    config = dataclasses.replace(
        config, rpc_limits=dataclasses.replace(config.rpc_limits, max_rpc_size=4096)
    )
    pair = Pair(config)
    events = pair.send(b"\xff\xff")
    assert events == [PeerMisbehaved(pair.remote, InvalidReason.MALFORMED_RPC)]
    events = pair.send(RPC(publish=(PubsubMessage(data=b"x" * 5000),)).encode())
    assert events == [PeerMisbehaved(pair.remote, InvalidReason.RPC_TOO_LARGE)]
    assert pair.router.statistics().invalid == {"malformed_rpc": 1, "rpc_too_large": 1}
    # Still usable afterwards.
    assert [type(e) for e in pair.send(RPC(publish=(pair.message(),)))] == [MessageReceived]


def test_receive_data_skips_an_oversized_frame_and_resyncs() -> None:
    config = GossipConfig(max_message_size=1000)
    config = dataclasses.replace(
        config, rpc_limits=dataclasses.replace(config.rpc_limits, max_rpc_size=4096)
    )
    pair = Pair(config)
    huge = _frame(RPC(publish=(pair.message(b"x" * 6000),)).encode())
    good = _frame(RPC(publish=(pair.message(b"after"),)).encode())
    stream = huge + good
    for start in range(0, len(stream), 1000):
        pair.router.receive_data(pair.remote, stream[start : start + 1000], pair.now)
    events = _drain(pair.router)
    assert events[0] == PeerMisbehaved(pair.remote, InvalidReason.RPC_TOO_LARGE)
    assert [e.data for e in events if isinstance(e, MessageReceived)] == [b"after"]
    assert pair.router.statistics().received == 1


def test_receive_data_garbled_prefix_breaks_the_stream() -> None:
    pair = Pair()
    pair.router.receive_data(pair.remote, b"\xff" * 12, pair.now)
    assert _drain(pair.router) == [PeerMisbehaved(pair.remote, InvalidReason.MALFORMED_FRAME)]
    good = _frame(RPC(publish=(pair.message(),)).encode())
    pair.router.receive_data(pair.remote, good, pair.now)
    assert _drain(pair.router) == []


@given(st.data())
def test_receive_data_any_chunking(data: st.DataObject) -> None:
    pair = Pair()
    stream = b"".join(
        _frame(RPC(publish=(pair.message(bytes([i]) * i),)).encode()) for i in range(1, 6)
    )
    for chunk in data.draw(chunkings(stream)):
        pair.router.receive_data(pair.remote, chunk, pair.now)
    received = [e.data for e in _drain(pair.router) if isinstance(e, MessageReceived)]
    assert received == [bytes([i]) * i for i in range(1, 6)]


def test_unknown_peer_input_is_ignored() -> None:
    pair = Pair()
    stranger = _key(9).peer_id()
    pair.router.receive_rpc(stranger, b"", pair.now)
    pair.router.receive_data(stranger, b"\x00", pair.now)
    assert pair.router.statistics().dropped == {DropReason.UNKNOWN_PEER: 2}
    pair.router.remove_peer(stranger)  # idempotent


def test_per_peer_message_budget() -> None:
    pair = Pair(GossipConfig(max_peer_messages_per_interval=5))
    events = pair.send(RPC(publish=tuple(pair.message(bytes([i])) for i in range(8))))
    assert sum(isinstance(e, MessageReceived) for e in events) == 5
    assert [e for e in events if isinstance(e, PeerMisbehaved)] == [
        PeerMisbehaved(pair.remote, DropReason.PEER_MESSAGE_BUDGET)
    ]
    events = pair.send(RPC(publish=(pair.message(b"more"),)))
    assert events == []  # reported once per interval
    assert pair.router.statistics().dropped[DropReason.PEER_MESSAGE_BUDGET] == 4
    pair.heartbeat()
    events = pair.send(RPC(publish=(pair.message(b"next interval"),)))
    assert [type(e) for e in events] == [MessageReceived]


def test_per_peer_byte_budget() -> None:
    pair = Pair(GossipConfig(max_peer_bytes_per_interval=2000))
    delivered = 0
    for i in range(10):
        events = pair.send(RPC(publish=(pair.message(bytes([i]) * 300),)))
        delivered += sum(isinstance(e, MessageReceived) for e in events)
    assert 3 <= delivered < 10
    assert pair.router.statistics().misbehaviour == {DropReason.PEER_BYTE_BUDGET: 1}


def test_too_many_topics_per_peer() -> None:
    pair = Pair(GossipConfig(max_topics_per_peer=3), subscribe=False)
    subs = tuple(SubOpts(subscribe=True, topic=str(i)) for i in range(5))
    events = pair.send(RPC(subscriptions=subs))
    assert sum(isinstance(e, PeerSubscribed) for e in events) == 3
    assert PeerMisbehaved(pair.remote, DropReason.TOO_MANY_TOPICS) in events


def test_iwant_is_answered_from_the_cache_with_a_cap() -> None:
    pair = Pair(GossipConfig(gossip_retransmission=2))
    message_id = pair.router.publish(TOPIC, b"cached", pair.now)
    pair.outbox()
    iwant = RPC(control=ControlMessage(iwant=(ControlIWant((message_id, b"unknown")),)))
    served = 0
    for _ in range(4):
        pair.send(iwant)
        served += sum(len(rpc.publish) for rpc in pair.outbox())
    assert served == 2
    stats = pair.router.statistics()
    assert (stats.iwant_received, stats.iwant_served) == (8, 2)
    assert stats.dropped == {DropReason.IWANT_RETRANSMISSION: 2}
    # Once shifted out of the cache (history_length heartbeats), nothing is served.
    for _ in range(5):
        pair.heartbeat()
    pair.outbox()
    pair.send(RPC(control=ControlMessage(iwant=(ControlIWant((message_id,)),))))
    assert all(not rpc.publish for rpc in pair.outbox())


def test_iwant_replies_per_interval_are_capped() -> None:
    pair = Pair(GossipConfig(max_iwant_replies=3))
    ids = tuple(pair.router.publish(TOPIC, bytes([i]), pair.now) for i in range(5))
    pair.outbox()
    pair.send(RPC(control=ControlMessage(iwant=(ControlIWant(ids),))))
    assert sum(len(rpc.publish) for rpc in pair.outbox()) == 3
    assert pair.router.statistics().dropped == {DropReason.IWANT_FLOOD: 1}


def test_outbox_is_bounded_and_split_into_rpcs_within_limits() -> None:
    config = GossipConfig(max_message_size=1000, max_outbox_messages=10)
    config = dataclasses.replace(
        config, rpc_limits=dataclasses.replace(config.rpc_limits, max_rpc_size=4096)
    )
    pair = Pair(config)
    for i in range(12):
        pair.router.publish(TOPIC, bytes([i]) * 1000, pair.now)
    chunks = [data for peer, data in pair.router.rpcs_to_send() if peer == pair.remote]
    assert len(chunks) > 1
    assert all(len(_deframe(data)) <= 4096 for data in chunks)
    bodies = [decode_rpc(_deframe(data)) for data in chunks]
    assert [m.data for rpc in bodies for m in rpc.publish] == [bytes([i]) * 1000 for i in range(10)]
    assert pair.router.statistics().dropped == {DropReason.OUTBOX_FULL: 2}


def test_ihave_triggers_iwant_once() -> None:
    pair = Pair(GossipConfig(max_ihave_length=3))
    pair.outbox()
    ids = tuple(bytes([i]) * 8 for i in range(5))
    pair.send(RPC(control=ControlMessage(ihave=(ControlIHave(TOPIC, ids),))))
    assert _control(pair.outbox()).iwant == (ControlIWant(ids[:3]),)  # capped per interval
    pair.send(RPC(control=ControlMessage(ihave=(ControlIHave(TOPIC, ids),))))
    assert _control(pair.outbox()).iwant == ()
    pair.heartbeat(5.0)  # budget reset, followup time passed
    pair.send(RPC(control=ControlMessage(ihave=(ControlIHave(TOPIC, ids),))))
    assert _control(pair.outbox()).iwant == (ControlIWant(ids[:3]),)
    # IHAVE for a topic we do not subscribe to is ignored.
    pair.send(RPC(control=ControlMessage(ihave=(ControlIHave("other", (b"z",)),))))
    assert _control(pair.outbox()).iwant == ()


def test_ihave_flood_is_limited() -> None:
    pair = Pair(GossipConfig(max_ihave_messages=2))
    for i in range(4):
        pair.send(RPC(control=ControlMessage(ihave=(ControlIHave(TOPIC, (bytes([i]),)),))))
    assert pair.router.statistics().dropped == {DropReason.IHAVE_FLOOD: 2}
    assert pair.router.statistics().iwant_sent == 2


def test_graft_prune_and_backoff() -> None:
    pair = Pair(remote_outbound=True)
    pair.heartbeat()
    pair.outbox()
    assert pair.router.mesh_peers(TOPIC) == [pair.remote]
    # The remote prunes us with a 30 s backoff: no re-graft for 30 s (+1 heartbeat slack).
    pair.send(RPC(control=ControlMessage(prune=(ControlPrune(TOPIC, (), 30),))))
    assert pair.router.mesh_peers(TOPIC) == []
    assert pair.router.backoffs(TOPIC) == {pair.remote: 32.0}  # t = 1, + 30 s, + 1 heartbeat
    for _ in range(30):  # t = 2 .. 31
        pair.heartbeat()
        assert _control(pair.outbox()).graft == ()
    pair.heartbeat()
    assert _control(pair.outbox()).graft == (ControlGraft(TOPIC),)
    assert pair.router.mesh_peers(TOPIC) == [pair.remote]
    stats = pair.router.statistics()
    assert stats.prune_received == 1
    assert stats.graft_sent == 2


def test_graft_during_our_backoff_is_refused() -> None:
    pair = Pair()
    pair.heartbeat()
    pair.send(RPC(control=ControlMessage(prune=(ControlPrune(TOPIC),))))  # default backoff
    pair.outbox()
    pair.heartbeat(5.0)
    pair.send(RPC(control=ControlMessage(graft=(ControlGraft(TOPIC),))))
    prunes = _control(pair.outbox()).prune
    assert prunes == (ControlPrune(TOPIC, (), 60),)
    assert pair.router.mesh_peers(TOPIC) == []
    assert pair.router.statistics().dropped == {DropReason.GRAFT_DURING_BACKOFF: 1}


def test_graft_for_unknown_topic_is_refused_and_v1_0_gets_no_backoff() -> None:
    pair = Pair(protocol=MESHSUB_1_0)
    pair.outbox()
    pair.send(RPC(control=ControlMessage(graft=(ControlGraft("unknown"),))))
    assert _control(pair.outbox()).prune == (ControlPrune("unknown", (), None),)


def test_graft_accepted_and_refused_when_full() -> None:
    pair = Pair(GossipConfig(d=1, d_lo=1, d_hi=1, d_out=0))
    pair.send(RPC(control=ControlMessage(graft=(ControlGraft(TOPIC),))))
    assert pair.router.mesh_peers(TOPIC) == [pair.remote]
    pair.send(RPC(control=ControlMessage(graft=(ControlGraft(TOPIC),))))  # already in
    assert _control(pair.outbox()).prune == ()
    # A second, inbound peer cannot graft into a full mesh.
    third = _key(3).peer_id()
    pair.router.add_peer(third, MESHSUB_1_1, outbound=False)
    sub = RPC(subscriptions=(SubOpts(subscribe=True, topic=TOPIC),))
    pair.router.receive_rpc(third, sub.encode(), pair.now)
    graft = RPC(control=ControlMessage(graft=(ControlGraft(TOPIC),)))
    pair.router.receive_rpc(third, graft.encode(), pair.now)
    assert _control(_sent(pair.router)[third]).prune == (ControlPrune(TOPIC, (), 60),)


def test_unsubscribe_prunes_the_mesh() -> None:
    pair = Pair()
    pair.heartbeat()
    pair.outbox()
    pair.router.unsubscribe(TOPIC)
    pair.router.unsubscribe(TOPIC)  # no-op
    rpcs = pair.outbox()
    assert rpcs[0].subscriptions == (SubOpts(subscribe=False, topic=TOPIC),)
    assert _control(rpcs).prune == (ControlPrune(TOPIC, (), 10),)
    assert pair.router.mesh_peers(TOPIC) == []
    assert pair.router.subscriptions() == []


def test_subscribe_then_unsubscribe_before_sending_sends_only_the_prune() -> None:
    pair = Pair(subscribe=False)
    pair.send(RPC(subscriptions=(SubOpts(subscribe=True, topic=TOPIC),)))
    pair.router.subscribe(TOPIC)
    pair.router.unsubscribe(TOPIC)
    rpcs = pair.outbox()
    assert [s for rpc in rpcs for s in rpc.subscriptions] == [SubOpts(subscribe=False, topic=TOPIC)]
    control = _control(rpcs)
    assert control.graft == ()
    assert control.prune == (ControlPrune(TOPIC, (), 10),)


def test_publish_limits_and_seqnos() -> None:
    pair = Pair(GossipConfig(max_message_size=10))
    with pytest.raises(LocalProtocolError):
        pair.router.publish(TOPIC, b"x" * 11, pair.now)
    with pytest.raises(LocalProtocolError):
        pair.router.publish("t" * 600, b"x", pair.now)
    with pytest.raises(LocalProtocolError):
        pair.router.subscribe("t" * 600)
    ids = [pair.router.publish(TOPIC, b"x", pair.now) for _ in range(3)]
    seqnos = [int.from_bytes(i[-8:], "big") for i in ids]
    assert seqnos == [100, 101, 102]
    assert pair.router.statistics().published == 3
    assert _drain(pair.router) == []  # own messages are not delivered locally
    exhausted = GossipRouter(_key(5), initial_seqno=(1 << 64) - 1)
    exhausted.publish(TOPIC, b"last", 0.0)
    with pytest.raises(LocalProtocolError):
        exhausted.publish(TOPIC, b"overflow", 0.0)


def test_floodsub_peer_gets_messages_but_no_control() -> None:
    pair = Pair(protocol=FLOODSUB)
    pair.heartbeat()
    pair.router.publish(TOPIC, b"flood", pair.now)
    rpcs = pair.outbox()
    assert [m.data for rpc in rpcs for m in rpc.publish] == [b"flood"]
    assert all(rpc.control is None for rpc in rpcs)
    assert pair.router.mesh_peers(TOPIC) == []
    # A message from another peer is forwarded to the floodsub peer too.
    other_key = _key(3)
    other = other_key.peer_id()
    pair.router.add_peer(other, MESHSUB_1_1, outbound=True)
    unsigned = PubsubMessage(other.multihash, b"relay", (1).to_bytes(8, "big"), TOPIC)
    pair.router.receive_rpc(other, RPC(publish=(sign_message(other_key, unsigned),)), pair.now)
    assert [m.data for rpc in pair.outbox() for m in rpc.publish] == [b"relay"]


def test_fanout_publish_and_expiry() -> None:
    config = GossipConfig(flood_publish=False, fanout_ttl=5.0)
    pair = Pair(config, subscribe=False)
    pair.send(RPC(subscriptions=(SubOpts(subscribe=True, topic="b"),)))
    pair.router.publish("b", b"via fanout", pair.now)
    assert [m.data for rpc in pair.outbox() for m in rpc.publish] == [b"via fanout"]
    assert pair.router.statistics().fanout_sizes == {"b": 1}
    for _ in range(6):
        pair.heartbeat()
    assert pair.router.statistics().fanout_sizes == {}
    # Subscribing takes over fanout peers into the mesh.
    pair.router.publish("b", b"again", pair.now)
    pair.router.subscribe("b")
    assert pair.router.mesh_peers("b") == [pair.remote]
    assert pair.router.statistics().fanout_sizes == {}


def test_fanout_is_refilled_and_loses_departed_peers() -> None:
    pair = Pair(GossipConfig(flood_publish=False), subscribe=False)
    pair.router.publish("b", b"nobody listens", pair.now)
    assert pair.router.statistics().fanout_sizes == {"b": 0}
    pair.send(RPC(subscriptions=(SubOpts(subscribe=True, topic="b"),)))
    pair.heartbeat()
    assert pair.router.statistics().fanout_sizes == {"b": 1}
    pair.router.remove_peer(pair.remote)
    assert pair.router.statistics().fanout_sizes == {"b": 0}
    assert pair.router.peers() == []
    assert pair.router.rpcs_to_send() == []


def test_prune_for_a_topic_we_left_is_ignored() -> None:
    pair = Pair()
    pair.send(RPC(control=ControlMessage(prune=(ControlPrune("other", (), 5),))))
    assert pair.router.backoffs("other") == {}
    assert pair.router.statistics().prune_received == 1
    pair.router.subscribe(TOPIC)  # already subscribed: no-op
    assert pair.router.subscriptions() == [TOPIC]


def test_message_id_function_may_refuse_messages() -> None:
    def strict_id(message: PubsubMessage) -> bytes:
        if message.data == b"refuse":
            raise RemoteProtocolError("no id")
        return default_message_id(message)

    key = _key(1)
    router = GossipRouter(key, initial_seqno=1, message_id_fn=strict_id)
    remote_key = _key(2)
    router.add_peer(remote_key.peer_id(), MESHSUB_1_1, outbound=True)
    router.subscribe(TOPIC)
    unsigned = PubsubMessage(remote_key.peer_id().multihash, b"refuse", bytes(8), TOPIC)
    rpc = RPC(publish=(sign_message(remote_key, unsigned),))
    router.receive_rpc(remote_key.peer_id(), rpc, 0.0)
    assert _drain(router) == [
        InvalidMessage(remote_key.peer_id(), InvalidReason.BAD_MESSAGE_ID, TOPIC)
    ]


def test_seen_cache_expires() -> None:
    pair = Pair(GossipConfig(seen_ttl=3.0))
    message = pair.message()
    pair.send(RPC(publish=(message,)))
    assert pair.router.statistics().seen_cache_size == 1
    for _ in range(4):
        pair.heartbeat()
    assert pair.router.statistics().seen_cache_size == 0


def _held_pair(config: GossipConfig | None = None) -> tuple[Pair, PeerId]:
    """A pair whose router holds TOPIC's messages, and a floodsub peer of TOPIC (it gets
    every forward at once, mesh or not)."""
    pair = Pair(config, hold=lambda topic: topic == TOPIC)
    relay = _key(3).peer_id()
    pair.router.add_peer(relay, FLOODSUB, outbound=True)
    pair.router.receive_rpc(
        relay, RPC(subscriptions=(SubOpts(subscribe=True, topic=TOPIC),)), pair.now
    )
    pair.router.rpcs_to_send()
    _drain(pair.router)
    return pair, relay


def _relayed(pair: Pair, relay: PeerId) -> list[bytes]:
    return [m.data or b"" for rpc in _sent(pair.router).get(relay, []) for m in rpc.publish]


def test_a_held_message_is_delivered_and_forwarded_once_accepted() -> None:
    pair, relay = _held_pair()
    [event] = pair.send(RPC(publish=(pair.message(b"held"),)))
    assert isinstance(event, MessageReceived)
    assert _relayed(pair, relay) == []  # delivered, not forwarded yet
    assert pair.router.validated(event.message_id, accept=True)
    assert _relayed(pair, relay) == [b"held"]
    assert not pair.router.validated(event.message_id, accept=True)  # judged once
    assert _relayed(pair, relay) == []
    # Cached once accepted: an IWANT is answered.
    iwant = RPC(control=ControlMessage(iwant=(ControlIWant((event.message_id,)),)))
    pair.send(iwant)
    assert [m.data for rpc in pair.outbox() for m in rpc.publish] == [b"held"]


def test_a_rejected_held_message_is_never_forwarded_cached_or_advertised() -> None:
    pair, relay = _held_pair()
    message = pair.message(b"bad")
    [event] = pair.send(RPC(publish=(message,)))
    assert isinstance(event, MessageReceived)
    assert pair.router.validated(event.message_id, accept=False)
    assert pair.router.statistics().dropped == {DropReason.REJECTED: 1}
    for _ in range(3):
        pair.heartbeat()
    assert _relayed(pair, relay) == []
    assert all(not _control([rpc]).ihave for rpc in _sent(pair.router).get(relay, []))
    iwant = RPC(control=ControlMessage(iwant=(ControlIWant((event.message_id,)),)))
    pair.send(iwant)
    assert all(not rpc.publish for rpc in pair.outbox())
    # A copy sent again is a duplicate (seen), not delivered a second time.
    assert pair.send(RPC(publish=(message,))) == []


def test_a_held_message_nobody_judges_is_forwarded_after_the_hold_timeout() -> None:
    pair, relay = _held_pair(GossipConfig(hold_timeout=2.5))
    [event] = pair.send(RPC(publish=(pair.message(b"late"),)))
    assert isinstance(event, MessageReceived)
    pair.heartbeat(2.0)
    assert _relayed(pair, relay) == []
    pair.heartbeat(1.0)  # 3 s after it arrived
    assert _relayed(pair, relay) == [b"late"]
    assert not pair.router.validated(event.message_id, accept=False)  # too late


def test_other_topics_are_forwarded_on_arrival_by_a_holding_router() -> None:
    pair, relay = _held_pair()
    pair.router.subscribe("other")
    for peer in (pair.remote, relay):
        pair.router.receive_rpc(
            peer, RPC(subscriptions=(SubOpts(subscribe=True, topic="other"),)), pair.now
        )
    pair.router.rpcs_to_send()
    _drain(pair.router)
    [event] = pair.send(RPC(publish=(pair.message(b"free", topic="other"),)))
    assert isinstance(event, MessageReceived)
    assert _relayed(pair, relay) == [b"free"]
    assert not pair.router.validated(event.message_id, accept=True)


def test_timer() -> None:
    router = GossipRouter(_key(1), initial_seqno=0, config=GossipConfig(heartbeat_interval=2.0))
    assert router.get_timer() is None
    router.handle_timer(10.0)
    assert router.get_timer() == 12.0
    router.handle_timer(11.0)
    assert router.statistics().heartbeats == 1
    router.handle_timer(12.0)
    assert router.statistics().heartbeats == 2
    assert router.config.heartbeat_interval == 2.0
    assert router.local_peer_id == _key(1).peer_id()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"d": 1, "d_lo": 2},
        {"d_hi": 3},
        {"d_out": 2},
        {"d_lazy": -1},
        {"history_gossip": 6},
        {"seen_ttl": 0},
        {"max_message_size": 1 << 20},
    ],
)
def test_config_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"need|must"):
        GossipConfig(**kwargs)  # type: ignore[arg-type]


# -- the simulated network --------------------------------------------------------------------

Filter = Callable[[int, int, RPC], RPC | None]


class Network:
    """N routers on a fixed topology; RPCs move in rounds; time is fake."""

    def __init__(
        self,
        size: int,
        edges: Iterable[tuple[int, int]],
        config: GossipConfig | None = None,
        *,
        configs: dict[int, GossipConfig] | None = None,
        seed: int = 0,
    ) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        configs = configs or {}
        self.routers = [
            GossipRouter(
                _key(i + 1),
                initial_seqno=1_000_000 * (i + 1),
                config=configs.get(i, config),
                rng=random.Random(seed * 100 + i),
            )
            for i in range(size)
        ]
        self.ids = [r.local_peer_id for r in self.routers]
        self.index = {peer_id: i for i, peer_id in enumerate(self.ids)}
        self.alive = set(range(size))
        self.neighbours: dict[int, set[int]] = {i: set() for i in range(size)}
        self.events: list[list[GossipEvent]] = [[] for _ in range(size)]
        self.filter: Filter | None = None
        for a, b in edges:
            self.connect(a, b)

    def connect(self, a: int, b: int) -> None:
        """``a`` dials ``b``."""
        self.routers[a].add_peer(self.ids[b], MESHSUB_1_1, outbound=True)
        self.routers[b].add_peer(self.ids[a], MESHSUB_1_1, outbound=False)
        self.neighbours[a].add(b)
        self.neighbours[b].add(a)

    def remove(self, i: int) -> None:
        self.alive.discard(i)
        for j in self.neighbours.pop(i):
            self.neighbours[j].discard(i)
            self.routers[j].remove_peer(self.ids[i])

    def round(self) -> int:
        batch = [
            (i, self.index[peer_id], data)
            for i in sorted(self.alive)
            for peer_id, data in self.routers[i].rpcs_to_send()
        ]
        for src, dst, data in batch:
            if dst not in self.alive:
                continue
            router = self.routers[dst]
            if self.filter is not None:
                rpc = self.filter(src, dst, decode_rpc(_deframe(data)))
                if rpc is not None:
                    router.receive_rpc(self.ids[src], rpc, self.now)
            elif self.rng.random() < 0.5:
                cut = self.rng.randrange(len(data) + 1)
                router.receive_data(self.ids[src], data[:cut], self.now)
                router.receive_data(self.ids[src], data[cut:], self.now)
            else:
                router.receive_data(self.ids[src], data, self.now)
        for i in self.alive:
            self.events[i].extend(_drain(self.routers[i]))
        return len(batch)

    def settle(self) -> None:
        for _ in range(100):
            if not self.round():
                return
        raise AssertionError("network did not settle")

    def heartbeat(self, count: int = 1) -> None:
        for _ in range(count):
            self.now += 1.0
            for i in sorted(self.alive):
                self.routers[i].heartbeat(self.now)
            self.settle()

    def subscribe(self, topic: str, members: Iterable[int]) -> None:
        for i in members:
            self.routers[i].subscribe(topic, now=self.now)
        self.settle()

    def received(self, i: int) -> list[MessageReceived]:
        return [e for e in self.events[i] if isinstance(e, MessageReceived)]

    def mesh(self, i: int, topic: str) -> set[int]:
        return {self.index[p] for p in self.routers[i].mesh_peers(topic)}


# A sparse connected topology: a ring with three chords (degrees 2 and 3).
SPARSE = [(i, (i + 1) % 10) for i in range(10)] + [(0, 5), (2, 7), (3, 8)]


def _dense(seed: int) -> list[tuple[int, int]]:
    """Node 0 is a hub linked to everyone; the rest form a random graph of p = 0.5."""
    rng = random.Random(seed)
    edges = [(0, i) for i in range(1, 10)]
    edges += [(a, b) for a in range(1, 10) for b in range(a + 1, 10) if rng.random() < 0.5]
    return edges


def _assert_exactly_once(net: Network, published: dict[bytes, int], members: set[int]) -> None:
    for i in members & net.alive:
        counts = Counter(e.message_id for e in net.received(i))
        expected = {mid for mid, author in published.items() if author != i}
        assert set(counts) == expected, f"router {i} missed {len(expected - set(counts))}"
        assert all(n == 1 for n in counts.values()), f"router {i} got duplicates"


def test_network_delivers_every_message_exactly_once() -> None:
    net = Network(10, SPARSE)
    net.subscribe(TOPIC, range(10))
    net.heartbeat(3)
    published: dict[bytes, int] = {}
    for k in range(30):
        author = k % 10
        published[net.routers[author].publish(TOPIC, f"m{k}".encode(), net.now)] = author
        net.round()  # publishes overlap with forwarding still in flight
    net.settle()
    net.heartbeat(3)
    _assert_exactly_once(net, published, set(range(10)))
    for i in range(10):
        received = net.received(i)
        assert all(e.from_peer == net.ids[published[e.message_id]] for e in received)
        assert all(e.topic == TOPIC for e in received)
    stats = [r.statistics() for r in net.routers]
    assert sum(s.received for s in stats) == 30 * 9
    assert sum(s.published for s in stats) == 30
    assert all(not s.invalid for s in stats)


def test_network_non_subscriber_publishes_through_fanout() -> None:
    net = Network(10, SPARSE, GossipConfig(flood_publish=False))
    members = set(range(8))  # 8 and 9 do not subscribe but publish
    net.subscribe(TOPIC, members)
    net.heartbeat(3)
    published = {
        net.routers[8].publish(TOPIC, b"from 8", net.now): 8,
        net.routers[9].publish(TOPIC, b"from 9", net.now): 9,
    }
    net.settle()
    net.heartbeat(3)
    _assert_exactly_once(net, published, members)
    assert net.received(8) == net.received(9) == []
    assert 1 <= net.routers[8].statistics().fanout_sizes[TOPIC] <= 4


@pytest.mark.parametrize(
    "config",
    [GossipConfig(), GossipConfig(d=3, d_lo=2, d_hi=4, d_out=1)],
    ids=["defaults", "tight"],
)
@pytest.mark.parametrize("seed", [1, 2, 59])
def test_mesh_degrees_stay_within_bounds(config: GossipConfig, seed: int) -> None:
    for edges in (SPARSE, _dense(seed)):
        net = Network(10, edges, config, seed=seed)
        net.subscribe(TOPIC, range(10))
        for beat in range(8):
            net.heartbeat()
            for i in range(10):
                mesh = net.mesh(i, TOPIC)
                assert mesh <= net.neighbours[i]
                assert all(i in net.mesh(j, TOPIC) for j in mesh), "mesh must be symmetric"
                assert net.routers[i].statistics().mesh_sizes[TOPIC] == len(mesh)
                # Early heartbeats overshoot: everyone grafts at once, and grafts from peers
                # we dialed are accepted beyond d_hi (v1.1), to be pruned a heartbeat later.
                # A peer that pruned us is off limits for its backoff, so the lower bound
                # counts only neighbours we may graft.
                if beat >= 3:
                    in_backoff = {net.index[p] for p in net.routers[i].backoffs(TOPIC)}
                    eligible = (net.neighbours[i] - in_backoff) | mesh
                    assert min(config.d_lo, len(eligible)) <= len(mesh) <= config.d_hi, (i, mesh)
            if beat >= 3 and edges is SPARSE:
                assert all(len(net.mesh(i, TOPIC)) >= config.d_lo for i in range(10))


def test_removing_a_router_mid_stream_does_not_stop_delivery() -> None:
    net = Network(10, SPARSE)
    net.subscribe(TOPIC, range(10))
    net.heartbeat(3)
    published: dict[bytes, int] = {}
    after: set[bytes] = set()
    for k in range(40):
        if k == 15:
            net.remove(5)
        author = k % 10
        if author not in net.alive:
            continue
        message_id = net.routers[author].publish(TOPIC, f"m{k}".encode(), net.now)
        published[message_id] = author
        if k > 15:
            after.add(message_id)
        net.round()
        if k % 7 == 0:
            net.heartbeat()
    net.settle()
    net.heartbeat(3)
    _assert_exactly_once(net, published, net.alive)
    for i in net.alive:
        assert net.ids[5] not in net.routers[i].peers()
        assert {e.message_id for e in net.received(i)} >= {
            mid for mid in after if published[mid] != i
        }


def test_forged_and_tampered_messages_never_surface() -> None:
    net = Network(10, SPARSE)
    net.subscribe(TOPIC, range(10))
    net.heartbeat(3)
    # A compromised neighbour (router 2's link) injects a message with a bad signature.
    mallory = _key(99)
    unsigned = PubsubMessage(mallory.peer_id().multihash, b"evil", (1).to_bytes(8, "big"), TOPIC)
    forged = dataclasses.replace(sign_message(mallory, unsigned), data=b"evil!")
    net.routers[3].receive_rpc(net.ids[2], RPC(publish=(forged,)), net.now)
    # And router 0's next message is tampered with on the link to router 1, which then
    # gets the genuine copy from router 2 one round later.
    tampered_from = net.ids[0].multihash

    def tamper(src: int, dst: int, rpc: RPC) -> RPC:
        if (src, dst) != (0, 1):
            return rpc
        publish = tuple(
            dataclasses.replace(m, data=b"tampered") if m.from_peer == tampered_from else m
            for m in rpc.publish
        )
        return dataclasses.replace(rpc, publish=publish)

    net.filter = tamper
    genuine = net.routers[0].publish(TOPIC, b"genuine", net.now)
    net.settle()
    net.filter = None
    net.heartbeat(3)
    for i in range(10):
        data = [e.data for e in net.received(i)]
        assert b"evil!" not in data
        assert b"tampered" not in data
        if i != 0:
            assert data == [b"genuine"]
    assert net.routers[3].statistics().invalid == {RejectReason.BAD_SIGNATURE: 1}
    assert InvalidMessage(net.ids[2], RejectReason.BAD_SIGNATURE, TOPIC) in net.events[3]
    assert net.routers[1].statistics().invalid[RejectReason.BAD_SIGNATURE] >= 1
    invalid_elsewhere = [net.routers[i].statistics().invalid for i in range(10) if i not in {1, 3}]
    assert invalid_elsewhere == [{}] * 8  # never forwarded
    assert all(e.message_id == genuine for e in net.received(1))


def test_oversized_rpc_in_the_network_is_dropped() -> None:
    config = GossipConfig(max_message_size=4000)
    config = dataclasses.replace(
        config, rpc_limits=dataclasses.replace(config.rpc_limits, max_rpc_size=8192)
    )
    net = Network(10, SPARSE, config)
    net.subscribe(TOPIC, range(10))
    net.heartbeat(2)
    mallory = _key(99)
    unsigned = PubsubMessage(mallory.peer_id().multihash, b"x" * 9000, b"\0" * 8, TOPIC)
    body = RPC(publish=(sign_message(mallory, unsigned),)).encode()
    net.routers[4].receive_data(net.ids[3], _frame(body), net.now)
    net.settle()
    assert all(not net.received(i) for i in range(10))
    assert net.routers[4].statistics().invalid == {InvalidReason.RPC_TOO_LARGE: 1}
    assert PeerMisbehaved(net.ids[3], InvalidReason.RPC_TOO_LARGE) in net.events[4]


def test_ihave_iwant_recovers_a_dropped_forward() -> None:
    # Router 1 never keeps mesh peers (d_hi = 0), so router 0 gossips to it.
    net = Network(2, [(0, 1)], configs={1: GossipConfig(d=0, d_lo=0, d_hi=0, d_out=0)})
    net.subscribe(TOPIC, range(2))
    net.heartbeat(2)
    assert net.mesh(0, TOPIC) == net.mesh(1, TOPIC) == set()
    net.filter = lambda src, dst, rpc: dataclasses.replace(rpc, publish=())
    message_id = net.routers[0].publish(TOPIC, b"lost then found", net.now)
    net.settle()
    assert net.received(1) == []
    net.filter = None
    net.heartbeat()
    assert [e.message_id for e in net.received(1)] == [message_id]
    sender, receiver = net.routers[0].statistics(), net.routers[1].statistics()
    assert sender.ihave_sent >= 1
    assert receiver.ihave_received >= 1
    assert receiver.iwant_sent == 1
    assert sender.iwant_served == 1


def test_lossy_forwarding_is_repaired_by_gossip() -> None:
    # Gossip only reaches peers outside the mesh, so every router needs some: a complete
    # graph with d_hi = 4. (Losses on mesh links of a router whose every link is a mesh
    # link are not repaired, in any gossipsub: streams are assumed reliable.)
    config = GossipConfig(d=3, d_lo=2, d_hi=4, d_out=1)
    complete = [(a, b) for a in range(10) for b in range(a + 1, 10)]
    net = Network(10, complete, config, seed=7)
    net.subscribe(TOPIC, range(10))
    net.heartbeat(3)
    loss = random.Random(3)

    def lossy(src: int, dst: int, rpc: RPC) -> RPC:
        kept = tuple(m for m in rpc.publish if loss.random() >= 0.4)
        return dataclasses.replace(rpc, publish=kept)

    published: dict[bytes, int] = {}
    net.filter = lossy
    for k in range(20):
        author = k % 10
        published[net.routers[author].publish(TOPIC, f"m{k}".encode(), net.now)] = author
    net.settle()
    net.filter = None
    net.heartbeat(3)
    _assert_exactly_once(net, published, set(range(10)))
    assert sum(r.statistics().iwant_served for r in net.routers) > 0
