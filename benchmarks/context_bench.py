"""Contexts: `kv_store.set` calls per second, a text-editing trace on `Text` vs pycrdt (Yjs),
and bytes of memory and of LMDB per stored entry. Every baseline is measured in the same run.

* **Calls.** `n` `kv_store.set` calls, each with a new key (so the context grows from 0 to
  `n` keys), (a) in process through `ContextManager.execute` on a running node (each call is
  one signed, encrypted delta committed to LMDB with the changed state rows, heads and root
  hash; LMDB syncs every commit), (b) over HTTP JSON-RPC with httpx on a fresh context of the
  same node (sequential requests on one keep-alive connection; client and server share this
  process and its one trio thread). Baselines: `trionode.sdk.runtime.execute` on an in-memory
  `StateTree` without and with the per-call root hash the node computes (the cost of
  durability and of the Merkle root respectively), and raw LMDB committing the very rows the
  node wrote (captured from the in-process run, one transaction per call).
* **Text.** Two seeded, deterministic traces of single-character inserts and deletes: a
  typing session (words typed at a moving cursor, bursts of backspaces, arrow-key moves,
  jumps elsewhere) and random-position edits (80% inserts, 20% deletes, each at a uniformly
  random place), applied to trionode's `Text` with one `StateTree` transaction per keystroke,
  and to `pycrdt.Text` with one (implicit) transaction per keystroke. Both final texts must
  equal the trace's own result (checked, the run fails otherwise). Sizes: the sum of
  `encode_entity` over the tree's entities vs `doc.get_update()`.
* **Text range deletes.** The typing trace's text, typed into both (untimed), then 50
  seeded deletes of 200-2,000 characters at random places, one transaction each
  (`Text.delete(pos, length)` against pycrdt's `del text[a:b]`), results checked.
* **Text memory.** Resident bytes per character of the typing trace's text: RSS growth
  while the trace is typed, each side (trionode `StateTree`, pycrdt Doc) in a freshly
  spawned process so neither reuses memory the other freed.
* **Vector.** The same two traces (20,000 edits) on `Vector[int]` (an insert puts its edit
  number at the position) and on `pycrdt.Array`, one transaction per edit, results checked;
  each side runs each 20,000-edit trace three times, alternating (ours, theirs, ours, ...),
  each on a fresh document, and the row shows each side's fastest run (a run is ~0.3 s,
  so one scheduling hiccup on a loaded machine moved a single run's ratio by 0.2-0.5);
  and the typing trace again at the Text rows' length (100,000 edits), once per side.
  pycrdt's cost per edit grows with the document (at 100,000 random-position edits it
  manages ~50 ops/s, so that trace stays at 20,000) while ours stays about flat, so the
  ratio depends on the length: both lengths are shown.
* **Keystrokes through a context.** One `notes.insert`/`notes.delete` call per keystroke on
  a running node, on a note that already holds a long text: calls/s and the LMDB bytes each
  call's commit writes (state rows alone, and every row), beside the same keystrokes on an
  in-memory `StateTree` with and without the per-call root hash, and the Yjs update pycrdt
  produces per keystroke.
* **Per entry.** LMDB used pages (`store.stats().used_bytes`, before/after the in-process
  calls) divided by `n`, vs raw LMDB holding the same key and value bytes (one put per
  transaction); stored key+value bytes of the context's state rows and of its delta log; and
  the Python memory (tracemalloc) of the `StateTree` rebuilt from those state rows with its
  root hash computed, vs a `dict[str, str]` of the same keys and values.

Standalone: ``python -m benchmarks.context_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import multiprocessing
import os
import pstats
import random
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final
from unittest.mock import patch

import httpx
import lmdb
import pycrdt
import trio

from benchmarks.harness import Row, render
from trionode.cli_node import freeze_startup_heap
from trionode.context.manager import b58
from trionode.context.records import DELTAS, STATE
from trionode.crdt import (
    HybridClock,
    StateTree,
    encode_entity,
    ntp64_from_unix_ns,
    text,
    vector,
)
from trionode.sdk import App
from trionode.sdk.bundle import load_app, load_bundle, verify_bundle
from trionode.sdk.runtime import execute, init_state
from trionode.store.lmdb_store import Column, Delete, Put, PutRun, WriteOp
from trionode.testing import TestNode, open_test_node

KV_STORE = Path(__file__).resolve().parents[1] / "apps" / "kv_store"
NOTES = Path(__file__).resolve().parents[1] / "apps" / "notes"
VALUE_BYTES = 100
MEMBER = b"\x01" * 32
CONTEXT = b"\x02" * 32
LMDB_MAP = 1 << 30

TEXT = text()
Edit = tuple[int, str | None]
"""(position, character inserted there) or (position, None): delete the character there."""

_VOCABULARY = (
    "the of and to a in is it you that he was for on are with as I his they be at one have "
    "this from or had by not word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been "
    "now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence "
    "great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port large "
    "spell add even land here must big high such follow act why ask men change went light"
)
_WORDS = _VOCABULARY.split()
_ENDINGS = (" ", ", ", ". ", ".\n")
_ENDING_WEIGHTS = (85, 6, 6, 3)


# -- the editing trace -----------------------------------------------------------------


def editing_trace(ops: int, *, seed: int = 2026) -> list[Edit]:
    """`ops` single-character edits: words typed at a cursor, with typo bursts of 1-6
    backspaces (~15% of edits are deletes), arrow-key moves and, every ~70 keystrokes, a
    jump to a random place in the document. Deterministic for a given seed."""
    rng = random.Random(seed)
    trace: list[Edit] = []
    length = cursor = 0
    pending = ""  # the rest of the word being typed
    while len(trace) < ops:
        roll = rng.random()
        if roll < 0.015 and length:  # click elsewhere
            cursor = rng.randint(0, length)
        elif roll < 0.03 and length:  # arrow keys
            cursor = min(length, max(0, cursor + rng.randint(-20, 20)))
        elif roll < 0.075 and cursor:  # a typo: a burst of backspaces
            for _ in range(min(cursor, rng.randint(1, 6))):
                cursor -= 1
                length -= 1
                trace.append((cursor, None))
        else:
            if not pending:
                ending = rng.choices(_ENDINGS, weights=_ENDING_WEIGHTS)[0]
                pending = rng.choice(_WORDS) + ending
            trace.append((cursor, pending[0]))
            pending = pending[1:]
            cursor += 1
            length += 1
    return trace[:ops]


def random_trace(ops: int, *, seed: int = 2027) -> list[Edit]:
    """`ops` single-character edits at uniformly random positions: 80% inserts of a random
    letter or space, 20% deletes (inserts while the text is empty). Deterministic."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    trace: list[Edit] = []
    length = 0
    for _ in range(ops):
        if length and rng.random() < 0.2:
            length -= 1
            trace.append((rng.randrange(length + 1), None))
        else:
            trace.append((rng.randint(0, length), rng.choice(alphabet)))
            length += 1
    return trace


