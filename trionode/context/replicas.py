"""Replica storage: which contexts this node holds, loading one into memory, and staging
its changed rows for a write.

A context's state lives in memory as a `Replica`: its `StateTree` (loaded from the `state`
column the first time it is used) beside its causal DAG, HLC, keys and authority. Every
change to a replica is staged into one `WriteBatch` and committed in one LMDB write; if
that write fails the in-memory copy is dropped and reloaded from the store, so memory
never runs ahead of disk (`ReplicaStore.write`). One writer at a time per context
(`Replica.lock`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from operator import attrgetter
from typing import Final

import attrs
import msgspec
import trio
import trio.lowlevel
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from trionode.auth.acks import open_ack
from trionode.context import final_state
from trionode.context.authority import AuthRejected, ContextAuthority, decode_vv
from trionode.context.errors import AlreadyExists, ContextNotFound
from trionode.context.final_state import FinalSlot, note_base
from trionode.context.invitations import open_keys
from trionode.context.notices import b58
from trionode.context.records import (
    CONTEXTS,
    DELTAS,
    HANDLER_PREFIX,
    HANDLER_RUNS,
    IDENTITY,
    PENDING,
    STATE,
    ContextRecord,
    MemberRecord,
    key_slot,
    member_slot,
)
from trionode.crdt import Entity, HybridClock, StateTree, decode_entity, encode_entity
from trionode.crdt.bulk import collector_paused
from trionode.crdt.compact import record_of_row
from trionode.crdt.entity import ID_BYTES
from trionode.crdt.hlc import DEFAULT_DRIFT_TOLERANCE, ntp64_from_unix
from trionode.crdt.rows import JOURNAL_KINDS, Row, RowLoad
from trionode.dag.dag import CausalDag, Defer
from trionode.dag.delta import (
    AuthAction,
    DeltaHeader,
    SignedDelta,
    decode_delta,
    stored_header,
    verify_delta,
)
from trionode.errors import ProtocolError, RemoteProtocolError, StorageError
from trionode.store.lmdb_store import Column, Delete, Put, PutRun
from trionode.store.store import AsyncStore, BytesCodec, Table, WriteBatch

log = logging.getLogger(__name__)
_kind_of: Final = attrgetter("kind")

AUX = Table(Column.GENERIC, BytesCodec(), BytesCodec())
BASE_PREFIX: Final = final_state.BASE_PREFIX
"""base/ ‖ context ‖ entity id → the join of every record that arrived as *state* (snapshot
pages, tree comparison) or was folded: what a rebuild starts from, as no delta body carries
it (and the final state a snapshot serves: final_state.py).

An empty value (a *marker*) says: the same record as the entity's state row. Folding
writes one when the base it computed is the state row's record (once every delta on an
entity is folded: the rest of a context's life, for most of its entities), where a copy
would double what the entity takes on disk. Any later change of that state row first
writes the record the marker stood for (`stage_rows`, in the same batch), so a marker is
always exactly the stored state row; readers resolve it (`read_base`, or a scan with
`BASE_FILL`). Only plain records get one: a Text or Vector state row is a base plus a
journal (crdt/rows.py).

