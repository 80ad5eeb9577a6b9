"""A streamed snapshot as two sans-IO machines, and its finality certificate (DESIGN §8,
local-first-auth.md §5.5).

```
requester (SnapshotTake)                         responder (SnapshotServe)
  SnapshotOpen(cursor, root, window W) ──────▶  reads page 1 with the boundary
                                       ◀──────  SnapshotWait every few seconds, while the
                                                final state is still being prepared
                                       ◀──────  SnapshotBegin(heads, root, entries, certificate)
                                       ◀──────  SnapshotChunk, up to W of them (no waiting)
  pages decoded and checked as they come;
  what came while the last write ran (at
  most `batch` pages or bytes) one StoreBatch:
  one LMDB write with the progress marker
  SnapshotCredit(n) once n pages are stored ──▶  n more pages may go
                                       ◀──────  … the last chunk (next_cursor None)
  SnapshotClose                        ──────▶  back to ordinary requests
```

**Streaming.** The responder sends ahead within the window the requester granted, so no
round trip sits between two pages: while the requester's driver writes one batch, the next
pages are already on the wire. Memory on both sides stays bounded by the window: the
requester grants a page back only once it is stored (or dropped), so at most `window`
pages are ever buffered, and a batch is at most half the window so that a batch being
written never stops the stream. A batch is whatever came while the previous one was
written (the first page alone, to begin with): the writes start with the first page,
and grow only as large as they are slow.

**Resume.** The requester persists its progress (boundary, root, cursor) with every batch.
On a new session it sends its cursor and the root that cursor belongs to: if the
responder's final state still has that root, the pages continue after the cursor; if it
moved on (more was folded), the responder starts from the first record again and says so
(`SnapshotBegin.cursor` is None). Records only grow under join, so what the requester has
is joined again harmlessly, and the root check at the end holds for the newer state.

**Root last, or none.** A responder whose final state is not built yet (the first snapshot
since it loaded the context) does not wait for it, nor hash it: its `SnapshotBegin` has no
root, and a fresh stream (from the first record) then brings none. A root in one
uninterrupted stream proves nothing to the requester: it is the responder's own word,
hashed from the rows it sends, and the requester hashes the records it received itself; a
hostile responder passes that check by hashing whatever it sends, and an honest one sends
one view by construction (every page from the view its first page opened:
trionode/context/final_state.py). What vouches for the state is the boundary (the
certificate shows it final, and the tail sync brings every delta after it), not the root.
So the responder's work is reading and sending, and the requester's overlaps it.

The root proves something across a cut: the pages before it came from an earlier stream,
and those after must continue the *same* view, not a state that moved in between. So a
resumed stream always brings its root. A resume with a cursor and its root is served from
the built state, whose root it must compare. A stream cut before any root came resumes by
the boundary it holds (`SnapshotOpen.heads`): a responder whose boundary is still that
(nothing was folded since: the same final state) continues after the cursor and sends the
root of its whole state (it hashes every record, sending those after the cursor), by the
last page at the latest; any other starts from the first record (a fresh stream: what the
requester holds is joined again, records only grow, so it ends with the newer view). The
root check at the end covers what came before the cut as well, so a state that moved
regardless is refused, never taken. A root that does come on a fresh stream (the begin's,
from a built state, or a page's, from a responder that hashes beside its stream) is
checked all the same: one root per stream, at most.

**Preparing.** Before its first page the responder may need its final state built (once
per loaded context: trionode/context/final_state.py), which takes long for a large one.
Meanwhile it sends `SnapshotWait` now and then (`still_preparing`), each renewing the
requester's idle deadline; the requester bounds the whole wait for `SnapshotBegin` by its
own `prepare_timeout`, so a responder that only ever says "wait" is cut off.

**Checks.** Records must rise strictly in id order across pages, a page that is not the
last must end at its cursor and carry at least one record, and no more pages may come than
were granted; every violation is a typed :class:`SyncViolation`. The root check (the pages
add up to `SnapshotBegin.root_hash`) and the certificate check need the replica, so the
driver does them at the end (`check_certificate` below is the pure part).

**Finality certificate.** Unsigned state is taken only if it is final, and finality is the
joiner's own judgement: the certificate carries, for each AckSet member, something it
signed whose version vector acknowledges its past — its latest signed ack, or its latest
membership operation. The joiner resolves the auth DAG it received (signed operations
only), computes the AckSet and the final frontier FF from the certificate itself
(`trionode.auth.finality.finality`), and refuses the snapshot unless every boundary
checkpoint lies within FF: a forged entry (bad signature, another context) is a violation,
a certificate that leaves an AckSet member out or acknowledges less than the boundary is
stale.
"""

