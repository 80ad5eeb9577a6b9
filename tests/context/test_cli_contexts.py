"""The CLI against a real `trionode start` process: app install, context create, call, watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.real_network


async def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trionode", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=ENV,
        cwd=ROOT,
    )


async def _cli_json(*args: str) -> dict[str, object]:
    result = await _cli(*args, "--json")
    assert result.returncode == 0, result.stderr.decode()
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


async def _read_until(stream: trio.abc.ReceiveStream, needle: bytes, seen: bytearray) -> None:
    while needle not in seen:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended before {needle!r}: {seen.decode()}")
        seen += chunk


async def test_install_create_call_and_watch(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    init = await _cli(
        "init", "--home", home, "--server-port", "0", "--swarm-port", "0", "--no-mdns"
    )
    assert init.returncode == 0
    node = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionode", "start", "--home", home],
        stderr=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
    )
    assert node.stderr is not None
    watcher: trio.Process | None = None
    try:
        # A hang detector, not a speed check: each step is a fresh CLI process, and on a
        # loaded 2-core machine their start-up alone came near a 90 s limit.
        with trio.fail_after(300):
            await _read_until(node.stderr, b"started: peer id", bytearray())
            app = await _cli_json("app", "install", str(ROOT / "apps" / "kv_store"), "--home", home)
            context = await _cli_json(
                "context", "create", str(app["applicationId"]), "--home", home
            )
            context_id = str(context["contextId"])
            watcher = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trionode", "watch", context_id, "--home", home, "--json"],
                stdout=subprocess.PIPE,
                env=ENV,
                cwd=ROOT,
            )
            assert watcher.stdout is not None
            # The watcher subscribes asynchronously: write until it has seen a delta, then
            # check that it sees the later ones in order.
            seen = bytearray()
            for i in range(1000):
                await _cli_json(
                    "call",
                    context_id,
                    "set",
                    "--args",
                    json.dumps({"key": "k", "value": str(i)}),
                    "--home",
                    home,
                )
                with trio.move_on_after(2):
                    await _read_until(watcher.stdout, b"\n", seen)
                if seen:
                    break
            first = json.loads(seen.split(b"\n")[0])
            assert first["contextId"] == context_id
            assert first["events"][0]["name"] in ("Inserted", "Updated")
            result = await _cli_json(
                "call", context_id, "get", "--args", '{"key": "k"}', "--home", home
            )
            assert result["deltaId"] is None
            shown = await _cli_json("context", "show", context_id, "--home", home)
            assert shown["rootHash"] == result["rootHash"]
            failing = await _cli(
                "call", context_id, "get_required", "--args", '{"key": "nope"}', "--home", home
            )
            assert failing.returncode == 1
            assert failing.stderr.decode().strip() == "trionode: 404: no key 'nope'"
            listed = await _cli("context", "list", "--home", home)
            assert context_id in listed.stdout.decode()
            # chat and notes through the CLI too.
            chat_app = await _cli_json(
                "app", "install", str(ROOT / "apps" / "chat"), "--home", home
            )
            chat = await _cli_json(
                "context",
                "create",
                str(chat_app["applicationId"]),
                "--args",
                '{"topic": "cli"}',
                "--home",
                home,
            )
            chat_id = str(chat["contextId"])
            await _cli_json("call", chat_id, "post", "--args", '{"text": "hi"}', "--home", home)
            messages = await _cli_json("call", chat_id, "messages", "--home", home)
            output = messages["output"]
            assert isinstance(output, list)
            assert [m["text"] for m in output] == ["hi"]
            notes_app = await _cli_json(
                "app", "install", str(ROOT / "apps" / "notes"), "--home", home
            )
            notes = await _cli_json(
                "context",
                "create",
                str(notes_app["applicationId"]),
                "--args",
                '{"text": "helo"}',
                "--home",
                home,
            )
            notes_id = str(notes["contextId"])
            await _cli_json(
                "call", notes_id, "insert", "--args", '{"pos": 3, "text": "l"}', "--home", home
            )
            text = await _cli_json("call", notes_id, "text", "--home", home)
            assert text["output"] == "hello"
            node.send_signal(signal.SIGTERM)
            assert await node.wait() == 0
            assert await watcher.wait() == 0  # the stream ended with the node
    finally:
        for process in (node, watcher):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


@asynccontextmanager
async def _running_node(home: str) -> AsyncIterator[None]:
    """`trionode init` and `trionode start` on `home`; SIGTERM on exit."""
    init = await _cli(
        "init", "--home", home, "--server-port", "0", "--swarm-port", "0", "--no-mdns"
    )
    assert init.returncode == 0
    node = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trionode", "start", "--home", home],
        stderr=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
    )
    assert node.stderr is not None
    try:
        with trio.fail_after(90):
            await _read_until(node.stderr, b"started: peer id", bytearray())
        yield
    finally:
        node.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            await node.wait()
        if node.returncode is None:
            node.kill()


async def test_role_leave_and_revoke_through_the_cli(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    async with _running_node(home):
        with trio.fail_after(90):
            app = await _cli_json("app", "install", str(ROOT / "apps" / "kv_store"), "--home", home)
            created = await _cli_json(
                "context", "create", str(app["applicationId"]), "--home", home
            )
            context_id = str(created["contextId"])
            invited = await _cli_json("context", "invite", context_id, "--home", home)
            invitation = str(invited["invitation"])
            revoked = await _cli_json("context", "revoke", context_id, invitation, "--home", home)
            assert len(str(revoked["revoked"])) == 64
            # The creator is the only admin: it may neither demote itself nor leave.
            members = await _cli_json("context", "members", context_id, "--home", home)
            me = str(members["members"][0]["publicKey"])  # type: ignore[index]
            demote = await _cli("context", "role", context_id, me, "member", "--home", home)
            assert demote.returncode != 0
            assert b"last admin" in demote.stderr
            leave = await _cli("context", "leave", context_id, "--home", home)
            assert leave.returncode != 0
            assert b"last admin" in leave.stderr
