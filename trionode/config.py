"""Node configuration: every limit and timeout the node uses lives here.

The file form is `<home>/config.toml`. Each section is a frozen msgspec Struct that forbids
unknown fields, so a typo is an error naming the key rather than a silently ignored option,
and each bounded value carries its bounds in the type (msgspec.Meta), so the error for a bad
value names the key and the bound. `config.toml.example` at the repository root documents
every option; `tests/test_config.py` checks that it matches these defaults.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from trionode.errors import ConfigError, ProtocolError
from trionode.layout import (  # import-light, for client commands
    CONFIG_FILE,
    DATA_DIR,
    DEFAULT_SERVER_PORT,
    DEFAULT_SWARM_PORT,
    IDENTITY_FILE,
    TOKEN_FILE,
)
from trionode.wire.gossipsub import GossipConfig
from trionode.wire.multiaddr import Multiaddr
from trionode.wire.pubsub_pb import RpcLimits

log = logging.getLogger(__name__)

PASSPHRASE_ENV: Final = "TRIONODE_PASSPHRASE"  # noqa: S105 - a variable name
JOIN_LAST_PROGRESS_TIMEOUT: Final = 5.0
"""Seconds `context join` waits, once the node answered, for the snapshot's last progress
notice when its follower had not shown it (cli_contexts._join): never longer than that."""
SNAPSHOT_FIRST_PAGES: Final = (256, 1024)
"""Records in the first pages of a snapshot we serve (then the full page the requester asked
for, at most 4,096): a small first page is read, sent and taken in at once, so the joiner
stores its first batch while the next pages are still being read, instead of idling
through a full page's read, transfer and decoding (issue #17)."""

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
MiB: Final = 1024 * 1024
_IPV4_PATTERN: Final = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$"
# What a browser sends as `Origin`: scheme, host (name, IPv4 or [IPv6]) and optional port.
Origin = Annotated[
    str, msgspec.Meta(pattern=r"^https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?$")
]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class NodeSection(_Section, frozen=True):
    """Process-level behaviour."""

    shutdown_grace: PositiveFloat = 10.0
    """Seconds in-flight work may drain after a shutdown request before it is cancelled."""
    log_level: Annotated[str, msgspec.Meta(pattern="^(DEBUG|INFO|WARNING|ERROR)$")] = "INFO"
    mode: Literal["read-write", "read-only"] = "read-write"
    """"read-only": a mirror that syncs, serves sync and answers views, reads and events,
    but writes nothing to any context: no method calls but views, no event handlers, no
    context creation, invitations, role changes, removals or leaving, no blob uploads
    (docs/operating.md lists what stays allowed)."""


class RelaySection(_Section, frozen=True):
    """`[network.relay]`: serving Circuit Relay v2 to others (the hop side)."""

    serve: bool = False
    """Be a relay for others (`/libp2p/circuit/relay/0.2.0/hop`), within the limits below."""
    max_reservations: PositiveInt = 64
    """Peers holding a reservation on us at once; more are refused (RESERVATION_REFUSED)."""
    reservation_ttl: PositiveInt = 3600
    """Seconds a reservation lasts; clients refresh it before it ends."""
    max_circuits_per_peer: PositiveInt = 8
    """Relayed connections open at once to one reserved peer."""
    circuit_duration: PositiveInt = 600
    """Seconds a relayed connection may last before we cut it."""
    circuit_data: PositiveInt = 64 * 1024 * 1024
    """Bytes (both directions together) a relayed connection may carry before we cut it."""


class DcutrSection(_Section, frozen=True):
    """`[network.dcutr]`: hole punching a relayed connection into a direct one (DCUtR)."""

    enabled: bool = True
    """Try to replace each relayed connection with a direct one (`/libp2p/dcutr`)."""
    attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    """Exchanges (each with a fresh round-trip measurement) before the relayed one stays."""
    attempt_timeout: PositiveFloat = 10.0
    """Seconds one attempt may take: the CONNECT/SYNC exchange and the simultaneous dials."""
    direct_dial_timeout: PositiveFloat = 5.0
    """Seconds for the first step: dialing the peer's own addresses (it may be dialable)."""
    max_sync_delay: PositiveFloat = 2.0
    """Upper bound of the half round trip the driving side waits after SYNC before dialing."""
    handover_grace: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """Seconds the relayed connection stays open after the direct one took over, so streams
    that were running on it can finish (new streams use the direct one)."""
    max_concurrent: PositiveInt = 8
    """Hole punches (driven or answered) running at once; more wait for the next chance."""


