"""`maximal`: the frontier of a set of checkpoint vectors, against the pairwise definition
(no other vector bounds it), on random causal histories of several authors (so vectors are
distinct, as those of distinct deltas are); and repeated vectors keep one id."""

from __future__ import annotations

from hypothesis import given, strategies as st

from trionode.auth.finality import maximal, within

AUTHORS = [b"a", b"b", b"c", b"d"]


def history(steps: list[tuple[int, list[int]]]) -> dict[bytes, dict[bytes, int]]:
    """Deltas by id: each step, an author writes on top of its own last delta and of the
    chosen earlier deltas; a delta's vector is its causal past, itself included."""
    vectors: dict[bytes, dict[bytes, int]] = {}
    ids: list[bytes] = []
    seqs = dict.fromkeys(AUTHORS, 0)
    last: dict[bytes, bytes] = {}
    for who, picks in steps:
        author = AUTHORS[who]
        parents = [ids[p % len(ids)] for p in picks] if ids else []
        if author in last:
            parents.append(last[author])
        vv: dict[bytes, int] = {}
        for parent in parents:
            for k, v in vectors[parent].items():
                vv[k] = max(vv.get(k, 0), v)
        seqs[author] += 1
        vv[author] = seqs[author]
        delta_id = author + seqs[author].to_bytes(4, "big")
        vectors[delta_id] = vv
        ids.append(delta_id)
        last[author] = delta_id
    return vectors


def pairwise(vectors: dict[bytes, dict[bytes, int]]) -> set[bytes]:
    return {
        c
        for c, vv in vectors.items()
        if not any(o != c and within(vv, other) for o, other in vectors.items())
    }


steps = st.lists(
    st.tuples(st.integers(0, len(AUTHORS) - 1), st.lists(st.integers(0, 10_000), max_size=3)),
    max_size=60,
)


@given(steps=steps, keep=st.lists(st.booleans(), max_size=60))
def test_maximal_is_the_pairwise_frontier(
    steps: list[tuple[int, list[int]]], keep: list[bool]
) -> None:
    vectors = history(steps)
    # Any subset: folding leaves checkpoints of some deltas, not all.
    chosen = {k: v for i, (k, v) in enumerate(vectors.items()) if i >= len(keep) or keep[i]}
    assert maximal(chosen) == pairwise(chosen)


def test_a_repeated_vector_keeps_the_smallest_id() -> None:
    # (The pairwise definition dropped both: each bounds the other.)
    vv = {b"a": 2, b"b": 1}
    assert maximal({b"y": vv, b"x": dict(vv), b"z": {b"a": 1}}) == {b"x"}
