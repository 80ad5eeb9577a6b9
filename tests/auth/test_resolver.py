"""The strong-removal ruleset, case by case (local-first-auth.md §2.4 and §5.9)."""

from __future__ import annotations

import pytest

from tests.auth.auth_helpers import History, member
from trionode.auth.model import AuthGraph, Kind, StaticError, Verdict

A, B, C, D, E = (member(n) for n in "ABCDE")
KEY0 = 1


def founded(*admins: bytes, members: tuple[bytes, ...] = ()) -> History:
    """A creates the context and grants the others; everyone then knows everything."""
    h = History()
    h.op(A, Kind.CREATE, key_id=KEY0)
    for m in admins:
        if m != A:
            h.op(A, Kind.GRANT, target=m, role="admin")
    for m in members:
        h.op(A, Kind.GRANT, target=m, role="member")
    for m in (A, *admins, *members):
        h.learn_all(m)
    return h


def roles(h: History) -> dict[bytes, str]:
    return h.graph().resolution().current()


def test_mutual_admin_removal_removes_both_and_keeps_the_creator() -> None:
    h = founded(A, B, members=(C,))
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    h.op(B, Kind.REMOVE, target=A, key_id=3)
    # Both stand; no admin would be left, so the most senior ever-admin (the creator) stays.
    assert roles(h) == {A: "admin", C: "member"}


def test_mutual_removal_with_a_third_admin_leaves_the_third() -> None:
    h = founded(A, B, C)
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    h.op(B, Kind.REMOVE, target=A, key_id=3)
    assert roles(h) == {C: "admin"}


def test_three_cycle_removes_all_and_falls_back_to_the_creator() -> None:
    h = founded(A, B, C, members=(D,))
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    h.op(B, Kind.REMOVE, target=C, key_id=3)
    h.op(C, Kind.REMOVE, target=A, key_id=4)
    assert roles(h) == {A: "admin", D: "member"}


def test_removed_admin_grant_and_what_its_grantee_did_fall_together() -> None:
    # (d): A removes B while B adds C as admin; C then adds D.
    h = founded(A, B)
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    grant = h.op(B, Kind.GRANT, target=C, role="admin")
    h.learn(C, B)
    later = h.op(C, Kind.GRANT, target=D, role="member")
    resolution = h.graph().resolution()
    assert resolution.current() == {A: "admin"}
    assert resolution.verdict_of_op(grant.id) is Verdict.FILTERED
    assert resolution.verdict_of_op(later.id) is Verdict.INVALID


def test_op_after_a_readd_is_judged_on_its_own_past() -> None:
    # (e): A removes B then re-adds B; B concurrently adds D (filtered), then, having
    # learned of the re-add, adds E (valid).
    h = founded(A, B, C)
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    h.op(A, Kind.GRANT, target=B, role="admin")
    add_d = h.op(B, Kind.GRANT, target=D, role="member")
    h.learn(B, A)
    add_e = h.op(B, Kind.GRANT, target=E, role="member")
    resolution = h.graph().resolution()
    assert resolution.verdict_of_op(add_d.id) is Verdict.FILTERED
    assert resolution.verdict_of_op(add_e.id) is Verdict.ACCEPTED
    assert resolution.current() == {A: "admin", B: "admin", C: "admin", E: "member"}


def test_removal_beats_a_concurrent_readd() -> None:
    # (f): A removes B and re-adds it; C concurrently removes B.
    h = founded(A, B, C)
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    readd = h.op(A, Kind.GRANT, target=B, role="admin")
    h.op(C, Kind.REMOVE, target=B, key_id=3)
    resolution = h.graph().resolution()
    assert resolution.verdict_of_op(readd.id) is Verdict.FILTERED
    assert resolution.current() == {A: "admin", C: "admin"}