class KadSection(_Section, frozen=True):
    """`[network.kad]`: the Kademlia DHT (peer routing, private rendezvous for contexts)."""

    enabled: bool = True
    """Find members' addresses by peer id and co-members of our contexts by private provider
    records, beyond one LAN (see docs/operating.md)."""
    protocol: Annotated[str, msgspec.Meta(pattern=r"^/[!-~]{1,120}$")] = "/trionode/kad/1.0.0"
    """The DHT's protocol id: a private one by default so trionode nodes never join the public
    IPFS DHT; `/ipfs/kad/1.0.0` to talk to other libp2p DHTs."""
    server: bool = True
    """Answer DHT requests (server mode). Off: client mode, we only ask."""
    bucket_size: Annotated[int, msgspec.Meta(ge=1, le=64)] = 20
    """k: contacts per routing-table bucket and peers a lookup ends with."""
    alpha: Annotated[int, msgspec.Meta(ge=1, le=16)] = 3
    """Requests a lookup keeps in flight at once."""
    max_lookup_peers: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 200
    """Candidates one lookup remembers (the farthest never-asked ones are dropped past it)."""
    max_lookup_queries: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64
    """Requests one lookup sends at most."""
    request_timeout: PositiveFloat = 10.0
    """Seconds one DHT request (dial, stream, answer) may take."""
    lookup_timeout: PositiveFloat = 30.0
    """Seconds one lookup may take; it ends with what it found by then."""
    refresh_interval: PositiveFloat = 600.0
    """Seconds between routing-table refreshes (a lookup of our own id)."""
    max_requests_per_stream: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    """Requests we answer on one inbound stream before closing it."""
    provider_ttl: Annotated[int, msgspec.Meta(ge=60)] = 7200
    """Seconds a provider record we sign is valid; others drop it after that."""
    provider_republish: PositiveFloat = 1800.0
    """Seconds between re-announcing our contexts (and looking up co-members); below
    `provider_ttl` so records never lapse while we run."""
    key_check_interval: PositiveFloat = 60.0
    """Seconds between checks for a context key that changed (a rotation after a removal,
    local or received): such a context is announced under its new key then, not at the
    next republish. Creating, joining and leaving announce at once without waiting."""
    max_provider_keys: PositiveInt = 4096
    """Keys we store providers for (for others, as a DHT server)."""
    max_providers_per_key: Annotated[int, msgspec.Meta(ge=1, le=40)] = 20
    """Providers we store per key."""


