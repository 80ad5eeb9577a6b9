"""Blobs: fetching one blob over `/trionode/blob/1` between loopback nodes.

* **1 peer**: member B fetches a blob that only A holds (verified, written to B's chunk
  files, made visible). Beside it, in the same run, the transport's own one-stream echo
  (`transport_bench.measure_trionode`): what the connection itself can carry.
* **3 peers**: once B and C hold it too, D fetches it from A, B and C at once, beside the
  1-peer figure of the same run.
* **App read**: apps/notes' `read_attachment` view returning a 4 MiB attachment through
  the node's call path (`BlobCalls`: the view is abandoned once, the bytes loaded, the view
  run again, the result encoded as JSON with the bytes in base64), beside reading the same
  bytes straight from the blob store in the same run: what the call path costs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import base58
from msgspec.structs import replace

from benchmarks.harness import Row
from benchmarks.transport_bench import measure_trionode
from trionode.config import FileConfig
from trionode.node import Node
from trionode.testing import open_test_nodes

APPS = Path(__file__).resolve().parents[1] / "apps"
APP = APPS / "kv_store"
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


async def _app_read(tmp: Path, *, quick: bool) -> tuple[float, float]:
    """(view MB/s, store MB/s) reading one 4 MiB attachment."""
    size = 4 * MiB
    rounds = 5 if quick else 40
    async with open_test_nodes(1, tmp, api=False, configure=_settings) as test_nodes:
        node = test_nodes[0].node
        app_id = (await node.applications.install(str(APPS / "notes"))).application_id
        context = (await node.contexts.create(app_id)).context_id
        info = await node.blobs.add_bytes(os.urandom(size))
        blob = base58.b58encode(info.blob_id).decode()
        args = json.dumps({"blob_id": blob, "name": "a.bin"})
        await node.blob_calls.execute(context, "attach", args)
        started = time.perf_counter()
        for _ in range(rounds):
            result = await node.blob_calls.execute(context, "read_attachment", '{"name": "a.bin"}')
            assert len(result.result["data"]) > size
        view = size * rounds / (time.perf_counter() - started) / 1e6
        started = time.perf_counter()
        for _ in range(rounds):
            data = b"".join([piece async for piece in await node.blobs.read(info.blob_id)])
            assert len(data) == size
        store = size * rounds / (time.perf_counter() - started) / 1e6
    return view, store


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
        view, store = await _app_read(Path(tmp) / "app-read", quick=quick)
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
        Row("app view reads a 4 MiB blob", view, "MB/s", "blob store read, same bytes", store),
    ]
