from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from hypothesis import given, strategies as st

from trionode.dag.dag import CausalDag, Defer
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


# -- waiting for the clock and per-author quotas --------------------------------------------


def test_deferred_delta_waits_for_release_with_its_descendants() -> None:
    dag: CausalDag[str] = CausalDag()
    (d1, p1), (d2, p2), (d3, p3) = _chain(3)
    dag.offer(d1, p1, "one", now=0)
    dag.offer(d3, p3, "three", now=0)
    offer = dag.offer(d2, p2, "ahead", now=0, apply=lambda _id, item: Defer(50.0))
    assert offer.ready == []
    assert offer.missing == frozenset()
    assert dag.is_pending(d2)
    assert dag.is_pending(d3)
    assert dag.next_release() == 50.0
    assert dag.missing() == set()  # nothing to fetch: it is here, only early
    assert dag.expire(now=1000, timeout=1) == [d3]  # waits for a parent; d2 waits for time
    dag.offer(d3, p3, "three", now=1000)
    assert dag.release(now=49.0, apply=lambda _id, _item: True) == []
    released = dag.release(now=50.0, apply=lambda _id, _item: True)
    assert released == [(d2, "ahead"), (d3, "three")]
    assert dag.heads == {d3}
    assert dag.pending_count == 0
    assert dag.next_release() is None


def test_a_delta_can_be_deferred_again() -> None:
    dag: CausalDag[str] = CausalDag()
    verdicts: Iterator[bool | Defer] = iter([Defer(5.0), Defer(9.0), True])
    dag.offer(_id(1), (GENESIS,), "x", now=0, apply=lambda _id, _item: next(verdicts))
    assert dag.release(now=5.0, apply=lambda _id, _item: next(verdicts)) == []
    assert dag.next_release() == 9.0
    assert dag.release(now=9.0, apply=lambda _id, _item: next(verdicts)) == [(_id(1), "x")]


def test_per_author_quota_evicts_the_flooders_own_oldest() -> None:
    dag: CausalDag[str] = CausalDag(max_pending=100, max_pending_per_author=3)
    dag.offer(_id(2), (_id(1),), "victim", now=0, author=b"bob")
    evicted: list[bytes] = []
    for i in range(30):
        evicted += dag.offer(_id(100 + i), (_id(99),), "flood", now=i, author=b"eve").evicted
    assert evicted == [_id(100 + i) for i in range(27)]
    assert dag.pending_of(b"eve") == 3
    assert dag.is_pending(_id(2))
    assert [d for d, _ in dag.offer(_id(1), (GENESIS,), "parent", now=31).ready] == [
        _id(1),
        _id(2),
    ]


def test_total_limit_evicts_the_oldest_of_the_heaviest_author() -> None:
    dag: CausalDag[str] = CausalDag(max_pending=4, max_pending_per_author=3)
    dag.offer(_id(10), (_id(1),), "a", now=0, author=b"a")
    dag.offer(_id(20), (_id(1),), "b", now=1, author=b"b")
    dag.offer(_id(21), (_id(1),), "b", now=2, author=b"b")
    dag.offer(_id(22), (_id(1),), "b", now=3, author=b"b")
    assert dag.offer(_id(11), (_id(1),), "a", now=4, author=b"a").evicted == [_id(20)]
    assert dag.pending_of(b"a") == 2
    assert dag.pending_of(b"b") == 2


@given(
    st.permutations(list(range(10))),
    st.lists(st.booleans(), min_size=10, max_size=10),
    st.integers(min_value=0, max_value=10_000),
)
def test_deferrals_change_when_deltas_apply_never_what_applies(
    order: list[int], early: list[bool], seed: int
) -> None:
    rng = random.Random(seed)
    deltas: list[tuple[bytes, tuple[bytes, ...]]] = []
    for i in range(10):
        parents = (
            (GENESIS,)
            if i == 0
            else tuple(sorted({_id(rng.randrange(i) + 1) for _ in range(rng.randint(1, 2))}))
        )
        deltas.append((_id(i + 1), parents))
    until = {d: float(i + 1) for i, (d, _) in enumerate(deltas) if early[i]}

    def verdict(now: float) -> Callable[[bytes, None], bool | Defer]:
        return lambda delta_id, _item: (
            Defer(until[delta_id]) if until.get(delta_id, 0) > now else True
        )

    dag: CausalDag[None] = CausalDag()
    seen: list[bytes] = []
    for index in order:
        seen += [d for d, _ in dag.offer(*deltas[index], None, now=0, apply=verdict(0)).ready]
    while (due := dag.next_release()) is not None:
        seen += [d for d, _ in dag.release(due, verdict(due))]
    reference: CausalDag[None] = CausalDag()
    for delta_id, parents in deltas:
        reference.offer(delta_id, parents, None, now=0)
    assert dag.heads == reference.heads
    assert sorted(seen) == sorted(d for d, _ in deltas)
    position = {d: i for i, d in enumerate(seen)}
    for delta_id, parents in deltas:
        assert all(p == GENESIS or position[p] < position[delta_id] for p in parents)


def test_checkpoint_shows_covered_deltas_before_releasing_any() -> None:
    """A released delta may stand on what a covered one carries (a membership operation), so
    `cover` sees every covered delta before `apply` sees the first released one."""
    dag: CausalDag[str] = CausalDag()
    _, (d2, p2), (d3, _) = _chain(3)
    dag.offer(d2, p2, "covered", now=0)  # waits for d1, which only the checkpoint brings
    child = _id(20)
    dag.offer(child, (d2, d3), "released", now=0)  # waits for d2 and d3
    seen: list[str] = []

    def apply(_delta_id: bytes, item: str) -> bool:
        seen.append(f"apply {item}")
        return True

    def cover(covered: list[tuple[bytes, str]]) -> None:
        seen.append("cover " + ",".join(item for _, item in covered))

    released, covered = dag.checkpoint([d3, d2], apply=apply, cover=cover)
    assert seen == ["cover covered", "apply released"]
    assert [i for i, _ in covered] == [d2]
    assert [i for i, _ in released] == [child]
    assert dag.heads == {child}
    assert dag.pending_count == 0


def test_forgo_releases_only_the_eligible_and_a_late_parent_is_no_head() -> None:
    dag: CausalDag[str] = CausalDag()
    base, gone, other = _id(1), _id(2), _id(3)
    dag.offer(base, (GENESIS,), "base", now=0)
    dag.offer(_id(10), (base, gone), "covered", now=0)
    dag.offer(_id(11), (gone,), "not covered", now=0)
    dag.offer(_id(12), (other,), "waits for another", now=0)
    released = dag.forgo([gone, base], lambda i, _: i != _id(11))
    # Only what the predicate allows, and only for the parents named (an applied one,
    # `base`, is no parent to forgo).
    assert released == [(_id(10), "covered")]
    assert dag.heads == {_id(10)}
    assert dag.is_pending(_id(11))
    assert dag.is_pending(_id(12))
    assert dag.missing() == {gone, other}
    assert not dag.knows(gone)
    # The forgone parent may still arrive: it applies, and releases what still waited.
    offer = dag.offer(gone, (base,), "late", now=1)
    assert [d for d, _ in offer.ready] == [gone, _id(11)]
    assert dag.heads == {_id(10), _id(11)}