def replay(trace: Sequence[Edit]) -> str:
    """The text a trace produces (the reference both CRDTs must match)."""
    chars: list[str] = []
    for pos, char in trace:
        if char is None:
            del chars[pos]
        else:
            chars.insert(pos, char)
    return "".join(chars)


def _keystroke(tree: StateTree, clock: HybridClock, pos: int, char: str | None) -> None:
    """One edit of the Text field "body", in a transaction of its own."""
    with tree.begin(clock, ntp64_from_unix_ns(time.time_ns())) as tx:
        body = tx.field("body", TEXT)
        if char is None:
            body.delete(pos, 1)
        else:
            body.insert(pos, char)
        tx.commit()


def _trionode_text(trace: Sequence[Edit]) -> tuple[float, str, int]:
    """(seconds, final text, encoded bytes): one transaction per keystroke."""
    tree = StateTree()
    clock = HybridClock(MEMBER)
    gc.collect()  # start without debt: see `_vector_rows`
    started = time.perf_counter()
    for pos, char in trace:
        _keystroke(tree, clock, pos, char)
    elapsed = time.perf_counter() - started
    with tree.reader() as tx:
        final = tx.field("body", TEXT).value()
    size = sum(len(encode_entity(entity)) for entity in tree.entities())
    return elapsed, final, size


def _written_per_keystroke(trace: Sequence[Edit]) -> tuple[float, int]:
    """(state bytes staged per keystroke, final Text record bytes): the trace again, with
    `drain_rows` after every keystroke as the node stages a call (keys are context-relative
    here; the node prefixes 32 bytes)."""
    tree = StateTree()
    clock = HybridClock(MEMBER)
    written = 0
    for pos, char in trace:
        _keystroke(tree, clock, pos, char)
        written += sum(len(k) + len(v) for k, v in tree.drain_rows() if v is not None)
    return written / len(trace), sum(len(encode_entity(e)) for e in tree.entities())


def _pycrdt_text(trace: Sequence[Edit]) -> tuple[float, str, int]:
    """(seconds, final text, update bytes): one implicit transaction per keystroke (one
    explicit transaction around the whole trace is several times slower in pycrdt 0.14)."""
    doc: pycrdt.Doc[pycrdt.Text] = pycrdt.Doc()
    body = pycrdt.Text()
    doc["body"] = body
    gc.collect()  # start without debt: see `_vector_rows`
    started = time.perf_counter()
    for pos, char in trace:
        if char is None:
            del body[pos]
        else:
            body.insert(pos, char)
    elapsed = time.perf_counter() - started
    return elapsed, str(body), len(doc.get_update())


def _vector_edits(trace: Sequence[Edit]) -> list[tuple[int, int | None]]:
    """A Text trace as Vector edits: each insert puts its edit number at the position."""
    return [(pos, None if char is None else k) for k, (pos, char) in enumerate(trace)]


def _replay_vector(edits: Sequence[tuple[int, int | None]]) -> list[int]:
    items: list[int] = []
    for pos, value in edits:
        if value is None:
            del items[pos]
        else:
            items.insert(pos, value)
    return items


