"""Gossipsub v1.1 router, sans-IO: RPCs and ``now`` in, RPCs and events out.

One :class:`GossipRouter` runs per host. The driver (``net/``) tells it about peers
(:meth:`~GossipRouter.add_peer` once a ``/meshsub`` or ``/floodsub`` stream pair is up,
:meth:`~GossipRouter.remove_peer` when the connection goes), feeds it what arrives on each
peer's inbound stream (:meth:`~GossipRouter.receive_data` for raw stream bytes, or
:meth:`~GossipRouter.receive_rpc` for one RPC body), calls :meth:`~GossipRouter.heartbeat`
every ``heartbeat_interval`` (see :meth:`~GossipRouter.get_timer`), then writes
:meth:`~GossipRouter.rpcs_to_send` to the peers' outbound streams and drains
:meth:`~GossipRouter.next_event`. Nothing here blocks, sleeps or reads a clock.

Theory of operation (gossipsub v1.0 plus the v1.1 parts worth having; no peer scoring):

* **Mesh.** For every topic we subscribe to we keep a mesh of between ``d_lo`` and ``d_hi``
  gossipsub peers (``d`` after repair), joined with GRAFT and left with PRUNE. Messages are
  forwarded eagerly to the mesh. A PRUNE imposes a backoff (v1.1, ``prune_backoff``, or the
  seconds the pruner asked for, plus one heartbeat of slack) during which we do not graft
  that peer again; a GRAFT that arrives during *our* backoff is refused with a PRUNE.
  Pruning an over-full mesh keeps at least ``d_out`` outbound peers (eclipse resistance).
* **Gossip.** Each heartbeat, the ids of messages seen in the last ``history_gossip``
  heartbeats are advertised (IHAVE) to ``max(d_lazy, gossip_factor * n)`` topic peers outside
  the mesh; peers ask for what they miss (IWANT) and are served from the message cache
  (``history_length`` heartbeats), each message at most ``gossip_retransmission`` times per
  peer. This repairs forwards lost or dropped on the way.
* **Publishing.** Our own messages are signed (StrictSign), get a strictly increasing seqno,
  and are flooded to every peer subscribed to the topic (``flood_publish``, v1.1); without
  flood publishing they go to the mesh, or to a *fanout* set of ``d`` peers for topics we do
  not subscribe to (forgotten ``fanout_ttl`` after the last publish).
* **Receiving.** A message is delivered (:class:`MessageReceived`) at most once: its id
  (``from || seqno``) enters the *seen* cache (``seen_ttl``) only after its signature checks
  out, so a forged copy cannot shadow the real one. Invalid messages are counted, reported
  (:class:`InvalidMessage`) and never forwarded. Messages for topics we do not subscribe to
  are dropped, as go-libp2p-pubsub does. A message we signed ourselves that comes back
  (after a restart, through IHAVE/IWANT) is dropped without penalty: only we hold the key.
* **Defences.** Decoding is bounded (:class:`~trionode.wire.pubsub_pb.RpcLimits`). Each peer
  has a budget of messages and bytes per heartbeat interval; the excess is dropped and
  counted, and :class:`PeerMisbehaved` (at most once per reason per interval) lets the driver
  disconnect. IHAVE processing, IWANT replies, a peer's topic count and each peer's outbox are
  capped likewise.

Costs: handling a message is O(mesh size) plus one Ed25519 verification for a new message;
a heartbeat is O(peers + topic memberships + messages in the gossip window). Peers, meshes
and topic memberships are insertion-ordered dicts so that a seeded ``rng`` makes whole
simulations reproducible.
"""

from __future__ import annotations

import enum
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import TypeAlias, TypeVar

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.pubsub_pb import (
    RPC,
    SEQNO_LENGTH,
    ControlGraft,
    ControlIHave,
    ControlIWant,
    ControlMessage,
    ControlPrune,
    MessageRejectedError,
    PubsubMessage,
    RpcLimits,
    SubOpts,
    decode_rpc,
    default_message_id,
    encode_rpc_split,
    sign_message,
    verify_message,
)
from trionode.wire.varint import BytesLike, decode_uvarint, encode_uvarint

__all__ = [
    "FLOODSUB",
    "MESHSUB_1_0",
    "MESHSUB_1_1",
    "MESHSUB_1_2",
    "PROTOCOLS",
    "DropReason",
    "GossipConfig",
    "GossipEvent",
    "GossipRouter",
    "GossipStatistics",
    "InvalidMessage",
    "InvalidReason",
    "MessageReceived",
    "PeerMisbehaved",
    "PeerSubscribed",
    "PeerUnsubscribed",
]

MESHSUB_1_2 = "/meshsub/1.2.0"
MESHSUB_1_1 = "/meshsub/1.1.0"
MESHSUB_1_0 = "/meshsub/1.0.0"
FLOODSUB = "/floodsub/1.0.0"
PROTOCOLS = (MESHSUB_1_1, MESHSUB_1_0, FLOODSUB)
"""What to propose and accept with multistream-select, preferred first. ``/meshsub/1.2.0`` is
accepted by :meth:`GossipRouter.add_peer` (treated as 1.1) but not offered: we ignore
IDONTWANT."""

_GOSSIP_PROTOCOLS = frozenset({MESHSUB_1_2, MESHSUB_1_1, MESHSUB_1_0})
_BACKOFF_PROTOCOLS = frozenset({MESHSUB_1_2, MESHSUB_1_1})
_MAX_BACKOFF = 24 * 3600.0
"""A peer's PRUNE backoff is clamped to this many seconds."""
_RPC_OVERHEAD = 1024
"""Room left in an RPC around the largest message: from, seqno, topic, signature, framing."""

