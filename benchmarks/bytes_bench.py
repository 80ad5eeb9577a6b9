"""Bytes: what one `kv_store.set` of a 100-byte value costs on the wire and on disk, by
component, so the next cut is visible.

* **Per delta.** The deltas of `n` sets (new keys, 13-byte keys, 100-byte values) read back
  from the delta log, split into the header, the signature, the body's records, its app
  events, the AEAD tag and the framing. Baselines: the same header fields and body sealed
  in format 3 (the envelope before the compact one) and in format 4 (before event payloads
  referred to the records), in the same run.
* **Gossip.** One such delta as it is published: a `TopicDelta` in a StrictSign-signed
  pubsub message (from, seqno, topic, signature) inside an RPC frame, beside the delta.
  Then per delta when 4, 16 or 64 of them (one author's chain, as concurrent calls commit
  together) share one message: a plain `DeltaBatch` beside the delta alone, and the
  `SharedDeltaBatch` the node sends (author key and parent ids said once) beside it.
* **Per entry.** LMDB used pages before/after the `n` calls divided by `n`, split into the
  context's state rows and delta log (values, and keys as stored: context number ‖ entity
  or delta id), the WebSocket event log (its rows beside the same events as version 2
  rows), and what LMDB uses beyond keys and values (B-tree pages, node headers, free
  space within pages); baseline: a bare LMDB env holding the same keys and values, one
  put per transaction. Then after folding every delta, by tree and row kind, and once the
  event log's rows expired too (deleted as retention deletes them).

Standalone: ``python -m benchmarks.bytes_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path
from statistics import fmean

import attrs
import base58
import lmdb
import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

from benchmarks.context_bench import KV_STORE, _kv_items, _raw_lmdb_bytes, _set_args
from benchmarks.harness import Row, render
from trionode.context.event_log import EVENT_PREFIX
from trionode.context.events import ContextEvent
from trionode.context.folding import fold_all
from trionode.context.records import DELTAS, STATE
from trionode.context.replicas import BASE_PREFIX, CHECKPOINT_VV_PREFIX, FOLDED_SEQ_PREFIX
from trionode.context.replication import batch_of, topic_for
from trionode.dag.delta import (
    CompactBody,
    CompactBody5,
    DeltaBody,
    SignedDelta,
    _associated_data,
    open_delta,
    seal_delta,
    verify_delta,
)
from trionode.node import Node
from trionode.store.lmdb_store import NUMBERED, Column, Delete, LmdbStore, PutMany, StoreStats
from trionode.testing import open_test_node
from trionode.wire.keys import PrivateKey
from trionode.wire.messages import DeltaBatch, DeltaGossip, TopicDelta, encode_gossip
from trionode.wire.pubsub_pb import RPC, PubsubMessage, sign_message
from trionode.wire.varint import encode_uvarint

_AEAD_TAG = 16
_SIGNATURE = 64


@attrs.frozen
class Parts:
    """One delta's bytes by component."""

    total: int
    header: int
    records: int
    events: int

    signature = _SIGNATURE
    tag = _AEAD_TAG

    @property
    def framing(self) -> int:
        """Array and byte-string headers around the parts (envelope and body), and the
        root hash a format 3 body carried."""
        return self.total - self.header - self.signature - self.records - self.events - self.tag


def _parts(delta: SignedDelta, context_id: bytes, key: bytes) -> Parts:
    header = verify_delta(delta, context_id=context_id)
    if header.version >= 4:  # the records and events as they travel, not as they open
        plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
            delta.ciphertext, _associated_data(header, delta.header), header.nonce, key
        )
        compact: CompactBody | CompactBody5 = (
            msgspec.msgpack.decode(plain, type=CompactBody)
            if header.version == 4
            else msgspec.msgpack.decode(plain, type=CompactBody5)
        )
        records = sum(len(r) for r in compact.records)
        events = sum(
            len(e.name)
            + (
                len(e.payload)
                if isinstance(e.payload, bytes)
                else len(msgspec.msgpack.encode(e.payload))
            )
            for e in compact.events
        )
    else:
        body = open_delta(delta, header, key)
        records = sum(len(r) for r in body.records)
        events = sum(len(e.name) + len(e.payload) for e in body.events)
    return Parts(
        total=len(delta.encode()), header=len(delta.header), records=records, events=events
    )


