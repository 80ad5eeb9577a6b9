"""The Trio driver of the `/trionode/sync/1` machines: one stream, one machine.

The driver moves messages between a stream and a machine (`trionode.sync.machines`) and
fulfils the machine's storage actions against the node's contexts. Every frame goes
through the shared framed-stream helper (`trionode.net.framed`): the serving side's
first-message deadline, the between-message deadline, and the frame-size bound the
machine sets (small until the peer has proved membership). The machine's own deadline
(``get_timer``) bounds the whole session on top of those.

A served stream that has not proved membership holds no limiter token: the token is taken
(never waited for) only once the proof holds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, Protocol

import attrs
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import Counter, Gauge

from trionode.config import SNAPSHOT_FIRST_PAGES
from trionode.context import join_timeline
from trionode.context.manager import ContextManager
from trionode.context.snapshot import check_proof
from trionode.context.snapshot_state import SnapshotStream
from trionode.context.treecmp import SessionResponder, TakeAck
from trionode.dag.delta import VerifiedDelta
from trionode.errors import LocalProtocolError, RemoteProtocolError, StreamEndedError
from trionode.net.framed import FramedStream, StreamLimits
from trionode.net.host import Connection, Host
from trionode.sync.errors import BUSY, SessionExpired
from trionode.sync.machines import (
    MAX_AUTH_FRAME,
    CheckAuth,
    Delegate,
    DeltaFetch,
    HeaderCache,
    HeadsExchange,
    ReadAncestors,
    ReadDeltas,
    ReadHeads,
    Responder,
    StreamSnapshot,
)
from trionode.sync.snapshot import ReadPage, SnapshotServe, SnapshotTake, StoreBatch
from trionode.sync.treecmp import (
    AdoptBoundary,
    CheckPeer,
    ExportAuth,
    JoinRecords,
    ReadNodes,
    ReadSubtrees,
    TakeAcks,
    TreeCompare,
    TreeResult,
)
from trionode.wire.messages import (
    MAX_ANCESTORS,
    MAX_FRAME,
    MAX_PAGE_RECORDS,
    HeadsResponse,
    SnapshotBegin,
    SyncAuth,
    SyncMessage,
    decode_sync,
    frame,
)

log = logging.getLogger(__name__)

AUTH_DOMAIN: Final = b"trionode/sync-auth/v1"
SNAPSHOT_SERVE_BYTES: Final = 4 * 1024 * 1024
"""Most record bytes in one streamed snapshot page we serve (whatever the requester asks)."""


def auth_message(handshake_hash: bytes, context_id: bytes) -> bytes:
    """What a requester's member key signs to prove membership on one connection."""
    return AUTH_DOMAIN + handshake_hash + context_id


class SyncChannel:
    """Typed sync frames over one stream, on the shared framed-stream helper (its deadlines
    and frame-size bound; `limits` default to the config defaults)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        limits: StreamLimits | None = None,
        *,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self._stream = stream
        self.chains = False
        """Whether the peer speaks `/trionode/sync/2` (answers with ancestors)."""
        self._framed = FramedStream(
            stream, limits or StreamLimits(), max_frame=max_frame, what="sync stream"
        )

    def allow_frames(self, max_frame: int) -> None:
        """Accept frames up to `max_frame` bytes from now on (after authentication)."""
        self._framed.max_frame = max_frame

    async def send(self, message: SyncMessage) -> None:
        await self._stream.send_all(frame(message))

    async def receive(self, *, eof_ok: bool = False) -> SyncMessage | None:
        if eof_ok:
            body = await self._framed.receive_frame_or_eof()
            return None if body is None else decode_sync(body)
        return decode_sync(await self._framed.receive_frame())


class _Machine(Protocol):
    def messages_to_send(self) -> list[SyncMessage]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...


async def _flush(channel: SyncChannel, machine: _Machine) -> None:
    for message in machine.messages_to_send():
        await channel.send(message)


async def _receive(
    channel: SyncChannel, machine: _Machine, *, eof_ok: bool = False
) -> SyncMessage | None:
    """The next message, within the machine's deadline (on top of the stream's own)."""
    deadline = machine.get_timer()
    with trio.move_on_at(math.inf if deadline is None else deadline):
        return await channel.receive(eof_ok=eof_ok)
    machine.handle_timer(trio.current_time())  # raises SessionExpired
    raise SessionExpired("sync session deadline passed")


# -- requester -----------------------------------------------------------------------------------


async def exchange_heads(channel: SyncChannel, machine: HeadsExchange) -> HeadsResponse:
    """Run a heads exchange on an authenticated stream; the peer's answer."""
    await _flush(channel, machine)
    while machine.result is None:
        message = await _receive(channel, machine)
        assert message is not None
        machine.receive_message(message, trio.current_time())
    return machine.result


