"""Which protocol a session runs (`trionode.sync.plan`), branch by branch."""

from __future__ import annotations

import pytest

from trionode.sync.plan import Choice, Situation, choose, stale_heads
from trionode.wire.messages import HeadsResponse


def ident(i: int) -> bytes:
    return i.to_bytes(32, "big")


ROOT, OTHER_ROOT = ident(100), ident(101)
PEER = HeadsResponse(heads=[ident(2), ident(1)], root_hash=ROOT)
EMPTY_PEER = HeadsResponse(heads=[], root_hash=ident(0))


@pytest.mark.parametrize(
    ("situation", "expected"),
    [
        # No state here: a snapshot being taken is resumed, else the whole history comes.
        (Situation(PEER, snapshot_in_progress=True, fresh=True), Choice.SNAPSHOT),
        (Situation(PEER, snapshot_in_progress=True, fresh=False), Choice.SNAPSHOT),
        (Situation(PEER, snapshot_in_progress=False, fresh=True), Choice.HISTORY),
        (Situation(EMPTY_PEER, snapshot_in_progress=True, fresh=True), Choice.NOTHING),
        (Situation(EMPTY_PEER, snapshot_in_progress=False, fresh=True), Choice.NOTHING),
        # We lack heads of the peer's, or parents of our pending deltas.
        (
            Situation(PEER, False, False, ROOT, [ident(1)], unknown={ident(2)}),
            Choice.DELTA,
        ),
        (
            Situation(PEER, False, False, ROOT, [ident(1), ident(2)], missing={ident(9)}),
            Choice.DELTA,
        ),
        # Everything of the peer's is here.
        (Situation(PEER, False, False, ROOT, [ident(1), ident(2)]), Choice.NOTHING),
        (Situation(PEER, False, False, OTHER_ROOT, [ident(3)]), Choice.NOTHING),  # ahead
        (Situation(PEER, False, False, OTHER_ROOT, [ident(2), ident(1)]), Choice.TREE),
        # Our pending deltas wait for parents the peer folded: only its final state has
        # them (a snapshot's tail folded meanwhile), whatever the heads say.
        (
            Situation(PEER, False, False, OTHER_ROOT, [ident(3)], folded={ident(9)}),
            Choice.TREE,
        ),
        (
            Situation(PEER, False, False, ROOT, [ident(3)], missing={ident(8)}, folded={ident(9)}),
            Choice.DELTA,  # what deltas can still bring comes first
        ),
    ],
)
def test_choose(situation: Situation, expected: Choice) -> None:
    assert choose(situation) is expected


def test_stale_heads_are_ours_the_peer_applied_below_its_heads() -> None:
    peer = HeadsResponse(heads=[ident(3)], root_hash=ROOT, known=[ident(1), ident(3)])
    assert stale_heads(peer, [ident(1), ident(2), ident(3)]) == {ident(1)}
    assert stale_heads(peer, [ident(2)]) == set()
