"""A 1 GiB blob stored and read back: memory stays bounded by a few chunks (`slow`)."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.blobs.test_store import open_blobs

GiB = 1024 * 1024 * 1024
PIECE = 256 * 1024
LIMIT = 48 * 1024 * 1024
"""Peak traced allocations allowed: a few 1 MiB chunks and buffers, never the blob."""

pytestmark = pytest.mark.slow


async def generated(total: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    block = bytearray(PIECE)
    for i in range(total // PIECE):
        block[:8] = i.to_bytes(8, "big")  # every piece differs: no chunk dedup
        piece = bytes(block)
        digest.update(piece)
        await trio.lowlevel.checkpoint()
        yield piece


async def test_one_gib_blob_with_bounded_memory(tmp_path: Path) -> None:
    written = hashlib.sha256()
    read_back = hashlib.sha256()
    tracemalloc.start()
    try:
        async with open_blobs(tmp_path, max_size=2 * GiB) as blobs:
            # open_blobs uses 1 KiB chunks for the fast tests; a real node uses 1 MiB.
            blobs._chunk_size = 1024 * 1024
            info = await blobs.add(generated(GiB, written))
            assert info.size == GiB
            assert info.chunks == 1024
            size = 0
            async for piece in await blobs.read(info.blob_id):
                read_back.update(piece)
                size += len(piece)
            assert size == GiB
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read_back.digest() == written.digest()
    assert peak < LIMIT, f"peak {peak / 2**20:.1f} MiB"
