"""The connection manager's decisions, without sockets: shares, the cap, watermarks."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from trionode.net.connmgr import (
    ConnectionLimits,
    ConnectionManager,
    HandshakeAdmission,
    address_group,
)
from trionode.wire.keys import PeerId, PrivateKey
from trionode.wire.multiaddr import Multiaddr

PEERS = [PrivateKey.generate().peer_id() for _ in range(40)]


def manager(**limits: float) -> ConnectionManager:
    return ConnectionManager(ConnectionLimits(**limits))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "group"),
    [
        ("/ip4/192.0.2.7/tcp/4001", "192.0.2.7"),
        ("/ip6/2001:db8:1:2:aaaa::1/tcp/4001", "2001:db8:1:2::/64"),
        ("/ip6/2001:db8:1:2:bbbb::9/tcp/5", "2001:db8:1:2::/64"),
        ("/ip6/::ffff:192.0.2.7/tcp/4001", "192.0.2.7"),
    ],
)
def test_address_groups_are_ipv4_addresses_and_ipv6_slash_64s(address: str, group: str) -> None:
    assert address_group(Multiaddr.from_string(address)) == group


def test_address_group_of_an_unknown_address_is_none() -> None:
    assert address_group(None) is None


def test_handshake_slots_are_shared_per_address_and_in_total() -> None:
    m = manager(max_pending=5, max_pending_per_address=2)
    assert m.begin_handshake("a", 1).refused is None
    assert m.begin_handshake("a", 2).refused is None
    assert m.begin_handshake("a", 3).refused == "too_many_pending_from_address"
    for token, group in enumerate(("b", "c", "d"), start=4):
        assert m.begin_handshake(group, token) == HandshakeAdmission(None)
    # Full: a newcomer from a less crowded place takes the slot of the oldest handshake of
    # the most crowded one ...
    assert m.begin_handshake("e", 7) == HandshakeAdmission(None, evict=1)
    # ... but not one from a place that would then be as crowded as any.
    assert m.begin_handshake("b", 8).refused == "too_many_pending"
    assert m.statistics().pending_handshakes == 5
    m.end_handshake(1)  # the evicted one finishes: nothing more is given back
    assert m.statistics().pending_handshakes == 5
    m.end_handshake(2)
    assert m.begin_handshake("b", 9) == HandshakeAdmission(None)


def test_idle_handshakes_from_many_places_never_lock_a_newcomer_out() -> None:
    m = manager(max_pending=8, max_pending_per_address=4)
    for group in range(8):  # one idle socket from each of 8 places fills every slot
        assert m.begin_handshake(f"idle-{group}", group + 1).refused is None
    admission = m.begin_handshake("honest", "h")
    assert admission == HandshakeAdmission(None, evict=1)  # the oldest idle one goes
    # More idle sockets from the attacker's places only replace each other.
    assert m.begin_handshake("idle-3", 99).refused == "too_many_pending"


def test_a_crowded_address_is_displaced_by_a_newcomer_but_not_the_other_way() -> None:
    m = manager(max_connections=4, max_per_address=5, high_water=4, low_water=4)
    for i in range(4):
        assert m.admit(PEERS[i], "crowd", outbound=False, now=float(i)).refused is None
    # A newcomer from the crowded address itself finds no room.
    assert m.may_accept("crowd") == "connection_limit"
    assert m.admit(PEERS[10], "crowd", outbound=False, now=9.0).refused == "connection_limit"
    # One from elsewhere displaces the crowd's newest.
    assert m.may_accept("elsewhere") is None
    admission = m.admit(PEERS[11], "elsewhere", outbound=False, now=10.0)
    assert admission.refused is None
    assert admission.evict == (PEERS[3],)
    # A lone peer is never displaced by another lone one (they would trade places forever).
    m2 = manager(max_connections=2, high_water=2, low_water=2)
    m2.admit(PEERS[0], "x", outbound=False, now=0.0)
    m2.admit(PEERS[1], "y", outbound=False, now=0.0)
    assert m2.admit(PEERS[2], "z", outbound=False, now=1.0).refused == "connection_limit"


def test_members_are_protected_and_always_get_in() -> None:
    m = manager(max_connections=3, high_water=3, low_water=3, max_per_address=3)
    for i in range(3):
        m.admit(PEERS[i], "crowd", outbound=False, now=0.0)
        assert m.prove(PEERS[i], b"ctx")
    assert not m.prove(PEERS[0], b"other")  # already protected
    # Nobody can be displaced: an unknown peer is refused, a member dial exceeds the cap.
    assert m.admit(PEERS[5], "elsewhere", outbound=False, now=1.0).refused == "connection_limit"
    assert not m.may_dial(PEERS[5])
    assert m.may_dial(PEERS[6], member=True)
    admission = m.admit(PEERS[6], None, outbound=True, now=1.0, member=True)
    assert admission.refused is None
    assert admission.evict == ()
    assert m.statistics().connections == 4
    # A remembered member reconnecting inbound from a full address still gets in.
    m.remove(PEERS[0])
    assert m.may_dial(PEERS[0])
    assert m.admit(PEERS[0], "crowd", outbound=False, now=2.0).refused is None
    # Leaving the context drops the protection it gave.
    m.forget_context(b"ctx")
    assert m.is_protected(PEERS[0])  # it also proved b"other"
    assert not m.is_protected(PEERS[1])


def test_a_member_dial_at_the_cap_displaces_the_least_valuable_peer() -> None:
    m = manager(max_connections=3, high_water=3, low_water=3)
    m.admit(PEERS[0], None, outbound=True, now=0.0)
    m.admit(PEERS[1], "a", outbound=False, now=1.0)
    m.admit(PEERS[2], "a", outbound=False, now=2.0)
    assert not m.may_dial(PEERS[9])
    admission = m.admit(PEERS[9], None, outbound=True, now=3.0, member=True)
    assert admission.evict == (PEERS[2],)  # inbound before outbound; newest first


def test_trimming_above_the_high_water_mark_spares_members_and_the_young() -> None:
    m = manager(max_connections=20, high_water=8, low_water=4, grace=10.0, max_per_address=20)
    for i in range(10):
        m.admit(PEERS[i], "g", outbound=False, now=float(i))
    m.prove(PEERS[0], b"ctx")
    assert m.trim(now=5.0) == []  # everyone is still in their grace period but 0..
    closing = m.trim(now=100.0)
    assert len(closing) == 6  # 10 → 4
    assert PEERS[0] not in closing
    assert closing == PEERS[9:0:-1][:6]  # newest first
    assert m.trim(now=100.0) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "remove", "prove", "trim"]),
            st.integers(0, len(PEERS) - 1),
            st.sampled_from(["a", "b", "c", None]),
            st.booleans(),
        ),
        max_size=120,
    )
)
def test_invariants_hold_under_any_sequence(ops: list[tuple[str, int, str | None, bool]]) -> None:
    limits = ConnectionLimits(
        max_connections=10, high_water=8, low_water=5, grace=3.0, max_per_address=4
    )
    m = ConnectionManager(limits)
    connected: set[PeerId] = set()
    now = 0.0
    for op, index, group, outbound in ops:
        now += 1.0
        peer = PEERS[index]
        if op == "admit":
            member = outbound and index % 7 == 0
            admission = m.admit(peer, group, outbound=outbound, now=now, member=member)
            assert len(admission.evict) <= 1
            for victim in admission.evict:
                assert not m.is_protected(victim)
                connected.discard(victim)
            if admission.refused is None:
                connected.add(peer)
        elif op == "remove":
            m.remove(peer)
            connected.discard(peer)
        elif op == "prove":
            m.prove(peer, b"ctx")
        else:
            above_high = len(connected) > limits.high_water
            for victim in m.trim(now):
                assert not m.is_protected(victim)
                connected.discard(victim)
            if above_high and len(connected) > limits.low_water:
                # Trimming stopped early only because nobody else may be closed.
                assert all(
                    m.is_protected(p)
                    or m._entries[p].member_dial
                    or now - m._entries[p].opened_at < limits.grace
                    for p in connected
                )
        assert m.statistics().connections == len(connected)
        assert set(m._entries) == connected
        inbound = Counter(e.group for e in m._entries.values() if not e.outbound)
        assert m._inbound_per_group == inbound
        # The cap holds except for protected peers and member dials.
        assert len(connected) <= limits.max_connections + sum(
            1 for p in connected if m.is_protected(p) or m._entries[p].member_dial
        )