A context whose `STATE_BASE_PREFIX` row exists goes further: there, an entity with no base
row at all has its state row's record as its base (none if it has no state row), as if
every state row had a marker. A snapshot taken into an empty replica writes that row with
its first batch and no base row per record (a join of 100,000 entries put 100,000 markers
beside the state rows: half of its writes). Where the base differs from the state row a
base row says so: a record, or `NO_BASE` for an entity that has none (one that appeared
after the snapshot); staging a state row writes it first (`_keep_bases`)."""
BASE_FILL: Final = final_state.BASE_FILL
STATE_BASE_PREFIX: Final = final_state.STATE_BASE_PREFIX
NO_BASE: Final = final_state.NO_BASE
STORAGE_FORMAT: Final = 4
"""2: deltas carry sequence numbers, version vectors and membership operations; 3: a folded
delta keeps one `ckvv/` row that names its author and sequence number too (format 2 kept
them in a second row, `ckseq/`: `_to_format_3` merges them), and the store keeps empty
delta values without a log row (store/lmdb_store.py); 4: a context whose state rows are
its base (`STATE_BASE_PREFIX`: one that took a snapshot into an empty replica) has a base
row only where the base differs from the state row. Each format reads the homes of the
one before as they are (a format-3 home has no such context). A build of format 2 refuses
a home of format 3 at start, with one line, before it reads a row it would misread; one of
format 3 refuses format 4 (it would read a joined context's base as nearly empty)."""
LOAD_PAGE: Final = 4096
"""State rows read (and records filed) per step when a replica loads: bounded bytes per
read, and the event loop gets a turn between steps."""
FORMAT_TABLE = Table(Column.META, BytesCodec(), BytesCodec())
FORMAT_KEY: Final = b"context-format"
ACK_PREFIX: Final = b"ack/"
"""ack/ ‖ context ‖ author tag → the latest signed ack of that author (context/acks.py)."""
CHECKPOINT_VV_PREFIX = b"ckvv/"
"""ckvv/ ‖ context ‖ delta id → the version vector of a checkpoint (as its source said,
`encode_vv`), or for a delta folded here `FOLDED_MARK` ‖ (author tag, seq, vv) (`folded_row`):
a second delta its author signs with that number is still seen as equivocation once the
body is gone, restarts included."""
FOLDED_SEQ_PREFIX: Final = b"ckseq/"
"""ckseq/ ‖ context ‖ delta id → author tag ‖ sequence number (8 bytes, big-endian): format
2's second row per folded delta (merged into its ckvv/ row when a home moves to format 3)."""
FOLDED_MARK: Final = b"\x01"
"""First byte of a folded delta's ckvv/ row as format 3 wrote it: a positive fixint, never
the msgpack array header an `encode_vv` row starts with."""
FOLDED_OWN_MARK: Final = b"\x02"
"""First byte of a folded delta's ckvv/ row from store layout 4 on (which builds before
refuse: store/lmdb_store.py): (author tag, seq, the rest of the vector), the vector's
entry for the author (which is `seq`) left out: 14 bytes for a delta whose vector names
only its author, where `FOLDED_MARK` rows said tag and seq twice (26)."""


class _FoldedRow(msgspec.Struct, array_like=True, frozen=True):
    author_tag: bytes
    seq: int
    vv: list[tuple[bytes, int]]


_FOLDED_ROW = msgspec.msgpack.Decoder(_FoldedRow)
_ENCODER = msgspec.msgpack.Encoder()


def folded_row(author_tag: bytes, seq: int, vv: Mapping[bytes, int]) -> bytes:
    """The ckvv/ row of a delta folded here: its vector, author and sequence number."""
    if vv.get(author_tag) != seq:  # (never for a delta a node signed: kept as it is)
        return FOLDED_MARK + _ENCODER.encode(_FoldedRow(author_tag, seq, sorted(vv.items())))
    rest = sorted((t, s) for t, s in vv.items() if t != author_tag)
    return FOLDED_OWN_MARK + _ENCODER.encode(_FoldedRow(author_tag, seq, rest))


def read_checkpoint(value: bytes) -> tuple[dict[bytes, int], tuple[bytes, int] | None]:
    """(vector, (author tag, seq) if it was folded here) of a ckvv/ row; raises
    StorageError for a damaged one."""
    try:
        if value.startswith(FOLDED_MARK):
            row = _FOLDED_ROW.decode(memoryview(value)[1:])
            return dict(row.vv), (row.author_tag, row.seq)
        if value.startswith(FOLDED_OWN_MARK):
            row = _FOLDED_ROW.decode(memoryview(value)[1:])
            vv = dict(row.vv)
            if row.author_tag in vv:
                raise StorageError("a stored checkpoint vector names its author twice")
            return vv | {row.author_tag: row.seq}, (row.author_tag, row.seq)
        return decode_vv(value), None
    except (msgspec.DecodeError, RemoteProtocolError):
        raise StorageError("a stored checkpoint vector is unreadable") from None


@attrs.define
class Replica:
    """One context held in memory (see the module docstring)."""

    record: ContextRecord
    tree: StateTree
    dag: CausalDag[SignedDelta]
    clock: HybridClock
    member_key: Ed25519PrivateKey
    keys: dict[int, bytes]
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    authority: ContextAuthority = attrs.field(factory=ContextAuthority)
    final: FinalSlot = attrs.field(factory=FinalSlot)
    """The final state kept current for snapshots and tree comparison (final_state.py)."""
    store: AsyncStore | None = None
    """Where its rows are (set by `ReplicaStore` when it holds the replica): staging a
    state row reads the base marker it may replace (`stage_rows`)."""
    markers: bool = True
    """Whether a base row of this context may be a marker (see `BASE_PREFIX`), so staging
    its state rows must read their base rows first (`_keep_bases`: an LMDB read per
    change, issue #16). False only where known: a context created here, or loaded with no
    base row; whatever writes a base row sets it first (`final_state.note_base`, which
    folding, a snapshot's records and a tree comparison's call)."""
    state_base: bool = False
    """Whether its state rows are its base where it has no base row (`STATE_BASE_PREFIX`)."""

    @property
    def context_id(self) -> bytes:
        return self.record.context_id


@attrs.frozen
class DagLimits:
    """How much a replica's DAG may hold pending (from `sync.*` in config.py)."""

    max_pending: int = 1000
    max_pending_per_author: int | None = None


class ReplicaStore:
    """The contexts this node holds: their records in the store, and the replicas loaded
    in memory so far (lazily, on first use)."""

    def __init__(
        self,
        store: AsyncStore,
        *,
        wall_clock: Callable[[], float] = time.time,
        limits: DagLimits | None = None,
        max_clock_drift: float = DEFAULT_DRIFT_TOLERANCE,
    ) -> None:
        self.store = store
        self.wall_clock = wall_clock
        self.limits = limits or DagLimits()
        self.max_clock_drift = max_clock_drift
        self._loaded: dict[bytes, Replica] = {}
        self._known: set[bytes] = set()
        self._load_lock = trio.Lock()
        self._deferred = trio.Event()
        """Set when a delta starts waiting for the clock (see `serve_clock_waits`)."""
        self._changed = trio.Event()
        """Set and replaced when a context is created, joined or deleted or gets a new key."""
        self.app_waits: dict[bytes, str] = {}
        """Context → why it still waits for the app it moved to (`app_upgrades.py`)."""

    async def start(self) -> None:
        """Learn which contexts exist; their state loads lazily on first use.

        Raises StorageError for contexts stored by a trionode whose delta format this one
        cannot read (format 1: membership in the state, no sequence numbers)."""
        records = await self.records()
        stored = await self.store.get(FORMAT_TABLE, FORMAT_KEY)
        if stored is None and records:
            raise StorageError(
                f"this home holds {len(records)} context(s) in storage format 1, which this "
                f"trionode (format {STORAGE_FORMAT}) cannot read: start from a new home "
                "(`trionode init --home NEW`) and share the contexts again"
            )
        if stored == b"2":
            await self._to_format_3()
        elif stored == b"3":
            # (Format 4 only adds what format 3 never wrote: the home reads as it is.)
            await self.store.put(FORMAT_TABLE, FORMAT_KEY, str(STORAGE_FORMAT).encode())
        elif stored is not None and stored != str(STORAGE_FORMAT).encode():
            raise StorageError(
                f"this home's contexts are in storage format {stored.decode(errors='replace')}, "
                f"and this trionode reads format {STORAGE_FORMAT}: use a matching trionode"
            )
        if stored is None:
            await self.store.put(FORMAT_TABLE, FORMAT_KEY, str(STORAGE_FORMAT).encode())
        self._known = {record.context_id for record in records}

    async def _to_format_3(self) -> None:
        """Merge each folded delta's ckseq/ row into its ckvv/ row and record the format
        (3, and so 4: see `STORAGE_FORMAT`), in one transaction (a crash leaves format 2,
        converted again at the next start)."""
        batch = WriteBatch()
        for key, value in await self.store.scan(AUX, prefix=FOLDED_SEQ_PREFIX):
            slot = CHECKPOINT_VV_PREFIX + key[len(FOLDED_SEQ_PREFIX) :]
            vv = await self.store.get(AUX, slot)
            if vv is None or len(value) <= 8:
                continue  # (nothing to merge with: kept, and read as before)
            vector, folded = read_checkpoint(vv)
            if folded is None:
                batch.put(
                    AUX, slot, folded_row(value[:-8], int.from_bytes(value[-8:], "big"), vector)
                )
            batch.delete(AUX, key)
        batch.put(FORMAT_TABLE, FORMAT_KEY, str(STORAGE_FORMAT).encode())
        await self.store.write(batch)

    # -- which contexts ----------------------------------------------------------------------

    async def records(self) -> list[ContextRecord]:
        return [record for _, record in await self.store.scan(CONTEXTS)]

    async def get(self, context_id: bytes) -> ContextRecord:
        replica = self._loaded.get(context_id)
        if replica is not None and not replica.lock.locked():
            # What the store holds: every change refreshes the record under the lock and
            # a failed commit drops the replica. (Watchers read it after every write: a
            # thread trip each saved, issue #16.)
            await trio.lowlevel.checkpoint()
            return replica.record
        record = await self.store.get(CONTEXTS, context_id)
        if record is None:
            raise ContextNotFound(f"no context {b58(context_id)}")
        return record

    def known_ids(self) -> set[bytes]:
        return set(self._known)

    async def wait_changed(self) -> None:
        """Until a context is next created, joined or deleted, or `add_key` gives it a new
        key (the DHT rendezvous announces such a context right away: net/rendezvous.py;
        it notices key rotations by the delta processor on its own)."""
        await self._changed.wait()

    def _note_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def knows(self, context_id: bytes) -> bool:
        return context_id in self._known

    def loaded(self) -> list[Replica]:
        """The replicas in memory now (a copy: safe to await while iterating)."""
        return list(self._loaded.values())

    def application_of(self, context_id: bytes) -> bytes | None:
        """The app a context runs as the store holds it, if that is known without a read:
        the context is in memory and no write holds it (as `get` reads it). None otherwise.
        For watchers deciding synchronously whether an event concerns them."""
        replica = self._loaded.get(context_id)
        if replica is None or replica.lock.locked():
            return None
        return replica.record.application_id

    def add(self, replica: Replica) -> None:
        """Hold a replica created here (already committed)."""
        replica.store = self.store
        self._loaded[replica.context_id] = replica
        self._known.add(replica.context_id)
        self._note_changed()

    async def adopt(
        self,
        *,
        context_id: bytes,
        application_id: bytes,
        member_key: Ed25519PrivateKey,
        keys: dict[int, bytes],
        key_id: int,
        extra: Callable[[WriteBatch], None] | None = None,
    ) -> ContextRecord:
        """Record a context this node joined (state arrives by sync and gossip); `extra`
        stages more writes in the same commit."""
        if context_id in self._known:
            raise AlreadyExists(f"already a member of {b58(context_id)}")
        member = member_key.public_key().public_bytes_raw()
        record = ContextRecord(
            context_id=context_id,
            application_id=application_id,
            created_at=self.wall_clock(),
            root_hash=StateTree().root_hash(),
            heads=[],
            key_id=key_id,
            members=[],
            our_member=member,
        )
        batch = WriteBatch()
        for kid, key in keys.items():
            batch.put(IDENTITY, key_slot(context_id, kid), key)
        batch.put(IDENTITY, member_slot(context_id, member), member_key.private_bytes_raw())
        batch.put(CONTEXTS, context_id, record)
        if extra is not None:
            extra(batch)
        await self.store.write(batch)
        self._known.add(context_id)
        self._note_changed()
        return record

    async def add_key(self, context_id: bytes, key_id: int, key: bytes) -> None:
        replica = await self.load(context_id)
        async with replica.lock:
            replica.keys[key_id] = key
            if key_id > replica.record.key_id:
                replica.record = replace(replica.record, key_id=key_id)
            batch = WriteBatch()
            batch.put(IDENTITY, key_slot(context_id, key_id), key)
            batch.put(CONTEXTS, context_id, replica.record)
            await self.store.write(batch)
        self._note_changed()

    async def delete(self, context_id: bytes) -> None:
        await self.get(context_id)
        replica = self._loaded.pop(context_id, None)
        if replica is not None:
            await replica.lock.acquire()  # let an in-flight call finish first
        batch = WriteBatch()
        batch.delete(CONTEXTS, context_id)
        for column in (Column.STATE, Column.DELTA, Column.IDENTITY, Column.PENDING):
            for key, _ in await self.store.raw_scan(column, prefix=context_id):
                batch.ops.append(Delete(column, key))
        # The finality rows too: a context joined again must not start from old base rows.
        batch.delete(AUX, STATE_BASE_PREFIX + context_id)
        for prefix in (BASE_PREFIX, ACK_PREFIX, CHECKPOINT_VV_PREFIX, FOLDED_SEQ_PREFIX):
            for key, _ in await self.store.raw_scan(Column.GENERIC, prefix=prefix + context_id):
                batch.ops.append(Delete(Column.GENERIC, key))
        for key, _ in await self.store.scan(HANDLER_RUNS, prefix=HANDLER_PREFIX + context_id):
            batch.delete(HANDLER_RUNS, key)
        await self.store.write(batch)
        self._known.discard(context_id)
        self._note_changed()

    def forget_loaded(self, context_id: bytes) -> None:
        """Drop the in-memory copy: the next use reloads it from the store."""
        self._loaded.pop(context_id, None)

    # -- loading -----------------------------------------------------------------------------

    async def load(self, context_id: bytes) -> Replica:
        replica = self._loaded.get(context_id)
        if replica is not None:
            return replica
        async with self._load_lock:
            replica = self._loaded.get(context_id)
            if replica is None:
                replica = await self._read(context_id)
                self._loaded[context_id] = replica
        return replica

    async def load_waiting(self) -> None:
        """Load every context that has pending deltas (some may wait for the clock)."""
        contexts = {key[:32] for key, _ in await self.store.raw_scan(Column.PENDING)}
        for context_id in sorted(contexts & self._known):
            await self.load(context_id)

    def new_dag(
        self, *, applied: Iterable[bytes] = (), heads: Iterable[bytes] = ()
    ) -> CausalDag[SignedDelta]:
        return CausalDag(
            applied=applied,
            heads=heads,
            max_pending=self.limits.max_pending,
            max_pending_per_author=self.limits.max_pending_per_author,
        )

    async def _state_tree(self, context_id: bytes) -> StateTree:
        """The context's state rows as a tree, read `LOAD_PAGE` rows at a time and each read
        decoded before the next: a large replica is never held as all its rows' bytes beside
        its records (a whole-prefix scan doubled a 1,000,000-entry restart's peak). Reads
        and decoding stay on the event loop, which gets a checkpoint between pages: in a
        worker thread, a test's autojump clock ran virtual time on while a replica loaded."""
        raw = self.store.raw
        skip = len(context_id)
        loading = RowLoad()
        start: bytes | None = None
        while True:
            page = raw.scan(Column.STATE, prefix=context_id, start=start, limit=LOAD_PAGE)
            with collector_paused():
                loading.feed((key[skip:], value) for key, value in page)
            if len(page) < LOAD_PAGE:
                break
            start = page[-1][0] + b"\x00"  # the first key after the last one read
            del page
            await trio.lowlevel.checkpoint()
        entities, log = loading.finish()
        tree = StateTree()
        for at in range(0, len(entities), LOAD_PAGE):
            with collector_paused():
                tree.add_new(entities[at : at + LOAD_PAGE])  # decoded here: kept, not copied
            await trio.lowlevel.checkpoint()
        tree.restore_log(log)
        return tree

    async def _read(self, context_id: bytes) -> Replica:
        record = await self.get(context_id)
        tree = await self._state_tree(context_id)
        delta_rows = await self.store.scan(DELTAS, prefix=context_id)
        applied = [k[len(context_id) :] for k, _ in delta_rows]
        dag = self.new_dag(applied=applied, heads=record.heads)
        member_seed = await self.store.get(IDENTITY, member_slot(context_id, record.our_member))
        keys = {
            int.from_bytes(k[33:41], "big"): v
            for k, v in await self.store.scan(IDENTITY, prefix=context_id + b"k")
        }
        if member_seed is None or record.key_id not in keys:
            raise StorageError(f"context {b58(context_id)} has lost its keys")
        clock = HybridClock(record.our_member, self.max_clock_drift)
        # Beyond drift this is ignored: state poisoned by an older version (a stamp near
        # 2^64-1) must not make every local write overflow the clock after a restart.
        clock.witness(tree.max_stamp, self.physical_now())
        base = BASE_PREFIX + context_id
        state_base = self.store.get_sync(AUX, STATE_BASE_PREFIX + context_id) is not None
        replica = Replica(
            record,
            tree,
            dag,
            clock,
            Ed25519PrivateKey.from_private_bytes(member_seed),
            keys,
            store=self.store,
            markers=state_base or bool(self.store.raw.scan(Column.GENERIC, prefix=base, limit=1)),
            state_base=state_base,
        )
        await self._load_authority(replica, delta_rows)
        # Pending deltas survive restarts: put them back in the DAG. Those waiting for the
        # clock have all their parents: they wait again, due at once, so the next release
        # checks them against the clock as it is now.
        now = trio.current_time()
        for key, pending in await self.store.scan(PENDING, prefix=context_id):
            try:
                delta = decode_delta(pending.delta)
                header = verify_delta(delta, context_id=context_id)
            except ProtocolError:
                continue
            dag.offer(
                key[32:],
                header.parents,
                delta,
                now=now,
                apply=lambda _id, _item: Defer(now),
                author=header.author,
            )
        self.note_deferred(replica)
        return replica

    async def _load_authority(self, replica: Replica, rows: list[tuple[bytes, bytes]]) -> None:
        """Rebuild the auth graph, version vectors and verdicts from the stored deltas (a
        pure function of them: the same verdicts as before the restart)."""
        context_id = replica.context_id
        authority = replica.authority
        ops: list[tuple[bytes, DeltaHeader]] = []
        for key, wire in rows:
            if not wire:
                continue
            delta_id = key[len(context_id) :]
            header = stored_header(decode_delta(wire), context_id=context_id)
            authority.record(delta_id, header, len(wire))
            if header.auth is not None:
                ops.append((delta_id, header))
        for key, value in await self.store.scan(AUX, prefix=CHECKPOINT_VV_PREFIX + context_id):
            delta_id = key[len(CHECKPOINT_VV_PREFIX) + 32 :]
            authority.checkpoint_vv[delta_id], folded = read_checkpoint(value)
            if folded is not None:
                authority.note_folded(delta_id, *folded)
        # Format 2's rows that had no vector to merge with (see `_to_format_3`).
        for key, value in await self.store.scan(AUX, prefix=FOLDED_SEQ_PREFIX + context_id):
            if len(value) > 8:
                delta_id = key[len(FOLDED_SEQ_PREFIX) + 32 :]
                authority.note_folded(delta_id, value[:-8], int.from_bytes(value[-8:], "big"))
        for _, value in await self.store.scan(AUX, prefix=ACK_PREFIX + context_id):
            try:
                ack = open_ack(value, context_id)
            except RemoteProtocolError:
                continue
            authority.note_ack(ack.author, dict(ack.vv))
        ops.sort(key=lambda item: (sum(v for _, v in item[1].vv), item[0]))
        for delta_id, header in ops:
            try:
                authority.add_op(delta_id, header)
            except AuthRejected as exc:  # stored before a rule tightened: skip it
                log.warning("stored operation %s no longer passes: %s", delta_id.hex()[:16], exc)
        for delta_id, meta in authority.meta.items():
            if not meta.op:
                authority.verdicts[delta_id] = authority.judge(delta_id)[0]
        authority.judged()
        replica.record = replace(
            replica.record,
            members=[
                MemberRecord(public_key=m, role=r) for m, r in sorted(authority.roles().items())
            ],
        )

    # -- waiting for the clock ---------------------------------------------------------------

    def note_deferred(self, replica: Replica) -> None:
        if replica.dag.next_release() is not None:
            self._deferred.set()

    def deferral_wakeup(self) -> trio.Event:
        """A fresh event, set when a delta next starts waiting for the clock."""
        self._deferred = trio.Event()
        return self._deferred

    def next_release(self) -> float | None:
        """When the earliest delta waiting for the clock may apply (trio time)."""
        times = [replica.dag.next_release() for replica in self._loaded.values()]
        return min((t for t in times if t is not None), default=None)

    # -- staging and writing -----------------------------------------------------------------

    def physical_now(self) -> int:
        return ntp64_from_unix(self.wall_clock())

    async def write(self, replica: Replica, batch: WriteBatch) -> None:
        """Commit `batch`; if that fails, drop the replica (memory never runs ahead)."""
        try:
            await self.store.write(batch)
        except StorageError:
            self._loaded.pop(replica.context_id, None)  # reload from disk next time
            raise

    def stage_base(self, replica: Replica, batch: WriteBatch, records: Sequence[Entity]) -> None:
        """Join records that arrived as state into the base a rebuild starts from."""
        prefix = BASE_PREFIX + replica.context_id
        for record in records:
            old = read_base(self.store, replica, record.id)
            joined = record if old is None else decode_entity(old).join(record)
            batch.put(AUX, prefix + record.id, encode_entity(joined))
        note_base(replica, records)

    def iter_base(self, context_id: bytes) -> Iterator[Entity]:
        """The records that arrived as state or were folded (see `stage_base`), from the
        store. Call under the replica's lock."""
        state_base = self.store.get_sync(AUX, STATE_BASE_PREFIX + context_id) is not None
        for rows in final_state.base_pages(self.store, context_id, state_base=state_base):
            for _, value in rows:
                yield decode_entity(record_of_row(value))


def read_base(store: AsyncStore, replica: Replica, entity_id: bytes) -> bytes | None:
    """The base record of an entity (None: it has none): its base row, or what that row or
    its absence stands for (see `BASE_PREFIX`). Call under the replica's lock (or the reads
    could disagree)."""
    context_id = replica.context_id
    stored = store.get_sync(AUX, BASE_PREFIX + context_id + entity_id)
    if stored is None and not replica.state_base:
        return None
    if stored:
        return None if stored == NO_BASE else stored
    row = store.get_sync(STATE, context_id + entity_id)
    if row is None:
        if stored is None:
            return None  # (no base row, no state row: no base)
        raise StorageError(f"a base row of {b58(context_id)} stands for a state row that is gone")
    return record_of_row(row)


def stage_state_base(store: AsyncStore, replica: Replica, batch: WriteBatch) -> None:
    """Make the replica's state rows its base where it has no base row (see `BASE_PREFIX`),
    with `batch`: for a replica that holds no state, before a snapshot's first records. Not
    if it has base rows (a marker would stay one: harmless, but nothing is saved)."""
    context_id = replica.context_id
    if store.raw.scan(Column.GENERIC, prefix=BASE_PREFIX + context_id, limit=1):
        return
    batch.put(AUX, STATE_BASE_PREFIX + context_id, b"1")
    replica.state_base = True
    replica.markers = True  # (its state rows stand for base rows: `_keep_bases`)


def stage_fresh_bases(
    store: AsyncStore,
    replica: Replica,
    batch: WriteBatch,
    entities: Sequence[Entity],
    records: Sequence[bytes],
    *,
    ids: Sequence[bytes],
) -> None:
    """The base rows of records that arrived as state and were new to the replica (not in
    its tree), whose state rows `batch` puts as `records`: their base is that record. Where
    the state rows are the base (`Replica.state_base`) that needs no row, but for a Text or
    Vector (its state row grows a journal: a copy, as folding leaves it) or an entity that
    has a base row still (one deleted from the state). Else each gets a marker (an empty
    row: one copy of each record, not two). `ids`: the records' ids, in their order."""
    if not entities:
        return
    context_id = replica.context_id
    prefix = BASE_PREFIX + context_id
    # (Most batches hold no Text or Vector: found in one pass in C, no loop over them.)
    journals = not JOURNAL_KINDS.isdisjoint(map(_kind_of, entities))
    if not replica.state_base:
        bases: list[bytes] = [b""] * len(ids)
        if journals:
            for i, e in enumerate(entities):
                if e.kind in JOURNAL_KINDS:
                    bases[i] = records[i]
        batch.ops.append(PutRun(AUX.column, prefix, ids, bases))
    else:
        copies = (
            {e.id: r for e, r in zip(entities, records, strict=True) if e.kind in JOURNAL_KINDS}
            if journals
            else {}
        )
        # (One read of the range: none at all in a join.)
        held = store.raw.scan(
            Column.GENERIC, prefix=prefix, start=prefix + min(ids), end=prefix + max(ids) + b"\0"
        )
        if held:
            at = {entity_id: i for i, entity_id in enumerate(ids)}
            for key, value in held:
                i = at.get(key[len(prefix) :], -1)
                if i < 0 or key[len(prefix) :] in copies:
                    continue
                if value and value != NO_BASE:
                    joined = decode_entity(value).join(entities[i])
                    copies[ids[i]] = encode_entity(joined)
                else:
                    copies[ids[i]] = records[i]
        for entity_id in sorted(copies):
            batch.put(AUX, prefix + entity_id, copies[entity_id])
    note_base(replica, entities)


def learn_keys(replica: Replica, batch: WriteBatch, auth: AuthAction) -> None:
    """Open a new key an operation sealed to us; it becomes our write key."""
    if auth.key_id is None or auth.key_id in replica.keys:
        return
    for member, sealed in auth.key_box:
        if member != replica.record.our_member:
            continue
        try:
            key = open_keys(sealed, replica.member_key)[auth.key_id]
        except (ProtocolError, KeyError):
            return
        replica.keys[auth.key_id] = key
        batch.put(IDENTITY, key_slot(replica.context_id, auth.key_id), key)
        replica.record = replace(replica.record, key_id=auth.key_id)
        return


def refresh_record(replica: Replica, *, members: bool = True) -> None:
    """Bring the record's root hash, heads and members up to the replica's.

    `members=False` keeps its application and members as they are: for a change made only
    of data deltas, which cannot change either (building the member list was O(members)
    per delta on every node: 18 % of a 100-member cluster's CPU while it converged)."""
    if not members:
        replica.record = replace(
            replica.record, root_hash=replica.tree.root_hash(), heads=sorted(replica.dag.heads)
        )
        return
    base = replica.record.base_application_id or replica.record.application_id
    current = replica.authority.application() or base
    replica.record = replace(
        replica.record,
        application_id=current,
        base_application_id=None if current == base else base,
        root_hash=replica.tree.root_hash(),
        heads=sorted(replica.dag.heads),
        members=[
            MemberRecord(public_key=m, role=r) for m, r in sorted(replica.authority.roles().items())
        ],
    )


class GroupWrite(WriteBatch):
    """The delta processor's batch (`pipeline.py`): the state rows and the record of a
    replica that only data deltas changed (its root hash and heads; members and app change
    only by operations) are staged once, by `finish`, not once per delta (issue #16: the
    root hash, the rows a kv `set` rewrites every time (its map's) and the record were a
    fifth of a call's CPU). Until then the replica's record is stale and its rows are not
    drained; the processor holds the replica's lock meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.stale: dict[bytes, Replica] = {}

    def finish(self) -> None:
        """Refresh and put the deferred records and rows (after every staged change)."""
        self.finish_records()
        self.finish_rows()

    def finish_records(self) -> None:
        """Refresh and put the deferred records: the root hashes and heads the batch's
        events carry. Their rows wait for `finish_rows` (the delta processor shows received
        deltas in between: `pipeline.py`)."""
        for replica in self.stale.values():
            # Only data deltas changed it here; a delta of this batch that changed members
            # or the app refreshed the whole record when it was staged (`stage_record`).
            refresh_record(replica, members=False)
            self.put(CONTEXTS, replica.context_id, replica.record)

    def finish_rows(self) -> None:
        """Put the deferred state rows (before the batch is written)."""
        for replica in self.stale.values():
            stage_state(replica, self)
        self.stale.clear()


def stage_record(replica: Replica, batch: WriteBatch, *, data_only: bool = False) -> None:
    """Stage the changed state rows and the refreshed record: the end of every change.
    `data_only`: the change holds no operation, so in a `GroupWrite` both wait for its
    `finish`."""
    if data_only and isinstance(batch, GroupWrite):
        batch.stale[replica.context_id] = replica
        return
    stage_state(replica, batch)
    refresh_record(replica)
    batch.put(CONTEXTS, replica.context_id, replica.record)


_STATE_COLUMN: Final = STATE.column
assert isinstance(STATE.keys, BytesCodec)
assert isinstance(STATE.values, BytesCodec)


def stage_state(replica: Replica, batch: WriteBatch) -> None:
    """Write (or delete) the state rows changed since the last drain (a Text keystroke
    writes its delta, not the whole Text: see `trionode/crdt/rows.py`)."""
    stage_rows(replica, batch, replica.tree.drain_rows())


def stage_rows(replica: Replica, batch: WriteBatch, rows: Iterable[Row]) -> None:
    """Put or delete state rows (keys relative to the context). A rebuild stages a whole
    new tree through here too (`StateTree.rows_replacing`)."""
    context_id = replica.context_id
    rows = rows if isinstance(rows, list) else list(rows)
    if replica.store is not None and replica.markers:
        _keep_bases(replica, replica.store, batch, [k for k, _ in rows if len(k) == ID_BYTES])
    # (`Put`s and `Delete`s made here: the table's codecs pass bytes as they are, and
    # calling them was ~25 bytecodes per row of every call, issue #16.)
    ops = batch.ops
    for key, value in rows:
        if value is None:
            ops.append(Delete(_STATE_COLUMN, context_id + key))
        else:
            ops.append(Put(_STATE_COLUMN, context_id + key, value))


def _keep_bases(replica: Replica, store: AsyncStore, batch: WriteBatch, ids: list[bytes]) -> None:
    """Before the state rows of `ids` change, a base that is their state row (a marker, or
    no base row at all in a context whose state rows are its base: see `BASE_PREFIX`)
    becomes a row of its own: the state row's record as stored (before this batch), or
    `NO_BASE` where there was no state row. A base row this batch already puts (a tree
    comparison stages the base first) is left to it."""
    if not ids:
        return
    context_id = replica.context_id
    prefix = BASE_PREFIX + context_id
    bases = store.raw.get_many(Column.GENERIC, [prefix + i for i in ids])
    if replica.state_base:
        marked = [i for i, base in zip(ids, bases, strict=True) if not base]
    else:
        marked = [i for i, base in zip(ids, bases, strict=True) if base == b""]
    if not marked:
        return
    staged = {op.key for op in batch.ops if isinstance(op, Put) and op.column is Column.GENERIC}
    marked = [i for i in marked if prefix + i not in staged]
    states = store.raw.get_many(Column.STATE, [context_id + i for i in marked])
    by_id = dict(zip(ids, bases, strict=True))
    for entity_id, state in zip(marked, states, strict=True):
        if state is not None:
            batch.put(AUX, prefix + entity_id, record_of_row(state))
        elif by_id[entity_id] is None:
            batch.put(AUX, prefix + entity_id, NO_BASE)  # (it appears now: no base)
        else:
            raise StorageError(
                f"a base row of {b58(context_id)} stands for a state row that is gone"
            )
