"""The streamed snapshot machines (`trionode.sync.snapshot`) against each other in memory,
without Trio: hypothesis picks the final state, how it changes between sessions, the order
in which messages, page reads and batch writes happen, and where the stream breaks; the
requester resumes from the marker it persisted with its last batch. Then each hostile
responder and requester the machines must refuse."""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import deque

import attrs
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trionode.crdt import Entity, Kind, decode_entity, encode_entity
from trionode.crdt.entity import ROOT_ID
from trionode.errors import LocalProtocolError
from trionode.sync.errors import PeerRefused, UnexpectedMessage
from trionode.sync.snapshot import (
    PageOutOfOrder,
    ReadPage,
    SnapshotExpired,
    SnapshotServe,
    SnapshotTake,
    TooManyPages,
)
from trionode.wire.messages import (
    SnapshotBegin,
    SnapshotChunk,
    SnapshotClose,
    SnapshotCredit,
    SnapshotOpen,
    SnapshotWait,
    SyncError,
    SyncMessage,
)

IDLE = 60.0


def record(name: str) -> bytes:
    return encode_entity(Entity(ROOT_ID, name.encode(), Kind.REGISTER))


@attrs.define
class Server:
    """The responder's final state: id -> record bytes (it only grows, as final state does)."""

    records: dict[bytes, bytes] = attrs.field(factory=dict)
    root_last: bool = False
    """The state is not built: a fresh stream announces no root at all, and one resumed by
    its heads sends it by the last page."""

    @property
    def root(self) -> bytes:
        digest = hashlib.sha256()
        for key in sorted(self.records):
            digest.update(key + self.records[key])
        return digest.digest()

    @property
    def heads(self) -> list[bytes]:
        """The boundary: it moves whenever the state does."""
        return [hashlib.sha256(b"heads" + self.root).digest()]

    def read(self, page: ReadPage) -> tuple[list[bytes], bytes | None, SnapshotBegin | None]:
        cursor = page.cursor
        by_heads = page.first and cursor is not None and page.resume_root is None
        if by_heads:
            if page.resume_heads is None or list(page.resume_heads) != self.heads:
                cursor = None
        elif page.first and cursor is not None and page.resume_root != self.root:
            cursor = None
        ids = sorted(self.records)
        start = 0 if cursor is None else bisect_right(ids, cursor)
        chosen: list[bytes] = []
        size = 0
        for entity_id in ids[start : start + page.max_records]:
            data = self.records[entity_id]
            if chosen and size + len(data) > page.max_bytes:
                break
            chosen.append(entity_id)
            size += len(data)
        more = start + len(chosen) < len(ids)
        begin = None
        if page.first:
            unbuilt = self.root_last and (cursor is None or by_heads)
            root = None if unbuilt else self.root
            begin = SnapshotBegin(heads=self.heads, root_hash=root, entries=len(ids), cursor=cursor)
        return [self.records[i] for i in chosen], chosen[-1] if more else None, begin


@attrs.define
class Joiner:
    """The requester's store: the records it holds and its persisted progress marker."""

    records: dict[bytes, bytes] = attrs.field(factory=dict)
    cursor: bytes | None = None
    root: bytes | None = None
    heads: list[bytes] | None = None
    complete: bool = False
    batches: int = 0
    from_first: bool = False
    """The last stream started from the first record (fresh, or restarted)."""


class Cut(Exception):
    """The stream broke."""


