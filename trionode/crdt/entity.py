"""Entities: the nodes of the state tree, and their join.

Theory of operation
-------------------
A context's state is a tree: the root entity (`ROOT_ID`, implicit, holds no state) → one
entity per top-level field → map/set entries → entries of nested maps, and so on. Every
entity is one record:

    parent   id of the parent entity (32 bytes)
    name     field name (UTF-8) or the canonical encoding of the map/set key
    kind     the CRDT kind (`Kind`); containers (OBJECT, MAP, SET) hold children
    added    latest HLC at which the entity was written (any write in its subtree counts)
    removed  latest HLC at which it was removed (a tombstone, never erased by a write)
    body     the kind's CRDT state (register, counter, sequence) or None (⊥)

`id = SHA-256(domain ‖ parent ‖ name)`: every node derives the same id for the same key,
so concurrent creations of one key meet in one entity, and a record's id is never
transmitted (it cannot lie about its place in the tree).

Liveness is last-writer-wins by HLC: an entity is live iff `added > removed`, so a key
removed on one replica and written later on another is live everywhere. A write to a
descendant also stamps every ancestor's `added`, so a nested write revives a removed key.

Removal resets: everything in a removed entity's subtree that is not newer than the
removal is hidden, not deleted. Each entity is read under a *floor*, the max `removed` of
itself and its ancestors; bodies hide contributions stamped at or below it (see the
register/counter/sequence modules) and children with `added <= floor` are hidden. So
`del m[k]; m[k].increment()` gives 1, not the old count plus one. Keeping the hidden data
(instead of deleting it) is what keeps join a plain, order-independent merge.

Join of two records of one id is component-wise: max `added`, max `removed`, join of the
bodies. Two different kinds for one id only arise from buggy or forged writers; the lower
kind wins whole (a lexicographic join), which keeps join total and deterministic.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum
from typing import Final, NamedTuple

from trionode.crdt.counter import CounterState
from trionode.crdt.hlc import Timestamp, latest
from trionode.crdt.register import RegisterState
from trionode.crdt.sequence import TextState, VectorState

ID_BYTES: Final = 32
ROOT_ID: Final = bytes(ID_BYTES)
"""The root entity. No SHA-256 output is all zeros in practice, so no child collides."""
MAX_NAME_BYTES: Final = 4096
MAX_DEPTH: Final = 32
"""Entities nested deeper than this are never shown or hashed (bounds recursion)."""

ID_DOMAIN: Final = b"trionode/entity-id/v1\x00"


class Kind(IntEnum):
    """CRDT kind of an entity. Values are part of the wire format and of hashes."""

    OBJECT = 1
    """Named fields (the root)."""
    REGISTER = 2
    COUNTER = 3
    MAP = 4
    SET = 5
    MEMBER = 6
    """An element of a SET: presence only."""
    VECTOR = 7
    TEXT = 8


CONTAINERS: Final = frozenset({Kind.OBJECT, Kind.MAP, Kind.SET})

Body = RegisterState | CounterState | TextState | VectorState

_BODY_TYPES: Final[dict[Kind, type[Body] | None]] = {
    Kind.OBJECT: None,
    Kind.REGISTER: RegisterState,
    Kind.COUNTER: CounterState,
    Kind.MAP: None,
    Kind.SET: None,
    Kind.MEMBER: None,
    Kind.VECTOR: VectorState,
    Kind.TEXT: TextState,
}


def child_id(parent: bytes, name: bytes) -> bytes:
    """The id of the child `name` of `parent`. The domain tag is fixed-length and `parent`
    is 32 bytes, so the concatenation is unambiguous."""
    return hashlib.sha256(ID_DOMAIN + parent + name).digest()


def body_type(kind: Kind) -> type[Body] | None:
    """The body class an entity of `kind` carries (None: no body)."""
    return _BODY_TYPES[kind]


class MergeResult(NamedTuple):
    changed: bool
    """The record changed."""
    floor_changed: bool
    """`removed` changed: the floor of the whole subtree moved."""


_RESULTS: Final = (
    (
        MergeResult(changed=False, floor_changed=False),
        MergeResult(changed=False, floor_changed=True),
    ),
    (MergeResult(changed=True, floor_changed=False), MergeResult(changed=True, floor_changed=True)),
)
"""Every `MergeResult`, made once: `merge` runs per record per write."""


class Entity:
    """One entity record (see the module docstring). Mutable so the tree and transactions
    can join in place; treat records you did not create as read-only."""

    __slots__ = ("added", "body", "id", "kind", "name", "parent", "removed")

    def __init__(
        self,
        parent: bytes,
        name: bytes,
        kind: Kind,
        *,
        added: Timestamp | None = None,
        removed: Timestamp | None = None,
        body: Body | None = None,
        known_id: bytes | None = None,
    ) -> None:
        """`known_id`: `child_id(parent, name)` when the caller already holds it (a copy, a
        transaction's path), which saves a SHA-256 per record on every keystroke."""
        if len(parent) != ID_BYTES:
            raise ValueError("parent id must be 32 bytes")
        if len(name) > MAX_NAME_BYTES:
            raise ValueError(f"entity name longer than {MAX_NAME_BYTES} bytes")
        expected = _BODY_TYPES[kind]
        if body is not None and (expected is None or type(body) is not expected):
            raise ValueError(f"{kind.name} entity cannot hold {type(body).__name__}")
        self.parent = bytes(parent)
        self.name = bytes(name)
        self.kind = kind
        self.added = added
        self.removed = removed
        self.body: Body | None = (
            None  # (`_empty`, inline: a record is built per write)
            if body is not None and not isinstance(body, RegisterState) and body.is_empty()
            else body
        )
        self.id = child_id(self.parent, self.name) if known_id is None else known_id

    def copy(self) -> Entity:
        body = self.body
        # (`trusted`'s work inline: a record this class built passed `__init__`'s checks,
        # and a local write copies one into the tree)
        copied: Entity = _new(Entity)
        copied.parent = self.parent
        copied.name = self.name
        copied.kind = self.kind
        copied.added = self.added
        copied.removed = self.removed
        copied.body = body if body is None or isinstance(body, RegisterState) else body.copy()
        copied.id = self.id
        return copied

    def merge(self, other: Entity) -> MergeResult:
        """Join `other` (same id) into self, in place. `other` is never aliased."""
        if other.id != self.id:
            raise ValueError("cannot join records of different entities")
        # `latest`, inline (this runs per record per write): an incoming stamp only moves
        # ours forward.
        added, removed = other.added, other.removed
        floor_changed = removed is not None and (self.removed is None or removed > self.removed)
        if floor_changed:
            self.removed = removed
        changed = floor_changed
        if added is not None and (self.added is None or added > self.added):
            self.added = added
            changed = True
        if other.kind < self.kind:
            self.kind = other.kind
            self.body = other.copy().body
            return _RESULTS[1][1]
        body = other.body
        if other.kind == self.kind and body is not None:
            mine = self.body
            if mine is not None and not isinstance(mine, RegisterState):
                # A sequence or counter joins in place (`_merge_body`, inline: per write).
                changed = mine.merge(body) or changed  # type: ignore[arg-type]  # same kind
            else:
                changed = self._merge_body(body) or changed
        return _RESULTS[changed][floor_changed]

    def join(self, other: Entity) -> Entity:
        result = self.copy()
        result.merge(other)
        return result

    def _merge_body(self, incoming: Body) -> bool:
        mine = self.body
        if mine is None:
            self.body = incoming if isinstance(incoming, RegisterState) else incoming.copy()
            return True
        if isinstance(mine, RegisterState):
            assert isinstance(incoming, RegisterState)
            joined = mine.join(incoming)
            if joined is mine:
                return False
            self.body = joined
            return True
        return mine.merge(incoming)  # type: ignore[arg-type]  # same kind ⇒ same type

    def is_live(self, floor: Timestamp | None = None) -> bool:
        """Written after its last removal and after the enclosing floor."""
        added = self.added
        if added is None:
            return False
        bar = latest(self.removed, floor)
        return bar is None or added > bar

    def max_stamp(self) -> Timestamp | None:
        """The newest stamp anywhere in the record (for clock witnessing/drift checks)."""
        best = self.added  # (`latest(self.added, self.removed)`, inline: per record applied)
        removed = self.removed
        if removed is not None and (best is None or removed > best):
            best = removed
        body = self.body
        if body is not None:
            stamp = body.max_stamp()
            if best is None or (stamp is not None and stamp > best):
                best = stamp
        return best

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entity):
            return NotImplemented
        return (
            self.id == other.id
            and self.kind == other.kind
            and self.added == other.added
            and self.removed == other.removed
            and self.body == other.body
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"Entity({self.id.hex()[:12]}, parent={self.parent.hex()[:12]}, name={self.name!r},"
            f" {self.kind.name}, added={self.added}, removed={self.removed}, body={self.body!r})"
        )


