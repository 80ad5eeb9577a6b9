"""Typed handles on replicated collections, and the specs that describe them.

A handle (`LwwRegister[T]`, `Counter`, `UnorderedMap[K, V]`, `UnorderedSet[K]`,
`Vector[T]`, `Text`) is a view of one entity through a `Transaction`: reads see the
transaction's own writes, writes record delta-states in it. Handles hold no state, so they
are cheap to create and stay valid for the transaction's lifetime.

A *spec* says what a field or map value is and binds handles to entities:

    items = tx.field("items", unordered_map(str, register(str)))
    items["k"].set("v")

`spec_for(UnorderedMap[str, LwwRegister[str]])` builds the same spec from an annotation,
which is what an app SDK reading `@app.state` class annotations will use.

Keys and values are stored as canonical msgpack (see `ValueCodec`); map keys become entity
names, so equal keys give equal ids on every node. Map iteration order is by entity id:
deterministic, but unrelated to insertion order (the maps are unordered).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, ClassVar, Final, Generic, TypeVar, cast, get_args, get_origin

from trionode.crdt.counter import CounterState
from trionode.crdt.encoding import ValueCodec
from trionode.crdt.entity import Body, Entity, Kind
from trionode.crdt.hlc import Timestamp
from trionode.crdt.register import RegisterState
from trionode.crdt.sequence import TextState, VectorState
from trionode.crdt.transaction import EntityPath, Transaction

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
H_co = TypeVar("H_co", covariant=True)
_new: Final = object.__new__
_register: Final = cast(
    "Callable[[tuple[Timestamp, bytes]], RegisterState]", partial(tuple.__new__, RegisterState)
)
"""`RegisterState` without the NamedTuple's Python-level `__new__` (per `set`)."""
B = TypeVar("B", bound=Body)
S = TypeVar("S", TextState, VectorState)


# -- specs -----------------------------------------------------------------------------


class Spec(Generic[H_co]):
    """Describes one replicated type and binds handles of it to entities."""

    __slots__ = ("field_paths",)
    kind: ClassVar[Kind]

    def __init__(self) -> None:
        self.field_paths: dict[str, EntityPath] = {}
        """Paths of the top-level fields bound with this spec, by name: what
        `Transaction.field` looks up per call (one lookup of a str, whose hash is cached).
        Filled by it."""

    def bind(self, tx: Transaction, path: EntityPath) -> H_co:
        raise NotImplementedError


class RegisterSpec(Spec["LwwRegister[T]"], Generic[T]):
    __slots__ = ("codec",)
    kind = Kind.REGISTER

    def __init__(self, value_type: type[T] | Any) -> None:
        super().__init__()
        self.codec: ValueCodec[T] = ValueCodec(value_type)

    def bind(self, tx: Transaction, path: EntityPath) -> LwwRegister[T]:
        # (`LwwRegister(tx, path, self.codec)` without the class call: its `__init__`s run
        # in fresh frames, and a handle is bound per field and map entry of every call)
        handle: LwwRegister[T] = _new(LwwRegister)
        handle._tx = tx  # noqa: SLF001
        handle._path = path  # noqa: SLF001
        handle._codec = self.codec  # noqa: SLF001
        return handle


class CounterSpec(Spec["Counter"]):
    __slots__ = ()
    kind = Kind.COUNTER

    def bind(self, tx: Transaction, path: EntityPath) -> Counter:
        handle: Counter = _new(Counter)  # (`Counter(tx, path)`: see `RegisterSpec.bind`)
        handle._tx = tx  # noqa: SLF001
        handle._path = path  # noqa: SLF001
        return handle


class MapSpec(Spec["UnorderedMap[K, V]"], Generic[K, V]):
    __slots__ = ("key", "value")
    kind = Kind.MAP

    def __init__(self, key_type: type[K] | Any, value: Spec[V]) -> None:
        super().__init__()
        self.key: ValueCodec[K] = ValueCodec(key_type)
        self.value = value

    def bind(self, tx: Transaction, path: EntityPath) -> UnorderedMap[K, V]:
        # (`UnorderedMap(tx, path, self.key, self.value)`: see `RegisterSpec.bind`)
        handle: UnorderedMap[K, V] = _new(UnorderedMap)
        handle._tx = tx  # noqa: SLF001
        handle._path = path  # noqa: SLF001
        value = self.value
        handle._entry_kind = value.kind  # noqa: SLF001
        handle._key = self.key  # noqa: SLF001
        handle._value = value  # noqa: SLF001
        return handle


