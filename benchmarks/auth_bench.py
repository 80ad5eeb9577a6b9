"""Authorization by causal history: what membership operations cost on the receive path.

Rows:
- a receiver applies N deltas whose history holds M membership changes (grants and
  removals, each removal rotating the key), beside the same N writes with no changes;
- a late removal arrives after N deltas, M of them by the removed member and concurrent
  with it: the receiver filters them and rebuilds its state, beside applying one ordinary
  membership operation at the same point;
- the same late removal once the receiver has folded the N-M final deltas (finality,
  context/folding.py), beside the same rebuild without folding;
- delta-log bytes per context (delta rows and checkpoint vectors) after N writes once
  folded, beside the same writes kept whole;
- a receiver applies N deltas with the undo log bounded (`auth.max_nonfinal_bytes`),
  beside the same deltas unbounded;
- an ack round (`serve_acks`) over K loaded contexts none of which moved, beside a round
  where every one moved (each resolved and acked).

Histories are written by node A and replayed on node B through `ContextManager.receive`,
in the order A wrote them (in process, no network).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from benchmarks.harness import Row
from trionode.config import FileConfig
from trionode.context.acks import ack_round
from trionode.context.folding import fold_all
from trionode.context.replicas import CHECKPOINT_VV_PREFIX
from trionode.crdt import ntp64_from_unix
from trionode.dag.delta import DeltaBody, decode_delta, open_delta, seal_delta, verify_delta
from trionode.node import Node
from trionode.store.lmdb_store import Column
from trionode.testing import open_test_node

KV_STORE = Path(__file__).resolve().parents[1] / "apps" / "kv_store"


async def _history(a: Node, context: bytes, n: int, changes: int) -> list[bytes]:
    """A writes `n` sets and `changes` membership operations spread among them."""
    wires: list[bytes] = []
    grant_every = n // changes if changes else 0
    admitted: list[bytes] = []
    for i in range(n):
        result = await a.contexts.execute(
            context, "set", json.dumps({"key": f"k{i % 500}", "value": f"v{i}"})
        )
        assert result.delta_id is not None
        wire = await a.contexts.read_delta(context, result.delta_id)
        assert wire is not None
        wires.append(wire)
        if grant_every and i % grant_every == grant_every - 1 and len(admitted) * 2 < changes:
            stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
            admitted.append(stranger)
            wires.append(
                (await a.contexts.change_members(context, [(stranger, "member")])).encode()
            )
        elif grant_every and i % grant_every == grant_every - 1 and admitted:
            gone = admitted.pop(0)
            wires.append((await a.contexts.remove_member(context, gone)).encode())
    return wires


async def _replay(b: Node, context: bytes, wires: Sequence[bytes]) -> float:
    started = time.perf_counter()
    for wire in wires:
        result = await b.contexts.receive(context, wire)
        assert not result.rejected, result.rejected
    return time.perf_counter() - started


async def _setup(a: Node, b: Node) -> tuple[bytes, list[bytes]]:
    """A creates a context and admits B's member key (as an op B receives first)."""
    app = (await a.applications.install(str(KV_STORE))).application_id
    await b.applications.install(str(KV_STORE))
    record = await a.contexts.create(app)
    context = record.context_id
    b_key = Ed25519PrivateKey.generate()
    b_member = b_key.public_key().public_bytes_raw()
    grant = await a.contexts.change_members(context, [(b_member, "member")])
    await b.contexts.adopt(
        context_id=context,
        application_id=app,
        member_key=b_key,
        keys=await a.contexts.keys(context),
        key_id=record.key_id,
    )
    first = [
        wire
        for wire in [await a.contexts.read_delta(context, h) for h in record.heads]
        if wire is not None
    ]
    return context, [*first, grant.encode()]