from __future__ import annotations

import enum
import itertools
import operator
from collections.abc import Iterable, Mapping, Sequence

import attrs
import msgspec

from trionode.auth.acks import open_ack
from trionode.auth.finality import finality, vv_max, within
from trionode.auth.model import Resolution, tag
from trionode.crdt import Entity
from trionode.crdt.bulk import collector_paused
from trionode.crdt.hlc import Timestamp, latest
from trionode.crdt.lazy import take
from trionode.dag.delta import decode_delta, header_vv, verify_delta
from trionode.errors import LocalProtocolError, ProtocolError
from trionode.sync.errors import PeerRefused, SessionExpired, SyncViolation, UnexpectedMessage
from trionode.wire.messages import (
    MAX_SNAPSHOT_WINDOW,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotClose,
    SnapshotCredit,
    SnapshotOpen,
    SnapshotWait,
    SyncError,
    SyncMessage,
)

Vector = Mapping[bytes, int]
_id_of = operator.attrgetter("id")


class PageOutOfOrder(SyncViolation):
    """Records that do not rise strictly in id order (across pages too), a page that does
    not end at its cursor, an empty page that is not the last, or a root on a page where
    none is due (or none on the last page of a stream whose begin had none)."""


class TooManyPages(SyncViolation):
    """More pages than the requester granted, or credit for pages never sent."""


class RootMismatch(SyncViolation):
    """The pages do not add up to the root hash the responder announced."""


class ForgedCertificate(SyncViolation):
    """A certificate entry that does not verify: a bad signature, another context, or an
    operation that is not one."""


class StaleCertificate(SyncViolation):
    """The certificate does not show the boundary final: an AckSet member has no entry, or
    the acks it carries do not reach every boundary checkpoint."""


class SnapshotExpired(SessionExpired):
    """Nothing moved on a snapshot stream for longer than its idle timeout (a stalled
    stream, not a violation: the peer may only be slow, and the snapshot resumes)."""


# -- the certificate ------------------------------------------------------------------------------


def open_certificate(entries: Iterable[bytes], context_id: bytes) -> dict[bytes, dict[bytes, int]]:
    """Member key → the version vector it signed, from a certificate's entries (a signed ack,
    or a signed membership operation of `context_id`); raises ForgedCertificate. Several
    entries of one member: the pointwise max (each is an ack of its past)."""
    out: dict[bytes, dict[bytes, int]] = {}
    for entry in entries:
        author, vv = _open_entry(entry, context_id)
        out[author] = vv_max([out.get(author, {}), vv])
    return out


def _open_entry(entry: bytes, context_id: bytes) -> tuple[bytes, dict[bytes, int]]:
    try:
        ack = open_ack(entry, context_id)
    except ProtocolError as exc:
        ack_error = str(exc)
    else:
        return ack.author, dict(ack.vv)
    try:
        header = verify_delta(decode_delta(entry), context_id=context_id)
    except ProtocolError:
        raise ForgedCertificate(f"certificate entry does not verify: {ack_error}") from None
    if header.context_id != context_id or header.auth is None:
        raise ForgedCertificate("certificate entry is no membership operation of this context")
    return header.author, header_vv(header)


def check_certificate(
    resolution: Resolution,
    acks: Mapping[bytes, Vector],
    boundary: Mapping[bytes, Vector],
) -> dict[bytes, int]:
    """FF derived from the certificate's `acks` (member key → vector) under our own
    `resolution`, once every checkpoint of `boundary` (id → vector) lies within it; raises
    StaleCertificate otherwise."""
    candidates = {tag(member): [vv] for member, vv in acks.items()}
    frontier = vv_max([*acks.values(), *boundary.values()])
    result = finality(resolution, candidates, frontier)
    if result.waiting_for:
        raise StaleCertificate(
            f"the certificate has no ack of {len(result.waiting_for)} AckSet member(s)"
        )
    for checkpoint, vv in boundary.items():
        if vv and not within(vv, result.final):
            raise StaleCertificate(f"checkpoint {checkpoint.hex()[:12]} is not final by its acks")
    return dict(result.final)


