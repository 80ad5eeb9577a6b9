"""Who may connect, and who goes when room runs out: the host's connection manager.

The manager is bookkeeping only (no tasks, no sockets, time passed in as ``now``); the Host
asks it before and after each handshake and closes the connections it names.

Theory of operation:

* **Address groups.** Peers are grouped by where they connect from: one group per IPv4
  address and per IPv6 /64 (one machine or one subscriber usually holds a whole /64). A
  group gets at most ``max_pending_handshakes_per_address`` of the ``max_pending_handshakes``
  handshake slots and at most ``max_connections_per_address`` inbound connections, so idle
  sockets or throwaway identities from one place never take every slot. When every
  handshake slot is taken (idle sockets from many places), a new socket takes the slot of
  the *oldest* pending handshake from the most crowded group: an honest handshake takes
  milliseconds, so it is never the oldest; an idle socket always is.
* **Protection is earned.** A peer that signed a membership proof for a context we share
  (on a sync stream; :meth:`ConnectionManager.prove`) is *protected*: never closed to make
  room and exempt from the per-address share. A gossip subscription proves nothing (anyone
  can send one), so it earns nothing. Proofs are remembered after a disconnect (bounded), so
  a member that comes back, or that we dial, is recognised at once.
* **Watermarks.** Above ``connections_high_water`` connections the manager names the least
  valuable unprotected ones older than ``connection_grace`` for closing, down to
  ``connections_low_water``.
* **The hard cap.** At ``max_connections`` a newcomer either displaces someone or is
  refused. A member (known proof, or a dial the caller marks as to a member) displaces the
  least valuable unprotected peer, or exceeds the cap when every peer is protected:
  a member is never refused for lack of room. Our other dials are refused (they wait for
  room like anyone). An unknown inbound peer displaces only a peer from a more crowded
  address group than its own, so a crowd from a few addresses cannot keep a newcomer from
  elsewhere out, and it cannot push out peers from less crowded places either.
* **Value** (least valuable first): inbound before outbound, then peers from the most crowded
  address group, then the newest (a peer that has stayed a while is worth more than one that
  just came; an attacker's churn costs only the attacker's own connections).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Hashable

import attrs

from trionode.config import NetworkSection
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

IPV6_GROUP_PREFIX = 64
"""Bits of an IPv6 address that name its group (one subscriber's /64)."""

AddressGroup = str | None
"""``"192.0.2.7"``, ``"2001:db8::/64"``; None when the address is unknown (one shared group)."""


def address_group(addr: Multiaddr | None) -> AddressGroup:
    """The group of a remote address: the IPv4 address itself, or its IPv6 /64."""
    hp = None if addr is None else addr.tcp_host_port()
    if hp is None:
        return None
    try:
        ip = ipaddress.ip_address(hp[0])
    except ValueError:
        return hp[0]  # a DNS name (never for accepted sockets): group by the name
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_GROUP_PREFIX), strict=False))
    return str(ip)


@attrs.frozen
class ConnectionLimits:
    max_connections: int = 128
    high_water: int = 96
    low_water: int = 64
    grace: float = 30.0
    max_per_address: int = 16
    max_pending: int = 32
    max_pending_per_address: int = 4
    remembered_members: int = 1000
    """Peers whose proofs are remembered after they disconnect (least recently proven go)."""

    @classmethod
    def from_config(cls, config: NetworkSection) -> ConnectionLimits:
        # load_config checks low <= high <= max; sections built in code may not hold it.
        high = min(config.connections_high_water, config.max_connections)
        return cls(
            max_connections=config.max_connections,
            high_water=high,
            low_water=min(config.connections_low_water, high),
            grace=config.connection_grace,
            max_per_address=config.max_connections_per_address,
            max_pending=config.max_pending_handshakes,
            max_pending_per_address=config.max_pending_handshakes_per_address,
            remembered_members=config.peer_store_size,
        )


@attrs.define
class _Entry:
    group: AddressGroup
    outbound: bool
    opened_at: float
    member_dial: bool


