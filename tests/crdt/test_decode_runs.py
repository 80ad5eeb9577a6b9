"""Decoding builds a Text/Vector item by item from its wire runs (`SequenceState.from_runs`
via `encoding._runs`), never through a dict of elements. The decoded state must be the
state that was encoded, as the per-element model sees it: the same elements, order, values,
wire and hash form (`assert_same`), for concurrent histories with deletes, overwrites and
runs longer than one item, and for forged element sets (cycles, missing references). Runs
that break the canonical shape still get typed errors (`test_crdt_encoding.py` covers each
rule; here: overlapping and non-maximal runs, which are now checked run by run)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trionode.crdt import ROOT_ID, Element, Entity, Kind, TextState, Timestamp, VectorState
from trionode.crdt.canonical import canonical
from trionode.crdt.encoding import decode_entity, encode_entity
from trionode.crdt.sequence import ITEM_MAX
from trionode.errors import RemoteProtocolError

from . import sequence_model as model
from .test_run_items import History, assert_same, forged, steps


def _round_trip(state: Any) -> Any:
    kind = Kind.TEXT if isinstance(state, TextState) else Kind.VECTOR
    record = Entity(ROOT_ID, b"f", kind, added=Timestamp(1, b"a"), body=state.copy())
    decoded = decode_entity(encode_entity(record))
    assert decoded.body is not None or state.is_empty()
    return decoded.body


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=80)
@given(text=st.booleans(), history=steps)
def test_decoded_histories_are_the_encoded_state(
    text: bool, history: list[tuple[int, int, int, int]]
) -> None:
    h = History(text)
    for action, r, a, b in history:
        if action <= 3:
            h.local(r, action, a, b)
        elif h.deltas:
            h.pairs[r].merge(h.deltas[a % len(h.deltas)])
    for pair in h.pairs:
        if pair.run.is_empty():
            continue
        decoded = _round_trip(pair.run)
        assert_same(decoded, pair.naive, [])
        assert decoded == pair.run
        decoded.visible_len()  # ordered, it joins and reads like the original
        assert_same(decoded, pair.naive, [])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=80)
@given(data=st.data(), text=st.booleans())
def test_decoded_forged_states_are_the_encoded_state(data: st.DataObject, text: bool) -> None:
    elements = data.draw(forged(text))
    if not elements:
        return
    state: Any = (TextState if text else VectorState)(
        {e: Element(*el) for e, el in elements.items()}
    )
    naive: Any = (model.TextState if text else model.VectorState)(
        {e: model.Element(*el) for e, el in elements.items()}
    )
    assert_same(_round_trip(state), naive, [])


@pytest.mark.parametrize("text", [True, False])
def test_a_run_longer_than_an_item_decodes_to_whole_items(text: bool) -> None:
    length = 3 * ITEM_MAX + 5
    writer = b"w" * 8
    elements: dict[Timestamp, Any] = {}
    after = Timestamp(0, b"")
    for k in range(length):
        eid = Timestamp(100 + k, writer)
        gone = Timestamp(10_000, writer) if k % 7 == 0 else None
        value = None if gone else ("x" if text else b"v")
        elements[eid] = Element(after, value, None, gone)
        after = eid
    state: Any = (TextState if text else VectorState)(elements)
    decoded = _round_trip(state)
    assert decoded == state
    assert decoded.wire() == state.wire()
    assert len(decoded) == len(state)


def _text_record(runs: list[tuple[Any, ...]]) -> bytes:
    """An encoded Text record whose body holds `runs` as given (writers b"" and b"w")."""
    state = TextState({Timestamp(5, b"w"): Element(Timestamp(0, b""), "x", None, None)})
    record = encode_entity(Entity(ROOT_ID, b"f", Kind.TEXT, added=Timestamp(1, b"w"), body=state))
    body = state.canonical()
    assert record.count(body) == 1
    return record.replace(body, canonical(([b"", b"w"], runs)))


@pytest.mark.parametrize(
    "runs",
    [
        [(5, 1, 0, 0, 3, "abc", [], []), (6, 1, 0, 0, 1, "d", [], [])],  # overlapping
        [(5, 1, 0, 0, 2, "ab", [], []), (7, 1, 6, 1, 1, "c", [], [])],  # not maximal
    ],
)
def test_overlapping_and_non_maximal_runs_are_refused(runs: list[tuple[Any, ...]]) -> None:
    decode_entity(_text_record([(5, 1, 0, 0, 3, "abc", [], [])]))  # (the helper's shape)
    with pytest.raises(RemoteProtocolError):
        decode_entity(_text_record(runs))