def _trionode_vector(edits: Sequence[tuple[int, int | None]]) -> tuple[float, list[int]]:
    tree = StateTree()
    clock = HybridClock(MEMBER)
    spec = vector(int)
    gc.collect()  # start without debt: see `_vector_rows`
    started = time.perf_counter()
    for pos, value in edits:
        with tree.begin(clock, ntp64_from_unix_ns(time.time_ns())) as tx:
            items = tx.field("items", spec)
            if value is None:
                items.delete(pos)
            else:
                items.insert(pos, value)
            tx.commit()
    elapsed = time.perf_counter() - started
    with tree.reader() as tx:
        return elapsed, tx.field("items", spec).to_list()


def _pycrdt_vector(edits: Sequence[tuple[int, int | None]]) -> tuple[float, list[int]]:
    doc: pycrdt.Doc[pycrdt.Array[int]] = pycrdt.Doc()
    items: pycrdt.Array[int] = pycrdt.Array()
    doc["items"] = items
    gc.collect()  # start without debt: see `_vector_rows`
    started = time.perf_counter()
    for pos, value in edits:
        if value is None:
            del items[pos]
        else:
            items.insert(pos, value)
    elapsed = time.perf_counter() - started
    return elapsed, [int(v) for v in items]  # (Yjs numbers come back as floats)


_VECTOR_RUNS: Final = 3
"""Runs per side of each short Vector trace (the fastest counts: see the module docstring)."""


def _vector_rows(ops: int, *, long_typing: int) -> list[Row]:
    """Both sides of every trace row start after a full `gc.collect()`: building the traces
    leaves tens of thousands of young objects, and the collector would otherwise charge
    their promotion to whichever side runs first (a full collection of the whole bench
    process costs ~100 ms, a fifth of a 20,000-edit run)."""
    rows: list[Row] = []
    traces = [
        ("typing", editing_trace(ops), _VECTOR_RUNS),
        ("random-position", random_trace(ops), _VECTOR_RUNS),
        ("typing", editing_trace(long_typing), 1),
    ]
    for name, trace, runs in traces:
        ops = len(trace)
        edits = _vector_edits(trace)
        expected = _replay_vector(edits)
        ours = theirs = float("inf")
        for _ in range(runs):  # alternating, so load changes hit both sides alike
            our_time, our_items = _trionode_vector(edits)
            their_time, their_items = _pycrdt_vector(edits)
            _check(our_items == expected, "trionode Vector diverged from the trace's result")
            _check(their_items == expected, "pycrdt Array diverged from the trace's result")
            ours = min(ours, our_time)
            theirs = min(theirs, their_time)
        best = f", fastest of {runs} alternated runs each" if runs > 1 else ""
        rows.append(
            Row(
                f"Vector[int] {name} trace, 1 txn/edit: {ops:,} edits -> {len(expected):,} "
                f"items, equal in both{best}",
                ops / ours,
                "ops/s",
                "pycrdt (Yjs) Array, same edits",
                ops / theirs,
            )
        )
    return rows


def _text_rows(ops: int) -> list[Row]:
    typing = editing_trace(ops)
    per_keystroke, record = _written_per_keystroke(typing)
    return [
        *_trace_rows("Text editing trace", typing),
        Row(
            "Text editing trace: state bytes staged per keystroke (rows.py journal)",
            per_keystroke,
            "bytes",
            "the whole Text record at the end (what a whole-row rewrite writes)",
            record,
            higher_is_better=False,
        ),
        *_trace_rows("Text random-position trace", random_trace(ops)),
        *_range_delete_rows(typing, 50),
        *_memory_rows(ops),
    ]


def _typed_tree(trace: Sequence[Edit]) -> tuple[StateTree, HybridClock]:
    """A `StateTree` with the trace typed into its Text "body", one transaction each."""
    tree = StateTree()
    clock = HybridClock(MEMBER)
    for pos, char in trace:
        _keystroke(tree, clock, pos, char)
    return tree, clock


def _typed_pycrdt(trace: Sequence[Edit]) -> tuple[pycrdt.Doc[pycrdt.Text], pycrdt.Text]:
    """A pycrdt Doc with the trace typed into its Text "body"."""
    doc: pycrdt.Doc[pycrdt.Text] = pycrdt.Doc()
    body = pycrdt.Text()
    doc["body"] = body
    for pos, char in trace:
        if char is None:
            del body[pos]
        else:
            body.insert(pos, char)
    return doc, body