def _as_format(
    delta: SignedDelta, context_id: bytes, key: bytes, version: int, author: Ed25519PrivateKey
) -> SignedDelta:
    """The same delta as a node sealed it in an older format (3: before the compact
    envelope, 4: before payloads referred to records): the same header fields and body
    (with the root hash format 3 carried), signed by its author (so format 4's references
    to the author apply as they did; never stored)."""
    header = verify_delta(delta, context_id=context_id)
    body = open_delta(delta, header, key)
    root_hash = os.urandom(32) if version < 4 else None
    return seal_delta(
        context_id=context_id,
        parents=header.parents,
        author=author,
        hlc=header.hlc,
        key_id=header.key_id,
        context_key=key,
        body=DeltaBody(body.records, body.events, root_hash),
        seq=header.seq,
        vv={t: s for t, s in header.vv if t != header.author[:8]},
        version=version,
    )


def _gossip_bytes(context_id: bytes, wire: bytes) -> int:
    """One delta as it leaves a node: the `TopicDelta` `batch_of` builds, in a signed
    pubsub message in an RPC frame (length prefix included)."""
    return _published_bytes(context_id, encode_gossip(TopicDelta(wire)))


def _map_gossip_bytes(context_id: bytes, wire: bytes) -> int:
    """`_gossip_bytes` as nodes before `TopicDelta` sent it: a `DeltaGossip` map."""
    return _published_bytes(context_id, encode_gossip(DeltaGossip(context_id, wire)))


def _published_bytes(context_id: bytes, data: bytes) -> int:
    """A gossip payload as it leaves a node: in a signed pubsub message in an RPC frame
    (length prefix included)."""
    key = PrivateKey.generate()
    message = sign_message(
        key,
        PubsubMessage(
            from_peer=key.peer_id().multihash,
            data=data,
            seqno=(1 << 62).to_bytes(8, "big"),
            topic=topic_for(context_id),
        ),
    )
    rpc = RPC(publish=(message,)).encode()
    return len(encode_uvarint(len(rpc))) + len(rpc)


