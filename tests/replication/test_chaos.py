"""Chaos: 5 nodes, 2 contexts, random writes everywhere over a lossy, reordering, partitioned
network; after healing, every node converges. Seeded and reproducible (SCENARIOS 12-14).

Runs on `open_cluster` under `autojump_clock`: the gossip faults drop 10 % of messages and
duplicate and delay others, partitions come and go; sync heartbeats and sessions must repair
everything once the network heals. A few seeds run by default; `-m slow` runs many more.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import trio
import trio.testing
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.context.manager import ContextError
from trionode.net.memory import GossipFaults
from trionode.node import Node
from trionode.sdk.errors import AppError
from trionode.testing import Cluster, open_cluster

APPS = Path(__file__).resolve().parents[2] / "apps"


def _sync_fast(file: FileConfig) -> FileConfig:
    return replace(
        file, sync=replace(file.sync, heartbeat=2.0, interval=4.0, min_interval=2.0, timeout=20.0)
    )


async def _share(nodes: list[Node], app: str) -> bytes:
    app_id = b""
    for node in nodes:
        app_id = (await node.applications.install(str(APPS / app))).application_id
    context = (await nodes[0].contexts.create(app_id)).context_id
    for node in nodes[1:]:
        await node.joins.join(await nodes[0].joins.invite(context))
    return context


async def _states(nodes: list[Node], context: bytes) -> list[tuple[bytes, list[bytes], int]]:
    return [await n.contexts.state(context) for n in nodes]


async def _wait_converged(cluster: Cluster, contexts: list[bytes], limit: float) -> None:
    with trio.fail_after(limit):
        while True:
            await cluster.settle()
            states = [await _states(cluster.nodes, c) for c in contexts]
            if all(all(s == st[0] for s in st) and st[0][2] == 0 for st in states):
                return
            await trio.sleep(1)  # virtual: lets heartbeats and sync ticks run


async def run_chaos(tmp_path: Path, seed: int, *, rounds: int) -> None:
    rng = random.Random(seed)
    faults = GossipFaults(drop=0.1, duplicate=0.1, max_delay=1.0, seed=seed)
    async with open_cluster(5, tmp_path, faults=faults, configure=_sync_fast) as cluster:
        nodes = cluster.nodes
        # Joining needs the network whole; the chaos starts afterwards.
        faults.drop = faults.duplicate = 0.0
        kv = await _share(nodes, "kv_store")
        chat = await _share(nodes, "chat")
        # Membership changes in kv: two admins demote and promote nodes 2-4, also from the
        # two sides of a partition (concurrent changes), while everyone writes.
        member = [(await n.contexts.member_key(kv))[0] for n in nodes]
        await nodes[0].contexts.change_members(kv, [(member[1], "admin")])
        await _wait_converged(cluster, [kv], limit=60)
        faults.drop, faults.duplicate = 0.1, 0.1
        posts = 0
        for round_ in range(rounds):
            if rng.random() < 0.3:
                side = rng.sample(range(5), rng.randint(1, 2))
                await cluster.partition(side, [i for i in range(5) if i not in side])
            if rng.random() < 0.5:
                admin, target = rng.choice([0, 1]), rng.choice([2, 3, 4])
                role = rng.choice(["member", "read-only"])
                await nodes[admin].contexts.change_members(kv, [(member[target], role)])
            for _ in range(rng.randint(3, 8)):
                writer = rng.randrange(5)
                if rng.random() < 0.6:
                    key = f"k{rng.randrange(20)}"
                    value = f"{seed}-{round_}-{writer}"
                    with contextlib.suppress(ContextError, AppError):  # read-only now
                        await nodes[writer].contexts.execute(
                            kv, "set", json.dumps({"key": key, "value": value})
                        )
                else:
                    await nodes[writer].contexts.execute(
                        chat, "post", json.dumps({"text": f"{round_}/{writer}"})
                    )
                    posts += 1
                await trio.sleep(rng.random())
            await cluster.heal()
        faults.drop = faults.duplicate = 0.0
        await _wait_converged(cluster, [kv, chat], limit=600)
        # Same visible values everywhere, and nothing lost.
        entries = [(await n.contexts.execute(kv, "entries", "{}")).result for n in nodes]
        assert all(e == entries[0] for e in entries)
        roles = [await n.contexts.roles(kv) for n in nodes]
        assert all(r == roles[0] for r in roles)
        counts = {(await n.contexts.execute(chat, "count", "{}")).result for n in nodes}
        assert counts == {posts}


@pytest.mark.parametrize("seed", [1, 2])
async def test_chaos_converges(
    tmp_path: Path, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    await run_chaos(tmp_path, seed, rounds=4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 13))
async def test_chaos_converges_many_seeds(
    tmp_path: Path, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    await run_chaos(tmp_path, seed, rounds=12)
