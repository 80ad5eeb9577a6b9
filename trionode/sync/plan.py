"""Which protocol a sync session runs (DESIGN §8), decided from the heads exchange and our own
replica: pure, so every branch is tested without a cluster (the sync manager gathers the
facts and runs the choice).

* a snapshot is being taken (its marker is persisted) → **snapshot** (resume it, then a delta
  sync of the tail); a node with no state at all → the whole delta **history** (deltas
  verify themselves, so any member will do; only the join records a trusted snapshot
  source). Either way nothing to do if the peer has nothing either.
* we lack some of the peer's heads, or parents our pending deltas wait for → **delta** sync
  (and tree comparison if that does not close the gap).
* every head of the peer's is applied here: equal roots, or different heads (we are ahead:
  the peer pulls from us in its own session) → **nothing**; equal heads with a different
  root → divergence → **tree** comparison.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Set as AbstractSet

import attrs

from trionode.wire.messages import HeadsResponse


class Choice(enum.Enum):
    NOTHING = "none"
    SNAPSHOT = "snapshot"
    HISTORY = "history"
    DELTA = "delta"
    TREE = "tree"


@attrs.frozen
class Situation:
    """What a session knows once the peer answered the heads exchange."""

    peer: HeadsResponse
    snapshot_in_progress: bool
    """A snapshot's progress marker is persisted (a join started one)."""
    fresh: bool
    """No state at all here."""
    root: bytes = b""
    """Our root hash (unused when fresh)."""
    heads: Iterable[bytes] = ()
    """Our heads, stale ones dropped (`stale_heads`)."""
    unknown: AbstractSet[bytes] = frozenset()
    """The peer's heads neither applied nor pending here."""
    missing: AbstractSet[bytes] = frozenset()
    """Parents our pending deltas wait for."""
    folded: AbstractSet[bytes] = frozenset()
    """Parents our pending deltas wait for that the peer folded: no delta brings them any
    more, only its final state (as after a snapshot whose tail the member folded)."""


def choose(situation: Situation) -> Choice:
    peer = situation.peer
    if situation.snapshot_in_progress or situation.fresh:
        if not peer.heads:
            return Choice.NOTHING  # the peer has nothing either
        return Choice.SNAPSHOT if situation.snapshot_in_progress else Choice.HISTORY
    if situation.unknown or situation.missing:
        return Choice.DELTA
    if situation.folded:
        return Choice.TREE
    if peer.root_hash == situation.root or sorted(peer.heads) != sorted(situation.heads):
        return Choice.NOTHING
    return Choice.TREE


def stale_heads(peer: HeadsResponse, ours: Iterable[bytes]) -> set[bytes]:
    """Our heads the peer had applied and does not list as heads: they lie below its heads,
    so once every head of the peer's is applied here they are no heads of ours either.
    (They come from checkpoints, which do not know their ancestors: a delta from before a
    snapshot's boundary that arrives later, as the parent of a concurrent one, is applied
    as a head.)"""
    return (set(peer.known) & set(ours)) - set(peer.heads)
