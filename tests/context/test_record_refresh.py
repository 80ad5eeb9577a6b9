"""A change made only of data deltas refreshes its context record's root and heads, not its
members (issue #16: rebuilding the member list per delta was O(members) on every node, 18 %
of a 100-member cluster's CPU while it converged); a membership change still refreshes them."""

from __future__ import annotations

from pathlib import Path

from tests.replication.helpers import install
from trionode.testing import open_test_node


async def test_data_writes_keep_the_member_list_and_refresh_root_and_heads(
    tmp_path: Path,
) -> None:
    async with open_test_node(tmp_path / "a", api=False) as test_node:
        node = test_node.node
        context = (await node.contexts.create(await install(node))).context_id
        replica = await node.contexts.replica(context)
        members, root = replica.record.members, replica.record.root_hash
        assert [m.role for m in members] == ["admin"]
        for i in range(3):
            await node.contexts.execute(context, "set", f'{{"key": "k{i}", "value": "v"}}')
        replica = await node.contexts.replica(context)
        assert replica.record.members is members  # not rebuilt
        assert replica.record.root_hash == replica.tree.root_hash() != root
        assert replica.record.heads == sorted(replica.dag.heads)
        assert len(replica.record.heads) == 1