async def fetch_deltas(
    channel: SyncChannel,
    machine: DeltaFetch,
    apply: Callable[[Sequence[VerifiedDelta]], Awaitable[Iterable[bytes]]],
) -> None:
    """Run a delta fetch on an authenticated stream; `apply` hands one answer's verified
    deltas to the delta processor, in order and together (one commit for a whole chain),
    and returns the parents they wait for."""
    while True:
        await _flush(channel, machine)
        if machine.finished:
            return
        message = await _receive(channel, machine)
        assert message is not None
        machine.receive_message(message, trio.current_time())
        action = machine.next_action()
        if action is not None:
            machine.deltas_applied(await apply(action.deltas))


@attrs.define
class TakeTimes:
    """Where a taken snapshot's stream of pages spent its time (wall-clock seconds): the
    writer task storing batches, or waiting for a page to store; the reader task taking
    pages in (checking and reading their records: Python on the event loop, beside the
    writes). `benchmarks/join_bench.py` prints them with its breakdown."""

    seconds: float = 0.0
    batches: int = 0
    storing: float = 0.0
    waiting: float = 0.0
    """The writer had nothing to store (no page had come since its last batch)."""
    taking_in: float = 0.0
    loop_cpu: float = 0.0
    """CPU seconds of the event loop's thread meanwhile (every task's: the pages taken in,
    the batches' Python, the stream's bytes, whatever else the node ran): the nearer to
    `seconds`, the more the stream waited for the loop's Python rather than for the peer,
    the disk or the writer thread."""

    def line(self) -> str:
        return (
            f"{self.seconds:.3f}s (the loop's CPU {self.loop_cpu:.3f}s), {self.batches}"
            f" batches: storing {self.storing:.3f}s, waiting for pages {self.waiting:.3f}s,"
            f" taking pages in {self.taking_in:.3f}s"
        )


async def take_snapshot(
    channel: SyncChannel,
    machine: SnapshotTake,
    store: Callable[[StoreBatch], Awaitable[None]],
) -> TakeTimes:
    """Run a streamed snapshot on an authenticated stream: one task reads pages into the
    machine while this one stores its batches (one write each) and grants pages back, so
    the next pages arrive while a batch is written. Returns once every page is stored and
    the stream of pages is closed, with where its time went."""
    clock = time.perf_counter
    times = TakeTimes()
    began, cpu = clock(), time.thread_time()
    await _flush(channel, machine)
    ready = trio.Event()

    async def read() -> None:
        nonlocal ready
        while machine.awaiting_message:
            message = await _receive(channel, machine)
            assert message is not None
            started = clock()
            machine.receive_message(message, trio.current_time())
            times.taking_in += clock() - started
            ready.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while not machine.finished:
                batch = machine.next_batch()
                started = clock()
                if batch is None:
                    ready = trio.Event()
                    await ready.wait()
                    times.waiting += clock() - started
                    continue
                await store(batch)
                times.storing += clock() - started
                times.batches += 1
                machine.batch_stored()
                await _flush(channel, machine)
    except BaseExceptionGroup as group:
        # Reader and writer are one session: its error is whichever failed (the other was
        # only cancelled by it), raised as itself for the session's error handling.
        raise _first_error(group) from None
    times.seconds = clock() - began
    times.loop_cpu = time.thread_time() - cpu
    return times


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return (real or leaves)[0]


PageRead = tuple[list[bytes], bytes | None, SnapshotBegin | None]


class RootSource(Protocol):
    """The root of a snapshot's state, hashed beside its stream (`SnapshotStream`)."""

    root: bytes | None
    hashed: trio.Event


