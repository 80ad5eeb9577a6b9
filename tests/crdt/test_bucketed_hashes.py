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
from trionode.crdt.encoding import encode_entity
from trionode.crdt.lazy import take
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


def _loaded(tree: StateTree) -> StateTree:
    """`tree` as a node loads it: its records held as their rows (`lazy.take`)."""
    records, newest = take([encode_entity(e) for e in tree.entities()])
    loaded = StateTree()
    loaded.add_new(records, newest=newest)
    return loaded


def test_one_write_at_a_time_rehashes_its_bucket_as_a_rebuild_would() -> None:
    """A map of ~12 children per bucket, written (new keys, overwrites, removals, a key
    removed and written again, a nested map) one change at a time, the root hashed after
    each: with every other child's digest cached, with the children held as their rows
    (digests on the records, not in the cache), and with a mix of both."""
    source = StateTree()
    clock = HybridClock(b"w" * 32)
    now = ntp64_from_unix(1.7e9)
    keys = [f"k{i}" for i in range(256 * 12)]
    with source.begin(clock, now) as tx:
        flat = tx.field("flat", FLAT)
        for key in keys:
            flat[key].set("v")
        tx.commit()
    source.drain_changes()
    rng = random.Random(7)
    for tree in (source, _loaded(source)):
        assert tree.root_hash() == _fresh(tree)
        for step in range(1, 40):
            with tree.begin(clock, now + step) as tx:
                flat = tx.field("flat", FLAT)
                nested = tx.field("nested", NESTED)
                key = rng.choice(keys)
                action = step % 5
                if action == 0:
                    flat.remove(key)
                elif action == 1:
                    flat[f"new{step}"].set(str(step))
                elif action == 2:
                    nested[key][key].increment()
                elif action == 3 and key in flat:
                    flat.remove(key)
                    flat[key].set("again")
                else:
                    flat[key].set(str(step))
                tx.commit()
            tree.drain_changes()
            assert tree.root_hash() == _fresh(tree)