# -- responder ------------------------------------------------------------------------------------


@attrs.frozen
class ReadPage:
    """Read the final state's records after `cursor` (at least one, then up to the limits).
    With `first`, also read the boundary (heads, root, entries, certificate) with it and
    answer `page_read(..., begin=...)`."""

    cursor: bytes | None
    max_records: int
    max_bytes: int
    first: bool
    resume_root: bytes | None = None
    """With `first` and a cursor: the root that cursor belongs to. If the state served now
    has another root, read from the first record instead (and say so in `begin.cursor`)."""
    resume_heads: tuple[bytes, ...] | None = None
    """With `first`, a cursor and no root: the boundary that cursor belongs to. If the
    boundary now is another, read from the first record instead."""


class _Serve(enum.Enum):
    SENDING = "sending"
    READING = "reading"
    DRAINING = "draining"
    DONE = "done"


class SnapshotServe:
    """The responder's side of one streamed snapshot (started by a `SnapshotOpen`).

    `next_action()` asks for the next page while the window allows; `page_read` queues it
    (after the `SnapshotBegin` for the first). The driver reads a message whenever
    `awaiting_message` (no credit left, or every page sent): credits reopen the window, a
    `SnapshotClose` ends the stream. `get_timer()` is an idle deadline, renewed by every
    message from the requester: a long stream is never cut while it moves.
    """

    def __init__(
        self,
        request: SnapshotOpen,
        now: float,
        *,
        max_records: int,
        max_bytes: int,
        idle_timeout: float,
        first_pages: Sequence[int] = (),
    ) -> None:
        self._window = request.window
        self._credits = request.window
        self._cursor = request.cursor
        self._resume_root = request.root_hash
        self._resume_heads = (
            tuple(request.heads)
            if request.heads is not None and request.root_hash is None and request.cursor
            else None
        )
        self._max_records = min(request.max_records, max_records)
        self._max_bytes = min(request.max_bytes, max_bytes)
        self._first_pages = tuple(min(n, self._max_records) for n in first_pages)
        """Records in the first pages, in order (then `_max_records` each): the stream
        starts small so the requester has rows to store while the rest is read."""
        self._idle_timeout = idle_timeout
        self._deadline = now + idle_timeout
        self._state = _Serve.SENDING
        self._first = True
        self._rooted = True
        """The `SnapshotBegin` announced the root (else the last chunk carries it)."""
        self._outbox: list[SyncMessage] = []
        self.pages_sent = 0
        self.records_sent = 0

    @property
    def finished(self) -> bool:
        return self._state is _Serve.DONE

    @property
    def awaiting_message(self) -> bool:
        return self._state is _Serve.DRAINING or (
            self._state is _Serve.SENDING and self._credits == 0
        )

    def messages_to_send(self) -> list[SyncMessage]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if now >= self._deadline:
            raise SnapshotExpired(f"no word from the requester for {self._idle_timeout:g}s")

    def next_action(self) -> ReadPage | None:
        if self._state is not _Serve.SENDING or self._credits == 0:
            return None
        self._state = _Serve.READING
        ramp = self._first_pages
        return ReadPage(
            self._cursor,
            ramp[self.pages_sent] if self.pages_sent < len(ramp) else self._max_records,
            self._max_bytes,
            self._first,
            self._resume_root if self._first else None,
            self._resume_heads if self._first else None,
        )

    def root_due(self, begin: SnapshotBegin | None) -> bool:
        """Whether the root is still to be sent: the stream resumed after a cursor without
        its root (the begin, `begin` for the first page, announced none) and no page
        carried it yet: a page may carry it, the last must. A fresh stream whose begin had
        no root sends none (see "Root last" in the module doc)."""
        if self._first:
            return begin is not None and begin.root_hash is None and begin.cursor is not None
        return not self._rooted

    def page_read(
        self,
        records: Sequence[bytes],
        next_cursor: bytes | None,
        *,
        begin: SnapshotBegin | None = None,
        now: float | None = None,
        root: bytes | None = None,
    ) -> None:
        """The answer to `ReadPage`. For the first page, `begin` is the boundary as read with
        it; if the requester's cursor belongs to another root than `begin.root_hash`, the
        driver read from the first record and `begin.cursor` is None. With `now`, the idle
        deadline restarts from the first page (however long it took to read). `root`: the
        root of every record sent, with the last page when the begin had none (and only
        then: `needs_root`)."""
        if self._state is not _Serve.READING:
            raise LocalProtocolError("no page was asked for")
        due = self.root_due(begin)
        if (root is not None and not due) or (root is None and due and next_cursor is None):
            raise LocalProtocolError("the root goes once, by the last page, if the begin had none")
        if self._first:
            if begin is None or begin.cursor not in (None, self._cursor):
                raise LocalProtocolError("the first page needs its boundary and its start")
            if begin.root_hash is None and begin.cursor is not None:
                if self._resume_heads is None:
                    raise LocalProtocolError("a resumed stream is served with its root first")
                if sorted(begin.heads) != sorted(self._resume_heads):
                    raise LocalProtocolError("a stream resumed without its root keeps its heads")
            self._outbox.append(begin)
            if now is not None:
                self._deadline = now + self._idle_timeout
            self._first = False
        self._rooted = not due or root is not None
        self._outbox.append(
            SnapshotChunk(records=list(records), next_cursor=next_cursor, root_hash=root)
        )
        self._credits -= 1
        self.pages_sent += 1
        self.records_sent += len(records)
        self._cursor = next_cursor
        self._state = _Serve.SENDING if next_cursor is not None else _Serve.DRAINING

    def still_preparing(self, now: float) -> bool:
        """The first page is still being read (a long one: the final state is being
        built): queue a `SnapshotWait` so the requester keeps waiting; whether one was.
        Time spent preparing is ours, not the requester's: the idle deadline restarts."""
        if self._state is not _Serve.READING or not self._first:
            return False
        self._outbox.append(SnapshotWait())
        self._deadline = now + self._idle_timeout
        return True

    def receive_message(self, message: SyncMessage, now: float) -> None:
        self.handle_timer(now)
        if self._state is _Serve.DONE:
            raise LocalProtocolError("the snapshot stream is over")
        self._deadline = now + self._idle_timeout
        if isinstance(message, SnapshotCredit):
            outstanding = self._window - self._credits
            if message.pages > outstanding:
                raise TooManyPages(f"credit for {message.pages} pages, {outstanding} in flight")
            self._credits += message.pages
        elif isinstance(message, SnapshotClose):
            self._state = _Serve.DONE
        else:
            raise UnexpectedMessage(message, "snapshot credit or close")


