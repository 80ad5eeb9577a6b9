"""Finality: which deltas no membership operation can still reach (reference
local-first-auth.md §5.4, DESIGN §7.1). A pure function of the ops held, the admins' acks
and how far our DAG reaches; no I/O.

Why it is needed
----------------
A verdict can change after a delta was applied: a removal concurrent with it arrives late
and filters it. Undoing needs the delta's body, so bodies are kept until no such operation
can still arrive. A delta is *final* once that is so; from then on its verdict is frozen
and its body may be folded into the state.

Who can still change a verdict
------------------------------
Only operations that need admin rights change someone else's verdict (a removal, a
demotion, a grant whose authority a removal cancels, an admission spending a leaked
invitation); a member's own leave or rotation only affects its own later deltas, which
come after it in its chain. So the only authors to wait for are the members who are, or
ever were, admin: the **AckSet**. It holds every member some op in the set made admin —
standing, filtered or invalid alike, because a filtered admin's removals still filter —
plus the authors of admin operations and the current admins (the no-admin fallback of
`roles_from` can make a plain member admin).

An **ack** of admin `a` is a version vector of what `a` had seen: the vector of `a`'s
latest delta (any delta is an ack of its own past), or a signed ack sent on its own
(idle admins, removed admins; see `trionode/context/acks.py`). Everything `a` wrote
before its ack is in the ack's past; everything after has the ack's past in its own (one
chain per author: an author's sequence numbers follow its own past). An ack *counts* only
once we hold its whole past (its vector is within our frontier), so every op an admin
wrote before acking is in our set.

The rule
--------
- `FF[t]` (final frontier) is, for each author tag `t`, the minimum over AckSet members of
  their counted ack's `[t]`; with any AckSet member lacking a counted ack, nothing is final.
- A delta (data or op) with version vector `vv` is final iff `vv <= FF` pointwise. The
  final set is therefore ancestor-closed (a consistent cut), and as acks only grow and the
  AckSet only shrinks once frozen (below), a final delta stays final.
- Why it is safe: an op that could change the verdict on a final delta `d` would be
  concurrent with `d` or with something in `d`'s past, and authored by an AckSet member
  (or granted admin by a chain that starts at one). Written before that member's ack, it
  is in our set already; written after, it has the ack's past, `d` included, in its own.

Retiring from the AckSet
------------------------
A member who lost admin for good must not block finality forever (a removed admin writes
nothing more). Member `a` retires when:
1. a counted ack of `a` has in its past a standing op `r` that takes admin away from `a`
   (a removal, a leave, or a grant of a lower role), every op that made `a` admin precedes
   `r`, and `a` is not admin in the current roles (the fallback may reinstate it);
2. `r` is in the past of every other AckSet member's counted ack, so no op that could
   still arrive is concurrent with `r` or its past: its standing cannot change.
Retiring one member can let another retire, so this is iterated to the fixpoint (it only
grows, so the fixpoint is unique). Once every ever-admin has retired (the last admin left
and no member remains for the fallback), everything held is final. A member made admin
again later (by an op we do not hold yet) is made so after its granter's ack, hence after
every final delta.

Limits (decided): an admin that equivocates (two deltas with one sequence number) breaks
the chain argument, as in p2panda; and a silent ever-admin blocks finality for good — the
remedy is removing it (then its own ack is needed once, or it stays in the AckSet: see
`Finality.waiting_for`). There is no timeout that folds anyway: nodes that folded and
nodes that did not would diverge if the silent admin later delivered a removal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from trionode.auth.model import Kind, Op, Resolution, tag

_ADMIN_KINDS = frozenset({Kind.GRANT, Kind.REMOVE, Kind.ADMIT, Kind.REVOKE, Kind.UPGRADE})

Vector = Mapping[bytes, int]


def within(vv: Vector, bound: Vector) -> bool:
    """Every entry of `vv` is at most `bound`'s (absent entries are 0)."""
    return all(v <= bound.get(k, 0) for k, v in vv.items() if v > 0)


def maximal(vectors: Mapping[bytes, Vector]) -> set[bytes]:
    """The ids whose vector no other's bounds (`within`): the frontier of a set of
    checkpoints. Of several ids with one same vector, the smallest is kept.

    A dominating vector has a strictly larger sum, so taking the ids by descending sum each
    is checked only against the maximal ones found so far (a vector bounded by any earlier
    one is bounded by a maximal one): O(n * width) instead of comparing every pair, which
    was O(n²) `within` calls for the thousands of checkpoints folding leaves behind."""
    found: list[Vector] = []
    out: set[bytes] = set()
    for _, key in sorted((-sum(v.values()), k) for k, v in vectors.items()):
        vv = vectors[key]
        if not any(within(vv, bound) for bound in found):
            found.append(vv)
            out.add(key)
    return out


def vv_max(vectors: Iterable[Vector]) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for vv in vectors:
        for k, v in vv.items():
            if v > out.get(k, 0):
                out[k] = v
    return out


def vv_min(vectors: Iterable[Vector]) -> dict[bytes, int]:
    """Pointwise minimum; an entry absent from any vector is 0 (and left out)."""
    items = list(vectors)
    if not items:
        return {}
    keys = set(items[0])
    for vv in items[1:]:
        keys &= set(vv)
    out = {k: min(vv[k] for vv in items) for k in keys}
    return {k: v for k, v in out.items() if v > 0}