def _range_delete_rows(trace: Sequence[Edit], deletes: int) -> list[Row]:
    """Large range deletes: the typing trace typed into both CRDTs first (untimed), then
    `deletes` seeded deletes of 200-2,000 characters at random places, one transaction
    each (`Text.delete(pos, length)` against pycrdt's `del text[pos:pos + length]`)."""
    rng = random.Random(2028)
    typed = replay(trace)
    length = len(typed)
    ranges: list[tuple[int, int]] = []
    for _ in range(deletes):
        count = min(rng.randint(200, 2_000), length // 2)
        ranges.append((rng.randint(0, length - count), count))
        length -= count
    expected = typed
    for pos, count in ranges:
        expected = expected[:pos] + expected[pos + count :]
    tree, clock = _typed_tree(trace)
    _doc, body = _typed_pycrdt(trace)  # (the Doc must outlive its Text)
    gc.collect()  # start without debt: see `_vector_rows`
    started = time.perf_counter()
    for pos, count in ranges:
        with tree.begin(clock, ntp64_from_unix_ns(time.time_ns())) as tx:
            tx.field("body", TEXT).delete(pos, count)
            tx.commit()
    ours = time.perf_counter() - started
    gc.collect()
    started = time.perf_counter()
    for pos, count in ranges:
        del body[pos : pos + count]
    theirs = time.perf_counter() - started
    with tree.reader() as tx:
        _check(tx.field("body", TEXT).value() == expected, "trionode Text range deletes diverged")
    _check(str(body) == expected, "pycrdt Text range deletes diverged")
    removed = sum(count for _, count in ranges)
    return [
        Row(
            f"Text range deletes, 1 txn each: {deletes} deletes of 200-2,000 chars "
            f"({removed:,} chars) from the {len(typed):,}-char typed text, equal in both",
            deletes / ours,
            "deletes/s",
            "pycrdt (Yjs) del text[a:b], same ranges",
            deletes / theirs,
        )
    ]


def _resident_bytes() -> int:
    """This process's resident set (Linux `/proc`), after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_of_typing(side: str, ops: int) -> int:
    """Resident bytes a typed text holds: the typing trace of `ops` edits typed into a
    fresh `StateTree` ("ours", one transaction per keystroke) or a pycrdt Doc, RSS after
    minus RSS before (the trace itself already built). Runs in a spawned process of its
    own, so neither side reuses memory the other freed."""
    trace = editing_trace(ops)
    before = _resident_bytes()
    keep = _typed_tree(trace) if side == "ours" else _typed_pycrdt(trace)
    used = _resident_bytes() - before
    del keep
    return used


def _memory_rows(ops: int) -> list[Row]:
    chars = len(replay(editing_trace(ops)))
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        ours = pool.apply(_memory_of_typing, ("ours", ops))
        theirs = pool.apply(_memory_of_typing, ("pycrdt", ops))
    return [
        Row(
            f"Text editing trace: resident memory per character of the typed text "
            f"({ops:,} edits -> {chars:,} chars; RSS growth, each side in a fresh process)",
            ours / chars,
            "bytes",
            "pycrdt (Yjs) Text, same trace",
            theirs / chars,
            higher_is_better=False,
        )
    ]


def _trace_rows(name: str, trace: list[Edit]) -> list[Row]:
    ops = len(trace)
    expected = replay(trace)
    deletes = sum(char is None for _, char in trace)
    ours, our_text, our_size = _trionode_text(trace)
    theirs, their_text, their_size = _pycrdt_text(trace)
    _check(our_text == expected, "trionode Text diverged from the trace's own result")
    _check(their_text == expected, "pycrdt Text diverged from the trace's own result")
    what = f"{ops:,} edits ({deletes:,} deletes) -> {len(expected):,} chars, equal in both"
    return [
        Row(
            f"{name}, 1 txn/keystroke: {what}",
            ops / ours,
            "ops/s",
            "pycrdt (Yjs) Text, same trace",
            ops / theirs,
        ),
        Row(
            f"{name}: encoded state after it (sum of encode_entity)",
            our_size,
            "bytes",
            "pycrdt doc.get_update()",
            their_size,
            higher_is_better=False,
        ),
    ]


# -- keystrokes through a context ----------------------------------------------------


async def _keystroke_rows(keystrokes: int, prefill: int, base: Path) -> list[Row]:
    """One `notes.insert`/`notes.delete` call per keystroke on a running node, on a note
    that starts with `prefill` characters (so the Text is long, as a document being edited
    is): calls/s, and the bytes of the LMDB rows each call's commit writes (key + value of
    every put), split into state rows and everything (state + signed delta log + heads +
    context record). Baselines: the same keystrokes on an in-memory `StateTree` with and
    without the root hash the node computes per call, and the Yjs update pycrdt produces
    per keystroke (`get_update` against the state vector before it)."""
    typing = editing_trace(keystrokes, seed=2028)
    start_text = replay(editing_trace(prefill, seed=2029))
    offset = len(start_text)
    shifted = [(pos + offset, char) for pos, char in typing]
    bare = _tree_keystrokes(start_text, shifted, root_hash=False)
    hashed = _tree_keystrokes(start_text, shifted, root_hash=True)
    yjs_bytes = _pycrdt_update_bytes(start_text, shifted)
    writes: list[list[WriteOp]] = []
    async with open_test_node(base / "notes-node") as test_node:
        node = test_node.node
        installed = await node.applications.install(str(NOTES))
        init = json.dumps({"text": start_text})
        context = (await node.contexts.create(installed.application_id, init)).context_id
        raw_write = node.store.raw.write

        def recording_write(ops: Sequence[WriteOp]) -> None:
            # (At the LMDB store: every commit comes here, `AsyncStore.write_now`'s too.)
            if any(op.column is Column.DELTA for op in ops):  # (not the event log's flushes)
                writes.append(list(ops))
            raw_write(ops)

        calls = [
            ("delete", json.dumps({"pos": pos, "length": 1}))
            if char is None
            else ("insert", json.dumps({"pos": pos, "text": char}))
            for pos, char in shifted
        ]
        with patch.object(node.store.raw, "write", recording_write):
            started = time.perf_counter()
            for method, args in calls:
                await node.contexts.execute(context, method, args)
            through_node = len(calls) / (time.perf_counter() - started)
        final = (await node.contexts.execute(context, "text", "{}")).result
    _check(final == _apply(start_text, shifted), "the note diverged from the keystrokes")
    _check(len(writes) == keystrokes, f"expected one commit per keystroke, saw {len(writes)}")
    state = sum(_put_bytes(ops, Column.STATE) for ops in writes) / keystrokes
    everything = sum(_put_bytes(ops, None) for ops in writes) / keystrokes
    what = f"{keystrokes:,} keystrokes on a {offset:,}-char note"
    return [
        Row(
            f"Text keystroke through a context (notes call, durable), {what}",
            through_node,
            "calls/s",
            "same keystrokes, in-memory StateTree txn + root hash",
            hashed,
        ),
        Row(
            f"Text keystroke in memory with the per-call root hash, {what}",
            hashed,
            "ops/s",
            "same keystrokes, in-memory StateTree txn, no hash",
            bare,
        ),
        Row(
            "LMDB bytes written per keystroke through a context: state rows",
            state,
            "B/keystroke",
            "Yjs update per keystroke (pycrdt, same edits)",
            yjs_bytes,
            higher_is_better=False,
        ),
        Row(
            "LMDB bytes written per keystroke through a context: all rows (state, signed "
            "delta, heads, record)",
            everything,
            "B/keystroke",
            "Yjs update per keystroke (pycrdt, same edits)",
            yjs_bytes,
            higher_is_better=False,
        ),
    ]


def _apply(start: str, trace: Sequence[Edit]) -> str:
    chars = list(start)
    for pos, char in trace:
        if char is None:
            del chars[pos]
        else:
            chars.insert(pos, char)
    return "".join(chars)


def _put_bytes(ops: Sequence[WriteOp], column: Column | None) -> int:
    return sum(
        len(op.key) + len(op.value)
        for op in ops
        if isinstance(op, Put) and (column is None or op.column is column)
    )


def _tree_keystrokes(start: str, trace: Sequence[Edit], *, root_hash: bool) -> float:
    """Keystrokes/s on an in-memory tree holding `start`, one transaction each."""
    tree = StateTree()
    clock = HybridClock(MEMBER)
    spec = text()
    with tree.begin(clock, ntp64_from_unix_ns(time.time_ns())) as tx:
        tx.field("body", spec).insert(0, start)
        tx.commit()
    tree.root_hash()
    started = time.perf_counter()
    for pos, char in trace:
        _keystroke(tree, clock, pos, char)
        if root_hash:
            tree.root_hash()
    return len(trace) / (time.perf_counter() - started)


def _pycrdt_update_bytes(start: str, trace: Sequence[Edit]) -> float:
    """Mean bytes of the Yjs update each keystroke produces (what a Yjs app would store or
    send per keystroke)."""
    doc: pycrdt.Doc[pycrdt.Text] = pycrdt.Doc()
    body = pycrdt.Text()
    doc["body"] = body
    body.insert(0, start)
    total = 0
    for pos, char in trace:
        before = doc.get_state()
        if char is None:
            del body[pos]
        else:
            body.insert(pos, char)
        total += len(doc.get_update(before))
    _check(str(body) == _apply(start, trace), "pycrdt diverged from the keystrokes")
    return total / len(trace)


# -- kv_store calls --------------------------------------------------------------------


def _kv_items(n: int, prefix: str) -> list[tuple[str, str]]:
    """`n` distinct keys (13 bytes) and values (100 bytes)."""
    return [(f"{prefix}:{i:08d}", (f"value {prefix} {i:08d} " * 8)[:VALUE_BYTES]) for i in range(n)]


def _set_args(items: Sequence[tuple[str, str]]) -> list[str]:
    return [json.dumps({"key": key, "value": value}) for key, value in items]


def _load_kv_store() -> App:
    return load_app(verify_bundle(load_bundle(KV_STORE), [], installed_locally=True))


def _runtime_calls(app: App, args: Sequence[str], *, root_hash: bool) -> float:
    """Calls/s of the bare runtime on an in-memory tree: no signing, sealing or LMDB."""
    tree = StateTree()
    clock = HybridClock(MEMBER)
    init_state(app, tree, clock, ntp64_from_unix_ns(time.time_ns()), None, **_who())
    started = time.perf_counter()
    for call in args:
        now = ntp64_from_unix_ns(time.time_ns())
        execute(app, tree, clock, now, "set", call, **_who())
        if root_hash:
            tree.root_hash()
    return len(args) / (time.perf_counter() - started)


def _who() -> dict[str, Any]:
    return {"executor": MEMBER, "context_id": CONTEXT}


def _raw_lmdb_replay(path: Path, batches: Sequence[Sequence[WriteOp]]) -> float:
    """Batches/s committing the captured rows to a bare LMDB env, one transaction each."""
    env = lmdb.open(str(path), map_size=LMDB_MAP, max_dbs=len(Column) + 1)
    try:
        dbs = {col: env.open_db(col.value.encode()) for col in Column}
        started = time.perf_counter()
        for ops in batches:
            raw_commit(env, dbs, ops)
        return len(batches) / (time.perf_counter() - started)
    finally:
        env.close()


def raw_commit(env: lmdb.Environment, dbs: dict[Column, Any], ops: Sequence[WriteOp]) -> None:
    """Commit `ops` to a bare LMDB env in one (synced) write transaction."""
    with env.begin(write=True) as txn:
        for op in ops:
            if isinstance(op, Put):
                txn.put(op.key, op.value, db=dbs[op.column])
            elif isinstance(op, Delete):
                txn.delete(op.key, db=dbs[op.column])
            elif isinstance(op, PutRun):
                rows = [(op.prefix + k, v) for k, v in zip(op.keys, op.values, strict=True)]
                txn.cursor(db=dbs[op.column]).putmulti(rows)
            else:
                txn.cursor(db=dbs[op.column]).putmulti(op.rows)


def _raw_lmdb_bytes(path: Path, items: Sequence[tuple[str, str]]) -> float:
    """Used bytes per entry of a bare LMDB env holding the same keys and values."""
    env = lmdb.open(str(path), map_size=LMDB_MAP, max_dbs=2)
    try:
        db = env.open_db(b"kv")
        before = _used_bytes(env)
        for key, value in items:
            with env.begin(write=True, db=db) as txn:
                txn.put(key.encode(), value.encode())
        return (_used_bytes(env) - before) / len(items)
    finally:
        env.close()


def _used_bytes(env: lmdb.Environment) -> int:
    """The datastore's own measure (`LmdbStore.stats`): pages up to the last one used."""
    return (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])