class SetSpec(Spec["UnorderedSet[K]"], Generic[K]):
    __slots__ = ("key",)
    kind = Kind.SET

    def __init__(self, key_type: type[K] | Any) -> None:
        super().__init__()
        self.key: ValueCodec[K] = ValueCodec(key_type)

    def bind(self, tx: Transaction, path: EntityPath) -> UnorderedSet[K]:
        return UnorderedSet(tx, path, self.key)


class VectorSpec(Spec["Vector[T]"], Generic[T]):
    __slots__ = ("codec",)
    kind = Kind.VECTOR

    def __init__(self, value_type: type[T] | Any) -> None:
        super().__init__()
        self.codec: ValueCodec[T] = ValueCodec(value_type)

    def bind(self, tx: Transaction, path: EntityPath) -> Vector[T]:
        handle: Vector[T] = Vector()  # (no `__init__`: see `_Sequence`)
        handle._tx = tx  # noqa: SLF001
        handle._path = path  # noqa: SLF001
        handle._codec = self.codec  # noqa: SLF001
        return handle


class TextSpec(Spec["Text"]):
    __slots__ = ()
    kind = Kind.TEXT

    def bind(self, tx: Transaction, path: EntityPath) -> Text:
        handle: Text = Text()  # (no `__init__`: see `_Sequence`)
        handle._tx = tx  # noqa: SLF001
        handle._path = path  # noqa: SLF001
        return handle


def register(value_type: type[T]) -> RegisterSpec[T]:
    return RegisterSpec(value_type)


def counter() -> CounterSpec:
    return CounterSpec()


def unordered_map(key_type: type[K], value: Spec[V]) -> MapSpec[K, V]:
    return MapSpec(key_type, value)


def unordered_set(key_type: type[K]) -> SetSpec[K]:
    return SetSpec(key_type)


def vector(value_type: type[T]) -> VectorSpec[T]:
    return VectorSpec(value_type)


def text() -> TextSpec:
    return TextSpec()


def spec_for(annotation: object) -> Spec[Any]:
    """The spec for a handle annotation such as `UnorderedMap[str, LwwRegister[str]]`.

    Raises:
        TypeError: not a replicated type (plain values must be wrapped in `LwwRegister`).
    """
    origin = get_origin(annotation) or annotation
    args = get_args(annotation)
    if origin is Counter:
        return CounterSpec()
    if origin is Text:
        return TextSpec()
    if origin is LwwRegister and len(args) == 1:
        return RegisterSpec(args[0])
    if origin is Vector and len(args) == 1:
        return VectorSpec(args[0])
    if origin is UnorderedSet and len(args) == 1:
        return SetSpec(args[0])
    if origin is UnorderedMap and len(args) == 2:
        return MapSpec(args[0], spec_for(args[1]))
    raise TypeError(f"{annotation!r} is not a replicated type (wrap plain values in LwwRegister)")


# -- handles ---------------------------------------------------------------------------


class Handle:
    """Base of all handles: an entity path seen through a transaction."""

    __slots__ = ("_path", "_tx")

    def __init__(self, tx: Transaction, path: EntityPath) -> None:
        self._tx = tx
        self._path = path

    @property
    def entity_id(self) -> bytes:
        return self._path.id

    @property
    def path(self) -> EntityPath:
        return self._path

    def exists(self) -> bool:
        """Written and not removed (for map values: the key is present)."""
        return self._tx.resolve(self._path).visible

    def _read(self, body_type: type[B]) -> tuple[B | None, Timestamp | None]:
        """The body to *show*: nothing unless the entity is visible."""
        found = self._tx.resolve(self._path)
        if not found.visible or found.entity is None:
            return None, found.floor
        body = found.entity.body
        return (body if isinstance(body, body_type) else None), found.floor

    def _current(self, body_type: type[B]) -> tuple[B | None, Timestamp | None]:
        """The body to *build on* when writing: hidden data included, under the floor."""
        found = self._tx.resolve(self._path)
        record = found.entity
        body = record.body if record is not None and record.kind == self._path.kind else None
        return (body if isinstance(body, body_type) else None), found.floor


