"""The Trio driver of `/trionode/blob/1`: serving blobs to members and fetching from them.

```
BlobTransfer.fetch(blob_id, context_id)      called by the API (and, later, apps and joins)
   └─ one nursery per fetch
       └─ _worker per peer (up to blobs.fetch_peers): one stream, `request_window` chunk
          requests in flight; each reply verified against the manifest before it is kept
BlobTransfer._serve                            one task per inbound stream (Host's nursery)
```
Streams are for members only (see `trionode.blobs.protocol`). A peer that sends a manifest
that does not hash to the id, or a chunk that does not hash to its name, is counted and
disconnected; its chunks go back to the plan for the other peers. A fetch that runs out of
peers fails, keeping every verified chunk: the manifest is recorded as a partial blob, so
the next fetch (after a reconnect or a restart) asks only for what is still missing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import base58
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CollectorRegistry, Counter

from trionode.blobs.manifest import BlobError, InvalidManifestError, Manifest, decode_manifest
from trionode.blobs.protocol import (
    BLOB_PROTOCOL,
    NOT_AVAILABLE,
    BlobFrameReader,
    BlobManifest,
    BlobMessage,
    BlobOpen,
    BlobRefused,
    ChunkReply,
    ChunkRequest,
    FetchPlan,
    InvitedOpen,
    auth_message,
    encode_frame,
)
from trionode.blobs.store import BlobInfo, BlobStore
from trionode.config import BlobsSection
from trionode.context.events import EventHub
from trionode.context.manager import ContextError, ContextManager
from trionode.context.replication import topic_for
from trionode.errors import PeerError, ProtocolError, RemoteProtocolError, StorageError
from trionode.net.host import Connection, Host
from trionode.net.pubsub import PubSub
from trionode.wire.keys import PeerId

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 256 * 1024
PROGRESS_INTERVAL: Final = 0.25
"""Seconds between progress notices of one fetch on the WebSocket (plus the last one)."""

_STREAM_ERRORS: Final = (
    PeerError,
    ProtocolError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class BlobUnavailableError(BlobError):
    """No peer could provide (the rest of) the blob right now; what arrived is kept."""


class BlobTransferMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.fetches = Counter(
            "trionode_blob_fetches", "Blob fetches by outcome", ["outcome"], registry=registry
        )
        self.chunks_fetched = Counter(
            "trionode_blob_chunks_fetched", "Verified chunks received from peers", registry=registry
        )
        self.bytes_fetched = Counter(
            "trionode_blob_bytes_fetched", "Verified bytes received from peers", registry=registry
        )
        self.bad_peers = Counter(
            "trionode_blob_bad_peers",
            "Peers disconnected for a corrupt chunk or a manifest that is not the blob's",
            ["reason"],
            registry=registry,
        )
        self.served_chunks = Counter(
            "trionode_blob_chunks_served", "Chunks sent to peers", registry=registry
        )
        self.refused = Counter(
            "trionode_blob_streams_refused",
            "Blob streams refused (not a member, bad proof, blob not here for that context, busy)",
            registry=registry,
        )


Opener = Callable[[Connection, bytes], Awaitable[BlobOpen | InvitedOpen]]
"""Makes the first message of a stream fetching a blob (by id) on a connection (the proof in
it is bound to that connection's Noise session)."""


class BundleAccess(Protocol):
    """What the serving side asks about app bundles (trionode.context.app_bundles)."""

    async def serves_bundle(self, context_id: bytes, blob_id: bytes) -> bool:
        """Whether `blob_id` is the bundle of an app `context_id` runs or ran (its create
        and upgrade ops name them) and this node has it."""

    async def allows_invitee(self, conn: Connection, request: InvitedOpen) -> bool:
        """Whether `request` proves a valid invitation to a context whose app bundle is
        `request.blob_id`."""


class _Channel:
    """Length-prefixed blob frames over one stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._reader = BlobFrameReader()

    async def send(self, message: BlobMessage) -> None:
        await self._stream.send_all(encode_frame(message))

    async def receive(self, *, eof_ok: bool = False) -> BlobMessage | None:
        while (message := self._reader.next_message()) is None:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                if eof_ok:
                    return None
                raise RemoteProtocolError("blob stream ended mid-conversation")
            self._reader.receive_data(data)
        return message


class _BadPeerError(RemoteProtocolError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Fetch:
    """One fetch's shared state: the manifest and plan (from the first good answer)."""

    def __init__(
        self,
        blob_id: bytes,
        context_id: bytes,
        opener: Opener,
        max_size: int,
        peers: list[PeerId] | None,
        *,
        by_reference: bool = False,
    ) -> None:
        self.blob_id = blob_id
        self.context_id = context_id
        self.opener = opener
        self.max_size = max_size
        self.peers = peers
        self.by_reference = by_reference
        self.manifest: Manifest | None = None
        self.plan: FetchPlan | None = None
        self.lock = trio.Lock()
        self.changed = trio.Event()
        self.last_progress = -1e18

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class BlobTransfer:
    def __init__(
        self,
        blobs: BlobStore,
        contexts: ContextManager,
        host: Host,
        pubsub: PubSub,
        hub: EventHub,
        *,
        config: BlobsSection,
        metrics: BlobTransferMetrics,
        bundles: BundleAccess | None = None,
    ) -> None:
        self.blobs = blobs
        self.bundles = bundles
        self.contexts = contexts
        self.host = host
        self.pubsub = pubsub
        self.hub = hub
        self.config = config
        self.metrics = metrics
        self._serving = trio.CapacityLimiter(config.max_serving)
        self._running: dict[bytes, trio.Event] = {}
        self.candidate_peers: Callable[[bytes], list[PeerId]] = self._candidates
        """Which peers a fetch asks (tests and benchmarks may narrow it)."""
        host.set_handler(BLOB_PROTOCOL, self._serve)

    # -- fetching --------------------------------------------------------------------------

    async def fetch(
        self,
        blob_id: bytes,
        context_id: bytes,
        *,
        peers: list[PeerId] | None = None,
        opener: Opener | None = None,
        max_size: int | None = None,
        by_reference: bool = False,
    ) -> BlobInfo:
        """Get a blob from members of `context_id` (or return it if it is here already).

        `peers` (default: the context's members, then other connected peers) are asked;
        `opener` makes each stream's first message (default: this node's membership proof
        for `context_id`; app bundles fetched before a join use an invitation instead); a
        blob over `max_size` bytes (default `blobs.max_size`) is not fetched. The blob is
        linked to `context_id` when it is complete.

        `by_reference`: the context's state references the blob (an app reads it, or the
        eager policy). Then a blob stored here for *other* contexts only counts once a
        member of this one serves its manifest for this context (no chunk is sent again):
        a member cannot make this node hand out another context's blob just by referencing
        its id. The link it gets is a reference link (kept while referenced).

        Raises ContextError if this node is not a member (and no `opener` is given),
        BlobUnavailableError if no peer could provide it now (verified chunks are kept for
        the next attempt).
        """
        while (running := self._running.get(blob_id)) is not None:
            await running.wait()  # one fetch per blob; then see what it left
        info = await self.blobs.info(blob_id)
        if info is not None and by_reference:
            if context_id in info.contexts:
                return info
        elif info is not None:
            if context_id not in info.contexts:
                await self.blobs.link(context_id, blob_id)
                info = await self.blobs.info(blob_id)
            assert info is not None
            return info
        if opener is None:
            await self.contexts.member_key(context_id)  # ContextError when not a member
            opener = self._member_opener(context_id)
        limit = self.blobs.max_size if max_size is None else min(max_size, self.blobs.max_size)
        done = self._running[blob_id] = trio.Event()
        try:
            info = await self._fetch(
                _Fetch(blob_id, context_id, opener, limit, peers, by_reference=by_reference)
            )
        except BlobUnavailableError:
            self.metrics.fetches.labels("unavailable").inc()
            raise
        finally:
            del self._running[blob_id]
            done.set()
        self.metrics.fetches.labels("ok").inc()
        return info

    def _member_opener(self, context_id: bytes) -> Opener:
        async def open_as_member(conn: Connection, blob_id: bytes) -> BlobOpen:
            member, key = await self.contexts.member_key(context_id)
            signature = key.sign(auth_message(conn.noise.remote.handshake_hash, context_id))
            return BlobOpen(context_id, member, signature, blob_id)

        return open_as_member

    def running(self) -> set[bytes]:
        """Ids of the blobs being fetched now (GC keeps their partial records)."""
        return set(self._running)

    def _candidates(self, context_id: bytes) -> list[PeerId]:
        # Members subscribe to the context's topic: ask them first, then anyone connected
        # (right after a join the mesh may not be up yet; a non-member just refuses).
        members = self.pubsub.topic_peers(topic_for(context_id))
        others = [p for p in self.host.connections if p not in members]
        return [*members, *others]

    async def _fetch(self, state: _Fetch) -> BlobInfo:
        partial = await self.blobs.partial_manifest(state.blob_id)
        # By reference, a member must vouch for the blob in this context even when every
        # chunk is here already (the partial may be another context's fetch); the chunks
        # on disk still count, so nothing is transferred twice.
        if partial is not None and not state.by_reference:
            await self._adopt(state, partial)
        peers = state.peers if state.peers is not None else self.candidate_peers(state.context_id)
        peers = peers[: self.config.fetch_peers]
        if state.plan is None or not state.plan.complete:
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(self._worker, state, peer)
        if state.manifest is None or state.plan is None or not state.plan.complete:
            got = 0 if state.plan is None else state.plan.received
            raise BlobUnavailableError(
                f"blob {_b58(state.blob_id)}: no member peer could provide it"
                + (f" ({got} chunks kept for the next attempt)" if got else "")
            )
        self._progress(state, final=True)
        return await self.blobs.complete(
            state.manifest, context_id=state.context_id, by_reference=state.by_reference
        )

    async def _adopt(self, state: _Fetch, manifest: Manifest) -> None:
        async with state.lock:
            if state.plan is None:
                await self.blobs.begin_partial(manifest)
                state.plan = FetchPlan(await self.blobs.missing_chunks(manifest))
                state.manifest = manifest
                state.notify()

    async def _worker(self, state: _Fetch, peer: PeerId) -> None:
        try:
            await self._fetch_from(state, peer)
        except _BadPeerError as exc:
            self.metrics.bad_peers.labels(exc.reason).inc()
            log.warning("disconnecting %s: %s", peer, exc)
            conn = self.host.connections.get(peer)
            if conn is not None:
                with trio.move_on_after(1.0, shield=True):
                    await conn.aclose()
        except (*_STREAM_ERRORS, ContextError) as exc:
            log.info("blob fetch from %s stopped: %s", peer, exc)
        finally:
            if state.plan is not None and state.plan.give_back(peer):
                state.notify()

    async def _fetch_from(self, state: _Fetch, peer: PeerId) -> None:
        _, stream = await self.host.new_stream(peer, [BLOB_PROTOCOL])
        async with stream:
            conn = self.host.connections.get(peer)
            if conn is None:
                raise PeerError(f"lost the connection to {peer}")
            channel = _Channel(stream)
            await channel.send(await state.opener(conn, state.blob_id))
            with trio.fail_after(self.config.chunk_timeout):
                reply = await channel.receive()
            if isinstance(reply, BlobRefused):
                return
            if not isinstance(reply, BlobManifest):
                raise RemoteProtocolError(f"expected a manifest, got {type(reply).__name__}")
            try:
                manifest = decode_manifest(reply.manifest, expected_id=state.blob_id)
            except InvalidManifestError as exc:
                raise _BadPeerError("bad_manifest", str(exc)) from None
            if manifest.size > state.max_size:
                return  # too big for this node or this use: nobody's fault
            await self._adopt(state, manifest)
            await self._transfer(state, peer, manifest, channel)
            await stream.send_eof()

    async def _transfer(
        self, state: _Fetch, peer: PeerId, manifest: Manifest, channel: _Channel
    ) -> None:
        plan = state.plan
        assert plan is not None
        in_flight: deque[int] = deque()
        while True:
            while len(in_flight) < self.config.request_window:
                index = plan.take(peer)
                if index is None:
                    break
                await channel.send(ChunkRequest(index=index))
                in_flight.append(index)
            if not in_flight:
                if plan.complete:
                    return
                # Everything is handed out to others: wait in case one of them fails.
                await state.changed.wait()
                continue
            with trio.fail_after(self.config.chunk_timeout):
                reply = await channel.receive()
            index = in_flight.popleft()
            if isinstance(reply, BlobRefused):
                return
            if not isinstance(reply, ChunkReply) or reply.index != index:
                raise RemoteProtocolError(f"expected chunk {index}, got {reply!r:.80}")
            if not await self.blobs.put_chunk(manifest.chunks[index], reply.data):
                raise _BadPeerError("bad_chunk", f"chunk {index} does not match its hash")
            plan.received_chunk(index, peer)
            self.metrics.chunks_fetched.inc()
            self.metrics.bytes_fetched.inc(len(reply.data))
            self._progress(state)
            if plan.complete:
                state.notify()

    def _progress(self, state: _Fetch, *, final: bool = False) -> None:
        now = trio.current_time()
        if not final and now - state.last_progress < PROGRESS_INTERVAL:
            return
        state.last_progress = now
        plan, manifest = state.plan, state.manifest
        if plan is None or manifest is None:
            return
        context = _b58(state.context_id)
        self.hub.notify(
            context,
            {
                "type": "blob_progress",
                "contextId": context,
                "blobId": _b58(state.blob_id),
                "chunks": len(manifest.chunks),
                "chunksMissing": plan.total - plan.received,
                "size": manifest.size,
                "complete": plan.complete,
            },
        )

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        channel = _Channel(stream)
        # The open and its membership proof are read and checked before a serving slot is
        # taken, within the host's first-message deadline: a silent or non-member stream
        # never holds a slot that members need.
        with trio.fail_after(self.host.stream_limits.first_message):
            first = await channel.receive()
        if isinstance(first, InvitedOpen):
            manifest = await self._invited_manifest(conn, first)
        elif isinstance(first, BlobOpen):
            manifest = await self._authorised_manifest(conn, first)
        else:
            raise RemoteProtocolError("a blob stream must start with open")
        if manifest is None:
            self.metrics.refused.inc()
            await channel.send(BlobRefused(message=NOT_AVAILABLE))
            return
        try:
            self._serving.acquire_nowait()
        except trio.WouldBlock:
            self.metrics.refused.inc()
            await channel.send(BlobRefused(message="busy"))
            return
        try:
            await self._serve_stream(channel, manifest)
        finally:
            self._serving.release()

    async def _serve_stream(self, channel: _Channel, manifest: Manifest) -> None:
        await channel.send(BlobManifest(manifest=manifest.encode()))
        while (message := await channel.receive(eof_ok=True)) is not None:
            if not isinstance(message, ChunkRequest) or message.index >= len(manifest.chunks):
                raise RemoteProtocolError(f"unexpected {message!r:.80} on a blob stream")
            data = await self.blobs.read_chunk(manifest.chunks[message.index])
            if data is None:  # damaged here since: the fetcher will ask someone else
                await channel.send(BlobRefused(message=NOT_AVAILABLE))
                return
            await channel.send(ChunkReply(index=message.index, data=data))
            self.metrics.served_chunks.inc()

    async def _authorised_manifest(self, conn: Connection, request: BlobOpen) -> Manifest | None:
        """The manifest if the requester proved membership and the blob belongs to that
        context here; None otherwise (whatever the reason, the answer is the same)."""
        if request.context_id not in self.contexts.known_ids():
            return None
        try:
            Ed25519PublicKey.from_public_bytes(request.member).verify(
                request.signature,
                auth_message(conn.noise.remote.handshake_hash, request.context_id),
            )
        except (InvalidSignature, ValueError):
            return None
        try:
            if await self.contexts.role(request.context_id, request.member) is None:
                return None
        except ContextError:
            return None
        if not await self.blobs.linked(request.context_id, request.blob_id) and (
            self.bundles is None
            or not await self.bundles.serves_bundle(request.context_id, request.blob_id)
        ):
            return None
        try:
            return await self.blobs.manifest(request.blob_id)
        except StorageError:
            return None

    async def _invited_manifest(self, conn: Connection, request: InvitedOpen) -> Manifest | None:
        """The manifest of an app bundle for the holder of a valid invitation (see
        `trionode.blobs.protocol`); None for anything else."""
        if self.bundles is None or not await self.bundles.allows_invitee(conn, request):
            return None
        try:
            return await self.blobs.manifest(request.blob_id)
        except StorageError:
            return None


def _b58(raw: bytes) -> str:
    return base58.b58encode(raw).decode("ascii")