async def _rpc(http: httpx.AsyncClient, context: str, method: str, args: str) -> None:
    response = await http.post(
        "/jsonrpc",
        content=(
            '{"jsonrpc":"2.0","id":1,"method":"execute","params":'
            f'{{"contextId":"{context}","method":"{method}","argsJson":{args}}}}}'
        ),
        headers={"Content-Type": "application/json"},
    )
    body = response.json()
    _check(response.status_code == 200 and "error" not in body, f"JSON-RPC call failed: {body}")


async def _timed(calls: Sequence[str], call: Callable[[str], Awaitable[object]]) -> float:
    started = time.perf_counter()
    for args in calls:
        await call(args)
    return len(calls) / (time.perf_counter() - started)


async def _node_rows(n: int, base: Path) -> list[Row]:
    items = _kv_items(n, "user")
    calls = _set_args(items)
    app = _load_kv_store()
    bare = _runtime_calls(app, calls, root_hash=False)
    hashed = _runtime_calls(app, calls, root_hash=True)
    captured: list[list[WriteOp]] = []
    async with open_test_node(base / "node", api=True) as test_node:
        node = test_node.node
        installed = await node.applications.install(str(KV_STORE))
        local = (await node.contexts.create(installed.application_id)).context_id
        remote = b58((await node.contexts.create(installed.application_id)).context_id)
        await node.contexts.execute(local, "len", "{}")  # warm-up: views write nothing
        # As `trionode start` does once the node is up: without it, one full collection
        # over the startup heap took 94-241 ms inside a 200-call quick run of these rows.
        freeze_startup_heap()
        raw_write = node.store.raw.write

        def recording_write(ops: Sequence[WriteOp]) -> None:
            # (At the LMDB store: every commit comes here, `AsyncStore.write_now`'s too.)
            if any(op.column is Column.DELTA for op in ops):  # (not the event log's flushes)
                captured.append(list(ops))
            raw_write(ops)

        used_before = (await node.store.stats()).used_bytes
        with patch.object(node.store.raw, "write", recording_write):
            in_process = await _timed(calls, lambda args: node.contexts.execute(local, "set", args))
        used_after = (await node.store.stats()).used_bytes
        http_calls = _set_args(_kv_items(n, "http"))
        over_http = await _http_calls(test_node, remote, http_calls)
        per_entry = await _per_entry(test_node, local, n)
        batched = (await node.contexts.create(installed.application_id)).context_id
        concurrent_calls = _set_args(_kv_items(n, "many"))
        concurrent = await _concurrent(
            CONCURRENT_CALLERS,
            concurrent_calls,
            lambda args: node.contexts.execute(batched, "set", args),
        )
        http_many, health_many = await _http_concurrent(
            test_node,
            b58((await node.contexts.create(installed.application_id)).context_id),
            _set_args(_kv_items(n, "http16")),
        )
        profiled = (await node.contexts.create(installed.application_id)).context_id
        print(
            await _profile_calls(
                _set_args(_kv_items(min(n, 500), "prof")),
                lambda args: node.contexts.execute(profiled, "set", args),
            )
        )
    _check(len(captured) == n, f"expected one store write per call, saw {len(captured)}")
    replayed = _raw_lmdb_replay(base / "replay", captured)
    raw_bytes = _raw_lmdb_bytes(base / "raw-kv", items)
    key_value = sum(len(k.encode()) + len(v.encode()) for k, v in items) / n
    state_rows, delta_rows, memory, peak, dict_memory, dict_peak = per_entry
    grows = f"{n:,} calls, keys 0->{n:,}"
    return [
        Row(
            f"kv_store.set in process (ContextManager.execute -> LMDB), {grows}",
            in_process,
            "calls/s",
            "runtime.execute + root_hash, in-memory tree",
            hashed,
        ),
        Row(
            f"kv_store.set in process (ContextManager.execute -> LMDB), {grows}",
            in_process,
            "calls/s",
            "runtime.execute, in-memory tree, no hash",
            bare,
        ),
        Row(
            f"kv_store.set in process (ContextManager.execute -> LMDB), {grows}",
            in_process,
            "calls/s",
            "raw lmdb: same rows, 1 txn/call",
            replayed,
        ),
        Row(
            f"kv_store.set in process, {CONCURRENT_CALLERS} concurrent callers, durable "
            f"(group commit), {n:,} calls",
            concurrent,
            "calls/s",
            "the same calls one at a time (durable)",
            in_process,
        ),
        Row(
            f"kv_store.set over HTTP JSON-RPC, {HTTP_CLIENTS} concurrent keep-alive clients "
            f"(in a process of their own), {n:,} calls",
            http_many,
            "calls/s",
            f"GET /admin-api/health, the same {HTTP_CLIENTS} clients",
            health_many,
        ),
        Row(
            f"kv_store.set over HTTP JSON-RPC (httpx, keep-alive, same process), {grows}",
            over_http,
            "calls/s",
            "ContextManager.execute in process",
            in_process,
        ),
        Row(
            f"LMDB used bytes per kv entry (state + delta log + heads), {n:,} entries",
            (used_after - used_before) / n,
            "B/entry",
            "raw lmdb: same key+value, 1 put/txn",
            raw_bytes,
            higher_is_better=False,
        ),
        Row(
            "stored key+value bytes per kv entry: state rows",
            state_rows,
            "B/entry",
            "the entry's own key+value bytes",
            key_value,
            higher_is_better=False,
        ),
        Row(
            "stored key+value bytes per kv entry: delta log (signed, encrypted)",
            delta_rows,
            "B/entry",
            "the entry's own key+value bytes",
            key_value,
            higher_is_better=False,
        ),
        Row(
            "Python memory per kv entry: StateTree loaded from LMDB + root hash",
            memory,
            "B/entry",
            "dict[str, str] of the same keys/values",
            dict_memory,
            higher_is_better=False,
        ),
        Row(
            "Python memory per kv entry while loading (tracemalloc peak)",
            peak,
            "B/entry",
            "dict[str, str] peak",
            dict_peak,
            higher_is_better=False,
        ),
    ]


