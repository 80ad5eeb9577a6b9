"""A home whose contexts were stored by an older format is refused with one clear error."""

from __future__ import annotations

from pathlib import Path

import lmdb
import msgspec
import pytest

from tests.context.folded_homes import folded_context, home_config
from tests.replication.helpers import install
from trionode.context.authority import encode_vv
from trionode.context.replicas import (
    CHECKPOINT_VV_PREFIX,
    FOLDED_MARK,
    FOLDED_OWN_MARK,
    FOLDED_SEQ_PREFIX,
    FORMAT_KEY,
    STORAGE_FORMAT,
    folded_row,
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


def test_folded_rows_say_the_authors_entry_once_and_read_back_exactly() -> None:
    own, other = b"a" * 8, b"b" * 8
    for vv in ({own: 7}, {own: 7, other: 3}):
        row = folded_row(own, 7, vv)
        assert row.startswith(FOLDED_OWN_MARK)
        assert row.count(own) == 1
        assert read_checkpoint(row) == (vv, (own, 7))
    assert len(folded_row(own, 7, {own: 7})) == 14
    odd = {own: 6, other: 3}  # an entry for the author that is not its seq: kept whole
    assert read_checkpoint(folded_row(own, 7, odd)) == (odd, (own, 7))
    assert folded_row(own, 7, odd).startswith(FOLDED_MARK)
    twice = FOLDED_OWN_MARK + msgspec.msgpack.encode([own, 7, [[own, 7]]])
    for bad in (twice, FOLDED_OWN_MARK, FOLDED_OWN_MARK + b"\x93\x01", FOLDED_OWN_MARK + b"\xc1"):
        with pytest.raises(StorageError):
            read_checkpoint(bad)
