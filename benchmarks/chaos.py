"""The chaos figures: seeds by profiles, converged, acknowledged writes lost, filtered.

Runs `trionode.chaos.run_chaos` for every seed of every profile, each in its own Trio run
on a mock clock that jumps whenever every task waits (what ``autojump_clock`` does in the
tests), and prints one row per profile and, with ``--each``, one line per run. The same
runs as ``tests/replication/test_chaos_profiles.py`` (the slow test uses seeds 1001-1100
with 6 rounds; this script's defaults are seeds 1-100 with 4 rounds).

    python -m benchmarks.chaos                      # 100 seeds x light, heavy, crash
    python -m benchmarks.chaos --seeds 10 --profile heavy --each
    python -m benchmarks.chaos --seed 7 --profile crash     # one run, to reproduce it

Exits non-zero if any run did not converge or lost an acknowledged write.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Final

import trio
import trio.testing

from benchmarks.harness import plain_table
from trionode.chaos import PROFILES, ChaosResult, run_chaos, scratch_dir


def _one(profile: str, seed: int, rounds: int) -> ChaosResult:
    async def main() -> ChaosResult:
        with scratch_dir() as base:
            return await run_chaos(PROFILES[profile], seed, base, rounds=rounds)

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _line(result: ChaosResult, seconds: float) -> str:
    verdict = "ok" if result.converged and not result.lost else "FAIL"
    return (
        f"{verdict:4} {result.profile:5} seed {result.seed:4}: acknowledged {result.acknowledged}"
        f" (required {result.required}), lost {result.lost}, filtered {result.filtered},"
        f" refused {result.refused}, changes {result.changes}, crashes {result.crashes},"
        f" partitions {result.partitions}, dropped {result.gossip_dropped},"
        f" duplicated {result.gossip_duplicated}, {result.virtual_seconds:.0f} virtual s,"
        f" {seconds:.1f} s" + ("" if result.problem is None else f" -- {result.problem}")
    )


COUNTS: Final = (
    "acknowledged",
    "required",
    "lost",
    "filtered",
    "refused",
    "changes",
    "crashes",
    "partitions",
)
"""The ChaosResult fields summed per profile in the table."""


def table(results: Sequence[ChaosResult], wall: Mapping[str, float] | None = None) -> str:
    """One row per profile; `wall` gives each profile's real seconds (all its runs)."""
    rows = []
    for name in PROFILES:
        mine = [r for r in results if r.profile == name]
        if mine:
            converged = f"{sum(r.converged for r in mine)}/{len(mine)}"
            sums = [str(sum(getattr(r, field) for r in mine)) for field in COUNTS]
            seconds = "" if wall is None else f"{wall.get(name, 0.0):.0f} s"
            rows.append([name, str(len(mine)), converged, *sums, seconds])
    return plain_table(["profile", "seeds", "converged", *COUNTS, "wall time"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="seeds 1..N per profile")
    parser.add_argument("--seed", type=int, help="run this one seed only")
    parser.add_argument("--profile", choices=sorted(PROFILES), action="append")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--each", action="store_true", help="one line per run as it ends")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.rounds < 1:
        parser.error("--seeds and --rounds must be at least 1")
    profiles = args.profile or list(PROFILES)
    seeds = [args.seed] if args.seed is not None else list(range(1, args.seeds + 1))
    results: list[ChaosResult] = []
    wall: dict[str, float] = {}
    started = time.perf_counter()
    for profile in profiles:
        for seed in seeds:
            began = time.perf_counter()
            result = _one(profile, seed, args.rounds)
            results.append(result)
            wall[profile] = wall.get(profile, 0.0) + time.perf_counter() - began
            if args.each or args.seed is not None or not result.converged or result.lost:
                print(_line(result, time.perf_counter() - began), file=sys.stderr, flush=True)
    print(table(results, wall))
    print(f"({len(results)} runs in {time.perf_counter() - started:.0f} s of real time)")
    return 0 if all(r.converged and not r.lost for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
