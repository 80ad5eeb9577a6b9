"""Who is asking: the admin, a scoped token for browser apps, or a one-time ticket.

A web app on another origin must never hold the admin token, which can do everything. A
**scoped token** names contexts and a scope: `read` follows their events and calls their
views; `call` also calls their methods. Nothing else: no admin route, no other context.
Only the token's SHA-256 is stored (in LMDB, so tokens survive restarts); the token itself
is shown once, when it is made. Expiry is wall-clock time (tokens last days), injected.

Browsers can't set headers on a WebSocket or an EventSource, and a long-lived token in a
URL ends up in logs and history. So those take a **ticket**: `POST /admin-api/tickets`
with a token returns a random string that opens one `/ws` or `/events` connection within
`api.ticket_ttl` seconds, with the rights of the token that asked for it. Tickets live in
memory only (a restart invalidates them, which costs a client one more POST).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Final, Literal

import attrs
import msgspec
import trio

from trionode.store.lmdb_store import Column
from trionode.store.store import AsyncStore, BytesCodec, MsgpackCodec, Table

Scope = Literal["read", "call"]
SCOPES: Final = ("read", "call")
TOKEN_PREFIX: Final = "trn_"  # noqa: S105 - marks scoped tokens, not a secret
_KEY_PREFIX: Final = b"api-token/"
MAX_TOKEN_CONTEXTS: Final = 64
MAX_TOKENS: Final = 1000
"""Scoped tokens a node keeps; a node with more is being misused."""
MAX_EXPIRY: Final = 10 * 365 * 86400.0


class TokenError(Exception):
    """A request about tokens or tickets that can't be served; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TokenRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    sha256: str
    contexts: list[str]
    scope: str
    created_at: float
    expires_at: float | None

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "id": self.id,
            "contexts": self.contexts,
            "scope": self.scope,
            "createdAt": self.created_at,
            "expiresAt": self.expires_at,
            "expired": self.expires_at is not None and self.expires_at <= now,
        }


TOKENS: Final = Table(Column.GENERIC, BytesCodec(), MsgpackCodec(TokenRecord))


@attrs.frozen
class Principal:
    """The rights of whoever made a request."""

    scope: Literal["admin", "read", "call"]
    contexts: frozenset[str] = frozenset()
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def may_follow(self, context_id: str) -> bool:
        return self.is_admin or context_id in self.contexts

    def may_call(self, context_id: str, *, is_view: bool) -> bool:
        if self.is_admin:
            return True
        return context_id in self.contexts and (is_view or self.scope == "call")


ADMIN: Final = Principal("admin")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_matches(presented: str, expected_sha256: str) -> bool:
    return hmac.compare_digest(sha256_hex(presented), expected_sha256)


class TokenStore:
    """Scoped tokens: hashed in LMDB, cached in memory by hash for the per-request lookup."""

    def __init__(self, store: AsyncStore, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._now = wall_clock
        self._by_hash: dict[str, TokenRecord] = {}

    async def load(self) -> None:
        rows = await self._store.scan(TOKENS, prefix=_KEY_PREFIX)
        self._by_hash = {record.sha256: record for _, record in rows}

    async def create(
        self, contexts: Iterable[str], scope: str, expires_in: float | None
    ) -> tuple[str, TokenRecord]:
        """Make a token; returns it (shown once, never stored) and its record."""
        names = list(dict.fromkeys(contexts))
        if scope not in SCOPES:
            raise TokenError(f"scope must be one of {', '.join(SCOPES)}")
        if not names or len(names) > MAX_TOKEN_CONTEXTS:
            raise TokenError(f"name between 1 and {MAX_TOKEN_CONTEXTS} contexts")
        if expires_in is not None and not 0 < expires_in <= MAX_EXPIRY:
            raise TokenError("expiresIn must be a positive number of seconds, at most ten years")
        if len(self._by_hash) >= MAX_TOKENS:
            raise TokenError(f"this node already has {MAX_TOKENS} tokens: revoke some", 409)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self._now()
        record = TokenRecord(
            id=secrets.token_hex(6),
            sha256=sha256_hex(token),
            contexts=names,
            scope=scope,
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
        )
        await self._store.put(TOKENS, _KEY_PREFIX + record.id.encode(), record)
        self._by_hash[record.sha256] = record
        return token, record

    def records(self) -> list[TokenRecord]:
        return sorted(self._by_hash.values(), key=lambda r: r.created_at)

    async def revoke(self, token_id: str) -> None:
        for digest, record in list(self._by_hash.items()):
            if record.id == token_id:
                await self._store.delete(TOKENS, _KEY_PREFIX + token_id.encode())
                del self._by_hash[digest]
                return
        raise TokenError(f"no token with id {token_id!r}", 404)

    def principal(self, presented: str) -> Principal | None:
        """The rights of a presented scoped token; None if unknown or expired."""
        if not presented.startswith(TOKEN_PREFIX):
            return None
        # A dict lookup by hash: the stored value is a hash, so timing reveals nothing useful.
        record = self._by_hash.get(sha256_hex(presented))
        if record is None or (record.expires_at is not None and record.expires_at <= self._now()):
            return None
        scope: Literal["read", "call"] = "call" if record.scope == "call" else "read"
        return Principal(scope, frozenset(record.contexts), record.id)

    def now(self) -> float:
        return self._now()


class TicketBook:
    """One-time tickets for WebSocket and EventSource connections, on the Trio clock."""

    def __init__(self, *, ttl: float, capacity: int) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._tickets: dict[str, tuple[Principal, float]] = {}

    @property
    def ttl(self) -> float:
        return self._ttl

    def issue(self, principal: Principal) -> str:
        now = trio.current_time()
        if len(self._tickets) >= self._capacity:
            self._tickets = {t: v for t, v in self._tickets.items() if v[1] > now}
            if len(self._tickets) >= self._capacity:
                raise TokenError("too many unused tickets: use or let some expire", 429)
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = (principal, now + self._ttl)
        return ticket

    def redeem(self, ticket: str) -> Principal | None:
        """The ticket's rights, once; None if unknown, used or expired."""
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] <= trio.current_time():
            return None
        return entry[0]
