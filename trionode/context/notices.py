"""What subscribers (WebSocket, SSE) hear about a context's changes: one function per
kind of change, so every service words its events the same way."""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, Final, Protocol

import base58
import msgspec

from trionode.auth.model import Verdict
from trionode.context.events import Change

if TYPE_CHECKING:
    from collections.abc import Iterable

    from trionode.context.events import EventHub
    from trionode.context.replicas import Replica


class AppEvent(Protocol):
    """An event an app emitted (the SDK's, or one carried in a delta body)."""

    @property
    def name(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


@functools.lru_cache(maxsize=4096)
def b58(data: bytes) -> str:
    """Base58 (cached: ids are encoded again and again, and the encoder is pure Python)."""
    return base58.b58encode(data).decode("ascii")


@functools.lru_cache(maxsize=4096)
def from_b58(text: str) -> bytes:
    """A context id back from an event's base58 (cached like `b58`: the services that
    follow every applied delta decoded it once per event, ~20 us each). Raises ValueError
    for text that is not base58."""
    return base58.b58decode(text)


def change_of(
    replica: Replica, *, delta_id: bytes | None, events: Iterable[tuple[str, Any]], origin: str
) -> Change:
    """A delta (or, `delta_id` None, state from a sync) changed `replica`; `events` are the
    app events it carried as (name, JSON-ready payload). Read from the replica's record as
    it is now (right after that change was staged)."""
    record = replica.record
    return Change(
        b58(replica.context_id),
        "" if delta_id is None else delta_id,  # (ids raw: hex only for subscribers)
        record.root_hash,
        list(record.heads),
        [{"name": n, "payload": p} for n, p in events],
        origin,
    )


def app_events_change(
    replica: Replica, delta_id: bytes, events: Iterable[AppEvent], origin: str
) -> Change:
    return change_of(
        replica,
        delta_id=delta_id,
        events=[(e.name, payload_json(e.payload)) for e in events],
        origin=origin,
    )


def verdicts_change(replica: Replica, changed: list[bytes]) -> Change:
    """Which applied deltas a late membership decision reverted (or reinstated): their
    effects are gone from (or back in) the state, and app handlers that already ran for
    them are not undone."""
    verdicts = replica.authority.verdicts
    reverted = [i.hex() for i in changed if verdicts.get(i) is not Verdict.ACCEPTED]
    reinstated = [i.hex() for i in changed if verdicts.get(i) is Verdict.ACCEPTED]
    return change_of(
        replica,
        delta_id=None,
        events=[("reverted", {"reverted": reverted, "reinstated": reinstated})],
        origin="auth",
    )


def publish_change(
    hub: EventHub,
    replica: Replica,
    *,
    delta_id: bytes | None,
    events: Iterable[tuple[str, Any]],
    origin: str,
) -> None:
    hub.emit(change_of(replica, delta_id=delta_id, events=events, origin=origin))


def publish_app_events(
    hub: EventHub, replica: Replica, delta_id: bytes, events: Iterable[AppEvent], origin: str
) -> None:
    hub.emit(app_events_change(replica, delta_id, events, origin))


def publish_verdicts(hub: EventHub, replica: Replica, changed: list[bytes]) -> None:
    hub.emit(verdicts_change(replica, changed))


def payload_json(payload: bytes) -> Any:
    """An event payload as JSON values (None if it is not JSON). msgspec decodes what apps
    emit (msgspec's own JSON) several times faster than `json`, once per event of every
    delta applied; what it refuses (a float out of range, a lone surrogate) gets `json`'s
    reading, as before."""
    try:
        return _JSON.decode(payload)
    except msgspec.MsgspecError:
        pass
    try:
        return json.loads(payload)
    except ValueError:
        return None


_JSON: Final = msgspec.json.Decoder()
