"""The peer store: every peer we know how to reach, whether or not we are connected to it.

Each entry holds the peer's dialable addresses (TCP over ip4/ip6/dns, newest first, at most
:data:`MAX_ADDRS_PER_PEER`), when we last had direct evidence it exists, how many dials in a
row failed, and when the next dial may happen. Rules:

- *Sources.* ``identify`` (the peer told us itself over a connection) and ``mdns`` (it
  answered on the local link) are direct evidence: they refresh ``last_seen``. ``exchange``
  (another peer mentioned it) is hearsay: it adds addresses but refreshes nothing, and is
  ignored for a peer we gave up on within the last ``ttl`` seconds, so a peer everyone
  mentions but nobody can reach is not dialed in a loop. ``bootstrap`` entries are pinned:
  the host keeps them connected itself, so discovery never dials, expires or evicts them.
- *Forgetting.* After ``max_failures`` consecutive failed dials a peer is forgotten
  ("unreachable"); between failures it backs off exponentially from ``initial_backoff`` to
  ``max_backoff``. A peer neither connected nor directly seen for ``ttl`` seconds is
  forgotten ("expired"). When the store is full, adding a peer evicts the unconnected,
  unpinned entry with the most failures and, among those, the oldest ``last_seen``
  ("evicted").
- *Connected peers* (told by :meth:`PeerStore.set_connected`) are never forgotten and count
  as seen while connected.
- *Member peers* (told by :meth:`PeerStore.set_members`: peers that share a context with us)
  are never forgotten, expired or evicted, however often their dials fail: a member that is
  down for an hour must be found again when it comes back. Their redial backoff stops at
  ``member_max_backoff`` (low), and they are dial candidates before everyone else.
  ``stored`` entries are member addresses read back from LMDB at start.
- *Network back.* When the node goes from no connection at all to one (the network came
  back: a laptop woke up, a partition healed, the first backed-off dial got through), or a
  member whose dials were failing connects (either way: it came back, so whatever cut it
  off may have cut off the others too), every unconnected member becomes dialable at once,
  instead of each waiting out its own backoff (failures are kept, so a member that is
  really down backs off as before).
- *Offline.* While no peer at all is connected, a member's backoff is at most
  ``offline_backoff``: the likely cause is our own network, and the first dial that gets
  through after it comes back should not wait out a backoff built up while it was gone.

The store does no I/O. Time comes from an injected clock (Trio's by default), and
:meth:`PeerStore.wait_changed` wakes whoever waits on it after every change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable
from typing import Final, Literal

import attrs
import trio

from trionode.config import NetworkSection
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

Source = Literal["identify", "exchange", "mdns", "bootstrap", "stored", "dht"]
ForgetReason = Literal["unreachable", "expired", "evicted"]

MAX_ADDRS_PER_PEER: Final = 8
"""Addresses kept per peer; older ones are dropped first."""

_DIRECT_SOURCES: Final = frozenset({"identify", "mdns"})
_DIALABLE_HOSTS: Final = frozenset({"ip4", "ip6", "dns", "dns4", "dns6"})


def is_dialable(addr: Multiaddr) -> bool:
    """Whether the host can dial ``addr``: plain TCP to a specific IP or a DNS name."""
    if len(addr.without_peer_id().components) != 2:
        return False
    hp = addr.tcp_host_port()
    if hp is None or addr.components[0].name not in _DIALABLE_HOSTS:
        return False
    host, port = hp
    if port == 0:
        return False
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return True  # a DNS name


def resolve_unspecified(addr: Multiaddr, observed: Multiaddr | None) -> Multiaddr:
    """Replace a 0.0.0.0 / :: host in ``addr`` with the IP we observed the peer at.

    A peer listening on all interfaces reports ``/ip4/0.0.0.0/tcp/2428``; the IP its
    connection (or mDNS packet) came from is the best guess of where that listener is.
    """
    if observed is None or len(addr.components) < 2 or not observed.components:
        return addr
    first = addr.components[0]
    seen = observed.components[0]
    if first.name != seen.name or first.name not in {"ip4", "ip6"}:
        return addr
    text = first.value_text()
    if text is None or not ipaddress.ip_address(text).is_unspecified:
        return addr
    return Multiaddr((seen, *addr.components[1:]))


@attrs.frozen
class KnownPeer:
    """A snapshot of one peer store entry."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]
    source: Source
    """How we first heard of it."""
    last_seen: float
    failures: int
    """Consecutive failed dials."""
    next_dial_at: float
    pinned: bool
    connected: bool
    member: bool