async def _http_calls(test_node: TestNode, context: str, calls: Sequence[str]) -> float:
    headers = {"Authorization": f"Bearer {test_node.token}"}
    async with httpx.AsyncClient(base_url=test_node.api_url, headers=headers) as http:
        await _rpc(http, context, "len", "{}")  # opens the connection; views write nothing
        return await _timed(calls, lambda args: _rpc(http, context, "set", args))


CONCURRENT_CALLERS = 64
HTTP_CLIENTS = 16


async def _concurrent(
    workers: int, calls: Sequence[str], call: Callable[[str], Awaitable[object]]
) -> float:
    """Calls per second with `workers` tasks each making its share of `calls` in turn."""
    shares = [calls[i::workers] for i in range(workers)]

    async def worker(share: Sequence[str]) -> None:
        for args in share:
            await call(args)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for share in shares:
            nursery.start_soon(worker, share)
    return len(calls) / (time.perf_counter() - started)


async def _http_concurrent(
    test_node: TestNode, context: str, calls: Sequence[str]
) -> tuple[float, float]:
    """(set calls/s, health requests/s) from HTTP_CLIENTS concurrent keep-alive clients,
    run in a process of their own: in the node's process the clients took most of its CPU
    (httpx's connection pool alone ~700 `is_idle` checks per request), so the rows measured
    httpx more than the node. The node's loop keeps serving while it waits."""
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        rates: tuple[float, float] = await trio.to_thread.run_sync(
            pool.apply, _http_clients, (test_node.api_url, test_node.token, context, list(calls))
        )
    return rates


