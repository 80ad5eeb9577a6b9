"""Folding: final deltas leave the undo log (reference local-first-auth.md §5.4).

A data delta whose verdict can no longer change (final: trionode/auth/finality.py) and
which is older than `store.delta_retention` is *folded*: its records, if it stood, are
joined into the context's final state, and its body leaves the delta column. What stays
is what a checkpoint is (serving.py): an empty delta row (the id stays applied, so the DAG
and its children are intact across restarts) and its version vector (so a child's chain
checks still pass), with its author and sequence number in the same `ckvv/` row: a second
delta that author signs with the same number equivocates, and must still be seen to after
a restart.
Folding is one bounded batch per LMDB transaction, under the replica's lock.

The final state is the `base/` rows the rebuild already starts from: those were "records
no delta body here carries" (snapshot pages, tree comparison) and folded records are
exactly that. So the invariant stays one sentence — state = base ⊔ the records of every
standing delta whose body we hold — and an undo (`DeltaProcessor._rebuild`) reads only
non-final bodies. Folding changes no state row and no root hash: a folded delta moves from
one side of the join to the other.

Deltas stay unfolded when they are: membership operations (the auth history is kept for
good: every verdict is computed from it), current heads (a peer one delta behind can still
fetch it; it folds once something is written on it), or newer than the retention. A peer
that asks for a folded delta hears "folded" (`DeltaResponse.folded`), not "missing": it
does not ask us again, and what waits for that delta there applies once the peer's *own*
finality covers it (`DeltaProcessor.release_past_folded`; a false "folded" changes
nothing), its effects coming as final state.
"""

from __future__ import annotations

import logging

import trio

from trionode.auth.model import Verdict, tag
from trionode.context.errors import ContextError
from trionode.context.final_state import BASE_PREFIX, note_base
from trionode.context.processing import ReplicationMetrics
from trionode.context.records import DELTAS, STATE
from trionode.context.replicas import (
    AUX,
    CHECKPOINT_VV_PREFIX,
    Replica,
    ReplicaStore,
    folded_row,
    read_base,
)
from trionode.crdt import Entity, decode_entities, decode_entity, encode_entity, ntp64_from_unix
from trionode.crdt.compact import record_of_row
from trionode.crdt.rows import JOURNAL_KINDS
from trionode.dag.delta import decode_delta, open_delta, verify_delta
from trionode.errors import ProtocolError
from trionode.store.store import WriteBatch

log = logging.getLogger(__name__)


async def fold_once(
    replicas: ReplicaStore, replica: Replica, *, retention: float, max_batch: int
) -> int:
    """Fold up to `max_batch` final deltas of `replica` older than `retention` seconds, in
    one transaction; returns how many were folded."""
    context_id = replica.context_id
    store = replicas.store
    async with replica.lock:
        authority = replica.authority
        final = authority.finality()
        cutoff = ntp64_from_unix(max(0.0, replicas.wall_clock() - retention))
        heads = set(replica.dag.heads)
        chosen = sorted(
            (
                (sum(meta.vv.values()), delta_id)
                for delta_id, meta in authority.meta.items()
                if not meta.op
                and delta_id not in heads
                and meta.hlc <= cutoff
                and final.is_final(meta.vv)
            ),
        )[:max_batch]
        if not chosen:
            return 0
        batch = WriteBatch()
        joined: dict[bytes, Entity] = {}
        for _, delta_id in chosen:
            meta = authority.meta[delta_id]
            if authority.verdicts.get(delta_id) is Verdict.ACCEPTED:
                wire = store.get_sync(DELTAS, context_id + delta_id)
                if wire:
                    for record in _records(replica, wire):
                        known = joined.get(record.id)
                        if known is None:
                            base = read_base(store, replica, record.id)
                            if base is not None:
                                known = decode_entity(base)
                        joined[record.id] = record if known is None else known.join(record)
            batch.put(DELTAS, context_id + delta_id, b"")
            batch.put(
                AUX,
                CHECKPOINT_VV_PREFIX + context_id + delta_id,
                folded_row(tag(meta.author), meta.seq, meta.vv),
            )
        for entity_id, entity in joined.items():
            batch.put(AUX, BASE_PREFIX + context_id + entity_id, _base_row(replica, entity))
        # The final state kept for snapshots takes them now: no rebuild per fold.
        note_base(replica, list(joined.values()))
        await replicas.write(replica, batch)
        for _, delta_id in chosen:
            authority.fold(delta_id)
    return len(chosen)


def _base_row(replica: Replica, entity: Entity) -> bytes:
    """A folded entity's new base row: a marker when it is the state row's record (the
    usual case once all of an entity's deltas are folded: see `replicas.BASE_PREFIX`)."""
    record = encode_entity(entity)
    if entity.kind in JOURNAL_KINDS or replica.store is None:
        return record
    state = replica.store.get_sync(STATE, replica.context_id + entity.id)
    return b"" if state is not None and record_of_row(state) == record else record


def _records(replica: Replica, wire: bytes) -> list[Entity]:
    try:
        delta = decode_delta(wire)
        header = verify_delta(delta, context_id=replica.context_id)
        body = open_delta(delta, header, replica.keys[header.key_id])
        return decode_entities(body.records)
    except (KeyError, ProtocolError):
        # It was applied, so we could read it then: only a damaged row lands here. Its
        # records are in the state rows already; the base just lacks them for a rebuild.
        log.warning("folding %s: its body no longer opens", replica.context_id.hex()[:12])
        return []


async def fold_all(replicas: ReplicaStore, *, retention: float, max_batch: int) -> int:
    """Fold what is due in every loaded context, batch after batch; returns the count."""
    total = 0
    for replica in replicas.loaded():
        while True:
            try:
                folded = await fold_once(
                    replicas, replica, retention=retention, max_batch=max_batch
                )
            except ContextError:
                break
            total += folded
            if folded < max_batch:
                break
            await trio.lowlevel.checkpoint()  # let writers in between batches
    return total


async def serve_folding(
    replicas: ReplicaStore,
    *,
    retention: float,
    interval: float,
    max_batch: int,
    metrics: ReplicationMetrics,
    shutdown_requested: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every `interval` seconds, fold what is final and older than `retention`; each folded
    delta counts as `trionode_deltas_total{outcome="folded"}`."""

    async def loop() -> None:
        while True:
            await trio.sleep(interval)
            folded = await fold_all(replicas, retention=retention, max_batch=max_batch)
            if folded:
                metrics.outcome("folded", folded)
                log.debug("folded %d final deltas", folded)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop)
        task_status.started()
        await shutdown_requested.wait()
        nursery.cancel_scope.cancel(reason="node shutting down")
