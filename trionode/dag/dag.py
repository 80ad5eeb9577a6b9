"""The per-context causal DAG: which deltas can be applied now, which must wait.

A delta applies once all its parents have applied. One that arrives early waits in
`pending` (bounded; the oldest is evicted and reported when full, and `expire` drops those
older than a timeout) and is released by the arrival of its last missing parent. The
cascade is a loop over a work list, never recursion, so a chain of any length that arrives
backwards applies without growing the stack.

Heads are the applied deltas nothing applied builds on yet; a new local delta takes them
all as parents, which is what collapses concurrent branches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import attrs

from trionode.dag.delta import GENESIS

T = TypeVar("T")


@attrs.define
class _Pending(Generic[T]):
    id: bytes
    parents: tuple[bytes, ...]
    item: T
    received_at: float
    missing: set[bytes]


@attrs.frozen
class Offer(Generic[T]):
    """What `CausalDag.offer` decided."""

    ready: list[tuple[bytes, T]]
    """Deltas to apply now, in causal order (the offered one first, then its cascade)."""
    missing: frozenset[bytes]
    """Parents nobody has offered yet: ask a peer for these."""
    duplicate: bool
    evicted: list[bytes]
    """Pending deltas dropped to stay within `max_pending`."""

    @property
    def pending(self) -> bool:
        return not self.ready and not self.duplicate


class CausalDag(Generic[T]):
    def __init__(
        self, *, applied: Iterable[bytes] = (), heads: Iterable[bytes] = (), max_pending: int = 1000
    ) -> None:
        self.applied: set[bytes] = set(applied)
        self.heads: set[bytes] = set(heads)
        self.max_pending = max_pending
        self._pending: OrderedDict[bytes, _Pending[T]] = OrderedDict()
        self._waiting: dict[bytes, set[bytes]] = {}

    # -- queries ---------------------------------------------------------------------------

    def knows(self, delta_id: bytes) -> bool:
        return delta_id in self.applied or delta_id in self._pending

    def is_pending(self, delta_id: bytes) -> bool:
        return delta_id in self._pending

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def pending_items(self) -> list[tuple[bytes, T]]:
        return [(p.id, p.item) for p in self._pending.values()]

    def missing(self) -> set[bytes]:
        """Parents that pending deltas wait for and that are not pending themselves."""
        return {p for p in self._waiting if p not in self._pending}

    def parents_for_new_delta(self) -> list[bytes]:
        return sorted(self.heads) if self.heads else [GENESIS]

    # -- changes ---------------------------------------------------------------------------

    def offer(
        self,
        delta_id: bytes,
        parents: Iterable[bytes],
        item: T,
        now: float,
        apply: Callable[[bytes, T], bool] | None = None,
    ) -> Offer[T]:
        """Add a delta. With `apply`, each delta that becomes ready is handed to it in causal
        order; one it refuses (returns False) is not applied, so nothing builds on it and its
        descendants wait (and expire) instead. `ready` lists only the accepted ones."""
        if self.knows(delta_id):
            return Offer([], frozenset(), duplicate=True, evicted=[])
        parents = tuple(parents)
        missing = {p for p in parents if p != GENESIS and p not in self.applied}
        if missing:
            self._pending[delta_id] = _Pending(delta_id, parents, item, now, set(missing))
            for parent in missing:
                self._waiting.setdefault(parent, set()).add(delta_id)
            evicted: list[bytes] = []
            while len(self._pending) > self.max_pending:
                oldest = next(iter(self._pending))
                self._drop(oldest)
                evicted.append(oldest)
            unknown = frozenset(p for p in missing if p not in self._pending)
            return Offer([], unknown, duplicate=False, evicted=evicted)
        return Offer(self._cascade(delta_id, parents, item, apply), frozenset(), False, [])

    def _cascade(
        self,
        delta_id: bytes,
        parents: tuple[bytes, ...],
        item: T,
        apply: Callable[[bytes, T], bool] | None,
    ) -> list[tuple[bytes, T]]:
        ready: list[tuple[bytes, T]] = []
        work: list[tuple[bytes, tuple[bytes, ...], T]] = [(delta_id, parents, item)]
        while work:
            current, current_parents, current_item = work.pop()
            if apply is not None and not apply(current, current_item):
                continue
            self._mark_applied(current, current_parents)
            ready.append((current, current_item))
            for child_id in sorted(self._waiting.pop(current, ())):
                child = self._pending.get(child_id)
                if child is None:
                    continue
                child.missing.discard(current)
                if not child.missing:
                    del self._pending[child_id]
                    work.append((child.id, child.parents, child.item))
        return ready

    def checkpoint(
        self,
        ids: Iterable[bytes],
        *,
        superseded: Iterable[bytes] = (),
        apply: Callable[[bytes, T], bool] | None = None,
    ) -> tuple[list[tuple[bytes, T]], list[tuple[bytes, T]]]:
        """Mark `ids` applied without applying them: their effects arrived as state (a
        snapshot or a tree comparison), which covers every delta in their causal past.

        Unknown `ids` become heads; `superseded` (heads the state's source had already
        built on) stop being heads. Pending deltas the ids cover (the ids themselves and the
        pending ancestors reachable from them) leave `pending` as applied too. Then pending
        deltas that waited only for covered ids are released through `apply`, in causal
        order, as `offer` does. Returns (released, covered): the released deltas that
        `apply` accepted, and the covered pending ones (their bodies are real deltas).
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
        released: list[tuple[bytes, T]] = []
        for done in [*marked, *(delta_id for delta_id, _ in covered)]:
            for child_id in sorted(self._waiting.pop(done, ())):
                child = self._pending.get(child_id)
                if child is None:
                    continue
                child.missing.discard(done)
                if not child.missing:
                    del self._pending[child_id]
                    released.extend(self._cascade(child.id, child.parents, child.item, apply))
        return released, covered

    def _mark_applied(self, delta_id: bytes, parents: tuple[bytes, ...]) -> None:
        self.applied.add(delta_id)
        self.heads.difference_update(parents)
        self.heads.add(delta_id)

    def _drop(self, delta_id: bytes) -> None:
        pending = self._pending.pop(delta_id, None)
        if pending is None:
            return
        for parent in pending.missing:
            waiters = self._waiting.get(parent)
            if waiters is not None:
                waiters.discard(delta_id)
                if not waiters:
                    del self._waiting[parent]

    def expire(self, now: float, timeout: float) -> list[bytes]:
        """Drop pending deltas that have waited longer than `timeout`; return their ids."""
        expired = [p.id for p in self._pending.values() if now - p.received_at > timeout]
        for delta_id in expired:
            self._drop(delta_id)
        return expired
