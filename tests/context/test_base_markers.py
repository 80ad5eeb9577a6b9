"""Base rows after folding: a folded entity whose base is its state row's record keeps an
empty marker instead of a second copy (context/replicas.py `BASE_PREFIX`). The base must
still be exactly what was folded, whatever is written afterwards, restarts included."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.context.folded_homes import folded_context, home_config
from tests.replication.helpers import call, install
from trionode.context.folding import fold_all
from trionode.context.records import STATE
from trionode.context.replicas import BASE_PREFIX, _keep_bases
from trionode.crdt import encode_entity
from trionode.crdt.compact import record_of_row
from trionode.node import Node, open_node
from trionode.store.lmdb_store import Column, Put
from trionode.store.store import WriteBatch


def _base(node: Node, context: bytes) -> dict[bytes, bytes]:
    return {e.id: encode_entity(e) for e in node.contexts.replicas.iter_base(context)}


async def _markers(node: Node, context: bytes) -> int:
    rows = await node.store.raw_scan(Column.GENERIC, prefix=BASE_PREFIX + context)
    return sum(1 for _, value in rows if not value)


@pytest.mark.parametrize("passphrase", [None, "pw"])
async def test_a_folded_base_stays_what_was_folded_while_its_state_moves_on(
    tmp_path: Path, passphrase: str | None
) -> None:
    config = home_config(tmp_path, passphrase)
    async with open_node(config) as node:
        # A context created here has no base row: its writes read none (`Replica.markers`).
        fresh = (await node.contexts.create(await install(node))).context_id
        await call(node, fresh, "set", key="k", value="v")
        assert node.contexts.replicas._loaded[fresh].markers is False
        context, _ = await folded_context(node, 8, "v" * 40)
        folded = _base(node, context)
        # Every folded entry's base is its state row's record: markers, not copies (the
        # last set is the head: not folded).
        assert await _markers(node, context) >= 7
        replica = node.contexts.replicas._loaded[context]
        assert all(replica.tree.get(i) is not None for i in folded)
        # Writes after the fold change the state rows; the base is what was folded.
        for i in range(4):
            await call(node, context, "set", key=f"k{i}", value="changed")
        await call(node, context, "set", key="new", value="x")
        assert _base(node, context) == folded
        left = await _markers(node, context)
        assert left <= 7 - 4
    async with open_node(config) as node:
        await node.contexts.replicas.load(context)
        assert _base(node, context) == folded
        # Loaded with markers: a write after the restart keeps what a marker stood for.
        await call(node, context, "set", key="k6", value="after the restart")
        assert _base(node, context) == folded
        left -= 1
        # Loaded with no base row: nothing to look for.
        assert (await node.contexts.replicas.load(fresh)).markers is False
        # Folding the new writes too: the base is the state again, marked.
        await fold_all(node.contexts.replicas, retention=0.0, max_batch=256)
        assert await _markers(node, context) > left
        # The rebuild's starting point: what the marked rows stand for now.
        replica = node.contexts.replicas._loaded[context]
        marked = [
            key[len(BASE_PREFIX) + 32 :]
            for key, value in await node.store.raw_scan(
                Column.GENERIC, prefix=BASE_PREFIX + context
            )
            if not value
        ]
        base = _base(node, context)
        for entity_id in marked:
            record = replica.tree.get(entity_id)
            assert record is not None
            assert base[entity_id] == encode_entity(record)


async def test_a_base_row_the_batch_already_puts_is_not_overwritten(tmp_path: Path) -> None:
    # A tree comparison stages the joined base first, then the state rows: the marker's
    # stand-in (the state row before the batch) must not replace that join.
    async with open_node(home_config(tmp_path, None)) as node:
        context, _ = await folded_context(node, 3, "v")
        rows = await node.store.raw_scan(Column.GENERIC, prefix=BASE_PREFIX + context)
        marked = [key[len(BASE_PREFIX) + 32 :] for key, value in rows if not value]
        assert len(marked) >= 2
        batch = WriteBatch()
        batch.ops.append(Put(Column.GENERIC, BASE_PREFIX + context + marked[0], b"joined"))
        _keep_bases(node.contexts.replicas._loaded[context], node.store, batch, marked[:2])
        puts = [op for op in batch.ops if isinstance(op, Put)]
        assert [op.value for op in puts if op.key.endswith(marked[0])] == [b"joined"]
        stand_in = [op.value for op in puts if op.key.endswith(marked[1])]
        assert len(stand_in) == 1
        state = node.store.get_sync(STATE, context + marked[1])
        assert state is not None
        assert stand_in == [record_of_row(state)]
