"""Authorization by causal history: the membership ruleset as a pure function (DESIGN §7.1).

Theory of operation
-------------------
Membership changes are *operations* (`Op`): signed deltas in the context's DAG whose header
names an action (create, grant, remove, leave, rotate, admit, revoke). Every delta carries
its author's sequence number and a version vector `vv` (author tag → highest sequence number
of that author in the delta's causal past, itself included), so "is operation r in the past
of x" is `x.vv[r.author] >= r.seq`: O(1), and the same on every node.

A verdict is a pure function of the *set* of operations a node holds; arrival order never
matters. `resolve` computes it in three steps:

1. **Losses.** An operation that takes powers away from a member X — a removal, a leave, a
   demotion — is a *loss* of the powers X held just before it (`Op.prior_role`, computed
   inside the operation's own past when it arrived).
2. **Filters (strong removal).** For each valid loss r of X:
   - R1: X's operations concurrent with r that need a lost power are filtered — except X's
     own losses (a removal, demotion or leave), because concurrent removals all stand;
   - an admission concurrent with its *inviter's* loss of admin is filtered (the inviter's
     authority is what it spends);
   - R2: grants and admissions of X concurrent with r that confer a lost power are filtered:
     a removal beats a concurrent re-add or promotion.
   Two concurrent admissions that spend one invitation for *different* members mean the
   one-time secret leaked: both are filtered (picking a winner by hash would let whoever
   holds the leaked secret grind ids until it wins).
3. **Authority (R4).** Operations are replayed in a topological order; each stands only if
   its author holds the needed role in the roles computed from the *standing* operations of
   its own past. A grant made by a filtered admin, and whatever its grantee did with it,
   fall together; an operation that merely has a filtered one among its ancestors does not.

Filters are built from every loss in the set (standing or not), so they only grow as ops
arrive: a filtered op never comes back, and resolution is a single pass.

**Roles at a point** (`roles_from`): for each member, the standing operations about it in
that past; only the maximal ones count (not in the past of another); any removal or leave
among them means "not a member", else the lowest granted role wins. If that leaves members
but no admin, the most senior *ever-admin* that did not leave is reinstated as admin (the
creator first), so a context is never left without an admin; seniority is the order of the
first admin grant in the topological order.

**Data deltas** (`Resolution.verdict`): accepted iff the author is an admin or member in the
roles of its past, it does not equivocate (no other delta with the same author and sequence
number), no standing loss of its write right is concurrent with it and blind to it (the
loss's `vv` has not seen that sequence number), and its key is *admissible*: introduced by a
standing key operation in its past that follows every removal and leave in that past.
Filtered and invalid deltas stay in the DAG as no-ops, so their descendants are judged on
their own merits.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Container, Iterable, Mapping
from enum import StrEnum
from typing import Final

import attrs

ROLES: Final = ("admin", "member", "read-only")
WRITERS: Final = frozenset({"admin", "member"})
_RANK: Final = {"read-only": 1, "member": 2, "admin": 3}
_POWERS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset(),
    "read-only": frozenset({"read"}),
    "member": frozenset({"read", "write"}),
    "admin": frozenset({"read", "write", "admin"}),
}
TAG_BYTES: Final = 8
"""Version vectors name authors by the first 8 bytes of their key: a member who grinds keys
to collide with another member's tag needs ~2^64 work."""


def tag(author: bytes) -> bytes:
    return author[:TAG_BYTES]


class Kind(StrEnum):
    CREATE = "create"
    GRANT = "grant"
    REMOVE = "remove"
    LEAVE = "leave"
    ROTATE = "rotate"
    ADMIT = "admit"
    REVOKE = "revoke"
    UPGRADE = "upgrade"