def _makes_admin(op: Op) -> bytes | None:
    if op.kind is Kind.CREATE:
        return op.author
    if op.kind in (Kind.GRANT, Kind.ADMIT) and op.role == "admin":
        return op.target
    return None


def _takes_admin(op: Op) -> bytes | None:
    """The member this op leaves without admin rights (as far as the op says)."""
    if op.kind in (Kind.REMOVE, Kind.LEAVE):
        return op.subject
    if op.kind is Kind.GRANT and op.role != "admin":
        return op.target
    return None


@attrs.frozen
class Finality:
    ack_set: frozenset[bytes]
    """Ever-admins (full member keys) whose acks finality waits for."""
    retired: frozenset[bytes]
    """Ever-admins that lost admin for good (see the module doc)."""
    waiting_for: frozenset[bytes]
    """AckSet members without a counted ack: while any, nothing is final."""
    final: Mapping[bytes, int]
    """FF: author tag → highest final sequence number."""
    counted: Mapping[bytes, Mapping[bytes, int]] = attrs.field(factory=dict)
    """Ever-admin → what its counted ack covers (floors included): which admin holds
    finality back, and by how much (`trionode.context.finality`)."""

    def is_final(self, vv: Vector) -> bool:
        """Whether a delta with this version vector (itself included) is final."""
        return bool(self.final) and within(vv, self.final)


NOTHING_FINAL = Finality(frozenset(), frozenset(), frozenset(), {})


def ever_admins(resolution: Resolution) -> set[bytes]:
    out: set[bytes] = set()
    for op in resolution.ops.values():
        made = _makes_admin(op)
        if made is not None:
            out.add(made)
        if op.kind in _ADMIN_KINDS:
            out.add(op.author)
    out.update(m for m, role in resolution.current().items() if role == "admin")
    return out


def finality(
    resolution: Resolution,
    acks: Mapping[bytes, Iterable[Vector]],
    frontier: Vector,
) -> Finality:
    """The finality of a context (see the module doc).

    `resolution` resolves every op held; `acks` maps a member's tag to its ack candidates
    (its latest delta's vector, its latest signed ack); `frontier` is the pointwise max of
    the vectors of every delta held (checkpoints included): what our DAG reaches.
    """
    admins = ever_admins(resolution)
    if not admins:
        return NOTHING_FINAL
    ops = resolution.ops
    current = resolution.current()
    grants: dict[bytes, list[Op]] = {}
    for op in ops.values():
        made = _makes_admin(op)
        if made is not None:
            grants.setdefault(made, []).append(op)
    creators = {op.author for op in ops.values() if op.kind is Kind.CREATE}
    creator_left = [op for op in ops.values() if op.kind is Kind.LEAVE and op.author in creators]
    counted: dict[bytes, dict[bytes, int]] = {}
    for member in admins:
        usable = [vv for vv in acks.get(tag(member), ()) if within(vv, frontier)]
        # Whatever a member does as admin has one of its admin grants in its past (or,
        # never granted, the creator's leave that let the no-admin fallback pick it), so
        # the meet of those vectors bounds it from below like an ack: an admin granted
        # after our final cut does not pull finality back.
        bounds = grants.get(member) or creator_left
        if bounds:
            usable.append(vv_min(g.vv for g in bounds))
        if usable:
            counted[member] = vv_max(usable)
    losses: dict[bytes, list[Op]] = {}
    for i in resolution.standing:
        op = ops[i]
        lost = _takes_admin(op)
        if (
            lost is not None
            and lost in admins
            and current.get(lost) != "admin"
            and all(g.precedes(op) for g in grants.get(lost, ()) if g.id != op.id)
        ):
            losses.setdefault(lost, []).append(op)
    retired: set[bytes] = set()
    changed = True
    while changed:
        changed = False
        for member in sorted(admins - retired):
            own = counted.get(member)
            if own is None:
                continue
            others = [counted.get(m) for m in admins - retired - {member}]
            for loss in losses.get(member, ()):
                if not loss.in_past_of(own):
                    continue
                if all(vv is not None and loss.in_past_of(vv) for vv in others):
                    retired.add(member)
                    changed = True
                    break
    ack_set = frozenset(admins - retired)
    waiting = frozenset(m for m in ack_set if m not in counted)
    final: dict[bytes, int] = {}
    if not ack_set:
        # Every ever-admin retired: each lost admin for good with that loss in every
        # other's counted ack, and none is admin now, so the fallback found no member to
        # make admin either. No op that needs admin rights can still arrive, and the
        # vacuous rule (every AckSet member acked it) makes all we hold final. Returning
        # nothing here instead would un-finalize what was final a moment before.
        final = dict(frontier)
    elif not waiting:
        final = vv_min(counted[m] for m in ack_set)
    return Finality(ack_set, frozenset(retired), waiting, final, counted)


def latest_by_author(vectors: Iterable[tuple[bytes, int, Vector]]) -> dict[bytes, Vector]:
    """Author tag → the vector of its delta with the highest sequence number, from
    (author, seq, vv) triples: an author's latest delta is its implicit ack."""
    best: dict[bytes, tuple[int, Vector]] = {}
    for author, seq, vv in vectors:
        t = tag(author)
        known = best.get(t)
        if known is None or seq > known[0]:
            best[t] = (seq, vv)
    return {t: vv for t, (_, vv) in best.items()}