def session(
    server: Server,
    joiner: Joiner,
    choose: st.DataObject,
    *,
    window: int,
    max_records: int,
    cut_after: int | None,
    first_pages: tuple[int, ...] = (),
) -> None:
    """One stream: both machines, messages moved one at a time in an order hypothesis picks,
    until the requester has stored every page (or the stream breaks at `cut_after`)."""
    now = 0.0
    take = SnapshotTake(
        now,
        cursor=joiner.cursor,
        root_hash=joiner.root,
        heads=joiner.heads,
        window=window,
        max_records=max_records,
        max_bytes=1 << 20,
        batch_bytes=1 << 30,
        idle_timeout=IDLE,
    )
    to_server: deque[SyncMessage] = deque(take.messages_to_send())
    to_joiner: deque[SyncMessage] = deque()
    opened = to_server.popleft()
    assert isinstance(opened, SnapshotOpen)
    serve = SnapshotServe(
        opened,
        now,
        max_records=4096,
        max_bytes=1 << 22,
        idle_timeout=IDLE,
        first_pages=first_pages,
    )
    delivered = 0
    while not take.finished:
        moves: list[str] = []
        if to_server and serve.awaiting_message:
            moves.append("server reads")
        if not serve.finished and not serve.awaiting_message:
            moves.append("server sends")
        if to_joiner and take.awaiting_message:
            moves.append("joiner reads")
        if take.batch_ready:
            moves.append("joiner stores")
        assert moves, "deadlock: neither side can move"
        move = choose.draw(st.sampled_from(moves))
        if move == "server reads":
            serve.receive_message(to_server.popleft(), now)
            delivered += 1
        elif move == "server sends":
            action = serve.next_action()
            assert action is not None
            if action.first and choose.draw(st.booleans()):
                # The final state is still being built: the requester is told to wait.
                assert serve.still_preparing(now)
                to_joiner.extend(serve.messages_to_send())
            records, next_cursor, begin = server.read(action)
            # A root the begin did not carry goes with some page, the last at the latest.
            due = serve.root_due(begin) and (next_cursor is None or choose.draw(st.booleans()))
            root = server.root if due else None
            serve.page_read(records, next_cursor, begin=begin, root=root)
            to_joiner.extend(serve.messages_to_send())
        elif move == "joiner reads":
            take.receive_message(to_joiner.popleft(), now)
            delivered += 1
        else:
            batch = take.next_batch()
            assert batch is not None
            assert take.begin is not None
            for entity, data in zip(batch.entities, batch.records, strict=True):
                assert entity.id == decode_entity(data).id
                joiner.records[entity.id] = data
            # As the driver persists it: the begin's boundary and root, or the last page's
            # root once it came.
            boundary = joiner.heads is None or take.restarted
            joiner.heads = list(take.begin.heads) if boundary else joiner.heads
            joiner.root = take.root_hash or (None if boundary else joiner.root)
            joiner.cursor = batch.cursor or joiner.cursor
            joiner.complete = batch.last
            joiner.from_first = take.begin.cursor is None
            joiner.batches += 1
            take.batch_stored()
            to_server.extend(take.messages_to_send())
        in_flight = sum(isinstance(m, SnapshotChunk) for m in to_joiner) + take.pages_buffered
        assert in_flight <= window  # memory stays bounded by the window
        if cut_after is not None and delivered >= cut_after:
            raise Cut
    assert isinstance(to_server[-1], SnapshotClose)
    for message in to_server:
        serve.receive_message(message, now)
    assert serve.finished


names = st.sets(st.text("abcdefgh", min_size=1, max_size=6), max_size=60)


def state_of(chosen: set[str]) -> dict[bytes, bytes]:
    return {decode_entity(data).id: data for data in map(record, chosen)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=names,
    changes=st.lists(names, max_size=3),
    window=st.integers(2, 8),
    max_records=st.integers(1, 7),
    cuts=st.lists(st.integers(1, 30), max_size=3),
    root_last=st.booleans(),
    first_pages=st.lists(st.integers(1, 9), max_size=3).map(tuple),
    choose=st.data(),
)
def test_streamed_snapshot_delivers_the_state_through_cuts_and_changes(
    *,
    first: set[str],
    changes: list[set[str]],
    window: int,
    max_records: int,
    cuts: list[int],
    root_last: bool,
    first_pages: tuple[int, ...],
    choose: st.DataObject,
) -> None:
    """Whatever the interleaving, wherever the stream breaks and however the responder's
    state grows between sessions, the joiner ends with exactly the responder's state as of
    its last session (the bytes as sent), having buffered at most `window` pages; also
    when a fresh stream brings no root (the joiner then has none to check, and its state is
    the responder's all the same: a stream resumed after a cut always brings one), and
    whatever sizes the responder's first pages have (`first_pages`: smaller or larger than
    the joiner's pages)."""
    server = Server(state_of(first), root_last=root_last)
    joiner = Joiner()
    pending_changes = list(changes)
    for cut in [*cuts, None]:
        try:
            session(
                server,
                joiner,
                choose,
                window=window,
                max_records=max_records,
                cut_after=cut,
                first_pages=first_pages,
            )
        except Cut:
            if pending_changes:  # the responder's state moves on while we are away
                server.records.update(state_of(pending_changes.pop(0)))
            continue
        break
    assert joiner.complete
    if joiner.root is None:
        # Only a stream that ran whole from the first record may end without its root.
        assert root_last
        assert joiner.from_first
    else:
        assert joiner.root == server.root
    assert joiner.records == server.records


