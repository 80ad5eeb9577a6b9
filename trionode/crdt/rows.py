"""State rows: how a `StateTree` is persisted, writing only what changed.

Every entity is one row `entity_id -> record`: version 3 rows (`compact.py`) hold the
record with its own writer and time said once; version 1 rows (`encode_entity`) still load.
A Text or Vector record holds the whole sequence while a keystroke changes one element,
so rewriting it per keystroke costs O(length). For those kinds the rows are a *base* plus
a *journal*:

    entity_id               -> the record as of the last rewrite
    entity_id ‖ seq (u32)   -> encode_journal(delta-states joined since then)

A journal row (`JOURNAL_VERSION` 4) holds the delta's stamps and body only; its parent,
name and kind are the base row's, and its writer id is said once (in the body's writer
list, which `added` refers to). Rows written before that (version 2: the same without the
reference; version 1: whole records) load alongside new ones.

Reading joins the base and its journal rows. Join is idempotent, commutative and
associative and the record is the join of everything applied to it, so the result is the
record itself, whatever order the rows come back in. Once the journal outweighs the base
(or `JOURNAL_MIN_BYTES`), the next change rewrites the base and deletes the journal: a
keystroke writes its own delta plus an amortised share of one rewrite per doubling, and a
read replays at most about twice the record's size.

GC drops tombstones, which no delta can express, so a collected record is rewritten whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from trionode.crdt.compact import SealedRow, entity_row, record_of_row, sealed_row
from trionode.crdt.encoding import decode_entity, decode_journal, encode_journal
from trionode.crdt.entity import ID_BYTES, Entity, Kind

JOURNAL_KINDS: Final = frozenset({Kind.TEXT, Kind.VECTOR})
JOURNAL_MIN_BYTES: Final = 64 * 1024
"""A journal may grow to this size even when its base is smaller."""
_SEQ_BYTES: Final = 4
_SEQ_LIMIT: Final = 1 << (8 * _SEQ_BYTES)

Row = tuple[bytes, bytes | None]
"""(key, encoded value), or (key, None): delete the row. Keys are relative to a context."""


class _Stored:
    """What the store holds for one journaled entity."""

    __slots__ = ("base", "journal_bytes", "journal_rows")

    def __init__(self, base: int, journal_rows: int = 0, journal_bytes: int = 0) -> None:
        self.base = base
        """Bytes of the base row."""
        self.journal_rows = journal_rows
        """Journal rows, numbered 0..journal_rows-1."""
        self.journal_bytes = journal_bytes


class RowLog:
    """Per-tree bookkeeping of stored rows and of the deltas not yet written."""

    __slots__ = ("_journal", "_rewrite", "sealed", "stored")

    def __init__(self) -> None:
        self.stored: dict[bytes, _Stored] = {}
        """What the store holds, by entity id, for each journaled entity it holds (read-only
        outside this module: `StateTree.applied_in_place` tests it before `applied`)."""
        self._journal: dict[bytes, Entity] = {}
        """Join of the records applied to an existing journaled entity since the last drain."""
        self._rewrite: set[bytes] = set()
        """Changed in a way no delta expresses (GC): write the base whole."""
        self.sealed: dict[bytes, SealedRow] = {}
        """Rows a local write made as it sealed its records (`compact_entities`), by id:
        the next drain writes a record's as it is if the record still holds what was
        sealed (a kv `set`'s two rows: no second walk of its records, issue #16)."""

    def applied(self, record: Entity, incoming: Entity) -> None:
        """`incoming` was just joined into the existing `record` and changed it."""
        if record.id not in self.stored or record.kind not in JOURNAL_KINDS:
            return  # no base row to journal against (or never persisted): written whole
        pending = self._journal.get(record.id)
        if pending is None:
            self._journal[record.id] = incoming.copy()
        else:
            pending.merge(incoming)

    def rewrite(self, entity_id: bytes) -> None:
        """The record changed in a way no delta expresses (GC, dropped, created anew)."""
        if entity_id in self.stored:
            self._journal.pop(entity_id, None)
            self._rewrite.add(entity_id)

    def forget_pending(self) -> None:
        """Changes were drained without writing rows (only right after loading)."""
        self._journal.clear()
        self.sealed.clear()

    def rows(
        self,
        updated: Iterable[bytes],
        deleted: Iterable[bytes],
        record: Callable[[bytes], Entity | None],
    ) -> list[Row]:
        """The rows to write for the drained changes, and forget the pending deltas."""
        out: list[Row] = []
        stored_rows, journal, rewrite = self.stored, self._journal, self._rewrite
        sealed = self.sealed
        for eid in sorted(updated):
            entity = record(eid)
            if entity is None:
                continue
            stored = stored_rows.get(eid)
            if stored is not None:  # (a journaled record: its delta, or its base anew)
                delta = journal.get(eid)
                if (
                    delta is not None
                    and eid not in rewrite
                    and stored.journal_rows + 1 < _SEQ_LIMIT
                ):
                    data = encode_journal(delta)
                    if stored.journal_bytes + len(data) <= max(stored.base, JOURNAL_MIN_BYTES):
                        out.append((_journal_key(eid, stored.journal_rows), data))
                        stored.journal_rows += 1
                        stored.journal_bytes += len(data)
                        continue
            # (No journal to write or drop: a row made as the record was sealed, if it still
            # holds what was sealed; else `_row`, inline: per changed record.)
            made = sealed_row(entity, sealed.get(eid)) if sealed and stored is None else None
            data = entity_row(entity) if made is None else made
            out.append((eid, data))
            if rewrite:
                rewrite.discard(eid)
            if stored is not None:
                self._drop_journal(eid, out)
            if entity.kind in JOURNAL_KINDS:
                stored_rows[eid] = _Stored(len(data))
        for eid in sorted(deleted):
            out.append((eid, None))
            self._rewrite.discard(eid)
            self._drop_journal(eid, out)
        self._journal.clear()
        sealed.clear()
        return out

    def replacing(
        self, old: RowLog, records: Iterable[Entity], old_ids: Iterable[bytes]
    ) -> list[Row]:
        """Rows that replace everything `old` stored (records `old_ids`, and their journal
        rows) with `records` written whole; this log then knows those bases."""
        out: list[Row] = []
        written: set[bytes] = set()
        self.stored.clear()
        for entity in records:
            data = _row(entity)
            out.append((entity.id, data))
            written.add(entity.id)
            if entity.kind in JOURNAL_KINDS:
                self.stored[entity.id] = _Stored(len(data))
        out.extend((eid, None) for eid in sorted(set(old_ids) - written))
        for eid in sorted(old.stored):
            old._drop_journal(eid, out)
        self._journal.clear()
        self._rewrite.clear()
        self.sealed.clear()
        return out

    def _drop_journal(self, eid: bytes, out: list[Row]) -> None:
        stored = self.stored.pop(eid, None)
        if stored is not None:
            out.extend((_journal_key(eid, seq), None) for seq in range(stored.journal_rows))

    @classmethod
    def load(cls, rows: Iterable[tuple[bytes, bytes]]) -> tuple[list[Entity], RowLog]:
        """Records from stored rows (keys relative to the context), and the log that knows
        which journal rows exist.

        Raises:
            RemoteProtocolError: a row that does not decode.
            ValueError: a key that is neither an entity id nor a journal key.
        """
        loading = RowLoad()
        loading.feed(rows)
        return loading.finish()


class RowLoad:
    """`RowLog.load` a read at a time: `feed` each read's rows (decoded as they come, so a
    caller holds one read's bytes, never the whole state's), then `finish`."""

    __slots__ = ("_bases", "_journals", "_log")

    def __init__(self) -> None:
        self._log = RowLog()
        self._bases: dict[bytes, Entity] = {}
        self._journals: dict[bytes, list[bytes]] = {}

    def feed(self, rows: Iterable[tuple[bytes, bytes]]) -> None:
        """Decode stored rows (see `RowLog.load`, which raises what this raises)."""
        bases, journals = self._bases, self._journals
        stored_rows = self._log.stored  # (this module's log: filled as read)
        for key, value in rows:
            if len(key) == ID_BYTES:
                entity = _decode(key, value)
                bases[key] = entity
                if entity.kind in JOURNAL_KINDS:
                    stored_rows.setdefault(key, _Stored(0)).base = len(value)
            elif len(key) == ID_BYTES + _SEQ_BYTES:
                eid = key[:ID_BYTES]
                journals.setdefault(eid, []).append(value)
                stored = stored_rows.setdefault(eid, _Stored(0))
                seq = int.from_bytes(key[ID_BYTES:], "big")
                stored.journal_rows = max(stored.journal_rows, seq + 1)
                stored.journal_bytes += len(value)
            else:
                raise ValueError(f"state row key of {len(key)} bytes")

    def finish(self) -> tuple[list[Entity], RowLog]:
        """The records of every row fed (journals joined into their bases), and the log."""
        log, bases = self._log, self._bases
        for eid, values in self._journals.items():
            base = bases.get(eid)
            if base is None:  # rows change in one batch, so only damage leaves this
                base = bases[eid] = _decode(eid, values[0])  # (a version 1 row stands alone)
                log._rewrite.add(eid)  # noqa: SLF001 (write the base whole on its next change)
            for value in values:
                base.merge(decode_journal(value, base))
        return list(bases.values()), log


def _row(entity: Entity) -> bytes:
    """A base row (version 3: see `compact.py`)."""
    return entity_row(entity)


def _decode(entity_id: bytes, value: bytes) -> Entity:
    entity = decode_entity(record_of_row(value))
    if entity.id != entity_id:
        raise ValueError("state row holds another entity's record")
    return entity


def _journal_key(entity_id: bytes, seq: int) -> bytes:
    return entity_id + seq.to_bytes(_SEQ_BYTES, "big")
