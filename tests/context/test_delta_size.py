"""A delta this node writes must be able to reach the other members later: one larger than
`replication.max_delta_bytes` (below a sync answer frame) is refused when it is sealed, and
the call writes nothing (`context/local_writes.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import trio

from tests.replication.helpers import install
from trionode.client import ApiError
from trionode.config import FileConfig
from trionode.context.errors import DeltaTooLarge
from trionode.context.notices import b58
from trionode.testing import open_test_node

LIMIT = 64 * 1024
BIG = "\n" * 32_000


def small_deltas(config: FileConfig) -> FileConfig:
    replication = msgspec.structs.replace(config.replication, max_delta_bytes=LIMIT)
    return msgspec.structs.replace(config, replication=replication)


async def test_a_call_whose_delta_is_too_large_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "a", configure=small_deltas) as test_node:
            node = test_node.node
            context = (await node.contexts.create(await install(node))).context_id
            await node.contexts.execute(context, "set", json.dumps({"key": "k", "value": "v"}))
            before = await node.contexts.state(context)
            # The entry carries 32,000 newlines, its event 64,000 bytes of them escaped
            # (so it cannot refer to the entry's bytes): 96 KB, above LIMIT.
            big = json.dumps({"key": "big", "value": BIG})
            with pytest.raises(DeltaTooLarge, match=r"replication\.max_delta_bytes"):
                await node.contexts.execute(context, "set", big)
            # Nothing of it was written or kept in memory: same root, heads, no entry.
            assert await node.contexts.state(context) == before
            shown = await node.contexts.execute(context, "get", json.dumps({"key": "big"}))
            assert shown.result is None
            # The context stays writable, and the same refusal reaches a JSON-RPC client.
            await node.contexts.execute(context, "set", json.dumps({"key": "k2", "value": "v"}))
            assert (await node.contexts.state(context))[0] != before[0]
            async with test_node.client() as client:
                with pytest.raises(ApiError) as refused:
                    await client.call(b58(context), "set", {"key": "big", "value": BIG})
            assert refused.value.status == -32005
            assert "split the change over several calls" in str(refused.value)