class NetworkSection(_Section, frozen=True):
    """Peer-to-peer transport."""

    listen: list[str] = msgspec.field(
        default_factory=lambda: [f"/ip4/0.0.0.0/tcp/{DEFAULT_SWARM_PORT}"]
    )
    """Multiaddrs to listen on."""
    announce: list[str] = msgspec.field(default_factory=list)
    """Multiaddrs others should dial us at (a public IP, a DNS name, a forwarded port),
    advertised before the interface addresses of wildcard listeners; never 0.0.0.0."""
    announce_replace: bool = False
    """Advertise only `announce` (when it is not empty), not the listen addresses."""
    bootstrap: list[str] = msgspec.field(default_factory=list)
    """Multiaddrs (with /p2p/<peer id>) dialed at start and re-dialed with backoff."""
    max_connections: PositiveInt = 128
    """The cap. At it, an inbound newcomer displaces an unprotected peer from a more crowded
    address or is refused, and our dials are not attempted; dials to members (and members
    coming back) always get in, displacing an unprotected peer (see net/connmgr.py)."""
    max_pending_handshakes: PositiveInt = 32
    """Inbound connections still handshaking at once; more are closed at once."""
    max_pending_handshakes_per_address: PositiveInt = 4
    """Of those, how many may come from one IPv4 address or one IPv6 /64: idle sockets from
    one address never take every handshake slot."""
    max_connections_per_address: PositiveInt = 16
    """Connections from one IPv4 address or IPv6 /64 (throwaway identities from one address
    never fill `max_connections`). Peers that proved membership of a shared context and
    peers we dial are exempt."""
    connections_high_water: PositiveInt = 96
    """When more connections than this are open, the least valuable ones are closed ..."""
    connections_low_water: PositiveInt = 64
    """... down to this many. Peers that proved membership of a context we share (on a
    sync stream) are never closed for room, nor are connections younger than
    `connection_grace`."""
    connection_grace: PositiveFloat = 30.0
    """Seconds a new connection is spared by watermark trimming, so a member has time to
    prove itself. At `max_connections` a newcomer may still displace one (net/connmgr.py)."""
    replaced_connection_grace: PositiveFloat = 1.0
    """When two peers dial each other at once, both ends keep the connection the smaller peer
    id initiated. The other one stays open this many seconds for streams the peer opened on
    it before it learned which one won, then closes as soon as none is open ..."""
    replaced_connection_drain: PositiveFloat = 30.0
    """... or after this many seconds at most (a stream still open then is cut)."""
    max_streams_per_connection: PositiveInt = 256
    """Inbound streams a peer may have open at once; more are reset and counted."""
    max_refused_streams: PositiveInt = 64
    """A peer whose streams were refused this many times is disconnected (a stream flood)."""
    handshake_timeout: PositiveFloat = 10.0
    """Seconds for TCP connect + Noise + muxer negotiation."""
    dial_timeout: PositiveFloat = 10.0
    """Seconds for the TCP connect of one dial."""
    tcp_reuse_port: bool = True
    """Outbound TCP dials leave from the listen port (SO_REUSEPORT), so a port-keeping NAT
    maps them to the port we advertise and hole punching (DCUtR) can meet them."""
    negotiation_timeout: PositiveFloat = 10.0
    """Seconds for a new stream to agree on its protocol."""
    stream_first_message_timeout: PositiveFloat = 10.0
    """Seconds a sync, join or fetch stream we serve may stay silent before its first
    message; then it is closed (an idle stream holds nothing for long)."""
    stream_idle_timeout: PositiveFloat = 30.0
    """Seconds either side of such a stream waits for each further message."""
    ping_interval: PositiveFloat = 15.0
    """Seconds between keepalive pings (/ipfs/ping/1.0.0) to each peer."""
    ping_timeout: PositiveFloat = 10.0
    """A ping unanswered this long counts as failed; two failures close the connection."""
    ping_lag_allowance: PositiveFloat = 0.05
    """Seconds by which our own event loop's timers may resume late, on average, while a
    ping waits, before a miss is ours, not the peer's: a node too busy to run its tasks in
    time (a ping takes a few dozen task switches across both ends) would otherwise close
    every connection at once, and then redial and resync them, busier still. See
    `ping_excused_misses`."""
    ping_excused_misses: Annotated[int, msgspec.Meta(ge=0, le=100)] = 4
    """Misses in a row excused that way, at most; past them they count again, so a dead
    connection still closes on a node that stays too busy."""
    redial_initial_backoff: PositiveFloat = 1.0
    """First wait before re-dialing a bootstrap peer; it doubles on each failure ..."""
    redial_max_backoff: PositiveFloat = 60.0
    """... up to this many seconds."""
    event_channel_capacity: PositiveInt = 1000
    """Network events (gossip messages, peers up/down) queued for the node; when the queue
    is full new events are dropped and counted (gossip is best effort; sync repairs)."""
    target_peers: PositiveInt = 16
    """Discovery dials known peers while fewer than this many are connected (never past
    `max_connections`)."""
    peer_store_size: PositiveInt = 1000
    """Peers remembered with their addresses; when full, the stalest unconnected one goes."""
    peer_ttl: PositiveFloat = 3600.0
    """A peer neither connected nor seen (identify, mDNS) for this many seconds is forgotten."""
    peer_max_failures: PositiveInt = 3
    """A peer whose dials failed this many times in a row is forgotten as unreachable; between
    failures its redials back off like bootstrap redials (`redial_*_backoff`)."""
    member_redial_max_backoff: PositiveFloat = 10.0
    """Peers that share a context with us are never forgotten; their redials back off up to
    only this many seconds, so a restarted member is found again quickly."""
    offline_redial_interval: PositiveFloat = 0.5
    """While no peer at all is connected (our own network is the likely cause: a laptop
    asleep, a cable out, a partition), bootstrap and member peers are redialed at least this
    often, whatever backoff their failures built up: a node whose network comes back finds
    its peers within this many seconds. Online, dead peers keep their long backoffs."""
    peer_exchange_max_peers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32
    """Connected peers named in one answer to `/trionode/peers/1` (peer exchange)."""
    autonat: bool = True
    """AutoNAT v1 (`/libp2p/autonat/1.0.0`): ask peers to dial us back to learn whether we are
    reachable from outside (and which observed addresses work), and do the same for them."""
    autonat_interval: PositiveFloat = 300.0
    """Seconds between reachability checks once the status is known ..."""
    autonat_retry_interval: PositiveFloat = 30.0
    """... and while it is still unknown (too few peers answered)."""
    autonat_confirmations: PositiveInt = 3
    """Peers that must agree (dialed us back, or could not) before we call ourselves public
    (or private)."""
    autonat_allow_private: bool = False
    """Serve dial-backs to private and loopback addresses too. Off: such a check says nothing
    about reachability from the Internet. On: for a LAN or a test network."""
    autonat_max_dialbacks: PositiveInt = 4
    """Dial-backs we run for others at once; more requests are refused (E_DIAL_REFUSED)."""
    relays: list[str] = msgspec.field(default_factory=list)
    """Circuit Relay v2 relays (multiaddrs with /p2p/<peer id>) to keep a reservation on:
    peers that cannot dial us directly reach us through them (`/p2p-circuit` addresses)."""
    learn_relays: Annotated[int, msgspec.Meta(ge=0, le=8)] = 2
    """With no `relays` configured and AutoNAT saying we are private: reserve on up to this
    many connected peers that offer relaying (their identify lists the hop protocol) and
    advertise those `/p2p-circuit` addresses. 0: never."""
    relay: RelaySection = RelaySection()
    """`[network.relay]`: being a relay for others, and its limits."""
    dcutr: DcutrSection = DcutrSection()
    """`[network.dcutr]`: upgrading relayed connections to direct ones."""
    kad: KadSection = KadSection()
    """`[network.kad]`: the Kademlia DHT."""
    mdns: bool = True
    """Find peers on the local network with multicast DNS (libp2p mDNS, `_p2p._udp.local`)."""
    mdns_interval: PositiveFloat = 30.0
    """Seconds between mDNS queries (answers to others' queries are sent as they come)."""
    mdns_address: Annotated[str, msgspec.Meta(pattern=_IPV4_PATTERN)] = "224.0.0.251"
    """mDNS multicast group."""
    mdns_port: Port = 5353
    """mDNS UDP port."""
    mdns_interface: Annotated[str, msgspec.Meta(pattern=_IPV4_PATTERN)] = "0.0.0.0"  # noqa: S104
    """IPv4 address of the interface mDNS joins the group on; 0.0.0.0 lets the kernel choose."""