async def serve_snapshot(
    channel: SyncChannel,
    machine: SnapshotServe,
    read_page: Callable[[ReadPage], Awaitable[PageRead]],
    *,
    keepalive: float = 5.0,
    root: RootSource | None = None,
) -> None:
    """Serve one streamed snapshot: pages go out as long as the window allows; credits (and
    the close) are read when it does not, within the machine's idle deadline. While the
    first page is read (the final state may still be built), a `SnapshotWait` goes out
    every `keepalive` seconds. `root`: where the root comes from when the begin announced
    none (the state is hashed beside the stream): it goes with the first page after it is
    known, and the last page waits for it."""
    while not machine.finished:
        action = machine.next_action()
        if action is not None:
            if action.first:
                read = await _preparing(channel, machine, read_page(action), keepalive)
            else:
                read = await read_page(action)
            records, next_cursor, begin = read
            final: bytes | None = None
            if machine.root_due(begin):
                if root is None:
                    raise LocalProtocolError("a snapshot without its root needs a source of it")
                if next_cursor is None:
                    await root.hashed.wait()
                final = root.root
            machine.page_read(
                records, next_cursor, begin=begin, now=trio.current_time(), root=final
            )
            await _flush(channel, machine)
            continue
        message = await _receive(channel, machine)
        assert message is not None
        machine.receive_message(message, trio.current_time())


async def _preparing(
    channel: SyncChannel, machine: SnapshotServe, work: Awaitable[PageRead], every: float
) -> PageRead:
    """Await `work` (the first page), telling the requester to wait every `every` s."""

    async def beat() -> None:
        while True:
            await trio.sleep(every)
            if machine.still_preparing(trio.current_time()):
                # Never cut a frame in half when the page is ready: the beat is shielded.
                with trio.CancelScope(shield=True):
                    await _flush(channel, machine)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(beat)
        result = await work
        nursery.cancel_scope.cancel()
    return result


async def compare_trees(
    channel: SyncChannel,
    machine: TreeCompare,
    contexts: ContextManager,
    conn: Connection,
    context_id: bytes,
    *,
    acks: TakeAck | None = None,
) -> TreeResult:
    """Run a tree comparison of final state on an authenticated stream, fulfilling the
    machine's actions against `contexts` (`trionode.sync.treecmp`)."""
    while True:
        await _flush(channel, machine)
        if machine.finished:
            return machine.result
        action = machine.next_action()
        if action is None:
            message = await _receive(channel, machine)
            assert message is not None
            machine.receive_message(message, trio.current_time())
            continue
        if isinstance(action, CheckPeer):
            member = check_proof(conn, context_id, action.proof)
            writer, _ = await contexts.peer_rights(context_id, member)
            problem = None if writer else f"{conn.peer_id} is not a writer of this context"
            machine.peer_checked(member, problem)
        elif isinstance(action, TakeAcks):
            if acks is not None:
                for ack in action.acks:
                    await acks(context_id, ack)  # (drops and counts a bad one)
            machine.acks_taken()
        elif isinstance(action, ReadNodes):
            machine.nodes_read(await contexts.tree_nodes(context_id, action.queries))
        elif isinstance(action, JoinRecords):
            await contexts.merge_state(context_id, action.records)
            machine.records_joined()
        elif isinstance(action, ReadSubtrees):
            records, whole = await contexts.subtree_records(context_id, action.roots, action.limit)
            machine.subtrees_read(records, whole=whole)
        elif isinstance(action, ExportAuth):
            ops, vvs = await contexts.auth_export(context_id, action.heads)
            machine.auth_exported(ops, vvs)
        else:
            assert isinstance(action, AdoptBoundary)
            await contexts.adopt_auth(context_id, action.ops, action.vvs)
            await contexts.adopt_heads(context_id, action.heads, ())
            machine.boundary_adopted()


# -- responder -----------------------------------------------------------------------------------


