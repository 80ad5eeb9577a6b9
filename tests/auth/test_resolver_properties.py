"""Random histories of writes, grants, demotions, removals, leaves and merges by several
members: the verdicts do not depend on the order ops arrive in (any causal order), a
context keeps an admin while it has members, and nobody writes after learning of its own
removal."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from tests.auth.auth_helpers import PEOPLE, random_history as build
from trionode.auth.model import Verdict

step = st.tuples(
    st.sampled_from(["write", "grant", "demote", "remove", "leave", "rotate", "merge"]),
    st.integers(0, len(PEOPLE) - 1),
    st.integers(0, len(PEOPLE) - 1),
    st.sampled_from(["admin", "member", "read-only"]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=25), st.randoms(use_true_random=False))
def test_verdicts_do_not_depend_on_arrival_order(
    steps: list[tuple[str, int, int, str]], rnd: object
) -> None:
    h = build(steps)
    ids = list(h.events)
    shuffled = ids[:]
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    one = h.graph().resolution()
    other = h.graph(order=shuffled).resolution()
    assert one.standing == other.standing
    assert one.filtered == other.filtered
    assert one.current() == other.current()
    for e in h.events.values():
        if e.op is None:
            assert one.verdict(
                author=e.author, seq=e.seq, vv=e.vv, key_id=e.key_id
            ) == other.verdict(author=e.author, seq=e.seq, vv=e.vv, key_id=e.key_id)
    roles = one.current()
    if roles:
        assert "admin" in roles.values()


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=25))
def test_no_write_after_learning_of_ones_removal(steps: list[tuple[str, int, int, str]]) -> None:
    h = build(steps)
    resolution = h.graph().resolution()
    for e in h.events.values():
        if e.op is not None:
            continue
        verdict, _ = resolution.verdict(author=e.author, seq=e.seq, vv=e.vv, key_id=e.key_id)
        for loss in resolution.losses_of(e.author, "write"):
            # Unless re-granted after the loss, in the same past.
            if (
                loss.in_past_of(e.vv)
                and loss.id in resolution.standing
                and resolution.roles_at(e.vv).get(e.author) not in ("admin", "member")
            ):
                assert verdict is Verdict.INVALID