async def _rows(n: int, base: Path) -> list[Row]:
    items = _kv_items(n, "user")
    async with open_test_node(base / "node", api=False) as test_node:
        node = test_node.node
        installed = await node.applications.install(str(KV_STORE))
        context_id = (await node.contexts.create(installed.application_id)).context_id
        await node.contexts.execute(context_id, "len", "{}")
        before = await node.store.scan(DELTAS, prefix=context_id)
        seq_before = node.hub.seq
        stats_before = await node.store.stats()
        for args in _set_args(items):
            await node.contexts.execute(context_id, "set", args)
        stats = await node.store.stats()
        delta_trees = (stats.tree_bytes["delta"] - stats_before.tree_bytes["delta"]) / n
        used = (stats.used_bytes - stats_before.used_bytes) / n
        trees = (
            sum(stats.tree_bytes[col] - stats_before.tree_bytes[col] for col in ("state", "delta"))
            / n
        )
        # The WebSocket event log (api.max_retained_events rows at most) is most of the
        # generic column's growth here: one row per applied delta.
        events = (stats.tree_bytes["generic"] - stats_before.tree_bytes["generic"]) / n
        keys = await node.contexts.keys(context_id)
        member_key = (await node.contexts.replicas.load(context_id)).member_key
        known = {k for k, _ in before}
        logged_deltas = [
            (k, w) for k, w in await node.store.scan(DELTAS, prefix=context_id) if k not in known
        ]
        deltas = [msgspec.msgpack.decode(w, type=SignedDelta) for _, w in logged_deltas]
        # In the order they were written (the log is keyed by id): each one's parent is
        # the one before, as in a batch of calls committed together.
        deltas.sort(key=lambda d: verify_delta(d, context_id=context_id).seq)
        state = [  # (keys and values as stored: ids in values by number)
            (_stored_key(node, Column.STATE, k), node.store.raw.stored_size(Column.STATE, v))
            for k, v in await node.store.scan(STATE, prefix=context_id)
        ]
        stored_delta_keys = [_stored_key(node, Column.DELTA, k) for k, _ in logged_deltas]
        logged = [(e, size) for e, size in await node.event_log.read() if e.seq > seq_before]
        folded = await _folded(node, context_id, stats_before, n, [e.seq for e, _ in logged])
    raw = _raw_lmdb_bytes(base / "raw-kv", items)
    own = fmean(len(k.encode()) + len(v.encode()) for k, v in items)
    parts = [
        _parts(d, context_id, keys[verify_delta(d, context_id=context_id).key_id]) for d in deltas
    ]
    old, previous = (
        [
            _parts(
                _as_format(d, context_id, keys[_key_id(d, context_id)], version, member_key),
                context_id,
                keys[_key_id(d, context_id)],
            )
            for d in deltas
        ]
        for version in (3, 4)
    )
    gossip = fmean(_gossip_bytes(context_id, d.encode()) for d in deltas)
    map_gossip = fmean(_map_gossip_bytes(context_id, d.encode()) for d in deltas)
    batches = _batch_rows(context_id, deltas, mean_delta=fmean(len(d.encode()) for d in deltas))
    state_values = sum(size for _, size in state) / n
    state_keys = sum(len(k) for k, _ in state) / n
    log_values = sum(len(d.encode()) for d in deltas) / n
    log_keys = sum(len(k) for k in stored_delta_keys) / n
    index = trees - state_values - state_keys - log_values - log_keys

    def mean(get: str, of: list[Parts]) -> float:
        return fmean(getattr(p, get) for p in of)

    delta = f"delta of one kv_store.set (100-byte value, new key), {n:,} calls"
    rows = [
        Row(
            f"{delta}: total",
            mean("total", parts),
            "B",
            "format 3 envelope, same fields",
            mean("total", old),
            higher_is_better=False,
        ),
        Row(
            f"{delta}: total",
            mean("total", parts),
            "B",
            "format 4 (payloads repeat what records hold)",
            mean("total", previous),
            higher_is_better=False,
        ),
        Row(
            "  body: app events, payloads referring to the records",
            mean("events", parts),
            "B",
            "format 4: payloads whole",
            mean("events", previous),
            higher_is_better=False,
        ),
    ]
    for label, field in (
        ("header (parents, author, seq, vv, hlc, key id, nonce)", "header"),
        ("signature (Ed25519)", "signature"),
        ("body: entity records", "records"),
        ("body: app events (name + payload as it travels)", "events"),
        ("AEAD tag", "tag"),
        ("framing (+ format 3's root hash)", "framing"),
    ):
        rows.append(
            Row(
                f"  {label}",
                mean(field, parts),
                "B",
                "format 3",
                mean(field, old),
                higher_is_better=False,
            )
        )
    rows += [
        Row(
            "one delta as gossip (TopicDelta, signed pubsub message, RPC frame)",
            gossip,
            "B",
            "the delta alone",
            mean("total", parts),
            higher_is_better=False,
        ),
        Row(
            "one delta as gossip (TopicDelta, signed pubsub message, RPC frame)",
            gossip,
            "B",
            "the same as a DeltaGossip map (sent before; still decoded)",
            map_gossip,
            higher_is_better=False,
        ),
        *batches,
        Row(
            f"LMDB used bytes per kv entry, {n:,} entries: total",
            used,
            "B/entry",
            "raw lmdb: same key+value, 1 put/txn",
            raw,
            higher_is_better=False,
        ),
    ]
    key = fmean(len(k.encode()) for k, _ in items)
    for label, value, baseline_name, baseline in (
        (
            "state rows: values (records; writer, parent by number)",
            state_values,
            "the entry's own key+value",
            own,
        ),
        ("state rows: keys (context number + entity id)", state_keys, "the entry's own key", key),
        ("delta log: values (signed deltas)", log_values, "the entry's own key+value", own),
        ("delta log: keys (context number + delta id)", log_keys, "the entry's own key", key),
        (
            "index: state and delta B-tree pages beyond keys and values",
            index,
            "raw lmdb: used beyond key+value",
            raw - own,
        ),
        (
            "WebSocket event log (generic column B-tree, bounded by retention)",
            events,
            "the entry's own key+value",
            own,
        ),
        (
            "other columns (heads) and freed pages not yet reused",
            used - trees - events,
            "raw lmdb: used beyond key+value",
            raw - own,
        ),
    ):
        rows.append(
            Row(f"  {label}", value, "B/entry", baseline_name, baseline, higher_is_better=False)
        )
    rows.append(
        Row(
            "  event log rows (keys and values): the context by number, no field twice",
            sum(size for _, size in logged) / n,
            "B/entry",
            "the same events as version 2 rows",
            sum(_v2_row_bytes(e) for e, _ in logged) / n,
            higher_is_better=False,
        )
    )
    rows.append(
        Row(
            "after folding every delta (store.delta_retention = 0): state, delta, generic "
            "B-trees per entry",
            folded.trees,
            "B/entry",
            "the same B-trees before folding",
            trees + events,
            higher_is_better=False,
        )
    )
    rows.append(
        Row(
            "after folding every delta, the day's event log kept (issue #16's aim: 5x): "
            "state, delta, generic B-trees per entry",
            folded.trees,
            "B/entry",
            "raw lmdb: same key+value, 1 put/txn",
            raw,
            higher_is_better=False,
        )
    )
    rows.append(
        Row(
            "after folding and the event log's retention (api.event_retention, a day): "
            "state, delta, generic B-trees per entry",
            folded.expired,
            "B/entry",
            "raw lmdb: same key+value, 1 put/txn",
            raw,
            higher_is_better=False,
        )
    )
    rows.append(
        Row(
            "  delta B-trees (the ids stay, each with its checkpoint row; no log row)",
            folded.delta,
            "B/entry",
            "the same before folding",
            delta_trees,
            higher_is_better=False,
        )
    )
    for label, value in (
        ("state B-tree", folded.state_tree),
        ("generic B-tree (base rows, event log)", folded.generic),
        ("base rows (folded records; empty where the state row holds the same)", folded.base),
        ("checkpoint rows (a folded delta's index row with its ckvv/ row)", folded.checkpoints),
    ):
        rows.append(
            Row(
                f"  {label}",
                value,
                "B/entry",
                "state rows: keys and values",
                state_values + state_keys,
                higher_is_better=False,
            )
        )
    return rows