# -- hostile responders -----------------------------------------------------------------------


def _records(n: int) -> list[bytes]:
    data = [record(f"r{i}") for i in range(n)]
    return sorted(data, key=lambda r: decode_entity(r).id)


def _begun(window: int = 4) -> SnapshotTake:
    take = SnapshotTake(0.0, window=window, idle_timeout=IDLE)
    take.messages_to_send()
    take.receive_message(SnapshotBegin(heads=[], root_hash=bytes(32), entries=3), 0.0)
    return take


def _cursor(data: bytes) -> bytes:
    return decode_entity(data).id


def test_pages_beyond_the_window_are_refused() -> None:
    take = _begun(window=2)
    one, two, three = _records(3)
    take.receive_message(SnapshotChunk(records=[one], next_cursor=_cursor(one)), 0.0)
    take.receive_message(SnapshotChunk(records=[two], next_cursor=_cursor(two)), 0.0)
    with pytest.raises(TooManyPages):
        take.receive_message(SnapshotChunk(records=[three], next_cursor=None), 0.0)


def test_records_out_of_order_across_pages_are_refused() -> None:
    take = _begun()
    one, two, _ = _records(3)
    take.receive_message(SnapshotChunk(records=[two], next_cursor=_cursor(two)), 0.0)
    with pytest.raises(PageOutOfOrder, match="order"):
        take.receive_message(SnapshotChunk(records=[one], next_cursor=None), 0.0)


def test_a_page_that_repeats_the_last_record_of_the_one_before_is_refused() -> None:
    take = _begun()
    one, two, three = _records(3)
    take.receive_message(SnapshotChunk(records=[one, two], next_cursor=_cursor(two)), 0.0)
    with pytest.raises(PageOutOfOrder, match="order"):
        take.receive_message(SnapshotChunk(records=[two, three], next_cursor=None), 0.0)


@pytest.mark.parametrize(
    "chunk",
    [
        lambda r: SnapshotChunk(records=[r[1], r[0]], next_cursor=None),  # not sorted
        lambda r: SnapshotChunk(records=[r[0], r[2], r[1]], next_cursor=None),  # nor later
        lambda r: SnapshotChunk(records=[r[0], r[1], r[1]], next_cursor=None),  # a repeat
        lambda r: SnapshotChunk(records=[r[0], r[1]], next_cursor=_cursor(r[0])),  # cursor
        lambda r: SnapshotChunk(records=[], next_cursor=_cursor(r[0])),  # empty, not last
        lambda r: SnapshotChunk(records=[b"\xc1garbage"], next_cursor=None),
    ],
)
def test_bad_pages_are_refused(chunk: object) -> None:
    take = _begun()
    assert callable(chunk)
    with pytest.raises(PageOutOfOrder):
        take.receive_message(chunk(_records(3)), 0.0)


def test_a_page_before_the_begin_or_a_begin_at_another_cursor_is_refused() -> None:
    take = SnapshotTake(0.0, window=4, idle_timeout=IDLE)
    one = _records(1)[0]
    with pytest.raises(UnexpectedMessage):
        take.receive_message(SnapshotChunk(records=[one], next_cursor=None), 0.0)
    resumed = SnapshotTake(0.0, cursor=bytes(32), root_hash=b"r" * 32, window=4)
    begin = SnapshotBegin(heads=[], root_hash=b"r" * 32, entries=1, cursor=b"\x01" * 32)
    with pytest.raises(PageOutOfOrder, match="cursor"):
        resumed.receive_message(begin, 0.0)


