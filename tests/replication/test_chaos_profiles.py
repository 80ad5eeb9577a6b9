"""Chaos profiles (issue 11): light, heavy and crash, each with membership changes and
concurrent writers, judged by `trionode.chaos.check`. A few seeds per profile run by
default; `-m slow` (`make test-slow`) runs 100 per profile. `python -m benchmarks.chaos`
prints the same runs as a table of figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trionode.chaos import PROFILES, ChaosResult, run_chaos, scratch_dir
from trionode.context.manager import ContextError
from trionode.testing import open_cluster

from .cluster_helpers import share

DEFAULT_SEEDS = range(1, 4)
SLOW_SEEDS = range(1, 101)


@pytest.fixture
def homes() -> Iterator[Path]:
    with scratch_dir() as path:
        yield path


def _assert_sound(result: ChaosResult) -> None:
    assert result.converged, result.problem
    assert result.lost == 0, f"acknowledged writes lost: {result.lost_keys}"
    # The run did what its profile says (a run that skipped the chaos proves nothing).
    assert result.acknowledged > 0
    assert result.required > 0
    assert result.changes >= 2
    assert result.removals == 1
    profile = PROFILES[result.profile]
    if profile.partitions:
        assert result.partitions > 0
    if profile.crashes:
        assert result.crashes > 0
    if profile.drop:
        assert result.gossip_dropped > 0


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
async def test_chaos_profile_converges_and_loses_no_acknowledged_write(
    homes: Path, profile: str, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    _assert_sound(await run_chaos(PROFILES[profile], seed, homes))


@pytest.mark.slow
@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("seed", SLOW_SEEDS)
async def test_chaos_profile_many_seeds(
    homes: Path, profile: str, seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    _assert_sound(await run_chaos(PROFILES[profile], seed + 1000, homes, rounds=6))


async def test_a_removed_member_survives_thousands_of_refused_syncs(
    homes: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Found by the crash profile: every refused session doubled the backoff with no cap
    on the exponent, and heartbeats start sessions whatever the backoff, so a removed
    member's node died of an OverflowError after 1,024 refusals."""
    async with open_cluster(2, homes) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1])
        await a.contexts.change_members(
            context, [((await b.contexts.member_key(context))[0], None)]
        )
        await cluster.settle()
        assert await b.contexts.role(context, (await b.contexts.member_key(context))[0]) is None
        for _ in range(1100):
            with pytest.raises(ContextError, match="not a member"):
                await b.sync.sync_now(context, cluster.peer_ids[0])
        assert b.is_ready()