def _v2_row_bytes(event: ContextEvent) -> int:
    """Key and value bytes of `event` as a version 2 event row (every field of the event,
    ids as raw bytes)."""
    row = [
        event.seq,
        base58.b58decode(event.context_id),
        bytes.fromhex(event.delta_id),
        bytes.fromhex(event.root_hash),
        [bytes.fromhex(h) for h in event.heads],
        event.events,
        event.origin,
        event.at,
    ]
    return len(EVENT_PREFIX) + 8 + 1 + len(msgspec.msgpack.encode(row))


@attrs.frozen
class _Folded:
    trees: float
    """state + delta + generic B-tree bytes per entry, after folding."""
    expired: float
    """The same once the event log's rows of the entries expired too."""
    state_tree: float
    delta: float
    generic: float
    base: float
    """base/ rows: keys and values per entry."""
    checkpoints: float
    """what stays of a folded delta: its empty row and its ckvv/ and ckseq/ rows."""


async def _folded(
    node: Node, context_id: bytes, before: StoreStats, n: int, events: list[int]
) -> _Folded:
    """Fold every final delta at once (`store.delta_retention` 0) and measure what stays,
    per entry beyond `before` (the store before the `n` calls): the steady state of a
    context whose deltas are older than the retention. Then delete the calls' event rows
    (`events`), as `api.event_retention` does a day later, and measure again."""
    await fold_all(node.contexts.replicas, retention=0.0, max_batch=256)
    stats = await node.store.stats()
    columns = ("state", "delta", "generic")
    trees = sum(stats.tree_bytes[c] - before.tree_bytes[c] for c in columns)

    async def size(prefix: bytes) -> int:
        rows = await node.store.raw_scan(Column.GENERIC, prefix=prefix)
        return sum(len(_stored_key(node, Column.GENERIC, k)) + len(v) for k, v in rows)

    empty = sum(
        len(_stored_key(node, Column.DELTA, k))
        for k, v in await node.store.scan(DELTAS, prefix=context_id)
        if not v
    )
    # A checkpoint row lives in its delta's index row (store layout 6): its value and two
    # flag bytes there, the key being the delta row's.
    marks = sum(
        len(v) + 2
        for _, v in await node.store.raw_scan(
            Column.GENERIC, prefix=CHECKPOINT_VV_PREFIX + context_id
        )
    ) + await size(FOLDED_SEQ_PREFIX + context_id)  # (format 2's second row: none now)
    grown = {c: stats.tree_bytes[c] - before.tree_bytes[c] for c in columns}
    await node.store.write(
        [Delete(Column.GENERIC, EVENT_PREFIX + seq.to_bytes(8, "big")) for seq in events]
    )
    expired = await node.store.stats()
    return _Folded(
        trees=trees / n,
        expired=sum(expired.tree_bytes[c] - before.tree_bytes[c] for c in columns) / n,
        state_tree=grown["state"] / n,
        delta=grown["delta"] / n,
        generic=grown["generic"] / n,
        base=await size(BASE_PREFIX + context_id) / n,
        checkpoints=(empty + marks) / n,
    )