class SyncServer:
    """Serves `/trionode/sync/1` streams: a `Responder` machine per stream, its actions
    answered from `contexts`, snapshot and tree-comparison requests handed to
    `SessionResponder`.

    Incoming sessions share `limiter` with outgoing ones, but never *wait* for it: two nodes
    whose tokens are all held by sessions towards each other would otherwise each wait for
    the other until the timeouts fired. A busy node says so at once; the requester backs
    off and tries again.
    """

    def __init__(
        self,
        contexts: ContextManager,
        host: Host,
        *,
        refused: Counter,
        busy: Counter,
        limiter: trio.CapacityLimiter | None = None,
        session_started: Callable[[], None] | None = None,
        max_requests: int = 1024,
        session_timeout: float | None = None,
        serving: Gauge | None = None,
        served_deltas: Counter | None = None,
        snapshot_idle_timeout: float = 60.0,
        snapshot_keepalive: float = 5.0,
        served_pages: Counter | None = None,
        acks: TakeAck | None = None,
        max_ancestors: int = MAX_ANCESTORS,
        ancestor_headers: int = 4096,
        walk_budget: float | None = None,
    ) -> None:
        self.walk_budget = walk_budget
        """Seconds one answer's ancestor walk may take (`Responder`)."""
        self.max_ancestors = max_ancestors
        self.headers = HeaderCache(ancestor_headers)
        """Headers the ancestor walks of every stream served read, most recent kept."""
        """Most ancestors one delta answer carries, whatever the request asks."""
        self.acks = acks
        """Where signed acks a tree comparison brings go (the AckBook)."""
        self.contexts = contexts
        self.host = host
        self._refused = refused
        self._busy = busy
        self._serving = serving
        """Sessions being served now (past the proof): visible while they run."""
        self._served_deltas = served_deltas
        self.limiter = limiter
        self.session_started = session_started
        self.max_requests = max_requests
        self.session_timeout = session_timeout
        self.snapshot_idle_timeout = snapshot_idle_timeout
        """A streamed snapshot's deadline: renewed by every credit, never the session's."""
        self.snapshot_keepalive = snapshot_keepalive
        """Seconds between `SnapshotWait`s while a snapshot's first page is prepared."""
        self._served_pages = served_pages

    async def serve(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        deadline = None
        if self.session_timeout is not None:
            deadline = trio.current_time() + self.session_timeout
        machine = Responder(
            max_requests=self.max_requests,
            max_ancestors=self.max_ancestors,
            deadline=deadline,
            headers=self.headers,
            walk_budget=self.walk_budget,
        )
        # Until the peer has proved membership its stream holds no limiter token and may
        # send one small frame, within the first-message deadline: silent or anonymous
        # streams cost the node almost nothing and never make members wait.
        channel = SyncChannel(stream, self.host.stream_limits, max_frame=MAX_AUTH_FRAME)
        try:
            first = await _receive(channel, machine)
            assert first is not None
            machine.receive_message(first, trio.current_time())
        except StreamEndedError:
            raise  # silent or gone: it costs the stream (and the peer may only be slow)
        except RemoteProtocolError:
            # Garbage, an oversized frame or a request before any proof: no member's node
            # sends that.
            self.host.report_misbehaviour(conn.peer_id, "sync_before_auth")
            raise
        action = machine.next_action()
        assert isinstance(action, CheckAuth)
        problem = await self._check_auth(conn, action.auth)
        machine.auth_checked(problem)
        if problem is not None:
            self._refused.inc()
            await _flush(channel, machine)
            return
        self.host.member_proven(conn.peer_id, action.auth.context_id)
        channel.allow_frames(machine.max_frame)
        if self.limiter is None:
            await self._serve_session(channel, stream, conn, machine, action.auth)
            return
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            self._busy.inc()
            machine.refuse(BUSY)
            await _flush(channel, machine)
            return
        try:
            if self.session_started is not None:
                self.session_started()
            await self._serve_session(channel, stream, conn, machine, action.auth)
        finally:
            self.limiter.release()

    async def _serve_session(
        self,
        channel: SyncChannel,
        stream: trio.abc.HalfCloseableStream,
        conn: Connection,
        machine: Responder,
        auth: SyncAuth,
    ) -> None:
        if self._serving is not None:
            self._serving.inc()
        try:
            await self._answer(channel, conn, machine, auth)
        finally:
            if self._serving is not None:
                self._serving.dec()
        await stream.send_eof()

    async def _answer(
        self, channel: SyncChannel, conn: Connection, machine: Responder, auth: SyncAuth
    ) -> None:
        context_id = auth.context_id
        state_sync = SessionResponder(self.contexts, conn, context_id, auth.member, acks=self.acks)
        while True:
            message = await _receive(channel, machine, eof_ok=True)
            if message is None:
                machine.receive_eof()
                break
            machine.receive_message(message, trio.current_time())
            action = machine.next_action()
            if isinstance(action, ReadHeads):
                heads, known, root = await self.contexts.capture(context_id, action.peer_heads)
                machine.heads_read(heads, known, root)
            elif isinstance(action, ReadDeltas):
                found: list[tuple[bytes, bytes]] = []
                missing: list[bytes] = []
                for delta_id in action.ids:
                    wire = await self.contexts.read_delta(context_id, delta_id)
                    if wire is None:
                        missing.append(delta_id)
                    else:
                        found.append((delta_id, wire))
                folded = await self.contexts.folded(context_id, missing)
                machine.deltas_read(found, [i for i in missing if i not in folded], sorted(folded))
                sent_before = machine.ancestors_sent
                while isinstance(action := machine.next_action(), ReadAncestors):
                    held = await self._read_held(context_id, action.ids)
                    machine.ancestors_read(held, trio.current_time())
                if self._served_deltas is not None:
                    self._served_deltas.inc(len(found) + machine.ancestors_sent - sent_before)
            elif isinstance(action, StreamSnapshot):
                started = trio.current_time()
                await self._stream_snapshot(channel, context_id, action)
                machine.snapshot_streamed(trio.current_time() - started)
            elif isinstance(action, Delegate):
                machine.delegated(await state_sync.handle(action.message))
            await _flush(channel, machine)

    async def _read_held(
        self, context_id: bytes, ids: Iterable[bytes]
    ) -> list[tuple[bytes, bytes]]:
        held: list[tuple[bytes, bytes]] = []
        for delta_id in ids:
            wire = await self.contexts.read_delta(context_id, delta_id)
            if wire is not None:
                held.append((delta_id, wire))
        return held

    async def _stream_snapshot(
        self, channel: SyncChannel, context_id: bytes, action: StreamSnapshot
    ) -> None:
        machine = SnapshotServe(
            action.request,
            trio.current_time(),
            max_records=MAX_PAGE_RECORDS,
            max_bytes=SNAPSHOT_SERVE_BYTES,
            idle_timeout=self.snapshot_idle_timeout,
            first_pages=SNAPSHOT_FIRST_PAGES,
        )
        # Every page from one view of the state, as of the first (folding goes on meanwhile:
        # trionode/context/final_state.py), released however the stream ends.
        stream = SnapshotStream()

        async def read(page: ReadPage) -> PageRead:
            read = await self._read_snapshot_page(context_id, page, stream)
            if page.first:
                join_timeline.mark("first_page_read")
                if stream.needs_hashing:
                    # The final state was not built: its root is hashed beside the stream.
                    nursery.start_soon(self.contexts.snapshot_hash_view, context_id, stream)
            if read[1] is None:
                join_timeline.mark("last_page_read")
            return read

        with join_timeline.timeline() as line:
            try:
                async with trio.open_nursery() as nursery:
                    await serve_snapshot(
                        channel,
                        machine,
                        read,
                        keepalive=self.snapshot_keepalive,
                        root=stream,
                    )
                    nursery.cancel_scope.cancel()  # (a hash no longer needed)
            except BaseExceptionGroup as group:
                raise _first_error(group) from None
            finally:
                stream.close()
            line.mark("closed")
        # Where a served snapshot's time went (benchmarks/join_bench.py prints it).
        log.info("snapshot of %s served: %s", context_id.hex()[:12], line.line())

    async def _read_snapshot_page(
        self, context_id: bytes, page: ReadPage, stream: SnapshotStream
    ) -> tuple[list[bytes], bytes | None, SnapshotBegin | None]:
        """One page of the final state (with its boundary, for the first)."""
        begin: SnapshotBegin | None = None
        if page.first:
            records, next_cursor, begin = await self.contexts.snapshot_first_page(
                context_id,
                page.cursor,
                page.resume_root,
                page.max_records,
                page.max_bytes,
                stream=stream,
                resume_heads=page.resume_heads,
            )
        else:
            records, next_cursor = await self.contexts.snapshot_next_page(
                context_id, stream, page.cursor, page.max_records, page.max_bytes
            )
        if self._served_pages is not None:
            self._served_pages.inc()
        return records, next_cursor, begin

    async def _check_auth(self, conn: Connection, auth: SyncAuth) -> str | None:
        if auth.context_id not in self.contexts.known_ids():
            return "unknown context"
        try:
            Ed25519PublicKey.from_public_bytes(auth.member).verify(
                auth.signature, auth_message(conn.noise.remote.handshake_hash, auth.context_id)
            )
        except (InvalidSignature, ValueError):
            return "bad membership proof"
        if await self.contexts.role(auth.context_id, auth.member) is None:
            return "not a member"
        return None
