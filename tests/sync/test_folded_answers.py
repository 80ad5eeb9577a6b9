"""The "folded" answer of a delta fetch (`DeltaResponse.folded`): the responder says which
requested ids it folded into its final state, and the requester records them, asks for
them no more in that fetch, and refuses an answer that lists an id twice or one it did not
ask (in memory, no Trio)."""

from __future__ import annotations

import pytest

from trionode.sync.errors import AnswerMismatch
from trionode.sync.machines import CheckAuth, DeltaFetch, ReadDeltas, Responder
from trionode.wire.messages import DeltaRequest, DeltaResponse, SyncAuth, decode_sync, frame

CONTEXT = b"\x01" * 32
AUTH = SyncAuth(context_id=CONTEXT, member=b"\xaa" * 32, signature=bytes(64))


def ident(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_the_responder_lists_folded_ids_apart_from_missing_ones() -> None:
    responder = Responder()
    responder.receive_message(AUTH, 0.0)
    assert responder.next_action() == CheckAuth(AUTH)
    responder.auth_checked(None)
    responder.receive_message(DeltaRequest(ids=[ident(1), ident(2)]), 1.0)
    assert responder.next_action() == ReadDeltas((ident(1), ident(2)))
    responder.deltas_read([], [ident(1)], [ident(2)])
    [answer] = responder.messages_to_send()
    assert answer == DeltaResponse(deltas=[], missing=[ident(1)], folded=[ident(2)])
    assert decode_sync(frame(answer)[4:]) == answer
    # Without folded ids the frame is the one peers sent before the field existed.
    plain = DeltaResponse(deltas=[], missing=[ident(1)])
    assert b"folded" not in frame(plain)


def test_the_requester_records_folded_ids_and_does_not_ask_again() -> None:
    fetch = DeltaFetch({ident(1), ident(2)}, max_rounds=5, context_id=CONTEXT)
    [request] = fetch.messages_to_send()
    assert request == DeltaRequest(ids=[ident(1), ident(2)])
    fetch.receive_message(DeltaResponse(deltas=[], missing=[ident(1)], folded=[ident(2)]), 0.0)
    assert fetch.next_action() is None
    assert fetch.peer_folded == {ident(2)}
    assert fetch.peer_missing == {ident(1)}
    assert fetch.finished
    assert fetch.messages_to_send() == []
    assert not fetch.failed


@pytest.mark.parametrize(
    ("missing", "folded"),
    [
        ([ident(1)], [ident(1), ident(2)]),  # one id both missing and folded
        ([], [ident(2), ident(2)]),  # listed twice
        ([ident(1)], [ident(3)]),  # not asked
    ],
)
def test_the_requester_refuses_inconsistent_folded_lists(
    missing: list[bytes], folded: list[bytes]
) -> None:
    fetch = DeltaFetch({ident(1), ident(2)}, max_rounds=5, context_id=CONTEXT)
    fetch.messages_to_send()
    with pytest.raises(AnswerMismatch):
        fetch.receive_message(DeltaResponse(deltas=[], missing=missing, folded=folded), 0.0)
    assert fetch.failed
