"""A home whose contexts were stored by an older format is refused with one clear error."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from tests.context.folded_homes import folded_context, home_config
from tests.replication.helpers import install
from trionode.context.authority import encode_vv
from trionode.context.replicas import (
    CHECKPOINT_VV_PREFIX,
    FOLDED_SEQ_PREFIX,
    FORMAT_KEY,
    STORAGE_FORMAT,
    read_checkpoint,
)
from trionode.errors import StorageError
from trionode.node import Node, open_node
from trionode.store.lmdb_store import Column, Delete, LmdbStore, Put
from trionode.testing import make_test_config


async def test_contexts_of_an_older_format_are_refused(tmp_path: Path) -> None:
    config, _ = make_test_config(tmp_path, api=False)
    async with open_node(config) as node:
        app = await install(node)
        await node.contexts.create(app)
    # What a format-1 home looks like: contexts, and no format record.
    env = lmdb.open(str(tmp_path / "data"), max_dbs=16)
    with env.begin(write=True) as txn:
        assert txn.delete(FORMAT_KEY, db=env.open_db(Column.META.value.encode(), txn=txn))
    env.close()
    with pytest.raises(Exception) as caught:  # noqa: PT011 - Trio wraps it in a group
        async with open_node(config):
            pass
    errors = _leaves(caught.value)
    assert any(isinstance(e, StorageError) and "storage format 1" in str(e) for e in errors), errors


async def test_a_new_home_records_the_format(tmp_path: Path) -> None:
    config, _ = make_test_config(tmp_path, api=False)
    async with open_node(config) as node:
        app = await install(node)
        await node.contexts.create(app)
    async with open_node(config) as node:
        assert len(node.contexts.known_ids()) == 1


def _folded_state(node: Node, context: bytes) -> tuple[object, ...]:
    replica = node.contexts.replicas._loaded[context]
    authority = replica.authority
    return (
        authority.checkpoint_vv,
        authority.folded,
        authority.max_seq,
        {k: v for k, v in authority.by_author_seq.items() if v & authority.folded},
    )


@pytest.mark.parametrize("passphrase", [None, "pw"])
async def test_a_format_2_home_is_converted_once_and_keeps_what_folding_knew(
    tmp_path: Path, passphrase: str | None
) -> None:
    config = home_config(tmp_path, passphrase)
    async with open_node(config) as node:
        context, count = await folded_context(node, 6, "v" * 50)
        assert count >= 5
        before = _folded_state(node, context)
    # Rewrite the folded rows as format 2 kept them: the vector alone in ckvv/, the author
    # and sequence number in ckseq/.
    raw = LmdbStore.open(tmp_path / "data", passphrase=passphrase)
    prefix = CHECKPOINT_VV_PREFIX + context
    rows = raw.scan(Column.GENERIC, prefix=prefix)
    ops: list[Put | Delete] = [Put(Column.META, FORMAT_KEY, b"2")]
    for key, value in rows:
        vv, folded = read_checkpoint(value)
        assert folded is not None
        author, seq = folded
        ops.append(Put(Column.GENERIC, key, encode_vv(vv)))
        delta_id = key[len(prefix) :]
        seq_row = author + seq.to_bytes(8, "big")
        ops.append(Put(Column.GENERIC, FOLDED_SEQ_PREFIX + context + delta_id, seq_row))
    raw.write(ops)
    raw.close()
    for _ in range(2):
        async with open_node(config) as node:
            await node.contexts.replicas.load(context)
            assert _folded_state(node, context) == before
            assert await node.store.raw_scan(Column.GENERIC, prefix=FOLDED_SEQ_PREFIX) == []
            stored = await node.store.raw_scan(Column.GENERIC, prefix=prefix)
            assert len(stored) == len(rows)
            assert all(read_checkpoint(value)[1] is not None for _, value in stored)
            assert node.store.raw.get(Column.META, FORMAT_KEY) == str(STORAGE_FORMAT).encode()


async def test_a_home_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    config, _ = make_test_config(tmp_path, api=False)
    async with open_node(config):
        pass
    raw = LmdbStore.open(tmp_path / "data")
    raw.put(Column.META, FORMAT_KEY, str(STORAGE_FORMAT + 1).encode())
    raw.close()
    with pytest.raises(Exception) as caught:  # noqa: PT011 - Trio wraps it in a group
        async with open_node(config):
            pass
    errors = _leaves(caught.value)
    assert any(
        isinstance(e, StorageError) and f"storage format {STORAGE_FORMAT + 1}" in str(e)
        for e in errors
    ), errors


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]
