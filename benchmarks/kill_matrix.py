"""The kill -9 matrix: real `trionode start` processes killed with SIGKILL at five moments.

Three nodes A, B, C on loopback share a ``kv_store`` context (A created it; B and C joined
with invitations, so they find each other as member peers). The cases run one after the
other on that cluster; in each, one node is killed with SIGKILL, restarted on its home (at
a new port) and the members must converge with **no acknowledged write lost**: a write is
acknowledged when the node's JSON-RPC answered it.

* ``local-writes``: B is killed while a client writes to B (one request in flight);
* ``receiving-gossip``: C is killed while A writes (C is applying A's gossip);
* ``serving-sync``: C is killed and misses 60 writes on A; C restarts, and the member that
  serves C's catch-up (A or B, whichever C asked) is killed while it serves: at the last
  scrape before the SIGKILL its ``/metrics`` show a session being served
  (``trionode_sync_serving``) and deltas sent since C came back
  (``trionode_sync_served_deltas_total``; only C lacks any), and afterwards C's own
  metrics show its session failed;
* ``snapshot-join``: a snapshot carries only *final* state (folded deltas: the base rows;
  everything else reaches a joiner by delta sync), so A is first restarted to fold at once
  (``store.delta_retention`` 0; A is the only admin, so each of its writes makes what it
  held final), writes 192 values of 60 KiB and folds them (its sync status counts the
  checkpoints); a fourth node D, asking for 64 KiB pages (some 190 of them), joins; the
  join answers once its snapshot is in, and before that, once D's ``/metrics`` show a
  page joined (``trionode_snapshot_pages_total``), D is killed; before D restarts, its
  datastore must hold the snapshot's progress marker, unfinished (so the kill landed
  mid-snapshot), and D resumes from it;
* ``key-rotation``: A removes D (a removal introduces a new key, sealed to the others) and
  is killed as soon as the removal is answered, while B writes; after its restart A writes
  with the new key.

For each case: the acknowledged writes, how many the killed node lacked right after its
restart (before any sync: its own acknowledged writes must be on its disk), how many were
lost after convergence (must be 0), the seconds from the restart to convergence, and for
the two in-session cases what shows that the kill landed inside the session.

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
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import base58
import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import plain_table
from trionode.client import ApiError, Client, open_client
from trionode.config import load_config, parse_config, render_config
from trionode.context import snapshot
from trionode.home import init_home
from trionode.layout import read_api_url, read_token
from trionode.store.store import open_store

ROOT: Final = Path(__file__).resolve().parents[1]
ENV: Final = {**os.environ, "PYTHONUNBUFFERED": "1"}
CASES: Final = ("local-writes", "receiving-gossip", "serving-sync", "snapshot-join", "key-rotation")
CONVERGE_LIMIT: Final = 120.0
"""Seconds the members may take to converge after a restart."""
SESSION_WAIT: Final = 60.0
"""Seconds to wait for the session a kill must land in to show on /metrics."""
SERVING_GAP: Final = 60
"""Writes C misses before ``serving-sync``: a chain, below ``sync.max_delta_rounds`` (64),
so C's catch-up is one delta sync (of 30 request rounds: see ``SERVING_ANCESTORS``), not a
tree comparison."""
SNAPSHOT_VALUES: Final = 192
SNAPSHOT_VALUE_BYTES: Final = 60 * 1024
"""D asks for snapshot pages of 64 KiB (``sync.snapshot_page_bytes``): one such value a
page, so its snapshot is some 200 round trips and commits (an app event may carry 64 KiB,
and kv_store's carry the value, so values cannot be larger)."""
SNAPSHOT_PAGE_BYTES: Final = 64 * 1024
FOLDING: Final[dict[str, object]] = {"delta_retention": 0.0, "fold_interval": 0.5}
"""A's ``store`` settings for ``snapshot-join``: final deltas fold within half a second."""
FOLD_WAIT: Final = 60.0
"""Seconds A may take to fold the snapshot's values."""
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
    inside: bool | None = None
    """For the in-session cases: whether the kill provably landed inside the session."""


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


@attrs.frozen
class Metrics:
    """One scrape of a node's /metrics."""

    samples: list[tuple[str, dict[str, str], float]]

    def total(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples that carry `labels` (0 when there is none)."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )


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

    def add(self, name: str, **sections: dict[str, object]) -> Proc:
        """A new home; `sections` override settings of config.toml (``sync={...}``)."""
        home = self.base / name
        init_home(home, swarm_port=0, server_port=0, swarm_host="127.0.0.1", mdns=False)
        _configure(home, sections)
        proc = Proc(name, home)
        self.procs[name] = proc
        return proc

    async def reconfigure(self, proc: Proc, **sections: dict[str, object]) -> None:
        """Stop `proc` gracefully, change its settings, start it again."""
        assert proc.process is not None
        proc.process.terminate()
        await proc.process.wait()
        _configure(proc.home, sections)
        await self.start(proc)

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

    async def write(self, name: str, size: int = 0) -> str:
        """One acknowledged write on node `name` (raises if the node did not answer); its
        value is `size` characters long when `size` is given."""
        self._n += 1
        key, value = f"{name}{self._n}", str(self._n)
        value += "x" * max(0, size - len(value))
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
                try:
                    views = [await self.view(name) for name in names]
                except ApiError:
                    # E.g. a joiner still taking its snapshot: it is not a member yet.
                    views = []
                if views and all(v == views[0] for v in views):
                    return True
                await trio.sleep(0.5)
        return False

    async def metrics(self, name: str) -> Metrics:
        """What node `name` shows on /metrics now."""
        async with self.procs[name].client() as client:
            text = await client.metrics_text()
        return Metrics(
            [
                (sample.name, sample.labels, sample.value)
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            ]
        )

    async def lost(self, names: Sequence[str]) -> list[str]:
        present = []
        for name in names:
            try:
                present.append(await self.entries(name))
            except ApiError:  # not a member (yet): it holds none of them
                present.append({})
        return [k for k, v in self.acked.items() if any(p.get(k) != v for p in present)]


def _configure(home: Path, sections: dict[str, dict[str, object]]) -> None:
    """Override settings of the home's config.toml (``{"sync": {...}}``)."""
    if not sections:
        return
    path = home / "config.toml"
    raw = tomllib.loads(path.read_text())
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(render_config(parse_config(raw, source=str(path))))


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
    present = await c.entries(victim) if mine else {}
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


SERVED: Final = "trionode_sync_served_deltas_total"
SESSIONS: Final = "trionode_sync_sessions_total"


SERVING_ANCESTORS: Final = 1
"""C's ``sync.max_ancestors`` for ``serving-sync``: a delta request (/trionode/sync/2) takes
up to that many ancestors in its answer, and at the default the whole 60-delta chain came in
one answer, over before the kill could land in it. One each keeps the catch-up 30 rounds."""


async def case_serving_sync(c: Cluster) -> CaseResult:
    await c.kill9(c.procs["c"])
    _configure(c.procs["c"].home, {"sync": {"max_ancestors": SERVING_ANCESTORS}})
    for _ in range(SERVING_GAP):
        await c.write("a")
    servers = ("a", "b")
    before = {name: (await c.metrics(name)).total(SERVED) for name in servers}
    await c.start(c.procs["c"])
    failed_before = (await c.metrics("c")).total(SESSIONS, outcome="failed")
    # Scrape A and B in turn until one is serving a session and has sent deltas since C came
    # back (only C lacks any): C's catch-up runs there. Kill that server at once.
    victim, sent = "", 0.0
    with trio.move_on_after(SESSION_WAIT):
        while not victim:
            for name in servers:
                scrape = await c.metrics(name)
                sent = scrape.total(SERVED) - before[name]
                if scrape.total("trionode_sync_serving") >= 1 and sent > 0:
                    victim = name
                    break
    if not victim:
        victim = "a"  # no session showed: the case fails ("in session": NO)
    await c.kill9(c.procs[victim])
    # C's side: the session it was running with the server breaks (a failed session).
    cut = False
    with trio.move_on_after(SESSION_WAIT):
        while not cut:
            cut = (await c.metrics("c")).total(SESSIONS, outcome="failed") > failed_before
            if not cut:
                await trio.sleep(0.1)  # polling another process; no event crosses to us
    inside = bool(sent) and cut
    evidence = (
        f"{victim.upper()} killed while serving C's catch-up ({sent:.0f} deltas sent);"
        f" C's session {'failed' if cut else 'did NOT fail'}"
    )
    result = await _after_restart(c, "serving-sync", victim, "abc", mine=[], note=evidence)
    return attrs.evolve(result, inside=inside)


async def snapshot_marker(proc: Proc, context_id: str) -> snapshot.SnapshotProgress | None:
    """The snapshot progress marker in a stopped node's datastore (None: there is none)."""
    config = load_config(proc.home)
    async with open_store(
        config.data_dir,
        initial_map_size=config.store.initial_map_size,
        max_map_size=config.store.max_map_size,
        reader_threads=1,
        passphrase=None,
    ) as store:
        return await snapshot.load_progress(store, base58.b58decode(context_id))


async def checkpoints(c: Cluster, name: str) -> int:
    """How many checkpoints node `name` holds (folded deltas among them), from its sync
    status."""
    async with c.procs[name].client() as client:
        status = await client.request("GET", f"/admin-api/contexts/{c.context}/sync")
    return int(status["finality"]["checkpoints"])


async def case_snapshot_join(c: Cluster) -> CaseResult:
    await c.reconfigure(c.procs["a"], store=FOLDING)
    before = await checkpoints(c, "a")
    async with trio.open_nursery() as nursery:  # a final state of many snapshot pages

        async def write_some(n: int) -> None:
            for _ in range(n):
                await c.write("a", SNAPSHOT_VALUE_BYTES)

        for _ in range(8):
            nursery.start_soon(write_some, SNAPSHOT_VALUES // 8)
    # Every value but the newest (a head never folds) is final once A wrote on it; the
    # handler runs its events start on B and C fold too (so do checkpoints count them).
    folded = 0
    with trio.move_on_after(FOLD_WAIT):
        while folded < SNAPSHOT_VALUES - 1:
            folded = await checkpoints(c, "a") - before
            if folded < SNAPSHOT_VALUES - 1:
                await trio.sleep(0.2)  # polling another process; no event crosses to us
    d = c.add("d", sync={"snapshot_page_bytes": SNAPSHOT_PAGE_BYTES})
    await c.start(d)
    async with d.client() as client:
        await client.install_application(str(ROOT / "apps" / "kv_store"))

    async def join() -> None:
        with contextlib.suppress(*CLIENT_ERRORS):  # the kill cuts the request
            await c.join("d", "a")

    # The join answers once its first sync, the snapshot, is done: D takes the state page
    # by page meanwhile. Kill it once a page is in.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(join)
        pages = 0.0
        with trio.move_on_after(SESSION_WAIT):
            while pages < 1:
                pages = (await c.metrics("d")).total("trionode_snapshot_pages_total")
        await c.kill9(d)
    marker = await snapshot_marker(d, c.context)
    inside = marker is not None and marker.heads is not None and not marker.complete
    if marker is None:
        evidence = "no snapshot marker after the kill: the snapshot had ended"
    else:
        evidence = (
            f"D killed mid-snapshot: its marker holds {marker.pages} pages"
            f" ({marker.records} records){', complete' if marker.complete else ''}"
        )
    result = await _after_restart(c, "snapshot-join", "d", "abcd", mine=[], note=evidence)
    resumed = (await c.metrics("d")).total("trionode_snapshot_pages_total")
    return attrs.evolve(
        result,
        inside=inside,
        note=f"A folded {folded} deltas; {evidence}; {resumed:.0f} more pages after the restart",
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
    headers = (
        "case",
        "killed",
        "acknowledged",
        "missing on restart",
        "lost",
        "converged",
        "s",
        "in session",
    )
    rows = [
        (
            r.case,
            r.victim.upper(),
            str(r.acknowledged),
            str(r.missing_after_restart),
            str(r.lost),
            "yes" if r.converged else "NO",
            f"{r.seconds_to_converge:.1f}",
            {None: "-", True: "yes", False: "NO"}[r.inside],
        )
        for r in results
    ]
    return plain_table(headers, rows)


def sound(r: CaseResult) -> bool:
    """Converged, nothing lost or missing, and an in-session kill landed in its session."""
    return r.converged and not r.lost and not r.missing_after_restart and r.inside is not False


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
    return 0 if all(sound(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
