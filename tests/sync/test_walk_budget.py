"""An ancestor walk answers within its time budget (`Responder(walk_budget=...)`): under
load a walk of a thousand ancestors outlived the session that asked for it, and the whole
answer was lost with it (issue #16, the scale row's repair). Past the budget the answer
goes with what the walk took, parents first, and the requester asks on."""

from __future__ import annotations

from tests.sync.harness import CONTEXT, Replica, check_consistent
from tests.sync.test_machines import A_MEMBER, AUTH, served_chain
from trionode.sync.machines import (
    ApplyDeltas,
    DeltaFetch,
    ReadAncestors,
    ReadDeltas,
    Responder,
)
from trionode.wire.messages import DeltaRequest, DeltaResponse


def authenticated(budget: float | None) -> Responder:
    responder = Responder(walk_budget=budget)
    responder.receive_message(AUTH, 0.0)
    responder.next_action()
    responder.auth_checked(None)
    return responder


def serve(responder: Responder, b: Replica, request: DeltaRequest, step: float) -> DeltaResponse:
    """Answer `request` (received at 100.0), each generation of the walk read `step`
    seconds after the one before."""
    now = 100.0
    responder.receive_message(request, now)
    while (action := responder.next_action()) is not None:
        if isinstance(action, ReadAncestors):
            now += step
            found = [(i, b.wires[i]) for i in action.ids if i in b.wires]
            responder.ancestors_read(found, now)
        else:
            assert isinstance(action, ReadDeltas)
            b.serve_action(responder, action)
    (reply,) = responder.messages_to_send()
    assert isinstance(reply, DeltaResponse)
    return reply


def test_a_walk_past_its_budget_answers_with_what_it_took() -> None:
    deltas, _, b = served_chain(30)
    request = DeltaRequest(ids=[deltas[-1].id], ancestors=64)
    whole = serve(authenticated(None), b, request, step=1.0)
    assert len(whole.ancestors) == 29
    # A generation a second, 4.5 s allowed: the reads at 101..104 go on, the one at 105
    # is taken and ends the walk.
    cut = serve(authenticated(4.5), b, request, step=1.0)
    assert cut.ancestors == [d.encode() for d in deltas[24:29]]
    assert cut.deltas == whole.deltas
    # Within the budget nothing changes.
    assert serve(authenticated(60.0), b, request, step=1.0) == whole


def test_a_requester_fetches_the_rest_of_a_cut_walk_in_its_next_requests() -> None:
    deltas, parents, b = served_chain(30)
    a = Replica(A_MEMBER)
    fetch = DeltaFetch({deltas[-1].id}, context_id=CONTEXT, max_rounds=64, ancestors=64)
    responder = authenticated(2.5)
    rounds = 0
    while not fetch.finished:
        (request,) = fetch.messages_to_send()
        assert isinstance(request, DeltaRequest)
        rounds += 1
        reply = serve(responder, b, request, step=1.0)
        fetch.receive_message(reply, 0.0)
        action = fetch.next_action()
        missing: list[bytes] = []
        if isinstance(action, ApplyDeltas):
            for delta in action.deltas:
                missing += a.receive(delta)
        fetch.deltas_applied(missing)
    assert a.applied == b.applied
    check_consistent(a, parents)
    assert rounds == 8  # four deltas an answer: the one asked for, 3 generations read
