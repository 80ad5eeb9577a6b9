"""Two homes behind two NATs share a context through a public relay: real processes, real
sockets, Linux network namespaces (root only; skipped with the reason otherwise).

```
             ns wan: bridge 198.18.0.0/24 (the "Internet")
      ┌──────────────┼───────────────────────┐
 ns relay          ns nat1 (masquerade)     ns nat2 (masquerade)
 198.18.0.10       wan 198.18.0.11          wan 198.18.0.12
 relay.serve       lan 198.19.1.1           lan 198.19.2.1
                      │                        │
                   ns home1 198.19.1.2      ns home2 198.19.2.2
```

Every address is in 198.18.0.0/15 (set aside for such tests) and every packet stays in the
namespaces this test creates. The NATs forward outbound traffic with an nftables masquerade
rule and nothing inbound, so neither home can be dialed; like home routers they drop (rather
than refuse) what arrives unasked on their WAN side. Each node is a `trionode start`
process under `ip netns exec`, listening on the wildcard of its namespace, without mDNS or
bootstrap peers; the homes know only the relay (`network.relays`). Home 1 creates a context
and invites; home 2 joins with the invitation string alone (home 1's direct address is
unreachable, its `/p2p-circuit` address is not); both write; both converge.

Then DCUtR: home 1 received the relayed connection and drives a hole punch. With a plain
`masquerade` (it keeps the source port: endpoint-independent mapping) both homes dial from
their listen port to the address the relay saw the other at, and the connection becomes
direct; with `masquerade random` (a new random port per connection: endpoint-dependent) the
addresses are wrong by the time anyone dials them, and the connection stays relayed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.net.test_member_peers_processes import _Process, running

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.real_network

DEADLINE = 600
"""Seconds one case may take at most (a guard against hangs, not a timing)."""


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (make test installs nftables when it can)"
    probe = f"i12probe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


_NAT_RULES = """
table ip nat {
    chain outbound {
        type nat hook postrouting priority 100;
        oifname "wan0" MASQUERADE
    }
}
table ip filter {
    chain gate {
        type filter hook forward priority 0; policy drop;
        iifname "lan0" accept
        ct state established,related accept
    }
    chain guard {
        type filter hook input priority 0; policy accept;
        iifname "wan0" ct state new drop
    }
}
"""
"""Outbound from the LAN is masqueraded (MASQUERADE: `masquerade` or `masquerade random`);
nothing gets in that was not asked for, and what was not is dropped without an answer."""


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


SPACES = ("wan", "relay", "nat1", "nat2", "home1", "home2")
LEFTOVER = re.compile(rf"i12[0-9a-f]{{5}}({'|'.join(SPACES)})")
LEFTOVER_AGE = 3600.0
"""A run killed mid-test (SIGKILL, a CI timeout) cannot delete its namespaces; ours from
more than an hour ago are swept (younger ones may belong to a run going on beside us)."""


def _sweep_leftovers(now: float) -> None:
    run_dir = Path("/run/netns")
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        try:
            old = now - entry.stat().st_mtime > LEFTOVER_AGE
        except OSError:
            continue
        if LEFTOVER.fullmatch(entry.name) and old:
            subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, check=False)


@contextmanager
def _topology(masquerade: str) -> Iterator[dict[str, str]]:
    _sweep_leftovers(time.time())
    tag = uuid.uuid4().hex[:5]
    ns = {name: f"i12{tag}{name}" for name in SPACES}
    try:
        for name in ns.values():
            _run("ip", "netns", "add", name)
        wan = ns["wan"]
        _run("ip", "-n", wan, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", wan, "link", "set", "br0", "up")

        def veth(a: str, a_if: str, b: str, b_if: str) -> None:
            _run("ip", "link", "add", f"t{tag}a", "type", "veth", "peer", "name", f"t{tag}b")
            _run("ip", "link", "set", f"t{tag}a", "netns", a, "name", a_if)
            _run("ip", "link", "set", f"t{tag}b", "netns", b, "name", b_if)
            for space, iface in ((a, a_if), (b, b_if)):
                _run("ip", "-n", space, "link", "set", iface, "up")

        def up(space: str, iface: str, cidr: str) -> None:
            _run("ip", "-n", space, "addr", "add", cidr, "dev", iface)
            _run("ip", "-n", space, "link", "set", "lo", "up")

        for name, last in (("relay", 10), ("nat1", 11), ("nat2", 12)):
            veth(ns[name], "wan0", wan, f"p{last}")
            _run("ip", "-n", wan, "link", "set", f"p{last}", "master", "br0")
            up(ns[name], "wan0", f"198.18.0.{last}/24")
        for i in (1, 2):
            nat, home = ns[f"nat{i}"], ns[f"home{i}"]
            veth(nat, "lan0", home, "eth0")
            up(nat, "lan0", f"198.19.{i}.1/24")
            up(home, "eth0", f"198.19.{i}.2/24")
            _run("ip", "-n", home, "route", "add", "default", "via", f"198.19.{i}.1")
            _run("ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            rules = _NAT_RULES.replace("MASQUERADE", masquerade).encode()
            subprocess.run(
                ["ip", "netns", "exec", nat, "nft", "-f", "-"],
                input=rules,
                check=True,
                capture_output=True,
            )
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


async def _cli(ns: str, home: Path, *args: str) -> Any:
    result = await trio.run_process(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "trionode",
            *args,
            "--home",
            str(home),
            "--json",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"{ns} {args}: {result.stderr.decode()}"
    return json.loads(result.stdout)


async def _converge(
    nodes: tuple[tuple[str, Path], ...], context: str, expected: dict[str, str]
) -> None:
    """Sync both until both hold ``expected`` (a write may still be on its way by gossip
    when a sync returns; bounded by the test's deadline, never a sleep)."""
    while True:
        for space, home in nodes:
            await _cli(space, home, "context", "sync", context)
        held = [(await _cli(s, h, "call", context, "entries"))["output"] for s, h in nodes]
        if all(entries == expected for entries in held):
            return
        assert all(set(entries) <= set(expected) for entries in held), held


async def _first_of(node: _Process, *needles: str) -> str:
    """The first of ``needles`` to appear in a whole line of the node's log."""
    while True:
        text = node.log.decode(errors="replace")
        seen = [(text.index(n), n) for n in needles if n in text and "\n" in text[text.index(n) :]]
        if seen:
            return min(seen)[1]
        if node.proc.returncode is not None:
            raise AssertionError(f"node exited; log:\n{text[-3000:]}")
        await node.grew.wait()


def _running(ns: str, home: Path) -> AbstractAsyncContextManager[_Process]:
    return running(home, ("ip", "netns", "exec", ns))


def _configure(home: Path, **values: object) -> None:
    text = (home / "config.toml").read_text()
    for key, value in values.items():
        lines = text.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        lines[at] = f"{key} = {json.dumps(value)}"
        text = "\n".join(lines) + "\n"
    (home / "config.toml").write_text(text)


@pytest.mark.parametrize("masquerade", ["masquerade", "masquerade random"])
async def test_two_homes_behind_nats_share_a_context_through_a_relay_then_punch_a_hole(
    masquerade: str, tmp_path: Path
) -> None:
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    # A guard, not a timing: ~110 s on 2 busy cores, most of it CLI process starts.
    with _topology(masquerade) as ns, trio.fail_after(DEADLINE):
        homes = {name: tmp_path / name for name in ("relay", "home1", "home2")}
        for name, home in homes.items():
            await _cli(
                ns[name], home, "init", "--swarm-port", "2428", "--server-port", "0", "--no-mdns"
            )
        _configure(homes["relay"], serve=True)
        async with _running(ns["relay"], homes["relay"]):
            relay_addr = str((await _cli(ns["relay"], homes["relay"], "info"))["addresses"][0])
            assert relay_addr.startswith("/ip4/198.18.0.10/tcp/2428/p2p/")
            for name in ("home1", "home2"):
                _configure(homes[name], relays=[relay_addr])
            async with (
                _running(ns["home1"], homes["home1"]) as home1,
                _running(ns["home2"], homes["home2"]) as home2,
            ):
                for node in (home1, home2):
                    await node.wait_log("reserved on relay")
                app = ""
                for name in ("home1", "home2"):
                    installed = await _cli(
                        ns[name], homes[name], "app", "install", str(ROOT / "apps" / "kv_store")
                    )
                    app = str(installed["applicationId"])
                h1 = ns["home1"], homes["home1"]
                h2 = ns["home2"], homes["home2"]
                context = str((await _cli(*h1, "context", "create", app))["contextId"])
                invitation = str((await _cli(*h1, "context", "invite", context))["invitation"])
                shown = await _cli(*h1, "invitation", "show", invitation)
                assert any("/p2p-circuit/" not in a for a in shown["addresses"])  # direct: NATed
                assert any("/p2p-circuit" in a for a in shown["addresses"])
                assert all("0.0.0.0" not in a for a in shown["addresses"])
                await _cli(*h2, "context", "join", invitation)
                await _cli(*h1, "call", context, "set", "--args", '{"key": "a", "value": "1"}')
                await _cli(*h2, "call", context, "set", "--args", '{"key": "b", "value": "2"}')
                await _converge((h1, h2), context, {"a": "1", "b": "2"})
                direct, relayed = "direct connection after hole punching", "stays relayed"
                outcome = await _first_of(home1, direct, relayed)  # fail fast, not at DEADLINE
                assert outcome == (direct if masquerade == "masquerade" else relayed), outcome
                peers = (await _cli(*h2, "peers"))["peers"]
                home1_id = str((await _cli(*h1, "info"))["peerId"])
                via = [p["address"] for p in peers if p["peer_id"] == home1_id]
                assert len(via) == 1
                if masquerade == "masquerade":
                    assert via[0].startswith("/ip4/198.18.0.11/tcp/2428"), via  # nat1's mapping
                else:
                    assert "/p2p-circuit" in via[0], via
                # Still converging over whichever connection they kept.
                await _cli(*h2, "call", context, "set", "--args", '{"key": "c", "value": "3"}')
                await _converge((h1, h2), context, {"a": "1", "b": "2", "c": "3"})
