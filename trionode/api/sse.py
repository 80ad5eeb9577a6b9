"""`GET /events?context=<id>[&context=<id>…]`: a context's applied deltas as Server-Sent Events.

The second way to follow contexts, for clients where a WebSocket is awkward (a browser's
`EventSource`, `curl -N`). Each applied delta is one event::

    id: <seq>
    event: delta
    data: {"type": "delta", "seq": …, "contextId": …, …}   (the WebSocket's message)

The `id` is the hub's sequence number, so resuming works exactly like the WebSocket's
`since`: a client sends `Last-Event-ID: <seq>` (EventSource does so by itself when it
reconnects) or `?since=<seq>`, and first gets every buffered event after it. A resume point
that is no longer buffered answers 410 with `"resync": true` before any stream starts, so
the client knows it must reload state instead of silently missing events. Transient notices (blob
transfer progress) arrive as `event: notice` without an id. A client that
falls too far behind gets an `overflow` event and the stream ends; it reconnects with its
last id and misses nothing. Silence is broken by a comment every `api.sse_keepalive`
seconds so that proxies and browsers keep the connection open.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Final

import trio
from quart import Response, request

from trionode.context.events import ContextEvent, EventHub, Notice, Replay

MAX_CONTEXTS: Final = 64
"""Contexts one stream may follow (a query string is not the place for more)."""
MAX_SEQ_DIGITS: Final = 20
RETRY_MS: Final = 2000
"""How long EventSource waits before reconnecting after the stream ends."""


class EventRequestError(Exception):
    """A bad /events request; `status` is its HTTP status."""

    def __init__(self, status: int, message: str, *, resync: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.resync = resync


def parse_since(query: str | None, last_event_id: str | None) -> int | None:
    """The resume point: `Last-Event-ID` (set by a reconnecting EventSource) wins over `?since`."""
    text = last_event_id or query
    if not text:
        return None
    if len(text) > MAX_SEQ_DIGITS or not text.isascii() or not text.isdigit():
        raise EventRequestError(400, "Last-Event-ID and since must be a non-negative integer")
    return int(text)


def parse_contexts(values: list[str], known: Callable[[str], bool]) -> list[str]:
    ids = [i for value in values for i in value.split(",") if i]
    if not ids:
        raise EventRequestError(400, "name at least one context: /events?context=<id>")
    if len(ids) > MAX_CONTEXTS:
        raise EventRequestError(400, f"follow at most {MAX_CONTEXTS} contexts per stream")
    unknown = [i for i in ids if not known(i)]
    if unknown:
        raise EventRequestError(404, f"unknown context ids: {', '.join(unknown[:5])}")
    return list(dict.fromkeys(ids))


def format_event(event: ContextEvent | Notice) -> bytes:
    # json.dumps never emits a raw newline, so the whole event fits on one data line.
    data = json.dumps(event.to_json(), separators=(",", ":"))
    if isinstance(event, Notice):
        # Transient (blob progress and the like): no id, so Last-Event-ID stays on deltas.
        return f"event: notice\ndata: {data}\n\n".encode()
    return f"id: {event.seq}\nevent: delta\ndata: {data}\n\n".encode()


def check_resumable(hub: EventHub, contexts: list[str], since: int | None) -> None:
    """Fail with 410 before the response starts if events after `since` are gone.

    The real subscription is made inside the body generator, whose `finally` always closes
    it; one made here would leak if the client left before the body started. So this
    probes with a throwaway subscription (closed at once) instead.
    """
    probe = hub.open()
    try:
        served = hub.add_contexts(probe, contexts, since)
    finally:
        probe.close()
    if not served:
        raise EventRequestError(
            410,
            f"events after {since} are no longer kept: fetch the state again, "
            f"then follow from seq {hub.shown} (Last-Event-ID: {hub.shown})",
            resync=True,
        )


async def stream_events(
    hub: EventHub, contexts: list[str], since: int | None, keepalive: float
) -> AsyncIterator[bytes]:
    """The response body: events as they arrive, keepalive comments in between."""
    sub = hub.open()
    try:
        if not hub.add_contexts(sub, contexts, since):
            # Dropped between the check and now: the same answer, in the stream's terms.
            yield b'event: resync\ndata: {"resync": true}\n\n'
            return
        yield f"retry: {RETRY_MS}\n: following\n\n".encode()
        while True:
            with trio.move_on_after(keepalive) as idle:
                try:
                    event = await sub.receive.receive()
                except trio.EndOfChannel:
                    if sub.overflowed:
                        yield b'event: overflow\ndata: {"message": "too slow: reconnect"}\n\n'
                    return
                if isinstance(event, Replay):
                    # The missed events, then live ones (the subscribe's answer is for /ws).
                    for missed in event.events:
                        yield format_event(missed)
                else:
                    yield format_event(event)
            if idle.cancelled_caught:
                yield b": keepalive\n\n"
    finally:
        sub.close()


def event_stream_response(
    hub: EventHub, known: Callable[[str], bool], keepalive: float
) -> Response:
    """Validate the request, subscribe, and return the streaming response.

    Raises EventRequestError for a bad request (the caller maps it to a JSON error).
    """
    contexts = parse_contexts(request.args.getlist("context"), known)
    since = parse_since(request.args.get("since"), request.headers.get("Last-Event-ID"))
    check_resumable(hub, contexts, since)
    response = Response(
        stream_events(hub, contexts, since, keepalive), mimetype="text/event-stream"
    )
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    # The stream lasts as long as the client stays; Quart's response timeout must not end it.
    response.timeout = None
    return response
