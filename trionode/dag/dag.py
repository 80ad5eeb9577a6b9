"""The per-context causal DAG: which deltas can be applied now, which must wait.

A delta applies once all its parents have applied. One that arrives early waits in
`pending` and is released by the arrival of its last missing parent. The cascade is a loop
over a work list, never recursion, so a chain of any length that arrives backwards applies
without growing the stack.

A delta can also wait for *time*: when it becomes applicable, `apply` may answer
`Defer(until)` (its clock stamps lead ours by more than the drift tolerance). It then stays
pending with no missing parent until `release` is called at or after `until`; its
descendants keep waiting for it. `expire` never drops such a delta: it is not stuck, and
the caller bounds how far ahead it accepts one.

Pending space is bounded twice: `max_pending` deltas in all, and `max_pending_per_author`
per author, so one member flooding pending with orphans only evicts its own oldest ones and
never another member's. When the total is full, the author with the most pending deltas
loses its oldest. Evicted ids are reported; `expire` drops those that waited for parents
longer than a timeout.

Heads are the applied deltas nothing applied builds on yet; a new local delta takes them
as parents, which is what collapses concurrent branches: all of them, up to the
`MAX_PARENTS` a delta header may name. With more concurrent branches than that (a hundred
members writing at once), a delta takes `MAX_PARENTS` of them and the next ones take the
rest, never one that no decoder would accept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import attrs

from trionode.dag.delta import GENESIS, MAX_PARENTS

T = TypeVar("T")
_NOTHING: frozenset[bytes] = frozenset()


@attrs.frozen
class Defer:
    """What `apply` answers for a delta that is valid but may not apply before `until` (on
    the clock that `offer`'s `now` uses)."""

    until: float


Apply = Callable[[bytes, T], bool | Defer]
"""Handed each delta that became applicable, in causal order: True (applied), False
(refused: it never applies, its descendants wait and expire) or `Defer`."""


@attrs.define
class _Pending(Generic[T]):
    id: bytes
    parents: tuple[bytes, ...]
    item: T
    received_at: float
    missing: set[bytes]
    author: bytes = b""
    not_before: float | None = None
    """Set while the delta waits for time rather than for parents."""


@attrs.frozen
class Offer(Generic[T]):
    """What `CausalDag.offer` decided."""

    ready: list[tuple[bytes, T]]
    """Deltas to apply now, in causal order (the offered one first, then its cascade)."""
    missing: frozenset[bytes]
    """Parents nobody has offered yet: ask a peer for these."""
    duplicate: bool
    evicted: list[bytes]
    """Pending deltas dropped to stay within `max_pending` / `max_pending_per_author`."""

    @property
    def pending(self) -> bool:
        return not self.ready and not self.duplicate


class CausalDag(Generic[T]):
    def __init__(
        self,
        *,
        applied: Iterable[bytes] = (),
        heads: Iterable[bytes] = (),
        max_pending: int = 1000,
        max_pending_per_author: int | None = None,
    ) -> None:
        self.applied: set[bytes] = set(applied)
        self.heads: set[bytes] = set(heads)
        self.max_pending = max_pending
        self.max_pending_per_author = max_pending_per_author or max_pending
        self._pending: OrderedDict[bytes, _Pending[T]] = OrderedDict()
        self._by_author: dict[bytes, OrderedDict[bytes, None]] = {}
        """Pending ids per author, oldest first (for the per-author quota)."""
        self._deferred: dict[bytes, float] = {}
        """Pending ids waiting for time, and until when (usually none or a few)."""
        self._waiting: dict[bytes, set[bytes]] = {}
        self._forgone: set[bytes] = set()
        """Parents `forgo` stopped waiting for: applied later, they are no heads."""

    # -- queries ---------------------------------------------------------------------------

    def knows(self, delta_id: bytes) -> bool:
        return delta_id in self.applied or delta_id in self._pending

    def is_pending(self, delta_id: bytes) -> bool:
        return delta_id in self._pending

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def pending_of(self, author: bytes) -> int:
        """How many pending deltas `author` has."""
        return len(self._by_author.get(author, ()))

    def pending_items(self) -> list[tuple[bytes, T]]:
        return [(p.id, p.item) for p in self._pending.values()]

    def missing(self) -> set[bytes]:
        """Parents that pending deltas wait for and that are not pending themselves."""
        return {p for p in self._waiting if p not in self._pending}

    def next_release(self) -> float | None:
        """The earliest time a deferred delta may apply (None: none waits for time)."""
        return min(self._deferred.values(), default=None)

    def parents_for_new_delta(
        self, *, first: Iterable[bytes] = (), limit: int = MAX_PARENTS
    ) -> list[bytes]:
        """The parents of a delta written now, sorted: every head, or, with more heads than
        `limit`, the heads in `first` (the writer's own newest delta must stay in its past,
        or its sequence number would not follow it) and then the others in id order up to
        `limit`. The heads left out stay heads, so the next delta takes them."""
        if not self.heads:
            return [GENESIS]
        heads = sorted(self.heads)
        if len(heads) <= limit:
            return heads
        chosen = dict.fromkeys(h for h in first if h in self.heads)
        for head in heads:
            if len(chosen) >= limit:
                break
            chosen.setdefault(head)
        return sorted(list(chosen)[:limit])

    # -- changes ---------------------------------------------------------------------------

    def offer(
        self,
        delta_id: bytes,
        parents: Iterable[bytes],
        item: T,
        now: float,
        apply: Apply[T] | None = None,
        *,
        author: bytes = b"",
    ) -> Offer[T]:
        """Add a delta. With `apply`, each delta that becomes ready is handed to it in causal
        order; one it refuses (returns False) is not applied, so nothing builds on it and its
        descendants wait (and expire) instead; one it defers waits for `release`. `ready`
        lists only the applied ones. `author` counts against `max_pending_per_author`."""
        if self.knows(delta_id):
            return Offer([], _NOTHING, duplicate=True, evicted=[])
        parents = tuple(parents)
        applied = self.applied
        missing = {p for p in parents if p != GENESIS and p not in applied}
        if not missing and apply is None and delta_id not in self._waiting:
            # (What `_cascade` does for it, without a pending entry to build and drop: a
            # delta on applied parents that nothing waits for and nobody judges, as a local
            # delta is; adding none, it leaves the quotas as they were.)
            self._mark_applied(delta_id, parents)
            return Offer([(delta_id, item)], _NOTHING, duplicate=False, evicted=[])
        entry = _Pending(delta_id, parents, item, now, set(missing), author)
        if missing:
            self._add_pending(entry)
            for parent in missing:
                self._waiting.setdefault(parent, set()).add(delta_id)
            evicted = self._enforce_limits()
            unknown = frozenset(p for p in missing if p not in self._pending)
            return Offer([], unknown, duplicate=False, evicted=evicted)
        ready = self._cascade([entry], apply)
        return Offer(ready, _NOTHING, False, self._enforce_limits())

    def release(self, now: float, apply: Apply[T]) -> list[tuple[bytes, T]]:
        """Hand the deferred deltas whose time has come (and what waited for them) to
        `apply` again, in causal order; returns the applied ones."""
        due = [self._pending[i] for i, until in self._deferred.items() if until <= now]
        for entry in due:
            self._remove_pending(entry.id)
            entry.not_before = None
        return self._cascade(due, apply)

    def _cascade(self, start: list[_Pending[T]], apply: Apply[T] | None) -> list[tuple[bytes, T]]:
        ready: list[tuple[bytes, T]] = []
        work = list(reversed(start))
        while work:
            current = work.pop()
            verdict = True if apply is None else apply(current.id, current.item)
            if isinstance(verdict, Defer):
                current.not_before = verdict.until
                self._add_pending(current)
                continue
            if not verdict:
                continue
            self._mark_applied(current.id, current.parents)
            ready.append((current.id, current.item))
            for child_id in sorted(self._waiting.pop(current.id, ())):
                child = self._pending.get(child_id)
                if child is None:
                    continue
                child.missing.discard(current.id)
                if not child.missing:
                    self._remove_pending(child_id)
                    work.append(child)
        return ready

    def checkpoint(
        self,
        ids: Iterable[bytes],
        *,
        superseded: Iterable[bytes] = (),
        apply: Apply[T] | None = None,
        cover: Callable[[list[tuple[bytes, T]]], None] | None = None,
    ) -> tuple[list[tuple[bytes, T]], list[tuple[bytes, T]]]:
        """Mark `ids` applied without applying them: their effects arrived as state (a
        snapshot or a tree comparison), which covers every delta in their causal past.

        Unknown `ids` become heads; `superseded` (heads the state's source had already
        built on) stop being heads. Pending deltas the ids cover (the ids themselves and the
        pending ancestors reachable from them) leave `pending` as applied too. Then pending
        deltas that waited only for covered ids are released through `apply`, in causal
        order, as `offer` does. Returns (released, covered): the released deltas that
        `apply` accepted, and the covered pending ones (their bodies are real deltas).
        `cover` sees the covered ones first, before anything is released: a released delta
        may depend on what a covered one carries (a membership operation, a key).
        """
        ids = [i for i in dict.fromkeys(ids) if i != GENESIS]
        covered: list[tuple[bytes, T]] = []
        cover_parents: set[bytes] = set()
        stack = [i for i in ids if i in self._pending]
        while stack:
            pending = self._pending.get(stack.pop())
            if pending is None:
                continue
            self._drop(pending.id)
            covered.append((pending.id, pending.item))
            cover_parents.update(pending.parents)
            stack.extend(p for p in pending.parents if p in self._pending)
        marked = [i for i in ids if i not in self.applied]
        self.applied.update(marked)
        self.applied.update(delta_id for delta_id, _ in covered)
        self.heads.update(marked)
        self.heads.difference_update(cover_parents)
        self.heads.difference_update(s for s in superseded if s not in ids)
        if cover is not None:
            cover(covered)
        released: list[tuple[bytes, T]] = []
        # Also whatever waits for an id applied some other way meanwhile (`settle`).
        settled = [w for w in self._waiting if w in self.applied]
        for done in dict.fromkeys([*marked, *(delta_id for delta_id, _ in covered), *settled]):
            for child_id in sorted(self._waiting.pop(done, ())):
                child = self._pending.get(child_id)
                if child is None:
                    continue
                child.missing.discard(done)
                if not child.missing:
                    self._remove_pending(child_id)
                    released.extend(self._cascade([child], apply))
        return released, covered

    def forgo(
        self,
        parents: Iterable[bytes],
        eligible: Callable[[bytes, T], bool],
        apply: Apply[T] | None = None,
    ) -> list[tuple[bytes, T]]:
        """Stop making the `eligible` pending deltas wait for `parents` (ids neither applied
        nor pending: their effects are known to be here some other way); those left waiting
        for nothing are handed to `apply`, in causal order, as `offer` does. The parents
        stay unknown: should one arrive, it applies like any delta (but as no head: what
        applied here already builds on it). Returns the applied."""
        ready: list[_Pending[T]] = []
        for parent in sorted(set(parents)):
            if parent in self.applied or parent in self._pending:
                continue
            waiters = self._waiting.get(parent)
            if not waiters:
                continue
            for child_id in sorted(waiters):
                child = self._pending.get(child_id)
                if child is None or child.not_before is not None:
                    continue
                if not eligible(child_id, child.item):
                    continue
                self._forgone.add(parent)
                waiters.discard(child_id)
                child.missing.discard(parent)
                if not child.missing:
                    self._remove_pending(child_id)
                    ready.append(child)
            if not waiters:
                del self._waiting[parent]
        return self._cascade(ready, apply)

    def settle(self, delta_id: bytes) -> None:
        """Count `delta_id` applied, not as a head: a membership operation taken from a
        peer's export (it lies in the past of the heads adopted next). A pending copy leaves
        `pending`; what waits for it is released by the next `checkpoint`."""
        self._drop(delta_id)
        self.applied.add(delta_id)

    def _mark_applied(self, delta_id: bytes, parents: tuple[bytes, ...]) -> None:
        self.applied.add(delta_id)
        self.heads.difference_update(parents)
        if delta_id in self._forgone:
            self._forgone.discard(delta_id)  # something applied here builds on it already
        else:
            self.heads.add(delta_id)

    def _add_pending(self, entry: _Pending[T]) -> None:
        self._pending[entry.id] = entry
        self._by_author.setdefault(entry.author, OrderedDict())[entry.id] = None
        if entry.not_before is not None:
            self._deferred[entry.id] = entry.not_before

    def _remove_pending(self, delta_id: bytes) -> _Pending[T] | None:
        """Take a delta out of `pending` (its waits on parents are the caller's business)."""
        entry = self._pending.pop(delta_id, None)
        if entry is not None:
            self._deferred.pop(delta_id, None)
            own = self._by_author[entry.author]
            del own[delta_id]
            if not own:
                del self._by_author[entry.author]
        return entry

    def _enforce_limits(self) -> list[bytes]:
        """Evict to stay within the quotas: first each author's excess, oldest first; then,
        while the total is over, the oldest of whoever holds the most."""
        evicted: list[bytes] = []
        for own in [o for o in self._by_author.values() if len(o) > self.max_pending_per_author]:
            for delta_id in list(own)[: len(own) - self.max_pending_per_author]:
                self._drop(delta_id)
                evicted.append(delta_id)
        while len(self._pending) > self.max_pending:
            heaviest = max(self._by_author.values(), key=len)
            oldest = next(iter(heaviest))
            self._drop(oldest)
            evicted.append(oldest)
        return evicted

    def _drop(self, delta_id: bytes) -> None:
        pending = self._remove_pending(delta_id)
        if pending is None:
            return
        for parent in pending.missing:
            waiters = self._waiting.get(parent)
            if waiters is not None:
                waiters.discard(delta_id)
                if not waiters:
                    del self._waiting[parent]

    def expire(self, now: float, timeout: float) -> list[bytes]:
        """Drop pending deltas that have waited for parents longer than `timeout`; return
        their ids. Deltas deferred for time are left to `release`."""
        expired = [
            p.id
            for p in self._pending.values()
            if p.not_before is None and now - p.received_at > timeout
        ]
        for delta_id in expired:
            self._drop(delta_id)
        return expired
