"""Entity records: canonical round-trips, and decoders that only ever raise
RemoteProtocolError on bad bytes."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings, strategies as st

from trionode.crdt import (
    HEAD,
    Element,
    Entity,
    Kind,
    RegisterState,
    TextState,
    Timestamp,
    decode_entities,
    decode_entity,
    encode_entity,
)
from trionode.crdt.encoding import (
    FORMAT_VERSION,
    MAX_SEQUENCE_ELEMENTS,
    ValueCodec,
    _decode_general,
    _decode_plain,
)
from trionode.errors import RemoteProtocolError

from .crdt_helpers import Replica, perform
from .test_crdt_join_laws import entities

PARENT = bytes(range(32))


@given(entities())
def test_round_trip_is_canonical(entity: Entity) -> None:
    data = encode_entity(entity)
    decoded = decode_entity(data)
    assert decoded == entity
    assert decoded.id == entity.id
    assert encode_entity(decoded) == data


@settings(deadline=None)
@given(st.data())
def test_round_trip_of_real_records(data: st.DataObject) -> None:
    replica = Replica(b"R" * 32)
    for _ in range(data.draw(st.integers(1, 8))):
        with replica.begin() as tx:
            perform(data.draw, tx)
            tx.commit()
    for record in replica.tree.entities():
        blob = encode_entity(record)
        assert encode_entity(decode_entity(blob)) == blob
        assert decode_entity(blob) == record


@given(st.binary(max_size=300))
@example(b"")
@example(b"\xc0")
@example(b"\x97\x01")
@example(b"\xdd\xff\xff\xff\xff")  # array32 claiming 4 G items
def test_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        entity = decode_entity(data)
    except RemoteProtocolError:
        return
    assert encode_entity(entity)  # whatever decodes is a valid, encodable record


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    blob = bytearray(encode_entity(draw(entities())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(blob) - 1))
        action = draw(st.integers(0, 2))
        if action == 0:
            blob[at] = draw(st.integers(0, 255))
        elif action == 1:
            del blob[at]
        else:
            blob.insert(at, draw(st.integers(0, 255)))
    return bytes(blob)


@given(mutated())
def test_mutated_records_only_raise_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_entity(data)


def _record(kind: int, body: object, *, name: bytes = b"k", version: int = FORMAT_VERSION) -> bytes:
    return msgspec.msgpack.encode([version, PARENT, name, kind, None, None, body])


STAMP = [5, b"n"]
N = b"n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_record(Kind.MAP, None, version=2), "version"),
        (_record(99, None), "Kind"),
        (_record(Kind.MAP, [STAMP, b"v"]), "cannot have a body"),
        (_record(Kind.COUNTER, []), "nil"),
        (_record(Kind.COUNTER, [[b"b", STAMP, 1, 0], [b"a", STAMP, 1, 0]]), "sorted"),
        (_record(Kind.COUNTER, [[b"a", STAMP, -1, 0]]), "range"),
        *[
            (_record(Kind.TEXT, [writers, runs]), reason)
            for writers, runs, reason in [
                ([b"", N], [[5, 1, 0, 0, 1, "ab", [], []]], "one value per live element"),
                ([b""], [[0, 0, 0, 0, 1, "a", [], []]], "HEAD"),
                ([b"", N], [[5, 1, 0, 0, 1, "a", [[0, 1, 6, 1]], []]], "one value per live"),
                ([b"", N], [], "nil"),
                ([N, b""], [[5, 0, 0, 1, 1, "a", [], []]], "writers"),
                ([b"", b"m", N], [[5, 2, 0, 0, 1, "a", [], []]], "use"),
                ([b"", N], [[5, 2, 0, 0, 1, "a", [], []]], "index"),
                ([b"", N], [[6, 1, 0, 0, 1, "a", [], []], [5, 1, 0, 0, 1, "b", [], []]], "sorted"),
                ([b"", N], [[5, 1, 0, 0, 0, "", [], []]], "run length"),
                # a few bytes must not expand into a billion tombstones
                ([b"", N], [[5, 1, 0, 0, 10**9, "", [[0, 10**9, 6, 1]], []]], "run length"),
                (
                    [b"", N],
                    [[5, 1, 0, 0, 2, "ab", [], []], [6, 1, 0, 0, 1, "c", [], []]],
                    "overlap",
                ),
                ([b"", N], [[5, 1, 0, 0, 1, "a", [], []], [6, 1, 5, 1, 1, "b", [], []]], "maximal"),
                ([b"", N], [[5, 1, 0, 0, 3, "a", [[1, 2, 7, 1], [0, 1, 7, 1]], []]], "sorted"),
                ([b"", N], [[5, 1, 0, 0, 3, "a", [[1, 3, 7, 1]], []]], "inside the run"),
                ([b"", N], [[5, 1, 0, 0, 3, "a", [[0, 1, 7, 1], [1, 1, 7, 1]], []]], "merged"),
                ([b"", N], [[5, 1, 0, 0, 1, "a", [], [[0, 1, 7, 1]]]], "value stamps"),
                ([b"", N], [[2**64 - 1, 1, 0, 0, 2, "ab", [], []]], "range"),
            ]
        ],
        (
            _record(Kind.VECTOR, [[b"", N], [[5, 1, 0, 0, 1, [], [[0, 1, 7, 1]], [[0, 1, 6, 1]]]]]),
            "value stamp",
        ),
        (_record(Kind.REGISTER, [[-1, b"n"], b"v"]), "range"),
        (_record(Kind.REGISTER, [STAMP, b"v"], name=b"x" * 5000), "name"),
        (
            msgspec.msgpack.encode([FORMAT_VERSION, b"short", b"k", Kind.MAP, None, None, None]),
            "32",
        ),
        (_record(Kind.REGISTER, [STAMP, b"v"]) + b"\x00", "trailing"),
    ],
)
def test_non_canonical_or_invalid_records_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_entity(data)


def test_deeply_nested_garbage_is_a_protocol_error() -> None:
    prefix = msgspec.msgpack.encode([FORMAT_VERSION, PARENT, b"k", Kind.REGISTER, None, None])
    data = b"\x97" + prefix[1:] + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(RemoteProtocolError, match="deeply"):
        decode_entity(data)


def test_size_limit() -> None:
    entity = Entity(
        PARENT, b"k", Kind.REGISTER, body=RegisterState(Timestamp(1, b"n"), b"x" * 2000)
    )
    data = encode_entity(entity)
    assert decode_entity(data) == entity
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_entity(data, max_size=1000)


def test_equal_states_encode_identically_whatever_the_history() -> None:
    a = TextState({Timestamp(1, b"n"): Element(HEAD, "a", None, None)})
    b = TextState({Timestamp(2, b"n"): Element(Timestamp(1, b"n"), "b", None, None)})
    one = Entity(PARENT, b"t", Kind.TEXT, body=a.join(b))
    two = Entity(PARENT, b"t", Kind.TEXT, body=b.join(a))
    assert encode_entity(one) == encode_entity(two)


def test_many_tiny_tombstone_runs_cannot_claim_unbounded_elements() -> None:
    """Each record is a few dozen bytes claiming a long deleted run; a batch of them (one
    delta, one snapshot page) is refused once their elements together exceed the budget."""
    tomb = _record(Kind.TEXT, [[b"", N], [[5, 1, 0, 0, 1000, "", [[0, 1000, 6, 1]], []]]])
    assert len(decode_entity(tomb).body.elements) == 1000  # type: ignore[union-attr]
    assert len(decode_entities([tomb] * 5, max_elements=5000)) == 5
    with pytest.raises(RemoteProtocolError, match="run length"):
        decode_entities([tomb] * 6, max_elements=5000)
    with pytest.raises(RemoteProtocolError, match="run length"):
        decode_entity(tomb, max_elements=999)


@given(st.one_of(entities().map(encode_entity), mutated(), st.binary(max_size=300)))
@example(_record(Kind.MAP, [STAMP, b"v"]))  # a register's body on a kind without one
@example(_record(Kind.COUNTER, [STAMP, b"v"]))  # ... on a counter
@example(_record(Kind.REGISTER, [[-1, b"n"], b"v"]))  # a stamp out of range
@example(_record(Kind.REGISTER, [STAMP, b"v"], version=2))
def test_the_one_pass_decode_takes_exactly_what_the_general_one_takes(data: bytes) -> None:
    """Registers and bodiless records decode in one pass (`_decode_plain`); whatever it
    takes is the record the general decoder gives, and everything else is left to that
    one (which decodes it or refuses it with its own error)."""
    try:
        general: Entity | None = _decode_general(data, MAX_SEQUENCE_ELEMENTS)
    except RemoteProtocolError:
        general = None
    plain = _decode_plain(data)
    if plain is None:
        assert general is None or not (general.kind is Kind.REGISTER or general.body is None)
        return
    assert general is not None
    assert plain == general
    assert plain.id == general.id
    assert encode_entity(plain) == encode_entity(general)


@given(
    data=st.data(),
    declared=st.sampled_from([int, str, bytes, float, bool, list[int], int | None]),
)
def test_a_scalar_value_encodes_as_the_checked_round_trip_does(
    data: st.DataObject, declared: Any
) -> None:
    """A value of exactly a declared scalar type skips the decode check (`ValueCodec`):
    it gives the bytes the checked path gives, and every other value (a bool for an int,
    an int for a float, out-of-range ints, text that is not UTF-8) still goes through
    the check and fails the same way."""
    value = data.draw(
        st.one_of(
            st.integers(-(2**70), 2**70),
            st.text(),
            st.binary(max_size=8),
            st.floats(),
            st.booleans(),
            st.none(),
            st.lists(st.integers(0, 9), max_size=3),
        )
    )
    codec: ValueCodec[Any] = ValueCodec(declared)
    encoder = msgspec.msgpack.Encoder(order="deterministic")
    decoder = msgspec.msgpack.Decoder(declared)
    try:
        expected = encoder.encode(value)
        decoder.decode(expected)
    except (msgspec.DecodeError, TypeError):
        with pytest.raises(TypeError, match="not a valid"):
            codec.encode(value)
        return
    except OverflowError:  # (not a type error: as before the fast path)
        with pytest.raises(OverflowError):
            codec.encode(value)
        return
    assert codec.encode(value) == expected
    # (Compared as encoded: a NaN, which hypothesis draws, is not equal to itself.)
    assert encoder.encode(codec.decode(codec.encode(value))) == encoder.encode(
        decoder.decode(expected)
    )
