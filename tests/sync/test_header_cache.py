"""Ancestor walks share the headers they decoded (`HeaderCache`): while many members catch
up at once, every session walks back over the same recent deltas, and each walk decoded
each of their headers again (13 % of the 100-node scale bench's process while it
converged). The answers must not change, whatever the cache holds."""

from __future__ import annotations

from tests.sync.harness import Replica
from tests.sync.test_machines import AUTH, served_chain
from trionode.sync.machines import HeaderCache, Responder
from trionode.wire.messages import DeltaRequest, DeltaResponse


def answer(b: Replica, request: DeltaRequest, headers: HeaderCache | None) -> DeltaResponse:
    responder = Responder(headers=headers)
    responder.receive_message(AUTH, 0.0)
    responder.next_action()
    responder.auth_checked(None)
    responder.receive_message(request, 0.0)
    while (action := responder.next_action()) is not None:
        b.serve_action(responder, action)
    (reply,) = responder.messages_to_send()
    assert isinstance(reply, DeltaResponse)
    return reply


def test_walks_sharing_a_cache_answer_alike_and_decode_each_header_once() -> None:
    deltas, _, b = served_chain(30)
    request = DeltaRequest(ids=[deltas[-1].id], ancestors=64)
    alone = answer(b, request, None)
    assert len(alone.ancestors) == 29
    cache = HeaderCache(100)
    assert answer(b, request, cache) == alone
    assert (cache.misses, cache.hits) == (30, 0)  # the delta asked for and 29 ancestors
    assert answer(b, request, cache) == alone
    assert (cache.misses, cache.hits) == (30, 30)
    # A walk from further down reads only headers the cache holds.
    shorter = DeltaRequest(ids=[deltas[19].id], ancestors=64)
    assert answer(b, shorter, cache) == answer(b, shorter, None)
    assert cache.misses == 30


def test_the_cache_keeps_only_the_most_recently_read() -> None:
    deltas, _, b = served_chain(30)
    cache = HeaderCache(8)
    request = DeltaRequest(ids=[deltas[-1].id], ancestors=64)
    assert answer(b, request, cache) == answer(b, request, None)
    assert len(cache) == 8
    # The last eight read (the chain's start) are held: a walk among them decodes none.
    misses = cache.misses
    low = DeltaRequest(ids=[deltas[7].id], ancestors=64)
    assert answer(b, low, cache) == answer(b, low, None)
    assert cache.misses == misses
    assert len(cache) == 8


def test_no_cache_decodes_every_time() -> None:
    deltas, _, b = served_chain(5)
    cache = HeaderCache(0)
    request = DeltaRequest(ids=[deltas[-1].id], ancestors=64)
    answer(b, request, cache)
    answer(b, request, cache)
    assert (cache.misses, cache.hits, len(cache)) == (10, 0, 0)
