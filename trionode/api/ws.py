"""`GET /ws`: subscribe to contexts and receive one message per applied delta.

Client messages (JSON text frames, strict JSON, at most `api.max_ws_message` bytes):
  {"type": "subscribe", "contextIds": [...], "since": <seq, optional>}
  {"type": "unsubscribe", "contextIds": [...]}
  {"type": "ping"}
Server messages: {"type": "subscribed", "contextIds", "seq"}, {"type": "unsubscribed",
"contextIds"}, {"type": "delta", "seq", "contextId", "deltaId", "rootHash", "heads",
"events", "origin"}, {"type": "resync", "contextIds", "seq", "reason"}, {"type": "pong"},
{"type": "ping"} (keepalive), {"type": "error", "message"}, plus transient notices (blob
transfer progress, a joining node's snapshot progress).

With "since", the events after that sequence number are replayed first, then `subscribed`;
numbering survives restarts (the log is in LMDB for `api.event_retention`). When that gap
can't be filled (the events are no longer kept), the answer is `resync` instead: fetch the
state again and follow from its `seq`; the subscription is made either way.
A client that falls too far behind (its queue of `api` events is full) first gets every
event queued for it, then a `resync` message naming its contexts, the current `seq` and the
reason, and is disconnected with close code 1008: it resumes with `since` = the last `seq`
it received (answered by a replay, or by `resync` if those events are gone).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import trio
from quart import websocket

from trionode.api.jsonio import BadInput, int_field
from trionode.context.events import ContextEvent, EventHub, Notice, Replay, Subscription

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 20.0
MAX_SUBSCRIPTIONS = 1024
MAX_SEQ = 2**63 - 1
Decode = Callable[[str | bytes], Any]


async def _send(payload: dict[str, Any]) -> None:
    await websocket.send(json.dumps(payload))


async def _reader(
    hub: EventHub, sub: Subscription, known: Callable[[str], bool], decode: Decode
) -> None:
    # Message size is bounded by the server (api.max_ws_message) before a frame is buffered.
    while True:
        raw = await websocket.receive()
        try:
            message = decode(raw)
        except BadInput as exc:
            log.info("refused WebSocket message: %s", exc)
            await _send({"type": "error", "message": str(exc)})
            continue
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "ping":
            await _send({"type": "pong"})
            continue
        ids = message.get("contextIds") if isinstance(message, dict) else None
        if (
            kind not in ("subscribe", "unsubscribe")
            or not isinstance(ids, list)
            or not all(isinstance(i, str) for i in ids)
        ):
            await _send(
                {"type": "error", "message": 'expected {"type": "subscribe", "contextIds": [...]}'}
            )
            continue
        if kind == "unsubscribe":
            sub.contexts.difference_update(ids)
            await _send({"type": "unsubscribed", "contextIds": ids})
            continue
        unknown = [i for i in ids if not known(i)]
        if unknown:
            await _send({"type": "error", "message": f"unknown context ids: {', '.join(unknown)}"})
            continue
        if len(sub.contexts) + len(ids) > MAX_SUBSCRIPTIONS:
            await _send({"type": "error", "message": "too many subscriptions"})
            continue
        since = message.get("since")
        if since is not None:
            try:
                since = int_field(since, "since", minimum=0, maximum=MAX_SEQ)
            except BadInput as exc:
                await _send({"type": "error", "message": str(exc)})
                continue
        progress = message.get("progress", False)
        if not isinstance(progress, bool):
            await _send({"type": "error", "message": "progress must be true or false"})
            continue
        # The answer (subscribed or resync) goes out through the writer, after the replay.
        hub.add_contexts(sub, ids, since, progress=progress)


async def _writer(hub: EventHub, sub: Subscription) -> None:
    while True:
        event: ContextEvent | Notice | Replay | None = None
        # Only the wait is timed: a send cut short would lose the event it carried.
        with trio.move_on_after(KEEPALIVE_SECONDS):
            try:
                event = await sub.receive.receive()
            except trio.EndOfChannel:
                if sub.overflowed:
                    # Said in a message too: a close reason is easy to miss, and the client
                    # must know that events are missing after the last one it received.
                    await _send(
                        {
                            "type": "resync",
                            "contextIds": sorted(sub.contexts),
                            "seq": hub.shown,
                            "reason": "too slow: events after the last one received were "
                            "dropped; resume with since=<last seq> or fetch the state again",
                        }
                    )
                    await websocket.close(1008, "too slow: resume with since=<last seq>")
                return
        if event is None:
            await _send({"type": "ping"})
        elif isinstance(event, Replay):
            for missed in event.events:
                await _send(missed.to_json())
            await _send(event.answer)
        else:
            await _send(event.to_json())


async def serve_websocket(hub: EventHub, known: Callable[[str], bool], decode: Decode) -> None:
    """Run one WebSocket connection until the client leaves (or falls too far behind)."""
    sub = hub.open()
    try:
        async with trio.open_nursery() as nursery:

            async def read_then_stop() -> None:
                await _reader(hub, sub, known, decode)
                nursery.cancel_scope.cancel()

            async def write_then_stop() -> None:
                await _writer(hub, sub)
                nursery.cancel_scope.cancel()

            nursery.start_soon(read_then_stop)
            nursery.start_soon(write_then_stop)
    finally:
        sub.close()
