"""Text against a plain reference RGA under random concurrent edits, merges and encodings.

The reference knows nothing of indexes, runs or caches: it walks the element tree
recursively (children highest id first) every time it is asked. Replicas edit through the
`Text` handle (so local typing takes run ids), ship their deltas encoded, and receive them
in any order, duplicated, sometimes as a whole re-encoded state.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from trionode.crdt import (
    HEAD,
    Element,
    Entity,
    HybridClock,
    StateTree,
    TextState,
    Timestamp,
    decode_entity,
    encode_entity,
    text,
)

from .crdt_helpers import T0

DOC = text()


def reference(elements: dict[Timestamp, Element[str]]) -> str:
    """The visible string, by the definition: pre-order walk, siblings highest id first."""
    children: dict[Timestamp, list[Timestamp]] = {}
    for eid, el in elements.items():
        children.setdefault(el.after, []).append(eid)

    def walk(eid: Timestamp) -> str:
        own = elements[eid].value or "" if eid != HEAD else ""
        return own + "".join(walk(c) for c in sorted(children.get(eid, []), reverse=True))

    return walk(HEAD)


class _Replica:
    def __init__(self, name: bytes) -> None:
        self.tree = StateTree()
        self.clock = HybridClock(name)
        self.physical = T0

    def state(self) -> TextState:
        with self.tree.reader() as tx:
            record = tx.get(tx.field("doc", DOC).entity_id)
        body = None if record is None else record.body
        assert body is None or isinstance(body, TextState)
        return body if body is not None else TextState()

    def value(self) -> str:
        with self.tree.reader() as tx:
            return tx.field("doc", DOC).value()


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=50)
@given(st.data())
def test_text_matches_the_reference_rga(data: st.DataObject) -> None:
    replicas = [_Replica(bytes([97 + i]) * 8) for i in range(3)]
    shipped: list[list[bytes]] = []
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = data.draw(st.integers(0, 9), label="action")
        target = data.draw(st.sampled_from(replicas), label="replica")
        if action < 6:  # a local edit, mostly typing at a cursor
            target.physical += data.draw(st.sampled_from([0, 1, 1 << 20]), label="tick")
            with target.tree.begin(target.clock, target.physical) as tx:
                doc = tx.field("doc", DOC)
                for _ in range(data.draw(st.integers(1, 3), label="edits")):
                    length = len(doc)
                    if length and data.draw(st.integers(0, 3), label="op") == 0:
                        pos = data.draw(st.integers(0, length - 1), label="at")
                        doc.delete(pos, data.draw(st.integers(1, min(3, length - pos))))
                    else:
                        pos = data.draw(st.integers(0, length), label="at")
                        doc.insert(pos, data.draw(st.text("xyz", min_size=1, max_size=3)))
                deltas = tx.commit()
            shipped.append([encode_entity(d) for d in deltas])
        elif action < 9 and shipped:  # deliver any shipped delta (again, out of order)
            batch = data.draw(st.sampled_from(shipped), label="delta")
            target.tree.apply([decode_entity(b) for b in batch])
        else:  # receive another replica's whole state, re-encoded
            source = data.draw(st.sampled_from(replicas), label="source")
            target.tree.apply([decode_entity(encode_entity(e)) for e in source.tree.entities()])
        state = target.state()
        assert target.value() == reference(dict(state.elements))
        assert state.visible_len() == len(target.value())
        if len(state):
            k = data.draw(st.integers(0, len(state) - 1), label="probe")
            assert state.visible_at(k) == state.visible_ids()[k]
        # The run-length canonical form round-trips exactly.
        record = Entity(bytes(32), b"doc", DOC.kind, body=state)
        assert decode_entity(encode_entity(record)).body == record.body
    for replica in replicas:
        for batch in shipped:
            replica.tree.apply([decode_entity(b) for b in batch])
    values = {r.value() for r in replicas}
    assert len(values) == 1
    assert values == {reference(dict(replicas[0].state().elements))}
