from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from trionode.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_init_creates_a_home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--json", "--no-mdns"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "mdns = false" in (home / "config.toml").read_text()
    assert out["peerId"].startswith("12D3KooW")
    assert (home / "config.toml").is_file()
    assert (home / "identity.key").stat().st_mode & 0o777 == 0o600
    assert (home / "api-token").stat().st_mode & 0o777 == 0o600
    token = (home / "api-token").read_text().strip()
    assert token not in (home / "config.toml").read_text()  # only its hash is in the config


def test_init_refuses_an_existing_home_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["peerId"]
    key = (home / "identity.key").read_bytes()
    assert main(["init", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "already holds a node home; use --force" in err
    assert (home / "identity.key").read_bytes() == key
    assert main(["init", "--home", str(home), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peerId"] != first


def test_init_rejects_bad_ports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--home", str(tmp_path / "h"), "--server-port", "70000"]) == 2
    assert "--server-port: 70000 is not a port number" in capsys.readouterr().err


def test_start_with_a_bad_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    main(["init", "--home", str(home)])
    with (home / "config.toml").open("a") as f:
        f.write("\n[synk]\ninterval = 1\n")
    assert main(["start", "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "unknown key `synk`" in err[0]
    assert main(["start", "--home", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_client_command_without_a_node_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--api", "http://127.0.0.1:9", "--token", "t", "--timeout", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("trionode: cannot reach node at http://127.0.0.1:9")
    assert main(["health", "--home", str(tmp_path / "nowhere")]) == 2


async def _read_until(stream: trio.abc.ReceiveStream, needle: bytes, seen: bytearray) -> None:
    while needle not in seen:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended before {needle!r}: {seen.decode()}")
        seen += chunk


@pytest.mark.real_network
async def test_start_serves_until_sigterm_then_exits_0(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    await trio.run_process(
        [
            sys.executable,
            "-m",
            "trionode",
            "init",
            "--home",
            str(home),
            "--server-port",
            "0",
            "--swarm-port",
            "0",
            "--no-mdns",  # tests never multicast beyond loopback
        ],
        capture_stdout=True,
        env=env,
    )
    token = (home / "api-token").read_text().strip()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionode", "start", "--home", str(home)],
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    log = bytearray()
    try:
        with trio.fail_after(60):
            await _read_until(proc.stderr, b"started: peer id", log)
            url = (home / "api.url").read_text().strip()
            async with httpx.AsyncClient() as http:
                health = await http.get(f"{url}/admin-api/health")
                ready = await http.get(
                    f"{url}/admin-api/ready", headers={"Authorization": f"Bearer {token}"}
                )
            assert health.json() == {"status": "ok"}
            assert ready.status_code == 200
            proc.send_signal(signal.SIGTERM)
            await _read_until(proc.stderr, b"stopped cleanly", log)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.decode()
    assert "SIGTERM received: shutting down" in text
    assert not (home / "api.url").exists()


def test_client_commands_talk_to_a_running_node(tmp_path: Path) -> None:
    """`trionode health/ready/info` against a node started in a subprocess, read from --home."""
    home = tmp_path / "home"
    args = ["init", "--home", str(home), "--server-port", "0", "--swarm-port", "0", "--no-mdns"]
    assert main(args) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "trionode", "start", "--home", str(home)],
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if b"started: peer id" in line:
                break
        for command in ("health", "ready", "info"):
            result = subprocess.run(
                [sys.executable, "-m", "trionode", command, "--home", str(home), "--json"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            json.loads(result.stdout)
        table = subprocess.run(
            [sys.executable, "-m", "trionode", "info", "--home", str(home)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout
        assert table.splitlines()[0].split() == ["key", "value"]
        assert "peerId" in table
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stderr.close()
