"""Compact records: inside a format 4 delta body, and as version 2 state rows (issue #16:
no field twice).

A delta's records are canonical entity records (`trionode.crdt.encode_entity`). Written
as they are, the values a delta repeats cost most of its bytes: every stamp names its
writer by a 32-byte member key (the delta's author, nearly always), every record names its
parent by a 32-byte id (the root, or another record of the same delta), and stamp times
are 9-byte integers within a few ticks of the delta's own HLC.

In a format 4 body each record is a msgpack tree (not a byte string) in which those values
are msgpack ext references:

| ext | data                   | stands for                                            |
|-----|------------------------|-------------------------------------------------------|
| 1   | empty                  | the author's member key (the delta header names it)   |
| 2   | empty                  | the root entity id (32 zero bytes)                    |
| 3   | 1 byte `k`             | the integer `hlc - k` (`hlc`: the header's)           |
| 4   | index, big-endian 1-3 B| the id of an earlier record of this body              |
| 5   | 1 byte `k`             | the stamp `[hlc - k, author]` (most stamps are)       |

Substitution is token for token, so it is lossless whatever a record holds (a user value
that happens to equal the author's key comes back as the same bytes). Records are ordered
parents first so that references point backwards; join is order-independent, so the order
means nothing else. A record that is not a msgpack array travels as a byte string, as is.

`expand_records` is the decoder: it takes untrusted bytes, rejects unknown references,
references forward, maps, nesting deeper than any record has and expansion past the
budget with RemoteProtocolError, and returns record bytes for `decode_entities` to
validate as it validates any record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from trionode.crdt.entity import ROOT_ID, child_id
from trionode.errors import RemoteProtocolError

EXT_AUTHOR: Final = 1
EXT_ROOT: Final = 2
EXT_HLC: Final = 3
EXT_RECORD: Final = 4
EXT_STAMP: Final = 5
MAX_HLC_OFFSET: Final = 255
MAX_DEPTH: Final = 8
"""Deepest nesting in a record (a sequence body's stamp groups are at depth 6)."""
MAX_EXPANSION: Final = 16 * 1024 * 1024
"""Most bytes the records of one body may expand to (8 MiB delta → at most this)."""
_SMALL_INT: Final = 0xFFFF
"""Integers up to here encode in 3 bytes or fewer: no reference makes them shorter."""
_REF_BYTES: Final = 32
_ENCODER: Final = msgspec.msgpack.Encoder()
_GENERIC: Final = msgspec.msgpack.Decoder()


def _id_of(tree: object) -> bytes | None:
    """The entity id a canonical record tree `[version, parent, name, ...]` is stored
    under, or None if it is not shaped like one."""
    if isinstance(tree, list) and len(tree) >= 3:
        parent, name = tree[1], tree[2]
        if isinstance(parent, bytes) and len(parent) == _REF_BYTES and isinstance(name, bytes):
            return child_id(parent, name)
    return None


# -- encoding (our own records) ------------------------------------------------------------


def compact_records(records: Sequence[bytes], *, author: bytes, hlc: int) -> list[msgspec.Raw]:
    """The records of a body written by `author` at `hlc`, compacted (see module docstring)."""
    trees: list[object] = []
    for data in records:
        try:
            trees.append(_GENERIC.decode(data))
        except (msgspec.DecodeError, ValueError, TypeError):  # not msgpack: as it is
            trees.append(None)
    ids = [_id_of(tree) for tree in trees]
    order = _parents_first(ids, trees)
    index: dict[bytes, int] = {}
    out: list[msgspec.Raw] = []
    for position, i in enumerate(order):
        tree = trees[i]
        if not isinstance(tree, list):
            out.append(msgspec.Raw(_ENCODER.encode(records[i])))
            continue
        refs = _Refs(author, hlc, index)
        out.append(msgspec.Raw(_ENCODER.encode(refs.compact(tree))))
        record_id = ids[i]
        if record_id is not None:
            index.setdefault(record_id, position)
    return out


def _parents_first(ids: Sequence[bytes | None], trees: Sequence[object]) -> list[int]:
    """Indexes of the records, each record's parent (if in the body) before it."""
    position = {record_id: i for i, record_id in enumerate(ids) if record_id is not None}
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for i, tree in enumerate(trees):
        parent = tree[1] if isinstance(tree, list) and ids[i] is not None else None
        above = position.get(parent) if isinstance(parent, bytes) else None
        if above is None or above == i:
            roots.append(i)
        else:
            children.setdefault(above, []).append(i)
    order: list[int] = []
    stack = list(reversed(roots))
    while stack:
        i = stack.pop()
        order.append(i)
        stack.extend(reversed(children.get(i, [])))
    if len(order) < len(trees):  # unreachable for records (ids hash their parent)
        seen = set(order)
        order += [i for i in range(len(trees)) if i not in seen]
    return order


class _Refs:
    __slots__ = ("_author", "_hlc", "_index")

    def __init__(self, author: bytes, hlc: int, index: dict[bytes, int]) -> None:
        self._author = author
        self._hlc = hlc
        self._index = index

    def compact(self, node: object) -> object:
        if isinstance(node, list):
            if len(node) == 2 and node[1] == self._author and type(node[0]) is int:
                offset = self._hlc - node[0]
                if 0 <= offset <= MAX_HLC_OFFSET:
                    return msgspec.msgpack.Ext(EXT_STAMP, bytes([offset]))
            return [self.compact(child) for child in node]
        if isinstance(node, bytes):
            if node == self._author:
                return msgspec.msgpack.Ext(EXT_AUTHOR, b"")
            if node == ROOT_ID:
                return msgspec.msgpack.Ext(EXT_ROOT, b"")
            earlier = self._index.get(node)
            if earlier is not None:
                return msgspec.msgpack.Ext(EXT_RECORD, _index_bytes(earlier))
            return node
        if type(node) is int and node > _SMALL_INT and 0 <= self._hlc - node <= MAX_HLC_OFFSET:
            return msgspec.msgpack.Ext(EXT_HLC, bytes([self._hlc - node]))
        return node


def _index_bytes(index: int) -> bytes:
    return index.to_bytes(max(1, (index.bit_length() + 7) // 8), "big")


# -- decoding (untrusted) -----------------------------------------------------------------


def expand_records(
    items: Sequence[bytes], *, author: bytes, hlc: int, budget: int = MAX_EXPANSION
) -> list[bytes]:
    """Canonical record bytes from a body's compact items (each one's msgpack bytes).

    Raises:
        RemoteProtocolError: malformed items, unknown or forward references, nesting
            deeper than `MAX_DEPTH`, or more than `budget` bytes of records.
    """
    out: list[bytes] = []
    ids: list[bytes | None] = []
    trees: list[object] = []
    left = budget
    for data in items:
        try:
            item = _GENERIC.decode(data)
        except (msgspec.DecodeError, RecursionError, ValueError, TypeError) as exc:  # UTF-8, keys
            raise RemoteProtocolError(f"malformed compact record: {exc}") from None
        if isinstance(item, bytes):
            record = item
            tree: object = None
        elif isinstance(item, list):
            expander = _Expander(author, hlc, ids, trees)
            tree = expander.expand(item, 1)
            if len(data) + expander.grown > left:
                raise RemoteProtocolError("compact records expand beyond the budget")
            record = _ENCODER.encode(tree)
        else:
            raise RemoteProtocolError("a compact record is an array or a byte string")
        left -= len(record)
        if left < 0:
            raise RemoteProtocolError("compact records expand beyond the budget")
        out.append(record)
        trees.append(tree)
        ids.append(None)  # computed when a later record refers to it
    return out


class _Expander:
    __slots__ = ("_author", "_hlc", "_ids", "_trees", "grown")

    def __init__(
        self, author: bytes, hlc: int, ids: list[bytes | None], trees: list[object]
    ) -> None:
        self._author = author
        self._hlc = hlc
        self._ids = ids
        self._trees = trees
        self.grown = 0
        """Bytes the references added (each stands for at most 32 bytes more)."""

    def expand(self, node: object, depth: int) -> object:
        if isinstance(node, list):
            if depth > MAX_DEPTH:
                raise RemoteProtocolError("compact record nested too deeply")
            return [self.expand(child, depth + 1) for child in node]
        if isinstance(node, msgspec.msgpack.Ext):
            return self._resolve(node)
        if isinstance(node, dict):
            raise RemoteProtocolError("a compact record holds no maps")
        return node

    def _resolve(self, ext: msgspec.msgpack.Ext) -> object:
        data = bytes(ext.data)
        self.grown += _REF_BYTES + 2
        if ext.code == EXT_AUTHOR and not data:
            return self._author
        if ext.code == EXT_ROOT and not data:
            return ROOT_ID
        if ext.code in (EXT_HLC, EXT_STAMP) and len(data) == 1:
            value = self._hlc - data[0]
            if value < 0:
                raise RemoteProtocolError("compact record time below zero")
            return value if ext.code == EXT_HLC else [value, self._author]
        if ext.code == EXT_RECORD and 1 <= len(data) <= 3:
            index = int.from_bytes(data, "big")
            if index >= len(self._trees):
                raise RemoteProtocolError("compact record refers to a later record")
            record_id = self._ids[index]
            if record_id is None:
                record_id = _id_of(self._trees[index])
                if record_id is None:
                    raise RemoteProtocolError("compact record refers to a record without id")
                self._ids[index] = record_id
            return record_id
        raise RemoteProtocolError(f"unknown compact reference {ext.code} ({len(data)} bytes)")


# -- state rows ---------------------------------------------------------------------------

ROW_VERSION: Final = 3
"""State rows (`rows.py`) of version 3 are `[3, time, writer, record]`: the record as
`encode_entity` gives it, as a tree in which the writer and time of its own `added` stamp
(nearly every stamp in a row) are references. Version 1 rows are `encode_entity` bytes
(`[1, parent, ...]`) and still load. (Version 2 is the Text/Vector journal row's, which
lives in the same column: `encoding.JOURNAL_VERSION`.)"""
_ROW_HEAD: Final = bytes([0x94, ROW_VERSION])  # fixarray of 4, then the version


def encode_row(record: bytes, added: tuple[int, bytes] | None) -> bytes:
    """The version 3 row of `record` (canonical bytes) whose `added` stamp is `added`; a
    record never added stays a version 1 row (nothing to refer to)."""
    if added is None:
        return record
    time, writer = added
    tree = _GENERIC.decode(record)
    refs = _Refs(writer, time, {})
    return _ENCODER.encode([ROW_VERSION, time, writer, refs.compact(tree)])


def record_of_row(data: bytes, *, budget: int = MAX_EXPANSION) -> bytes:
    """The canonical record bytes a state row (either version) holds.

    Raises:
        RemoteProtocolError: a version 3 row that is malformed or expands past `budget`.
    """
    if data[:2] != _ROW_HEAD:
        return data  # version 1: `decode_entity` checks it
    try:
        row = _GENERIC.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError, TypeError) as exc:  # UTF-8, keys
        raise RemoteProtocolError(f"malformed state row: {exc}") from None
    _, time, writer, tree = row
    if type(time) is not int or time < 0 or not isinstance(writer, bytes):
        raise RemoteProtocolError("malformed state row: bad stamp")
    if not isinstance(tree, list):
        raise RemoteProtocolError("malformed state row: no record")
    expander = _Expander(writer, time, [], [])
    record = _ENCODER.encode(expander.expand(tree, 1))
    if len(data) + expander.grown > budget or len(record) > budget:
        raise RemoteProtocolError("state row expands beyond the budget")
    return record
