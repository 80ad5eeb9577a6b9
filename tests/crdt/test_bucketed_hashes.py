"""Large containers hash their children in cached buckets: the cached root hash must always
equal the hash of a tree rebuilt from scratch, whatever the order of changes."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from trionode.crdt import (
    HybridClock,
    StateTree,
    counter,
    ntp64_from_unix,
    register,
    unordered_map,
)
from trionode.crdt.tree import BUCKETING_THRESHOLD

FLAT = unordered_map(str, register(str))
NESTED = unordered_map(str, unordered_map(str, counter()))


def _fresh(tree: StateTree) -> bytes:
    rebuilt = StateTree(e.copy() for e in tree.entities())
    return rebuilt.root_hash()


@settings(max_examples=10)
@given(st.integers(min_value=0, max_value=10_000))
def test_cached_bucket_hashes_match_a_rebuild(seed: int) -> None:
    rng = random.Random(seed)
    tree = StateTree()
    clock = HybridClock(b"w" * 32)
    now = ntp64_from_unix(1.7e9)
    keys = [f"k{i}" for i in range(BUCKETING_THRESHOLD * 3)]
    for step in range(80):
        with tree.begin(clock, now + step) as tx:
            flat = tx.field("flat", FLAT)
            nested = tx.field("nested", NESTED)
            for _ in range(rng.randint(1, 30)):
                key = rng.choice(keys)
                action = rng.random()
                if action < 0.4:
                    flat[key].set(str(rng.random()))
                elif action < 0.5:
                    flat.remove(key)
                elif action < 0.97:
                    # Few outer keys, so inner maps grow past the bucketing threshold too.
                    nested[rng.choice(keys[:3])][key].increment()
                else:
                    nested.remove(rng.choice(keys[:3]))
            tx.commit()
        tree.drain_changes()
        assert tree.root_hash() == _fresh(tree)


def test_two_orders_same_hash() -> None:
    source = StateTree()
    clock = HybridClock(b"a" * 32)
    deltas = []
    for i in range(BUCKETING_THRESHOLD * 4):
        with source.begin(clock, ntp64_from_unix(1.7e9) + i) as tx:
            tx.field("flat", FLAT)[f"key{i}"].set("v")
            deltas.append(tx.commit())
    forward, backward = StateTree(), StateTree()
    for d in deltas:
        forward.apply(d)
    for d in reversed(deltas):
        backward.apply(d)
    assert forward.root_hash() == backward.root_hash() == source.root_hash()
