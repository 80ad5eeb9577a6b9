"""`SharedDeltaBatch` parts: deltas gossiped together share their authors' keys and the ids
of earlier deltas; the receiver rebuilds exactly the bytes that were packed, and anything
else is a typed error."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given, strategies as st

from trionode.errors import RemoteProtocolError
from trionode.wire.messages import (
    MAX_GOSSIP_DELTAS,
    SharedDeltaBatch,
    decode_gossip,
    encode_gossip,
)
from trionode.wire.shared_batch import MAX_PARTS, MAX_SHARED, pack, packed_size, unpack

CONTEXT = b"\x07" * 32
AUTHOR = bytes(range(32))


def _id(wire: bytes) -> bytes:
    return hashlib.sha256(wire).digest()


def _chain(n: int, body: int = 300) -> list[bytes]:
    """Delta-like wires: each names the author and the id of the one before."""
    wires: list[bytes] = []
    parent = b"\xee" * 32
    for i in range(n):
        wire = b"\x93\xc4" + parent + b"\xc4\x20" + AUTHOR + bytes([i]) * body
        wires.append(wire)
        parent = _id(wire)
    return wires


def _roundtrip(
    wires: list[bytes], shared: list[bytes]
) -> tuple[list[bytes], list[list[bytes | int]]]:
    table, parts = pack(wires, [_id(w) for w in wires], shared)
    assert unpack(table, parts, id_of=_id, max_delta_bytes=1 << 20) == wires
    return table, parts


def test_a_chain_shares_its_author_and_parents() -> None:
    wires = _chain(8)
    table, parts = _roundtrip(wires, [AUTHOR])
    assert table == [AUTHOR]
    # The first delta refers to the author; each later one to the author and its parent.
    assert [sum(isinstance(p, int) for p in d) for d in parts] == [1] + [2] * 7
    plain = len(msgspec.msgpack.encode(wires))
    assert plain - packed_size(table, parts) >= 7 * 2 * 28 + 28 - 34


def test_unused_shared_values_are_dropped() -> None:
    wires = [b"no refs here" * 4, b"nor here"]
    table, parts = _roundtrip(wires, [b"\x01" * 32, b"\x02" * 32])
    assert table == []
    assert parts == [[wires[0]], [wires[1]]]


_WIRES = st.lists(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([AUTHOR, b"\x05" * 32, AUTHOR[:20]]),
            st.integers(min_value=0, max_value=5),  # the id of an earlier delta, if any
        ),
        max_size=12,
    ),
    min_size=1,
    max_size=8,
)


@given(_WIRES)
def test_anything_packed_unpacks_to_the_same_bytes(specs: list[list[bytes | int]]) -> None:
    wires: list[bytes] = []
    for spec in specs:
        wire = b""
        for piece in spec:
            if isinstance(piece, int):
                wire += _id(wires[piece]) if piece < len(wires) else b""
            else:
                wire += piece
        wires.append(wire)
    _roundtrip(wires, [AUTHOR, b"\x05" * 32])


@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4))
def test_many_refs_stay_within_the_part_limit(tails: list[bytes]) -> None:
    wires = [AUTHOR * 100 + tail for tail in tails]
    _, parts = _roundtrip(wires, [AUTHOR])
    assert all(len(p) <= MAX_PARTS for p in parts)


def test_hostile_parts_are_typed_errors() -> None:
    shared = [AUTHOR]
    good: list[bytes | int] = [b"a", 0, b"b"]
    hostile: list[list[list[bytes | int]]] = [
        [[1]],  # refers to a delta that is not before it (itself)
        [good, [3]],  # past the end
        [good, [-1]],
        [[b"x"], [2]],  # a later delta
    ]
    for deltas in hostile:
        with pytest.raises(RemoteProtocolError):
            unpack(shared, deltas, id_of=_id, max_delta_bytes=1024)
    with pytest.raises(RemoteProtocolError):  # refs that grow past the limit
        unpack(shared, [[0] * 40], id_of=_id, max_delta_bytes=1024)
    with pytest.raises(RemoteProtocolError):
        unpack(shared, [[b"x" * 1025]], id_of=_id, max_delta_bytes=1024)

    def refuse(wire: bytes) -> bytes:
        raise RemoteProtocolError("malformed delta")

    with pytest.raises(RemoteProtocolError):  # an earlier delta that has no id
        unpack(shared, [[b"junk"], [b"x", 1]], id_of=refuse, max_delta_bytes=1024)
    # A batch that never refers to an earlier delta does not compute ids at all.
    assert (
        unpack(shared, [good, good], id_of=refuse, max_delta_bytes=1024)
        == [b"a" + AUTHOR + b"b"] * 2
    )


def test_batch_limits_are_enforced_on_decode() -> None:
    encoder = msgspec.msgpack.Encoder()

    def raw(shared: object, deltas: object, **extra: object) -> bytes:
        return encoder.encode(
            {"type": "deltas/2", "context_id": CONTEXT, "shared": shared, "deltas": deltas} | extra
        )

    most = SharedDeltaBatch(
        CONTEXT, [AUTHOR] * MAX_SHARED, [[b"d", 0] * (MAX_PARTS // 2)] * MAX_GOSSIP_DELTAS
    )
    assert decode_gossip(encode_gossip(most)) == most
    for hostile in (
        raw([], []),  # no deltas
        raw([], [[]]),  # a delta of no parts
        raw([], [[b"d"]] * (MAX_GOSSIP_DELTAS + 1)),
        raw([], [[b"d"] * (MAX_PARTS + 1)]),
        raw([AUTHOR] * (MAX_SHARED + 1), [[b"d"]]),
        raw([AUTHOR[:31]], [[b"d"]]),  # a shared value that is not 32 bytes
        raw([], [[1.5]]),
        raw([], [[True]]),
        raw([], [[b"d"]], extra=1),
        encoder.encode(
            {"type": "deltas/2", "context_id": CONTEXT[:5], "shared": [], "deltas": [[b"d"]]}
        ),
    ):
        with pytest.raises(RemoteProtocolError):
            decode_gossip(hostile)
