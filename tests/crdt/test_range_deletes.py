"""Range deletes: a delta that only tombstones held elements is joined in one pass.

`SequenceState.merge` hides such a delta's elements in the order index at once
(`OrderIndex.hide_many`) instead of rebuilding the index as any other large merge does. The
result must be exactly the general join's: the same elements (`join_element` per id), the
same order, the same visible positions and the same hash chunks as a state built from
scratch from those elements. Forged tombstones (another reference, ids not held) take the
general path and give the general result.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from trionode.crdt import (
    HEAD,
    Element,
    HybridClock,
    StateTree,
    TextState,
    Timestamp,
    decode_entity,
    encode_entity,
    text,
    vector,
)
from trionode.crdt.sequence import _BULK_MERGE, join_element

from .crdt_helpers import T0

WRITERS = (b"a" * 8, b"b" * 8, b"c" * 8)
LIST = vector(int)
DOC = text()


def naive_join(
    mine: dict[Timestamp, Element[str]], theirs: dict[Timestamp, Element[str]]
) -> dict[Timestamp, Element[str]]:
    """The join by its definition: `join_element` per id, new ids taken as they are."""
    out = dict(mine)
    for eid, element in theirs.items():
        out[eid] = join_element(eid, out[eid], element) if eid in out else element
    return out


def assert_same_as_rebuilt(state: TextState) -> None:
    """Every cached view equals the one a fresh state computes from the elements alone."""
    fresh = TextState(dict(state.elements))
    assert state.order() == fresh.order()
    assert state.visible_ids() == fresh.visible_ids()
    assert state.visible_len() == fresh.visible_len()
    for k in range(fresh.visible_len()):
        assert state.visible_at(k) == fresh.visible_ids()[k]
    assert state.hash_form(None) == fresh.hash_form(None)
    assert state.wire() == fresh.wire()
    assert state.max_stamp() == fresh.max_stamp()


# (kind, a, b, writer): 0 insert `b % 4 + 1` characters at visible position a (one run of
# a writer's ids); 1 delete `b % 40 + 1` visible characters from a (one tombstone delta);
# 2 deliver an earlier delete again, restamped older or newer (joins on tombstones).
steps = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 1, 1, 2]),
        st.integers(0, 10_000),
        st.integers(0, 10_000),
        st.sampled_from(WRITERS),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(steps=steps)
def test_a_range_delete_joins_like_the_general_join(
    steps: list[tuple[int, int, int, bytes]],
) -> None:
    state = TextState()
    time = 1
    deletes: list[dict[Timestamp, Element[str]]] = []
    for kind, a, b, writer in steps:
        time += 1
        length = state.visible_len()
        if kind == 0:
            fresh = iter([Timestamp(t, writer) for t in range(time, time + 5)])
            delta = state.insert_delta(a % (length + 1), list("xyzw"[: b % 4 + 1]), fresh.__next__)
            time += 5
        elif kind == 1 and length:
            pos = a % length
            delta = state.delete_delta(pos, min(b % 40 + 1, length - pos), Timestamp(time, writer))
            deletes.append(dict(delta.elements))
            # (its newest stamp comes from `delete_delta`, not from reading every stamp)
            assert delta.max_stamp() == TextState(dict(delta.elements)).max_stamp()
        elif kind == 2 and deletes:
            old = deletes[a % len(deletes)]
            stamp = Timestamp(time if b % 2 else 1, writer)
            delta = TextState({e: Element(el.after, None, None, stamp) for e, el in old.items()})
        else:
            continue
        expected = naive_join(dict(state.elements), dict(delta.elements))
        before = state.copy()
        assert state.merge(delta) == (expected != dict(before.elements))
        assert dict(state.elements) == expected
        assert_same_as_rebuilt(state)
        assert_same_as_rebuilt(before)  # a copy shares nothing that the merge changed


def _typed(count: int) -> TextState:
    """`count` characters typed by one writer: one run of consecutive ids."""
    elements: dict[Timestamp, Element[str]] = {}
    after = HEAD
    for k in range(count):
        eid = Timestamp(k + 10, b"w")
        elements[eid] = Element(after, "abcdefg"[k % 7], None, None)
        after = eid
    return TextState(elements)


def test_a_large_range_delete_keeps_the_index_and_the_cached_chunk_digests() -> None:
    state = _typed(5_000)
    digests = state.hash_form(None)
    assert digests is not None
    index = state._ordered()
    delta = state.delete_delta(1_000, 3 * _BULK_MERGE, Timestamp(9_999, b"d"))
    assert state.merge(delta)
    assert state._blocks is index  # hidden in place, not dropped for a rebuild
    after = state.hash_form(None)
    assert after is not None
    # Only the chunks the range touched changed; the ones before and after it are reused.
    assert after[:10] == digests[:10]
    assert after[-50:] == digests[-50:]
    assert_same_as_rebuilt(state)
    assert state.visible_len() == 5_000 - 3 * _BULK_MERGE


def test_forged_tombstones_take_the_general_join() -> None:
    state = _typed(300)
    state.visible_len()  # build the index
    ids = state.visible_ids()
    # Same ids, another reference: the join re-parents (min of the two references).
    forged = {e: Element(HEAD, None, None, Timestamp(5_000, b"x")) for e in ids[100:200]}
    # Ids this state never held: kept as tombstones, never shown.
    unknown = {Timestamp(10**6 + k, b"y"): Element(ids[0], None, None, None) for k in range(3)}
    for delta in (forged, unknown):
        expected = naive_join(dict(state.elements), delta)
        assert state.merge(TextState(delta))
        assert dict(state.elements) == expected
        assert_same_as_rebuilt(state)


def test_vector_range_delete_and_slice_delete_match_a_list() -> None:
    tree = StateTree()
    clock = HybridClock(b"v" * 8)
    model = list(range(50))
    with tree.begin(clock, T0) as tx:
        items = tx.field("items", LIST)
        for value in model:
            items.append(value)
        tx.commit()
    for how, a, b in (("range", 5, 10), ("range", -8, 3), ("slice", 2, 30), ("slice", -5, None)):
        with tree.begin(clock, T0) as tx:
            items = tx.field("items", LIST)
            if how == "range":
                assert b is not None
                items.delete_range(a, b)
                start = a if a >= 0 else a + len(model)
                del model[start : start + b]
            else:
                del items[a:b]
                del model[a:b]
            tx.commit()
        with tree.reader() as tx:
            assert tx.field("items", LIST).to_list() == model
    with tree.begin(clock, T0) as tx:
        items = tx.field("items", LIST)
        with pytest.raises(IndexError):
            items.delete_range(len(model) - 1, 2)  # past the end
        with pytest.raises(IndexError):
            items.delete_range(0, -1)
        with pytest.raises(ValueError, match="contiguous"):
            del items[::2]
        del items[3:3]  # empty: nothing written
        assert tx.deltas() == []


def test_a_shipped_range_delete_gives_the_same_tree_and_root_hash_everywhere() -> None:
    """End to end: a range delete typed on one replica, shipped encoded, joined by another
    replica whose index is warm; both trees, and a tree rebuilt from the encoded records,
    agree on the text and the root hash."""
    writer, reader = StateTree(), StateTree()
    clock = HybridClock(b"w" * 8)
    physical = T0
    with writer.begin(clock, physical) as tx:
        tx.field("doc", DOC).insert(0, "abcdefghij" * 300)
        shipped = tx.commit()
    reader.apply([decode_entity(encode_entity(e)) for e in shipped])
    for tree in (writer, reader):
        tree.root_hash()  # warm every cache: the deletes must keep them right
    for pos, count in ((10, 1_000), (0, 5), (900, 700), (3, 2)):
        physical += 1 << 20
        with writer.begin(clock, physical) as tx:
            tx.field("doc", DOC).delete(pos, count)
            shipped = tx.commit()
        reader.apply([decode_entity(encode_entity(e)) for e in shipped])
        reader.apply([decode_entity(encode_entity(e)) for e in shipped])  # (again: a no-op)
        rebuilt = StateTree()
        rebuilt.apply([decode_entity(encode_entity(e)) for e in writer.entities()])
        texts = set()
        for tree in (writer, reader, rebuilt):
            with tree.reader() as tx:
                texts.add(tx.field("doc", DOC).value())
        assert len(texts) == 1
        assert writer.root_hash() == reader.root_hash() == rebuilt.root_hash()


@pytest.mark.parametrize("staged_in_place", [False, True])
def test_a_range_delete_then_an_insert_in_one_transaction_keeps_the_insert(
    staged_in_place: bool,
) -> None:
    """The transaction's pending delta is the range delete's delta joined with the insert:
    merged into the state it was made from, the range delete's own shortcut (`_origin`)
    once dropped the insert from the tree while the delta shipped it."""
    tree = StateTree()
    clock = HybridClock(WRITERS[0])
    with tree.begin(clock, T0) as tx:
        tx.field("doc", DOC).insert(0, "abc")
        tx.commit()
    with tree.begin(clock, T0 + 1) as tx:
        doc = tx.field("doc", DOC)
        doc.delete(0, 2)
        doc.insert(0, "XY" if not staged_in_place else "X")  # (one character: in place)
        assert doc.value() == ("XYc" if not staged_in_place else "Xc")
        deltas = tx.commit()
    with tree.reader() as tx:
        assert tx.field("doc", DOC).value() == ("XYc" if not staged_in_place else "Xc")
    other = StateTree()
    other.apply([decode_entity(encode_entity(d)) for d in deltas])
    with tree.begin(clock, T0 + 2) as tx:
        first = tx.field("doc", DOC).value()
    with other.reader() as tx:
        assert tx.field("doc", DOC).value() == first[:-1]  # ("c" was in the first delta)
