"""Blobs between real nodes on loopback: the issue's acceptance cases.

* three `trionode start` processes: A adds a 20 MiB file to a context, member B gets it with
  `trionode blob get` (fetched from A over `/trionode/blob/1`), stranger C is refused;
* a fetch interrupted by killing the serving node resumes, after it restarts, from the
  chunks already verified.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from msgspec.structs import replace

from tests.replication.cluster_helpers import metric
from tests.replication.helpers import connect_all, share
from tests.replication.test_processes import ENV, ROOT, add_bootstrap, cli, init, running
from trionode.blobs.transfer import BlobUnavailableError
from trionode.config import load_config
from trionode.node import Node, open_node
from trionode.testing import open_test_node

pytestmark = pytest.mark.real_network
MiB = 1024 * 1024


async def raw_cli(home: Path, *args: str) -> tuple[int, str, bytes]:
    result = await trio.run_process(
        [sys.executable, "-m", "trionode", *args, "--home", str(home)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=ENV,
        cwd=ROOT,
    )
    return result.returncode, result.stderr.decode(), result.stdout


async def test_member_gets_20_mib_with_the_cli_and_a_stranger_is_refused(tmp_path: Path) -> None:
    a_home, b_home, c_home = (tmp_path / n for n in "abc")
    for home in (a_home, b_home, c_home):
        await init(home)
    source = tmp_path / "video.bin"
    data = os.urandom(20 * MiB)
    source.write_bytes(data)
    with trio.fail_after(240):
        async with running(a_home):
            address = (await cli(a_home, "peers"))["listenAddrs"][0]
            for home in (b_home, c_home):
                add_bootstrap(home, address.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/"))
            async with running(b_home), running(c_home):
                app = await cli(a_home, "app", "install", str(ROOT / "apps" / "kv_store"))
                await cli(b_home, "app", "install", str(ROOT / "apps" / "kv_store"))
                context = str(
                    (await cli(a_home, "context", "create", app["applicationId"]))["contextId"]
                )
                invitation = await cli(a_home, "context", "invite", context)
                await cli(b_home, "context", "join", invitation["invitation"])

                added = await cli(a_home, "blob", "add", str(source), "--context", context)
                blob_id = added["blobId"]
                assert added["size"] == len(data)

                out = tmp_path / "got.bin"
                got = await cli(
                    b_home, "blob", "get", blob_id, "-o", str(out), "--context", context
                )
                assert got["blobId"] == blob_id
                assert out.read_bytes() == data
                assert (await cli(b_home, "blob", "show", blob_id))["contexts"] == [context]

                # C is connected to A but is no member: refused with one line, nothing written.
                code, err, _ = await raw_cli(
                    c_home,
                    "blob",
                    "get",
                    blob_id,
                    "-o",
                    str(tmp_path / "c.bin"),
                    "--context",
                    context,
                )
                assert code == 1
                assert err.count("\n") == 1
                assert "unknown context" in err
                assert not (tmp_path / "c.bin").exists()
                listed = await cli(c_home, "blob", "ls")
                assert listed["blobs"] == []
                held = await cli(a_home, "blob", "ls")
                # The file, and the app's bundle (installing an app stores it as a blob).
                bundle = app["bundleBlobId"]
                assert sorted(b["blobId"] for b in held["blobs"]) == sorted([blob_id, bundle])


@asynccontextmanager
async def reopen(home: Path) -> AsyncIterator[Node]:
    """Start a node again from its home (as `make_test_config` set it up: no mDNS, no API)."""
    config = load_config(home)
    file = replace(
        config.file,
        network=replace(config.file.network, mdns=False),
        api=replace(config.file.api, enabled=False),
    )
    async with open_node(replace(config, file=file)) as node:
        yield node


async def test_fetch_interrupted_by_killing_the_server_resumes_after_restart(
    tmp_path: Path,
) -> None:
    data = os.urandom(12 * MiB)
    with trio.fail_after(120):
        async with open_test_node(tmp_path / "b", api=False) as b_test:
            b = b_test.node
            async with trio.open_nursery() as nursery:
                # A runs in its own task so that the test can kill it mid-transfer.
                a_scope = trio.CancelScope()
                started: list[Node] = []
                a_ready = trio.Event()
                frozen = trio.Event()
                served = 0

                async def run_a() -> None:
                    with a_scope:
                        async with open_test_node(tmp_path / "a", api=False) as a_test:
                            honest = a_test.node.blobs.read_chunk

                            async def freezes_at_five(digest: bytes) -> bytes | None:
                                nonlocal served
                                served += 1
                                if served == 5:
                                    frozen.set()
                                    await trio.sleep_forever()  # until A is killed
                                return await honest(digest)

                            a_test.node.blobs.read_chunk = freezes_at_five  # type: ignore[method-assign]
                            started.append(a_test.node)
                            a_ready.set()
                            await trio.sleep_forever()

                nursery.start_soon(run_a)
                await a_ready.wait()
                a = started[0]
                await connect_all([a, b])
                context = await share([a, b])
                info = await a.blobs.add_bytes(data, context_id=context)

                async def kill_a_when_frozen() -> None:
                    await frozen.wait()
                    a_scope.cancel()

                nursery.start_soon(kill_a_when_frozen)
                with pytest.raises(BlobUnavailableError, match="chunks kept"):
                    await b.blob_transfer.fetch(info.blob_id, context)
                kept = metric(b, "trionode_blob_chunks_fetched_total")
                assert 1 <= kept < 12
                assert not await b.blobs.has(info.blob_id)

            # A comes back (same home, so it still holds the blob): B asks only for the rest.
            async with reopen(tmp_path / "a") as a_again:
                await connect_all([a_again, b])
                await b.blob_transfer.fetch(info.blob_id, context)
                assert metric(b, "trionode_blob_chunks_fetched_total") == 12
                assert b"".join([p async for p in await b.blobs.read(info.blob_id)]) == data
