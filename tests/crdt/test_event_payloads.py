"""Format 5 event payloads that refer to the records' byte strings: lossless round trips,
the kv `set` delta under 450 bytes, and hostile pieces refused with the typed error."""

from __future__ import annotations

import contextlib
import os

import msgspec
import pytest
from hypothesis import example, given, strategies as st

from tests.crdt.test_compact_records import AUTHOR, AUTHOR_KEY, HLC, bodies_of_records
from trionode.crdt import Entity, Kind, RegisterState, Timestamp, encode_entity
from trionode.crdt.compact import (
    EXT_CONTENT,
    EXT_LEAF,
    MAX_PIECES,
    MIN_SPAN,
    PayloadSpans,
    compact_records,
    expand_payload,
)
from trionode.crdt.entity import ROOT_ID
from trionode.dag.delta import (
    AppEvent,
    CompactBody5,
    CompactEvent,
    DeltaBody,
    decode_compact_body,
    decode_delta,
    encode_compact_body,
    open_delta,
    seal_delta,
    verify_delta,
)
from trionode.errors import RemoteProtocolError

CONTEXT = os.urandom(32)
KEY = os.urandom(32)
STAMP = Timestamp(HLC, AUTHOR_KEY)


def _entry(key: bytes, value: bytes) -> list[bytes]:
    """The records of one kv `set`: the map's stamp and the entry (name and value are
    msgpack strings, as the SDK stores them)."""
    items = Entity(ROOT_ID, b"items", Kind.MAP, added=STAMP)
    entry = Entity(
        items.id,
        msgspec.msgpack.encode(key.decode()),
        Kind.REGISTER,
        added=STAMP,
        body=RegisterState(STAMP, msgspec.msgpack.encode(value.decode())),
    )
    return [encode_entity(items), encode_entity(entry)]


def _inserted(key: bytes, value: bytes) -> AppEvent:
    payload = b'{"key":"' + key + b'","value":"' + value + b'"}'
    return AppEvent("Inserted", payload)


def test_a_kv_set_delta_is_at_most_450_bytes() -> None:
    """The event repeats the key and the value the records hold: it refers to them."""
    key, value = b"user:00000001", b"v" * 100
    body = DeltaBody(records=_entry(key, value), events=[_inserted(key, value)])
    sizes = {}
    for version in (4, 5):
        delta = seal_delta(
            context_id=CONTEXT,
            parents=[os.urandom(32)],
            author=AUTHOR,
            hlc=HLC,
            key_id=2**63 + 1,  # (ids are 8 bytes of a hash: nearly always this long)
            context_key=KEY,
            body=body,
            seq=2,
            version=version,
        )
        sizes[version] = len(delta.encode())
        received = decode_delta(delta.encode())
        header = verify_delta(received, context_id=CONTEXT)
        opened = open_delta(received, header, KEY)
        assert opened.events == body.events
        assert sorted(opened.records) == sorted(body.records)
    assert sizes[5] <= 450 < sizes[4]
    assert sizes[4] - sizes[5] >= len(key) + len(value) - 20


def test_payload_pieces_refer_to_whole_leaves_and_to_string_contents() -> None:
    leaf = b"\xc4\x0a" + b"0123456789"  # a msgpack bin holding 10 bytes
    whole = b"ABCDEFGHIJKL"  # not msgpack: only whole
    spans = PayloadSpans([leaf, whole])
    pieces = spans.compact(b"<" + b"0123456789" + b"|" + whole + b"|" + leaf + b">")
    assert isinstance(pieces, list)
    refs = [p for p in pieces if isinstance(p, msgspec.msgpack.Ext)]
    assert [(r.code, r.data) for r in refs] == [
        (EXT_CONTENT, b"\x00"),
        (EXT_LEAF, b"\x01"),
        (EXT_LEAF, b"\x00"),
    ]
    assert expand_payload(pieces, [leaf, whole], budget=1000) == (
        b"<0123456789|" + whole + b"|" + leaf + b">"
    )
    # Nothing worth a reference: the payload stays a byte string.
    assert spans.compact(b"short") == b"short"
    assert spans.compact(b"nothing here matches") == b"nothing here matches"