# -- requester ------------------------------------------------------------------------------------


@attrs.frozen
class StoreBatch:
    """Join these records into the replica and persist them, with the progress marker
    (`cursor`: the last id), in one write; then answer `batch_stored`."""

    entities: tuple[Entity, ...]
    records: tuple[bytes, ...]
    """The records' wire bytes: the state rows keep them as they came."""
    cursor: bytes | None
    pages: int
    size: int
    last: bool
    newest: Timestamp | None = None
    """The newest stamp in `entities` (for the clock-drift check)."""


class _Take(enum.Enum):
    AWAIT_BEGIN = "await_begin"
    STREAMING = "streaming"
    RECEIVED = "received"
    DONE = "done"


class SnapshotTake:
    """The requester's side of one streamed snapshot (see the module doc).

    The driver reads messages while `awaiting_message`, and stores each `next_batch()`
    (one write each, in order), answering `batch_stored()`; once `finished`, every page is
    stored and `begin` holds the boundary. `cursor`/`root_hash` continue an interrupted
    snapshot of that root. `batch_pages`/`batch_bytes` bound one write.
    """

    def __init__(
        self,
        now: float,
        *,
        cursor: bytes | None = None,
        root_hash: bytes | None = None,
        heads: Sequence[bytes] | None = None,
        window: int = 16,
        max_records: int = 1000,
        max_bytes: int = 1 << 20,
        batch_bytes: int = 16 << 20,
        idle_timeout: float = 60.0,
        prepare_timeout: float = 600.0,
    ) -> None:
        if not 2 <= window <= MAX_SNAPSHOT_WINDOW:
            raise ValueError(f"window must be 2..{MAX_SNAPSHOT_WINDOW}")
        self._window = window
        self._batch_pages = window // 2
        self._batch_bytes = batch_bytes
        self._idle_timeout = idle_timeout
        self._deadline = now + idle_timeout
        self._prepare_timeout = prepare_timeout
        self._begin_deadline = now + prepare_timeout
        """`SnapshotWait`s renew the idle deadline, never this one."""
        # A cursor is kept with the root it belongs to or, cut before that came, with the
        # boundary (see "Root last" in the module doc).
        self._resume_heads = (
            sorted(heads) if heads is not None and root_hash is None and cursor else None
        )
        self._cursor = cursor if root_hash is not None or self._resume_heads else None
        self._state = _Take.AWAIT_BEGIN
        self._outbox: list[SyncMessage] = [
            SnapshotOpen(
                cursor=self._cursor,
                root_hash=root_hash if self._cursor is not None else None,
                window=window,
                max_records=max_records,
                max_bytes=max_bytes,
                heads=self._resume_heads,
            )
        ]
        self._entities: list[Entity] = []
        self._records: list[bytes] = []
        self._newest: Timestamp | None = None
        self._pages = 0
        self._size = 0
        self._ready: list[StoreBatch] = []
        self._storing = 0
        self.begin: SnapshotBegin | None = None
        self.root_hash: bytes | None = None
        """The root the pages add up to: the begin's, or (root last) a chunk's; None once
        `finished`: a fresh stream from a responder whose final state was not built, whose
        pages nothing but the boundary vouches for (see "Root last" in the module doc)."""
        self._root_owed = False
        """The begin resumed after our cursor without a root: the last page must bring it
        (it covers the pages before the cut too)."""
        self.waits = 0
        """`SnapshotWait`s received (the responder was preparing)."""
        self.restarted = False
        """The responder's state moved since our cursor: the pages start from the first
        record again (what we hold is joined again)."""
        self.pages = 0
        self.records = 0
        self.bytes = 0
        """Received so far on this stream (progress)."""

    @property
    def finished(self) -> bool:
        return self._state is _Take.DONE

    @property
    def awaiting_message(self) -> bool:
        return self._state in (_Take.AWAIT_BEGIN, _Take.STREAMING)

    @property
    def cursor(self) -> bytes | None:
        return self._cursor

    @property
    def batch_ready(self) -> bool:
        """A batch waits to be stored, or pages that `next_batch` makes one of at once (and
        none is being stored)."""
        return bool(self._ready or self._pages) and not self._storing

    @property
    def pages_buffered(self) -> int:
        """Pages received and not yet stored: never more than the window."""
        return self._pages + self._ready_pages() + self._storing

    def messages_to_send(self) -> list[SyncMessage]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        if self._state is _Take.AWAIT_BEGIN:
            return min(self._deadline, self._begin_deadline)
        return self._deadline if self.awaiting_message else None

    def handle_timer(self, now: float) -> None:
        if self._state is _Take.AWAIT_BEGIN and now >= self._begin_deadline:
            raise SnapshotExpired(f"the snapshot did not begin within {self._prepare_timeout:g}s")
        if self.awaiting_message and now >= self._deadline:
            raise SnapshotExpired(f"no page for {self._idle_timeout:g}s")

    def receive_message(self, message: SyncMessage, now: float) -> None:
        self.handle_timer(now)
        if not self.awaiting_message:
            raise UnexpectedMessage(message, "nothing (every page is in)")
        self._deadline = now + self._idle_timeout
        if isinstance(message, SyncError):
            raise PeerRefused(f"the peer refused: {message.message}")
        if self._state is _Take.AWAIT_BEGIN:
            if isinstance(message, SnapshotWait):
                self.waits += 1
                return
            if not isinstance(message, SnapshotBegin):
                raise UnexpectedMessage(message, "snapshot begin")
            if message.cursor is not None and message.cursor != self._cursor:
                raise PageOutOfOrder("the snapshot starts at a cursor we did not send")
            if message.cursor is None and self._cursor is not None:
                self.restarted = True
                self._cursor = None
            if message.root_hash is None and message.cursor is not None:
                if self._resume_heads is None:
                    raise PageOutOfOrder("a resumed snapshot must announce its root first")
                if sorted(message.heads) != self._resume_heads:
                    raise PageOutOfOrder("a snapshot resumed without its root keeps its heads")
            self.begin = message
            self.root_hash = message.root_hash
            self._root_owed = message.root_hash is None and message.cursor is not None
            self._state = _Take.STREAMING
            return
        if not isinstance(message, SnapshotChunk):
            raise UnexpectedMessage(message, "snapshot chunk")
        if self.pages_buffered >= self._window:
            raise TooManyPages(f"more than {self._window} pages in flight")
        last = message.next_cursor is None
        late = self.root_hash is None
        owed = late and self._root_owed
        if (message.root_hash is not None and not late) or (
            owed and last and not message.root_hash
        ):
            raise PageOutOfOrder("a root comes once, by the last page, when the begin had none")
        entities = self._check(message)
        if message.root_hash is not None:
            self.root_hash = message.root_hash
        self._entities.extend(entities)
        self._records.extend(message.records)
        self._pages += 1
        size = sum(map(len, message.records))
        self._size += size
        self.pages += 1
        self.records += len(entities)
        self.bytes += size
        if last:
            self._state = _Take.RECEIVED
        if last or self._pages >= self._batch_pages or self._size >= self._batch_bytes:
            self._cut(last=last)

    def _check(self, chunk: SnapshotChunk) -> list[Entity]:
        try:
            # Records of the common shape stay bytes until read (crdt/lazy.py); a page of
            # records, every one kept, with the collector paused and (while the driver
            # takes a snapshot: `records_kept`) then frozen (crdt/bulk.py).
            with collector_paused(kept=True):
                entities, newest = take(chunk.records)
        except (ProtocolError, msgspec.DecodeError, ValueError) as exc:
            raise PageOutOfOrder(f"a snapshot record does not decode: {exc}") from None
        self._newest = latest(self._newest, newest)
        previous = self._cursor
        ids = list(map(_id_of, entities))
        if ids:
            # Each after the one before (compared in C, not in a loop per record).
            if (previous is not None and ids[0] <= previous) or not all(
                map(operator.lt, ids, itertools.islice(ids, 1, None))
            ):
                raise PageOutOfOrder("snapshot records out of order")
            previous = ids[-1]
        if chunk.next_cursor is not None and (not entities or chunk.next_cursor != previous):
            raise PageOutOfOrder("snapshot page cursor does not follow its records")
        self._cursor = previous
        return entities

    def _cut(self, *, last: bool) -> None:
        self._ready.append(
            StoreBatch(
                tuple(self._entities),
                tuple(self._records),
                self._cursor,
                self._pages,
                self._size,
                last,
                self._newest,
            )
        )
        self._entities, self._records, self._pages, self._size = [], [], 0, 0
        self._newest = None

    def _ready_pages(self) -> int:
        return sum(b.pages for b in self._ready)

    def next_batch(self) -> StoreBatch | None:
        """The next batch to store (one at a time: answer `batch_stored` first). With none
        cut yet, the pages received so far are one: a driver free to write takes what came
        at once (the first page alone), and the pages that arrive while it writes make the
        next batch, so batches grow only as large as the writes are slow."""
        if self._storing:
            return None
        if not self._ready and self._pages:
            self._cut(last=False)
        if not self._ready:
            return None
        batch = self._ready.pop(0)
        self._storing = batch.pages
        return batch

    def batch_stored(self) -> None:
        """The batch from `next_batch` is persisted: grant its pages back (or, after the
        last, close the stream of pages)."""
        if not self._storing:
            raise LocalProtocolError("no batch is being stored")
        pages, self._storing = self._storing, 0
        if self._state is _Take.RECEIVED and not self._ready:
            self._state = _Take.DONE
            self._outbox.append(SnapshotClose())
        elif self._state is _Take.STREAMING:
            self._outbox.append(SnapshotCredit(pages=pages))
