"""Blobs: fetching one blob over `/trionode/blob/1` between loopback nodes.

* **1 peer**: member B fetches a blob that only A holds (verified, written to B's chunk
  files, made visible). Beside it, in the same run, the transport's own one-stream echo
  (`transport_bench.measure_trionode`): what the connection itself can carry.
* **3 peers**: once B and C hold it too, D fetches it from A, B and C at once, beside the
  1-peer figure of the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from msgspec.structs import replace

from benchmarks.harness import Row
from benchmarks.transport_bench import measure_trionode
from trionode.config import FileConfig
from trionode.node import Node
from trionode.testing import open_test_nodes

APP = Path(__file__).resolve().parents[1] / "apps" / "kv_store"
MiB = 1024 * 1024


def _settings(file: FileConfig) -> FileConfig:
    return replace(file, network=replace(file.network, target_peers=0))


async def _share(nodes: list[Node]) -> bytes:
    app_id = b""
    for node in nodes:
        app_id = (await node.applications.install(str(APP))).application_id
    context = (await nodes[0].contexts.create(app_id)).context_id
    for node in nodes[1:]:
        await node.joins.join(await nodes[0].joins.invite(context))
    return context


async def _timed_fetch(node: Node, blob_id: bytes, context: bytes, peers: list[Node]) -> float:
    node.blob_transfer.candidate_peers = lambda _context: [p.host.peer_id for p in peers]
    started = time.perf_counter()
    info = await node.blob_transfer.fetch(blob_id, context)
    elapsed = time.perf_counter() - started
    return info.size / elapsed / 1e6


async def run(*, quick: bool) -> list[Row]:
    size = (16 if quick else 128) * MiB
    echo = await measure_trionode(size, 10)
    with tempfile.TemporaryDirectory(prefix="trionode-blob-bench-") as tmp:
        async with open_test_nodes(4, Path(tmp), api=False, configure=_settings) as test_nodes:
            a, b, c, d = (t.node for t in test_nodes)
            context = await _share([a, b, c, d])
            info = await a.blobs.add_bytes(os.urandom(size), context_id=context)
            one = await _timed_fetch(b, info.blob_id, context, [a])
            await _timed_fetch(c, info.blob_id, context, [a])
            three = await _timed_fetch(d, info.blob_id, context, [a, b, c])
    mib = size // MiB
    return [
        Row(
            f"blob fetch {mib} MiB, 1 peer",
            one,
            "MB/s",
            "transport echo, one stream",
            echo["throughput_mb_s"],
        ),
        Row(f"blob fetch {mib} MiB, 3 peers", three, "MB/s", "blob fetch, 1 peer", one),
    ]
