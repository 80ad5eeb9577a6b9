"""A fetch from a `trionode start` process that is SIGKILLed mid-transfer resumes, once it
is back, from the chunks already verified (the issue's acceptance case, with a real kill:
no shutdown path runs on the serving side)."""

from __future__ import annotations

import os
from pathlib import Path

import base58
import pytest
import trio

from tests.replication.cluster_helpers import metric
from tests.replication.test_processes import ROOT, cli, init, running
from trionode.blobs.transfer import BlobUnavailableError
from trionode.testing import open_test_node

pytestmark = pytest.mark.real_network
MiB = 1024 * 1024
CHUNKS = 12


def loopback(address: str) -> str:
    return address.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/")


async def test_fetch_resumes_after_the_serving_process_is_sigkilled(tmp_path: Path) -> None:
    a_home = tmp_path / "a"
    await init(a_home)
    source = tmp_path / "data.bin"
    content = os.urandom(CHUNKS * MiB)
    source.write_bytes(content)
    with trio.fail_after(240):
        async with open_test_node(tmp_path / "b", api=False) as b_test:
            b = b_test.node
            async with running(a_home) as a_process:
                address = loopback((await cli(a_home, "peers"))["listenAddrs"][0])
                app = await cli(a_home, "app", "install", str(ROOT / "apps" / "kv_store"))
                await b.applications.install(str(ROOT / "apps" / "kv_store"))
                context = str(
                    (await cli(a_home, "context", "create", app["applicationId"]))["contextId"]
                )
                invitation = (await cli(a_home, "context", "invite", context))["invitation"]
                joined = await b.joins.join(invitation)
                blob_id = (await cli(a_home, "blob", "add", str(source), "--context", context))[
                    "blobId"
                ]
                await b.host.connect(address)

                # B keeps three verified chunks, then waits until A has been SIGKILLed.
                honest = b.blobs.put_chunk
                kept_three = trio.Event()
                killed = trio.Event()
                count = 0

                async def put_then_hold(digest: bytes, data: bytes) -> bool:
                    nonlocal count
                    ok = await honest(digest, data)
                    count += 1
                    if count == 3:
                        kept_three.set()
                        await killed.wait()
                    return ok

                b.blobs.put_chunk = put_then_hold  # type: ignore[method-assign]

                async def kill_a() -> None:
                    await kept_three.wait()
                    a_process.kill()
                    await a_process.wait()
                    killed.set()

                raw_blob = base58.b58decode(blob_id)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_a)
                    with pytest.raises(BlobUnavailableError, match="chunks kept"):
                        await b.blob_transfer.fetch(raw_blob, joined.context_id)
                b.blobs.put_chunk = honest  # type: ignore[method-assign]
                kept = metric(b, "trionode_blob_chunks_fetched_total")
                assert 3 <= kept < CHUNKS
                assert not await b.blobs.has(raw_blob)

            # A starts again from its home (it still holds the blob): B asks for the rest only.
            async with running(a_home):
                await b.host.connect(loopback((await cli(a_home, "peers"))["listenAddrs"][0]))
                await b.blob_transfer.fetch(raw_blob, joined.context_id)
                assert metric(b, "trionode_blob_chunks_fetched_total") == CHUNKS
                assert b"".join([p async for p in await b.blobs.read(raw_blob)]) == content
