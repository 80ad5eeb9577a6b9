"""Contexts whose state rows are their base (context/replicas.py `BASE_PREFIX`, storage
format 4): a base row only where the base differs from the state row. The base must read
exactly as the per-entry rows said it (format 3: a marker or a copy each), whatever is
written, folded or rebuilt afterwards, restarts included; and a format-3 home still reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.context.folded_homes import folded_context, home_config
from tests.replication.helpers import call
from trionode.context.final_state import (
    NO_BASE,
    STATE_BASE_PREFIX,
    final_state,
)
from trionode.context.folding import _records, fold_all
from trionode.context.records import DELTAS
from trionode.context.replicas import BASE_PREFIX, FORMAT_KEY, STORAGE_FORMAT
from trionode.crdt import StateTree, encode_entity
from trionode.node import Node, open_node
from trionode.store.lmdb_store import Column, Delete, LmdbStore, Put, WriteOp


def _base(node: Node, context: bytes) -> dict[bytes, bytes]:
    return {e.id: encode_entity(e) for e in node.contexts.replicas.iter_base(context)}


async def _root_of_base(node: Node, context: bytes) -> bytes:
    """The root of the final state as a build reads it from the rows (not the kept one)."""
    replicas = node.contexts.replicas
    replica = await replicas.load(context)
    replica.final.state = None
    return (await final_state(replicas, replica)).tree.root_hash()


async def _check_rebuilds(node: Node, context: bytes) -> None:
    """The state is the base joined with the records of every delta whose body is held
    (folding.py's invariant: what an undo rebuilds the state from)."""
    replica = await node.contexts.replicas.load(context)
    tree = StateTree(node.contexts.replicas.iter_base(context))
    for _, wire in await node.store.scan(DELTAS, prefix=context):
        if wire:
            tree.apply(_records(replica, wire))
    assert tree.root_hash() == replica.tree.root_hash()


def _to_state_base(raw: LmdbStore, context: bytes) -> list[WriteOp]:
    """Rewrite a format-3 context's base rows as format 4 keeps them when its state rows are
    its base: markers dropped, "none" for a state row without a base row."""
    prefix = BASE_PREFIX + context
    bases = {k[len(prefix) :]: v for k, v in raw.scan(Column.GENERIC, prefix=prefix)}
    ops: list[WriteOp] = [Put(Column.GENERIC, STATE_BASE_PREFIX + context, b"1")]
    for key, _ in raw.scan(Column.STATE, prefix=context):
        entity_id = key[len(context) :]
        if len(entity_id) == 32 and entity_id not in bases:
            ops.append(Put(Column.GENERIC, prefix + entity_id, NO_BASE))
    ops += [Delete(Column.GENERIC, prefix + i) for i, v in bases.items() if not v]
    return ops


@pytest.mark.parametrize("passphrase", [None, "pw"])
async def test_a_base_of_state_rows_reads_as_the_rows_said_it_while_the_state_moves_on(
    tmp_path: Path, passphrase: str | None
) -> None:
    config = home_config(tmp_path, passphrase)
    async with open_node(config) as node:
        context, _ = await folded_context(node, 8, "v" * 40)
        folded = _base(node, context)
        root = await _root_of_base(node, context)
        # (The head is not folded: its entity has no base row.)
        assert len(folded) < len(node.contexts.replicas._loaded[context].tree)
    raw = LmdbStore.open(tmp_path / "data", passphrase=passphrase)
    raw.write(_to_state_base(raw, context))
    # Fewer rows: the markers are gone, one "none" came.
    assert sum(1 for _, v in raw.scan(Column.GENERIC, prefix=BASE_PREFIX + context) if v) < 4
    raw.close()
    async with open_node(config) as node:
        replica = await node.contexts.replicas.load(context)
        assert replica.state_base
        assert replica.markers
        assert _base(node, context) == folded
        assert await _root_of_base(node, context) == root
        # Changed entities keep what the state row stood for, a new one has none.
        for i in range(4):
            await call(node, context, "set", key=f"k{i}", value="changed")
        await call(node, context, "set", key="new", value="x")
        assert _base(node, context) == folded
        assert await _root_of_base(node, context) == root
        await _check_rebuilds(node, context)
    async with open_node(config) as node:
        await node.contexts.replicas.load(context)
        assert _base(node, context) == folded
        await call(node, context, "set", key="k6", value="after the restart")
        assert _base(node, context) == folded
        # Folding the new writes too: the base is the state again.
        await fold_all(node.contexts.replicas, retention=0.0, max_batch=256)
        assert set(folded) < set(_base(node, context))
        await _check_rebuilds(node, context)


@pytest.mark.parametrize("passphrase", [None, "pw"])
async def test_a_format_3_home_with_a_base_row_per_entry_still_reads(
    tmp_path: Path, passphrase: str | None
) -> None:
    config = home_config(tmp_path, passphrase)
    async with open_node(config) as node:
        context, _ = await folded_context(node, 6, "v" * 30)
        folded = _base(node, context)
        root = await _root_of_base(node, context)
    # What format 3 wrote: a row per folded entry (markers here), no flag, format "3".
    raw = LmdbStore.open(tmp_path / "data", passphrase=passphrase)
    rows = raw.scan(Column.GENERIC, prefix=BASE_PREFIX + context)
    assert sum(1 for _, v in rows if not v) >= 5
    assert raw.get(Column.GENERIC, STATE_BASE_PREFIX + context) is None
    raw.put(Column.META, FORMAT_KEY, b"3")
    raw.close()
    async with open_node(config) as node:
        assert node.store.raw.get(Column.META, FORMAT_KEY) == str(STORAGE_FORMAT).encode()
        replica = await node.contexts.replicas.load(context)
        assert not replica.state_base
        assert _base(node, context) == folded
        assert await _root_of_base(node, context) == root
        await call(node, context, "set", key="k0", value="changed")
        assert _base(node, context) == folded