@attrs.define
class _Entry:
    addrs: list[Multiaddr]
    source: Source
    last_seen: float
    failures: int = 0
    next_dial_at: float = float("-inf")
    pinned: bool = False


class PeerStore:
    """Bounded map peer id → how to reach it. See the module docstring for the rules."""

    def __init__(
        self,
        *,
        max_peers: int = 1000,
        ttl: float = 3600.0,
        max_failures: int = 3,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        member_max_backoff: float = 10.0,
        offline_backoff: float = 0.5,
        local_peer: PeerId | None = None,
        clock: Callable[[], float] = trio.current_time,
        on_forget: Callable[[PeerId, ForgetReason], None] | None = None,
    ) -> None:
        self.max_peers = max_peers
        self.ttl = ttl
        self.max_failures = max_failures
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.member_max_backoff = member_max_backoff
        self.offline_backoff = offline_backoff
        self.local_peer = local_peer
        self.on_forget = on_forget
        """Called with (peer, reason) whenever a peer is forgotten (metrics hook)."""
        self._clock = clock
        self._entries: dict[PeerId, _Entry] = {}
        self._connected: set[PeerId] = set()
        self._members: frozenset[PeerId] = frozenset()
        self._gave_up: dict[PeerId, float] = {}  # unreachable peer -> when we forgot it
        self._changed = trio.Event()
        self._version = 0

    @classmethod
    def from_config(
        cls,
        config: NetworkSection,
        *,
        local_peer: PeerId | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> PeerStore:
        return cls(
            max_peers=config.peer_store_size,
            ttl=config.peer_ttl,
            max_failures=config.peer_max_failures,
            initial_backoff=config.redial_initial_backoff,
            max_backoff=config.redial_max_backoff,
            member_max_backoff=config.member_redial_max_backoff,
            offline_backoff=config.offline_redial_interval,
            local_peer=local_peer,
            clock=clock,
        )

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer: object) -> bool:
        return peer in self._entries

    def peers(self) -> list[PeerId]:
        return list(self._entries)

    def get(self, peer: PeerId) -> KnownPeer | None:
        entry = self._entries.get(peer)
        if entry is None:
            return None
        return KnownPeer(
            peer_id=peer,
            addrs=tuple(entry.addrs),
            source=entry.source,
            last_seen=entry.last_seen,
            failures=entry.failures,
            next_dial_at=entry.next_dial_at,
            pinned=entry.pinned,
            connected=peer in self._connected,
            member=peer in self._members,
        )

    def addresses(self, peer: PeerId) -> tuple[Multiaddr, ...]:
        entry = self._entries.get(peer)
        return () if entry is None else tuple(entry.addrs)

    def gave_up_on(self, peer: PeerId) -> bool:
        """Whether ``peer`` was forgotten as unreachable within the last ``ttl`` seconds."""
        when = self._gave_up.get(peer)
        return when is not None and self._clock() - when < self.ttl

    def is_member(self, peer: PeerId) -> bool:
        return peer in self._members

    def dial_candidates(self, limit: int, *, exclude: Collection[PeerId] = ()) -> list[PeerId]:
        """Up to ``limit`` peers worth dialing now: unconnected, unpinned, out of backoff.

        Members first, then fewest failures, then most recently seen.
        """
        if limit <= 0:
            return []
        now = self._clock()
        ready = [
            (peer not in self._members, entry.failures, -entry.last_seen, peer)
            for peer, entry in self._entries.items()
            if not entry.pinned
            and entry.next_dial_at <= now
            and peer not in self._connected
            and peer not in exclude
        ]
        ready.sort(key=lambda item: item[:3])
        return [item[3] for item in ready[:limit]]

    def next_dial_time(
        self, *, exclude: Collection[PeerId] = (), members_only: bool = False
    ) -> float:
        """When the earliest backed-off, unconnected peer (member) may be dialed (inf if none)."""
        times = [
            entry.next_dial_at
            for peer, entry in self._entries.items()
            if not entry.pinned
            and peer not in self._connected
            and peer not in exclude
            and (not members_only or peer in self._members)
        ]
        return min(times, default=float("inf"))

    def next_expiry_time(self) -> float:
        """When the next unconnected peer will expire (inf if none)."""
        times = [
            entry.last_seen + self.ttl
            for peer, entry in self._entries.items()
            if not entry.pinned and peer not in self._connected and peer not in self._members
        ]
        return min(times, default=float("inf"))

    @property
    def version(self) -> int:
        """A number that grows with every change (see :meth:`wait_changed`)."""
        return self._version

    async def wait_changed(self, since: int | None = None) -> None:
        """Wait until the store changes (a peer added, forgotten, dialed or connected).

        With ``since`` (a :attr:`version` read earlier), a change made after that reading
        counts even if it came before this call: a watcher that reads the version, does
        other work across checkpoints and then waits cannot miss a change in between.
        """
        if since is not None and since != self._version:
            await trio.lowlevel.checkpoint()
            return
        await self._changed.wait()

    # -- writing ---------------------------------------------------------------------------

    def add(self, peer: PeerId, addrs: Iterable[Multiaddr], *, source: Source) -> bool:
        """Learn addresses of ``peer``; non-dialable ones are ignored.

        Returns:
            True if ``peer`` was not in the store before (and now is).
        """
        if peer == self.local_peer:
            return False
        dialable = [a.without_peer_id() for a in addrs if is_dialable(a)]
        now = self._clock()
        direct = source in _DIRECT_SOURCES
        entry = self._entries.get(peer)
        if entry is None:
            if source == "exchange" and self.gave_up_on(peer):
                return False
            if not dialable and source != "bootstrap":
                return False
            if len(self._entries) >= self.max_peers and not self._evict_one():
                return False
            entry = _Entry(addrs=[], source=source, last_seen=now, pinned=source == "bootstrap")
            self._entries[peer] = entry
            if direct:
                self._gave_up.pop(peer, None)
            _merge(entry.addrs, dialable)
            self._notify()
            return True
        if source == "bootstrap":
            entry.pinned = True
        if direct:
            entry.last_seen = now
            self._gave_up.pop(peer, None)
        if _merge(entry.addrs, dialable) or direct:
            self._notify()
        return False

    def set_members(self, peers: Iterable[PeerId]) -> None:
        """Tell the store which peers share a context with us (see the module docstring).

        A peer that stops being a member keeps its entry under the ordinary rules.
        """
        members = frozenset(peers)
        if members == self._members:
            return
        for peer in members - self._members:
            entry = self._entries.get(peer)
            if entry is not None:
                cap = self._clock() + self.member_max_backoff
                entry.next_dial_at = min(entry.next_dial_at, cap)
        self._members = members
        self._notify()

    def set_connected(self, peers: Iterable[PeerId]) -> None:
        """Tell the store which peers are connected right now (they count as seen).

        A peer that just disconnected is not redialed for `initial_backoff` seconds: it may
        be shutting down, and both ends redialing at once would only race.
        """
        connected = set(peers)
        if connected == self._connected:
            return
        now = self._clock()
        came_back = False
        for peer in connected - self._connected:
            entry = self._entries.get(peer)
            if entry is not None and peer in self._members and entry.failures:
                # It reached us: its backoff is over, and it is a sign for the others.
                came_back = True
                entry.failures = 0
                entry.next_dial_at = float("-inf")
        if connected and (came_back or not self._connected):
            self._network_back(now)
        for peer in connected ^ self._connected:
            entry = self._entries.get(peer)
            if entry is not None:
                entry.last_seen = now
                if peer not in connected:
                    entry.next_dial_at = max(entry.next_dial_at, now + self.initial_backoff)
        if self._connected and not connected:
            self._offline(now)
        self._connected = connected
        self._notify()

    def _network_back(self, now: float) -> None:
        """Every unconnected member is dialable now (see "Network back")."""
        for peer in self._members:
            entry = self._entries.get(peer)
            if entry is not None and entry.next_dial_at > now:
                entry.next_dial_at = now

    def _offline(self, now: float) -> None:
        """The last connection closed: no member waits longer than ``offline_backoff``
        beyond the usual pause after a disconnection (see "Offline")."""
        cap = now + max(self.offline_backoff, self.initial_backoff)
        for peer in self._members:
            entry = self._entries.get(peer)
            if entry is not None and entry.next_dial_at > cap:
                entry.next_dial_at = cap

    def record_success(self, peer: PeerId) -> None:
        """A dial to ``peer`` succeeded: clear its failures and backoff."""
        entry = self._entries.get(peer)
        if entry is not None:
            if entry.failures and peer in self._members:
                self._network_back(self._clock())  # it came back (see "Network back")
            entry.failures = 0
            entry.next_dial_at = float("-inf")
            entry.last_seen = self._clock()
            self._notify()

    def record_failure(self, peer: PeerId) -> bool:
        """A dial to ``peer`` failed (all its addresses). Back off, or forget it.

        Returns:
            True if this failure made the store forget ``peer``.
        """
        entry = self._entries.get(peer)
        if entry is None:
            return False
        entry.failures += 1
        now = self._clock()
        member = peer in self._members
        if entry.failures >= self.max_failures and not entry.pinned and not member:
            self._gave_up[peer] = now
            self._bound_gave_up()
            self._forget(peer, "unreachable")
            return True
        # min() first: 2 ** failures grows without bound for a member down for days.
        exponent = min(entry.failures - 1, 32)
        cap = self.member_max_backoff if member else self.max_backoff
        if member and not self._connected:
            cap = min(cap, self.offline_backoff)  # see "Offline"
        entry.next_dial_at = now + min(self.initial_backoff * 2**exponent, cap)
        self._notify()
        return False

    def expire(self) -> list[PeerId]:
        """Forget unconnected, unpinned peers not seen for ``ttl`` seconds; return them."""
        now = self._clock()
        stale = [
            peer
            for peer, entry in self._entries.items()
            if not entry.pinned
            and peer not in self._connected
            and peer not in self._members
            and now - entry.last_seen >= self.ttl
        ]
        for peer in stale:
            self._forget(peer, "expired")
        for peer, when in list(self._gave_up.items()):
            if now - when >= self.ttl:
                del self._gave_up[peer]
        return stale

    # -- internals -------------------------------------------------------------------------

    def _evict_one(self) -> bool:
        candidates = [
            (entry.failures, -entry.last_seen, peer)
            for peer, entry in self._entries.items()
            if not entry.pinned and peer not in self._connected and peer not in self._members
        ]
        if not candidates:
            return False
        _, _, victim = max(candidates, key=lambda item: (item[0], item[1]))
        self._forget(victim, "evicted")
        return True

    def _bound_gave_up(self) -> None:
        while len(self._gave_up) > self.max_peers:
            del self._gave_up[next(iter(self._gave_up))]  # oldest first (insertion order)

    def _forget(self, peer: PeerId, reason: ForgetReason) -> None:
        del self._entries[peer]
        if self.on_forget is not None:
            self.on_forget(peer, reason)
        self._notify()

    def _notify(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()


def _merge(addrs: list[Multiaddr], new: list[Multiaddr]) -> bool:
    """Put ``new`` first (newest first), drop duplicates, keep MAX_ADDRS_PER_PEER."""
    merged = list(dict.fromkeys([*new, *addrs]))[:MAX_ADDRS_PER_PEER]
    if merged == addrs:
        return False
    addrs[:] = merged
    return True