def _http_clients(url: str, token: str, context: str, calls: list[str]) -> tuple[float, float]:
    """`_http_concurrent`'s clients, in the child process."""
    return trio.run(_http_concurrent_here, url, token, context, calls)


async def _http_concurrent_here(
    url: str, token: str, context: str, calls: Sequence[str]
) -> tuple[float, float]:
    """(set calls/s, health requests/s) from HTTP_CLIENTS concurrent keep-alive clients in
    this process."""
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=HTTP_CLIENTS, max_keepalive_connections=HTTP_CLIENTS)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as http:
        await _rpc(http, context, "len", "{}")

        async def health(_: str) -> None:
            response = await http.get("/admin-api/health")
            _check(response.status_code == 200, f"health failed: {response.status_code}")

        sets = await _concurrent(HTTP_CLIENTS, calls, lambda a: _rpc(http, context, "set", a))
        checks = await _concurrent(HTTP_CLIENTS, calls, health)
    return sets, checks


_PROFILE_PARTS: Final = (
    ("app execute (runtime.execute)", "runtime.py", "execute"),
    ("root hash (StateTree.root_hash)", "tree.py", "root_hash"),
    ("seal delta (encode, encrypt, sign)", "delta.py", "seal_delta"),
    ("  of which Ed25519 delta signature", "", "sign"),
    ("delta id (SHA-256)", "delta.py", "delta_id"),
    ("gossip publish (encode, StrictSign)", "replication.py", "broadcast"),
    ("stage rows + record (encoding)", "local_writes.py", "_stage"),
    ("subscriber event: built at staging", "notices.py", "change_of"),
    ("subscriber event: numbered", "events.py", "reserve"),
    ("subscriber event: log row", "pipeline.py", "_log_events"),
    ("subscriber event: shown (fan-out)", "events.py", "settle"),
    ("event log task (its own writes)", "event_log.py", "flush"),
)


