"""The README's two-node walkthrough, run as written (real processes on loopback)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "<!-- walkthrough: tests/test_readme.py runs this block -->"


def walkthrough() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = text.split(MARKER, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def for_this_test(line: str) -> str:
    # Two changes only: ports 0 (parallel test runs must not collide; the commands find the
    # API through <home>/api.url anyway) and, after `init`, listening on loopback only.
    line = re.sub(r"--(swarm|server)-port \d+", r"--\1-port 0", line)
    if line.startswith("trionode init"):
        home = line.split("--home ")[1].split()[0]
        line += f" && sed -i 's#/ip4/0.0.0.0/#/ip4/127.0.0.1/#' {home}/config.toml"
    return line


@pytest.mark.real_network
def test_the_readme_walkthrough_works_as_written(tmp_path: Path) -> None:
    lines = walkthrough()
    assert lines[-1].startswith("trionode watch")
    (tmp_path / "apps").symlink_to(ROOT / "apps")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("TRIONODE_HOME", None)
    script = "\n".join(["set -euo pipefail", *map(for_this_test, lines[:-1]), 'echo "$CONTEXT"'])
    try:
        # Files, not pipes: the nodes started with `&` keep the script's stdout open.
        with (tmp_path / "out").open("w") as out_file, (tmp_path / "err").open("w") as err_file:
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=tmp_path,
                env=env,
                stdout=out_file,
                stderr=err_file,
                timeout=180,
                check=False,
            )
        err = (tmp_path / "err").read_text()
        assert done.returncode == 0, err
        # B read A's write: the `get` on B printed "1" just before the context id.
        out = (tmp_path / "out").read_text().splitlines()
        assert out[-2:-1] == ['"1"'], out
        context = out[-1]
        # The last line follows B's events: A's write shows up (replayed from seq 0).
        watch = subprocess.Popen(
            ["bash", "-c", f"CONTEXT={context}\n{lines[-1]}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert watch.stdout is not None
        guard = threading.Timer(60, watch.kill)  # a hung watch fails the test, not the run
        guard.start()
        try:
            seen = [watch.stdout.readline() for _ in range(2)]
            while '    Inserted {"key": "a", "value": "1"}\n' not in seen and seen[-1]:
                seen.append(watch.stdout.readline())
            assert seen[-1] == '    Inserted {"key": "a", "value": "1"}\n', seen
            assert seen[-2].startswith("#"), seen
            assert f" {context} delta " in seen[-2]
        finally:
            guard.cancel()
            watch.terminate()
            watch.wait(timeout=30)
            watch.stdout.close()
    finally:
        for home in ("nodeA", "nodeB"):
            lock = tmp_path / home / "node.lock"
            pid = lock.read_text().strip() if lock.exists() else ""
            if pid.isdigit():
                os.kill(int(pid), signal.SIGTERM)
