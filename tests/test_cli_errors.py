"""Every failure a user can cause, through the real `trionode` process: one line, no traceback.

Exit status 2 means "fix the command line or the configuration", 1 anything else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from trionode.store.encryption import KdfParams
from trionode.store.lmdb_store import LmdbStore

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def trionode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trionode", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or ENV,
        timeout=120,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The single stderr line of a failed command (asserting there is exactly one)."""
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, result.stderr
    return lines[0]


def init(home: Path, *extra: str) -> None:
    result = trionode("init", "--home", str(home), "--swarm-port", "0", "--no-mdns", *extra)
    assert result.returncode == 0, result.stderr
    # Tests listen on loopback only.
    config = home / "config.toml"
    config.write_text(config.read_text().replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/"))


def edit_config(home: Path, old: str, new: str) -> None:
    config = home / "config.toml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


@contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port with a listener on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the node side: start ---------------------------------------------------------------------


@pytest.mark.real_network
def test_api_port_in_use_names_the_address_and_the_key(tmp_path: Path) -> None:
    with busy_port() as port:
        init(tmp_path / "h", "--server-port", str(port))
        line = one_line(trionode("start", "--home", str(tmp_path / "h")), 1)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line
    assert "api.port" in line
    assert not (tmp_path / "h" / "api.url").exists()


@pytest.mark.real_network
def test_swarm_port_in_use_names_network_listen(tmp_path: Path) -> None:
    init(tmp_path / "h", "--server-port", "0")
    with busy_port() as port:
        edit_config(tmp_path / "h", "/tcp/0", f"/tcp/{port}")
        line = one_line(trionode("start", "--home", str(tmp_path / "h")), 1)
    assert line.startswith("trionode: network.listen: cannot listen on")
    assert f"/ip4/127.0.0.1/tcp/{port}" in line


def test_bad_multiaddr_in_listen_is_a_config_error(tmp_path: Path) -> None:
    init(tmp_path / "h", "--server-port", "0")
    edit_config(tmp_path / "h", "/ip4/127.0.0.1/tcp/0", "/ip4/bogus/tcp/0")
    line = one_line(trionode("start", "--home", str(tmp_path / "h")), 2)
    assert "`network.listen`: '/ip4/bogus/tcp/0' is not a multiaddr" in line


def test_missing_identity_key_says_run_init(tmp_path: Path) -> None:
    init(tmp_path / "h", "--server-port", "0")
    (tmp_path / "h" / "identity.key").unlink()
    line = one_line(trionode("start", "--home", str(tmp_path / "h")), 2)
    assert "identity.key is missing (run `trionode init`)" in line


def test_wrong_passphrase_is_one_line_and_opens_nothing(tmp_path: Path) -> None:
    home = tmp_path / "h"
    init(home, "--server-port", "0")
    edit_config(home, "encrypted = false", "encrypted = true")
    # An encrypted datastore made with a cheap KDF, so the test does not spend seconds
    # in Argon2; the node reads the parameters from the store.
    LmdbStore.open(
        home / "data", passphrase="right", kdf=KdfParams(time_cost=1, memory_kib=8 * 1024)
    ).close()
    line = one_line(
        trionode("start", "--home", str(home), env={**ENV, "TRIONODE_PASSPHRASE": "wrong"}), 2
    )
    assert "wrong passphrase" in line
    assert not (home / "api.url").exists()


# -- the client side ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        (["call", "CTX", "get"], "{bad", "--args: not valid JSON"),
        (["call", "CTX", "get"], '"a"', "--args: must be a JSON object like"),
        (["call", "CTX", "get"], "[1, 2]", "not an array: '[1, 2]'"),
        (["context", "create", "APP"], "7", "--args: must be a JSON object"),
        (["context", "create", "APP"], "null", "not null"),
    ],
)
def test_bad_args_json_is_a_usage_error_saying_what_is_wrong(
    command: list[str], text: str, expected: str
) -> None:
    # Checked before any request: no node is needed.
    result = trionode(*command, "--args", text, "--api", "http://127.0.0.1:9", "--token", "t")
    line = one_line(result, 2)
    assert expected in line
    assert line.startswith(f"trionode {command[0]}")
    assert line.endswith("--help`)")