class LwwRegister(Handle, Generic[T]):
    """A value where the highest (HLC, writer) write wins."""

    __slots__ = ("_codec",)

    def __init__(self, tx: Transaction, path: EntityPath, codec: ValueCodec[T]) -> None:
        super().__init__(tx, path)
        self._codec = codec

    def get(self) -> T | None:
        state, floor = self._read(RegisterState)
        if state is None or not state.visible(floor):
            return None
        return self._codec.decode(state.value)

    def set(self, value: T) -> None:
        stamp = self._tx.stamp()
        self._tx.write(self._path, _register((stamp, self._codec.encode(value))), stamp=stamp)

    @property
    def stamp(self) -> Timestamp | None:
        """Who wrote the current value, when."""
        state, floor = self._read(RegisterState)
        return state.stamp if state is not None and state.visible(floor) else None


class Counter(Handle):
    """A PN-counter: concurrent increments and decrements all count."""

    __slots__ = ()

    def value(self) -> int:
        state, floor = self._read(CounterState)
        return state.value(floor) if state is not None else 0

    def increment(self, by: int = 1) -> None:
        self._add(by, 0)

    def decrement(self, by: int = 1) -> None:
        self._add(0, by)

    def _add(self, inc: int, dec: int) -> None:
        if inc + dec <= 0:
            raise ValueError("increment/decrement by a positive amount")
        stamp = self._tx.stamp()
        state, floor = self._current(CounterState)
        delta = (state or CounterState()).delta(stamp, floor, inc=inc, dec=dec)
        self._tx.write(self._path, delta, stamp=stamp)


class _Container(Handle):
    """Shared by maps and sets: children are entries keyed by canonical key bytes."""

    __slots__ = ("_entry_kind",)

    def __init__(self, tx: Transaction, path: EntityPath, entry_kind: Kind) -> None:
        super().__init__(tx, path)
        self._entry_kind = entry_kind

    def _live_entries(self) -> list[Entity]:
        found = self._tx.resolve(self._path)
        if not found.visible:
            return []
        entries = []
        for cid in self._tx.children(self._path.id):
            record = self._tx.get(cid)
            if (
                record is not None
                and record.kind == self._entry_kind
                and record.is_live(found.floor)
            ):
                entries.append(record)
        return entries

    def _has(self, name: bytes) -> bool:
        return self._tx.resolve(self._path.child(name, self._entry_kind)).visible

    def __len__(self) -> int:
        return len(self._live_entries())

    def __bool__(self) -> bool:
        return bool(self._live_entries())


class UnorderedMap(_Container, Generic[K, V]):
    """Keys to replicated values. Removing a key is a tombstone; the later of a write and
    a removal (by HLC) decides whether the key is present, and a removal resets the value.
    """

    __slots__ = ("_key", "_value")

    def __init__(
        self, tx: Transaction, path: EntityPath, key: ValueCodec[K], value: Spec[V]
    ) -> None:
        super().__init__(tx, path, value.kind)
        self._key = key
        self._value = value

    def __getitem__(self, key: K) -> V:
        """The value handle for `key` (present or not: writing through it adds the key)."""
        return self._value.bind(self._tx, self._entry(key))

    def contains(self, key: K) -> bool:
        return self._has(self._key.encode(key))

    def __contains__(self, key: object) -> bool:
        try:
            return self.contains(key)  # type: ignore[arg-type]
        except TypeError:
            return False  # not even a valid key

    def __iter__(self) -> Iterator[K]:
        return iter(self.keys())

    def keys(self) -> list[K]:
        return [self._key.decode(e.name) for e in self._live_entries()]

    def values(self) -> list[V]:
        return [self._bind(e.name) for e in self._live_entries()]

    def items(self) -> list[tuple[K, V]]:
        return [(self._key.decode(e.name), self._bind(e.name)) for e in self._live_entries()]

    def touch(self, key: K) -> V:
        """Make `key` present (with an empty value if new) and return its handle."""
        path = self._entry(key)
        self._tx.write(path)
        return self._value.bind(self._tx, path)

    def remove(self, key: K) -> bool:
        """Remove `key`; returns whether it was present."""
        path = self._entry(key)
        if not self._tx.resolve(path).visible:
            return False
        self._tx.remove(path)
        return True

    def clear(self) -> int:
        """Remove every present key; returns how many."""
        entries = self._live_entries()
        for entry in entries:
            self._tx.remove(self._path.child(entry.name, self._value.kind))
        return len(entries)

    def _entry(self, key: K) -> EntityPath:
        return self._path.child(self._key.encode(key), self._value.kind)

    def _bind(self, name: bytes) -> V:
        return self._value.bind(self._tx, self._path.child(name, self._value.kind))


