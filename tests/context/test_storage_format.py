"""A home whose contexts were stored by an older format is refused with one clear error."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from tests.replication.helpers import install
from trionode.context.replicas import FORMAT_KEY
from trionode.errors import StorageError
from trionode.node import open_node
from trionode.store.lmdb_store import Column
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


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]
