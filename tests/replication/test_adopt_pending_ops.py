"""A membership operation that reached a node by gossip while its parents did not waits
there as pending; when a tree comparison then brings the peer's whole membership history,
that op is taken from the export like the others (the ops after it build on it), counts as
applied, and the node ends with the peer's roles — before the fix it was skipped, the ops
after it were refused for an unknown auth parent, and the roles diverged for good."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.replication.cluster_helpers import gossip
from tests.replication.test_sync_protocols import LIMIT, create, join, put, quiet, sessions
from trionode.testing import open_cluster


async def test_a_pending_op_is_taken_from_a_tree_comparison_export(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path, configure=quiet) as cluster:
            a, b, c, d = cluster
            context = await create(a)
            for joiner in (1, 2, 3):
                await join(cluster, 0, joiner, context)
            await put(a, context, "shared")
            await cluster.settle()
            c_id, _ = await c.contexts.member_key(context)
            d_id, _ = await d.contexts.member_key(context)

            await cluster.partition([1, 3])  # B and D on one side, A and C on the other
            await a.contexts.change_members(context, [(c_id, "admin")])
            for i in range(6):  # deeper than two delta-sync rounds reach back
                await put(a, context, f"between{i}")
            second = await a.contexts.change_members(context, [(d_id, "admin")])
            await a.contexts.change_members(context, [(c_id, "member")])
            for i in range(10):
                await put(a, context, f"a{i}")
            await trio.sleep(10)  # past gossip's message cache
            # Only the second op reaches B (relayed by D): it waits for its parent there.
            gossip(d, context, second.encode())
            await cluster.settle()
            assert (await b.contexts.state(context))[2] >= 1

            await cluster.heal()
            b.sync.max_delta_rounds = 2
            b.replicator.max_ancestors = 0  # (one generation per round: short of the gap)
            await b.sync.sync_now(context, cluster.peer_ids[0])
            await cluster.settle()
            assert sessions(b, "tree") == 1
            assert await b.contexts.roles(context) == await a.contexts.roles(context)
            assert (await b.contexts.roles(context))[d_id] == "admin"
            assert (await b.contexts.roles(context))[c_id] == "member"
            assert await b.contexts.applied(context, [second.id]) == {second.id}