@attrs.frozen
class Admission:
    """The answer for a connection that finished its handshake."""

    refused: str | None
    """None when admitted; else the reason (a metric label): ``connection_limit``,
    ``address_limit``."""
    evict: tuple[PeerId, ...] = ()
    """Peers to close to make room for it (at most one)."""


@attrs.frozen
class HandshakeAdmission:
    """The answer for an inbound socket about to handshake."""

    refused: str | None
    """None when it may handshake; else the reason (a metric label)."""
    evict: Hashable | None = None
    """The token of an older pending handshake to abort: its slot is this one's now."""


@attrs.frozen
class ConnectionManagerStatistics:
    connections: int
    protected: int
    pending_handshakes: int
    remembered_members: int


class ConnectionManager:
    """Admission, protection and trimming decisions for one Host (see the module doc)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._pending: Counter[AddressGroup] = Counter()
        self._handshakes: dict[Hashable, AddressGroup] = {}
        """Pending handshakes by token, oldest first (dicts keep insertion order)."""
        self._entries: dict[PeerId, _Entry] = {}
        self._inbound_per_group: Counter[AddressGroup] = Counter()
        self._proven: OrderedDict[PeerId, set[bytes]] = OrderedDict()

    # -- handshakes ------------------------------------------------------------------------

    def begin_handshake(self, group: AddressGroup, token: Hashable) -> HandshakeAdmission:
        """Take a handshake slot for an inbound socket from ``group``, identified by
        ``token`` (the caller's handle to abort it), unless refused. A slot is given back
        with :meth:`end_handshake` (whatever happened, even after an eviction)."""
        if self._pending[group] >= self.limits.max_pending_per_address:
            return HandshakeAdmission("too_many_pending_from_address")
        evict: Hashable | None = None
        if len(self._handshakes) >= self.limits.max_pending:
            crowd = max(self._pending.values())
            if self._pending[group] + 1 > crowd:
                return HandshakeAdmission("too_many_pending")
            evict = next(t for t, g in self._handshakes.items() if self._pending[g] == crowd)
            self.end_handshake(evict)
        self._handshakes[token] = group
        self._pending[group] += 1
        return HandshakeAdmission(None, evict)

    def end_handshake(self, token: Hashable) -> None:
        if token not in self._handshakes:
            return  # evicted earlier
        group = self._handshakes.pop(token)
        self._pending[group] -= 1
        if self._pending[group] <= 0:
            del self._pending[group]

    # -- admission -------------------------------------------------------------------------

    def may_accept(self, group: AddressGroup) -> str | None:
        """Before the handshake of an inbound socket: None if it could be admitted, else why
        not. (A known member from a full group is only recognised after the handshake, so
        this errs on the side of letting the handshake happen only when the group is not
        full or the node holds a peer the newcomer could displace.)"""
        if self._inbound_per_group[group] >= self.limits.max_per_address:
            return "address_limit"
        if len(self._entries) >= self.limits.max_connections and not self._displaceable_for(group):
            return "connection_limit"
        return None

    def may_dial(self, peer: PeerId | None, *, member: bool = False) -> bool:
        """Whether an outbound dial could be admitted (a member's always can)."""
        if member or (peer is not None and self.is_protected(peer)):
            return True
        return len(self._entries) < self.limits.max_connections

    def admit(
        self,
        peer: PeerId,
        group: AddressGroup,
        *,
        outbound: bool,
        now: float,
        member: bool = False,
    ) -> Admission:
        """Register a connection that finished its handshake, or refuse it.

        ``member``: we dialled it as a member of a context we share (the caller's word).
        A connection that replaces the same peer's other one (a simultaneous dial) never
        needs room.
        """
        existing = self._entries.get(peer)
        if existing is not None:
            self._forget(peer)
            self._add(peer, _Entry(group, outbound, existing.opened_at, member))
            return Admission(None)
        known = member or self.is_protected(peer)
        if (
            not outbound
            and not known
            and self._inbound_per_group[group] >= self.limits.max_per_address
        ):
            return Admission("address_limit")
        evict: tuple[PeerId, ...] = ()
        if len(self._entries) >= self.limits.max_connections:
            if known:
                victim = self._least_valuable(self._entries)
            elif outbound:
                victim = None  # our own dials to non-members wait for room like anyone
            else:
                victim = self._displaceable_for(group)
            if victim is None and not known:
                return Admission("connection_limit")
            if victim is not None:
                self._forget(victim)
                evict = (victim,)
        self._add(peer, _Entry(group, outbound, now, member))
        return Admission(None, evict)

    def remove(self, peer: PeerId) -> None:
        """The peer's connection closed."""
        self._forget(peer)

    def _forget(self, peer: PeerId) -> None:
        entry = self._entries.pop(peer, None)
        if entry is not None and not entry.outbound:
            self._inbound_per_group[entry.group] -= 1
            if self._inbound_per_group[entry.group] <= 0:
                del self._inbound_per_group[entry.group]

    def _add(self, peer: PeerId, entry: _Entry) -> None:
        self._entries[peer] = entry
        if not entry.outbound:
            self._inbound_per_group[entry.group] += 1

    # -- protection ------------------------------------------------------------------------

    def prove(self, peer: PeerId, context_id: bytes) -> bool:
        """``peer`` proved membership of ``context_id`` (a context we share). Returns True if
        that made it protected (it was not before)."""
        contexts = self._proven.get(peer)
        newly = contexts is None
        if contexts is None:
            contexts = self._proven[peer] = set()
        contexts.add(context_id)
        self._proven.move_to_end(peer)
        while len(self._proven) > self.limits.remembered_members:
            self._proven.popitem(last=False)
        return newly

    def forget_context(self, context_id: bytes) -> None:
        """We left ``context_id``: proofs for it protect nobody any more."""
        for peer in list(self._proven):
            contexts = self._proven[peer]
            contexts.discard(context_id)
            if not contexts:
                del self._proven[peer]

    def is_protected(self, peer: PeerId) -> bool:
        return peer in self._proven

    # -- trimming --------------------------------------------------------------------------

    def trim(self, now: float) -> list[PeerId]:
        """Peers to close now: above the high water mark, the least valuable unprotected
        ones past their grace period, until the low water mark (or nobody is left to
        close). They are forgotten here at once; :meth:`remove` for them is harmless."""
        if len(self._entries) <= self.limits.high_water:
            return []
        candidates = {
            peer: entry
            for peer, entry in self._entries.items()
            if now - entry.opened_at >= self.limits.grace
        }
        closing: list[PeerId] = []
        while len(self._entries) > self.limits.low_water:
            victim = self._least_valuable(candidates)
            if victim is None:
                break
            del candidates[victim]
            self._forget(victim)
            closing.append(victim)
        return closing

    def _displaceable_for(self, group: AddressGroup) -> PeerId | None:
        """The peer an unknown inbound newcomer from ``group`` may displace: the least
        valuable unprotected inbound peer, if its group stays at least as crowded as the
        newcomer's after the swap (so two groups never trade places back and forth)."""
        victim = self._least_valuable(self._entries)
        if victim is None:
            return None
        entry = self._entries[victim]
        if entry.outbound:
            return None  # inbound peers go first: no unprotected inbound peer is left
        if self._inbound_per_group[entry.group] - 1 >= self._inbound_per_group[group] + 1:
            return victim
        return None

    def _least_valuable(self, among: dict[PeerId, _Entry]) -> PeerId | None:
        best: PeerId | None = None
        best_key: tuple[bool, int, float] | None = None
        for peer, entry in among.items():
            if entry.member_dial or self.is_protected(peer):
                continue
            crowd = 0 if entry.outbound else self._inbound_per_group[entry.group]
            key = (entry.outbound, -crowd, -entry.opened_at)
            if best_key is None or key < best_key:
                best, best_key = peer, key
        return best

    # -- introspection ---------------------------------------------------------------------

    def statistics(self) -> ConnectionManagerStatistics:
        return ConnectionManagerStatistics(
            connections=len(self._entries),
            protected=sum(1 for peer in self._entries if self.is_protected(peer)),
            pending_handshakes=len(self._handshakes),
            remembered_members=len(self._proven),
        )
