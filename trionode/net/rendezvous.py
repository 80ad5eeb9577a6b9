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
serve_rendezvous ── one task: at start once a DHT server is connected, then every
                    kad.provider_republish seconds (and when poked): for each context,
                    provide(key), find_providers(key, signed_only) and dial new ones as members
```
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from trionode.config import NetworkSection
from trionode.errors import PeerError, ProtocolError, StorageError
from trionode.net.host import Host
from trionode.net.kad import Kademlia
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
        self, host: Host, kad: Kademlia, keys: RendezvousKeys, config: NetworkSection
    ) -> None:
        self._host = host
        self._kad = kad
        self._keys = keys
        self._config = config
        self._wake = trio.Event()
        self.rounds = 0

    def poke(self) -> None:
        """Run a round now (a context was created or joined)."""
        self._wake.set()

    async def run(
        self,
        shutdown_requested: trio.Event | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._loop, name=f"{self._host.peer_id}:rendezvous")
            task_status.started()
            if shutdown_requested is not None:
                await shutdown_requested.wait()
                nursery.cancel_scope.cancel(reason="node shutting down")

    async def _loop(self) -> None:
        while True:
            # Nothing to announce to until some DHT server is connected (bootstrap peers
            # connect in the background).
            await self._kad.wait_for_server()
            self._wake = trio.Event()
            try:
                await self.round()
            except (PeerError, ProtocolError, StorageError) as exc:
                # Requests fail inside the DHT driver; this is what is left (our own store,
                # an announcement we cannot encode). The next round tries again.
                log.warning("context rendezvous round failed: %s", exc)
            with trio.move_on_after(self._config.kad.provider_republish):
                await self._wake.wait()

    async def round(self) -> int:
        """Announce every context once and dial the co-members found; returns how many
        new connections it made."""
        self.rounds += 1
        dialed = 0
        for key in await self._keys():
            await self._kad.provide(key)
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
        return dialed
