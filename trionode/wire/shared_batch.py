"""Deltas gossiped together share what they repeat (`SharedDeltaBatch`, tag "deltas/2").

A batch is what one node committed together, so its deltas mostly have one author and
each names the one before as its parent: in a plain `DeltaBatch` every delta spells out
the author's 32-byte key and its parent's 32-byte id again. Here each delta's wire bytes
are a list of *parts*: literal bytes, or an index that stands for 32 bytes, either one of
the batch's `shared` values (the authors' keys) or the id of an earlier delta of the same
batch, which the receiver computes from that delta's bytes as it would anyway.

Nothing about what is verified changes: the receiver rebuilds each delta's exact wire
bytes and from there on handles them as if they came in a plain batch (decode, id, the
author's signature, membership). A part that refers to nothing, to the delta itself or a
later one, or bytes that grow past the limits make the whole message malformed
(RemoteProtocolError): an honest sender never builds one, and a relay cannot alter it (the
pubsub message is signed by its publisher). The sender uses this form only when it is
smaller, and checks that it rebuilds the bytes it had.

Sans-IO: pure functions over bytes; the caller says how a delta's id is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Final

import msgspec

from trionode.errors import RemoteProtocolError

ID_BYTES: Final = 32
MAX_SHARED: Final = 16
"""Shared values one batch may name (the authors of a batch: usually one)."""
MAX_PARTS: Final = 64
"""Parts of one delta: refs are few (an author, a few parents), so this bounds what a
hostile batch can make a receiver copy to MAX_PARTS x 32 bytes per delta beyond its size."""

Part = bytes | int
Parts = Annotated[list[Part], msgspec.Meta(min_length=1, max_length=MAX_PARTS)]
Shared = Annotated[
    list[Annotated[bytes, msgspec.Meta(min_length=ID_BYTES, max_length=ID_BYTES)]],
    msgspec.Meta(max_length=MAX_SHARED),
]


def pack(
    wires: Sequence[bytes], ids: Sequence[bytes], shared: Sequence[bytes]
) -> tuple[list[bytes], list[list[Part]]]:
    """Each of `wires` (whose ids are `ids`) as parts: every occurrence of a `shared`
    value or of an earlier delta's id becomes an index (shared first, then the deltas in
    order). Returns the shared values used and the parts."""
    table = list(dict.fromkeys(v for v in shared if len(v) == ID_BYTES))[:MAX_SHARED]
    packed: list[list[Part]] = []
    used: set[int] = set()
    for n, wire in enumerate(wires):
        refs = {value: i for i, value in enumerate(table)}
        refs.update({ids[j]: len(table) + j for j in range(n)})
        found: list[tuple[int, int]] = []
        for value, ref in refs.items():
            at = wire.find(value)
            while at >= 0:
                found.append((at, ref))
                at = wire.find(value, at + ID_BYTES)
        parts: list[Part] = []
        start = 0
        for at, ref in sorted(found):
            if at < start or len(parts) >= MAX_PARTS - 2:
                continue  # (overlaps the last ref; or the delta has refs enough)
            if at > start:
                parts.append(wire[start:at])
            parts.append(ref)
            used.add(ref)
            start = at + ID_BYTES
        if start < len(wire) or not parts:
            parts.append(wire[start:])
        packed.append(parts)
    # Drop shared values no delta refers to, renumbering the refs.
    keep = [i for i in range(len(table)) if i in used]
    renumber = {old: new for new, old in enumerate(keep)}
    dropped = len(table) - len(keep)
    final = [
        [p if isinstance(p, bytes) else renumber.get(p, p - dropped) for p in parts]
        for parts in packed
    ]
    return [table[i] for i in keep], final


def unpack(
    shared: Sequence[bytes],
    deltas: Sequence[Sequence[Part]],
    *,
    id_of: Callable[[bytes], bytes],
    max_delta_bytes: int,
) -> list[bytes]:
    """The wire bytes of each delta of a batch (see the module docstring).

    Raises:
        RemoteProtocolError: a ref to nothing, to the delta itself or a later one; a delta
            past `max_delta_bytes`; or `id_of`'s own error for a delta a later one refers to.
    """
    wires: list[bytes] = []
    ids: dict[int, bytes] = {}
    for n, parts in enumerate(deltas):
        out = bytearray()
        for part in parts:
            if isinstance(part, bytes):
                out += part
            elif 0 <= part < len(shared):
                out += shared[part]
            elif len(shared) <= part < len(shared) + n:
                j = part - len(shared)
                if j not in ids:
                    ids[j] = id_of(wires[j])
                out += ids[j]
            else:
                raise RemoteProtocolError(f"delta {n} of a batch refers to part {part}")
            if len(out) > max_delta_bytes:
                raise RemoteProtocolError(f"delta {n} of a batch exceeds {max_delta_bytes} bytes")
        wires.append(bytes(out))
    return wires


def packed_size(shared: Sequence[bytes], deltas: Sequence[Sequence[Part]]) -> int:
    """Bytes the shared values and parts take encoded (to compare with the plain form)."""
    return len(msgspec.msgpack.encode([list(shared), [list(p) for p in deltas]]))