words = st.binary(min_size=MIN_SPAN, max_size=40)


def _pieces_by_the_rule(leaves: list[bytes], payload: bytes) -> bytes | list[object]:
    """The pieces the wire has always had (format 5), found the slow, plain way: the
    candidates are each leaf and each msgpack str/bin leaf's content (the first leaf that
    gives a byte string names it; a leaf already named is passed over), longest first
    (equal lengths in that order), at most 256; only the ASCII ones for an ASCII payload.
    Each takes, leftmost first, every place it occurs that overlaps nothing taken before,
    up to MAX_PIECES // 2 places in all."""
    named: dict[bytes, tuple[int, int]] = {}
    for index, leaf in enumerate(leaves):
        if leaf in named:
            continue
        named[leaf] = (EXT_LEAF, index)
        content = _string_content(leaf)
        if content is not None and len(content) >= MIN_SPAN:
            named.setdefault(content, (EXT_CONTENT, index))
    needles = sorted(named, key=len, reverse=True)[:256]
    if payload.isascii():
        needles = [n for n in needles if n.isascii()]
    if not needles or len(payload) < MIN_SPAN:
        return payload
    taken: list[tuple[int, int, int, int]] = []
    for needle in needles:
        start = payload.find(needle)
        while start >= 0 and len(taken) < MAX_PIECES // 2:
            end = start + len(needle)
            if any(end > s and start < e for s, e, _, _ in taken):
                start = payload.find(needle, start + 1)
            else:
                taken.append((start, end, *named[needle]))
                start = payload.find(needle, end)
    if not taken:
        return payload
    pieces: list[object] = []
    at = 0
    for start, end, code, index in sorted(taken):
        if start > at:
            pieces.append(payload[at:start])
        pieces.append(ext(code, index.to_bytes(max(1, (index.bit_length() + 7) // 8), "big")))
        at = end
    if at < len(payload):
        pieces.append(payload[at:])
    return pieces


def _string_content(leaf: bytes) -> bytes | None:
    """What a leaf that is one msgpack str or bin holds, by its header (None: it is not
    one): fixstr, str 8/16/32 and bin 8/16/32, whose length is the rest of the leaf."""
    if not leaf:
        return None
    first = leaf[0]
    if 0xA0 <= first <= 0xBF:
        size, length = 1, first - 0xA0
    else:
        width = {0xD9: 1, 0xC4: 1, 0xDA: 2, 0xC5: 2, 0xDB: 4, 0xC6: 4}.get(first)
        if width is None or len(leaf) < 1 + width:
            return None
        size, length = 1 + width, int.from_bytes(leaf[1 : 1 + width], "big")
    return leaf[size:] if size + length == len(leaf) else None


_soup = st.lists(
    st.sampled_from([b"ab", b"a", b"b", b"ba", b"\x00", b"\xa9", b'"', b"\xc4\x08"]), max_size=12
).map(b"".join)
"""Byte strings of a few pieces, so that leaves, their contents and payloads overlap."""


def _wrapped(data: bytes, form: int) -> bytes:
    """`data` as it is (0), or as the whole of a msgpack fixstr/str 8 (1) or bin 8 (2)."""
    if form == 1 and len(data) < 32:
        return bytes([0xA0 + len(data)]) + data
    if form in (1, 2) and len(data) < 256:
        return bytes([0xD9 if form == 1 else 0xC4, len(data)]) + data
    return data


@given(
    st.lists(_soup, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), max_size=8),
    st.lists(st.integers(0, 11) | _soup, max_size=10),
    st.booleans(),
)
# (Two candidates of one length that overlap: the first leaf's wins. And one whose first
# place overlaps a span taken before, and its next place starts a byte later.)
@example(
    pool=[b"QQQQQQQa", b"aaaaaaaa"],
    picks=[(0, 0), (1, 0)],
    parts=[b"QQQQQQQaaaaaaaaa"],
    ascii_=False,
)
@example(
    pool=[b"babababa", b"abababab"], picks=[(0, 0), (1, 0)], parts=[b"ababababa"], ascii_=False
)
def test_payload_pieces_are_those_of_the_rule(
    pool: list[bytes], picks: list[tuple[int, int]], parts: list[int | bytes], ascii_: bool
) -> None:
    """The encoder finds exactly the pieces the rule gives (the wire bytes of every
    format 5 delta depend on it): overlapping and repeated candidates, leaves that are
    another's content, ASCII payloads and others. (Leaves are the encoder's: at least
    MIN_SPAN bytes.)"""
    leaves = [_wrapped(pool[i % len(pool)], form) for i, form in picks]
    leaves = [leaf for leaf in leaves if len(leaf) >= MIN_SPAN]
    taken = pool + leaves
    payload = b"".join(p if isinstance(p, bytes) else taken[p % len(taken)] for p in parts)
    if ascii_:
        payload = payload.decode("latin-1").encode("ascii", "replace")
    expected = _pieces_by_the_rule(leaves, payload)
    got = PayloadSpans(leaves).compact(payload)
    assert msgspec.msgpack.encode(got) == msgspec.msgpack.encode(expected)
    if isinstance(got, list):
        assert expand_payload(got, leaves, budget=1 << 20) == payload


def test_payload_pieces_stop_at_the_most_a_payload_may_have() -> None:
    """Past MAX_PIECES // 2 references the rest of the payload stays literal, as the rule
    says (a payload of the one leaf, again and again, then another leaf)."""
    leaf, other = b"ABCDEFGH", b"abcdefgh"
    payload = leaf * (MAX_PIECES // 2 + 3) + other
    got = PayloadSpans([leaf, other]).compact(payload)
    assert msgspec.msgpack.encode(got) == msgspec.msgpack.encode(
        _pieces_by_the_rule([leaf, other], payload)
    )
    assert isinstance(got, list)
    assert sum(isinstance(p, msgspec.msgpack.Ext) for p in got) == MAX_PIECES // 2


@given(
    st.lists(st.tuples(st.text(min_size=1, max_size=20), st.text(max_size=120)), max_size=4),
    st.lists(st.lists(st.integers(0, 9) | words, max_size=6), max_size=4),
)
def test_format_5_bodies_round_trip(
    entries: list[tuple[str, str]], payloads: list[list[int | bytes]]
) -> None:
    """Payloads made of the records' strings (and of bytes that are not) come back as
    they were."""
    records = [r for k, v in entries for r in _entry(k.encode(), v.encode())]
    strings = [s.encode() for pair in entries for s in pair] or [b""]
    events = [
        AppEvent(
            "E",
            b"".join(p if isinstance(p, bytes) else strings[p % len(strings)] for p in parts),
        )
        for parts in payloads
    ]
    body = DeltaBody(records=records, events=events)
    plain = encode_compact_body(body, author=AUTHOR_KEY, hlc=HLC, version=5)
    opened = decode_compact_body(plain, author=AUTHOR_KEY, hlc=HLC, version=5)
    assert opened.events == events
    assert sorted(opened.records) == sorted(records)


def _byte_strings(tree: object) -> list[bytes]:
    if isinstance(tree, list):
        return [leaf for child in tree for leaf in _byte_strings(child)]
    return [tree] if isinstance(tree, bytes) and len(tree) >= MIN_SPAN else []


@given(bodies_of_records(), st.data())
def test_payloads_made_of_any_records_bytes_round_trip(
    records: list[Entity], data: st.DataObject
) -> None:
    """Whatever the records (every kind, stamps by the author and others, references to
    each other): a payload spliced from their byte strings, and from their contents,
    opens as it was sealed."""
    encoded = [encode_entity(r) for r in records]
    strings = [s for r in encoded for s in _byte_strings(msgspec.msgpack.decode(r))]
    strings += [s[1:] for s in strings] + [b"{", b'"'] + [os.urandom(3)]
    parts = data.draw(st.lists(st.sampled_from(strings), max_size=8))
    events = [AppEvent("E", b"".join(parts)), AppEvent("F", b"".join(reversed(parts)))]
    body = DeltaBody(records=encoded, events=events)
    plain = encode_compact_body(body, author=AUTHOR_KEY, hlc=HLC, version=5)
    opened = decode_compact_body(plain, author=AUTHOR_KEY, hlc=HLC, version=5)
    assert opened.events == events
    assert sorted(opened.records) == sorted(encoded)


# -- hostile ---------------------------------------------------------------------------------

LEAVES = [b"\xa9" + b"012345678", b"ABCDEFGHIJ"]


def ext(code: int, data: bytes) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(code, data)


@pytest.mark.parametrize(
    ("pieces", "match"),
    [
        ([ext(9, b"\x00")], "unknown payload reference 9"),
        ([ext(EXT_LEAF, b"")], "unknown payload reference 6"),
        ([ext(EXT_LEAF, b"\x00\x00\x00\x00")], "unknown payload reference 6"),
        ([ext(EXT_LEAF, b"\x02")], "lacks"),
        ([ext(EXT_CONTENT, b"\x01")], "non-string"),
        ([b"x"] * (MAX_PIECES + 1), "too many pieces"),
        ([ext(EXT_LEAF, b"\x01")] * 11, "budget"),
    ],
)
def test_hostile_pieces_are_refused(pieces: list[bytes | msgspec.msgpack.Ext], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        expand_payload(pieces, LEAVES, budget=100)


def test_references_cannot_expand_a_body_past_its_budget() -> None:
    """4,096 references to a 5,000-byte string would be 20 MB: refused, however small the
    body is on the wire."""
    value = b"v" * 5_000
    leaves: list[bytes] = []
    compacted = compact_records(_entry(b"k", value), author=AUTHOR_KEY, hlc=HLC, leaves=leaves)
    records = [bytes(r) for r in compacted]
    index = leaves.index(msgspec.msgpack.encode(value.decode()))
    content = msgspec.msgpack.Ext(EXT_CONTENT, bytes([index]))
    bomb = CompactBody5(
        [msgspec.Raw(r) for r in records], [CompactEvent("E", [content] * MAX_PIECES)]
    )
    plain = msgspec.msgpack.encode(bomb)
    assert len(plain) < 20_000
    with pytest.raises(RemoteProtocolError, match="budget"):
        decode_compact_body(plain, author=AUTHOR_KEY, hlc=HLC, version=5)
    # One reference is fine and stands for the value.
    one = CompactBody5([msgspec.Raw(r) for r in records], [CompactEvent("E", [content])])
    opened = decode_compact_body(msgspec.msgpack.encode(one), author=AUTHOR_KEY, hlc=HLC)
    assert opened.events == [AppEvent("E", value)]


def test_a_body_that_would_open_past_the_budget_travels_without_references() -> None:
    """An author never seals what receivers refuse: 20 MB of payload made of one 100 KB
    value would be a few KB of references, and more than any receiver opens."""
    value = b"v" * 100_000
    body = DeltaBody(records=_entry(b"k", value), events=[AppEvent("E", value * 200)])
    plain = encode_compact_body(body, author=AUTHOR_KEY, hlc=HLC, version=5)
    assert len(plain) > 200 * len(value)  # as large as it is: refused by the size limit
    assert decode_compact_body(plain, author=AUTHOR_KEY, hlc=HLC).events == body.events
    small = DeltaBody(records=body.records, events=[AppEvent("E", value * 2)])
    assert len(encode_compact_body(small, author=AUTHOR_KEY, hlc=HLC)) < 2 * len(value)


@given(st.binary(max_size=300))
def test_garbage_format_5_bodies_only_raise_the_typed_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_compact_body(data, author=AUTHOR_KEY, hlc=HLC, version=5)


@given(
    st.lists(
        st.binary(max_size=12) | st.builds(ext, st.integers(-128, 127), st.binary(max_size=4)),
        max_size=8,
    )
)
def test_garbage_pieces_only_raise_the_typed_error(
    pieces: list[bytes | msgspec.msgpack.Ext],
) -> None:
    body = CompactBody5([], [CompactEvent("E", pieces)])
    with contextlib.suppress(RemoteProtocolError):
        decode_compact_body(msgspec.msgpack.encode(body), author=AUTHOR_KEY, hlc=HLC, version=5)
