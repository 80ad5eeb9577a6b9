"""Members of a context find each other through the DHT, without telling it which contexts
exist.

Every member computes the same *rendezvous key* for a context:

    sha256-multihash(HMAC-SHA256(key = the context's current key,
                                 msg = "trionode/kad-provider/v1" || context id))

and announces itself as a provider of it (a signed, expiring record, ``net/kad.py``), then
asks the DHT for the other providers and dials them as members. Why this key:

- The context id alone would not do: it is visible to any peer we gossip with (topic
  names), so ``hash(context id)`` would let anyone check whether a context they heard of has
  members online, and where. Keyed with the context key, which only members hold (it is
  sealed to each member), the DHT sees 34 random-looking bytes per context; nobody without
  the key can link them to a context id or tell two contexts' keys from two unrelated ones.
- The *current* key (the one writes are sealed with), not the first: after a member is
  removed the context rotates to a key the removed member never receives, so from then on
  it can no longer compute the rendezvous key either. The price: while a rotation spreads,
  or for a member offline during it, members announce under different keys until they
  sync (they still meet through stored member addresses and peer routing).
- HMAC, not a plain hash of key and id: a keyed construction meant for exactly this, and
  it never exposes a value derived from the key alone.

What the DHT nodes learn: that some peer (its id and addresses, which identify already
tells anyone it connects to) provides an opaque key, how many peers provide the same
opaque key, and when. Not the context, its app, its members' roles or any data.

```
Rendezvous.run ──── one task: at start once a DHT server is connected, then every
                    kad.provider_republish seconds: for each context, provide(key),
                    find_providers(key, signed_only) and dial new ones as members; a context
                    created or joined in between gets the same at once, a re-keyed one
                    within kad.key_check_interval
               └─── one task waiting for such changes (ReplicaStore.wait_changed)
```
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from trionode.config import NetworkSection
from trionode.errors import PeerError, ProtocolError, StorageError
from trionode.net.host import Host
from trionode.net.kad import Kademlia
from trionode.net.service import Loop, run_loops
from trionode.wire.kad import sha256_multihash

log = logging.getLogger(__name__)

RENDEZVOUS_DOMAIN: Final = b"trionode/kad-provider/v1"

RendezvousKeys = Callable[[], Awaitable[list[bytes]]]
"""The rendezvous keys of the contexts we hold (see :func:`context_provider_key`)."""


def context_provider_key(context_id: bytes, context_key: bytes) -> bytes:
    """The DHT key members of ``context_id`` announce themselves under."""
    mac = hmac.new(context_key, RENDEZVOUS_DOMAIN + context_id, hashlib.sha256).digest()
    return sha256_multihash(mac)


class Rendezvous:
    """Announce our contexts and dial co-members found in the DHT."""

    def __init__(
        self,
        host: Host,
        kad: Kademlia,
        keys: RendezvousKeys,
        config: NetworkSection,
        *,
        contexts_changed: Callable[[], Awaitable[None]] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._host = host
        self._kad = kad
        self._keys = keys
        self._config = config
        self._contexts_changed = contexts_changed
        self._wall_clock = wall_clock
        self._dirty = trio.Event()
        self._announced: set[bytes] = set()
        """Keys provided since the last full round: a change announces only the others."""
        self.rounds = 0
        self.last_round: float | None = None
        """Unix time the last round ended, or None before the first."""

    @property
    def announced(self) -> int:
        """How many of our contexts' keys are announced in the current republish period."""
        return len(self._announced)

    async def run(
        self,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        loops: list[Loop] = [(self._loop, "rendezvous")]
        if self._contexts_changed is not None:
            loops.append((self._watch_contexts, "rendezvous-contexts"))
        owner = str(self._host.peer_id)
        await run_loops(owner, loops, shutdown_requested, task_status=task_status)

    async def _watch_contexts(self) -> None:
        # A context created or joined is announced now, not at the next republish
        # (30 min). Changes that come while a round runs mark the next one dirty: the round
        # reads the keys after `_dirty` was replaced, so none is lost.
        assert self._contexts_changed is not None
        while True:
            await self._contexts_changed()
            self._dirty.set()

    async def _loop(self) -> None:
        next_full = trio.current_time()
        while True:
            # Nothing to announce to until some DHT server is connected (bootstrap peers
            # connect in the background).
            await self._kad.wait_for_server()
            self._dirty = trio.Event()
            full = trio.current_time() >= next_full
            if full:
                next_full = trio.current_time() + self._config.kad.provider_republish
            try:
                await self.round(only_new=not full)
            except (PeerError, ProtocolError, StorageError) as exc:
                # Requests fail inside the DHT driver; this is what is left (our own store,
                # an announcement we cannot encode). The next round tries again.
                log.warning("context rendezvous round failed: %s", exc)
            self.last_round = self._wall_clock()
            await self._wait_for_change(next_full)

    async def _wait_for_change(self, next_full: float) -> None:
        """Until the next full round, a context change, or a context key we have not
        announced. Key rotations (after a removal, ours or received) happen deep in the
        delta processor; checking the keys every `kad.key_check_interval` costs one store
        read per context and needs no hook there."""
        check = self._config.kad.key_check_interval
        while trio.current_time() < next_full:
            with trio.move_on_at(min(next_full, trio.current_time() + check)):
                await self._dirty.wait()
                return
            try:
                if set(await self._keys()) - self._announced:
                    return
            except StorageError as exc:
                log.warning("context rendezvous key check failed: %s", exc)

    async def round(self, *, only_new: bool = False) -> int:
        """Announce every context once (``only_new``: those not announced since the last
        full round) and dial the co-members found; returns how many new connections it
        made."""
        self.rounds += 1
        keys = await self._keys()
        if not only_new:
            self._announced = set()
        dialed = 0
        for key in keys:
            if key in self._announced:
                continue
            await self._kad.provide(key)
            self._announced.add(key)
            for provider in await self._kad.find_providers(key, signed_only=True):
                if provider.peer_id in self._host.connections:
                    continue
                for addr in provider.addrs:
                    try:
                        await self._host.connect(addr.with_peer_id(provider.peer_id), member=True)
                    except (PeerError, ProtocolError, trio.TooSlowError) as exc:
                        log.debug("co-member %s at %s: %s", provider.peer_id, addr, exc)
                        continue
                    log.info("found co-member %s through the DHT at %s", provider.peer_id, addr)
                    dialed += 1
                    break
        self._announced &= set(keys)  # a left context or an old key is not announced
        return dialed