class PubsubSection(_Section, frozen=True):
    """Gossipsub (`/meshsub/1.1.0`): mesh degrees, timers, caches and per-peer limits."""

    d: PositiveInt = 4
    """Target mesh degree per topic."""
    d_lo: Annotated[int, msgspec.Meta(ge=0)] = 2
    """Graft up to `d` peers when a mesh falls below this."""
    d_hi: PositiveInt = 8
    """Prune down to `d` peers when a mesh grows above this."""
    d_lazy: Annotated[int, msgspec.Meta(ge=0)] = 4
    """Minimum peers outside the mesh that get IHAVE gossip per topic and heartbeat."""
    d_out: Annotated[int, msgspec.Meta(ge=0)] = 1
    """Outbound peers kept in a mesh when pruning (< d_lo and <= d / 2)."""
    heartbeat_interval: PositiveFloat = 1.0
    """Seconds between heartbeats (mesh repair, gossip, cache shifts, budget resets)."""
    history_length: PositiveInt = 5
    """Heartbeats a message stays in the cache (answerable by IWANT)."""
    history_gossip: PositiveInt = 3
    """Heartbeats a message is advertised in IHAVE (<= history_length)."""
    fanout_ttl: PositiveFloat = 60.0
    """Seconds a fanout set for a topic we publish to but do not subscribe to is kept."""
    seen_ttl: PositiveFloat = 120.0
    """Seconds a message id is remembered to drop duplicates."""
    prune_backoff: PositiveFloat = 60.0
    """Seconds a pruned peer is not grafted again."""
    unsubscribe_backoff: PositiveFloat = 10.0
    """Backoff announced to mesh peers when we leave a topic."""
    flood_publish: bool = True
    """Send our own messages to every peer of the topic, not only the mesh."""
    max_message_size: PositiveInt = 512 * 1024
    """Largest message payload published or accepted, in bytes."""
    max_rpc_size: Annotated[int, msgspec.Meta(ge=4096)] = MiB
    """Largest RPC frame accepted from a peer, in bytes (1 KiB more than max_message_size)."""
    max_topics_per_peer: PositiveInt = 1000
    """Subscriptions tracked per peer; more are ignored and count as misbehaviour."""
    max_peer_messages_per_interval: PositiveInt = 2000
    """Messages accepted from one peer per heartbeat interval; the excess is dropped."""
    max_peer_bytes_per_interval: PositiveInt = 8 * MiB
    """RPC bytes accepted from one peer per heartbeat interval; the excess is dropped."""
    max_peer_invalid_per_interval: PositiveInt = 10
    """Invalid messages from one peer per interval before it is disconnected."""
    outbox_capacity: PositiveInt = 256
    """RPCs queued for one peer's writer; when full, more are dropped and counted, so a
    slow peer never stalls the router or the other peers."""
    forward_after_delivery: bool = True
    """A message on a context's topic is forwarded once the node has taken it (a delta
    applied and shown, or found not ours to judge), not as it arrives, and never if its
    deltas are all invalid (`trionode/net/pubsub.py`). Off: forwarded on arrival."""
    hold_timeout: PositiveFloat = 1.0
    """Seconds a context topic's message waits for the node's judgement before it is
    forwarded anyway (at the next heartbeat after)."""

    def gossip_config(self) -> GossipConfig:
        """The router parameters. Raises ValueError if the degrees/timers are inconsistent."""
        return GossipConfig(
            d=self.d,
            d_lo=self.d_lo,
            d_hi=self.d_hi,
            d_lazy=self.d_lazy,
            d_out=self.d_out,
            heartbeat_interval=self.heartbeat_interval,
            history_length=self.history_length,
            history_gossip=self.history_gossip,
            fanout_ttl=self.fanout_ttl,
            seen_ttl=self.seen_ttl,
            prune_backoff=self.prune_backoff,
            unsubscribe_backoff=self.unsubscribe_backoff,
            flood_publish=self.flood_publish,
            max_message_size=self.max_message_size,
            max_topics_per_peer=self.max_topics_per_peer,
            max_peer_messages_per_interval=self.max_peer_messages_per_interval,
            max_peer_bytes_per_interval=self.max_peer_bytes_per_interval,
            max_peer_invalid_per_interval=self.max_peer_invalid_per_interval,
            hold_timeout=self.hold_timeout,
            rpc_limits=RpcLimits(max_rpc_size=self.max_rpc_size),
        )


class ApiSection(_Section, frozen=True):
    """The HTTP server: admin REST, JSON-RPC, WebSocket, metrics."""

    enabled: bool = True
    """Serve the API at all (in-process test clusters switch it off)."""
    host: str = "127.0.0.1"
    """Bind address. Loopback by default: exposing the API is a deliberate choice."""
    port: Port = DEFAULT_SERVER_PORT
    token_sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")] | None = None
    """SHA-256 (hex) of the bearer token. The token itself is only in <home>/api-token."""
    max_request_body: PositiveInt = 8 * MiB
    cors_origins: list[Origin] = msgspec.field(default_factory=list)
    """Browser origins (`scheme://host[:port]`, lowercase, no path) allowed to use the API.
    Empty: no browser page may; clients that send no `Origin` header (CLI, SDKs) still can,
    with the token. The WebSocket handshake checks it (a browser can open a WebSocket to
    any host); CORS is to use the same list."""
    max_json_depth: Annotated[int, msgspec.Meta(ge=2, le=512)] = 64
    """Deepest nesting of arrays/objects accepted in a JSON body or WebSocket message; deeper
    input gets 400 (a JSON-RPC parse error, a WebSocket error message)."""
    max_ws_message: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024
    """Largest WebSocket message a client may send, in bytes; the server closes the
    connection on a larger frame."""
    max_invitation_lifetime: PositiveFloat = 365 * 86400.0
    """Largest `expiresIn` (seconds) a client may give an invitation."""
    max_websockets: PositiveInt = 256
    """WebSocket connections open at once; more are refused with 503 at the handshake."""
    event_retention: PositiveFloat = 86400.0
    """Seconds applied-delta events are kept in LMDB, so a WebSocket client can resume with
    `since` across restarts; resuming from before that gets a `resync` message."""
    max_retained_events: PositiveInt = 100_000
    """Events kept at most, whatever their age (the oldest go first)."""
    max_event_shapes: PositiveInt = 4096
    """App event shapes (a name and its payload's keys) the event log numbers at once: a
    retained event of a numbered shape stores neither (~20 bytes less for a kv `set`);
    past it, events are stored whole."""
    sse_keepalive: PositiveFloat = 15.0
    """Seconds of silence after which an event stream sends a comment, so proxies keep it open."""
    session_ttl: PositiveFloat = 12 * 3600.0
    """Seconds a sign-in on the node's page (/admin/) lasts."""
    max_sessions: PositiveInt = 64
    """Page sessions held at once; signing in beyond that ends the oldest."""
    ticket_ttl: PositiveFloat = 30.0
    """Seconds a one-time ticket (for WebSocket and EventSource, which can't send headers) lasts."""
    max_tickets: PositiveInt = 1024
    """Unused tickets held at once; beyond that, issuing one answers 429."""


