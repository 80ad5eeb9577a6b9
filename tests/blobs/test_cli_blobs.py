"""`trionode blob add | get | ls | show | rm` as a user runs them, against a running node."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import base58
import pytest
import trio

from trionode.cli_blobs import Progress
from trionode.testing import TestNode, open_test_node

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.real_network


async def cli(node: TestNode, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trionode", *args, "--api", node.api_url, f"--token={node.token}"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
    )


async def test_add_ls_get_rm(tmp_path: Path) -> None:
    source = tmp_path / "file.bin"
    data = os.urandom(2 * 1024 * 1024 + 99)
    source.write_bytes(data)
    async with open_test_node(tmp_path / "home") as node:
        added = await cli(node, "blob", "add", str(source))
        assert added.returncode == 0, added.stderr
        blob_id = added.stdout.decode().strip()
        assert len(blob_id) > 40
        assert added.stderr == b""  # no progress bar when stderr is not a terminal

        listed = await cli(node, "blob", "ls", "--json")
        assert [b["blobId"] for b in json.loads(listed.stdout)["blobs"]] == [blob_id]
        assert json.loads(listed.stdout)["blobs"][0]["name"] == "file.bin"

        out = tmp_path / "out.bin"
        got = await cli(node, "blob", "get", blob_id, "-o", str(out))
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == data
        assert not (tmp_path / "out.bin.part").exists()

        # An interrupted download left FILE.part: get asks only for the rest (marked bytes
        # stand in for what the first attempt wrote, so the test sees they were kept).
        resumed = tmp_path / "resumed.bin"
        (tmp_path / "resumed.bin.part").write_bytes(b"\0" * 1_000_000)
        got = await cli(node, "blob", "get", blob_id, "-o", str(resumed), "--json")
        assert got.returncode == 0, got.stderr
        assert resumed.read_bytes() == b"\0" * 1_000_000 + data[1_000_000:]
        assert json.loads(got.stdout)["size"] == len(data)

        pinned = await cli(node, "blob", "pin", blob_id, "--json")
        assert json.loads(pinned.stdout)["pinned"] is True
        unpinned = await cli(node, "blob", "unpin", blob_id, "--json")
        assert json.loads(unpinned.stdout)["pinned"] is False

        removed = await cli(node, "blob", "rm", blob_id)
        assert removed.returncode == 0
        missing = await cli(node, "blob", "get", blob_id, "-o", str(tmp_path / "x"))
        assert missing.returncode == 1
        assert missing.stderr.decode().count("\n") == 1
        assert "404" in missing.stderr.decode()
        absent = await cli(node, "blob", "add", str(tmp_path / "absent"))
        assert absent.returncode == 1
        assert "no such file" in absent.stderr.decode()


def test_progress_line_shows_bytes_rate_and_eta() -> None:
    out = io.StringIO()
    progress = Progress(10 * 1024 * 1024, "upload", out=out)
    progress._started -= 2.0
    progress.advance(5 * 1024 * 1024)
    line = out.getvalue()
    assert "5.0 MiB / 10.0 MiB" in line
    assert "50%" in line
    assert "MiB/s" in line
    assert "ETA 0:0" in line
    quiet = io.StringIO()
    Progress(10, "upload", out=quiet, enabled=False).advance(5)
    assert quiet.getvalue() == ""


async def test_notes_attachment_through_the_cli_and_json_rpc(tmp_path: Path) -> None:
    """A real node: upload with `blob add`, attach it to a note with `call`, read it back
    through JSON-RPC; attaching a blob the node lacks is one line naming -32018."""
    source = tmp_path / "photo.jpg"
    data = os.urandom(300_000)
    source.write_bytes(data)
    async with open_test_node(tmp_path / "home") as node:
        app = await cli(node, "app", "install", str(ROOT / "apps" / "notes"), "--json")
        assert app.returncode == 0, app.stderr
        app_id = json.loads(app.stdout)["applicationId"]
        created = await cli(node, "context", "create", app_id, "--json")
        assert created.returncode == 0, created.stderr
        context = json.loads(created.stdout)["contextId"]
        added = await cli(node, "blob", "add", str(source))
        blob_id = added.stdout.decode().strip()
        args = json.dumps({"blob_id": blob_id, "name": "photo.jpg", "mime": "image/jpeg"})
        attached = await cli(node, "call", context, "attach", "--args", args)
        assert attached.returncode == 0, attached.stderr
        assert json.loads(attached.stdout)["size"] == len(data)
        read = await cli(
            node, "call", context, "read_attachment", "--args", '{"name": "photo.jpg"}'
        )
        assert read.returncode == 0, read.stderr
        got = json.loads(read.stdout)
        assert (got["mime"], base64.b64decode(got["data"])) == ("image/jpeg", data)
        stranger = base58.b58encode(os.urandom(32)).decode()
        unknown = json.dumps({"blob_id": stranger, "name": "x"})
        refused = await cli(node, "call", context, "attach", "--args", unknown)
        assert refused.returncode == 1
        assert refused.stderr.decode().count("\n") == 1
        assert stranger in refused.stderr.decode()
        assert "not stored on this node" in refused.stderr.decode()
