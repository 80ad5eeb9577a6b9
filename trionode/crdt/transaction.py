"""Transactions: the only way to mutate state, recording one delta-state per entity.

A `Transaction` is a copy-on-write overlay over a `StateTree`. Each mutation (made through
the typed handles in `handles.py`) builds the *delta-state* of the entities it changes: the
smallest record that, joined anywhere, produces the change (a register's new value, one
counter slot, the inserted or tombstoned elements, a liveness stamp). The delta is joined
into the overlay, so the transaction reads its own writes, and into the pending delta of
that entity. `commit()` joins the pending deltas into the tree and returns them, sorted by
id: exactly what the node ships in a causal delta. `abort()` (or leaving a `with` block
without committing) drops them; the tree never saw anything.

Sequence edits in place (`edit_in_place`): a one-element insert or delete in a top-level
Text or Vector field the tree already holds is joined straight into the tree's record (a
keystroke would otherwise build a pending delta, join it again at commit and pay for both),
with an undo log holding, per touched element id, its version before the transaction
(None: new) and the record's `added`. Only one transaction writes in place at a time, and
nobody else sees it: any other transaction that opens or reads, and every join into the
tree (`apply`, `add_new`, `gc`), first *evicts* it (`evict`): its in-place changes are
undone and carried on as pending deltas, as if they had been staged all along. Undoing
rebuilds the touched record from its elements with the logged versions put back
(O(record), only on abort or eviction): the sequence is a pure function of its element
set, so the rebuilt record is the one the transaction started from
(`tests/crdt/test_in_place.py` aborts random transactions against the naive model). Plain
tree reads (`root_hash`, `entities`) made while it is open see its writes; the node never
makes them then (a call runs to its commit without yielding).

Every write also stamps `added` on every ancestor entry, so a write under a removed key
revives it (the later of add/remove by HLC wins) and a map that holds anything is live.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Self, TypeVar, cast

from trionode.crdt.entity import (
    CONTAINERS,
    MAX_DEPTH,
    MAX_NAME_BYTES,
    ROOT_ID,
    Body,
    Entity,
    Kind,
    child_id,
    trusted,
)
from trionode.crdt.errors import TransactionError
from trionode.crdt.hlc import HybridClock, Timestamp
from trionode.crdt.register import RegisterState
from trionode.crdt.sequence import SequenceState

if TYPE_CHECKING:
    from trionode.crdt.handles import Spec
    from trionode.crdt.sequence import Element
    from trionode.crdt.tree import StateTree

H = TypeVar("H")


class EntityPath:
    """Where an entity sits: its id plus the chain of (name, kind) up to the root.

    Handles carry paths, so a write knows which ancestors to stamp even when none of
    them exists yet.
    """

    __slots__ = ("ancestors", "depth", "id", "kind", "name", "parent")

    def __init__(self, parent: EntityPath | None, name: bytes, kind: Kind) -> None:
        self.parent = parent
        self.name = name
        self.kind = kind
        if parent is None:
            self.id = ROOT_ID
            self.depth = 0
        else:
            if parent.kind not in CONTAINERS:
                raise ValueError(f"a {parent.kind.name} entity cannot have children")
            if parent.depth >= MAX_DEPTH:
                raise ValueError(f"entities cannot nest deeper than {MAX_DEPTH}")
            if len(name) > MAX_NAME_BYTES:  # refuse before a write records anything
                raise ValueError(f"key or field name longer than {MAX_NAME_BYTES} bytes")
            self.id = child_id(parent.id, name)
            self.depth = parent.depth + 1
        self.ancestors: tuple[EntityPath, ...] = (
            () if parent is None or parent.parent is None else (*parent.ancestors, parent)
        )
        """Root-most first, the root and this path excluded. Only ancestors: a path that
        held itself would be a reference cycle, freed only by the cyclic GC (a map entry's
        path is built per access)."""

    def child(self, name: bytes, kind: Kind) -> EntityPath:
        if self.kind not in CONTAINERS or self.depth >= MAX_DEPTH or len(name) > MAX_NAME_BYTES:
            return EntityPath(self, name, kind)  # (raises the error `__init__` names)
        # (`EntityPath(self, name, kind)` without the class call, its checks made above: a
        # map entry's path is built per access)
        path: EntityPath = _new(EntityPath)
        path.parent = self
        path.name = name
        path.kind = kind
        path.id = child_id(self.id, name)
        path.depth = self.depth + 1
        path.ancestors = () if self.parent is None else (*self.ancestors, self)
        return path

    def chain(self) -> list[EntityPath]:
        """Root-most first, the root itself excluded (a new list)."""
        return [*self.ancestors, self] if self.parent is not None else []

    def __repr__(self) -> str:
        return f"EntityPath({self.id.hex()[:12]}, {self.name!r}, {self.kind.name})"


ROOT_PATH = EntityPath(None, b"", Kind.OBJECT)

_FIELD_PATHS: dict[tuple[bytes, Kind], EntityPath] = {}
"""Paths of top-level fields, shared by every transaction: a field's path costs a SHA-256
to build and every call binds one. Paths never change once built."""
_FIELD_PATHS_MAX: Final = 4096
"""Field names come from app schemas, so few; past this many, paths are built per call."""


def field_path(name: bytes, kind: Kind) -> EntityPath:
    """The path of the top-level field `name` (cached, see `_FIELD_PATHS`)."""
    key = (name, kind)
    path = _FIELD_PATHS.get(key)
    if path is None:
        path = ROOT_PATH.child(name, kind)
        if len(_FIELD_PATHS) < _FIELD_PATHS_MAX:
            _FIELD_PATHS[key] = path
    return path


class Resolved(NamedTuple):
    """An entity as a transaction sees it."""

    entity: Entity | None
    """Its record, if any (possibly hidden)."""
    floor: Timestamp | None
    """Latest removal of it or any ancestor: contributions at or below it are hidden."""
    visible: bool
    """Every record on the path exists, has the expected kind and is live."""


_resolved: Final = cast(
    "Callable[[tuple[Entity | None, Timestamp | None, bool]], Resolved]",
    partial(tuple.__new__, Resolved),
)
"""`Resolved` without the NamedTuple's Python-level `__new__` (every handle call)."""

