"""Finality over random histories: writes, grants, demotions, removals, leaves, merges and
acks by several members, delivered in random causal orders (acks at random moments) to
three replicas. A delta final on any replica at any moment has the verdict it has once
everything arrived; the final set is ancestor-closed and only grows; all replicas end
with the same final frontier."""

from __future__ import annotations

import contextlib
import random

from hypothesis import given, settings, strategies as st

from tests.auth.auth_helpers import PEOPLE, Event, History, random_history
from trionode.auth.finality import Finality, finality, latest_by_author, vv_max, within
from trionode.auth.model import AuthGraph, Kind, Resolution, StaticError, Verdict, tag

step = st.tuples(
    st.sampled_from(
        ["write", "grant", "demote", "remove", "leave", "merge", "merge", "ack", "ack"]
    ),
    st.integers(0, len(PEOPLE) - 1),
    st.integers(0, len(PEOPLE) - 1),
    st.sampled_from(["admin", "member", "read-only"]),
)

Ack = tuple[bytes, dict[bytes, int]]


def build(steps: list[tuple[str, int, int, str]]) -> tuple[History, list[Ack]]:
    # Acks are signed outside the DAG: a removed admin can still send one.
    acks: list[Ack] = []
    h = random_history(steps, on_ack=lambda who, vv: acks.append((who, vv)))
    return h, acks


def causal_order(h: History, rnd: random.Random) -> list[bytes]:
    left = list(h.events)
    rnd.shuffle(left)
    out: list[bytes] = []
    while left:
        ready = next(i for i in left if not any(_precedes(h.events[j], h.events[i]) for j in left))
        left.remove(ready)
        out.append(ready)
    return out


def _precedes(x: Event, y: Event) -> bool:
    return x.vv != y.vv and within(x.vv, y.vv)


def verdict(resolution: Resolution, e: Event) -> Verdict:
    if e.op is not None:
        return resolution.verdict_of_op(e.id)
    return resolution.verdict(author=e.author, seq=e.seq, vv=e.vv, key_id=e.key_id)[0]


class Replica:
    def __init__(self, h: History) -> None:
        self.h = h
        self.graph = AuthGraph()
        self.held: list[Event] = []
        self.acks: dict[bytes, list[dict[bytes, int]]] = {}

    def deliver(self, e: Event) -> None:
        self.held.append(e)
        if e.op is not None:
            with contextlib.suppress(StaticError):  # no honest node stores it
                self.graph.add(e.op)

    def finality(self) -> Finality:
        latest = latest_by_author((e.author, e.seq, e.vv) for e in self.held)
        candidates = {t: [vv, *self.acks.get(t, [])] for t, vv in latest.items()}
        for t, vvs in self.acks.items():
            candidates.setdefault(t, list(vvs))
        frontier = vv_max(e.vv for e in self.held)
        return finality(self.graph.resolution(), candidates, frontier)


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=30), st.randoms(use_true_random=False))
def test_a_final_verdict_never_changes(
    steps: list[tuple[str, int, int, str]], rnd: random.Random
) -> None:
    h, acks = build(steps)
    full = h.graph().resolution()
    expected = {
        e.id: verdict(full, e) for e in h.events.values() if e.op is None or e.id in full.ops
    }
    ends: list[dict[bytes, int]] = []
    for _ in range(3):
        replica = Replica(h)
        order = causal_order(h, rnd)
        ack_at = sorted(rnd.randrange(len(order) + 1) for _ in acks)
        pending_acks = list(zip(ack_at, acks, strict=True))
        was_final: set[bytes] = set()
        for n, event_id in enumerate([*order, None]):
            while pending_acks and pending_acks[0][0] <= n:
                _, (who, vv) = pending_acks.pop(0)
                replica.acks.setdefault(tag(who), []).append(vv)
            f = replica.finality()
            resolution = replica.graph.resolution()
            final = {e.id for e in replica.held if f.is_final(e.vv)}
            # Ancestor-closed: whatever a final delta has in its past is final too.
            for e in replica.held:
                if e.id in final:
                    for p in replica.held:
                        if _precedes(p, e):
                            assert p.id in final
            for e in replica.held:
                if e.id in final and e.id in expected:
                    assert verdict(resolution, e) is expected[e.id], "a final verdict changed"
            assert was_final <= final, "a final delta became non-final"
            was_final = final
            if event_id is not None:
                replica.deliver(h.events[event_id])
        ends.append(dict(replica.finality().final))
    assert ends[0] == ends[1] == ends[2]


def test_an_admin_that_never_acks_holds_finality_back() -> None:
    h, _ = build([("write", 2, 0, "member")])
    replica = Replica(h)
    for e in h.events.values():
        replica.deliver(e)
    write = next(e for e in h.events.values() if e.op is None)
    everything = vv_max(e.vv for e in h.events.values())
    replica.acks[tag(PEOPLE[0])] = [everything]
    f = replica.finality()
    # B (admin) has said nothing since its grant: only what its grant saw is final.
    assert not f.is_final(write.vv)
    assert f.final == {tag(PEOPLE[0]): 2}
    replica.acks[tag(PEOPLE[1])] = [everything]
    assert replica.finality().is_final(write.vv)


def test_a_removed_admin_retires_once_it_acked_its_removal() -> None:
    h, _ = build([])
    a, b, c = PEOPLE[:3]
    h.op(a, Kind.REMOVE, target=b, key_id=2)
    for p in PEOPLE:
        h.learn_all(p)
    w = h.write(c)
    replica = Replica(h)
    for e in h.events.values():
        replica.deliver(e)
    f = replica.finality()
    assert b in f.ack_set
    assert not f.is_final(w.vv)
    # B's ack with its removal in its past (B's node learnt it) retires B.
    replica.acks[tag(b)] = [h._vv(h.views[b])]
    f = replica.finality()
    assert b in f.retired
    assert b not in f.ack_set
    h.learn_all(a)
    replica.acks[tag(a)] = [vv_max(e.vv for e in h.events.values())]
    assert replica.finality().is_final(w.vv)


def test_finality_stays_when_every_admin_has_left() -> None:
    """The creator grants two admins and leaves, both admins leave concurrently, and one
    of them writes once more (rejected: it had left). Once every ever-admin retired,
    nothing that needs admin rights can arrive: what was final stays final, and all held
    is final (found by the property test above; the AckSet going empty un-finalized it)."""
    h, acks = build(
        [
            ("leave", 0, 0, "admin"),
            ("leave", 1, 0, "admin"),
            ("leave", 2, 0, "admin"),
            ("merge", 1, 0, "admin"),
            ("write", 1, 0, "admin"),
        ]
    )
    assert acks == []
    replica = Replica(h)
    was_final: set[bytes] = set()
    for e in h.events.values():
        replica.deliver(e)
        f = replica.finality()
        final = {d.id for d in replica.held if f.is_final(d.vv)}
        assert was_final <= final, "a final delta became non-final"
        was_final = final
    f = replica.finality()
    assert f.ack_set == frozenset()
    assert was_final == set(h.events), "with no admin left, everything held is final"
    full = h.graph().resolution()
    late_write = next(e for e in h.events.values() if e.op is None)
    assert verdict(full, late_write) is verdict(replica.graph.resolution(), late_write)
