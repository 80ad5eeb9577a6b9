"""A node home (plain or encrypted) whose context has its deltas folded: shared setup of
the storage-format and base-marker tests."""

from __future__ import annotations

from pathlib import Path

from msgspec.structs import replace

from tests.replication.helpers import call, install
from trionode.config import FileConfig, NodeConfig
from trionode.context.folding import fold_all
from trionode.node import Node
from trionode.testing import make_test_config


def _encrypted(file: FileConfig) -> FileConfig:
    return replace(file, store=replace(file.store, encrypted=True))


def home_config(tmp_path: Path, passphrase: str | None) -> NodeConfig:
    """A test home, encrypted at rest when a passphrase is given."""
    config, _ = make_test_config(
        tmp_path, api=False, passphrase=passphrase, configure=_encrypted if passphrase else None
    )
    return config


async def folded_context(node: Node, sets: int, value: str) -> tuple[bytes, int]:
    """A new kv_store context with `sets` keys set to `value`, then every final delta
    folded at once: (its id, how many folded)."""
    app = await install(node)
    context = (await node.contexts.create(app)).context_id
    for i in range(sets):
        await call(node, context, "set", key=f"k{i}", value=value)
    return context, await fold_all(node.contexts.replicas, retention=0.0, max_batch=256)
