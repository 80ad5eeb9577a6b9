"""Many members joining one after another over a sparse network: every membership operation
is accepted on every node (none refused for an auth parent this node did not hold yet), and
everyone converges."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.replication.cluster_helpers import share, wait_converged, write
from trionode.node import Node
from trionode.testing import open_cluster

pytestmark = pytest.mark.trio


def _refused(node: Node) -> float:
    """Deltas this node rejected outright, whatever the reason."""
    return sum(
        sample.value
        for family in node.metrics.registry.collect()
        if family.name == "trionode_deltas"
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("outcome", "").startswith("rejected")
    )


def _sparse(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    edges = {(i, j) for j in range(1, n) for i in rng.sample(range(j), min(2, j))}
    return sorted(edges)


@pytest.mark.parametrize("seed", [1])
async def test_sequential_joins_over_a_sparse_network_refuse_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    n = 8
    async with open_cluster(n, tmp_path, connect=_sparse(n, seed)) as cluster:
        context = await share(cluster, list(range(n)))
        for i, node in enumerate(cluster.nodes):
            await write(node, context, "set", key=f"k{i}", value=str(i))
        await wait_converged(cluster, cluster.nodes, context)
        refused = {node.peer_id[-6:]: _refused(node) for node in cluster.nodes}
        assert not any(refused.values()), refused
        roles = [await node.contexts.roles(context) for node in cluster.nodes]
        assert all(r == roles[0] for r in roles)
        assert len(roles[0]) == n
