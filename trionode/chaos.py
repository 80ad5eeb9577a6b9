"""Seeded chaos profiles over an in-process cluster, and the checker that judges a run.

A run (:func:`run_chaos`) puts five nodes on a :class:`~trionode.net.memory.MemoryNetwork`
(``open_cluster``, made for ``autojump_clock``), shares one ``kv_store`` context among them
(nodes 0 and 1 are its admins, 2-4 members), turns the profile's faults on and plays
``rounds`` rounds. In each round, decided by ``random.Random(seed)``:

* **concurrent writers**: a few steps, each with one to three nodes writing at the same
  virtual instant: one *tracked* write (a key nobody else writes, so whether it survived is
  visible) and sometimes a write to a shared key (conflicts, LWW);
* **membership changes**: a live admin demotes a member to read-only or grants it
  ``member`` again; once per run (from the second round) one member is removed, which
  rotates the context key. Changes cross partitions and meet concurrent writes;
* **heavy**: the network is cut in two for the round (partitions), gossip is reordered;
* **crash**: one node is killed (``Cluster.crash``: connections reset, tasks cancelled
  wherever they are, no graceful shutdown) in the middle of the round's writes and sync
  repairs, and restarted on the same home at the start of the next round; the nodes' wall
  clocks are skewed by minutes (stamps from a node ahead wait for the receivers' clocks).

Then every fault is lifted, crashed nodes restart, and the run waits for convergence.

The checker (:func:`check`), on the nodes that are still members:

* **convergence**: same state root hash, same DAG heads (so the same set of deltas taken
  in), no pending delta, same visible values (``entries``) and same roles;
* **no acknowledged write lost**: a tracked write the writer's node acknowledged (returned a
  delta id) is *required* when nothing may filter it: its writer had taken in every change
  made about it so far, and every later change about it was made by an admin that had
  already applied the write (so the write is in that change's causal past). Every required
  write must be present on every member; one missing is *lost*. The others were concurrent
  with a demotion or removal of their writer: strong removal may filter them (DESIGN §7.1),
  so they are counted as *filtered* when absent everywhere, never as lost.

Reports are :class:`ChaosResult`; ``python -m benchmarks.chaos`` prints the table of
seeds by profiles. Decisions come from the seed; under ``autojump_clock`` a run is also
reproducible as far as Trio's scheduling order is.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from msgspec.structs import replace

from trionode.config import FileConfig
from trionode.context.manager import ContextError
from trionode.net.memory import GossipFaults
from trionode.node import Node
from trionode.sdk.errors import AppError
from trionode.testing import Cluster, open_cluster

APPS: Final = Path(__file__).resolve().parents[1] / "apps"
NODES: Final = 5
ADMINS: Final = (0, 1)
"""Nodes 0 (the creator) and 1 are the admins; membership changes target nodes 2-4."""
CONVERGENCE_LIMIT: Final = 900.0
"""Virtual seconds the run may take to converge once the faults are lifted."""
SHARED_KEYS: Final = 6
"""Keys every node may overwrite (LWW conflicts); they are not tracked writes."""


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory for a run's homes, in memory (``/dev/shm``) when the machine
    has it: an in-process crash keeps the page cache, so the disk's fsync on every commit
    would only slow the run down, not make it any more faithful."""
    shm = Path("/dev/shm")  # noqa: S108 - a private TemporaryDirectory inside it
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="trionode-chaos-", dir=where) as path:
        yield Path(path)


@attrs.frozen
class Profile:
    name: str
    drop: float
    """Probability that a received gossip message is lost."""
    duplicate: float
    """Probability that one is delivered twice."""
    max_delay: float = 0.0
    """Each copy is held up to this many virtual seconds (reordering)."""
    partitions: bool = False
    crashes: bool = False
    skews: tuple[float, ...] = ()
    """Seconds each node's wall clock is ahead (negative: behind); empty: no skew."""


PROFILES: Final = {
    "light": Profile("light", drop=0.01, duplicate=0.01),
    "heavy": Profile("heavy", drop=0.10, duplicate=0.05, max_delay=1.0, partitions=True),
    "crash": Profile(
        "crash", drop=0.01, duplicate=0.01, crashes=True, skews=(0.0, 120.0, -120.0, 60.0, -45.0)
    ),
}


@attrs.frozen
class ChaosResult:
    profile: str
    seed: int
    converged: bool
    problem: str | None
    """Why the run did not converge (None: it did)."""
    acknowledged: int
    """Tracked writes the writer's node acknowledged."""
    required: int
    """Of those, the ones no removal or demotion could filter."""
    lost: int
    """Required writes missing on some member (must be 0)."""
    filtered: int
    """Acknowledged writes concurrent with their writer's demotion or removal, filtered."""
    refused: int
    """Writes refused at once (the writer was read-only or removed, as far as it knew)."""
    changes: int
    """Membership changes made (grants, demotions, removals)."""
    removals: int
    crashes: int
    partitions: int
    gossip_dropped: int
    gossip_duplicated: int
    virtual_seconds: float
    lost_keys: tuple[str, ...] = ()


