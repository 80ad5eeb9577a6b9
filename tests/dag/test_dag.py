from __future__ import annotations

import random

from hypothesis import given, strategies as st

from trionode.dag.dag import CausalDag
from trionode.dag.delta import GENESIS


def _id(n: int) -> bytes:
    return n.to_bytes(32, "big")


def _chain(n: int) -> list[tuple[bytes, tuple[bytes, ...]]]:
    return [(_id(i + 1), (_id(i) if i else GENESIS,)) for i in range(n)]


def test_linear_chain_in_order() -> None:
    dag: CausalDag[str] = CausalDag()
    for delta_id, parents in _chain(3):
        offer = dag.offer(delta_id, parents, "x", now=0)
        assert [d for d, _ in offer.ready] == [delta_id]
    assert dag.heads == {_id(3)}


def test_out_of_order_waits_then_cascades() -> None:
    dag: CausalDag[str] = CausalDag()
    (d1, p1), (d2, p2) = _chain(2)
    offer = dag.offer(d2, p2, "two", now=0)
    assert offer.pending
    assert offer.missing == {d1}
    assert dag.missing() == {d1}
    offer = dag.offer(d1, p1, "one", now=1)
    assert offer.ready == [(d1, "one"), (d2, "two")]
    assert dag.heads == {d2}
    assert dag.pending_count == 0


def test_duplicates_are_reported() -> None:
    dag: CausalDag[str] = CausalDag()
    (d1, p1), (d2, p2) = _chain(2)
    dag.offer(d2, p2, "two", now=0)
    assert dag.offer(d2, p2, "two", now=0).duplicate  # pending duplicate
    dag.offer(d1, p1, "one", now=0)
    assert dag.offer(d1, p1, "one", now=0).duplicate  # applied duplicate


def test_concurrent_heads_collapse() -> None:
    dag: CausalDag[str] = CausalDag()
    root, _ = _chain(1)[0]
    dag.offer(root, (GENESIS,), "r", now=0)
    dag.offer(_id(10), (root,), "a", now=0)
    dag.offer(_id(11), (root,), "b", now=0)
    assert dag.heads == {_id(10), _id(11)}
    parents = dag.parents_for_new_delta()
    assert parents == sorted([_id(10), _id(11)])
    dag.offer(_id(12), tuple(parents), "merge", now=0)
    assert dag.heads == {_id(12)}


def test_pending_is_bounded_and_expires() -> None:
    dag: CausalDag[int] = CausalDag(max_pending=3)
    for i in range(5):
        offer = dag.offer(_id(100 + i), (_id(1),), i, now=i)
        if i >= 3:
            assert offer.evicted == [_id(100 + i - 3)]
    assert dag.pending_count == 3
    assert dag.expire(now=10, timeout=7.5) == [_id(102)]  # received at 2: waited 8 > 7.5
    assert dag.pending_count == 2
    # An unrelated delta is never blocked by pending ones.
    assert dag.offer(_id(200), (GENESIS,), 0, now=11).ready


def test_thousand_deltas_in_random_order_apply_without_recursion() -> None:
    chain = _chain(1000)
    shuffled = chain[:]
    random.Random(7).shuffle(shuffled)
    shuffled.sort(key=lambda item: item[0] == _id(1))  # the root last: worst-case cascade
    dag: CausalDag[None] = CausalDag(max_pending=2000)
    applied: list[bytes] = []
    for delta_id, parents in shuffled:
        applied += [d for d, _ in dag.offer(delta_id, parents, None, now=0).ready]
    assert applied == [d for d, _ in chain]
    assert dag.heads == {_id(1000)}


@given(st.permutations(list(range(12))), st.integers(min_value=0, max_value=10_000))
def test_any_delivery_order_gives_same_heads(order: list[int], seed: int) -> None:
    # A random DAG: each delta picks 1-2 earlier parents.
    rng = random.Random(seed)
    deltas: list[tuple[bytes, tuple[bytes, ...]]] = []
    for i in range(12):
        if i == 0:
            parents: tuple[bytes, ...] = (GENESIS,)
        else:
            parents = tuple(sorted({_id(rng.randrange(i) + 1) for _ in range(rng.randint(1, 2))}))
        deltas.append((_id(i + 1), parents))
    reference: CausalDag[None] = CausalDag()
    for delta_id, parents in deltas:
        reference.offer(delta_id, parents, None, now=0)
    dag: CausalDag[None] = CausalDag()
    seen: list[bytes] = []
    for index in order:
        seen += [d for d, _ in dag.offer(*deltas[index], None, now=0).ready]
    assert dag.heads == reference.heads
    assert sorted(seen) == sorted(d for d, _ in deltas)
    position = {d: i for i, d in enumerate(seen)}
    for delta_id, parents in deltas:  # causal order respected
        assert all(p == GENESIS or position[p] < position[delta_id] for p in parents)


def test_refused_deltas_are_not_applied_and_block_their_descendants() -> None:
    dag: CausalDag[str] = CausalDag()
    (d1, p1), (d2, p2), (d3, p3) = _chain(3)
    dag.offer(d1, p1, "ok", now=0)
    dag.offer(d3, p3, "child", now=0)
    offer = dag.offer(d2, p2, "bad", now=0, apply=lambda _id, item: item != "bad")
    assert offer.ready == []
    assert dag.heads == {d1}
    assert not dag.knows(d2)
    assert dag.is_pending(d3)