async def _apply_rows(n: int, changes: int, base: Path) -> list[Row]:
    times: dict[int, float] = {}
    for m in (changes, 0):
        async with (
            open_test_node(base / f"a{m}", api=False) as ta,
            open_test_node(base / f"b{m}", api=False) as tb,
        ):
            a, b = ta.node, tb.node
            context, start = await _setup(a, b)
            wires = start + await _history(a, context, n, m)
            times[m] = await _replay(b, context, wires)
            entries = [
                (await node.contexts.execute(context, "entries", "{}")).result for node in (a, b)
            ]
            assert entries[0] == entries[1], "the receiver did not reach the writer's state"
    return [
        Row(
            f"receiver applies {n:,} deltas with {changes} membership changes in the history",
            n / times[changes],
            "deltas/s",
            "the same writes with no membership changes",
            n / times[0],
        )
    ]


def _log_bytes(node: Node, context: bytes) -> int:
    store = node.contexts.replicas.store
    rows = store.scan_sync(Column.DELTA, context)
    rows += store.scan_sync(Column.GENERIC, CHECKPOINT_VV_PREFIX + context)
    return sum(len(k) + len(v) for k, v in rows)


async def _fold(node: Node) -> int:
    return await fold_all(node.contexts.replicas, retention=0.0, max_batch=256)


async def _late_removal(n: int, filtered: int, base: Path, *, fold: bool) -> tuple[float, float]:
    """(ms to receive the late removal and rebuild, ms for an ordinary op after it)."""
    async with (
        open_test_node(base / f"late-a{fold}", api=False) as ta,
        open_test_node(base / f"late-b{fold}", api=False) as tb,
    ):
        a, b = ta.node, tb.node
        context, start = await _setup(a, b)
        victim = Ed25519PrivateKey.generate()
        victim_member = victim.public_key().public_bytes_raw()
        grant = await a.contexts.change_members(context, [(victim_member, "member")])
        wires = [*start, grant.encode()]
        # The victim's writes, on the heads it had, never seen by A: concurrent with the
        # removal that A writes later. Bodies are A's own `set` records.
        donor = await a.contexts.create((await a.contexts.get(context)).application_id)
        _, parents, _ = await a.contexts.state(context)
        loaded = await a.contexts.replica(context)  # a forger's view
        vv, _ = loaded.authority.merged_vv(parents)
        record = await a.contexts.get(context)
        keys = await a.contexts.keys(context)
        victim_wires: list[bytes] = []
        tag = victim_member[:8]
        for i in range(filtered):
            result = await a.contexts.execute(
                donor.context_id, "set", json.dumps({"key": f"victim{i}", "value": "x"})
            )
            assert result.delta_id is not None
            donor_wire = await a.contexts.read_delta(donor.context_id, result.delta_id)
            assert donor_wire is not None
            donor_delta = decode_delta(donor_wire)
            donor_keys = await a.contexts.keys(donor.context_id)
            donor_header = verify_delta(donor_delta, context_id=donor.context_id)
            body: DeltaBody = open_delta(donor_delta, donor_header, donor_keys[donor_header.key_id])
            seq = vv.get(tag, 0) + 1
            delta = seal_delta(
                context_id=context,
                parents=parents,
                author=victim,
                hlc=ntp64_from_unix(time.time()),
                key_id=record.key_id,
                context_key=keys[record.key_id],
                body=body,
                seq=seq,
                vv=vv,
            )
            vv = dict(verify_delta(delta, context_id=context).vv)
            parents = [delta.id]
            victim_wires.append(delta.encode())
        wires += await _history(a, context, n - filtered, 0)
        wires += victim_wires
        await _replay(b, context, wires)
        if fold:
            # A is the only admin and wrote every delta but the victim's: those are final.
            assert await _fold(b) >= n - filtered - 1, "the final deltas did not fold"
        removal = await a.contexts.remove_member(context, victim_member)
        started = time.perf_counter()
        await b.contexts.receive(context, removal.encode())
        rebuild = time.perf_counter() - started
        entries = (await b.contexts.execute(context, "entries", "{}")).result
        assert not any(k.startswith("victim") for k in entries), "filtered writes remain"
        stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        plain = await a.contexts.change_members(context, [(stranger, "read-only")])
        started = time.perf_counter()
        await b.contexts.receive(context, plain.encode())
        ordinary = time.perf_counter() - started
    return rebuild * 1000, ordinary * 1000