class UnorderedSet(_Container, Generic[K]):
    """A set of keys; add/remove are last-writer-wins per key by HLC."""

    __slots__ = ("_key",)

    def __init__(self, tx: Transaction, path: EntityPath, key: ValueCodec[K]) -> None:
        super().__init__(tx, path, Kind.MEMBER)
        self._key = key

    def contains(self, key: K) -> bool:
        return self._has(self._key.encode(key))

    def __contains__(self, key: object) -> bool:
        try:
            return self.contains(key)  # type: ignore[arg-type]
        except TypeError:
            return False

    def __iter__(self) -> Iterator[K]:
        return iter(self.values())

    def values(self) -> list[K]:
        return [self._key.decode(e.name) for e in self._live_entries()]

    def add(self, key: K) -> bool:
        """Add `key`; returns whether it was absent (present keys are not rewritten)."""
        name = self._key.encode(key)
        if self._has(name):
            return False
        self._tx.write(self._path.child(name, Kind.MEMBER))
        return True

    def remove(self, key: K) -> bool:
        """Remove `key`; returns whether it was present."""
        name = self._key.encode(key)
        if not self._has(name):
            return False
        self._tx.remove(self._path.child(name, Kind.MEMBER))
        return True

    def clear(self) -> int:
        entries = self._live_entries()
        for entry in entries:
            self._tx.remove(self._path.child(entry.name, Kind.MEMBER))
        return len(entries)


class _Sequence(Handle, Generic[S]):
    __slots__ = ()
    _state_type: type[S]

    # `object.__init__`, not `Handle`'s: calling the class then runs no Python (a class
    # with a Python `__init__` is called through C and a fresh interpreter frame, and a
    # handle is bound per call). The specs set the slots (`VectorSpec.bind`).
    __init__ = object.__init__

    def _base(self) -> tuple[S, Timestamp | None]:
        """`_current`, inline (once per edit), with an empty state for none."""
        path = self._path
        if path.ancestors:
            found = self._tx.resolve(path)
            record = found.entity
            floor = found.floor
        else:  # a top-level field: its own removal is the whole floor (`resolve`, inline)
            record = self._tx.get(path.id)
            floor = None if record is None else record.removed
        state_type = self._state_type
        if record is not None and record.kind == path.kind:
            body = record.body
            if type(body) is state_type:
                return body, floor
        return state_type(), floor

    def __len__(self) -> int:
        state, floor = self._read(self._state_type)
        return state.visible_len(floor) if state is not None else 0

    def _insert(self, pos: int, values: list[Any]) -> None:
        """Insert `values` before visible `pos`, staged (the caller tried a keystroke in
        place first: `Transaction.edit_in_place`)."""
        tx = self._tx
        state, floor = self._base()
        if floor is None and len(values) == 1:  # a keystroke
            delta, run = state.insert_one(pos, values[0], tx.stamp, tx.writer)
            if run is not None:
                tx.witness(run)  # an id continuing a run is not a fresh clock stamp
        else:
            delta = state.insert_delta(pos, values, tx.stamp, floor, writer=tx.writer)
            tx.witness(delta.max_id())  # ids continuing a run are not fresh clock stamps
        tx.write(self._path, delta)

    def _delete(self, pos: int, count: int) -> None:
        """Delete `count` visible elements from `pos`: one in place if it may (see
        `transaction.py`), else staged."""
        tx = self._tx
        if count == 1 and tx.edit_in_place(self._path, self._state_type, pos, None):
            return
        state, floor = self._base()
        delta = state.delete_delta(pos, count, self._tx.stamp(), floor)
        if not delta.is_empty():
            self._tx.write(self._path, delta)


