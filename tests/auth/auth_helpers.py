"""A tiny simulated causal history for resolver tests: authors write from their own view."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import attrs

from trionode.auth.model import AuthGraph, Kind, Op, StaticError, tag


@attrs.define
class Event:
    id: bytes
    author: bytes
    seq: int
    vv: dict[bytes, int]
    op: Op | None
    key_id: int


def member(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


@attrs.define
class History:
    """Every author keeps a view (the events it knows); `write`/`op` extend it."""

    events: dict[bytes, Event] = attrs.field(factory=dict)
    views: dict[bytes, set[bytes]] = attrs.field(factory=dict)
    seqs: dict[bytes, int] = attrs.field(factory=dict)
    counter: int = 0

    def _vv(self, view: set[bytes]) -> dict[bytes, int]:
        vv: dict[bytes, int] = {}
        for i in view:
            for k, v in self.events[i].vv.items():
                vv[k] = max(vv.get(k, 0), v)
        return vv

    def _new(self, author: bytes, make_op: Any, key_id: int = 0) -> Event:
        view = self.views.setdefault(author, set())
        vv = self._vv(view)
        seq = vv.get(tag(author), 0) + 1
        vv[tag(author)] = seq
        self.counter += 1
        event_id = hashlib.sha256(b"event" + self.counter.to_bytes(4, "big")).digest()
        known = [self.events[i].op for i in view if self.events[i].op is not None]
        parents = tuple(
            o.id
            for o in known
            if o is not None
            and not any(o is not u and u is not None and o.in_past_of(u.vv) for u in known)
        )
        op = make_op(event_id, seq, vv, parents) if make_op is not None else None
        event = Event(event_id, author, seq, vv, op, key_id)
        self.events[event_id] = event
        view.add(event_id)
        return event

    def op(self, author: bytes, kind: Kind, **fields: Any) -> Event:
        def make(event_id: bytes, seq: int, vv: dict[bytes, int], parents: tuple[bytes, ...]) -> Op:
            return Op(
                id=event_id,
                author=author,
                seq=seq,
                vv=dict(vv),
                kind=kind,
                parents=parents,
                **fields,
            )

        return self._new(author, make)

    def write(self, author: bytes, key_id: int = 1) -> Event:
        return self._new(author, None, key_id)

    def learn(self, who: bytes, source: bytes) -> None:
        """`who` learns everything `source` knows (a merge)."""
        self.views.setdefault(who, set()).update(self.views.get(source, set()))

    def learn_all(self, who: bytes) -> None:
        self.views.setdefault(who, set()).update(self.events)

    def graph(self, order: list[bytes] | None = None) -> AuthGraph:
        """The ops added in a causal order (each op's past complete when it is added): by
        depth, or the first op of `order` whose past is in. Statically invalid ones are
        skipped, as the delta processor rejects them."""
        graph = AuthGraph()
        ops = [e.op for e in self.events.values() if e.op is not None]
        if order is None:
            ops.sort(key=lambda o: (sum(o.vv.values()), o.id))
        else:
            rank = {i: n for n, i in enumerate(order)}
            ops.sort(key=lambda o: rank[o.id])
            linear: list[Op] = []
            placed: set[bytes] = set()
            while ops:
                ready = next(
                    o
                    for o in ops
                    if all(p.id in placed for p in ops if p is not o and p.in_past_of(o.vv))
                )
                ops.remove(ready)
                linear.append(ready)
                placed.add(ready.id)
            ops = linear
        for op in ops:
            try:
                graph.add(op)
            except StaticError:
                continue
        return graph


PEOPLE = [member(n) for n in "ABCDE"]


def random_history(
    steps: list[tuple[str, int, int, str]],
    on_ack: Callable[[bytes, dict[bytes, int]], None] | None = None,
) -> History:
    """A creates the context with B admin and C member; then each step (kind, who, target,
    role) by PEOPLE[who]: write, grant, demote, remove, leave, rotate, merge (who learns
    what target knows) or ack (`on_ack` gets who's view as a version vector)."""
    h = History()
    a = PEOPLE[0]
    h.op(a, Kind.CREATE, key_id=1)
    h.op(a, Kind.GRANT, target=PEOPLE[1], role="admin")
    h.op(a, Kind.GRANT, target=PEOPLE[2], role="member")
    for p in PEOPLE:
        h.learn_all(p)
    key = 2
    for kind, who_i, target_i, role in steps:
        who, target = PEOPLE[who_i], PEOPLE[target_i]
        if kind == "merge":
            h.learn(who, target)
            continue
        if kind == "ack":
            vv = h._vv(h.views.get(who, set()))
            if on_ack is not None and vv:
                on_ack(who, vv)
            continue
        # Authors act from their own view, like honest nodes that may lag: check the op
        # against that view and drop it if no honest node would write it.
        view_graph = h.graph()
        if kind == "write":
            h.write(who, key_id=1)
            continue
        fields: dict[str, object] = {}
        if kind == "grant":
            op_kind, fields = Kind.GRANT, {"target": target, "role": role}
        elif kind == "demote":
            op_kind, fields = Kind.GRANT, {"target": target, "role": "read-only"}
        elif kind == "remove":
            op_kind, fields = Kind.REMOVE, {"target": target, "key_id": key}
        elif kind == "rotate":
            op_kind, fields = Kind.ROTATE, {"key_id": key}
        else:
            op_kind = Kind.LEAVE
        key += 1
        event = h.op(who, op_kind, **fields)
        try:
            view_graph.check(event.op)  # type: ignore[arg-type]
        except StaticError:
            del h.events[event.id]
            h.views[who].discard(event.id)
            h.seqs.pop(who, None)
    return h
