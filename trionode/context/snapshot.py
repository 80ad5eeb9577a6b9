"""Snapshot: how a node with no state gets a context's final state (DESIGN §8, issues 7,
10 and 17).

```
joiner                                         member (responder)
  SyncAuth, ProofRequest          ──────────▶  checks the joiner's membership
                                  ◀──────────  PeerProof (its member key signs the session)
  SnapshotOpen(cursor, root, W)   ──────────▶  the stream of pages (trionode/sync/snapshot.py):
                                  ◀──────────  SnapshotBegin(heads H, final root, entries,
                                               finality certificate), then pages sent ahead
                                               (if its final state is not built yet: no root
                                               here, a later page carries it),
  (every half window: one LMDB     ◀─ ─ ─ ─ ─   at most W not yet credited back
   write of the batch + marker;
   SnapshotCredit back)           ──────────▶
  SnapshotClose after the last    ──────────▶
  check: the records hash to the final root
  AuthRequest(H)                  ──────────▶
                                  ◀──────────  AuthResponse(signed ops, H's version vectors)
  check the certificate under our own resolution of those ops; adopt the ops, then H as
  checkpoints; then delta-sync the tail (every non-final delta, signed)
```

A snapshot that fails a check (records out of order, more pages than granted, a root the
records do not hash to, a forged or stale certificate) is refused: the state it brought is
discarded (`SnapshotState.discard`) and the marker starts over, keeping the trusted source.

**Consistency while the responder keeps writing.** Pages are read at different times, each
under the responder's context lock (so a page never holds a change still being written).
The joiner keeps the heads H sent with the first page (`SnapshotBegin`) as the boundary. Its
state afterwards contains the responder's state as of H: entity records only ever grow
under join (GC drops only tombstones older than the GC horizon, which nothing can need), so
an entity that existed at the first page, with an id in the range a later page covers, is in
that page with at least the state it had then. Pages may also carry parts of later writes;
those belong to deltas after H, which the joiner then fetches from H onwards (a delta sync
of the tail), and joining them again is harmless. So after the snapshot the joiner records
H as its DAG heads (checkpoints, `ContextManager.adopt_heads`): a later delta whose
parents are in H applies at once, and gossip that waited during the snapshot is released.
It holds no delta bodies from before H (it answers "missing" for them) and runs no event
handlers for them. A checkpoint does not know its ancestors: a delta from before H that
still arrives (as the parent of a concurrent one) applies harmlessly but becomes a stale
head, which the next session drops (`HeadsResponse.known`, `SyncManager._drop_stale_heads`).

**Resumable.** Each batch is joined and persisted in the same write as a progress marker
(`SnapshotProgress`: source peer and member, boundary heads, final root, certificate,
cursor). A dropped connection or a crash continues from the cursor with the same peer if
its final state still has the root the cursor belongs to (or, cut before a late root came,
still has the boundary: `SnapshotOpen.heads`); if it moved on (more was folded), the pages
start from the first record again with the new boundary, joining over what we have
(records only grow). From another peer it restarts from the first record.
A context whose state was wiped since restarts too.

**Never over existing state.** A node that has state and no marker (or a marker for a
snapshot that has not started) refuses to take a snapshot (`SnapshotRefused`, counted by
the sync manager, which drops that marker); the first page is joined only if the state is
still empty when it is written. (Restarting over a partial snapshot of our own is allowed:
that state is the snapshot's.) While a snapshot runs, and while a node has no state at all,
gossip does not chase missing parents: the boundary and the tail sync bring them.

**Trust.** State that arrives as a snapshot carries no signatures, so the responder must
prove a member key (its own signature of the session's handshake hash) and that key must be
the marker's `source`: the admin that signed the invitation, recorded by the join (with
its peer, which sessions then prefer). If that peer is gone, or a node has no state and no
such anchor, it takes the delta history instead (every delta verifies itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import attrs
import msgspec
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trionode.context import join_timeline
from trionode.context.errors import AlreadyExists, MissingPrerequisite, NotPermitted, PeerFailed
from trionode.context.manager import ContextManager
from trionode.crdt.bulk import records_kept
from trionode.errors import RemoteProtocolError
from trionode.net.host import Connection
from trionode.store.lmdb_store import Column
from trionode.store.store import AsyncStore, BytesCodec, MsgpackCodec, Table, WriteBatch
from trionode.sync.errors import SyncViolation
from trionode.sync.snapshot import SnapshotTake, StoreBatch
from trionode.wire.keys import PeerId
from trionode.wire.messages import (
    MAX_IDS,
    AuthRequest,
    AuthResponse,
    PeerProof,
    ProofRequest,
    SyncError,
    SyncMessage,
)

if TYPE_CHECKING:
    from trionode.sync.driver import SyncChannel

log = logging.getLogger(__name__)
M = TypeVar("M")

PROOF_DOMAIN: Final = b"trionode/sync-proof/v1"
PAGE_RECORDS: Final = 4096
PAGE_BYTES: Final = 4 * 1024 * 1024
WINDOW: Final = 16
BATCH_BYTES: Final = 16 * 1024 * 1024
IDLE_TIMEOUT: Final = 60.0
PREPARE_TIMEOUT: Final = 600.0


class SnapshotRefused(AlreadyExists):
    """The node has state: a snapshot would replace it (never done)."""


class UntrustedSource(NotPermitted):
    """The peer is not the member this node trusts for a snapshot (it may sync by deltas)."""


class SnapshotProgress(msgspec.Struct, frozen=True):
    """The persisted marker of a snapshot being taken (GENERIC column)."""

    source: bytes
    """The member key the responder must prove (the inviting admin's)."""
    peer: str | None = None
    """The peer the pages come from (or, before the first page, the one to ask first)."""
    heads: list[bytes] | None = None
    """The boundary: the responder's heads with the first page."""
    root_hash: bytes | None = None
    cursor: bytes | None = None
    """The id of the last record joined (None: none yet)."""
    complete: bool = False
    """Every page is in: only recording the boundary as heads is left."""
    pages: int = 0
    records: int = 0
    certificate: list[bytes] = []
    """The finality certificate that came with the boundary (checked at the end)."""
    entries: int = 0
    """Records in the state being taken (the responder's count: for progress)."""
    size: int = 0
    """Record bytes taken so far."""


PROGRESS = Table(Column.GENERIC, BytesCodec(), MsgpackCodec(SnapshotProgress))
_PREFIX: Final = b"snapshot-progress/"


def progress_key(context_id: bytes) -> bytes:
    return _PREFIX + context_id


async def load_progress(store: AsyncStore, context_id: bytes) -> SnapshotProgress | None:
    progress: SnapshotProgress | None = await store.get(PROGRESS, progress_key(context_id))
    return progress


async def begin(store: AsyncStore, context_id: bytes, *, source: bytes, peer: str) -> None:
    """Mark `context_id` as waiting for a snapshot served by member `source` on `peer`."""
    batch = WriteBatch()
    stage_begin(batch, context_id, source=source, peer=peer)
    await store.write(batch)


def stage_begin(batch: WriteBatch, context_id: bytes, *, source: bytes, peer: str) -> None:
    """`begin` in `batch` (the join commits it with the context it adopts: no session
    ever sees the context without it)."""
    batch.put(PROGRESS, progress_key(context_id), SnapshotProgress(source=source, peer=peer))


def proof_message(handshake_hash: bytes, context_id: bytes) -> bytes:
    return PROOF_DOMAIN + handshake_hash + context_id


async def prove(contexts: ContextManager, conn: Connection, context_id: bytes) -> PeerProof:
    """The responder's proof of its member key for this connection."""
    member, key = await contexts.member_key(context_id)
    signature = key.sign(proof_message(conn.noise.remote.handshake_hash, context_id))
    return PeerProof(member=member, signature=signature)


def check_proof(conn: Connection, context_id: bytes, proof: PeerProof) -> bytes:
    """The member key a responder proved on `conn` (RemoteProtocolError if it did not)."""
    try:
        Ed25519PublicKey.from_public_bytes(proof.member).verify(
            proof.signature, proof_message(conn.noise.remote.handshake_hash, context_id)
        )
    except (InvalidSignature, ValueError):
        raise RemoteProtocolError("bad membership proof from the responder") from None
    return proof.member


class Channel(Protocol):
    """Typed frames over one sync stream (`replication._Channel`)."""

    async def send(self, message: SyncMessage) -> None: ...

    async def receive(self, *, eof_ok: bool = False) -> SyncMessage | None: ...


Progress = Callable[[dict[str, Any]], None]
"""Told of a snapshot's progress (`progress_json`): after each stored batch, and once with
`done` when it is adopted."""


def progress_json(
    progress: SnapshotProgress,
    elapsed: float,
    entries_before: int,
    bytes_before: int,
    *,
    done: bool = False,
) -> dict[str, Any]:
    """A `snapshot_progress` notice: entries and bytes taken of the total, and this stream's
    rate (entries and bytes taken `elapsed` seconds after it started, beyond those it found
    already taken) with the time left at that rate (None while unknown)."""
    entries = progress.records
    rate = (entries - entries_before) / elapsed if elapsed > 0 else 0.0
    byte_rate = (progress.size - bytes_before) / elapsed if elapsed > 0 else 0.0
    left = max(0, progress.entries - entries)
    eta = left / rate if rate > 0 else None
    return {
        "type": "snapshot_progress",
        "entries": entries,
        # (The responder's count is an estimate when it streams before building its state:
        # once done, the total is what came.)
        "entriesTotal": entries if done else max(progress.entries, entries),
        "bytes": progress.size,
        "entriesPerSecond": round(rate, 1),
        "bytesPerSecond": round(byte_rate),
        "etaSeconds": None if eta is None else round(eta, 1),
        "done": done,
    }


async def take(
    contexts: ContextManager,
    channel: SyncChannel,
    conn: Connection,
    peer: PeerId,
    context_id: bytes,
    *,
    page_records: int = PAGE_RECORDS,
    page_bytes: int = PAGE_BYTES,
    window: int = WINDOW,
    batch_bytes: int = BATCH_BYTES,
    idle_timeout: float = IDLE_TIMEOUT,
    prepare_timeout: float = PREPARE_TIMEOUT,
    on_page: Callable[[], object] | None = None,
    on_progress: Progress | None = None,
) -> tuple[list[bytes], int]:
    """Take (or resume) a snapshot over an authenticated sync `channel` to `peer`; returns
    (boundary heads now adopted, records joined in this call).

    Raises SnapshotRefused if the node has state that is not this snapshot's, UntrustedSource
    if the peer does not prove the marker's source, MissingPrerequisite if there is no marker (no
    trusted source), RemoteProtocolError for bad pages (a SyncViolation: RootMismatch,
    ForgedCertificate, StaleCertificate... — the state it brought is then discarded).
    `on_page` is called once per page persisted (a metric: progress is visible while the
    snapshot runs), `on_progress` once per batch.
    """
    # The driver serves tree comparisons too (trionode.context.treecmp imports this module).
    from trionode.sync.driver import take_snapshot  # noqa: PLC0415

    store = contexts.store
    progress = await load_progress(store, context_id)
    if progress is None:
        if not await contexts.is_fresh(context_id):
            raise SnapshotRefused("this node has state: a snapshot never replaces it")
        raise MissingPrerequisite("no trusted snapshot source for this context")
    with contexts.snapshot_guard(context_id):
        await channel.send(ProofRequest())
        proof = await expect(channel, PeerProof)
        member = check_proof(conn, context_id, proof)
        if member != progress.source:
            raise UntrustedSource(f"{peer} is not the snapshot source this node trusts")
        join_timeline.mark("proved")
        fresh = await contexts.is_fresh(context_id)
        started = progress.heads is not None
        if not started and not fresh:
            raise SnapshotRefused("this node has state: a snapshot never replaces it")
        if started and (progress.peer != str(peer) or fresh):
            # A boundary holds only for pages from one peer, and a cursor only over the
            # records it counted: start again (joining what we have again changes nothing).
            log.info("snapshot of %s restarts with %s", context_id.hex()[:12], peer)
            progress = SnapshotProgress(source=progress.source)
            started = False
        if not started:
            progress = msgspec.structs.replace(progress, peer=str(peer))
        joined = 0
        if not progress.complete:
            machine = SnapshotTake(
                trio.current_time(),
                cursor=progress.cursor,
                root_hash=progress.root_hash,
                heads=progress.heads,
                window=window,
                max_records=page_records,
                max_bytes=page_bytes,
                batch_bytes=batch_bytes,
                idle_timeout=idle_timeout,
                prepare_timeout=prepare_timeout,
            )
            taking = _Taking(
                contexts, context_id, machine, progress, first=not started, fresh=fresh
            )
            taking.on_page, taking.on_progress = on_page, on_progress
            taking.before = (progress.records, progress.size)
            writer = contexts.store.writer_times()
            with records_kept():  # (crdt/bulk.py)
                times = await take_snapshot(channel, machine, taking.store)
            progress, joined = taking.progress, taking.joined
            join_timeline.mark("pages_stored")
            # (benchmarks/join_bench.py prints it with its breakdown; the writer's figures
            # count every commit meanwhile, the batches' and any other's)
            log.info(
                "snapshot pages of %s taken: %s; writer: %s",
                context_id.hex()[:12],
                times.line(),
                contexts.store.writer_times().since(writer).line(),
            )
        boundary = progress.heads or []
        try:
            if progress.root_hash is not None:
                # (None: one fresh stream from an unbuilt state, which sends no root: see
                # "Root last, or none" in trionode/sync/snapshot.py.)
                await contexts.check_snapshot_root(context_id, progress.root_hash)
                join_timeline.mark("root_checked")
            # Who may write, as signed operations this node checks itself (never the peer's
            # verdicts), and where the boundary sits in everyone's sequence: before the
            # boundary becomes our checkpoint.
            await channel.send(AuthRequest(heads=boundary[:MAX_IDS]))
            auth = await expect(channel, AuthResponse)
            acks = contexts.check_snapshot_certificate(
                context_id, progress.certificate, auth.ops, auth.vvs, boundary
            )
            join_timeline.mark("certified")
        except SyncViolation as exc:
            await _refuse(contexts, context_id, progress, peer, exc)
            raise
        await contexts.adopt_auth(context_id, auth.ops, auth.vvs)
        await contexts.note_snapshot_acks(context_id, acks)

        def finish(batch: WriteBatch) -> None:
            batch.delete(PROGRESS, progress_key(context_id))

        root, heads = await contexts.adopt_heads(context_id, boundary, extra=finish)
        join_timeline.mark("boundary_adopted")
        await contexts.announce_snapshot(context_id)
        log.info(
            "snapshot of %s from %s: %d records in %d pages, root %s, %d heads",
            context_id.hex()[:12],
            peer,
            progress.records,
            progress.pages,
            root.hex()[:12],
            len(heads),
        )
        if on_progress is not None:
            on_progress(progress_json(progress, 0.0, progress.records, progress.size, done=True))
        return boundary, joined


@attrs.define
class _Taking:
    """Stores a streamed snapshot's batches, each with the progress marker it reaches."""

    contexts: ContextManager
    context_id: bytes
    machine: SnapshotTake
    progress: SnapshotProgress
    first: bool
    fresh: bool
    first_of_stream: bool = True
    joined: int = 0
    on_page: Callable[[], object] | None = None
    on_progress: Progress | None = None
    started: float = attrs.field(factory=trio.current_time)
    """When this stream started: its rate is what it took since."""
    before: tuple[int, int] = (0, 0)
    """Entries and bytes the marker counted when the stream started."""

    def report(self, *, done: bool = False) -> None:
        if self.on_progress is not None:
            progress = self.progress
            elapsed = trio.current_time() - self.started
            entries, size = self.before
            self.on_progress(progress_json(progress, elapsed, entries, size, done=done))

    async def store(self, batch: StoreBatch) -> None:
        begin = self.machine.begin
        assert begin is not None
        old = self.progress
        if self.machine.restarted and self.first_of_stream:
            # The responder's state moved on: the count starts over with its pages.
            old = msgspec.structs.replace(old, records=0, size=0, pages=0)
            self.before = (0, 0)
        if self.first_of_stream:
            join_timeline.mark("first_batch")
        self.first_of_stream = False
        boundary = old.heads is None or self.machine.restarted
        progress = msgspec.structs.replace(
            old,
            heads=begin.heads if boundary else old.heads,
            # The begin's root, or (root last: sync/snapshot.py) the last page's once it came;
            # None until then, so a resume before it starts over.
            root_hash=self.machine.root_hash or (None if boundary else old.root_hash),
            certificate=begin.certificate if boundary else old.certificate,
            entries=begin.entries,
            cursor=batch.cursor or old.cursor,
            complete=batch.last,
            pages=old.pages + batch.pages,
            records=old.records + len(batch.entities),
            size=old.size + batch.size,
        )
        key = progress_key(self.context_id)

        def save(write: WriteBatch) -> None:
            write.put(PROGRESS, key, progress)

        new = await self.contexts.store_snapshot_batch(
            self.context_id,
            batch.entities,
            batch.records,
            only_if_empty=self.first and self.fresh,
            extra=save,
            newest=batch.newest,
        )
        if new is None:
            raise SnapshotRefused("state arrived meanwhile: the snapshot is not applied")
        self.progress = progress
        self.first = False
        self.joined += len(batch.entities)
        join_timeline.mark(f"batch_{progress.pages}_pages_stored")
        if self.on_page is not None:
            for _ in range(batch.pages):
                self.on_page()
        self.report()


async def _refuse(
    contexts: ContextManager,
    context_id: bytes,
    progress: SnapshotProgress,
    peer: PeerId,
    error: Exception,
) -> None:
    """A snapshot that failed its checks: drop the state it brought and start the next one
    from the first record (the marker keeps the trusted source)."""
    log.warning("snapshot of %s from %s refused: %s", context_id.hex()[:12], peer, error)
    await contexts.discard_snapshot(context_id)
    await contexts.store.put(
        PROGRESS,
        progress_key(context_id),
        SnapshotProgress(source=progress.source, peer=progress.peer),
    )


async def expect(channel: Channel, kind: type[M]) -> M:
    """The next message, which must be a `kind` (a SyncError becomes a PeerFailed)."""
    reply = await channel.receive()
    if isinstance(reply, SyncError):
        raise PeerFailed(f"the peer refused: {reply.message}")
    if not isinstance(reply, kind):
        raise RemoteProtocolError(f"expected {kind.__name__}, got {type(reply).__name__}")
    return reply