class StoreSection(_Section, frozen=True):
    """The LMDB datastore."""

    encrypted: bool = False
    """Seal every value at rest; the passphrase comes from $TRIONODE_PASSPHRASE."""
    initial_map_size: Annotated[int, msgspec.Meta(ge=MiB)] = 64 * MiB
    """Initial LMDB map size in bytes; it doubles whenever it fills up."""
    max_map_size: Annotated[int, msgspec.Meta(ge=MiB)] = 1024 * 1024 * MiB
    """The map never grows past this; a write that would need more fails cleanly."""
    reader_threads: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    """Threads that may read LMDB at once (writes are always one at a time)."""
    inline_commit_max_seconds: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.002
    """A small write commits on the event loop's own thread when nothing else is waiting
    to run and commits have lately taken at most this long on average (0: always in the
    writer thread); see `trionode/store/store.py`."""
    max_value_refs: Annotated[int, msgspec.Meta(ge=0, le=1 << 24)] = 65_536
    """32-byte ids (writers, parents) state rows may name by a short number; the table is
    held in memory (~250 B an id). Past it, rows keep the ids whole."""
    delta_retention: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    """Seconds a *final* delta's body is kept after its stamp before it is folded into the
    final state (0: at once). Non-final deltas are always kept: undo needs them."""
    fold_interval: PositiveFloat = 60.0
    """Seconds between folding passes over the loaded contexts."""
    fold_batch: PositiveInt = 256
    """Deltas folded per LMDB transaction."""


class ReplicationSection(_Section, frozen=True):
    """Deltas between members: pending limits and missing-parent fetches."""

    max_pending: PositiveInt = 1000
    """Deltas per context that may wait for their parents; the oldest is evicted beyond."""
    max_pending_per_author: PositiveInt = 250
    """Of those, deltas by one author: beyond, that author's own oldest is evicted, so one
    member flooding pending cannot push out the others' deltas."""
    pending_timeout: PositiveFloat = 300.0
    """Seconds a delta may wait for its parents before it is evicted (and counted); also how
    much further than `sync.max_clock_drift` ahead a delta may be stamped and still wait."""
    fetch_timeout: PositiveFloat = 30.0
    """Seconds for one missing-parent fetch from a peer."""
    processor_queue: PositiveInt = 1024
    """Deltas (local calls and received ones) that may wait for the delta processor;
    beyond, whoever submits one waits (the backpressure on API calls and gossip)."""
    group_commit_max_deltas: PositiveInt = 256
    """Deltas the processor commits together in one LMDB transaction (one fsync)."""
    group_commit_max_bytes: PositiveInt = 4 * 1024 * 1024
    """Bytes of received deltas and call arguments in one group commit."""
    gossip_queue: PositiveInt = 4096
    """Deltas this node authored waiting to be gossiped; beyond, they are not gossiped
    (heartbeats and sync carry them) and counted."""
    max_delta_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024, le=7 * MiB)] = 4 * MiB
    """Largest delta this node writes: a call whose changes seal to more is refused
    (413 / JSON-RPC -32005) and writes nothing. At most 7 MiB, so that every delta fits
    one sync answer (8 MiB frames) and can always reach the other members."""
    gossip_batch_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 1024
    """Delta bytes one gossip message carries at most (deltas committed together go out in
    one message, one signature); keep it below `pubsub.max_message_size`."""


