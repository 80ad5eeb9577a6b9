"""Sync at the width of a hundred writers (issue #16's 100-node row): many members write at
once, so a replica holds more concurrent heads than a delta header may name as parents
(`MAX_PARENTS`). Whatever an honest node writes on such heads must pass every check of a
peer's delta fetch, with the limits a node ships with (machines in memory, `harness.py`).

The 100 x 1,000 scale run failed exactly here: a node with more than 64 heads wrote a
delta naming them all, which no peer can decode; every fetch that met it failed the
fetch machine's checks ("malformed delta header") and every delta after it on that node
waited as pending everywhere, for ever."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.sync.harness import CONTEXT, KEY, Replica, pull
from tests.sync.test_machines import A_MEMBER, B_MEMBER
from trionode.auth.model import tag
from trionode.config import SyncSection
from trionode.dag.dag import CausalDag
from trionode.dag.delta import (
    GENESIS,
    MAX_PARENTS,
    DeltaBody,
    SignedDelta,
    seal_delta,
    verify_wire,
)
from trionode.sync.machines import MAX_ANSWER_BYTES

WRITERS = [Ed25519PrivateKey.from_private_bytes(i.to_bytes(32, "big")) for i in range(1, 131)]
ANCESTORS = SyncSection().max_ancestors


class Writer:
    """One member's node in the model: its replica, and its own chain of seqs."""

    def __init__(self, key: Ed25519PrivateKey, replica: Replica) -> None:
        self.key = key
        self.tag = tag(key.public_key().public_bytes_raw())
        self.replica = replica
        self.seq = 0

    def write(self, n: int) -> SignedDelta:
        """What a node does for a local call: seal a delta on its heads (as many as a header
        may name, keeping the one its own newest delta is under) and apply it unchecked."""
        dag = self.replica.dag
        own = [h for h in dag.heads if _vv(self.replica, h).get(self.tag, 0) == self.seq]
        parents = _parents(dag, own[:1])
        vv: dict[bytes, int] = {}
        for parent in parents:
            for author, seq in _vv(self.replica, parent).items():
                vv[author] = max(vv.get(author, 0), seq)
        self.seq += 1
        delta = seal_delta(
            context_id=CONTEXT,
            parents=parents,
            author=self.key,
            hlc=n,
            key_id=0,
            context_key=KEY,
            body=DeltaBody(records=[n.to_bytes(4, "big")], events=[], root_hash=bytes(32)),
            seq=self.seq,
            vv=vv,
        )
        # (A node never re-verifies its own delta: it goes straight into its DAG.)
        self.replica.wires[delta.id] = delta.encode()
        PARENTS[delta.id] = tuple(parents)
        assert dag.offer(delta.id, parents, delta.encode(), 0.0, lambda _i, _w: True).ready
        return delta


def _parents(dag: CausalDag[bytes], first: list[bytes]) -> list[bytes]:
    try:
        return dag.parents_for_new_delta(first=first)
    except TypeError:  # (the code before the fix: every head, however many)
        return dag.parents_for_new_delta()


def _vv(replica: Replica, delta_id: bytes) -> dict[bytes, int]:
    if delta_id == GENESIS:
        return {}
    header = verify_wire(replica.wires[delta_id], context_id=CONTEXT).header
    return dict(header.vv)


PARENTS: dict[bytes, tuple[bytes, ...]] = {}
"""What each delta the model sealed names as parents (copies between the model's nodes
need not decode what they copy: they stand for gossip that already did)."""


def _catch_up(replica: Replica, source: Replica) -> None:
    for delta_id in source.applied - replica.applied:
        replica.wires[delta_id] = source.wires[delta_id]
        replica.dag.offer(delta_id, PARENTS[delta_id], source.wires[delta_id], 0.0)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    width=st.integers(MAX_PARENTS + 1, len(WRITERS) - 1),
    rounds=st.integers(1, 3),
    held=st.integers(0, 2),
)
def test_a_hundred_concurrent_writers_sync_through_every_check_of_the_fetch(
    width: int, rounds: int, held: int
) -> None:
    hub = Writer(WRITERS[-1], Replica(B_MEMBER, members={A_MEMBER}))
    writers = [Writer(key, Replica(B_MEMBER)) for key in WRITERS[:width]]
    newcomer = Replica(A_MEMBER)
    n = 0
    for round_ in range(rounds):
        # Every writer writes at once on what it has (none sees the others' new deltas),
        # then the hub, which got them all, writes on all those heads.
        for writer in writers:
            writer.write(n)
            n += 1
        for writer in writers:
            _catch_up(hub.replica, writer.replica)
        assert len(hub.replica.dag.heads) == width
        hub.write(n)
        n += 1
        for writer in writers:
            _catch_up(writer.replica, hub.replica)
        if round_ < held:
            _catch_up(newcomer, hub.replica)  # (what it held before it fell behind)
    # A member behind pulls the rest, with the limits a node ships with.
    pull(newcomer, hub.replica, ancestors=ANCESTORS, answer_bytes=MAX_ANSWER_BYTES)
    assert newcomer.applied == hub.replica.applied
    assert not newcomer.pending


def test_more_heads_than_a_header_names_give_that_many_parents_keeping_the_first() -> None:
    dag: CausalDag[str] = CausalDag()
    heads = [bytes([i]) * 32 for i in range(1, 101)]
    for head in heads:
        dag.offer(head, (GENESIS,), "x", now=0)
    own = heads[-1]  # the largest id: never among the first 64 by id
    parents = dag.parents_for_new_delta(first=[own])
    assert len(parents) == MAX_PARENTS
    assert own in parents
    assert parents == sorted(parents)
    # The heads left out are still heads: the next delta takes them.
    dag.offer(b"\xff" * 32, tuple(parents), "merge", now=0)
    assert dag.heads == {b"\xff" * 32} | (set(heads) - set(parents))
    assert len(dag.parents_for_new_delta()) == len(heads) - MAX_PARENTS + 1
    # Few heads: all of them, whatever `first` says.
    small: CausalDag[str] = CausalDag()
    small.offer(heads[0], (GENESIS,), "x", now=0)
    assert small.parents_for_new_delta(first=[heads[5]]) == [heads[0]]