_new: Final = object.__new__


def trusted(  # noqa: PLR0917  # (a record's fields, positionally: built per write)
    parent: bytes,
    name: bytes,
    kind: Kind,
    added: Timestamp | None,
    removed: Timestamp | None,
    body: Body | None,
    entity_id: bytes,
) -> Entity:
    """`Entity(parent, name, kind, added=..., removed=..., body=..., known_id=entity_id)`
    without the class call and its checks, for callers that already hold what they check:
    `parent` and `entity_id` 32-byte ids (`entity_id` the child id), `name` within
    MAX_NAME_BYTES (an `EntityPath`'s), and `body` None, a `RegisterState` of a REGISTER
    or a non-empty body of `kind`'s type. (A transaction builds records per write: the
    class call with keywords costs several times this.)"""
    entity: Entity = _new(Entity)
    entity.parent = parent
    entity.name = name
    entity.kind = kind
    entity.added = added
    entity.removed = removed
    entity.body = body
    entity.id = entity_id
    return entity


def _empty(body: Body) -> bool:
    """⊥ has one representation (None), so canonical bytes stay unique."""
    return not isinstance(body, RegisterState) and body.is_empty()


def max_stamp(entities: list[Entity]) -> Timestamp | None:
    """The newest stamp in a batch of records: feed it to `HybridClock.update` before
    applying remote state, so clock drift is checked and the clock moves past it."""
    best: Timestamp | None = None
    for entity in entities:
        best = latest(best, entity.max_stamp())
    return best
