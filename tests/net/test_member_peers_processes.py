"""Done-when of issue 12, part 2, with real `trionode start` processes on loopback.

Three nodes without mDNS and without bootstrap peers: B and C reach A only through the
addresses in A's invitations, and each other only through peer exchange. B is killed with
SIGKILL in the middle of writes on A and C and restarted; it listens on port 0, so it comes
back at a port nobody knows, and only its stored member peers can bring it back. It
reconnects to both and converges. Every wait reads a process's log or runs a command.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from tests.replication.test_processes import ENV, ROOT, cli, roots

pytestmark = pytest.mark.real_network

WRITES = 4
"""Writes on A and on C each while B is killed (each is one CLI process)."""
DEADLINE = 600
"""Seconds the whole test may take (it takes 40-120 s on 2 cores shared with other runs)."""


def _port(address: str) -> int:
    return int(address.split("/tcp/")[1].split("/", maxsplit=1)[0])


@attrs.define
class _Process:
    proc: trio.Process
    log: bytearray = attrs.field(factory=bytearray)
    grew: trio.Event = attrs.field(factory=trio.Event)

    async def pump(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some():
            self.log += chunk
            self.grew.set()
            self.grew = trio.Event()

    async def wait_log(self, *needles: str, since: int = 0) -> None:
        """Wait until each of `needles` is in a whole log line after byte `since`."""
        while True:
            text = self.log[since:].decode(errors="replace")
            if all(n in text and "\n" in text[text.index(n) :] for n in needles):
                return
            if self.proc.returncode is not None:
                raise AssertionError(f"node exited; log:\n{text[-3000:]}")
            await self.grew.wait()


@asynccontextmanager
async def running(home: Path, prefix: Sequence[str] = ()) -> AsyncIterator[_Process]:
    """`trionode start` (under `prefix`, e.g. `ip netns exec NS`) until the block ends."""
    proc = await trio.lowlevel.open_process(
        [*prefix, sys.executable, "-m", "trionode", "start", "--home", str(home)],
        stderr=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
    )
    node = _Process(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.pump)
            await node.wait_log("started: peer id")
            yield node
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _init(home: Path) -> str:
    result = await cli(home, "init", "--server-port", "0", "--swarm-port", "0", "--no-mdns")
    config = (home / "config.toml").read_text()
    # Loopback only: the test must not listen on the machine's real interfaces.
    config = config.replace('listen = ["/ip4/0.0.0.0/tcp/0"]', 'listen = ["/ip4/127.0.0.1/tcp/0"]')
    assert 'listen = ["/ip4/127.0.0.1/tcp/0"]' in config
    assert "bootstrap = []" in config
    (home / "config.toml").write_text(config)
    return str(result["peerId"])


async def converge(homes: Sequence[Path], context: str) -> None:
    """Sync each node until all roots agree: gossip between the others may still be in
    flight when the first sync returns (bounded by the caller's deadline, never a sleep)."""
    while True:
        for home in homes:
            await cli(home, "context", "sync", context)
        if len(set(await roots(list(homes), context))) == 1:
            return


async def _set(home: Path, context: str, key: str, value: str) -> None:
    await cli(home, "call", context, "set", "--args", json.dumps({"key": key, "value": value}))


async def test_sigkilled_member_restarts_at_a_new_port_reconnects_and_converges(
    tmp_path: Path,
) -> None:
    a_home, b_home, c_home = (tmp_path / n for n in "abc")
    a_id, b_id, c_id = [await _init(home) for home in (a_home, b_home, c_home)]
    # A guard, not a timing: on 2 busy cores each CLI call is a process start of seconds.
    with trio.fail_after(DEADLINE):
        async with running(a_home) as a, running(b_home) as b, running(c_home) as c:
            app = {}
            for home in (a_home, b_home, c_home):
                app = await cli(home, "app", "install", str(ROOT / "apps" / "kv_store"))
            created = await cli(a_home, "context", "create", str(app["applicationId"]))
            context = str(created["contextId"])
            for home in (b_home, c_home):
                invitation = str((await cli(a_home, "context", "invite", context))["invitation"])
                shown = await cli(a_home, "invitation", "show", invitation)
                assert shown["addresses"], "the invitation alone must be enough to join"
                assert all("0.0.0.0" not in addr for addr in shown["addresses"])
                await cli(home, "context", "join", invitation)
            # B stores A and C as member peers (C learned through A's peer exchange).
            await b.wait_log(f"member peer {a_id} stored", f"member peer {c_id} stored")
            old_port = _port((await cli(b_home, "info"))["addresses"][0])

            async def writes(home: Path, prefix: str) -> None:
                for i in range(WRITES):
                    await _set(home, context, f"{prefix}{i}", str(i))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writes, a_home, "a")
                nursery.start_soon(writes, c_home, "c")
                await _set(a_home, context, "before-kill", "x")
                b.proc.send_signal(signal.SIGKILL)
                assert await b.proc.wait() == -signal.SIGKILL
            await _set(c_home, context, "after-kill", "y")

            async with running(b_home) as b2:
                assert _port((await cli(b_home, "info"))["addresses"][0]) != old_port
                # Nobody knows B's new port: B dials its stored members itself.
                await b2.wait_log(f"connected to {a_id}", f"connected to {c_id}")
                await converge([a_home, b_home, c_home], context)
                entries = (await cli(b_home, "call", context, "entries"))["output"]
                expected = {f"{who}{i}" for who in "ac" for i in range(WRITES)}
                assert expected | {"before-kill", "after-kill"} <= set(entries)
                peers = {p["peer_id"] for p in (await cli(b_home, "peers"))["peers"]}
                assert {a_id, c_id} <= peers
                assert b_id in {p["peer_id"] for p in (await cli(a_home, "peers"))["peers"]}
            for proc in (a, c):
                proc.proc.send_signal(signal.SIGTERM)
                assert await proc.proc.wait() == 0
