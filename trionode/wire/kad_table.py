"""Kademlia's state without I/O: the routing table, one iterative lookup, stored providers.

Time is a parameter (``now``, seconds on any monotonic clock); nothing here sleeps, dials
or reads a clock, so property tests drive it directly and the Trio driver
(``net/kad.py``) only moves bytes and timers.

*Distance* is XOR of :func:`~trionode.wire.kad.kad_id` positions (SHA-256 of the PeerId
multihash bytes), as in libp2p, so our tables and lookups agree with other implementations.

*Routing table*: 256 buckets by common-prefix length with our own id, each holding at most
``bucket_size`` (k) contacts, least recently seen first. A full bucket admits a newcomer
in place of a contact that failed since it last answered; otherwise, as the Kademlia paper
says, its least recently seen contact is pinged (:meth:`RoutingTable.probes_due`, one
probe per bucket at a time, the newcomer held meanwhile) and evicted for the newcomer only
if it does not answer. Live, long-known peers are never pushed out by a flood of new ids
(Kademlia's defence against table poisoning), and the table can never hold more than
256 * k contacts.

*Lookup*: the classic iterative walk. Keep the candidates seen, closest first (at most
``max_candidates``); ask up to ``alpha`` of the closest not yet asked at a time; stop when
the k closest candidates have all answered or failed, or after ``max_queries`` requests
(the driver adds a time limit). A node that answers with garbage, far-away or endless peers
therefore costs at most its own answer: candidates farther than the k-th closest are never
asked, the candidate list is bounded, and the number of requests is bounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from trionode.wire.kad import kad_id
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

KEYSPACE_BITS = 256


@dataclass(slots=True)
class Contact:
    """A peer the table or a lookup knows, with the addresses it was last seen at."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...] = ()
    last_seen: float = 0.0
    failed: bool = False
    """It failed a request since it last answered (a full bucket may replace it)."""
    position: int = field(default=-1, repr=False)

    def __post_init__(self) -> None:
        if self.position < 0:
            self.position = kad_id(self.peer_id.multihash)


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(local: int, other: int) -> int:
    """Common-prefix length of two positions (255 for the nearest, 0 for the farthest half)."""
    d = local ^ other
    return KEYSPACE_BITS - d.bit_length() if d else KEYSPACE_BITS - 1


class AddResult(Enum):
    ADDED = "added"
    UPDATED = "updated"
    REPLACED = "replaced"
    FULL = "full"
    PING = "ping"
    """The bucket is full: its least recently seen contact is to be pinged first."""
    SELF = "self"


@dataclass(slots=True)
class _Probe:
    """A full bucket's question to its least recently seen contact: still there?"""

    oldest: PeerId
    newcomer: Contact
    sent: bool = False