def test_usage_errors_are_one_line() -> None:
    line = one_line(trionode("call", "CTX"), 2)
    assert line.startswith("trionode call: the following arguments are required: METHOD")
    assert one_line(trionode("no-such-command"), 2).startswith("trionode: argument COMMAND")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([""], "'' is not a context id"),
        (["CTX"], "'CTX' is not a context id"),
        (["m11FZwVErNYb892v85jEQKbSvxgSUk2XyhSoHZU4H72", "--since", "-1"], "must be an integer"),
        (["m11FZwVErNYb892v85jEQKbSvxgSUk2XyhSoHZU4H72", "--since", "x"], "must be an integer"),
    ],
)
def test_watch_arguments_are_checked_before_any_request(args: list[str], expected: str) -> None:
    line = one_line(trionode("watch", *args, "--api", "http://127.0.0.1:9", "--token", "t"), 2)
    assert line.startswith("trionode watch: argument")
    assert expected in line


def test_call_and_watch_with_the_node_down(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    call = one_line(trionode("call", "CTX", "get", "--api", url, "--token", "t"), 1)
    assert call.startswith(f"trionode: cannot reach node at {url}")
    context = "m11FZwVErNYb892v85jEQKbSvxgSUk2XyhSoHZU4H72"
    watch = one_line(trionode("watch", context, "--api", url, "--token", "t"), 1)
    assert watch.startswith(f"trionode: cannot watch {context} at ws://127.0.0.1:")
    assert watch.rstrip().endswith("failed")  # the reason, not an empty string
    # No api.url and no node: the home's config gives the port, the failure is one line.
    init(tmp_path / "h", "--server-port", str(closed_port()))
    health = one_line(trionode("health", "--home", str(tmp_path / "h")), 1)
    assert health.startswith("trionode: cannot reach node at http://127.0.0.1:")


def test_a_closed_stdout_is_not_a_traceback(tmp_path: Path) -> None:
    """`trionode … | head -1`: the reader has gone; exit quietly instead of a BrokenPipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command writes: every write fails with EPIPE
    try:
        for args in (["init", "--home", str(tmp_path / "h"), "--no-mdns"], ["--help"]):
            result = subprocess.run(
                [sys.executable, "-m", "trionode", *args],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                timeout=60,
                check=False,
            )
            assert result.stderr == ""
            # `--help` exits 0 before its output is flushed; the interpreter then drops it.
            assert result.returncode == (0 if args == ["--help"] else 1)
    finally:
        os.close(write_end)


# -- one node per home ----------------------------------------------------------------------


async def _read_until(stream: trio.abc.ReceiveStream, needle: bytes) -> None:
    seen = bytearray()
    while needle not in seen:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended before {needle!r}: {seen.decode()}")
        seen += chunk


@asynccontextmanager
async def running_node(home: Path) -> AsyncIterator[trio.Process]:
    """`trionode start` in a subprocess, yielded once it has said it started."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionode", "start", "--home", str(home)],
        stderr=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    try:
        with trio.fail_after(60):
            await _read_until(proc.stderr, b"started: peer id")
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await proc.stderr.aclose()


async def _trionode(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trionode", *args],
        capture_stdout=True,
        capture_stderr=True,
        env=ENV,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.real_network
async def test_a_second_node_on_a_home_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    home = tmp_path / "h"
    init(home, "--server-port", "0")
    async with running_node(home) as first:
        url = (home / "api.url").read_text()
        second = await _trionode("start", "--home", str(home))
        err = second.stderr.decode()
        assert second.returncode == 1, err
        assert err.splitlines() == [
            f"trionode: {home}: a node is already running (pid {first.pid})"
        ]
        # The running node's files are as they were and it still answers.
        assert (home / "api.url").read_text() == url
        health = await _trionode("health", "--home", str(home), "--json")
        assert health.returncode == 0, health.stderr
        first.send_signal(signal.SIGTERM)
        assert await first.wait() == 0


@pytest.mark.real_network
async def test_kill_9_releases_the_home_lock(tmp_path: Path) -> None:
    home = tmp_path / "h"
    init(home, "--server-port", "0")
    async with running_node(home) as first:
        first.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock
        assert await first.wait() == -signal.SIGKILL
    async with running_node(home) as second:
        health = await _trionode("health", "--home", str(home), "--json")
        assert health.returncode == 0, health.stderr
        second.send_signal(signal.SIGTERM)
        assert await second.wait() == 0