_T = TypeVar("_T")


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Router parameters. Degree defaults are tuned for small clusters (DESIGN §4)."""

    d: int = 4
    """Target mesh degree."""
    d_lo: int = 2
    """Graft up to ``d`` when the mesh falls below this."""
    d_hi: int = 8
    """Prune down to ``d`` when the mesh grows above this."""
    d_lazy: int = 4
    """Minimum number of non-mesh peers that get IHAVE gossip per topic and heartbeat."""
    d_out: int = 1
    """Outbound peers kept in the mesh when pruning (< ``d_lo`` or 0, and <= ``d`` / 2)."""
    gossip_factor: float = 0.25
    """Gossip to ``max(d_lazy, gossip_factor * non-mesh topic peers)`` peers."""
    heartbeat_interval: float = 1.0
    history_length: int = 5
    """Heartbeats a message stays in the cache (answerable by IWANT)."""
    history_gossip: int = 3
    """Heartbeats a message is advertised in IHAVE."""
    fanout_ttl: float = 60.0
    seen_ttl: float = 120.0
    prune_backoff: float = 60.0
    unsubscribe_backoff: float = 10.0
    iwant_followup_time: float = 3.0
    """After asking one peer for a message, wait this long before asking another one."""
    gossip_retransmission: int = 3
    """Times one message is sent to one peer in answer to IWANTs."""
    flood_publish: bool = True
    """Send our own messages to every topic peer, not only the mesh/fanout (v1.1)."""
    max_message_size: int = 512 * 1024
    """Largest message ``data``; larger messages are refused (publish) or invalid (receive)."""
    max_topics_per_peer: int = 1000
    """Subscriptions tracked per peer; more are ignored and reported as misbehaviour."""
    max_peer_messages_per_interval: int = 2000
    """Published messages accepted from one peer per heartbeat interval."""
    max_peer_bytes_per_interval: int = 8 * 1024 * 1024
    """RPC bytes accepted from one peer per heartbeat interval."""
    max_peer_invalid_per_interval: int = 10
    """Invalid messages from one peer per interval before :class:`PeerMisbehaved`."""
    max_ihave_messages: int = 10
    """RPCs with IHAVE processed per peer and heartbeat (go ``MaxIHaveMessages``)."""
    max_ihave_length: int = 5000
    """Ids asked per peer and heartbeat, and ids advertised per topic (go ``MaxIHaveLength``)."""
    max_iwant_replies: int = 1000
    """Messages sent per peer and heartbeat in answer to IWANT."""
    max_outbox_messages: int = 4096
    """Messages queued for one peer and not yet taken by :meth:`GossipRouter.rpcs_to_send`."""
    hold_timeout: float = 1.0
    """A message of a held topic (the router's ``hold``) that the driver has not judged
    (:meth:`GossipRouter.validated`) this many seconds after it arrived is forwarded at the
    next heartbeat, as if accepted."""
    rpc_limits: RpcLimits = field(default_factory=RpcLimits)

    def __post_init__(self) -> None:
        if not 0 <= self.d_lo <= self.d <= self.d_hi:
            raise ValueError("need 0 <= d_lo <= d <= d_hi")
        if self.d_lazy < 0 or self.d_out < 0:
            raise ValueError("d_lazy and d_out must not be negative")
        if self.d_out > self.d // 2 or (self.d_out >= self.d_lo and self.d_out != 0):
            raise ValueError("need d_out < d_lo and d_out <= d / 2")
        if not 1 <= self.history_gossip <= self.history_length:
            raise ValueError("need 1 <= history_gossip <= history_length")
        durations = (
            self.heartbeat_interval,
            self.fanout_ttl,
            self.seen_ttl,
            self.prune_backoff,
            self.unsubscribe_backoff,
            self.iwant_followup_time,
            self.hold_timeout,
        )
        if min(durations) <= 0:
            raise ValueError("intervals, TTLs and backoffs must be positive")
        if self.max_message_size + _RPC_OVERHEAD > self.rpc_limits.max_rpc_size:
            raise ValueError("max_message_size must leave 1 KiB of room in max_rpc_size")


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A valid message arrived for a topic we subscribe to (once per message id)."""

    topic: str
    data: bytes
    from_peer: PeerId
    """The author (checked against the signature)."""
    seqno: int
    message_id: bytes
    received_from: PeerId
    """The peer that forwarded it to us."""


@dataclass(frozen=True, slots=True)
class PeerSubscribed:
    """``peer`` announced a subscription to ``topic``."""

    peer: PeerId
    topic: str


@dataclass(frozen=True, slots=True)
class PeerUnsubscribed:
    """``peer`` announced it left ``topic`` (not emitted when the peer disconnects)."""

    peer: PeerId
    topic: str


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A message from ``peer`` failed validation and was dropped (not forwarded)."""

    peer: PeerId
    reason: str
    """An :class:`InvalidReason` or :class:`~trionode.wire.pubsub_pb.RejectReason` value."""
    topic: str | None


@dataclass(frozen=True, slots=True)
class PeerMisbehaved:
    """``peer`` broke a rule or exceeded its budget; the driver may disconnect it.

    Emitted at most once per reason and heartbeat interval.
    """

    peer: PeerId
    reason: str
    """An :class:`InvalidReason` or :class:`DropReason` value."""


GossipEvent: TypeAlias = (
    MessageReceived | PeerSubscribed | PeerUnsubscribed | InvalidMessage | PeerMisbehaved
)


class InvalidReason(enum.StrEnum):
    """Router-level reasons for invalid input (see also ``RejectReason`` for signatures)."""

    MALFORMED_RPC = "malformed_rpc"
    MALFORMED_FRAME = "malformed_frame"
    """The stream's length prefix is garbage; nothing more can be read from it."""
    RPC_TOO_LARGE = "rpc_too_large"
    NO_TOPIC = "no_topic"
    MESSAGE_TOO_LARGE = "message_too_large"
    BAD_MESSAGE_ID = "bad_message_id"
    """The message-id function refused the message."""
    INVALID_MESSAGES = "invalid_messages"
    """Misbehaviour: too many invalid messages in one interval."""


class DropReason(enum.StrEnum):
    """Why valid-looking traffic was discarded."""

    NOT_SUBSCRIBED = "not_subscribed"
    PEER_MESSAGE_BUDGET = "peer_message_budget"
    PEER_BYTE_BUDGET = "peer_byte_budget"
    TOO_MANY_TOPICS = "too_many_topics"
    IHAVE_FLOOD = "ihave_flood"
    IWANT_FLOOD = "iwant_flood"
    IWANT_RETRANSMISSION = "iwant_retransmission"
    GRAFT_DURING_BACKOFF = "graft_during_backoff"
    OUTBOX_FULL = "outbox_full"
    UNKNOWN_PEER = "unknown_peer"
    OWN_MESSAGE = "own_message"
    """A message we signed, echoed back (after a restart our seen cache no longer has it)."""
    REJECTED = "rejected"
    """A held message the driver found invalid (:meth:`GossipRouter.validated`): not
    forwarded, cached or advertised."""


@dataclass(frozen=True, slots=True)
class GossipStatistics:
    """A snapshot of the router's counters and state (the driver exports it as metrics)."""

    peers: int
    subscriptions: tuple[str, ...]
    published: int
    received: int
    """Messages delivered as :class:`MessageReceived`."""
    duplicates: int
    forwarded: int
    """Message copies queued for peers (own publishes, forwards and IWANT replies)."""
    invalid: dict[str, int]
    """Invalid messages and RPCs by reason."""
    dropped: dict[str, int]
    """Discarded traffic by :class:`DropReason`."""
    misbehaviour: dict[str, int]
    """:class:`PeerMisbehaved` events by reason."""
    ihave_sent: int
    """IHAVE entries (one topic each)."""
    ihave_received: int
    iwant_sent: int
    """Message ids asked for."""
    iwant_received: int
    iwant_served: int
    """Messages sent in answer to IWANT."""
    graft_sent: int
    graft_received: int
    prune_sent: int
    prune_received: int
    mesh_sizes: dict[str, int]
    fanout_sizes: dict[str, int]
    topic_peers: dict[str, int]
    """Peers known to subscribe, per topic."""
    seen_cache_size: int
    message_cache_size: int
    heartbeats: int


class _Counters:
    __slots__ = (
        "dropped",
        "duplicates",
        "forwarded",
        "graft_received",
        "graft_sent",
        "heartbeats",
        "ihave_received",
        "ihave_sent",
        "invalid",
        "iwant_received",
        "iwant_sent",
        "iwant_served",
        "misbehaviour",
        "prune_received",
        "prune_sent",
        "published",
        "received",
    )

    def __init__(self) -> None:
        self.published = self.received = self.duplicates = self.forwarded = 0
        self.ihave_sent = self.ihave_received = 0
        self.iwant_sent = self.iwant_received = self.iwant_served = 0
        self.graft_sent = self.graft_received = self.prune_sent = self.prune_received = 0
        self.heartbeats = 0
        self.invalid: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.misbehaviour: Counter[str] = Counter()


# -- per-peer and cache state -----------------------------------------------------------------


class _Peer:
    """One connected peer: protocol, subscriptions, outbox, per-interval budget."""

    __slots__ = (
        "broken",
        "buffer",
        "bytes",
        "gossip",
        "ihaves",
        "invalid",
        "iwant_asked",
        "iwant_served",
        "messages",
        "out_graft",
        "out_ihave",
        "out_iwant",
        "out_messages",
        "out_prune",
        "out_subs",
        "outbound",
        "peer_id",
        "protocol",
        "reported",
        "skip",
        "topics",
    )

    def __init__(self, peer_id: PeerId, protocol: str, *, outbound: bool) -> None:
        self.peer_id = peer_id
        self.protocol = protocol
        self.outbound = outbound
        self.gossip = protocol in _GOSSIP_PROTOCOLS
        self.topics: dict[str, None] = {}
        # Outbox, turned into RPCs by rpcs_to_send().
        self.out_subs: dict[str, bool] = {}
        self.out_messages: list[PubsubMessage] = []
        self.out_ihave: list[ControlIHave] = []
        self.out_iwant: list[bytes] = []
        self.out_graft: dict[str, None] = {}
        self.out_prune: dict[str, ControlPrune] = {}
        # Budget for the current heartbeat interval.
        self.messages = self.bytes = self.invalid = 0
        self.ihaves = self.iwant_asked = self.iwant_served = 0
        self.reported: set[str] = set()
        # Inbound stream framing (receive_data).
        self.buffer = bytearray()
        self.skip = 0
        self.broken = False

    def reset_budget(self) -> None:
        self.messages = self.bytes = self.invalid = 0
        self.ihaves = self.iwant_asked = self.iwant_served = 0
        self.reported.clear()

    def take_rpc(self) -> RPC:
        subscriptions = tuple(SubOpts(flag, topic) for topic, flag in self.out_subs.items())
        control = ControlMessage(
            ihave=tuple(self.out_ihave),
            iwant=(ControlIWant(tuple(self.out_iwant)),) if self.out_iwant else (),
            graft=tuple(ControlGraft(topic) for topic in self.out_graft),
            prune=tuple(self.out_prune.values()),
        )
        rpc = RPC(subscriptions, tuple(self.out_messages), None if control.is_empty() else control)
        self.out_subs = {}
        self.out_messages = []
        self.out_ihave = []
        self.out_iwant = []
        self.out_graft = {}
        self.out_prune = {}
        return rpc


class _Cached:
    """A message in the mcache, with how often each peer got it through IWANT."""

    __slots__ = ("message", "served", "topic")

    def __init__(self, message: PubsubMessage, topic: str) -> None:
        self.message = message
        self.topic = topic
        self.served: dict[PeerId, int] = {}


@dataclass(frozen=True, slots=True)
class _Held:
    """A received message as forwarding needs it (see ``GossipRouter``'s ``hold``)."""

    message: PubsubMessage
    topic: str
    source: PeerId
    """The peer it came from."""
    author: PeerId
    expiry: float
    """When it is forwarded if not judged by then (``hold_timeout`` after it arrived)."""


# -- the router -------------------------------------------------------------------------------


class GossipRouter:
    """The gossipsub state machine for one host. See the module docstring."""

    def __init__(
        self,
        key: PrivateKey,
        *,
        initial_seqno: int,
        config: GossipConfig | None = None,
        rng: random.Random | None = None,
        message_id_fn: Callable[[PubsubMessage], bytes] = default_message_id,
        hold: Callable[[str], bool] | None = None,
    ) -> None:
        """Create a router publishing as ``key``.

        Args:
            key: our identity; every message we publish is signed with it.
            initial_seqno: the first seqno we use. Seqnos must increase across restarts, so
                pass ``time.time_ns()`` (what js-libp2p does).
            config: parameters; defaults to :class:`GossipConfig`.
            rng: randomness for peer selection; seed it for reproducible simulations.
            message_id_fn: must match every other peer on our topics. It may raise
                RemoteProtocolError for messages it cannot identify.
            hold: the topics whose received messages are forwarded (and cached for IWANT)
                only once the driver judged them (:meth:`validated`; at the latest after
                ``hold_timeout``): delivered first, and never forwarded if invalid. None:
                every message is forwarded as it arrives.

        Raises:
            LocalProtocolError: ``initial_seqno`` does not fit in 64 bits.
        """
        if not 0 <= initial_seqno < 1 << (8 * SEQNO_LENGTH):
            raise LocalProtocolError("initial_seqno must fit in an unsigned 64-bit integer")
        self._key = key
        self._local_id = key.peer_id()
        self._local_bytes = self._local_id.multihash
        self._config = config if config is not None else GossipConfig()
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (not crypto)
        self._message_id_fn = message_id_fn
        self._seqno = initial_seqno
        self._now: float | None = None
        self._next_heartbeat: float | None = None
        self._peers: dict[PeerId, _Peer] = {}
        self._subscriptions: dict[str, None] = {}
        self._topic_peers: dict[str, dict[PeerId, None]] = {}
        self._flood_peers: dict[str, dict[PeerId, None]] = {}
        """The floodsub subset of ``_topic_peers``: they get every message of the topic."""
        self._mesh: dict[str, dict[PeerId, None]] = {}
        self._fanout: dict[str, dict[PeerId, None]] = {}
        self._fanout_last_publish: dict[str, float] = {}
        self._backoff: dict[tuple[str, PeerId], float] = {}
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._iwant_pending: OrderedDict[bytes, float] = OrderedDict()
        self._mcache: dict[bytes, _Cached] = {}
        self._mcache_windows: deque[list[bytes]] = deque([[]])
        self._events: deque[GossipEvent] = deque()
        self._pending: dict[PeerId, None] = {}
        """Peers whose outbox is not empty, in the order they got output."""
        self._counters = _Counters()
        self._hold = hold
        self._held: OrderedDict[bytes, _Held] = OrderedDict()
        """Messages of held topics delivered and not yet judged, oldest first."""

    # -- introspection ----------------------------------------------------------------------

    @property
    def local_peer_id(self) -> PeerId:
        """Our PeerId (the ``from`` of everything we publish)."""
        return self._local_id

    @property
    def config(self) -> GossipConfig:
        """The parameters this router runs with."""
        return self._config

    def subscriptions(self) -> list[str]:
        """Topics we subscribe to."""
        return list(self._subscriptions)

    def peers(self) -> list[PeerId]:
        """Connected pubsub peers."""
        return list(self._peers)

    def peer_topics(self, peer_id: PeerId) -> list[str]:
        """Topics ``peer_id`` announced (empty for unknown peers)."""
        peer = self._peers.get(peer_id)
        return [] if peer is None else list(peer.topics)

    def topic_peers(self, topic: str) -> list[PeerId]:
        """Peers known to subscribe to ``topic``."""
        return list(self._topic_peers.get(topic, ()))

    def has_topic_peers(self, topic: str) -> bool:
        """Whether any peer is known to subscribe to ``topic``: if none is, a message
        published now reaches nobody (every recipient, mesh, fanout or flood, is one)."""
        return bool(self._topic_peers.get(topic))

    def mesh_peers(self, topic: str) -> list[PeerId]:
        """Our mesh for ``topic`` (empty if we do not subscribe)."""
        return list(self._mesh.get(topic, ()))

    def backoffs(self, topic: str) -> dict[PeerId, float]:
        """Peers we will not graft into ``topic``'s mesh, with the time their backoff ends."""
        return {
            peer_id: expiry
            for (backoff_topic, peer_id), expiry in self._backoff.items()
            if backoff_topic == topic and (self._now is None or expiry > self._now)
        }

    def statistics(self) -> GossipStatistics:
        """A snapshot of counters, cache sizes and mesh sizes."""
        c = self._counters
        return GossipStatistics(
            peers=len(self._peers),
            subscriptions=tuple(self._subscriptions),
            published=c.published,
            received=c.received,
            duplicates=c.duplicates,
            forwarded=c.forwarded,
            invalid=dict(c.invalid),
            dropped=dict(c.dropped),
            misbehaviour=dict(c.misbehaviour),
            ihave_sent=c.ihave_sent,
            ihave_received=c.ihave_received,
            iwant_sent=c.iwant_sent,
            iwant_received=c.iwant_received,
            iwant_served=c.iwant_served,
            graft_sent=c.graft_sent,
            graft_received=c.graft_received,
            prune_sent=c.prune_sent,
            prune_received=c.prune_received,
            mesh_sizes={topic: len(mesh) for topic, mesh in self._mesh.items()},
            fanout_sizes={topic: len(peers) for topic, peers in self._fanout.items()},
            topic_peers={topic: len(peers) for topic, peers in self._topic_peers.items()},
            seen_cache_size=len(self._seen),
            message_cache_size=len(self._mcache),
            heartbeats=c.heartbeats,
        )

    # -- output -----------------------------------------------------------------------------

    def next_event(self) -> GossipEvent | None:
        """The oldest undelivered event, or ``None``."""
        return self._events.popleft() if self._events else None

    def rpcs_to_send(self) -> list[tuple[PeerId, bytes]]:
        """Take everything queued for peers, as ``(peer, uvarint(len) || RPC)`` chunks.

        Each chunk is one complete framed RPC within ``rpc_limits``; write them, in order, to
        that peer's outbound stream. A peer's output is merged into as few RPCs as possible.
        """
        out: list[tuple[PeerId, bytes]] = []
        limits = self._config.rpc_limits
        for peer_id in self._pending:  # remove_peer() takes peers out of _pending
            peer = self._peers[peer_id]
            out.extend(
                (peer_id, encode_uvarint(len(body)) + body)
                for body in encode_rpc_split(peer.take_rpc(), limits)
            )
        self._pending.clear()
        return out

    def get_timer(self) -> float | None:
        """When :meth:`heartbeat` is next due, or ``None`` before the router has seen a time."""
        return self._next_heartbeat

    def handle_timer(self, now: float) -> None:
        """Run :meth:`heartbeat` if it is due at ``now``."""
        if self._next_heartbeat is None or now >= self._next_heartbeat:
            self.heartbeat(now)

    # -- peers ------------------------------------------------------------------------------

    def add_peer(self, peer_id: PeerId, protocol: str, *, outbound: bool) -> None:
        """Start talking pubsub with ``peer_id`` over ``protocol``.

        Queues our subscriptions for it (the hello RPC). ``outbound`` says whether we dialed
        the connection (the mesh keeps ``d_out`` such peers).

        Raises:
            LocalProtocolError: the peer is already known, is us, or the protocol is unknown.
        """
        if peer_id in self._peers:
            raise LocalProtocolError(f"pubsub peer {peer_id} added twice")
        if peer_id == self._local_id:
            raise LocalProtocolError("cannot add ourselves as a pubsub peer")
        if protocol not in _GOSSIP_PROTOCOLS and protocol != FLOODSUB:
            raise LocalProtocolError(f"unknown pubsub protocol {protocol!r}")
        peer = _Peer(peer_id, protocol, outbound=outbound)
        self._peers[peer_id] = peer
        if self._subscriptions:
            for topic in self._subscriptions:
                peer.out_subs[topic] = True
            self._pending[peer_id] = None

    def remove_peer(self, peer_id: PeerId) -> None:
        """Forget ``peer_id`` (connection closed). Unknown peers are ignored.

        Its backoffs are kept, so a quick reconnect cannot skip them.
        """
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        self._pending.pop(peer_id, None)
        for topic in peer.topics:
            self._forget_topic_peer(topic, peer)

    def _forget_topic_peer(self, topic: str, peer: _Peer) -> None:
        peer_id = peer.peer_id
        for table in (self._topic_peers, self._flood_peers):
            members = table.get(topic)
            if members is not None:
                members.pop(peer_id, None)
                if not members:
                    del table[topic]
        mesh = self._mesh.get(topic)
        if mesh is not None:
            mesh.pop(peer_id, None)
        fanout = self._fanout.get(topic)
        if fanout is not None:
            fanout.pop(peer_id, None)

    # -- local subscriptions and publishing ---------------------------------------------------

    def subscribe(self, topic: str, *, now: float | None = None) -> None:
        """Join ``topic``: announce it, and graft up to ``d`` peers (fanout peers first).

        ``now`` defaults to the latest time the router was given (for backoff checks).

        Raises:
            LocalProtocolError: the topic is longer than ``rpc_limits.max_topic_length``.
        """
        self._check_topic(topic)
        if topic in self._subscriptions:
            return
        now = self._time(now)
        self._subscriptions[topic] = None
        self._announce(topic, subscribe=True)
        mesh: dict[PeerId, None] = {}
        self._mesh[topic] = mesh
        self._fanout_last_publish.pop(topic, None)
        fanout = self._fanout.pop(topic, None)
        d = self._config.d
        if fanout:
            for peer_id in fanout:
                if len(mesh) >= d:
                    break
                if not self._in_backoff(topic, peer_id, now):
                    self._graft(self._peers[peer_id], topic, mesh)
        if len(mesh) < d:
            for peer_id in self._sample(self._graft_candidates(topic, mesh, now), d - len(mesh)):
                self._graft(self._peers[peer_id], topic, mesh)

    def unsubscribe(self, topic: str, *, now: float | None = None) -> None:
        """Leave ``topic``: announce it and PRUNE the mesh (``unsubscribe_backoff``)."""
        if topic not in self._subscriptions:
            return
        now = self._time(now)
        del self._subscriptions[topic]
        self._announce(topic, subscribe=False)
        for peer_id in self._mesh.pop(topic, {}):
            self._prune(self._peers[peer_id], topic, None, self._config.unsubscribe_backoff, now)

    def publish(self, topic: str, data: BytesLike, now: float) -> bytes:
        """Sign and send a new message; returns its message id.

        It is not delivered back to us as :class:`MessageReceived`.

        Raises:
            LocalProtocolError: ``data`` exceeds ``max_message_size`` or the topic is too long.
        """
        self._check_topic(topic)
        if len(data) > self._config.max_message_size:
            raise LocalProtocolError(
                f"message of {len(data)} bytes exceeds {self._config.max_message_size}"
            )
        self._advance(now)
        seqno = self._seqno
        if seqno >= 1 << (8 * SEQNO_LENGTH):
            raise LocalProtocolError("seqno space exhausted")
        self._seqno += 1
        unsigned = PubsubMessage(
            from_peer=self._local_bytes,
            data=bytes(data),
            seqno=seqno.to_bytes(SEQNO_LENGTH, "big"),
            topic=topic,
        )
        message = sign_message(self._key, unsigned)
        message.encode()  # cache the wire form once for all recipients
        message_id = self._message_id_fn(message)
        self._mark_seen(message_id, now)
        self._cache_put(message_id, message, topic)
        self._counters.published += 1
        recipients: Iterable[PeerId]
        if self._config.flood_publish:
            recipients = self._topic_peers.get(topic, ())
        else:
            peers = self._mesh.get(topic)
            if peers is None:
                peers = self._fanout.get(topic)
                if peers is None:
                    candidates = [
                        p for p in self._topic_peers.get(topic, ()) if self._peers[p].gossip
                    ]
                    peers = dict.fromkeys(self._sample(candidates, self._config.d))
                    self._fanout[topic] = peers
                self._fanout_last_publish[topic] = now
            recipients = chain(peers, self._flood_peers.get(topic, ()))
        for peer_id in recipients:
            self._queue_message(self._peers[peer_id], message)
        return message_id

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, peer_id: PeerId, data: BytesLike, now: float) -> None:
        """Feed bytes read from ``peer_id``'s inbound pubsub stream (any chunking).

        Complete ``uvarint(len) || RPC`` frames are handled as by :meth:`receive_rpc`. An
        oversized frame is skipped and counted; a garbled length prefix makes the rest of
        the stream unreadable, so further data from this peer is ignored (after a
        :class:`PeerMisbehaved` with ``malformed_frame``) until it is removed.
        """
        self._advance(now)
        peer = self._peers.get(peer_id)
        if peer is None:
            self._counters.dropped[DropReason.UNKNOWN_PEER] += 1
            return
        if peer.broken:
            return
        view = memoryview(data)
        if peer.skip:
            skipped = min(peer.skip, len(view))
            peer.skip -= skipped
            peer.bytes += skipped
            view = view[skipped:]
        if not view:
            return
        buffer = peer.buffer
        buffer += view
        max_size = self._config.rpc_limits.max_rpc_size
        offset = 0
        while offset < len(buffer):
            try:
                decoded = decode_uvarint(buffer, offset)
            except RemoteProtocolError:
                peer.broken = True
                buffer.clear()
                self._invalid_rpc(peer, InvalidReason.MALFORMED_FRAME)
                return
            if decoded is None:
                break
            length, used = decoded
            start = offset + used
            available = len(buffer) - start
            if length > max_size:
                self._invalid_rpc(peer, InvalidReason.RPC_TOO_LARGE)
                if available >= length:
                    peer.bytes += length
                    offset = start + length
                    continue
                peer.skip = length - available
                peer.bytes += available
                offset = len(buffer)
                break
            if available < length:
                break
            body = bytes(buffer[start : start + length])
            offset = start + length
            self._receive_body(peer, body, len(body), now)
        del buffer[:offset]

    def receive_rpc(self, peer_id: PeerId, rpc: RPC | BytesLike, now: float) -> None:
        """Handle one RPC from ``peer_id``: a protobuf body (no length prefix) or decoded.

        Bad input never raises: it is counted and reported as events.
        """
        self._advance(now)
        peer = self._peers.get(peer_id)
        if peer is None:
            self._counters.dropped[DropReason.UNKNOWN_PEER] += 1
            return
        if isinstance(rpc, RPC):
            size = sum(len(message.encode()) for message in rpc.publish)
            self._receive_body(peer, rpc, size, now)
        else:
            self._receive_body(peer, rpc, len(rpc), now)

    def _receive_body(self, peer: _Peer, rpc: RPC | BytesLike, size: int, now: float) -> None:
        limits = self._config.rpc_limits
        peer.bytes += size
        if peer.bytes > self._config.max_peer_bytes_per_interval:
            self._counters.dropped[DropReason.PEER_BYTE_BUDGET] += 1
            self._misbehaved(peer, DropReason.PEER_BYTE_BUDGET)
            return
        if not isinstance(rpc, RPC):
            if size > limits.max_rpc_size:
                self._invalid_rpc(peer, InvalidReason.RPC_TOO_LARGE)
                return
            try:
                rpc = decode_rpc(rpc, limits)
            except RemoteProtocolError:
                self._invalid_rpc(peer, InvalidReason.MALFORMED_RPC)
                return
        if rpc.subscriptions:
            self._on_subscriptions(peer, rpc.subscriptions)
        for message in rpc.publish:
            self._on_message(peer, message, now)
        if rpc.control is not None and peer.gossip:
            self._on_control(peer, rpc.control, now)

    def _on_subscriptions(self, peer: _Peer, subscriptions: Iterable[SubOpts]) -> None:
        for sub in subscriptions:
            topic = sub.topic
            if sub.subscribe:
                if topic in peer.topics:
                    continue
                if len(peer.topics) >= self._config.max_topics_per_peer:
                    self._counters.dropped[DropReason.TOO_MANY_TOPICS] += 1
                    self._misbehaved(peer, DropReason.TOO_MANY_TOPICS)
                    continue
                peer.topics[topic] = None
                self._topic_peers.setdefault(topic, {})[peer.peer_id] = None
                if not peer.gossip:
                    self._flood_peers.setdefault(topic, {})[peer.peer_id] = None
                self._events.append(PeerSubscribed(peer.peer_id, topic))
            elif topic in peer.topics:
                del peer.topics[topic]
                self._forget_topic_peer(topic, peer)
                self._events.append(PeerUnsubscribed(peer.peer_id, topic))

    def _on_message(self, peer: _Peer, message: PubsubMessage, now: float) -> None:
        config = self._config
        if peer.messages >= config.max_peer_messages_per_interval:
            self._counters.dropped[DropReason.PEER_MESSAGE_BUDGET] += 1
            self._misbehaved(peer, DropReason.PEER_MESSAGE_BUDGET)
            return
        peer.messages += 1
        topic = message.topic
        if topic is None:
            self._invalid_message(peer, InvalidReason.NO_TOPIC, None)
            return
        if topic not in self._subscriptions:
            self._counters.dropped[DropReason.NOT_SUBSCRIBED] += 1
            return
        if message.data is not None and len(message.data) > config.max_message_size:
            self._invalid_message(peer, InvalidReason.MESSAGE_TOO_LARGE, topic)
            return
        try:
            message_id = self._message_id_fn(message)
        except MessageRejectedError as exc:
            self._invalid_message(peer, exc.reason, topic)
            return
        except RemoteProtocolError:
            self._invalid_message(peer, InvalidReason.BAD_MESSAGE_ID, topic)
            return
        if message_id in self._seen:
            self._counters.duplicates += 1
            return
        try:
            author = verify_message(message)
        except MessageRejectedError as exc:
            self._invalid_message(peer, exc.reason, topic)
            return
        if message.from_peer == self._local_bytes:
            # Only we hold our key, so this is a message we published, typically in a
            # previous life: a restart empties the seen cache and a peer's IHAVE makes us
            # ask for our own message again. The peer that answers is honest, so this is
            # no penalty (it used to be, and disconnected peers of a restarted node); it is
            # marked seen so we don't ask again, and not delivered or forwarded.
            self._mark_seen(message_id, now)
            self._iwant_pending.pop(message_id, None)
            self._counters.dropped[DropReason.OWN_MESSAGE] += 1
            return
        self._mark_seen(message_id, now)
        self._iwant_pending.pop(message_id, None)
        self._counters.received += 1
        assert message.seqno is not None  # checked by verify_message
        self._events.append(
            MessageReceived(
                topic=topic,
                data=message.data if message.data is not None else b"",
                from_peer=author,
                seqno=int.from_bytes(message.seqno, "big"),
                message_id=message_id,
                received_from=peer.peer_id,
            )
        )
        held = _Held(message, topic, peer.peer_id, author, now + config.hold_timeout)
        if self._hold is not None and self._hold(topic):
            self._held[message_id] = held
        else:
            self._forward(message_id, held)

    def validated(self, message_id: bytes, *, accept: bool) -> bool:
        """The driver's judgement of a delivered message of a held topic (see ``hold``):
        accepted, it is forwarded to the topic's mesh now (and cached for IWANT); rejected,
        it is dropped (counted as ``DropReason.REJECTED``). Returns False if the message is
        not held (another topic's, judged before, or forwarded after ``hold_timeout``)."""
        held = self._held.pop(message_id, None)
        if held is None:
            return False
        if accept:
            self._forward(message_id, held)
        else:
            self._counters.dropped[DropReason.REJECTED] += 1
        return True

    def _forward(self, message_id: bytes, held: _Held) -> None:
        """Cache a received message for IWANT and queue it for the topic's mesh (and
        floodsub peers), except its author and the peer it came from."""
        message, topic, source, author = held.message, held.topic, held.source, held.author
        self._cache_put(message_id, message, topic)
        peers = self._peers
        for peer_id in chain(self._mesh.get(topic, ()), self._flood_peers.get(topic, ())):
            if peer_id not in (source, author):
                self._queue_message(peers[peer_id], message)

    def _on_control(self, peer: _Peer, control: ControlMessage, now: float) -> None:
        if control.ihave:
            self._on_ihave(peer, control.ihave, now)
        if control.iwant:
            self._on_iwant(peer, control.iwant)
        for graft in control.graft:
            self._on_graft(peer, graft.topic, now)
        for prune in control.prune:
            self._on_prune(peer, prune, now)

    def _on_ihave(self, peer: _Peer, ihaves: Iterable[ControlIHave], now: float) -> None:
        config = self._config
        peer.ihaves += 1
        if peer.ihaves > config.max_ihave_messages:
            self._counters.dropped[DropReason.IHAVE_FLOOD] += 1
            self._misbehaved(peer, DropReason.IHAVE_FLOOD)
            return
        wanted: list[bytes] = []
        pending = self._iwant_pending
        followup = now + config.iwant_followup_time
        for ihave in ihaves:
            self._counters.ihave_received += 1
            if ihave.topic not in self._mesh:
                continue
            for message_id in ihave.message_ids:
                if peer.iwant_asked >= config.max_ihave_length:
                    break
                if message_id in self._seen:
                    continue
                asked_until = pending.get(message_id)
                if asked_until is not None and asked_until > now:
                    continue
                pending[message_id] = followup
                pending.move_to_end(message_id)
                wanted.append(message_id)
                peer.iwant_asked += 1
        if wanted:
            peer.out_iwant.extend(wanted)
            self._pending[peer.peer_id] = None
            self._counters.iwant_sent += len(wanted)

    def _on_iwant(self, peer: _Peer, iwants: Iterable[ControlIWant]) -> None:
        config = self._config
        counters = self._counters
        for iwant in iwants:
            counters.iwant_received += len(iwant.message_ids)
            for message_id in iwant.message_ids:
                cached = self._mcache.get(message_id)
                if cached is None:
                    continue
                if peer.iwant_served >= config.max_iwant_replies:
                    counters.dropped[DropReason.IWANT_FLOOD] += 1
                    return
                served = cached.served.get(peer.peer_id, 0)
                if served >= config.gossip_retransmission:
                    counters.dropped[DropReason.IWANT_RETRANSMISSION] += 1
                    continue
                cached.served[peer.peer_id] = served + 1
                peer.iwant_served += 1
                counters.iwant_served += 1
                self._queue_message(peer, cached.message)

    def _on_graft(self, peer: _Peer, topic: str, now: float) -> None:
        self._counters.graft_received += 1
        mesh = self._mesh.get(topic)
        peer_id = peer.peer_id
        if mesh is not None and peer_id in mesh:
            return
        if mesh is None or topic not in peer.topics:
            # Not our topic (or the peer never said it subscribed): refuse, no backoff kept.
            self._queue_prune(peer, topic, self._config.prune_backoff)
            return
        if self._in_backoff(topic, peer_id, now):
            self._counters.dropped[DropReason.GRAFT_DURING_BACKOFF] += 1
            self._prune(peer, topic, None, self._config.prune_backoff, now)
            return
        if len(mesh) >= self._config.d_hi and not peer.outbound:
            self._prune(peer, topic, None, self._config.prune_backoff, now)
            return
        mesh[peer_id] = None

    def _on_prune(self, peer: _Peer, prune: ControlPrune, now: float) -> None:
        self._counters.prune_received += 1
        topic = prune.topic
        mesh = self._mesh.get(topic)
        if mesh is None:
            return
        mesh.pop(peer.peer_id, None)
        backoff = self._config.prune_backoff if prune.backoff is None else prune.backoff
        # One heartbeat of slack, so our next GRAFT cannot beat the pruner's clock.
        expiry = now + min(float(backoff), _MAX_BACKOFF) + self._config.heartbeat_interval
        key = (topic, peer.peer_id)
        self._backoff[key] = max(expiry, self._backoff.get(key, expiry))

    # -- heartbeat --------------------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        """Periodic work; call every ``heartbeat_interval`` (see :meth:`get_timer`).

        Resets per-peer budgets, repairs meshes (GRAFT/PRUNE), refreshes and expires fanout,
        emits IHAVE gossip, shifts the message cache and expires the seen cache and backoffs.
        """
        self._advance(now)
        self._next_heartbeat = now + self._config.heartbeat_interval
        self._counters.heartbeats += 1
        for peer in self._peers.values():
            peer.reset_budget()
        self._expire_backoff(now)
        for topic, mesh in self._mesh.items():
            self._maintain_mesh(topic, mesh, now)
        self._maintain_fanout(now)
        self._emit_gossip()
        self._shift_cache()
        self._expire(self._seen, now)
        self._expire(self._iwant_pending, now)
        held = self._held
        while held:
            oldest = next(iter(held))
            if held[oldest].expiry > now:
                break
            self._forward(oldest, held.pop(oldest))  # (not judged in time: as accepted)

    def _maintain_mesh(self, topic: str, mesh: dict[PeerId, None], now: float) -> None:
        config = self._config
        peers = self._peers
        size = len(mesh)
        if config.d_hi >= size >= len(self._topic_peers.get(topic, ())):
            # Every topic peer is in the mesh already (the mesh only holds topic peers)
            # and it is not too big: nothing to graft or prune. Each topic of a small
            # network, or of a node sharing a thousand contexts with a few peers, is like
            # this, and each heartbeat listed each one's candidates for nothing.
            return
        if size < config.d_lo:
            candidates = self._graft_candidates(topic, mesh, now)
            for peer_id in self._sample(candidates, config.d - size):
                self._graft(peers[peer_id], topic, mesh)
        elif size > config.d_hi:
            members = list(mesh)
            self._rng.shuffle(members)
            keep, rest = members[: config.d], members[config.d :]
            missing = config.d_out - sum(1 for p in keep if peers[p].outbound)
            if missing > 0:
                spare = [p for p in rest if peers[p].outbound][:missing]
                inbound_slots = [
                    i for i in reversed(range(len(keep))) if not peers[keep[i]].outbound
                ]
                for slot, peer_id in zip(inbound_slots, spare, strict=False):
                    keep[slot] = peer_id
            kept = set(keep)
            for peer_id in members:
                if peer_id not in kept:
                    self._prune(peers[peer_id], topic, mesh, config.prune_backoff, now)
        if config.d_out and len(mesh) >= config.d_lo:
            missing = config.d_out - sum(1 for p in mesh if peers[p].outbound)
            if missing > 0:
                candidates = [
                    p for p in self._graft_candidates(topic, mesh, now) if peers[p].outbound
                ]
                for peer_id in self._sample(candidates, missing):
                    self._graft(peers[peer_id], topic, mesh)

    def _maintain_fanout(self, now: float) -> None:
        config = self._config
        for topic in list(self._fanout):
            if self._fanout_last_publish[topic] + config.fanout_ttl < now:
                del self._fanout[topic]
                del self._fanout_last_publish[topic]
                continue
            fanout = self._fanout[topic]
            if len(fanout) < config.d:
                candidates = [
                    p
                    for p in self._topic_peers.get(topic, ())
                    if p not in fanout and self._peers[p].gossip
                ]
                for peer_id in self._sample(candidates, config.d - len(fanout)):
                    fanout[peer_id] = None

    def _emit_gossip(self) -> None:
        config = self._config
        by_topic: dict[str, list[bytes]] = {}
        for window in islice(self._mcache_windows, config.history_gossip):
            for message_id in window:
                by_topic.setdefault(self._mcache[message_id].topic, []).append(message_id)
        for topic, ids in by_topic.items():
            exclude = self._mesh.get(topic)
            if exclude is None:
                exclude = self._fanout.get(topic)
                if exclude is None:
                    continue
            candidates = [
                p
                for p in self._topic_peers.get(topic, ())
                if p not in exclude and self._peers[p].gossip
            ]
            if not candidates:
                continue
            count = max(config.d_lazy, int(config.gossip_factor * len(candidates)))
            advertised = ids
            if len(ids) > config.max_ihave_length:
                advertised = self._rng.sample(ids, config.max_ihave_length)
            entry = ControlIHave(topic, tuple(advertised))
            for peer_id in self._sample(candidates, count):
                self._peers[peer_id].out_ihave.append(entry)
                self._pending[peer_id] = None
                self._counters.ihave_sent += 1

    def _shift_cache(self) -> None:
        windows = self._mcache_windows
        windows.appendleft([])
        while len(windows) > self._config.history_length:
            for message_id in windows.pop():
                self._mcache.pop(message_id, None)

    def _expire_backoff(self, now: float) -> None:
        expired = [key for key, expiry in self._backoff.items() if expiry <= now]
        for key in expired:
            del self._backoff[key]

    @staticmethod
    def _expire(cache: OrderedDict[bytes, float], now: float) -> None:
        # Entries are appended (or moved to the end) with now + a constant TTL, so the
        # dict is ordered by expiry and we stop at the first live one.
        while cache:
            oldest = next(iter(cache))
            if cache[oldest] > now:
                break
            del cache[oldest]

    # -- helpers ----------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if self._now is None or now > self._now:
            self._now = now
        if self._next_heartbeat is None:
            self._next_heartbeat = now + self._config.heartbeat_interval

    def _time(self, now: float | None) -> float:
        if now is not None:
            self._advance(now)
            return now
        return 0.0 if self._now is None else self._now

    def _check_topic(self, topic: str) -> None:
        if len(topic.encode()) > self._config.rpc_limits.max_topic_length:
            raise LocalProtocolError(
                f"topic longer than {self._config.rpc_limits.max_topic_length}"
            )

    def _sample(self, items: list[_T], count: int) -> list[_T]:
        if count <= 0:
            return []
        if len(items) <= count:
            return items
        return self._rng.sample(items, count)

    def _in_backoff(self, topic: str, peer_id: PeerId, now: float) -> bool:
        expiry = self._backoff.get((topic, peer_id))
        return expiry is not None and expiry > now

    def _graft_candidates(self, topic: str, mesh: dict[PeerId, None], now: float) -> list[PeerId]:
        peers = self._peers
        return [
            p
            for p in self._topic_peers.get(topic, ())
            if p not in mesh and peers[p].gossip and not self._in_backoff(topic, p, now)
        ]

    def _announce(self, topic: str, *, subscribe: bool) -> None:
        for peer_id, peer in self._peers.items():
            peer.out_subs[topic] = subscribe
            self._pending[peer_id] = None

    def _graft(self, peer: _Peer, topic: str, mesh: dict[PeerId, None]) -> None:
        mesh[peer.peer_id] = None
        peer.out_prune.pop(topic, None)
        peer.out_graft[topic] = None
        self._pending[peer.peer_id] = None
        self._counters.graft_sent += 1

    def _prune(
        self,
        peer: _Peer,
        topic: str,
        mesh: dict[PeerId, None] | None,
        backoff: float,
        now: float,
    ) -> None:
        """Remove ``peer`` from ``mesh``, send PRUNE and back off from it ourselves."""
        if mesh is not None:
            mesh.pop(peer.peer_id, None)
        self._queue_prune(peer, topic, backoff)
        key = (topic, peer.peer_id)
        self._backoff[key] = max(now + backoff, self._backoff.get(key, now))

    def _queue_prune(self, peer: _Peer, topic: str, backoff: float) -> None:
        peer.out_graft.pop(topic, None)
        seconds = int(backoff) if peer.protocol in _BACKOFF_PROTOCOLS else None
        peer.out_prune[topic] = ControlPrune(topic, (), seconds)
        self._pending[peer.peer_id] = None
        self._counters.prune_sent += 1

    def _queue_message(self, peer: _Peer, message: PubsubMessage) -> None:
        if len(peer.out_messages) >= self._config.max_outbox_messages:
            self._counters.dropped[DropReason.OUTBOX_FULL] += 1
            return
        peer.out_messages.append(message)
        self._pending[peer.peer_id] = None
        self._counters.forwarded += 1

    def _mark_seen(self, message_id: bytes, now: float) -> None:
        self._seen[message_id] = now + self._config.seen_ttl
        self._seen.move_to_end(message_id)

    def _cache_put(self, message_id: bytes, message: PubsubMessage, topic: str) -> None:
        if message_id not in self._mcache:
            self._mcache[message_id] = _Cached(message, topic)
            self._mcache_windows[0].append(message_id)

    def _invalid_message(self, peer: _Peer, reason: str, topic: str | None) -> None:
        self._counters.invalid[reason] += 1
        self._events.append(InvalidMessage(peer.peer_id, reason, topic))
        peer.invalid += 1
        if peer.invalid >= self._config.max_peer_invalid_per_interval:
            self._misbehaved(peer, InvalidReason.INVALID_MESSAGES)

    def _invalid_rpc(self, peer: _Peer, reason: str) -> None:
        self._counters.invalid[reason] += 1
        self._misbehaved(peer, reason)

    def _misbehaved(self, peer: _Peer, reason: str) -> None:
        if reason in peer.reported:
            return
        peer.reported.add(reason)
        self._counters.misbehaviour[reason] += 1
        self._events.append(PeerMisbehaved(peer.peer_id, reason))
