"""The kill -9 matrix: real `trionode start` processes killed with SIGKILL at five moments.

Three nodes A, B, C on loopback share a ``kv_store`` context (A created it; B and C joined
with invitations, so they find each other as member peers). The cases run one after the
other on that cluster; in each, one node is killed with SIGKILL, restarted on its home (at
a new port) and the members must converge with **no acknowledged write lost**: a write is
acknowledged when the node's JSON-RPC answered it.

* ``local-writes``: B is killed while a client writes to B (one request in flight);
* ``receiving-gossip``: C is killed while A writes (C is applying A's gossip);
* ``serving-sync``: C is killed and misses 40 writes on A; C restarts, and A is killed as
  soon as C connects to it (C's catch-up sync with A starts then);
* ``snapshot-join``: a fourth node D joins and is killed as soon as the join is answered,
  while it takes in the context's state;
* ``key-rotation``: A removes D (a removal introduces a new key, sealed to the others) and
  is killed as soon as the removal is answered, while B writes; after its restart A writes
  with the new key.

For each case: the acknowledged writes, how many the killed node lacked right after its
restart (before any sync: its own acknowledged writes must be on its disk), how many were
lost after convergence (must be 0), and the seconds from the restart to convergence.

    python -m benchmarks.kill_matrix                  # every case
    python -m benchmarks.kill_matrix --case local-writes

`tests/replication/test_kill_matrix.py` runs one case by default and all under `-m slow`.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio

from benchmarks.harness import plain_table
from trionode import schemas
from trionode.client import ApiError, Client, open_client
from trionode.home import init_home
from trionode.layout import read_api_url, read_token

ROOT: Final = Path(__file__).resolve().parents[1]
ENV: Final = {**os.environ, "PYTHONUNBUFFERED": "1"}
CASES: Final = ("local-writes", "receiving-gossip", "serving-sync", "snapshot-join", "key-rotation")
CONVERGE_LIMIT: Final = 120.0
"""Seconds the members may take to converge after a restart."""
CLIENT_ERRORS: Final = (ApiError, httpx.HTTPError, OSError)


@attrs.frozen
class CaseResult:
    case: str
    victim: str
    acknowledged: int
    missing_after_restart: int
    """Acknowledged writes made *on the killed node* that it lacked when it came back."""
    lost: int
    """Acknowledged writes missing on some member after convergence (must be 0)."""
    converged: bool
    seconds_to_converge: float
    note: str = ""


@attrs.define
class Proc:
    """One `trionode start` process (started again on the same home after a kill)."""

    name: str
    home: Path
    process: trio.Process | None = None
    log: bytearray = attrs.field(factory=bytearray)
    grew: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        url = read_api_url(self.home)
        assert url is not None, f"{self.name} has no API URL (not running?)"
        return url

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        async with open_client(self.url, read_token(self.home)) as client:
            yield client

    async def wait_log(self, needle: str, since: int = 0) -> None:
        """Wait for a whole log line containing `needle` after byte `since`."""
        while True:
            text = self.log[since:].decode(errors="replace")
            at = text.find(needle)
            if at >= 0 and "\n" in text[at:]:
                return
            if self.process is None or self.process.returncode is not None:
                raise AssertionError(f"{self.name} exited; log:\n{text[-3000:]}")
            await self.grew.wait()


class Cluster:
    """The processes, the shared context and the writes acknowledged so far."""

    def __init__(self, base: Path, nursery: trio.Nursery) -> None:
        self.base = base
        self.nursery = nursery
        self.procs: dict[str, Proc] = {}
        self.context = ""
        self.acked: dict[str, str] = {}
        self._n = 0
        self._acked_more = trio.Event()

    # -- processes -------------------------------------------------------------------------

    def add(self, name: str) -> Proc:
        home = self.base / name
        init_home(home, swarm_port=0, server_port=0, swarm_host="127.0.0.1", mdns=False)
        proc = Proc(name, home)
        self.procs[name] = proc
        return proc

    async def start(self, proc: Proc) -> None:
        since = len(proc.log)
        proc.process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trionode", "start", "--home", str(proc.home)],
            stderr=subprocess.PIPE,
            env=ENV,
            cwd=ROOT,
        )
        self.nursery.start_soon(_pump, proc, proc.process)
        await proc.wait_log("started: peer id", since)

    async def kill9(self, proc: Proc) -> None:
        assert proc.process is not None
        proc.process.send_signal(signal.SIGKILL)
        assert await proc.process.wait() == -signal.SIGKILL

    async def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.process is not None and proc.process.returncode is None:
                proc.process.kill()
                await proc.process.wait()

    # -- the context -----------------------------------------------------------------------

    async def share(self, names: Sequence[str]) -> None:
        app_id = ""
        for name in names:
            async with self.procs[name].client() as client:
                app_id = (
                    await client.install_application(str(ROOT / "apps" / "kv_store"))
                ).application_id
        async with self.procs[names[0]].client() as client:
            self.context = (await client.create_context(app_id)).context_id
        for name in names[1:]:
            await self.join(name, names[0])

    async def join(self, name: str, via: str) -> None:
        async with self.procs[via].client() as inviter:
            invitation = (await inviter.invite(self.context)).invitation
        async with self.procs[name].client() as client:
            await client.join(invitation)

    async def write(self, name: str) -> str:
        """One acknowledged write on node `name` (raises if the node did not answer)."""
        self._n += 1
        key, value = f"{name}{self._n}", str(self._n)
        async with self.procs[name].client() as client:
            await client.call(self.context, "set", {"key": key, "value": value})
        self.acked[key] = value
        self._acked_more.set()
        self._acked_more = trio.Event()
        return key

    async def wait_acked(self, n: int) -> None:
        """Wait until `n` writes in all have been acknowledged (by any writer task)."""
        while len(self.acked) < n:
            await self._acked_more.wait()

    async def writer(self, name: str, acks: int, reached: trio.Event) -> list[str]:
        """Write on `name` until it stops answering (or forever); set `reached` after `acks`
        acknowledged writes."""
        mine: list[str] = []
        try:
            while True:
                mine.append(await self.write(name))
                if len(mine) >= acks:
                    reached.set()
        except CLIENT_ERRORS:
            return mine

    async def entries(self, name: str) -> dict[str, str]:
        async with self.procs[name].client() as client:
            result = (await client.call(self.context, "entries")).output
        assert isinstance(result, dict)
        return result

    async def view(self, name: str) -> tuple[Any, ...]:
        async with self.procs[name].client() as client:
            # An explicit session each round: a restarted node catches up at once. No peer
            # reachable yet (ApiError): the next round tries again.
            with trio.move_on_after(10), contextlib.suppress(ApiError):
                await client.sync(self.context)
            shown = await client.context(self.context)
        members = sorted((m.public_key, m.role) for m in shown.members)
        return (shown.root_hash, sorted(shown.heads), members, await self.entries(name))

    async def converge(self, names: Sequence[str]) -> bool:
        """Poll until `names` agree on root hash, heads, members and entries. Between
        processes there is no single event to wait for: each round runs an explicit sync
        on every node, then compares."""
        with trio.move_on_after(CONVERGE_LIMIT):
            while True:
                views = [await self.view(name) for name in names]
                if all(v == views[0] for v in views):
                    return True
                await trio.sleep(0.5)
        return False

    async def lost(self, names: Sequence[str]) -> list[str]:
        present = [await self.entries(name) for name in names]
        return [k for k, v in self.acked.items() if any(p.get(k) != v for p in present)]


async def _pump(proc: Proc, process: trio.Process) -> None:
    assert process.stderr is not None
    while chunk := await process.stderr.receive_some():
        proc.log += chunk
        proc.grew.set()
        proc.grew = trio.Event()
    proc.grew.set()  # the process ended: wake waiters so that they see it


# -- the cases --------------------------------------------------------------------------------


async def _after_restart(
    c: Cluster, case: str, victim: str, members: Sequence[str], *, mine: Sequence[str], note: str
) -> CaseResult:
    """Restart `victim`, count which of its own acknowledged writes it lacks, converge."""
    await c.start(c.procs[victim])
    present = await c.entries(victim)
    missing = sum(1 for key in mine if present.get(key) != c.acked[key])
    started = time.perf_counter()
    converged = await c.converge(members)
    seconds = time.perf_counter() - started
    lost = await c.lost(members)
    return CaseResult(case, victim, len(c.acked), missing, len(lost), converged, seconds, note)


async def case_local_writes(c: Cluster) -> CaseResult:
    reached = trio.Event()
    mine: list[str] = []

    async def write_on_b() -> None:
        mine.extend(await c.writer("b", 20, reached))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_on_b)
        await reached.wait()
        await c.kill9(c.procs["b"])  # the writer's next request is in flight
    return await _after_restart(
        c, "local-writes", "b", "abc", mine=mine, note="one request in flight"
    )


async def case_receiving_gossip(c: Cluster) -> CaseResult:
    async with trio.open_nursery() as nursery:

        async def write_on_a() -> None:
            await c.writer("a", 10_000, trio.Event())

        nursery.start_soon(write_on_a)
        before = len(c.acked)
        await c.wait_acked(before + 20)
        await c.kill9(c.procs["c"])
        await c.wait_acked(before + 40)
        nursery.cancel_scope.cancel()
    return await _after_restart(c, "receiving-gossip", "c", "abc", mine=[], note="A kept writing")


async def case_serving_sync(c: Cluster) -> CaseResult:
    await c.kill9(c.procs["c"])
    for _ in range(40):
        await c.write("a")
    a, cc = c.procs["a"], c.procs["c"]
    since = len(cc.log)
    await c.start(cc)
    a_id = (await _info(a)).peer_id
    await cc.wait_log(f"connected to {a_id}", since)
    await c.kill9(a)
    return await _after_restart(
        c,
        "serving-sync",
        "a",
        "abc",
        mine=[],
        note="A killed as C connected to it for its catch-up",
    )


async def case_snapshot_join(c: Cluster) -> CaseResult:
    d = c.add("d")
    await c.start(d)
    async with d.client() as client:
        await client.install_application(str(ROOT / "apps" / "kv_store"))
    await c.join("d", "a")
    await c.kill9(d)  # the join was answered; its state transfer and sync run now
    return await _after_restart(
        c, "snapshot-join", "d", "abcd", mine=[], note="D killed as soon as its join was answered"
    )


async def case_key_rotation(c: Cluster) -> CaseResult:
    async with c.procs["d"].client() as client:
        d_member = (await client.context(c.context)).member_public_key
    async with trio.open_nursery() as nursery:

        async def write_on_b() -> None:
            await c.writer("b", 10_000, trio.Event())

        nursery.start_soon(write_on_b)
        async with c.procs["a"].client() as client:
            await client.remove_member(c.context, d_member)
        await c.kill9(c.procs["a"])  # the new key is on its way to B and C
        await c.wait_acked(len(c.acked) + 10)
        nursery.cancel_scope.cancel()
    result = await _after_restart(c, "key-rotation", "a", "abc", mine=[], note="")
    await c.write("a")  # with the rotated key
    converged = await c.converge("abc")
    lost = await c.lost("abc")
    async with c.procs["a"].client() as client:
        members = {m.public_key for m in (await client.members(c.context)).members}
    removed = d_member not in members
    return attrs.evolve(
        result,
        acknowledged=len(c.acked),
        lost=len(lost),
        converged=result.converged and converged and removed,
        note="D removed; A writes with the new key after its restart"
        + ("" if removed else " -- D STILL A MEMBER"),
    )


async def _info(proc: Proc) -> schemas.NodeInfo:
    async with proc.client() as client:
        return await client.node_info()


CASE_FUNCTIONS: Final[dict[str, Callable[[Cluster], Awaitable[CaseResult]]]] = {
    "local-writes": case_local_writes,
    "receiving-gossip": case_receiving_gossip,
    "serving-sync": case_serving_sync,
    "snapshot-join": case_snapshot_join,
    "key-rotation": case_key_rotation,
}


async def run_matrix(base: Path, cases: Sequence[str]) -> list[CaseResult]:
    """Set up A, B, C and run `cases` in order (``key-rotation`` needs ``snapshot-join``'s
    node D: it is added first when missing)."""
    results: list[CaseResult] = []
    async with trio.open_nursery() as nursery:
        c = Cluster(base, nursery)
        try:
            for name in "abc":
                await c.start(c.add(name))
            await c.share("abc")
            for name in "abc":  # 3 warm-up writes each, so that every node writes
                await c.write(name)
            if not await c.converge("abc"):
                raise AssertionError("the cluster did not converge before the matrix")
            for case in cases:
                if case == "key-rotation" and "d" not in c.procs:
                    await case_snapshot_join(c)
                results.append(await CASE_FUNCTIONS[case](c))
        finally:
            await c.stop_all()
            nursery.cancel_scope.cancel()
    return results


def table(results: Sequence[CaseResult]) -> str:
    headers = ("case", "killed", "acknowledged", "missing on restart", "lost", "converged", "s")
    rows = [
        (
            r.case,
            r.victim.upper(),
            str(r.acknowledged),
            str(r.missing_after_restart),
            str(r.lost),
            "yes" if r.converged else "NO",
            f"{r.seconds_to_converge:.1f}",
        )
        for r in results
    ]
    return plain_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kill_matrix", description=__doc__)
    parser.add_argument("--case", choices=CASES, action="append")
    args = parser.parse_args(argv)
    cases = args.case or list(CASES)
    with tempfile.TemporaryDirectory(prefix="trionode-kill9-") as base:
        results = trio.run(run_matrix, Path(base), cases)
    print(table(results))
    for r in results:
        if r.note:
            print(f"{r.case}: {r.note}")
    return (
        0 if all(r.converged and not r.lost and not r.missing_after_restart for r in results) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