_new: Final = object.__new__
"""An instance of a class without calling the class (`Entity` in `edit_in_place`)."""

_NONE: Final = cast("dict[Any, Any]", MappingProxyType({}))
"""The empty map a transaction's maps start as (`Transaction.__init__`): read-only, so a
write that forgot to give the transaction a dict of its own fails at once."""

_Undo = tuple[bytes, "Timestamp | None", Timestamp, "Element[Any] | None"]
"""(record id, its `added` before, element id, the element's version before): one
in-place write (`Transaction._undo`)."""
_NO_UNDO: Final = cast("list[_Undo]", ())
"""The empty undo log a transaction starts with (read-only, like `_NONE`)."""


class Transaction:
    """A copy-on-write overlay recording delta-states. See the module docstring.

    Create with `StateTree.begin(clock, physical)` or `StateTree.reader()`.
    """

    __slots__ = (
        "_applied",
        "_clock",
        "_closed",
        "_generation",
        "_new_children",
        "_newest",
        "_overlay",
        "_pending",
        "_physical",
        "_records",
        "_sole",
        "_tree",
        "_undo",
    )

    def __init__(self, tree: StateTree, clock: HybridClock | None, physical: int) -> None:
        self._open(tree, clock, physical)

    def _open(self, tree: StateTree, clock: HybridClock | None, physical: int) -> Self:
        """`__init__`'s work, returning self (`StateTree.begin` calls it without calling
        the class)."""
        if tree.in_place is not None:
            tree.in_place.evict()
        self._tree = tree
        self._records = tree.records
        self._clock = clock
        self._physical = physical
        self._generation = tree.generation
        # The maps below start as the shared empty `_NONE` and get a dict of their own at
        # the first write (most transactions are one keystroke: they fill one or two).
        self._overlay: dict[bytes, Entity] = _NONE
        self._pending: dict[bytes, Entity] = _NONE
        self._new_children: dict[bytes, set[bytes]] = _NONE
        self._applied: dict[bytes, Entity] = _NONE
        """Deltas already joined into the tree's records (in place), by entity id, when
        more than one record was written in place (else `_sole`)."""
        self._sole: Entity | None = None
        """The delta joined in place when only one record was (a keystroke: no dict)."""
        self._undo: list[_Undo] = _NO_UNDO
        """Per in-place write, in order: the record's id and `added` before, and the
        touched element's id and version before (None: the transaction created it); the
        first entry of a record or an element is the one an undo puts back."""
        self._newest: Timestamp | None = None
        """The newest stamp in `_applied`."""
        self._closed = False
        if clock is not None:
            newest = tree.max_stamp
            # (`witness`'s own test first, inline: the clock stamped the tree's newest
            # stamp itself after a local commit, so this is the common case)
            if newest is not None and newest[0] > clock.last:
                clock.witness(newest, physical)
        return self

    @property
    def writer(self) -> bytes | None:
        """The node id this transaction stamps writes with (None: read-only)."""
        clock = self._clock
        return None if clock is None else clock.node_id

    @property
    def writable(self) -> bool:
        return self._clock is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closed:
            self.abort()

    # -- reading -------------------------------------------------------------------------

    def field(self, name: str, spec: Spec[H]) -> H:
        """A handle on the top-level field `name`, typed by `spec`."""
        paths = spec.field_paths
        path = paths.get(name)
        if path is None:
            path = field_path(name.encode(), spec.kind)
            if len(paths) < _FIELD_PATHS_MAX:
                paths[name] = path
        return spec.bind(self, path)

    def get(self, entity_id: bytes) -> Entity | None:
        """The record as this transaction sees it (read-only)."""
        if self._closed:
            self._check_open()
        in_place = self._tree.in_place
        if in_place is not None and in_place is not self:
            in_place.evict()
        view = self._overlay.get(entity_id)
        if view is not None:
            return view
        base = self._records.get(entity_id)
        pending = self._pending.get(entity_id)
        if pending is None:
            return base
        # First read after a write: materialise the copy-on-write view now. Deferring it
        # keeps a one-edit call on a large Text from copying the whole sequence.
        view = pending.copy() if base is None else base.copy()
        if base is not None:
            view.merge(pending)
        overlay = self._overlay
        if overlay is _NONE:
            overlay = self._overlay = {}
        overlay[entity_id] = view
        return view

    def children(self, entity_id: bytes) -> list[bytes]:
        """Child ids (hidden ones too), sorted."""
        in_place = self._tree.in_place
        if in_place is not None and in_place is not self:
            in_place.evict()
        base = self._tree.children(entity_id)
        new = self._new_children.get(entity_id)
        return sorted(new.union(base)) if new else list(base)

    def resolve(self, path: EntityPath) -> Resolved:
        floor: Timestamp | None = None
        visible = True
        record: Entity | None = None
        if path.parent is None:  # the root
            return _resolved((None, None, True))
        # (`get`, inline, while the transaction has written nothing and nobody writes in
        # place: the tree's records as they are; a map `set` reads its entry first)
        read: Callable[[bytes], Entity | None]
        if self._pending is _NONE and self._tree.in_place is None and not self._closed:
            read = self._records.get
        else:
            read = self.get
        for node in (*path.ancestors, path):
            record = read(node.id)
            if record is None:
                visible = False
                continue
            removed = record.removed
            if removed is not None and (floor is None or removed > floor):
                floor = removed
            # (`is_live` under the floor before, inline: the floor is now its bar)
            if visible and (
                record.kind != node.kind
                or (added := record.added) is None
                or (floor is not None and not added > floor)
            ):
                visible = False
        return _resolved((record, floor, visible))

    # -- writing -------------------------------------------------------------------------

    def stamp(self) -> Timestamp:
        """A fresh HLC stamp from the transaction's clock."""
        clock = self._clock
        if clock is None or self._closed:
            self._check_writable()
        assert clock is not None  # checked above
        return clock.now(self._physical)

    def witness(self, stamp: Timestamp | None) -> None:
        """Make later stamps exceed `stamp`: for ids a write took without the clock (a
        sequence run continuing its writer's last id)."""
        clock = self._clock
        if clock is None or self._closed:
            self._check_writable()
        assert clock is not None  # checked above
        clock.witness(stamp, self._physical)

    def write(
        self, path: EntityPath, body: Body | None = None, *, stamp: Timestamp | None = None
    ) -> None:
        """Record a write of `body` (a delta-state) at `path`.

        The entity and all its ancestors get `added = stamp`; pass the stamp the body was
        written with, or none to take a fresh one (after the body's own stamps, so that
        `added` bounds everything written under it).
        """
        clock = self._clock
        if clock is None or self._closed:
            self._check_writable()
        assert clock is not None  # checked above
        touch = stamp if stamp is not None else clock.now(self._physical)
        parent = path.parent
        if parent is None:  # (the root: `chain()` is empty)
            return
        if body is None or (body.__class__ is RegisterState and path.kind is Kind.REGISTER):
            # (`trusted` records: a path's ids and name are checked when it is built, and
            # a register body needs no emptiness test: a map `set` builds two per call)
            record = trusted(parent.id, path.name, path.kind, touch, None, body, path.id)
        else:  # (`Entity` checks the body's type and makes an empty one None)
            record = Entity(
                parent.id, path.name, path.kind, added=touch, body=body, known_id=path.id
            )
        for node in path.ancestors:  # root-most first (none for a top-level field)
            above = node.parent
            assert above is not None  # ancestors exclude the root
            self._join(trusted(above.id, node.name, node.kind, touch, None, None, node.id))
        self._join(record)

    def remove(self, path: EntityPath) -> None:
        """Record the removal of the entity at `path` (a tombstone stamped now)."""
        self._check_writable()
        stamp = self.stamp()
        for node in path.chain():
            if node is path:
                self._join(
                    Entity(_parent_id(node), node.name, node.kind, removed=stamp, known_id=node.id)
                )
            else:
                self._join(
                    Entity(_parent_id(node), node.name, node.kind, added=stamp, known_id=node.id)
                )

    def edit_in_place(
        self, path: EntityPath, state_type: type[SequenceState[Any]], pos: int, value: Any
    ) -> bool:
        """`write(path, delta)` of a keystroke: the insert of `value` (None: the delete of
        the element) at visible `pos` of the top-level sequence at `path`, joined straight
        into the tree's record (see the module docstring), with its undo logged. False,
        changing nothing, unless the record is a live top-level record of the path's kind
        holding a `state_type` body, written by no staged delta of this transaction, and no
        other transaction writes in place (a test subclass refuses always, to compare with
        the staged path).

        Raises:
            IndexError: `pos` out of range (nothing changed).
        """
        clock = self._clock
        if self._closed or clock is None or path.ancestors or path.parent is None:
            return False
        eid = path.id
        if self._pending and eid in self._pending:
            return False
        tree = self._tree
        if tree.in_place is not None and tree.in_place is not self:
            return False
        record = self._records.get(eid)
        if record is None or record.kind != path.kind or record.removed is not None:
            return False
        added = record.added
        body = record.body
        if added is None or type(body) is not state_type:
            return False
        assert isinstance(body, SequenceState)  # (`state_type` is one)
        physical = self._physical
        # `newest`: the delta's newest stamp, its element's id or `touch` (its other stamps
        # are a held reference and a tombstone stamped before `touch`).
        if value is None:
            delta, element_id, before = body.delete_in_place(pos, clock.now(physical))
            touch = clock.now(physical)
            newest = element_id if element_id > touch else touch  # noqa: FURB136  # (hot)
        else:
            delta, element_id, run = body.insert_in_place(pos, value, clock, physical)
            before = None
            if run:  # (a run's id and `touch` are both this writer's: their times order them)
                touch = clock.now_after(element_id, physical)  # (unless beyond the drift)
                newest = element_id if element_id[0] > touch[0] else touch
            else:  # (a fresh stamp: `touch` is later)
                touch = newest = clock.now(physical)
        if self._undo:
            self._undo.append((eid, added, element_id, before))
        else:  # (a list per transaction, not per record: most write one element)
            self._undo = [(eid, added, element_id, before)]
        tree.in_place = self
        if touch > added:
            record.added = touch
        if self._newest is None or newest > self._newest:
            self._newest = newest
        entity: Entity = _new(Entity)  # (without `__init__`'s checks: per keystroke)
        entity.parent = ROOT_ID
        entity.name = path.name
        entity.kind = path.kind
        entity.added = touch
        entity.removed = None
        entity.body = delta
        entity.id = eid
        sole = self._sole
        if sole is None and not self._applied:
            self._sole = entity
        elif sole is not None and sole.id == eid:
            sole.merge(entity)
        else:  # (a second record: the general map)
            applied = self._applied = self._in_place_deltas()
            self._sole = None
            held = applied.get(eid)
            if held is None:
                applied[eid] = entity
            else:
                held.merge(entity)
        return True

    def _in_place_deltas(self) -> dict[bytes, Entity]:
        """The deltas joined in place, by entity id (a new dict for a `_sole` one)."""
        sole = self._sole
        return self._applied if sole is None else {sole.id: sole}

    def evict(self) -> None:
        """Undo the in-place writes (see the module docstring), keeping them as pending
        deltas unless the transaction is closing."""
        tree = self._tree
        if tree.in_place is self:
            tree.in_place = None
        records = self._records
        logged: dict[bytes, tuple[Timestamp | None, dict[Timestamp, Element[Any] | None]]] = {}
        for eid, added, element_id, before in self._undo:
            first = logged.get(eid)
            if first is None:
                logged[eid] = (added, {element_id: before})
            else:
                first[1].setdefault(element_id, before)
        for eid, (added, versions) in logged.items():
            record = records[eid]
            state = record.body
            assert isinstance(state, SequenceState)  # (`edit_in_place` checks the type)
            restored = state.restored(versions)
            record.body = None if restored.is_empty() else restored
            record.added = added
            tree.restored(eid)
        self._undo = _NO_UNDO
        self._newest = None
        applied = self._in_place_deltas()
        self._applied = _NONE
        self._sole = None
        if self._closed:
            return
        overlay = self._overlay
        for delta in applied.values():
            if overlay:
                overlay.pop(delta.id, None)  # (built over the record with the writes)
            self._join(delta)

    def _join(self, delta: Entity) -> None:
        """Add `delta` to the entity's pending delta (and to its view, if materialised;
        `get` builds views lazily). The tree itself is untouched until commit."""
        eid = delta.id
        overlay = self._overlay
        if overlay:  # (none until a read after a write: most calls never read so)
            view = overlay.get(eid)
            if view is not None:
                view.merge(delta)
        pending_deltas = self._pending
        if pending_deltas is _NONE:
            pending_deltas = self._pending = {}
        pending = pending_deltas.get(eid)
        if pending is None:
            pending_deltas[eid] = delta
            if eid not in self._records:
                if self._new_children is _NONE:
                    self._new_children = {}
                self._new_children.setdefault(delta.parent, set()).add(eid)
        else:
            pending.merge(delta)

    # -- ending --------------------------------------------------------------------------

    def deltas(self) -> list[Entity]:
        """The pending delta-states, sorted by entity id (read-only)."""
        pending = self._pending
        applied = self._in_place_deltas()
        if applied:
            pending = pending.copy()
            for eid, delta in applied.items():
                staged = pending.get(eid)
                pending[eid] = delta if staged is None else delta.join(staged)
        if len(pending) == 1:
            return list(pending.values())
        return [pending[k] for k in sorted(pending)]

    def commit(self) -> list[Entity]:
        """Join the pending deltas into the tree and return them (sorted by entity id).

        Raises:
            TransactionError: closed already, or another local transaction committed to
                the tree since this one began (its deltas could be stale for counters).
        """
        sole = self._sole
        tree = self._tree
        if sole is not None and not self._pending and tree.generation == self._generation:
            # One record written in place (a keystroke). (`_sole` is set only while the
            # transaction is open, writable and the tree's `in_place`.)
            tree.in_place = None
            self._undo = _NO_UNDO
            self._sole = None
            self._closed = True
            tree.applied_in_place(sole, self._newest)
            return [sole]
        if self._closed:
            self._check_open()
        if self._clock is not None and tree.generation != self._generation:
            self.abort()
            raise TransactionError("another local transaction committed first; retry")
        pending = self._pending
        if sole is None and not self._applied:  # (nothing written in place: a map `set`)
            deltas = (
                list(pending.values())
                if len(pending) == 1
                else [pending[k] for k in sorted(pending)]
            )
            self._closed = True
            if deltas:
                tree.apply(deltas, local=True)
            self._overlay = _NONE
            return deltas
        applied = self._in_place_deltas()
        # The in-place deltas are in the tree already: only its bookkeeping is left
        # (rows, hashes, newest stamp); what was staged besides is joined as usual.
        if tree.in_place is self:
            tree.in_place = None
        self._undo = _NO_UNDO
        self._applied = _NONE
        self._sole = None
        if not pending:  # in place only
            self._closed = True
            for delta in applied.values():
                tree.applied_in_place(delta, self._newest)
            return [applied[k] for k in sorted(applied)]
        staged = list(pending.values())
        for delta in applied.values():
            tree.applied_in_place(delta, self._newest)
        for eid, delta in applied.items():
            extra = pending.get(eid)
            if extra is not None:
                delta.merge(extra)
            pending[eid] = delta
        self._closed = True
        if staged:
            tree.apply(staged)
        self._overlay = _NONE
        return list(pending.values()) if len(pending) == 1 else self.deltas()

    def abort(self) -> None:
        """Drop every change; the tree is left as it was."""
        self._closed = True
        if self._sole is not None or self._applied:
            self.evict()
        self._overlay = _NONE
        self._pending = _NONE
        self._new_children = _NONE

    def _check_open(self) -> None:
        if self._closed:
            raise TransactionError("transaction is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._clock is None:
            raise TransactionError("read-only transaction")


def _parent_id(node: EntityPath) -> bytes:
    assert node.parent is not None  # chain() never yields the root
    return node.parent.id