class SyncSection(_Section, frozen=True):
    """Sync sessions and heartbeats: what makes convergence certain when gossip is lost."""

    interval: PositiveFloat = 10.0
    """Seconds between sync ticks."""
    min_interval: PositiveFloat = 5.0
    """A context synced this recently is skipped at a tick; also the base of the backoff."""
    heartbeat: PositiveFloat = 5.0
    """Seconds between heartbeats: each connected peer gets one stream naming the (heads,
    root) of every context whose topic it is on."""
    heartbeat_max_beats: PositiveInt = 16384
    """Contexts one peer's heartbeat stream may name; a longer one is cut off (counted)."""
    heartbeat_digests: bool = True
    """Offer peers a digest of our heads first (`/trionode/heartbeat/2`) and name contexts
    only where we differ: an idle heartbeat costs a few dozen bytes, not ~100 B per
    context. False: every heartbeat names every context (/1; /2 is not served either)."""
    heartbeat_max_buckets: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    """Buckets of contexts a digest answer holds (8 bytes each), ours and the most a peer's
    may hold: where digests differ, only the beats of differing buckets cross."""
    heartbeat_bucket_contexts: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 8
    """Contexts per bucket a digest answer aims at (fewer buckets for fewer contexts)."""
    announce_interval: PositiveFloat = 1.0
    """Seconds between two announcements of a context's new heads on its topic after sync
    sessions applied deltas (so peers reachable only through us pull at once): the first
    goes at once, the sessions within the interval after it share the next one."""
    timeout: PositiveFloat = 30.0
    """Seconds one session may take."""
    heartbeat_queue: PositiveInt = 256
    """Received heartbeats waiting for the sync manager; beyond, they are dropped (and
    counted): the next heartbeat or interval tick does the same job."""
    max_concurrent: PositiveInt = 30
    """Sessions at once, incoming and outgoing together."""
    on_join: bool = True
    """Greet a peer with our heartbeat as soon as it (re)subscribes to a context's topic (a
    reconnect, a healed partition, a restart), instead of waiting for the next heartbeat:
    whichever side lacks something starts a session at once."""
    join_jitter: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.2
    """Seconds: a peer that cannot be greeted gets a session after a random delay up to
    this, so a whole cluster healing at once does not stampede."""
    max_clock_drift: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 5.0
    """Seconds a received stamp (a delta's header or any record in it, or state) may lead
    our wall clock. A delta further ahead waits as pending until it does not; one more than
    `replication.pending_timeout` beyond this is refused (and counted), as is state."""
    max_peer_status: PositiveInt = 64
    """Peers per context whose last sync (time, protocol, deltas, error) the node remembers
    for the page; beyond, the one tried longest ago is forgotten."""
    max_ancestors: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 1024
    ancestor_headers: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 4096
    """Delta headers the ancestor walks of served sync streams keep decoded (the most
    recently read; up to about 2 KiB each with 64 parents): while many members catch up,
    each session walks the same recent deltas. 0: decode them on every walk."""
    walk_budget: PositiveFloat = 5.0
    """Seconds the ancestor walk of one delta answer we serve may take; past them the
    answer goes with the ancestors found so far and the requester asks on. Keep it well
    below `timeout` (the requester's): under load a longer walk outlived the session
    that asked for it, and the whole answer was lost."""
    """Ancestors a delta request asks for beside the deltas it names (those our heads'
    version vector does not cover), and the most a request we serve gets: a chain of
    deltas comes in one round trip, not one per delta. 0: one generation per round trip."""
    serve_max_requests: PositiveInt = 1024
    """Heads and delta requests one served sync stream may make; beyond, the stream is
    closed as a protocol violation (an honest session makes at most a few dozen)."""
    serve_timeout: PositiveFloat = 600.0
    """Seconds one served sync stream may stay open in all (a member that keeps asking
    would otherwise hold a session token for ever); well above `timeout`, which bounds
    the requester's side, so that a large snapshot still completes."""
    ack_interval: PositiveFloat = 30.0
    """Seconds between our signed finality acks on each context where we are (or were)
    admin, sent only when what we hold moved: how soon others may fold what we saw."""
    snapshot_page_records: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 4096
    """Records a joiner asks for per snapshot page (responders serve at most 4,096)."""
    snapshot_page_bytes: Annotated[int, msgspec.Meta(ge=1024, le=4 * MiB)] = 4 * MiB
    """Bytes a joiner asks for per snapshot page (responders serve at most 4 MiB)."""
    snapshot_window: Annotated[int, msgspec.Meta(ge=2, le=64)] = 16
    """Snapshot pages the responder may send ahead of the joiner's writes: the joiner
    buffers at most this many pages, and commits every half window (or
    `snapshot_batch_bytes`), with its progress marker, while the next half streams in."""
    snapshot_batch_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024, le=256 * MiB)] = 16 * MiB
    """Record bytes a joiner commits in one LMDB write (with the progress marker): larger
    batches write faster, smaller ones lose less to a crash."""
    snapshot_idle_timeout: PositiveFloat = 60.0
    """Seconds a streamed snapshot may go without a page (joiner) or a credit (responder).
    A snapshot stream has this deadline instead of `timeout` and `serve_timeout`, so a long
    one is never cut while it moves."""
    snapshot_keepalive: PositiveFloat = 5.0
    """Seconds between the "still preparing" messages a member sends a joiner while the
    first page of a snapshot waits for its final state to be built (once per loaded
    context; long for a large one). Keep it well below `network.stream_idle_timeout`."""
    snapshot_prepare_timeout: PositiveFloat = 600.0
    """Seconds a joiner waits for a snapshot to begin, "still preparing" messages or not:
    a member that only ever says "wait" is given up on."""


class AuthSection(_Section, frozen=True):
    """Authorization and finality (DESIGN §7.1, trionode/auth/finality.py)."""

    max_nonfinal_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 64 * MiB
    """Bytes of non-final data deltas (the undo log) one context may hold. Beyond, it takes
    no *new* ones until finality moves: local calls answer 503 / JSON-RPC -32006 and
    received deltas are refused without penalty (fetched again later). Finality stalls
    while an admin stays silent; see `oldest_unacked_admin` on /metrics."""