async def _profile_calls(calls: Sequence[str], call: Callable[[str], Awaitable[object]]) -> str:
    """Where one durable call's CPU goes on the event loop thread (cProfile, cumulative
    time per part; the LMDB commit runs in a worker thread and is not counted)."""
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for args in calls:
        await call(args)
    profile.disable()
    wall = (time.perf_counter() - started) / len(calls)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    idle = ("poll", "select", "epoll")  # waiting for the commit thread is not CPU
    busy = sum(
        tt
        for (_, _, func), (_, _, tt, _, _) in stats.items()
        if not any(word in func for word in idle)
    )
    lines = [
        f"one kv_store.set in process, {len(calls)} sequential calls (under cProfile): "
        f"{wall * 1e6:.0f} us wall, {busy / len(calls) * 1e6:.0f} us busy on the event loop"
    ]
    for label, file, name in _PROFILE_PARTS:
        cumulative = sum(
            ct
            for (path, _, func), (_, _, _, ct, _) in stats.items()
            if func == name and path.endswith(file)
        )
        lines.append(f"  {label:<40} {cumulative / len(calls) * 1e6:8.0f} us")
    return "\n".join(lines)


async def _per_entry(
    test_node: TestNode, context_id: bytes, n: int
) -> tuple[float, float, float, float, float, float]:
    """(state row bytes, delta row bytes, memory, memory peak, dict memory, dict peak) per
    entry, for the context holding `n` kv entries."""
    store = test_node.node.store
    state = await store.scan(STATE, prefix=context_id)
    deltas = await store.scan(DELTAS, prefix=context_id)
    state_bytes = sum(len(k) + len(v) for k, v in state) / n
    delta_bytes = sum(len(k) + len(v) for k, v in deltas) / n
    rows = [(key[len(context_id) :], value) for key, value in state]

    def load_tree() -> object:
        tree = StateTree.from_rows(rows)  # (as a node loads them: rows of any version)
        tree.root_hash()
        return tree

    keys = [k.encode() for k, _ in _kv_items(n, "user")]
    values = [v.encode() for _, v in _kv_items(n, "user")]

    def load_dict() -> object:
        return {k.decode(): v.decode() for k, v in zip(keys, values, strict=True)}

    memory, peak = _traced(load_tree)
    dict_memory, dict_peak = _traced(load_dict)
    return state_bytes, delta_bytes, memory / n, peak / n, dict_memory / n, dict_peak / n


def _traced(build: Callable[[], object]) -> tuple[int, int]:
    """Bytes still allocated while `build`'s result is alive, and the peak while building."""
    gc.collect()
    tracemalloc.start()
    try:
        result = build()
        current, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return current, peak


def _check(ok: bool, message: str) -> None:  # noqa: FBT001  # a named assertion
    if not ok:
        raise RuntimeError(message)


async def run(*, quick: bool) -> list[Row]:
    edits = 5_000 if quick else 100_000
    calls = 200 if quick else 3_000
    rows = _text_rows(edits)
    rows += _vector_rows(2_000 if quick else 20_000, long_typing=edits)
    with tempfile.TemporaryDirectory(prefix="trionode-bench-") as tmp:
        rows += await _keystroke_rows(
            100 if quick else 1_000, 2_000 if quick else 20_000, Path(tmp)
        )
        rows += await _node_rows(calls, Path(tmp))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_bench")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args()
    print(render(trio.run(lambda: run(quick=args.quick))))


if __name__ == "__main__":
    main()
