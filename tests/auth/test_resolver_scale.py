"""The resolver's cost in a context of many members (issue #16, scale rows): every node
checks every admission and resolves the ops again after it, so anything quadratic in the
ops here was cubic in the members across a cluster of members (100 nodes joining through one
inviter took 2.7 s per join at 90 members). The work is counted (ancestry tests, role
rebuilds), never timed; the incremental algorithms are compared with the plain definitions
on random histories."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given, settings, strategies as st

from tests.auth.auth_helpers import PEOPLE, member, random_history
from trionode.auth import model
from trionode.auth.model import _RANK, AuthGraph, Kind, Op, resolve, roles_from, tag

step = st.tuples(
    st.sampled_from(["write", "grant", "demote", "remove", "leave", "rotate", "merge"]),
    st.integers(0, len(PEOPLE) - 1),
    st.integers(0, len(PEOPLE) - 1),
    st.sampled_from(["admin", "member", "read-only"]),
)


def reference_roles(ops: Iterable[Op]) -> dict[bytes, str]:
    """The module doc's definition of roles, computed from scratch."""
    about: dict[bytes, list[Op]] = {}
    admin_grants: dict[bytes, tuple[int, bytes]] = {}
    left: set[bytes] = set()
    for op in ops:
        if op.kind is Kind.CREATE:
            about.setdefault(op.author, []).append(op)
            admin_grants[op.author] = min(admin_grants.get(op.author, op.order_key), op.order_key)
        elif op.kind in (Kind.GRANT, Kind.ADMIT, Kind.REMOVE) and op.target is not None:
            about.setdefault(op.target, []).append(op)
            if op.kind is not Kind.REMOVE and op.role == "admin":
                first = admin_grants.get(op.target, op.order_key)
                admin_grants[op.target] = min(first, op.order_key)
        elif op.kind is Kind.LEAVE:
            about.setdefault(op.author, []).append(op)
            left.add(op.author)
    roles: dict[bytes, str] = {}
    for who, history in about.items():
        top = [o for o in history if not any(o.precedes(u) for u in history)]
        if any(o.kind in (Kind.REMOVE, Kind.LEAVE) for o in top):
            continue
        granted = ["admin" if o.kind is Kind.CREATE else (o.role or "read-only") for o in top]
        roles[who] = min(granted, key=_RANK.__getitem__)
    if roles and "admin" not in roles.values():
        candidates = sorted((k, m) for m, k in admin_grants.items() if m not in left)
        if candidates:
            roles[candidates[0][1]] = "admin"
        else:
            senior = min(roles, key=lambda m: min(o.order_key for o in about[m]))
            roles[senior] = "admin"
    return roles


def reference_standing(ops: Mapping[bytes, Op], filtered: frozenset[bytes]) -> frozenset[bytes]:
    """R4 by its definition: each op judged by the roles of the standing ops of its past."""
    standing: list[Op] = []
    for op in sorted(ops.values(), key=lambda o: o.order_key):
        if op.id not in filtered and model._permitted(
            op, reference_roles(o for o in standing if o.precedes(op))
        ):
            standing.append(op)
    return frozenset(o.id for o in standing)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=25), st.randoms(use_true_random=False))
def test_roles_and_standing_match_their_definitions(
    steps: list[tuple[str, int, int, str]], rnd: object
) -> None:
    graph = random_history(steps).graph()
    ops = list(graph.ops.values())
    resolution = graph.resolution()
    assert resolution.standing == reference_standing(graph.ops, resolution.filtered)
    assert roles_from(ops) == reference_roles(ops)
    standing = [graph.ops[i] for i in resolution.standing]
    assert roles_from(standing) == reference_roles(standing)
    some = [o for o in ops if rnd.random() < 0.5]  # type: ignore[attr-defined]
    assert roles_from(some) == reference_roles(some)


CREATOR = member("creator")