class AppsSection(_Section, frozen=True):
    """Which application bundles this node will execute."""

    trusted_signers: Annotated[list[str], msgspec.Meta(max_length=256)] = msgspec.field(
        default_factory=list
    )
    """Signer ids (Ed25519 public keys, base58 as `trionode app keygen` prints them, or hex)
    whose signed bundles may run here even when they arrive from a peer, e.g. when
    `context join` fetches the app of the context it joins. Bundles the operator installs
    locally always may."""
    upgrade_retry: PositiveFloat = 60.0
    """Seconds between attempts to fetch the app a context was upgraded to when no member
    could serve its bundle (`trionode/context/app_upgrades.py`)."""

    def __post_init__(self) -> None:
        for signer in self.trusted_signers:
            if not _is_signer_id(signer):
                raise ValueError(
                    f"trusted_signers: {signer[:100]!r} is not a signer id (the base58 "
                    "Ed25519 public key `trionode app keygen` prints)"
                )


def _is_signer_id(text: str) -> bool:
    import base58  # noqa: PLC0415 - only for configs that list signers

    text = text.strip()
    if len(text) == 64:
        try:
            return len(bytes.fromhex(text)) == 32
        except ValueError:
            return False
    try:
        return len(text) <= 44 and len(base58.b58decode(text)) == 32
    except ValueError:
        return False


class GcSection(_Section, frozen=True):
    """Garbage collection of CRDT tombstones."""

    interval: PositiveFloat = 3600.0
    """Seconds between GC passes."""
    tombstone_retention: PositiveFloat = 86400.0
    """Tombstones younger than this many seconds are kept, so late concurrent writes still
    resolve against them."""
    blob_retention: PositiveFloat = 3600.0
    """Seconds a blob stays after nothing references it any more (no pin, no context that
    holds it); also how long an abandoned partial fetch or orphan chunk file is kept."""


class BlobsSection(_Section, frozen=True):
    """The blob store and `/trionode/blob/1` transfers."""

    max_size: Annotated[int, msgspec.Meta(ge=1, le=64 * 1024 * MiB)] = 64 * 1024 * MiB
    """Largest blob stored (uploaded or fetched), in bytes."""
    fetch_peers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    """Peers one fetch downloads chunks from at once."""
    request_window: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    """Chunk requests in flight to one peer (pipelining keeps the stream busy)."""
    chunk_timeout: PositiveFloat = 30.0
    """Seconds a peer may take to deliver a requested chunk before the fetch drops it."""
    max_serving: PositiveInt = 16
    """Blob streams this node serves at once; more are refused (the fetcher tries others)."""
    call_read_max: Annotated[int, msgspec.Meta(ge=1, le=256 * MiB)] = 8 * MiB
    """Bytes of blobs one app call (a view, usually) may read in total; apps read bigger
    blobs in ranges."""
    call_loads: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    """Blob reads or attachments one app call may make that need the store (each reruns
    the call once its data is loaded)."""
    background_fetches: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    """Blobs fetched at once in the background (for the state's references: on a call's
    first read, or eagerly)."""
    fetch_queue: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024
    """Background fetches waiting for a slot; past that, requests are dropped and counted
    (a later read or change asks again)."""
    fetch_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 6
    """Tries of one background fetch before it gives up (a later read asks again)."""
    fetch_retry: PositiveFloat = 2.0
    """Seconds before the first retry of a failed background fetch; doubled each time."""
    fetch_retry_max: PositiveFloat = 300.0
    """Longest wait between retries of a background fetch."""
    eager_rescan: PositiveFloat = 600.0
    """Seconds between checks of every eager-policy context for referenced blobs not stored
    here (fetches that gave up, or that a restart interrupted); the first comes this long
    after start."""


class FileConfig(_Section, frozen=True):
    """The whole of config.toml."""

    node: NodeSection = NodeSection()
    network: NetworkSection = NetworkSection()
    pubsub: PubsubSection = PubsubSection()
    api: ApiSection = ApiSection()
    store: StoreSection = StoreSection()
    replication: ReplicationSection = ReplicationSection()
    sync: SyncSection = SyncSection()
    auth: AuthSection = AuthSection()
    apps: AppsSection = AppsSection()
    gc: GcSection = GcSection()
    blobs: BlobsSection = BlobsSection()


class NodeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What `open_node` needs: the home directory and the parsed file."""

    home: Path
    file: FileConfig = FileConfig()
    passphrase: str | None = None
    """Encryption passphrase, taken from the environment, never from the file."""
    inline_store: bool = False
    """Run datastore calls on the Trio thread instead of worker threads. Not in config.toml:
    for in-process test clusters under `autojump_clock` (see trionode/store/store.py)."""
    discovery: bool = True
    """Run discovery (peer exchange, dialing toward `network.target_peers`). Not in
    config.toml: in-process test clusters switch it off to keep the topology they built."""

    @property
    def data_dir(self) -> Path:
        return self.home / DATA_DIR

    @property
    def identity_path(self) -> Path:
        return self.home / IDENTITY_FILE

    @property
    def token_path(self) -> Path:
        return self.home / TOKEN_FILE

    @property
    def node(self) -> NodeSection:
        return self.file.node

    @property
    def network(self) -> NetworkSection:
        return self.file.network

    @property
    def pubsub(self) -> PubsubSection:
        return self.file.pubsub

    @property
    def api(self) -> ApiSection:
        return self.file.api

    @property
    def store(self) -> StoreSection:
        return self.file.store

    @property
    def replication(self) -> ReplicationSection:
        return self.file.replication

    @property
    def sync(self) -> SyncSection:
        return self.file.sync

    @property
    def auth(self) -> AuthSection:
        return self.file.auth

    @property
    def apps(self) -> AppsSection:
        return self.file.apps

    @property
    def gc(self) -> GcSection:
        return self.file.gc

    @property
    def blobs(self) -> BlobsSection:
        return self.file.blobs


def _where(path: str) -> str:
    # msgspec reports `$.api.port`; users wrote `api.port`.
    return path.removeprefix("$.").removeprefix("$")


_FLAT_RELAY_KEYS: Final = {f"relay_{name}": name for name in RelaySection.__struct_fields__}
"""Keys of the first relay release (`network.relay_serve` …), now `[network.relay]` (`serve`)."""


def _migrate_flat_relay_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Read the old flat `network.relay_*` keys as their `[network.relay]` names, saying so once.

    Both spellings of one key at once is an error: which one was meant is a guess.
    """
    network = raw.get("network")
    if not isinstance(network, dict) or not _FLAT_RELAY_KEYS.keys() & network.keys():
        return raw
    network = dict(network)
    table = network.get("relay", {})
    if not isinstance(table, dict):
        return raw  # `network.relay` is not a table: validation names it
    table = dict(table)
    old = sorted(_FLAT_RELAY_KEYS.keys() & network.keys())
    for key in old:
        new = _FLAT_RELAY_KEYS[key]
        if new in table:
            raise ConfigError(f"{source}: `network.{key}` and `network.relay.{new}` both set")
        table[new] = network.pop(key)
    network["relay"] = table
    log.warning(
        "%s: %s: deprecated, write them as `[network.relay]` %s",
        source,
        ", ".join(f"`network.{key}`" for key in old),
        ", ".join(_FLAT_RELAY_KEYS[key] for key in old),
    )
    return {**raw, "network": network}


def parse_config(raw: dict[str, Any], *, source: str) -> FileConfig:
    """Validate a decoded TOML document; errors name the file and the dotted key."""
    raw = _migrate_flat_relay_keys(raw, source)
    try:
        return msgspec.convert(raw, FileConfig)
    except msgspec.ValidationError as exc:
        message = str(exc)
        reason, _, path = message.partition(" - at `")
        path = path.rstrip("`")
        if reason.startswith("Object contains unknown field `"):
            key = reason.split("`")[1]
            full = f"{_where(path)}.{key}" if _where(path) else key
            raise ConfigError(f"{source}: unknown key `{full}`") from None
        where = _where(path) or "(top level)"
        raise ConfigError(f"{source}: `{where}`: {reason}") from None


def load_config(home: Path, *, env: dict[str, str] | None = None) -> NodeConfig:
    """Read `<home>/config.toml`; every problem is one ConfigError line naming the path/key."""
    if not home.is_dir():
        raise ConfigError(
            f"home directory {home} does not exist (run `trionode init --home {home}`)"
        )
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing (run `trionode init --home {home}`)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    file = parse_config(raw, source=str(path))
    if file.store.initial_map_size > file.store.max_map_size:
        raise ConfigError(f"{path}: `store.initial_map_size` is larger than `store.max_map_size`")
    net = file.network
    if not net.connections_low_water <= net.connections_high_water <= net.max_connections:
        raise ConfigError(
            f"{path}: `network`: connections_low_water <= connections_high_water"
            " <= max_connections must hold"
        )
    try:
        file.pubsub.gossip_config()
    except ValueError as exc:
        raise ConfigError(f"{path}: `pubsub`: {exc}") from None
    for key, addresses in (
        ("network.listen", file.network.listen),
        ("network.bootstrap", file.network.bootstrap),
    ):
        for text in addresses:
            try:
                Multiaddr.from_string(text)
            except ProtocolError as exc:
                raise ConfigError(f"{path}: `{key}`: {text!r} is not a multiaddr: {exc}") from None
    if net.kad.provider_republish >= net.kad.provider_ttl:
        raise ConfigError(
            f"{path}: `network.kad.provider_republish` must be below `network.kad.provider_ttl`"
        )
    passphrase = (env or {}).get(PASSPHRASE_ENV)
    if file.store.encrypted and not passphrase:
        raise ConfigError(f"{path}: `store.encrypted` is true but ${PASSPHRASE_ENV} is not set")
    return NodeConfig(home=home, file=file, passphrase=passphrase)


def render_config(file: FileConfig) -> str:
    """Write a FileConfig as TOML (used by `trionode init`)."""
    lines: list[str] = []
    for section_name in FileConfig.__struct_fields__:
        _render_table(section_name, getattr(file, section_name), lines)
    return "\n".join(lines)


def _render_table(name: str, section: msgspec.Struct, lines: list[str]) -> None:
    # A TOML table's own keys come before its sub-tables (`[network]` before `[network.relay]`).
    lines.append(f"[{name}]")
    tables = []
    for field in type(section).__struct_fields__:
        value = getattr(section, field)
        if isinstance(value, msgspec.Struct):
            tables.append((f"{name}.{field}", value))
        elif value is not None:
            lines.append(f"{field} = {_toml_value(value)}")
    lines.append("")
    for table_name, table in tables:
        _render_table(table_name, table, lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")