@attrs.define
class _Write:
    node: int
    key: str
    value: str
    required: bool


@attrs.define
class _Change:
    admin: int
    target: int
    role: str | None
    delta_id: bytes


def _cluster_settings(file: FileConfig) -> FileConfig:
    # Short sync timers: a few virtual seconds repair what gossip lost.
    return replace(
        file, sync=replace(file.sync, heartbeat=2.0, interval=4.0, min_interval=2.0, timeout=20.0)
    )


class _Run:
    """One seeded run: the cluster, the context, and what was done to it."""

    def __init__(self, cluster: Cluster, profile: Profile, seed: int, faults: GossipFaults) -> None:
        self.cluster = cluster
        self.profile = profile
        self.seed = seed
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not security
        self.faults = faults
        self.context = b""
        self.members: list[bytes] = []
        self.removed: set[int] = set()
        self.writes: list[_Write] = []
        self.changes: list[_Change] = []
        self.refused = 0
        self.crashes = 0
        self.partitions = 0
        self._written = 0

    def node(self, i: int) -> Node:
        return self.cluster.nodes[i]

    def live(self) -> list[int]:
        return [i for i in range(NODES) if i not in self.cluster.down]

    def member_nodes(self) -> list[int]:
        return [i for i in range(NODES) if i not in self.removed]

    # -- set-up ----------------------------------------------------------------------------

    async def share(self) -> None:
        nodes = self.cluster.nodes
        app_id = b""
        for node in nodes:
            app_id = (await node.applications.install(str(APPS / "kv_store"))).application_id
        self.context = (await nodes[0].contexts.create(app_id)).context_id
        for node in nodes[1:]:
            await node.joins.join(await nodes[0].joins.invite(self.context))
        self.members = [(await n.contexts.member_key(self.context))[0] for n in nodes]
        await nodes[0].contexts.change_members(self.context, [(self.members[1], "admin")])

    # -- the round's actions ---------------------------------------------------------------

    async def write(self, i: int) -> None:
        """One tracked write by node `i` (and sometimes a shared-key one)."""
        node = self.node(i)
        self._written += 1
        key, value = f"w{i}-{self._written}", f"{self.seed}:{self._written}"
        up_to_date = await self._knows_changes_about(i)
        try:
            result = await node.contexts.execute(
                self.context, "set", json.dumps({"key": key, "value": value})
            )
        except (ContextError, AppError):
            self.refused += 1  # read-only or removed, as far as this node knows
            return
        if result.delta_id is not None:
            self.writes.append(_Write(i, key, value, required=up_to_date))
        if self.rng.random() < 0.3:
            shared = {"key": f"k{self.rng.randrange(SHARED_KEYS)}", "value": value}
            with contextlib.suppress(ContextError, AppError):
                await node.contexts.execute(self.context, "set", json.dumps(shared))

    async def _knows_changes_about(self, i: int) -> bool:
        ids = [c.delta_id for c in self.changes if c.target == i]
        if not ids:
            return True
        return await self.node(i).contexts.applied(self.context, ids) == set(ids)

    async def change(self, *, remove: bool = False) -> None:
        admins = [a for a in ADMINS if a not in self.cluster.down]
        targets = [t for t in range(len(ADMINS), NODES) if t not in self.removed]
        if not admins or not targets:
            return
        admin, target = self.rng.choice(admins), self.rng.choice(targets)
        role = None if remove else self.rng.choice(["read-only", "member"])
        # The admin's view of the target's writes at this moment: those it has applied are
        # in the change's causal past and may not be filtered by it; the others may be.
        entries = await self._entries(self.node(admin))
        try:
            delta = await self.node(admin).contexts.change_members(
                self.context, [(self.members[target], role)]
            )
        except ContextError:
            return  # e.g. the target is no longer a member in this admin's view
        for write in self.writes:
            if write.node == target and entries.get(write.key) != write.value:
                write.required = False
        self.changes.append(_Change(admin, target, role, delta.id))
        if remove:
            self.removed.add(target)

    async def _entries(self, node: Node) -> dict[str, str]:
        result = (await node.contexts.execute(self.context, "entries", "{}")).result
        assert isinstance(result, dict)
        return result

    async def step(self) -> None:
        """One to three nodes write at the same virtual instant."""
        candidates = [i for i in self.live() if i not in self.removed]
        if not candidates:
            return
        writers = self.rng.sample(candidates, min(len(candidates), self.rng.randint(1, 3)))
        async with trio.open_nursery() as nursery:
            for i in writers:
                nursery.start_soon(self.write, i)

    async def play_round(self, round_: int, rounds: int) -> None:
        rng, cluster = self.rng, self.cluster
        for i in sorted(cluster.down):
            await cluster.restart(i, wait=False)
        partitioned = self.profile.partitions and (round_ == 0 or rng.random() < 0.4)
        if partitioned:
            side = rng.sample(range(NODES), rng.randint(1, 2))
            await cluster.partition(side)
            self.partitions += 1
        crash_at = -1
        steps = rng.randint(3, 8)
        if self.profile.crashes and (round_ == 0 or rng.random() < 0.6):
            crash_at = rng.randrange(steps)
        if round_ == 1 or rng.random() < 0.5:
            await self.change()
        if round_ == max(1, rounds // 2) and not self.removed:
            await self.change(remove=True)
        for step in range(steps):
            await self.step()
            if step == crash_at:
                # Right after writes: gossip, fetches and sync sessions are in flight.
                victim = rng.choice(self.live())
                await trio.sleep(rng.uniform(0.0, 1.0))
                await cluster.crash(victim)
                self.crashes += 1
            await trio.sleep(rng.random())
        if partitioned:
            await cluster.heal(wait=False)

    # -- the end ---------------------------------------------------------------------------

    async def finish(self) -> None:
        faults = self.faults
        faults.drop = faults.duplicate = faults.max_delay = 0.0
        self.cluster.network.heal()
        for i in sorted(self.cluster.down):
            await self.cluster.restart(i, wait=False)


async def _snapshot(run: _Run, i: int) -> tuple[Any, ...]:
    node, context = run.node(i), run.context
    root, heads, pending = await node.contexts.state(context)
    who = {m: f"node{k}" for k, m in enumerate(run.members)}
    roles = sorted(
        (who.get(m, m.hex()[:8]), r) for m, r in (await node.contexts.roles(context)).items()
    )
    return (root, sorted(heads), pending, await run._entries(node), roles)  # noqa: SLF001


async def _divergence(run: _Run) -> str | None:
    first: tuple[Any, ...] | None = None
    for i in run.member_nodes():
        snap = await _snapshot(run, i)
        if snap[2]:
            return f"node {i}: {snap[2]} pending deltas"
        if first is None:
            first = snap
        elif snap != first:
            what = ["root hash", "heads", "pending", "entries", "roles"]
            differ = [what[k] for k in range(len(what)) if snap[k] != first[k]]
            shown = f" {snap[4]} != {first[4]}" if "roles" in differ else ""
            return f"node {i} differs from node {run.member_nodes()[0]}: {', '.join(differ)}{shown}"
    return None


async def wait_converged(run: _Run, limit: float = CONVERGENCE_LIMIT) -> str | None:
    """Wait until the members agree (and still agree a few virtual seconds later); returns
    what still differs after `limit` virtual seconds, or None."""
    problem: str | None = "not checked"
    with trio.move_on_after(limit):
        agreed = 0
        while True:
            await run.cluster.settle()
            problem = await _divergence(run)
            agreed = agreed + 1 if problem is None else 0
            if agreed >= 3:  # stable across sync ticks: nothing late changes it
                return None
            await trio.sleep(2.0)
    return problem


async def check(run: _Run, problem: str | None, started: float) -> ChaosResult:
    """Judge a finished run (module docstring)."""
    present = [await run._entries(run.node(i)) for i in run.member_nodes()]  # noqa: SLF001
    lost: list[str] = []
    filtered = 0
    for write in run.writes:
        everywhere = all(entries.get(write.key) == write.value for entries in present)
        nowhere = all(write.key not in entries for entries in present)
        if write.required and not everywhere:
            lost.append(write.key)
        elif not write.required and nowhere:
            filtered += 1
    stats = run.faults.statistics()
    return ChaosResult(
        profile=run.profile.name,
        seed=run.seed,
        converged=problem is None,
        problem=problem,
        acknowledged=len(run.writes),
        required=sum(1 for w in run.writes if w.required),
        lost=len(lost),
        filtered=filtered,
        refused=run.refused,
        changes=len(run.changes),
        removals=len(run.removed),
        crashes=run.crashes,
        partitions=run.partitions,
        gossip_dropped=stats.dropped,
        gossip_duplicated=stats.duplicated,
        virtual_seconds=trio.current_time() - started,
        lost_keys=tuple(lost),
    )


async def run_chaos(profile: Profile, seed: int, base_dir: Path, *, rounds: int = 4) -> ChaosResult:
    """One seeded run of `profile` (module docstring); homes go under `base_dir`. Meant for
    ``autojump_clock`` (or ``trio.run(..., clock=MockClock(autojump_threshold=0))``)."""
    started = trio.current_time()
    faults = GossipFaults(seed=seed)
    skews: Sequence[float] | None = profile.skews or None
    async with open_cluster(
        NODES,
        base_dir,
        faults=faults,
        configure=_cluster_settings,
        restartable=True,
        clock_skews=skews,
    ) as cluster:
        run = _Run(cluster, profile, seed, faults)
        # Joining needs a whole network; the chaos starts afterwards.
        await run.share()
        problem = await wait_converged(run)
        if problem is not None:
            return await check(run, f"before the chaos: {problem}", started)
        faults.drop, faults.duplicate = profile.drop, profile.duplicate
        faults.max_delay = profile.max_delay
        for round_ in range(rounds):
            await run.play_round(round_, rounds)
        await run.finish()
        problem = await wait_converged(run)
        return await check(run, problem, started)
