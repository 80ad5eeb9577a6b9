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
