"""The shortcut for a past that holds every op (`Resolution.covers`): the answers are the
ones the full scan gives, and a membership change that lands between two deltas is
honoured for the second (the shortcut is decided against the ops held *now*)."""

from __future__ import annotations

from unittest.mock import patch

import pytest
from hypothesis import given, settings, strategies as st

from tests.auth.auth_helpers import PEOPLE, History, member, random_history
from trionode.auth.model import AuthGraph, Kind, Resolution, StaticError, Verdict

A, B, C = (member(n) for n in "ABC")

step = st.tuples(
    st.sampled_from(["write", "grant", "demote", "remove", "leave", "rotate", "merge"]),
    st.integers(0, len(PEOPLE) - 1),
    st.integers(0, len(PEOPLE) - 1),
    st.sampled_from(["admin", "member", "read-only"]),
)


def _answers(h: History) -> list[object]:
    """Every write's static check, verdict and write key, and the roles and keys at its
    past, judged by a graph of the history's ops."""
    graph = h.graph()
    resolution = graph.resolution()
    out: list[object] = []
    for e in h.events.values():
        if e.op is not None:
            continue
        try:
            graph.check_data(e.author, e.vv, e.key_id)
            static: object = "ok"
        except StaticError as exc:
            static = str(exc)
        out.append(
            (
                static,
                resolution.verdict(author=e.author, seq=e.seq, vv=e.vv, key_id=e.key_id),
                dict(resolution.roles_at(e.vv)),
                resolution.admissible_keys(e.vv),
                resolution.standing_in_past(e.vv),
                resolution.write_key(e.vv),
            )
        )
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=25))
def test_the_shortcut_answers_as_the_full_scan(steps: list[tuple[str, int, int, str]]) -> None:
    h = random_history(steps)
    for p in PEOPLE:  # and writes that saw everything, where the shortcut applies
        h.learn_all(p)
        h.write(p)
    fast = _answers(h)
    with patch.object(Resolution, "covers", lambda self, vv: False):
        slow = _answers(h)
    assert fast == slow


def test_a_removal_between_two_writes_is_honoured_for_the_second() -> None:
    h = History()
    h.op(A, Kind.CREATE, key_id=1)
    h.op(A, Kind.GRANT, target=B, role="member")
    for m in (A, B, C):
        h.learn_all(m)
    graph = AuthGraph()
    for e in list(h.events.values()):
        assert e.op is not None
        graph.add(e.op)
    first = h.write(B)
    graph.check_data(B, first.vv, first.key_id)  # its past holds every op: the shortcut
    resolution = graph.resolution()
    assert resolution.covers(first.vv)
    assert resolution.verdict(author=B, seq=first.seq, vv=first.vv, key_id=1)[0] is (
        Verdict.ACCEPTED
    )

    h.learn(A, B)
    removal = h.op(A, Kind.REMOVE, target=B, key_id=2)
    assert removal.op is not None
    graph.add(removal.op)
    concurrent = h.write(B)  # B has not heard of it
    h.learn(B, A)
    after = h.write(B, key_id=2)  # B has, and writes with the new key anyway

    now = graph.resolution()
    assert now is not resolution
    assert not now.covers(concurrent.vv)
    assert now.covers(after.vv)
    graph.check_data(B, concurrent.vv, 1)  # valid where it was written ...
    assert now.verdict(author=B, seq=concurrent.seq, vv=concurrent.vv, key_id=1)[0] is (
        Verdict.FILTERED  # ... but concurrent with the removal
    )
    with pytest.raises(StaticError):
        graph.check_data(B, after.vv, 2)
    assert now.verdict(author=B, seq=after.seq, vv=after.vv, key_id=2)[0] is Verdict.INVALID
    # The first write was in the removal's past: it stands.
    assert now.verdict(author=B, seq=first.seq, vv=first.vv, key_id=1)[0] is Verdict.ACCEPTED


def test_a_grant_between_two_writes_counts_for_the_second() -> None:
    h = History()
    h.op(A, Kind.CREATE, key_id=1)
    h.learn_all(C)
    graph = AuthGraph()
    graph.add(next(iter(h.events.values())).op)  # type: ignore[arg-type]
    early = h.write(C)
    with pytest.raises(StaticError):
        graph.check_data(C, early.vv, 1)  # not a member yet, and its past holds every op
    grant = h.op(A, Kind.GRANT, target=C, role="member")
    graph.add(grant.op)  # type: ignore[arg-type]
    h.learn(C, A)
    later = h.write(C)
    graph.check_data(C, later.vv, 1)
    resolution = graph.resolution()
    assert resolution.verdict(author=C, seq=later.seq, vv=later.vv, key_id=1)[0] is (
        Verdict.ACCEPTED
    )
    # The earlier one is still judged on its own past, which lacks the grant.
    assert not resolution.covers(early.vv)
    assert resolution.verdict(author=C, seq=early.seq, vv=early.vv, key_id=1)[0] is (
        Verdict.INVALID
    )