class RoutingTable:
    def __init__(self, local: PeerId, bucket_size: int) -> None:
        self.local = local
        self.local_position = kad_id(local.multihash)
        self.bucket_size = bucket_size
        self._buckets: list[list[Contact]] = [[] for _ in range(KEYSPACE_BITS)]
        self._index: dict[PeerId, Contact] = {}
        self._probes: dict[int, _Probe] = {}
        """By bucket index: at most one per bucket, so at most 256 newcomers held."""

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, peer: object) -> bool:
        return peer in self._index

    def get(self, peer: PeerId) -> Contact | None:
        return self._index.get(peer)

    def contacts(self) -> list[Contact]:
        return list(self._index.values())

    def non_empty_buckets(self) -> list[int]:
        return [i for i, bucket in enumerate(self._buckets) if bucket]

    def add(self, peer: PeerId, addrs: Iterable[Multiaddr], now: float) -> AddResult:
        """``peer`` answered us (or asked us as a server): add it or refresh it."""
        if peer == self.local:
            return AddResult.SELF
        addresses = tuple(addrs)
        known = self._index.get(peer)
        if known is not None:
            bucket = self._buckets[bucket_index(self.local_position, known.position)]
            bucket.remove(known)
            bucket.append(known)
            known.last_seen = now
            known.failed = False
            if addresses:
                known.addrs = addresses
            # Heard from while a newcomer waits on its ping: as good as an answer. It stays
            # and the newcomer goes, or a ping already out could evict a live contact, and
            # one not yet sent would ask a contact that is no longer the least recent.
            for index in [i for i, p in self._probes.items() if p.oldest == peer]:
                del self._probes[index]
            return AddResult.UPDATED
        contact = Contact(peer, addresses, now)
        bucket = self._buckets[bucket_index(self.local_position, contact.position)]
        result = AddResult.ADDED
        if len(bucket) >= self.bucket_size:
            stale = next((c for c in bucket if c.failed), None)
            if stale is None:
                index = bucket_index(self.local_position, contact.position)
                if index in self._probes:
                    return AddResult.FULL  # one question at a time; this newcomer is dropped
                self._probes[index] = _Probe(bucket[0].peer_id, contact)
                return AddResult.PING
            bucket.remove(stale)
            del self._index[stale.peer_id]
            result = AddResult.REPLACED
        bucket.append(contact)
        self._index[peer] = contact
        return result

    def probes_due(self) -> list[Contact]:
        """Least recently seen contacts of full buckets to ping now, each handed out once;
        report with :meth:`probe_answered` or :meth:`probe_failed`."""
        out: list[Contact] = []
        for index, probe in list(self._probes.items()):
            if probe.sent:
                continue
            contact = self._index.get(probe.oldest)
            if contact is None:  # gone meanwhile (a bad answer): room for the newcomer
                del self._probes[index]
                self._insert(index, probe.newcomer)
                continue
            probe.sent = True
            out.append(contact)
        return out

    def probe_answered(self, peer: PeerId, now: float) -> None:
        """``peer`` answered its ping: it stays, now most recently seen; the newcomer goes."""
        for index in [i for i, p in self._probes.items() if p.oldest == peer]:
            del self._probes[index]
        if peer in self._index:
            self.add(peer, (), now)

    def probe_failed(self, peer: PeerId) -> None:
        """``peer`` did not answer its ping: evicted, and the newcomer takes its place."""
        for index in [i for i, p in self._probes.items() if p.oldest == peer]:
            probe = self._probes.pop(index)
            self.remove(peer)
            self._insert(index, probe.newcomer)

    def _insert(self, index: int, contact: Contact) -> None:
        bucket = self._buckets[index]
        if contact.peer_id not in self._index and len(bucket) < self.bucket_size:
            bucket.append(contact)
            self._index[contact.peer_id] = contact

    def mark_failed(self, peer: PeerId) -> None:
        """A request to ``peer`` failed: it may be replaced; a second failure removes it."""
        contact = self._index.get(peer)
        if contact is None:
            return
        if contact.failed:
            self.remove(peer)
        else:
            contact.failed = True

    def remove(self, peer: PeerId) -> None:
        contact = self._index.pop(peer, None)
        if contact is not None:
            self._buckets[bucket_index(self.local_position, contact.position)].remove(contact)

    def closest(self, target: int, count: int, *, exclude: Iterable[PeerId] = ()) -> list[Contact]:
        """The ``count`` contacts nearest ``target``, nearest first."""
        skip = set(exclude)
        chosen = [c for c in self._index.values() if c.peer_id not in skip]
        chosen.sort(key=lambda c: c.position ^ target)
        return chosen[:count]


class _State(Enum):
    WAITING = "waiting"
    ASKED = "asked"
    ANSWERED = "answered"
    FAILED = "failed"


@dataclass(slots=True)
class _Candidate:
    contact: Contact
    state: _State = _State.WAITING