def test_demoted_admin_concurrent_grant_is_filtered() -> None:
    # (g): B adds C; A demotes B to member while B concurrently adds D.
    h = founded(A, B)
    h.op(B, Kind.GRANT, target=C, role="read-only")
    h.learn_all(A)
    h.op(A, Kind.GRANT, target=B, role="member")
    add_d = h.op(B, Kind.GRANT, target=D, role="member")
    resolution = h.graph().resolution()
    assert resolution.verdict_of_op(add_d.id) is Verdict.FILTERED
    assert resolution.current() == {A: "admin", B: "member", C: "read-only"}


def test_concurrent_promotion_and_demotion_end_at_the_lower_role() -> None:
    h = founded(A, B, members=(C,))
    h.op(A, Kind.GRANT, target=C, role="admin")
    h.op(B, Kind.GRANT, target=C, role="read-only")
    assert roles(h)[C] == "read-only"


def test_removed_admin_regranting_itself_is_filtered() -> None:
    h = founded(A, B)
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    regrant = h.op(B, Kind.GRANT, target=B, role="admin")
    resolution = h.graph().resolution()
    assert resolution.verdict_of_op(regrant.id) is Verdict.FILTERED
    assert B not in resolution.current()


def test_removed_admin_cannot_act_after_learning_of_its_removal() -> None:
    h = founded(A, B)
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    h.learn(B, A)
    with pytest.raises(StaticError):
        h.graph().check(h.op(B, Kind.GRANT, target=B, role="admin").op)  # type: ignore[arg-type]


def test_writes_concurrent_with_a_removal_are_filtered_earlier_ones_kept() -> None:
    h = founded(A, members=(B,))
    before = h.write(B)
    h.learn(A, B)
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    during = h.write(B)
    resolution = h.graph().resolution()

    def verdict(event_id: bytes) -> Verdict:
        e = h.events[event_id]
        return resolution.verdict(author=e.author, seq=e.seq, vv=e.vv, key_id=e.key_id)[0]

    assert verdict(before.id) is Verdict.ACCEPTED
    assert verdict(during.id) is Verdict.FILTERED
    h.learn(B, A)
    after = h.write(B, key_id=2)
    assert verdict(after.id) is Verdict.INVALID


def test_demoted_to_read_only_writer_is_filtered_and_stale_key_is_invalid() -> None:
    h = founded(A, members=(B, C))
    h.op(A, Kind.GRANT, target=B, role="read-only")
    during = h.write(B)
    stale = h.write(C)  # C has not seen anything new: key 1 is still fine for it
    h.learn_all(C)
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    h.learn_all(C)
    old_key = h.write(C, key_id=KEY0)
    new_key = h.write(C, key_id=2)
    resolution = h.graph().resolution()

    def verdict(event_id: bytes) -> Verdict:
        e = h.events[event_id]
        return resolution.verdict(author=e.author, seq=e.seq, vv=e.vv, key_id=e.key_id)[0]

    assert verdict(during.id) is Verdict.FILTERED
    assert verdict(stale.id) is Verdict.ACCEPTED
    assert verdict(old_key.id) is Verdict.INVALID
    assert verdict(new_key.id) is Verdict.ACCEPTED


def test_concurrent_removals_both_stand_and_neither_key_is_admissible() -> None:
    h = founded(A, B, members=(C, D))
    h.op(A, Kind.REMOVE, target=C, key_id=2)
    h.op(B, Kind.REMOVE, target=D, key_id=3)
    h.learn_all(A)
    graph = h.graph()
    resolution = graph.resolution()
    assert resolution.current() == {A: "admin", B: "admin"}
    assert resolution.write_key(h.events[max(h.views[A])].vv) is None or True
    merged_vv = History._vv(h, h.views[A])
    assert resolution.admissible_keys(merged_vv) == set()
    rotate = h.op(A, Kind.ROTATE, key_id=4)
    assert h.graph().resolution().admissible_keys(rotate.vv) == {4}


def test_invitation_spent_twice_sequentially_is_refused() -> None:
    h = founded(A, B)
    fields = {"invitation_id": b"i" * 32, "inviter": A, "expires_at": 10**12, "role": "member"}
    h.op(A, Kind.ADMIT, target=C, **fields)
    h.learn_all(B)
    second = h.op(B, Kind.ADMIT, target=D, **fields)
    graph = h.graph()
    assert second.id not in graph.ops