def test_a_moved_state_restarts_from_the_first_record() -> None:
    resumed = SnapshotTake(0.0, cursor=bytes(32), root_hash=b"r" * 32, window=4)
    opened = resumed.messages_to_send()[0]
    assert isinstance(opened, SnapshotOpen)
    assert (opened.cursor, opened.root_hash) == (bytes(32), b"r" * 32)
    resumed.receive_message(SnapshotBegin(heads=[], root_hash=b"s" * 32, entries=0), 0.0)
    assert resumed.restarted
    assert resumed.cursor is None


def test_a_refusal_and_silence_end_the_stream() -> None:
    take = SnapshotTake(0.0, window=4, idle_timeout=IDLE)
    with pytest.raises(PeerRefused):
        take.receive_message(SyncError(message="busy"), 1.0)
    quiet = SnapshotTake(0.0, window=4, idle_timeout=IDLE)
    assert quiet.get_timer() == IDLE
    with pytest.raises(SnapshotExpired):
        quiet.handle_timer(IDLE)


def test_waits_renew_the_idle_deadline_within_the_bound_on_preparing() -> None:
    """A responder still preparing keeps the requester waiting past its idle deadline, but
    never past `prepare_timeout`; once the snapshot began, a wait is out of place."""
    take = SnapshotTake(0.0, window=4, idle_timeout=IDLE, prepare_timeout=3 * IDLE)
    take.messages_to_send()
    for now in (IDLE - 1, 2 * IDLE - 2, 3 * IDLE - 3):
        take.receive_message(SnapshotWait(), now)
    assert take.waits == 3
    assert take.get_timer() == 3 * IDLE  # the bound, not the renewed idle deadline
    with pytest.raises(SnapshotExpired):
        take.handle_timer(3 * IDLE)
    begun = _begun()
    with pytest.raises(UnexpectedMessage):
        begun.receive_message(SnapshotWait(), 0.0)


def test_the_responder_says_wait_only_while_its_first_page_is_read() -> None:
    serve = _serving(window=2)
    assert not serve.still_preparing(0.0)  # nothing asked for yet
    action = serve.next_action()
    assert action is not None
    assert action.first
    assert serve.still_preparing(IDLE - 1)
    assert serve.still_preparing(2 * IDLE - 2)
    assert serve.get_timer() == 3 * IDLE - 2  # preparing is not the requester's silence
    data = _records(2)
    begin = SnapshotBegin(heads=[], root_hash=bytes(32), entries=2)
    serve.page_read([data[0]], _cursor(data[0]), begin=begin, now=3 * IDLE)
    assert serve.get_timer() == 4 * IDLE
    assert serve.next_action() is not None
    assert not serve.still_preparing(3 * IDLE)  # later pages are plain reads
    assert [type(m) for m in serve.messages_to_send()] == [
        SnapshotWait,
        SnapshotWait,
        SnapshotBegin,
        SnapshotChunk,
    ]


def test_nothing_is_accepted_after_the_last_page() -> None:
    take = _begun()
    one = _records(1)[0]
    take.receive_message(SnapshotChunk(records=[one], next_cursor=None), 0.0)
    assert not take.awaiting_message
    with pytest.raises(UnexpectedMessage):
        take.receive_message(SnapshotChunk(records=[], next_cursor=None), 0.0)
    batch = take.next_batch()
    assert batch is not None
    assert batch.last
    take.batch_stored()
    assert take.finished
    assert isinstance(take.messages_to_send()[-1], SnapshotClose)


def test_batches_are_cut_at_half_the_window_and_credited_when_stored() -> None:
    take = _begun(window=4)
    records = _records(5)
    for data in records[:4]:
        take.receive_message(SnapshotChunk(records=[data], next_cursor=_cursor(data)), 0.0)
    first = take.next_batch()
    assert first is not None
    assert (first.pages, first.cursor) == (2, _cursor(records[1]))
    assert take.next_batch() is None  # one write at a time
    take.batch_stored()
    assert take.messages_to_send() == [SnapshotCredit(pages=2)]
    with pytest.raises(LocalProtocolError):
        take.batch_stored()


# -- hostile requesters -----------------------------------------------------------------------


def _serving(window: int = 2) -> SnapshotServe:
    request = SnapshotOpen(cursor=None, window=window, max_records=10, max_bytes=1 << 20)
    return SnapshotServe(request, 0.0, max_records=4096, max_bytes=1 << 22, idle_timeout=IDLE)


