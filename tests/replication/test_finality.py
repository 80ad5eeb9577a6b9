"""Finality on an in-process cluster: a delta is final once every ever-admin has
acknowledged it (here by writing on top of it), the same on every node; the lag gauges
and the authority agree (trionode/auth/finality.py, local-first-auth.md §5.4)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.replication.cluster_helpers import LIMIT, metric, share, wait_converged, write
from trionode.node import Node
from trionode.testing import open_cluster


async def is_final(node: Node, context: bytes, delta_id: bytes) -> bool:
    return (await node.contexts.replica(context)).authority.is_final(delta_id)


async def test_a_delta_is_final_once_every_admin_has_it_in_its_past(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = cluster
            # Notes runs no event handlers: nobody writes but the test.
            context = await share(cluster, [0, 1, 2], "notes", roles={1: "admin"})
            by_c = await write(c, context, "set_title", title="c")
            await wait_converged(cluster, list(cluster), context)
            for node in cluster:
                # Neither admin has acknowledged it: its verdict may still change.
                assert not await is_final(node, context, by_c)
                assert metric(node, "trionode_finality_lag_deltas") >= 1
            by_a = await write(a, context, "set_title", title="a")
            await wait_converged(cluster, list(cluster), context)
            for node in cluster:
                assert not await is_final(node, context, by_c), "B has not seen it yet"
            await write(b, context, "set_title", title="b")
            await wait_converged(cluster, list(cluster), context)
            for node in cluster:
                assert await is_final(node, context, by_c)
                assert await is_final(node, context, by_a)
            finals = [
                (await node.contexts.replica(context)).authority.finality().final
                for node in cluster
            ]
            assert finals[0] == finals[1] == finals[2]