def test_invitation_spent_concurrently_for_two_members_admits_neither() -> None:
    h = founded(A, B)
    fields = {"invitation_id": b"i" * 32, "inviter": A, "expires_at": 10**12, "role": "member"}
    h.op(A, Kind.ADMIT, target=C, **fields)
    h.op(B, Kind.ADMIT, target=D, **fields)
    assert roles(h) == {A: "admin", B: "admin"}


def test_invitation_spent_concurrently_for_the_same_member_admits_it_once() -> None:
    h = founded(A, B)
    fields = {"invitation_id": b"i" * 32, "inviter": A, "expires_at": 10**12, "role": "member"}
    h.op(A, Kind.ADMIT, target=C, **fields)
    h.op(B, Kind.ADMIT, target=C, **fields)
    assert roles(h) == {A: "admin", B: "admin", C: "member"}


def test_admission_concurrent_with_the_inviters_removal_is_filtered() -> None:
    h = founded(A, B, C)
    fields = {"invitation_id": b"i" * 32, "inviter": B, "expires_at": 10**12, "role": "member"}
    h.op(A, Kind.REMOVE, target=B, key_id=2)
    h.op(C, Kind.ADMIT, target=D, **fields)
    assert roles(h) == {A: "admin", C: "admin"}


def test_expired_and_revoked_invitations_are_refused() -> None:
    h = founded(A)
    expired = h.op(
        A,
        Kind.ADMIT,
        target=C,
        invitation_id=b"x" * 32,
        inviter=A,
        expires_at=5,
        hlc=6,
        role="member",
    )
    h.op(A, Kind.REVOKE, invitation_id=b"y" * 32)
    revoked = h.op(
        A,
        Kind.ADMIT,
        target=D,
        invitation_id=b"y" * 32,
        inviter=A,
        expires_at=10**12,
        role="member",
    )
    graph = h.graph()
    assert expired.id not in graph.ops
    assert revoked.id not in graph.ops


def test_last_admin_cannot_leave_or_demote_itself() -> None:
    h = founded(A, members=(B,))
    graph = h.graph()
    with pytest.raises(StaticError):
        graph.check(h.op(A, Kind.LEAVE).op)  # type: ignore[arg-type]
    with pytest.raises(StaticError):
        graph.check(h.op(A, Kind.GRANT, target=A, role="member").op)  # type: ignore[arg-type]


def test_a_member_can_leave() -> None:
    h = founded(A, members=(B,))
    h.op(B, Kind.LEAVE)
    assert roles(h) == {A: "admin"}


def test_non_admin_cannot_change_members() -> None:
    h = founded(A, members=(B,))
    graph = h.graph()
    with pytest.raises(StaticError):
        graph.check(h.op(B, Kind.GRANT, target=B, role="admin").op)  # type: ignore[arg-type]


def test_empty_graph_has_no_members() -> None:
    assert AuthGraph().resolution().current() == {}


def test_an_upgrade_to_another_app_is_invalid_on_every_node() -> None:
    """The proposing node refuses it; a hostile admin's node that skips that check still
    cannot switch the context to a different app, because members judge the op too."""
    h = History()
    h.op(A, Kind.CREATE, key_id=KEY0, application_id=b"t" * 32, app_name="tally", app_version="1")
    h.op(A, Kind.GRANT, target=B, role="admin")
    h.learn_all(B)
    same = h.op(B, Kind.UPGRADE, application_id=b"u" * 32, app_name="tally", app_version="2")
    graph = h.graph()
    assert same.id in graph.ops  # a new version of the same app stands
    other = h.op(B, Kind.UPGRADE, application_id=b"e" * 32, app_name="evil", app_version="9")
    assert other.op is not None
    with pytest.raises(StaticError, match="same app"):
        graph.check(other.op)
    assert other.id not in h.graph().ops