def _stored_key(node: Node, column: Column, key: bytes) -> bytes:
    stored = node.store.raw.stored_key(column, key)
    assert stored is not None  # (a row's context has a number)
    return stored


def _batch_rows(context_id: bytes, chain: list[SignedDelta], *, mean_delta: float) -> list[Row]:
    """Gossip bytes per delta when `k` of these (one author's chain, as a node commits
    them together) go in one message: the plain `DeltaBatch` beside the delta alone, and
    the `SharedDeltaBatch` the broadcaster sends (its key and the parents' ids said once)
    beside the plain batch."""
    rows: list[Row] = []
    for k in (4, 16, 64):
        groups = [chain[i : i + k] for i in range(0, len(chain) - k + 1, k)]
        if not groups:
            continue
        plain = fmean(
            _published_bytes(
                context_id, encode_gossip(DeltaBatch(context_id, [d.encode() for d in g]))
            )
            / k
            for g in groups
        )
        shared = fmean(
            _published_bytes(context_id, encode_gossip(batch_of(context_id, g))) / k for g in groups
        )
        rows += [
            Row(
                f"gossip per delta, {k} chained deltas in one DeltaBatch (deltas/1)",
                plain,
                "B",
                "the delta alone",
                mean_delta,
                higher_is_better=False,
            ),
            Row(
                f"gossip per delta, {k} chained deltas in one SharedDeltaBatch (deltas/2)",
                shared,
                "B",
                "the same deltas in a DeltaBatch (deltas/1)",
                plain,
                higher_is_better=False,
            ),
        ]
    return rows


def _key_id(delta: SignedDelta, context_id: bytes) -> int:
    return verify_delta(delta, context_id=context_id).key_id


