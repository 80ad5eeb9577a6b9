"""Compact records: inside a format 4 delta body, and as version 3 state rows (issue #16:
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

In a format 5 body an app event's payload may refer to the records as well: apps often
emit what they just wrote (kv_store's `Inserted` carries the key and the 100-byte value its
records hold), so a payload travels as pieces, literal bytes and references to a byte string
of the records (`leaves`: every byte string of at least `MIN_SPAN` bytes in the canonical
record trees, records in body order, depth first):

| ext | data                   | stands for                                            |
|-----|------------------------|-------------------------------------------------------|
| 6   | index, big-endian 1-3 B| that byte string, whole                               |
| 7   | index, big-endian 1-3 B| what it holds: a msgpack str/bin, its header stripped |

A payload with no span worth a reference stays a byte string.

`expand_records` is the decoder: it takes untrusted bytes, rejects unknown references,
references forward, maps, nesting deeper than any record has and expansion past the
budget with RemoteProtocolError, and returns record bytes for `decode_entities` to
validate as it validates any record; `expand_payload` does the same for a payload's pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from trionode.crdt.encoding import FORMAT_VERSION, encode_entity
from trionode.crdt.entity import ROOT_ID, Entity, child_id
from trionode.crdt.register import RegisterState
from trionode.errors import RemoteProtocolError

EXT_AUTHOR: Final = 1
EXT_ROOT: Final = 2
EXT_HLC: Final = 3
EXT_RECORD: Final = 4
EXT_STAMP: Final = 5
EXT_LEAF: Final = 6
EXT_CONTENT: Final = 7
MIN_SPAN: Final = 8
"""Shortest byte string an event payload refers to (a reference costs 3-5 bytes)."""
MAX_SPAN_CANDIDATES: Final = 256
"""Most byte strings of a body the encoder looks for in its payloads (the longest): a
body of many records with many events costs a bounded search, not records times events."""
MAX_PIECES: Final = 4096
"""Most pieces in one payload."""
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
_EXT: Final = msgspec.msgpack.Ext


def _id_of(tree: object) -> bytes | None:
    """The entity id a canonical record tree `[version, parent, name, ...]` is stored
    under, or None if it is not shaped like one."""
    if isinstance(tree, list) and len(tree) >= 3:
        parent, name = tree[1], tree[2]
        if isinstance(parent, bytes) and len(parent) == _REF_BYTES and isinstance(name, bytes):
            return child_id(parent, name)
    return None


# -- encoding (our own records) ------------------------------------------------------------


def compact_records(
    records: Sequence[bytes],
    *,
    author: bytes,
    hlc: int,
    leaves: list[bytes] | None = None,
    ids: Sequence[bytes] | None = None,
) -> list[msgspec.Raw]:
    """The records of a body written by `author` at `hlc`, compacted (see module docstring).
    `leaves`, if given, receives the body's byte strings that payloads may refer to. `ids`:
    the records' ids if the caller holds them (`records` are then `encode_entity` of
    entities whose ids these are: `child_id(parent, name)`, as `_id_of` would hash them;
    a SHA-256 per record saved on every local write)."""
    trees: list[object] = []
    for data in records:
        try:
            trees.append(_GENERIC.decode(data))
        except (msgspec.DecodeError, ValueError, TypeError):  # not msgpack: as it is
            trees.append(None)
    record_ids: Sequence[bytes | None] = (
        ids if ids is not None else [_id_of(tree) for tree in trees]
    )
    parents = [
        tree[1] if isinstance(tree, list) and record_ids[i] is not None else None
        for i, tree in enumerate(trees)
    ]
    order = _parents_first(record_ids, parents)
    index: dict[bytes, int] = {}
    out: list[msgspec.Raw] = []
    for position, i in enumerate(order):
        tree = trees[i]
        if not isinstance(tree, list):  # (travels, and opens, as a byte string: no leaves)
            out.append(msgspec.Raw(_ENCODER.encode(records[i])))
            continue
        refs = _Refs(author, hlc, index, leaves)
        out.append(msgspec.Raw(_ENCODER.encode(refs.compact(tree))))
        record_id = record_ids[i]
        if record_id is not None:
            index.setdefault(record_id, position)
    return out


def compact_entities(
    entities: Sequence[Entity],
    *,
    author: bytes,
    hlc: int,
    leaves: list[bytes] | None = None,
    rows: dict[bytes, SealedRow] | None = None,
) -> list[msgspec.Raw]:
    """`compact_records` of `[encode_entity(e) for e in entities]`, the same bytes, built
    from the records themselves (a local write holds them): no generic decode of their
    encoding and no walk of their fields; only a body other than a register's is walked
    (`_Refs.entity`). A kv `set`'s two records: 1,292 bytecodes a call before (issue #16).

    `rows`, if given, receives the state row (`entity_row`) of each record whose row is
    the tree just made (`sealed_row`): a record added by `author` at `hlc`, as a local
    write's are, whose tree differs from its row's at most by the reference to its parent
    (a state row refers to nothing but its own stamp's writer and time)."""
    ids = [entity.id for entity in entities]
    order: Sequence[int]
    if len(entities) == 2:  # (a kv `set`'s map and entry: `_parents_first` without a walk)
        first, second = ids
        swapped = entities[0].parent == second and (entities[1].parent != first or first == second)
        order = _SWAPPED if swapped else _IN_ORDER
    elif len(entities) < 2:
        order = _IN_ORDER[: len(entities)]
    else:
        order = _parents_first(ids, [entity.parent for entity in entities])
    index: dict[bytes, int] = {}
    refs = _Refs(author, hlc, index, leaves)
    out: list[msgspec.Raw] = []
    stamp = (hlc, author) if rows is not None else ()  # (the stamp a row must have)
    for position, i in enumerate(order):
        entity = entities[i]
        tree = refs.entity(entity)
        out.append(msgspec.Raw(_ENCODER.encode(tree)))
        index.setdefault(ids[i], position)
        if refs.referred:
            refs.referred = 0
        elif entity.added == stamp and rows is not None:
            body = entity.body
            if body is None or body.__class__ is RegisterState:
                parent_ref = tree[1]
                if parent_ref.__class__ is _EXT and parent_ref.code == EXT_RECORD:
                    tree[1] = entity.parent  # (a row refers to no other record)
                rows[ids[i]] = (
                    (entity.kind, entity.added, entity.removed, body),
                    _ENCODER.encode([ROW_VERSION, hlc, author, tree]),
                )
    return out


SealedRow = tuple[tuple[object, ...], bytes]
"""A record's state row made as it was sealed (`compact_entities`): `((kind, added,
removed, body), row)`, the row good for any record of that id holding those values."""


def sealed_row(entity: Entity, sealed: SealedRow | None) -> bytes | None:
    """`sealed`'s row if `entity` still holds what was sealed (None: it changed since)."""
    if sealed is None:
        return None
    held, row = sealed
    if (entity.kind, entity.added, entity.removed, entity.body) == held:
        return row
    return None


_IN_ORDER: Final = (0, 1)
_SWAPPED: Final = (1, 0)
"""`_parents_first` of two records whose first one's parent is the second (and the second
is a root: its parent is not the first, or both are one id)."""


def _parents_first(ids: Sequence[bytes | None], parents: Sequence[object]) -> list[int]:
    """Indexes of the records, each record's parent (if in the body) before it: `ids`
    their ids and `parents` their parents' (None: a record without either)."""
    position = {record_id: i for i, record_id in enumerate(ids) if record_id is not None}
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for i, parent in enumerate(parents):
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
    if len(order) < len(parents):  # unreachable for records (ids hash their parent)
        seen = set(order)
        order += [i for i in range(len(parents)) if i not in seen]
    return order


_AUTHOR_REF: Final = msgspec.msgpack.Ext(EXT_AUTHOR, b"")
_ROOT_REF: Final = msgspec.msgpack.Ext(EXT_ROOT, b"")
_STAMP_REFS: Final = tuple(msgspec.msgpack.Ext(EXT_STAMP, bytes([k])) for k in range(256))
_HLC_REFS: Final = tuple(msgspec.msgpack.Ext(EXT_HLC, bytes([k])) for k in range(256))


class _Refs:
    """One record's references (the encoder's walk; it runs for every record written, so
    the references it can make are shared objects and leaves are collected on the way)."""

    __slots__ = ("_author", "_hlc", "_index", "_leaves", "referred")

    def __init__(
        self,
        author: bytes,
        hlc: int,
        index: dict[bytes, int],
        leaves: list[bytes] | None = None,
    ) -> None:
        self._author = author
        self._hlc = hlc
        self._index = index
        self._leaves = leaves
        """Where the byte strings of the canonical tree go, in the order `_collect_leaves`
        finds them (None: not wanted)."""
        self.referred = 0
        """References to earlier records made, but for a record's parent in `entity` (a
        state row has none: `compact_entities`)."""

    def compact(self, node: object) -> object:
        if type(node) is list:
            if len(node) == 2 and type(node[0]) is int and node[1] == self._author:
                offset = self._hlc - node[0]
                if 0 <= offset <= MAX_HLC_OFFSET:
                    if self._leaves is not None and len(self._author) >= MIN_SPAN:
                        self._leaves.append(self._author)  # (the stamp's writer)
                    return _STAMP_REFS[offset]
            return [self.compact(child) for child in node]
        if type(node) is bytes:
            return self._bytes(node)
        if type(node) is int and node > _SMALL_INT and 0 <= self._hlc - node <= MAX_HLC_OFFSET:
            return _HLC_REFS[self._hlc - node]
        return node

    def _bytes(self, node: bytes) -> object:
        if self._leaves is not None and len(node) >= MIN_SPAN:
            self._leaves.append(node)
        if node == self._author:
            return _AUTHOR_REF
        if node == ROOT_ID:
            return _ROOT_REF
        earlier = self._index.get(node)
        if earlier is not None:
            self.referred += 1
            return _record_ref(earlier)
        return node

    def _stamp(self, time: int, node: bytes) -> object:
        """`compact([time, node])` of a stamp."""
        hlc = self._hlc
        if node == self._author and 0 <= hlc - time <= MAX_HLC_OFFSET:
            if self._leaves is not None and len(node) >= MIN_SPAN:
                self._leaves.append(node)  # (the stamp's writer)
            return _STAMP_REFS[hlc - time]
        if time > _SMALL_INT and 0 <= hlc - time <= MAX_HLC_OFFSET:
            return [_HLC_REFS[hlc - time], self._bytes(node)]
        return [time, self._bytes(node)]

    def entity(self, entity: Entity) -> list[object]:
        """`compact` of the tree `encode_entity(entity)` decodes to, `[version, parent,
        name, kind, added, removed, body]`, built from the record's fields in that order
        (the leaves and references come out as the walk makes them); a body other than a
        register's `[stamp, value]` is encoded and walked."""
        added, removed, body = entity.added, entity.removed, entity.body
        author, hlc, leaves = self._author, self._hlc, self._leaves
        # (`_bytes` of the parent and the name, inline: a write compacts two records)
        parent = entity.parent
        if leaves is not None and len(parent) >= MIN_SPAN:
            leaves.append(parent)
        parent_ref: object = parent
        if parent == author:
            parent_ref = _AUTHOR_REF
        elif parent == ROOT_ID:
            parent_ref = _ROOT_REF
        elif (earlier := self._index.get(parent)) is not None:
            parent_ref = _record_ref(earlier)
        name = entity.name
        if leaves is not None and len(name) >= MIN_SPAN:
            leaves.append(name)
        name_ref: object = name
        if name == author:
            name_ref = _AUTHOR_REF
        elif len(name) == _REF_BYTES:  # (only ids are referred to: the root's, records')
            if name == ROOT_ID:
                name_ref = _ROOT_REF
            elif (earlier := self._index.get(name)) is not None:
                self.referred += 1
                name_ref = _record_ref(earlier)
        if added is None:
            added_ref: object = None
        else:
            # (`_stamp` inline for the stamp most records have: the author's, lately.)
            time, node = added
            if node == author and 0 <= hlc - time <= MAX_HLC_OFFSET:
                if leaves is not None and len(author) >= MIN_SPAN:
                    leaves.append(author)
                added_ref = _STAMP_REFS[hlc - time]
            else:
                added_ref = self._stamp(time, node)
        head: list[object] = [
            FORMAT_VERSION,
            parent_ref,
            name_ref,
            int(entity.kind),  # (small integers stay as they are)
            added_ref,
            None if removed is None else self._stamp(removed.time, removed.node),
        ]
        if body is None:
            head.append(None)
        elif body.__class__ is RegisterState and (value := body.value).__class__ is bytes:
            time, node = body.stamp
            if node == author and 0 <= hlc - time <= MAX_HLC_OFFSET:  # (`_stamp`, inline)
                if leaves is not None and len(author) >= MIN_SPAN:
                    leaves.append(author)
                stamp_ref: object = _STAMP_REFS[hlc - time]
            else:
                stamp_ref = self._stamp(time, node)
            head.append([stamp_ref, self._bytes(value)])
        else:
            head.append(self.compact(_GENERIC.decode(body.canonical())))
        return head


def _index_bytes(index: int) -> bytes:
    return index.to_bytes(max(1, (index.bit_length() + 7) // 8), "big")


def _record_ref(index: int) -> msgspec.msgpack.Ext:
    """The reference to the record at `index` of the body."""
    return _EXT(EXT_RECORD, _ONE_BYTE[index] if index < 256 else _index_bytes(index))


# -- event payloads (format 5) -------------------------------------------------------------


def _collect_leaves(tree: object, out: list[bytes]) -> None:
    """The byte strings of a record tree a payload may refer to, depth first."""
    if isinstance(tree, list):
        for child in tree:
            _collect_leaves(child, out)
    elif isinstance(tree, bytes) and len(tree) >= MIN_SPAN:
        out.append(tree)


def _content(leaf: bytes) -> bytes | None:
    """What a byte string holding one msgpack str or bin holds (None: it holds none)."""
    first = leaf[0] if leaf else 0
    if 0xA0 <= first <= 0xBF:
        size, length = 1, first & 0x1F
    elif first in (0xD9, 0xC4) and len(leaf) >= 2:
        size, length = 2, leaf[1]
    elif first in (0xDA, 0xC5) and len(leaf) >= 3:
        size, length = 3, int.from_bytes(leaf[1:3], "big")
    elif first in (0xDB, 0xC6) and len(leaf) >= 5:
        size, length = 5, int.from_bytes(leaf[1:5], "big")
    else:
        return None
    return leaf[size:] if size + length == len(leaf) else None


Piece = bytes | msgspec.msgpack.Ext


_STRING_FIRST: Final = frozenset([*range(0xA0, 0xC0), 0xD9, 0xC4, 0xDA, 0xC5, 0xDB, 0xC6])
"""The first bytes of a msgpack str or bin (`_content`)."""
_ONE_BYTE: Final = tuple(bytes([i]) for i in range(256))
_STR8: Final = frozenset([0xD9, 0xC4])
"""The first bytes of a msgpack str 8 and bin 8: one length byte follows."""
_MAX_SPANS: Final = MAX_PIECES // 2


class PayloadSpans:
    """Finds the spans of payloads that a body's leaves already hold (the encoder).

    The candidates (`needles`: each leaf, and what a leaf holding a msgpack str/bin holds)
    are found once, longest first (equal lengths in the order the leaves give them), each
    with the reference that stands for it. A payload that is all ASCII (JSON as apps emit
    it: `json.dumps` escapes the rest) cannot hold a candidate with any other byte in it,
    such as a 32-byte id or a msgpack string's header: it is searched for the ASCII ones
    only, the same pieces in a fraction of the searches (a kv `set`: 2 of 7, issue #16).
    (The references are made once and shared, `_LEAF_REFS`: a payload's pieces take them
    as they are, ~1 us of a kv `set`'s ~4.5 us here.)"""

    __slots__ = ("_ascii", "_needles", "_refs")

    def __init__(self, leaves: Sequence[bytes]) -> None:
        """`leaves`: a body's byte strings of at least `MIN_SPAN` bytes, as the encoder
        collects them (`compact_entities`, `compact_records`)."""
        needles: dict[bytes, msgspec.msgpack.Ext] = {}
        string_first = _STRING_FIRST
        leaf_refs, content_refs = _LEAF_REFS, _CONTENT_REFS
        if len(leaves) > _SHARED_REFS:  # (made for the leaves past the shared ones)
            leaf_refs = _refs(EXT_LEAF, len(leaves))
            content_refs = _refs(EXT_CONTENT, len(leaves))
        for index, leaf in enumerate(leaves):
            if leaf in needles:
                continue
            needles[leaf] = leaf_refs[index]
            # (Most leaves are ids, whose first byte seldom starts a str or bin: no call.
            # The strings apps write, up to 255 bytes, are cut here, as `_content` cuts.)
            if leaf[0] in string_first:  # (a leaf is MIN_SPAN bytes or more)
                first = leaf[0]
                if first <= 0xBF:  # (a fixstr: `_content`'s first case)
                    content = leaf[1:] if first - 0xA0 == len(leaf) - 1 else None
                elif first in _STR8 and len(leaf) >= 2:  # (str8, bin8)
                    content = leaf[2:] if leaf[1] == len(leaf) - 2 else None
                else:
                    content = _content(leaf)
                if content is not None and len(content) >= MIN_SPAN:
                    needles.setdefault(content, content_refs[index])
        # (Longest first; a stable sort, so equal lengths stay in the leaves' order. The
        # keys are the needles' bytes: sorted by the builtin `len`, no call of ours each.)
        self._needles = sorted(needles, key=len, reverse=True)[:MAX_SPAN_CANDIDATES]
        self._ascii = list(filter(bytes.isascii, self._needles))
        """The needles that are all ASCII, in the same order."""
        self._refs = needles
        """Each needle's reference."""

    def compact(self, payload: bytes) -> bytes | list[Piece]:
        """`payload` as pieces (longest spans first, never overlapping), or as it is if
        nothing in it is worth a reference."""
        if not self._needles or len(payload) < MIN_SPAN:
            return payload
        needles = self._ascii if payload.isascii() else self._needles
        size = len(payload)
        find = payload.find
        taken: list[tuple[int, int, bytes]] = []
        most = _MAX_SPANS
        for needle in needles:
            length = len(needle)
            if length > size:
                continue
            start = find(needle)
            while start >= 0 and len(taken) < most:
                end = start + length
                for s, e, _ in taken:  # (`all(...)` without a generator per span)
                    if end > s and start < e:
                        start = find(needle, start + 1)
                        break
                else:
                    taken.append((start, end, needle))
                    start = find(needle, end)
        if not taken:
            return payload
        taken.sort()
        refs = self._refs
        pieces: list[Piece] = []
        append = pieces.append
        at = 0
        for start, end, needle in taken:
            if start > at:
                append(payload[at:start])
            append(refs[needle])
            at = end
        if at < size:
            append(payload[at:])
        return pieces


def _refs(code: int, count: int) -> tuple[msgspec.msgpack.Ext, ...]:
    """The references to the first `count` leaves (ext `code`: `EXT_LEAF`, `EXT_CONTENT`)."""
    return tuple(_EXT(code, _ONE_BYTE[i] if i < 256 else _index_bytes(i)) for i in range(count))


_SHARED_REFS: Final = 256
_LEAF_REFS: Final = _refs(EXT_LEAF, _SHARED_REFS)
_CONTENT_REFS: Final = _refs(EXT_CONTENT, _SHARED_REFS)
"""Shared references to the first leaves (an `Ext` is read-only)."""


def expand_payload(pieces: Sequence[Piece], leaves: Sequence[bytes], *, budget: int) -> bytes:
    """A payload from its pieces (untrusted), at most `budget` bytes.

    Raises:
        RemoteProtocolError: an unknown reference, one to a leaf that is not there or holds
            no msgpack str/bin (ext 7), or more than `budget` bytes.
    """
    if len(pieces) > MAX_PIECES:
        raise RemoteProtocolError("event payload of too many pieces")
    out: list[bytes] = []
    size = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            part = piece
        else:
            data = bytes(piece.data)
            if piece.code not in (EXT_LEAF, EXT_CONTENT) or not 1 <= len(data) <= 3:
                raise RemoteProtocolError(f"unknown payload reference {piece.code}")
            index = int.from_bytes(data, "big")
            if index >= len(leaves):
                raise RemoteProtocolError("payload refers to a byte string the body lacks")
            leaf = leaves[index]
            if piece.code == EXT_LEAF:
                part = leaf
            else:
                content = _content(leaf)
                if content is None:
                    raise RemoteProtocolError("payload refers to the content of a non-string")
                part = content
        size += len(part)
        if size > budget:
            raise RemoteProtocolError("event payloads expand beyond the budget")
        out.append(part)
    return b"".join(out)


# -- decoding (untrusted) -----------------------------------------------------------------


def expand_records(
    items: Sequence[bytes],
    *,
    author: bytes,
    hlc: int,
    budget: int = MAX_EXPANSION,
    leaves: list[bytes] | None = None,
) -> list[bytes]:
    """Canonical record bytes from a body's compact items (each one's msgpack bytes).
    `leaves`, if given, receives the byte strings payloads may refer to.

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
    if leaves is not None:
        for tree in trees:
            _collect_leaves(tree, leaves)
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

    def expand(self, node: list[object], depth: int) -> list[object]:
        """The array `node` at `depth`, its references resolved. (Its scalars are taken as
        they are without a call each: a received delta's records are mostly scalars, and a
        call per node was most of expanding them, issue #16. msgspec decodes to exact
        builtin types, so `type(...) is` is `isinstance` here.)"""
        if depth > MAX_DEPTH:
            raise RemoteProtocolError("compact record nested too deeply")
        out: list[object] = []
        for child in node:
            kind = type(child)
            if kind is list:
                out.append(self.expand(child, depth + 1))  # type: ignore[arg-type]
            elif kind is _EXT:
                out.append(self._resolve(child))  # type: ignore[arg-type]
            elif kind is dict:
                raise RemoteProtocolError("a compact record holds no maps")
            else:
                out.append(child)
        return out

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
(`[1, parent, ...]`) and still load. (Versions 2 and 4 are the Text/Vector journal rows',
which live in the same column: `encoding.JOURNAL_VERSION`.)"""
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


def entity_row(entity: Entity) -> bytes:
    """`encode_row(encode_entity(entity), its added stamp)`, the same bytes, from the record
    itself (`_Refs.entity`)."""
    added = entity.added
    if added is None:
        return encode_entity(entity)  # (version 1: nothing to refer to)
    refs = _Refs(added.node, added.time, {})
    return _ENCODER.encode([ROW_VERSION, added.time, added.node, refs.entity(entity)])


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