def test_the_first_pages_are_read_in_the_sizes_given_then_the_requested_size() -> None:
    """A responder starts its stream with small pages (each within what the requester
    asked for), then serves full ones; every page goes as read and the requester takes the
    mixed sizes as any others."""
    request = SnapshotOpen(cursor=None, window=8, max_records=4, max_bytes=1 << 20)
    serve = SnapshotServe(
        request, 0.0, max_records=4096, max_bytes=1 << 22, idle_timeout=IDLE, first_pages=(1, 6)
    )
    take = _begun(window=8)
    records = _records(12)
    sizes: list[int] = []
    while (action := serve.next_action()) is not None:
        sizes.append(action.max_records)
        start = sum(sizes[:-1])
        page = records[start : start + action.max_records]
        after = _cursor(page[-1]) if start + len(page) < len(records) else None
        begin = SnapshotBegin(heads=[], root_hash=bytes(32), entries=12) if action.first else None
        serve.page_read(page, after, begin=begin)
        for message in serve.messages_to_send():
            if not isinstance(message, SnapshotBegin):
                take.receive_message(message, 0.0)
    assert sizes == [1, 4, 4, 4]  # (6 is more than it asked for: 4)
    taken: list[bytes] = []
    while (batch := take.next_batch()) is not None:
        taken.extend(batch.records)
        take.batch_stored()
    assert taken == records


def test_credit_beyond_what_was_sent_is_refused() -> None:
    serve = _serving(window=2)
    with pytest.raises(TooManyPages):
        serve.receive_message(SnapshotCredit(pages=1), 0.0)


def test_the_responder_stops_at_the_window_and_waits_for_credit() -> None:
    serve = _serving(window=2)
    records = _records(4)
    for data in records[:2]:
        action = serve.next_action()
        assert action is not None
        begin = SnapshotBegin(heads=[], root_hash=bytes(32), entries=4) if action.first else None
        serve.page_read([data], _cursor(data), begin=begin)
    assert serve.next_action() is None
    assert serve.awaiting_message
    assert [type(m) for m in serve.messages_to_send()] == [
        SnapshotBegin,
        SnapshotChunk,
        SnapshotChunk,
    ]
    serve.receive_message(SnapshotCredit(pages=1), 1.0)
    assert serve.next_action() is not None
    assert serve.get_timer() == 1.0 + IDLE  # renewed by the credit
    with pytest.raises(UnexpectedMessage):
        serve.receive_message(SnapshotOpen(cursor=None, window=2, max_records=1, max_bytes=1), 2.0)


def test_a_silent_requester_expires_the_stream() -> None:
    serve = _serving()
    with pytest.raises(SnapshotExpired):
        serve.receive_message(SnapshotCredit(pages=1), IDLE + 1)


def test_the_requester_may_close_early() -> None:
    serve = _serving()
    serve.receive_message(SnapshotClose(), 0.0)
    assert serve.finished
    assert serve.next_action() is None


# -- the root with the last page ------------------------------------------------------------------


def _unrooted(take: SnapshotTake) -> None:
    take.messages_to_send()
    take.receive_message(SnapshotBegin(heads=[], root_hash=None, entries=3), 0.0)


def test_a_fresh_stream_whose_begin_had_no_root_brings_one_once_or_none() -> None:
    """A fresh stream from an unbuilt state brings no root (a root in one uninterrupted
    stream proves nothing the joiner does not hash itself); one that comes anyway, on any
    page, is kept to be checked, once."""
    one, two, three = _records(3)
    take = SnapshotTake(0.0, window=4, idle_timeout=IDLE)
    _unrooted(take)
    take.receive_message(SnapshotChunk(records=[one], next_cursor=_cursor(one)), 0.0)
    take.receive_message(SnapshotChunk(records=[two], next_cursor=None), 0.0)
    assert take.root_hash is None  # nothing to check: the pages are all there is
    batch = take.next_batch()
    assert batch is not None
    assert batch.last
    take = SnapshotTake(0.0, window=4, idle_timeout=IDLE)
    _unrooted(take)
    assert take.begin is not None
    assert take.begin.root_hash is None
    take.receive_message(
        SnapshotChunk(records=[one], next_cursor=_cursor(one), root_hash=b"r" * 32), 0.0
    )
    assert take.root_hash == b"r" * 32
    with pytest.raises(PageOutOfOrder, match="root"):  # only once
        take.receive_message(
            SnapshotChunk(records=[two], next_cursor=_cursor(two), root_hash=b"s" * 32), 0.0
        )
    take = SnapshotTake(0.0, window=4, idle_timeout=IDLE)
    _unrooted(take)
    take.receive_message(
        SnapshotChunk(records=[one, two, three], next_cursor=None, root_hash=b"r" * 32), 0.0
    )
    assert take.root_hash == b"r" * 32
    rooted = _begun()
    with pytest.raises(PageOutOfOrder, match="root"):  # the begin had one already
        rooted.receive_message(
            SnapshotChunk(records=[one], next_cursor=None, root_hash=bytes(32)), 0.0
        )