def _conversion_rows(n: int, base: Path) -> list[Row]:
    """Seconds to open a store of layout 4 holding `n` kv entries as a node keeps them
    (a state row, a delta row with its ~400-byte body, a base marker and a checkpoint row
    each): its trees move to one-byte context tags and every state value takes its
    stored form, in one transaction. Baseline: writing the same rows to a new store in one
    transaction."""
    context = hashlib.sha256(b"context").digest()
    writer = hashlib.sha256(b"writer").digest()
    parent = hashlib.sha256(b"items").digest()
    rows: dict[Column, list[tuple[bytes, bytes]]] = {c: [] for c in NUMBERED}
    for i in range(n):
        entity = hashlib.sha256(b"entity %d" % i).digest()
        delta = hashlib.sha256(b"delta %d" % i).digest()
        record = [1, parent, b"user:%08d" % i, 2, msgspec.msgpack.Ext(5, b"\x00"), None]
        state = msgspec.msgpack.encode([3, 1 << 62, writer, [*record, [None, b"v" * 100]]])
        rows[Column.STATE].append((context + entity, state))
        rows[Column.DELTA].append((context + delta, os.urandom(400)))
        rows[Column.GENERIC] += [
            (BASE_PREFIX + context + entity, b""),
            (CHECKPOINT_VV_PREFIX + context + delta, b"\x02" + os.urandom(13)),
        ]
    fresh = LmdbStore.open(base / "fresh")
    try:
        started = time.perf_counter()
        fresh.write([PutMany(c, sorted(r)) for c, r in rows.items()])
        written = time.perf_counter() - started
    finally:
        fresh.close()
    _as_layout_4(base / "old", rows)
    started = time.perf_counter()
    LmdbStore.open(base / "old").close()
    converted = time.perf_counter() - started
    return [
        Row(
            f"opening a layout 4 store of {n:,} kv entries (converts to layout 6 at open)",
            converted,
            "s",
            "the same rows written to a new store in one transaction",
            written,
            higher_is_better=False,
        )
    ]


def _as_layout_4(path: Path, rows: dict[Column, list[tuple[bytes, bytes]]]) -> None:
    """A store holding `rows` as layout 4 kept them (context 1 in 5-byte tags, in trees
    `<column>@4`, state values as written)."""
    LmdbStore.open(path).close()
    env = lmdb.open(str(path), max_dbs=32, map_size=1 << 32)
    try:
        with env.begin(write=True) as txn:
            meta = env.open_db(Column.META.value.encode(), txn=txn)
            txn.put(b"store-layout", b"4", db=meta)
            log = env.open_db(b"delta-log", txn=txn)
            for column, table in rows.items():
                env.open_db(f"{column.value}@6".encode(), txn=txn)
                db = env.open_db(f"{column.value}@4".encode(), txn=txn)
                for seq, (key, value) in enumerate(sorted(table), start=1):
                    prefix = next(p for p in NUMBERED[column] if key.startswith(p))
                    context = key[len(prefix) : len(prefix) + 32]
                    txn.put(b"context-number/" + context, (1).to_bytes(4, "big"), db=meta)
                    stored_key = prefix + b"\x01" + (1).to_bytes(4, "big") + key[len(prefix) + 32 :]
                    if column is Column.DELTA and not value:
                        txn.put(stored_key, b"", db=db)
                    elif column is Column.DELTA:
                        txn.put(stored_key, seq.to_bytes(8, "big"), db=db)
                        txn.put(seq.to_bytes(8, "big"), value, db=log)
                    else:
                        txn.put(stored_key, value, db=db)
    finally:
        env.close()


async def run(*, quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="trionode-bench-") as tmp:
        rows = await _rows(200 if quick else 3_000, Path(tmp))
        return rows + _conversion_rows(2_000 if quick else 100_000, Path(tmp) / "convert")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bytes_bench")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