async def _late_removal_rows(n: int, filtered: int, base: Path) -> list[Row]:
    rebuild, ordinary = await _late_removal(n, filtered, base, fold=False)
    folded, _ = await _late_removal(n, filtered, base, fold=True)
    return [
        Row(
            f"late removal filters {filtered} of {n:,} deltas: receive it and rebuild",
            rebuild,
            "ms",
            "receiving an ordinary membership operation at that point",
            ordinary,
            higher_is_better=False,
        ),
        Row(
            f"the same late removal with the {n - filtered:,} final deltas folded",
            folded,
            "ms",
            "the same rebuild without folding",
            rebuild,
            higher_is_better=False,
        ),
    ]


def _read_only(config: FileConfig) -> FileConfig:
    """The receiver runs no event handlers: its log holds only what it received."""
    return replace(config, node=replace(config.node, mode="read-only"))


async def _log_rows(n: int, base: Path) -> list[Row]:
    async with (
        open_test_node(base / "log-a", api=False) as ta,
        open_test_node(base / "log-b", api=False, configure=_read_only) as tb,
    ):
        a, b = ta.node, tb.node
        context, start = await _setup(a, b)
        await _replay(b, context, start + await _history(a, context, n, 0))
        whole = _log_bytes(b, context)
        assert await _fold(b) >= n - 1, "the final deltas did not fold"
        folded = _log_bytes(b, context)
    return [
        Row(
            f"delta-log bytes per context after {n:,} writes, final deltas folded",
            folded,
            "bytes",
            "the same writes, every body kept",
            whole,
            higher_is_better=False,
        )
    ]


async def _bound_rows(n: int, base: Path) -> list[Row]:
    times: dict[bool, float] = {}
    for bounded in (True, False):
        async with (
            open_test_node(base / f"a{bounded}", api=False) as ta,
            open_test_node(base / f"b{bounded}", api=False) as tb,
        ):
            a, b = ta.node, tb.node
            if not bounded:
                b.contexts.processor.max_nonfinal_bytes = None
            context, start = await _setup(a, b)
            times[bounded] = await _replay(b, context, start + await _history(a, context, n, 0))
    return [
        Row(
            f"receiver applies {n:,} deltas, undo log bounded (auth.max_nonfinal_bytes)",
            n / times[True],
            "deltas/s",
            "the same deltas, no bound",
            n / times[False],
        )
    ]


async def _ack_round_rows(k: int, base: Path) -> list[Row]:
    async with open_test_node(base / "acks", api=False) as ta:
        node = ta.node
        app = (await node.applications.install(str(KV_STORE))).application_id
        contexts = [(await node.contexts.create(app)).context_id for _ in range(k)]

        def publish(context_id: bytes, wire: bytes) -> None:
            pass

        async def moved_round() -> float:
            for context in contexts:
                await node.contexts.execute(context, "set", json.dumps({"key": "k", "value": "v"}))
            started = time.perf_counter()
            assert await ack_round(node.acks, node.contexts.replicas, publish) == k
            return time.perf_counter() - started

        moved = min([await moved_round() for _ in range(3)])
        idle = []
        for _ in range(3):
            started = time.perf_counter()
            assert await ack_round(node.acks, node.contexts.replicas, publish) == 0
            idle.append(time.perf_counter() - started)
    return [
        Row(
            f"ack round over {k} loaded contexts, none moved",
            min(idle) * 1000,
            "ms",
            "a round where every context moved",
            moved * 1000,
            higher_is_better=False,
        )
    ]


async def run(*, quick: bool) -> list[Row]:
    n, changes, filtered = (1_000, 10, 10) if quick else (10_000, 100, 100)
    with tempfile.TemporaryDirectory(prefix="trionode-auth-bench-") as tmp:
        base = Path(tmp)
        rows = await _apply_rows(n, changes, base / "apply")
        rows += await _late_removal_rows(n, filtered, base / "late")
        rows += await _log_rows(n, base / "log")
        rows += await _bound_rows(n, base / "bound")
        rows += await _ack_round_rows(50 if quick else 200, base / "ack-rounds")
    return rows