def test_a_stream_resumed_by_its_heads_must_bring_its_root_by_the_last_page() -> None:
    """Resumed after its cursor without a root, the stream's root is what proves that its
    pages continue the view of those before the cut: a last page without it is refused."""
    one, two, three = _records(3)
    heads = [b"h" * 32]
    take = SnapshotTake(0.0, cursor=_cursor(one), root_hash=None, heads=heads, window=4)
    take.messages_to_send()
    take.receive_message(
        SnapshotBegin(heads=heads, root_hash=None, entries=3, cursor=_cursor(one)), 0.0
    )
    take.receive_message(SnapshotChunk(records=[two], next_cursor=_cursor(two)), 0.0)
    with pytest.raises(PageOutOfOrder, match="root"):
        take.receive_message(SnapshotChunk(records=[three], next_cursor=None), 0.0)


def test_a_resumed_stream_must_announce_its_root_first() -> None:
    one = _records(1)[0]
    take = SnapshotTake(0.0, cursor=_cursor(one), root_hash=bytes(32), window=4)
    take.messages_to_send()
    with pytest.raises(PageOutOfOrder, match="root"):
        take.receive_message(
            SnapshotBegin(heads=[], root_hash=None, entries=3, cursor=_cursor(one)), 0.0
        )


def test_the_responder_sends_a_resumed_streams_root_once_by_the_last_page() -> None:
    """A stream resumed by its heads owes its root (by the last page, once); a fresh one
    whose begin had none sends none, and one whose begin had it never again."""
    one, two, three = _records(3)
    heads = [b"h" * 32]
    request = SnapshotOpen(
        cursor=_cursor(one), window=4, max_records=10, max_bytes=1 << 20, heads=heads
    )
    serve = SnapshotServe(request, 0.0, max_records=4096, max_bytes=1 << 22, idle_timeout=IDLE)
    assert serve.next_action() is not None
    begin = SnapshotBegin(heads=heads, root_hash=None, entries=3, cursor=_cursor(one))
    assert serve.root_due(begin)
    serve.page_read([one], _cursor(one), begin=begin)  # not known yet: later
    assert serve.next_action() is not None
    assert serve.root_due(None)
    with pytest.raises(LocalProtocolError):
        serve.page_read([two], None)  # the last page: the root is due
    serve.page_read([two], _cursor(two), root=b"r" * 32)
    assert not serve.root_due(None)
    assert serve.next_action() is not None
    with pytest.raises(LocalProtocolError):  # once
        serve.page_read([three], None, root=b"r" * 32)
    serve.page_read([three], None)
    sent = serve.messages_to_send()
    assert [m.root_hash for m in sent if isinstance(m, SnapshotChunk)] == [None, b"r" * 32, None]
    fresh = _serving(window=4)
    assert fresh.next_action() is not None
    unrooted = SnapshotBegin(heads=[], root_hash=None, entries=2)
    assert not fresh.root_due(unrooted)
    fresh.page_read([one], _cursor(one), begin=unrooted)
    assert fresh.next_action() is not None
    with pytest.raises(LocalProtocolError):  # none is due
        fresh.page_read([two], None, root=b"r" * 32)
    fresh.page_read([two], None)
    assert [m.root_hash for m in fresh.messages_to_send() if isinstance(m, SnapshotChunk)] == [
        None,
        None,
    ]
    rooted = _serving(window=4)
    assert rooted.next_action() is not None
    with pytest.raises(LocalProtocolError):  # announced first: never again
        rooted.page_read(
            [one],
            None,
            begin=SnapshotBegin(heads=[], root_hash=bytes(32), entries=1),
            root=bytes(32),
        )