def admissions(n: int) -> list[Op]:
    """A context its creator admits `n` members into, one after another (the ops of one
    inviter: each op's past is every op before it)."""
    ops: list[Op] = []
    for seq in range(1, n + 2):
        op_id = hashlib.sha256(b"op%d" % seq).digest()
        vv = {tag(CREATOR): seq}
        parents = (ops[-1].id,) if ops else ()
        if seq == 1:
            op = Op(op_id, CREATOR, seq, vv, Kind.CREATE, key_id=1, parents=parents)
        else:
            op = Op(
                op_id,
                CREATOR,
                seq,
                vv,
                Kind.ADMIT,
                target=member(f"m{seq}"),
                role="member",
                invitation_id=hashlib.sha256(b"inv%d" % seq).digest(),
                inviter=CREATOR,
                expires_at=2**62,
                parents=parents,
            )
        ops.append(op)
    return ops


def graph_of(ops: list[Op]) -> AuthGraph:
    graph = AuthGraph()
    for op in ops:
        graph.add(op)
    return graph


class Work:
    """Counts ancestry tests and rebuilds of roles from scratch while it is in place."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.precedes = 0
        self.rebuilds = 0
        precedes, rebuild = Op.precedes, model.roles_from

        def counted_precedes(op: Op, other: Op) -> bool:
            self.precedes += 1
            return precedes(op, other)

        def counted_rebuild(ops: Iterable[Op]) -> dict[bytes, str]:
            self.rebuilds += 1
            return rebuild(ops)

        monkeypatch.setattr(Op, "precedes", counted_precedes)
        monkeypatch.setattr(model, "roles_from", counted_rebuild)


@pytest.mark.parametrize("members", [20, 300])
def test_an_admission_costs_no_pairwise_work_however_many_members(
    members: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = admissions(members)
    graph = AuthGraph()
    for op in ops[:-1]:
        graph.add(op)
    graph.resolution()
    work = Work(monkeypatch)
    graph.add(ops[-1])  # what each node does when a member joins
    resolution = graph.resolution()
    assert len(resolution.standing) == members + 1
    assert resolution.current()[ops[-1].target or b""] == "member"
    # Before: the check compared every pair of the past's ops (~members^2 / 2 ancestry
    # tests) and the resolution rebuilt the roles once per op (members + 3 rebuilds).
    assert work.precedes == 0
    assert work.rebuilds == 0


def test_resolving_many_admissions_is_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = dict(graph_of(admissions(300)).ops)
    work = Work(monkeypatch)
    resolution = resolve(ops)
    assert len(resolution.standing) == 301
    assert work.precedes == 0
    assert work.rebuilds == 0


def test_concurrent_admissions_by_two_admins_are_still_judged_by_their_own_past() -> None:
    """Two admins admit at once (joins spread over inviters): each admission sees only its
    own branch; one that its inviter could not make there stays out."""
    ops = admissions(3)
    graph = graph_of(ops)
    head = ops[-1]
    second = member("second-admin")
    grant = Op(
        id=b"g" * 32,
        author=CREATOR,
        seq=head.seq + 1,
        vv={tag(CREATOR): head.seq + 1},
        kind=Kind.GRANT,
        target=second,
        role="admin",
        parents=(head.id,),
    )
    graph.add(grant)
    mine = Op(
        id=b"a" * 32,
        author=CREATOR,
        seq=grant.seq + 1,
        vv={tag(CREATOR): grant.seq + 1},
        kind=Kind.ADMIT,
        target=member("x"),
        role="member",
        invitation_id=b"i1" * 16,
        inviter=CREATOR,
        expires_at=2**62,
        parents=(grant.id,),
    )
    theirs = Op(
        id=b"b" * 32,
        author=second,
        seq=1,
        vv={tag(CREATOR): grant.seq, tag(second): 1},
        kind=Kind.ADMIT,
        target=member("y"),
        role="member",
        invitation_id=b"i2" * 16,
        inviter=second,
        expires_at=2**62,
        parents=(grant.id,),
    )
    graph.add(mine)
    graph.add(theirs)
    roles = graph.resolution().current()
    assert roles[member("x")] == roles[member("y")] == "member"
    assert graph.resolution().standing == reference_standing(graph.ops, frozenset())