class Vector(_Sequence[VectorState], Generic[T]):
    """A list (RGA): concurrent inserts all survive in one order; `set` is LWW per item."""

    __slots__ = ("_codec",)
    _state_type = VectorState
    _codec: ValueCodec[T]

    def to_list(self) -> list[T]:
        state, floor = self._read(VectorState)
        if state is None:
            return []
        return [self._codec.decode(v) for v in state.values(floor)]

    def __iter__(self) -> Iterator[T]:
        return iter(self.to_list())

    def __getitem__(self, index: int) -> T:
        state, floor = self._read(VectorState)
        length = state.visible_len(floor) if state is not None else 0
        position = _normalize(index, length)
        if state is None or not 0 <= position < length:
            raise IndexError("vector index out of range")
        element = state.element(state.visible_at(position, floor))
        value = None if element is None else element.value
        assert value is not None  # visible elements hold a value
        return self._codec.decode(value)

    def append(self, value: T) -> None:
        self.insert(len(self), value)

    def insert(self, index: int, value: T) -> None:
        """Insert before `index` (0..len)."""
        data = self._codec.encode(value)
        if not self._tx.edit_in_place(self._path, VectorState, index, data):
            self._insert(index, [data])

    def set(self, index: int, value: T) -> None:
        state, floor = self._base()
        index = _normalize(index, state.visible_len(floor))
        delta = state.set_delta(index, self._codec.encode(value), self._tx.stamp(), floor)
        self._tx.write(self._path, delta)

    def __setitem__(self, index: int, value: T) -> None:
        self.set(index, value)

    def delete(self, index: int) -> None:
        # The length only matters for a negative index (it costs a lookup per delete).
        self._delete(index if index >= 0 else index + len(self), 1)

    def delete_range(self, index: int, count: int) -> None:
        """Delete `count` items from `index` (negative: from the end) in one delta; the
        range must fit. One range delete hides the items without rebuilding the order."""
        if count < 0:
            raise IndexError(f"negative count {count}")
        if index < 0:
            index += len(self)
        self._delete(index, count)

    def __delitem__(self, index: int | slice) -> None:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("only contiguous slices (step 1) can be deleted")
            self._delete(start, max(0, stop - start))
        else:
            self.delete(index)

    def pop(self, index: int = -1) -> T:
        value = self[index]
        self.delete(index)
        return value


class Text(_Sequence[TextState]):
    """Collaborative text: an RGA with one element per character."""

    __slots__ = ()
    _state_type = TextState

    def value(self) -> str:
        state, floor = self._read(TextState)
        return "".join(state.values(floor)) if state is not None else ""

    def __str__(self) -> str:
        return self.value()

    def insert(self, pos: int, content: str) -> None:
        """Insert `content` before character `pos` (0..len)."""
        if len(content) == 1:
            if not self._tx.edit_in_place(self._path, TextState, pos, content):
                self._insert(pos, [content])
        elif content:
            self._insert(pos, list(content))

    def delete(self, pos: int, length: int) -> None:
        """Delete `length` characters starting at `pos`."""
        self._delete(pos, length)


def _normalize(index: int, length: int) -> int:
    """Python-style negative indices; range errors are left to the sequence."""
    return index + length if index < 0 else index


__all__ = [
    "Counter",
    "CounterSpec",
    "Handle",
    "LwwRegister",
    "MapSpec",
    "RegisterSpec",
    "SetSpec",
    "Spec",
    "Text",
    "TextSpec",
    "UnorderedMap",
    "UnorderedSet",
    "Vector",
    "VectorSpec",
    "counter",
    "register",
    "spec_for",
    "text",
    "unordered_map",
    "unordered_set",
    "vector",
]