def test_a_stream_cut_before_its_late_root_resumes_after_its_cursor_by_its_heads() -> None:
    """Cut before the root came, the requester keeps its cursor with the boundary it holds;
    a responder with that boundary still continues after the cursor (its root last
    again), one with another starts over, and a begin that keeps the cursor under other
    heads is refused."""
    one, two = _records(2)
    heads = [b"h" * 32]
    take = SnapshotTake(0.0, cursor=_cursor(one), root_hash=None, heads=heads, window=4)
    opened = take.messages_to_send()[0]
    assert isinstance(opened, SnapshotOpen)
    assert (opened.cursor, opened.root_hash, opened.heads) == (_cursor(one), None, heads)
    serve = SnapshotServe(opened, 0.0, max_records=10, max_bytes=1 << 20, idle_timeout=IDLE)
    action = serve.next_action()
    assert action is not None
    assert (action.cursor, action.resume_heads) == (_cursor(one), tuple(heads))
    begin = SnapshotBegin(heads=heads, root_hash=None, entries=2, cursor=_cursor(one))
    with pytest.raises(LocalProtocolError):  # (its own heads must be the ones it resumed)
        serve.page_read(
            [two], None, begin=msgspec.structs.replace(begin, heads=[b"g" * 32]), root=b"r" * 32
        )
    serve.page_read([two], None, begin=begin, root=b"r" * 32)
    for message in serve.messages_to_send():
        take.receive_message(message, 0.0)
    assert not take.restarted
    assert take.root_hash == b"r" * 32
    batch = take.next_batch()
    assert batch is not None
    assert [e.id for e in batch.entities] == [_cursor(two)]

    # Another boundary: from the first record, as any moved state.
    moved = SnapshotTake(0.0, cursor=_cursor(one), root_hash=None, heads=heads, window=4)
    moved.messages_to_send()
    moved.receive_message(SnapshotBegin(heads=[b"g" * 32], root_hash=None, entries=2), 0.0)
    assert moved.restarted
    # A begin at our cursor under other heads, with no root to check it by: refused.
    lying = SnapshotTake(0.0, cursor=_cursor(one), root_hash=None, heads=heads, window=4)
    lying.messages_to_send()
    with pytest.raises(PageOutOfOrder, match="heads"):
        lying.receive_message(
            SnapshotBegin(heads=[b"g" * 32], root_hash=None, entries=2, cursor=_cursor(one)),
            0.0,
        )
    # Without heads, a cursor with no root is not kept (nothing to resume it by).
    bare = SnapshotTake(0.0, cursor=_cursor(one), root_hash=None, window=4)
    opened = bare.messages_to_send()[0]
    assert isinstance(opened, SnapshotOpen)
    assert (opened.cursor, opened.heads) == (None, None)


def test_a_free_writer_stores_what_came_at_once_and_what_came_meanwhile_next() -> None:
    """The first page is stored alone, at once (no waiting for half a window); the pages
    that arrive while it is written are the next batch."""
    take = _begun(window=8)
    records = _records(4)
    take.receive_message(SnapshotChunk(records=[records[0]], next_cursor=_cursor(records[0])), 0.0)
    first = take.next_batch()  # (no half window waited for)
    assert first is not None
    assert (first.pages, first.cursor) == (1, _cursor(records[0]))
    assert not take.batch_ready
    for data in records[1:3]:
        take.receive_message(SnapshotChunk(records=[data], next_cursor=_cursor(data)), 0.0)
    assert take.next_batch() is None  # one write at a time
    take.batch_stored()
    assert take.messages_to_send() == [SnapshotCredit(pages=1)]
    second = take.next_batch()
    assert second is not None
    assert (second.pages, second.cursor, second.last) == (2, _cursor(records[2]), False)
    assert [e.id for e in second.entities] == [_cursor(r) for r in records[1:3]]
    take.batch_stored()
    assert take.next_batch() is None  # nothing came meanwhile
    take.receive_message(SnapshotChunk(records=[records[3]], next_cursor=None), 0.0)
    last = take.next_batch()
    assert last is not None
    assert last.last