_NEEDS: Final = {
    Kind.CREATE: None,
    Kind.GRANT: "admin",
    Kind.REMOVE: "admin",
    Kind.ADMIT: "admin",
    Kind.REVOKE: "admin",
    Kind.UPGRADE: "admin",
    Kind.ROTATE: "write",
    Kind.LEAVE: None,
}
_KEYED: Final = frozenset({Kind.CREATE, Kind.REMOVE, Kind.ROTATE})


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    FILTERED = "filtered"
    """Valid when written, cancelled by a concurrent loss of its author's rights."""
    INVALID = "invalid"
    """The author lacked the right in its own (resolved) past, or used a stale key."""


@attrs.frozen
class Op:
    """One membership operation, as the resolver sees it (decoded and signature-checked)."""

    id: bytes
    author: bytes
    seq: int
    vv: Mapping[bytes, int]
    """Author tag → highest sequence number in this op's causal past, itself included."""
    kind: Kind
    target: bytes | None = None
    """The member a grant, removal or admission is about."""
    role: str | None = None
    invitation_id: bytes | None = None
    inviter: bytes | None = None
    invitee: bytes | None = None
    """Admission: the member key the invitation was restricted to (None: a secret)."""
    expires_at: int | None = None
    """Admission: the invitation's expiry (NTP64), checked against `hlc`."""
    hlc: int = 0
    key_id: int | None = None
    """Create, remove and rotate introduce a key; its id."""
    prior_role: str | None = None
    """The subject's role just before, in this op's own past (set by `AuthGraph.add`)."""
    parents: tuple[bytes, ...] = ()
    """The maximal ops in this op's past (its *auth parents*): op-to-op ancestry is by
    these hashes, so a forked sequence number cannot place an op in another's past."""
    application_id: bytes | None = None
    """Upgrade: the application the context moves to."""
    app_version: str | None = None
    """Upgrade: its version."""
    app_name: str | None = None
    """Create, upgrade (format 3): the app's name, its bundle's blob and signer, so a
    member without the app can fetch it (`trionode.context.app_upgrades`)."""
    bundle_blob_id: bytes | None = None
    app_signer: bytes | None = None
    ancestors: frozenset[bytes] = frozenset()
    """Every op in this op's past (set by `AuthGraph.add` from `parents`)."""

    def in_past_of(self, vv: Mapping[bytes, int]) -> bool:
        return vv.get(tag(self.author), 0) >= self.seq

    @property
    def subject(self) -> bytes | None:
        return self.author if self.kind is Kind.LEAVE else self.target

    @property
    def depth(self) -> int:
        return len(self.ancestors)

    @property
    def order_key(self) -> tuple[int, bytes]:
        """A topological order: an op has more ancestors than any of its ancestors."""
        return (self.depth, self.id)

    def precedes(self, other: Op) -> bool:
        return self.id in other.ancestors

    @property
    def lost(self) -> frozenset[str]:
        """Powers this op takes away from its subject."""
        if self.kind in (Kind.REMOVE, Kind.LEAVE):
            return _POWERS[self.prior_role]
        if self.kind is Kind.GRANT:
            return _POWERS[self.prior_role] - _POWERS[self.role]
        return frozenset()

    @property
    def is_pure_loss(self) -> bool:
        return self.kind in (Kind.REMOVE, Kind.LEAVE) or (
            self.kind is Kind.GRANT and bool(self.lost)
        )

    @property
    def conferred(self) -> frozenset[str]:
        if self.kind in (Kind.GRANT, Kind.ADMIT):
            return _POWERS[self.role] - _POWERS[self.prior_role]
        return frozenset()


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """A total order on version strings, the same on every node: the parts between `.`,
    `-` and `+` compare left to right, numbers by value and before words (`0.10` > `0.9`),
    and a version that extends another is higher (`1.0.1` > `1.0`)."""
    parts = re.split(r"[.\-+]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def application_of(resolution: Resolution) -> Op | None:
    """The standing upgrade that decides the context's application (None: never upgraded):
    the highest version, then the highest application id. Every node holding the same ops
    picks the same one, whatever order they arrived in, so concurrent upgrades converge;
    an upgrade filtered with its author's lost admin rights does not count."""
    upgrades = [
        op
        for i, op in resolution.ops.items()
        if op.kind is Kind.UPGRADE and i in resolution.standing and op.app_version
    ]
    return max(
        upgrades,
        key=lambda op: (version_key(op.app_version or ""), op.application_id or b""),
        default=None,
    )


def base_application_of(resolution: Resolution) -> Op | None:
    """The create op, if it names the app the context started with (format 3): what the
    context runs when no upgrade stands, e.g. once the only upgrade is filtered."""
    for op in resolution.ops.values():
        if op.kind is Kind.CREATE and op.application_id is not None:
            return op
    return None


def concurrent(a: Op, b: Op) -> bool:
    return not a.precedes(b) and not b.precedes(a)


class _Roles:
    """`roles_from`, built one op at a time in a topological order (an op after its
    ancestors), so that the roles after each of n ops cost O(n) in all, not O(n^2): each op
    touches only its subject's maximal ops. `resolve` keeps one for the standing ops so far:
    a context that admits its members one after another is judged in one pass."""

    def __init__(self) -> None:
        self._top: dict[bytes, list[Op]] = {}
        """Member → the maximal ops about it (none of them in the past of another)."""
        self._first: dict[bytes, tuple[int, bytes]] = {}
        """Member → the least order key of the ops about it (seniority in the fallback)."""
        self._admin_grants: dict[bytes, tuple[int, bytes]] = {}
        self._left: set[bytes] = set()
        self._roles: dict[bytes, str] = {}
        """The roles before the fallback that keeps an admin."""
        self._admins = 0

    def add(self, op: Op) -> None:
        """Take `op` into account; no op added before may have it in its past."""
        if op.kind is Kind.CREATE:
            member = op.author
            self._admin_grants[member] = min(
                self._admin_grants.get(member, op.order_key), op.order_key
            )
        elif op.kind in (Kind.GRANT, Kind.ADMIT, Kind.REMOVE) and op.target is not None:
            member = op.target
            if op.kind is not Kind.REMOVE and op.role == "admin":
                first = self._admin_grants.get(member, op.order_key)
                self._admin_grants[member] = min(first, op.order_key)
        elif op.kind is Kind.LEAVE:
            member = op.author
            self._left.add(member)
        else:
            return
        # Nothing added earlier follows `op`, so it is maximal, and it hides exactly the
        # maximal ops in its past.
        top = [o for o in self._top.get(member, ()) if not o.precedes(op)]
        top.append(op)
        self._top[member] = top
        self._first[member] = min(self._first.get(member, op.order_key), op.order_key)
        if self._roles.pop(member, None) == "admin":
            self._admins -= 1
        if any(o.kind in (Kind.REMOVE, Kind.LEAVE) for o in top):
            return
        granted = ["admin" if o.kind is Kind.CREATE else (o.role or "read-only") for o in top]
        role = min(granted, key=_RANK.__getitem__)
        self._roles[member] = role
        if role == "admin":
            self._admins += 1

    def view(self) -> Mapping[bytes, str]:
        """The roles now (not to be changed by the caller: it may be the builder's own)."""
        if not self._roles or self._admins:
            return self._roles
        # Concurrency emptied the admin set (mutual removal, concurrent leaves): reinstate
        # the most senior ever-admin that did not leave on its own (the creator first).
        roles = dict(self._roles)
        candidates = sorted((k, m) for m, k in self._admin_grants.items() if m not in self._left)
        if candidates:
            roles[candidates[0][1]] = "admin"
        else:
            roles[min(roles, key=self._first.__getitem__)] = "admin"
        return roles


def roles_from(ops: Iterable[Op]) -> dict[bytes, str]:
    """Member → role from a causally closed set of *standing* ops (see module doc)."""
    builder = _Roles()
    for op in sorted(ops, key=lambda o: o.order_key):
        builder.add(op)
    return dict(builder.view())


_WRITE_KEYS_KEPT: Final = 16
"""`Resolution.write_key` answers kept per resolution (one per set of keys held)."""


@attrs.frozen
class Resolution:
    ops: Mapping[bytes, Op]
    standing: frozenset[bytes]
    filtered: frozenset[bytes]
    _roles_cache: dict[frozenset[bytes], dict[bytes, str]] = attrs.field(
        factory=dict, eq=False, repr=False
    )
    _keys_cache: dict[tuple[frozenset[bytes], frozenset[bytes]], set[int]] = attrs.field(
        factory=dict, eq=False, repr=False
    )
    _current: dict[bytes, str] | None = attrs.field(default=None, eq=False, repr=False)
    """The roles of every standing op, when the resolver built them already."""
    _write_keys: dict[frozenset[int] | None, int | None] = attrs.field(
        factory=dict, init=False, eq=False, repr=False
    )
    """`write_key` of a past that holds every op, by the keys held (every local write asks;
    a new resolution starts it anew)."""
    _frontier: dict[bytes, int] = attrs.field(factory=dict, init=False, eq=False, repr=False)
    """Author tag → the highest sequence number of an op by it: a past holds every op iff
    its vector reaches this (`covers`)."""

    def __attrs_post_init__(self) -> None:
        frontier = self._frontier
        for op in self.ops.values():
            t = tag(op.author)
            if op.seq > frontier.get(t, 0):
                frontier[t] = op.seq

    def covers(self, vv: Mapping[bytes, int]) -> bool:
        """Whether every op is in the past named by `vv`: then that past's standing ops,
        roles and keys are the resolution's own, and no loss is concurrent with it. The
        common case (a delta written after its author heard of every membership change):
        O(authors of ops) instead of a scan of every op per question (issue #16: ~25
        `in_past_of` calls per received delta)."""
        return all(vv.get(t, 0) >= seq for t, seq in self._frontier.items())

    def invalid(self) -> frozenset[bytes]:
        return frozenset(self.ops) - self.standing - self.filtered

    def verdict_of_op(self, op_id: bytes) -> Verdict:
        if op_id in self.standing:
            return Verdict.ACCEPTED
        return Verdict.FILTERED if op_id in self.filtered else Verdict.INVALID

    def standing_in_past(self, vv: Mapping[bytes, int] | None) -> frozenset[bytes]:
        """Standing ops in the past of `vv` (None: all of them)."""
        if vv is None or self.covers(vv):
            return self.standing
        return frozenset(i for i in self.standing if self.ops[i].in_past_of(vv))

    def roles_at(self, vv: Mapping[bytes, int] | None) -> dict[bytes, str]:
        if self._current is not None and (vv is None or self.covers(vv)):
            return self._current
        key = self.standing_in_past(vv)
        cached = self._roles_cache.get(key)
        if cached is None:
            cached = roles_from(self.ops[i] for i in key)
            self._roles_cache[key] = cached
        return cached

    def current(self) -> dict[bytes, str]:
        """Roles with every standing op taken into account."""
        return self.roles_at(None)

    def losses_of(self, member: bytes, power: str) -> list[Op]:
        return [o for o in self.ops.values() if o.subject == member and power in o.lost]

    def admissible_keys(self, vv: Mapping[bytes, int] | None) -> set[int]:
        """Key ids a delta with this past may use: introduced by a standing key op in the
        past that follows every standing removal and leave in that past."""
        partial = None if vv is None or self.covers(vv) else vv  # (None: every op)
        standing = self.standing_in_past(partial)
        leaked = frozenset(
            i
            for i in self.filtered
            if self.ops[i].kind is Kind.ADMIT
            and (partial is None or self.ops[i].in_past_of(partial))
        )
        cached = self._keys_cache.get((standing, leaked))
        if cached is not None:
            return cached
        past = [self.ops[i] for i in standing]
        losses = [o for o in past if o.kind in (Kind.REMOVE, Kind.LEAVE)]
        # A filtered admission still handed its member the keys of the moment (the join
        # response): keys must move on past it too (the leaked-secret case).
        losses += [self.ops[i] for i in leaked]
        out: set[int] = set()
        for op in past:
            if (
                op.kind in _KEYED
                and op.key_id is not None
                and all(r is op or r.precedes(op) for r in losses)
            ):
                out.add(op.key_id)
        self._keys_cache[(standing, leaked)] = out
        return out

    def write_key(
        self, vv: Mapping[bytes, int] | None, held: Container[int] | None = None
    ) -> int | None:
        """The key a new delta with this past should use: the admissible one (among those
        `held`) of greatest (depth, id); None when there is none (rotate first)."""
        if (vv is None or self.covers(vv)) and (held is None or isinstance(held, Collection)):
            # (Every op in the past: the answer depends on the keys held alone.)
            known = None if held is None else frozenset(held)
            cache = self._write_keys
            if known not in cache:
                if len(cache) >= _WRITE_KEYS_KEPT:
                    cache.clear()
                cache[known] = self._write_key(None, held)
            return cache[known]
        return self._write_key(vv, held)

    def _write_key(self, vv: Mapping[bytes, int] | None, held: Container[int] | None) -> int | None:
        keys = {k for k in self.admissible_keys(vv) if held is None or k in held}
        best: tuple[tuple[int, bytes], int] | None = None
        for i in self.standing_in_past(vv):
            op = self.ops[i]
            if op.key_id in keys and (best is None or op.order_key > best[0]):
                best = (op.order_key, op.key_id)
        return None if best is None else best[1]

    def verdict(
        self,
        *,
        author: bytes,
        seq: int,
        vv: Mapping[bytes, int],
        key_id: int,
        equivocating: bool = False,
    ) -> tuple[Verdict, str]:
        """The verdict on a data delta (see module doc) and a reason for logs."""
        role = self.roles_at(vv).get(author)
        if role not in WRITERS:
            return Verdict.INVALID, "author may not write"
        if equivocating:
            return Verdict.FILTERED, "equivocation"
        # (A past that holds every op holds every loss: none is concurrent with it.)
        for loss in () if self.covers(vv) else self.losses_of(author, "write"):
            if not loss.in_past_of(vv) and loss.vv.get(tag(author), 0) < seq:
                return Verdict.FILTERED, "concurrent with the author's removal or demotion"
        if key_id not in self.admissible_keys(vv):
            return Verdict.INVALID, "stale key"
        return Verdict.ACCEPTED, ""


def resolve(ops: Mapping[bytes, Op]) -> Resolution:
    """The standing and filtered sets of a set of (statically valid) ops."""
    order = sorted(ops.values(), key=lambda o: o.order_key)
    by_invitation: dict[bytes, list[Op]] = {}
    for op in order:
        if op.kind is Kind.ADMIT and op.invitation_id is not None:
            by_invitation.setdefault(op.invitation_id, []).append(op)
    leaked: set[bytes] = set()
    for spends in by_invitation.values():
        for i, a in enumerate(spends):
            for b in spends[i + 1 :]:
                if a.target != b.target and concurrent(a, b):
                    leaked.update((a.id, b.id))
    # The filter is built from every loss in the set, standing or not (as p2panda does):
    # it only grows as ops arrive, so a filtered op never comes back, and the computation
    # is one pass. The cost: a loss written by someone whose own authority is later found
    # void still filters its target's concurrent ops.
    filtered = set(leaked)
    for r in order:
        lost = r.lost
        if not lost:
            continue
        x = r.subject
        for o in order:
            if o is r or not concurrent(o, r):
                continue
            need = _NEEDS[o.kind]
            by_x = o.author == x and need in lost and not o.is_pure_loss
            inviter = o.kind is Kind.ADMIT and o.inviter == x and "admin" in lost
            regrant = o.target == x and bool(o.conferred & lost)
            if by_x or inviter or regrant:
                filtered.add(o.id)
    standing: list[Op] = []
    standing_ids: set[bytes] = set()
    so_far = _Roles()  # the roles of every standing op so far
    for op in order:
        if op.id in filtered:
            continue
        if standing_ids <= op.ancestors:
            # Its past holds every standing op so far (the common case: ops written one
            # after another): no need to rebuild the roles from scratch.
            roles: Mapping[bytes, str] = so_far.view()
        else:
            roles = roles_from(o for o in standing if o.precedes(op))
        if _permitted(op, roles):
            standing.append(op)
            standing_ids.add(op.id)
            so_far.add(op)
    return Resolution(
        dict(ops), frozenset(standing_ids), frozenset(filtered), current=dict(so_far.view())
    )


def _permitted(op: Op, roles: Mapping[bytes, str]) -> bool:
    role = roles.get(op.author)
    need = _NEEDS[op.kind]
    if op.kind is Kind.CREATE:
        return not roles
    if op.kind is Kind.ADMIT and (op.inviter is None or roles.get(op.inviter) != "admin"):
        return False
    if need is None:
        return role is not None
    return need in _POWERS[role]


class StaticError(Exception):
    """An op that no honest node writes: rejected outright, never stored or forwarded."""


@attrs.define
class AuthGraph:
    """The ops of one context, with the resolution cached until the next `add`."""

    ops: dict[bytes, Op] = attrs.field(factory=dict)
    _resolution: Resolution | None = None
    _static: dict[frozenset[bytes], Resolution] = attrs.field(factory=dict)
    """Resolutions of pasts (a past never changes, so neither does its resolution)."""

    def static_resolution(self, vv: Mapping[bytes, int]) -> Resolution:
        """The resolution *inside* the past named by `vv`: what the static checks use."""
        whole = self.resolution()
        if whole.covers(vv):
            return whole  # (the past holds every op: it is the resolution of them all)
        past = frozenset(i for i, o in self.ops.items() if o.in_past_of(vv))
        cached = self._static.get(past)
        if cached is None:
            if len(self._static) >= 256:
                self._static.pop(next(iter(self._static)))
            cached = resolve({i: self.ops[i] for i in past})
            self._static[past] = cached
        return cached

    def check_data(self, author: bytes, vv: Mapping[bytes, int], key_id: int) -> None:
        """Static checks of a data delta: its author could write, with that key, where it
        wrote (raises StaticError; see `Resolution.verdict` for the resolved verdict)."""
        resolution = self.static_resolution(vv)
        if resolution.roles_at(vv).get(author) not in WRITERS:
            raise StaticError("the author may not write here")
        if key_id not in resolution.admissible_keys(vv):
            raise StaticError("stale key: the delta's key does not follow a removal in its past")

    def past(self, vv: Mapping[bytes, int], *, exclude: bytes | None = None) -> dict[bytes, Op]:
        return {i: o for i, o in self.ops.items() if o.in_past_of(vv) and i != exclude}

    def check(self, op: Op) -> Op:
        """Static checks inside the op's own past; returns the op with `prior_role` set.

        Raises StaticError for an op its author had no right to write where it wrote it.
        The past is complete whenever ops are added in causal order (the delta processor
        applies a delta only after its parents).
        """
        ancestors: set[bytes] = set()
        for parent in op.parents:
            known = self.ops.get(parent)
            if known is None:
                raise StaticError("an auth parent is unknown")
            ancestors.add(parent)
            ancestors.update(known.ancestors)
        past = self.past(op.vv, exclude=op.id)
        # The parents are the maximal ops of the past: the past is the parents and their
        # ancestors, and no parent is in another's past (then every other op of the past is
        # in some parent's past, and no parent is). Checked so, not by comparing every pair
        # of ops of the past: that was O(n^2) for each admission into a context of n ops.
        if set(past) != ancestors or any(
            p in self.ops[q].ancestors for p in op.parents for q in op.parents
        ):
            raise StaticError("the auth parents do not match the delta's past")
        op = attrs.evolve(op, ancestors=frozenset(ancestors))
        # An op written after every op we hold (the common case) is judged by the
        # resolution of everything, which is cached between ops.
        resolution = (
            None if not past else self.resolution() if len(past) == len(self.ops) else resolve(past)
        )
        roles = resolution.current() if resolution is not None else {}
        role = roles.get(op.author)
        if op.kind is Kind.CREATE:
            if past:
                raise StaticError("a context is created once")
            if op.key_id is None:
                raise StaticError("creation introduces the first key")
            return attrs.evolve(op, prior_role=None)
        if role is None:
            raise StaticError("the author is not a member here")
        need = _NEEDS[op.kind]
        if need is not None and need not in _POWERS[role]:
            raise StaticError(f"{op.kind} needs {need} rights")
        admins = [m for m, r in roles.items() if r == "admin"]
        prior = roles.get(op.subject) if op.subject is not None else None
        if op.kind in _KEYED and op.key_id is None:
            raise StaticError(f"{op.kind} must introduce a key")
        if op.kind is Kind.GRANT:
            if op.target is None or op.role not in ROLES:
                raise StaticError("a grant names a member and a role")
            if op.target == op.author and op.role != "admin" and admins == [op.author]:
                raise StaticError("the last admin cannot demote itself")
        elif op.kind is Kind.REMOVE:
            if op.target is None or prior is None:
                raise StaticError("only members can be removed")
            if op.target == op.author:
                raise StaticError("leave instead of removing yourself")
        elif op.kind is Kind.LEAVE:
            if role == "admin" and admins == [op.author]:
                raise StaticError("the last admin cannot leave")
        elif op.kind is Kind.ADMIT:
            self._check_admit(op, roles, past)
        elif op.kind is Kind.UPGRADE:
            if op.application_id is None or not op.app_version:
                raise StaticError("an upgrade names an application and its version")
            # The proposing node checks this too, but a hostile admin's node would not:
            # every member judges it, so an upgrade can never switch the context to a
            # different app. (A create op from before format 3 names no app: unchecked.)
            created = next((o for o in past.values() if o.kind is Kind.CREATE), None)
            named = None if created is None else created.app_name
            if named is not None and op.app_name != named:
                raise StaticError("an upgrade moves to a new version of the same app")
        return attrs.evolve(op, prior_role=prior)

    @staticmethod
    def _check_admit(op: Op, roles: Mapping[bytes, str], past: Mapping[bytes, Op]) -> None:
        if op.target is None or op.role not in ROLES or op.invitation_id is None:
            raise StaticError("an admission names a member, a role and an invitation")
        if op.inviter is None or roles.get(op.inviter) != "admin":
            raise StaticError("the inviter is not an admin here")
        if op.invitee is not None and op.invitee != op.target:
            raise StaticError("the invitation is for another member key")
        if op.expires_at is None or op.expires_at < op.hlc:
            raise StaticError("the invitation had expired")
        for earlier in past.values():
            if earlier.invitation_id == op.invitation_id and earlier.kind is Kind.REVOKE:
                raise StaticError("the invitation was revoked")
            if (
                earlier.invitation_id == op.invitation_id
                and earlier.kind is Kind.ADMIT
                and earlier.target != op.target
            ):
                raise StaticError("the invitation was already used")

    def add(self, op: Op) -> Op:
        known = self.ops.get(op.id)
        if known is not None:  # the same signed op again (a snapshot's export, then gossip)
            return known
        checked = self.check(op)
        self.ops[checked.id] = checked
        self._resolution = None
        return checked

    def insert_checked(self, op: Op) -> None:
        """Put back an op checked before (a restart), without checking it again."""
        self.ops[op.id] = op
        self._resolution = None

    def resolution(self) -> Resolution:
        if self._resolution is None:
            self._resolution = resolve(self.ops)
        return self._resolution