class Lookup:
    """One iterative lookup toward ``target`` (a keyspace position).

    The driver loops: ``next_queries()`` → send each → ``answered(peer, closer)`` or
    ``failed(peer)`` → … until ``finished``; then ``result()``.
    """

    def __init__(
        self,
        target: int,
        seeds: Iterable[Contact],
        *,
        k: int,
        alpha: int,
        max_candidates: int,
        max_queries: int,
        local: PeerId | None = None,
    ) -> None:
        self.target = target
        self.k = k
        self.alpha = alpha
        self.max_candidates = max_candidates
        self.max_queries = max_queries
        self.queries = 0
        self._local = local
        self._candidates: dict[PeerId, _Candidate] = {}
        self._add(seeds)

    def _add(self, contacts: Iterable[Contact]) -> None:
        for contact in contacts:
            if contact.peer_id == self._local or contact.peer_id in self._candidates:
                continue
            self._candidates[contact.peer_id] = _Candidate(contact)
        if len(self._candidates) > self.max_candidates:
            # Drop the farthest peers never asked: they could only matter if every nearer
            # one fails, and keeping them would let a node grow this list without bound.
            ranked = self._ranked()
            for candidate in reversed(ranked):
                if len(self._candidates) <= self.max_candidates:
                    break
                if candidate.state is _State.WAITING:
                    del self._candidates[candidate.contact.peer_id]

    def _ranked(self) -> list[_Candidate]:
        return sorted(self._candidates.values(), key=lambda c: c.contact.position ^ self.target)

    def _in_flight(self) -> int:
        return sum(1 for c in self._candidates.values() if c.state is _State.ASKED)

    def _closest_alive(self) -> list[_Candidate]:
        """The k nearest candidates that have not failed."""
        return [c for c in self._ranked() if c.state is not _State.FAILED][: self.k]

    def next_queries(self) -> list[Contact]:
        """Peers to ask now (marked as asked); empty while the in-flight ones must answer."""
        if self.finished:
            return []
        out: list[Contact] = []
        room = self.alpha - self._in_flight()
        for candidate in self._closest_alive():
            if room <= 0 or self.queries >= self.max_queries:
                break
            if candidate.state is _State.WAITING:
                candidate.state = _State.ASKED
                self.queries += 1
                room -= 1
                out.append(candidate.contact)
        return out

    def answered(self, peer: PeerId, closer: Iterable[Contact]) -> None:
        candidate = self._candidates.get(peer)
        if candidate is None or candidate.state is not _State.ASKED:
            return
        candidate.state = _State.ANSWERED
        self._add(closer)

    def failed(self, peer: PeerId) -> None:
        candidate = self._candidates.get(peer)
        if candidate is not None and candidate.state is _State.ASKED:
            candidate.state = _State.FAILED

    @property
    def finished(self) -> bool:
        closest = self._closest_alive()
        if all(c.state is _State.ANSWERED for c in closest):
            return True
        if self.queries >= self.max_queries:
            return self._in_flight() == 0
        return False

    def result(self) -> list[Contact]:
        """The k nearest peers that answered, nearest first."""
        return [c.contact for c in self._ranked() if c.state is _State.ANSWERED][: self.k]

    def seen(self, peer: PeerId) -> Contact | None:
        candidate = self._candidates.get(peer)
        return None if candidate is None else candidate.contact


@dataclass(slots=True)
class StoredProvider:
    peer_id: PeerId
    addrs: tuple[bytes, ...]
    record: bytes | None
    """The signed record as received (given out again unchanged)."""
    expires: float
    """On the caller's monotonic clock."""


class ProviderStore:
    """Providers we store for others, bounded in keys and providers per key, expiring."""

    def __init__(self, *, max_keys: int, max_per_key: int) -> None:
        self.max_keys = max_keys
        self.max_per_key = max_per_key
        self._keys: dict[bytes, dict[PeerId, StoredProvider]] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self._keys.values())

    def add(self, key: bytes, provider: StoredProvider, now: float) -> bool:
        """Store (or refresh) ``provider`` for ``key``; False if there is no room."""
        self.expire(now)
        providers = self._keys.get(key)
        if providers is None:
            if len(self._keys) >= self.max_keys:
                return False
            providers = self._keys[key] = {}
        if provider.peer_id not in providers and len(providers) >= self.max_per_key:
            # Make room by the one that expires first, if the newcomer outlives it.
            soonest = min(providers.values(), key=lambda p: p.expires)
            if soonest.expires >= provider.expires:
                return False
            del providers[soonest.peer_id]
        providers[provider.peer_id] = provider
        return True

    def get(self, key: bytes, now: float) -> list[StoredProvider]:
        providers = self._keys.get(key)
        if not providers:
            return []
        live = [p for p in providers.values() if p.expires > now]
        if len(live) != len(providers):
            self._keys[key] = {p.peer_id: p for p in live}
            if not live:
                del self._keys[key]
        return live

    def expire(self, now: float) -> int:
        removed = 0
        for key in list(self._keys):
            providers = self._keys[key]
            for peer in [p for p, s in providers.items() if s.expires <= now]:
                del providers[peer]
                removed += 1
            if not providers:
                del self._keys[key]
        return removed
