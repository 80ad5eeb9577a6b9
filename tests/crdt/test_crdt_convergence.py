"""Replicas doing random operations and exchanging delta-states in any order converge."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from trionode.crdt import StateTree

from .crdt_helpers import SECOND, Replica, perform, records, snapshot, wire

N_REPLICAS = 3


def _run(data: st.DataObject, replicas: list[Replica], log: list[list[bytes]], steps: int) -> int:
    """Random local transactions and random (duplicated, reordered) deliveries.

    Returns the index in `log` where this run's deltas start.
    """
    start = len(log)
    for _ in range(steps):
        if data.draw(st.integers(0, 2), label="kind") and len(log) > start:
            # deliver any delta of this run (maybe again) to any replica
            target = data.draw(st.sampled_from(replicas), label="to")
            target.receive(log[data.draw(st.integers(start, len(log) - 1), label="delta")])
            continue
        replica = data.draw(st.sampled_from(replicas), label="at")
        with replica.begin() as tx:
            for _ in range(data.draw(st.integers(1, 3), label="ops")):
                perform(data.draw, tx)
            if data.draw(st.integers(0, 9), label="abort") == 0:
                tx.abort()  # an aborted call ships nothing and changes nothing
                continue
            deltas = tx.commit()
        if deltas:
            log.append(wire(deltas))
    return start


def _deliver_all(data: st.DataObject, replicas: list[Replica], log: list[list[bytes]]) -> None:
    for replica in replicas:
        order = data.draw(st.permutations(range(len(log))), label="order")
        for index in order:
            replica.receive(log[index])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_replicas_converge(data: st.DataObject) -> None:
    replicas = [
        Replica(bytes([65 + i]) * 32, skew=data.draw(st.integers(-SECOND, SECOND), label="skew"))
        for i in range(N_REPLICAS)
    ]
    log: list[list[bytes]] = []
    _run(data, replicas, log, data.draw(st.integers(5, 40), label="steps"))
    _deliver_all(data, replicas, log)

    expected = snapshot(replicas[0].tree)
    root = replicas[0].tree.root_hash()
    for replica in replicas[1:]:
        assert snapshot(replica.tree) == expected
        assert replica.tree.root_hash() == root
        assert records(replica.tree) == records(replicas[0].tree)

    # A fresh tree rebuilt from the records (the store layer's reload) agrees too.
    assert StateTree(replicas[0].tree.entities()).root_hash() == root

    # GC at a quiescent point changes no hash and no value ...
    horizon = max(r.physical for r in replicas) + SECOND
    replicas[0].tree.gc(horizon)
    assert replicas[0].tree.root_hash() == root
    assert snapshot(replicas[0].tree) == expected

    # ... and the collected replica keeps converging with the others on new operations.
    for replica in replicas:
        replica.physical += 2 * SECOND
    later = _run(data, replicas, log, data.draw(st.integers(0, 15), label="steps2"))
    fresh = log[later:]
    _deliver_all(data, replicas, fresh)
    for replica in replicas[1:]:
        assert snapshot(replica.tree) == snapshot(replicas[0].tree)
        assert replica.tree.root_hash() == replicas[0].tree.root_hash()
