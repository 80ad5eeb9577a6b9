"""The blob store: atomic, content-addressed, verified, encrypted at rest when asked."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from trionode.blobs.manifest import BlobNotFoundError, BlobTooLargeError, Chunker
from trionode.blobs.store import BlobMetrics, BlobStore
from trionode.errors import StorageError
from trionode.store.encryption import KdfParams
from trionode.store.store import open_store

FAST_KDF = KdfParams(time_cost=1, memory_kib=8 * 1024)
CHUNK = 1024


@asynccontextmanager
async def open_blobs(
    home: Path,
    *,
    passphrase: str | None = None,
    max_size: int = 1 << 30,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[BlobStore]:
    async with open_store(
        home / "data",
        initial_map_size=1 << 20,
        max_map_size=1 << 30,
        reader_threads=2,
        passphrase=passphrase,
        kdf=FAST_KDF,
    ) as store:
        yield BlobStore(
            store,
            home,
            BlobMetrics(None),
            max_size=max_size,
            chunk_size=CHUNK,
            wall_clock=wall_clock,
        )


async def pieces(data: bytes, size: int = 333) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        await trio.lowlevel.checkpoint()
        yield data[i : i + size]


async def read_all(
    blobs: BlobStore, blob_id: bytes, start: int = 0, stop: int | None = None
) -> bytes:
    return b"".join([p async for p in await blobs.read(blob_id, start, stop)])


async def test_add_read_list_delete(tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 17)
    async with open_blobs(tmp_path) as blobs:
        info = await blobs.add(pieces(data), name="a.bin")
        assert info.size == len(data)
        assert info.chunks == 6
        assert info.name == "a.bin"
        assert await read_all(blobs, info.blob_id) == data
        assert await read_all(blobs, info.blob_id, 1000, 3000) == data[1000:3000]
        assert [b.blob_id for b in await blobs.list_blobs()] == [info.blob_id]
        # The same bytes are the same blob.
        again = await blobs.add(pieces(data, 1000))
        assert again.blob_id == info.blob_id
        assert await blobs.delete(info.blob_id)
        assert not await blobs.delete(info.blob_id)
        with pytest.raises(BlobNotFoundError):
            await blobs.read(info.blob_id)
        assert list((tmp_path / "blobs" / "chunks").rglob("*")) == [
            p for p in (tmp_path / "blobs" / "chunks").rglob("*") if p.is_dir()
        ]


async def test_empty_blob(tmp_path: Path) -> None:
    async with open_blobs(tmp_path) as blobs:
        info = await blobs.add(pieces(b""))
        assert (info.size, info.chunks) == (0, 0)
        assert await read_all(blobs, info.blob_id) == b""


async def test_delete_keeps_chunks_another_blob_shares(tmp_path: Path) -> None:
    shared = os.urandom(CHUNK)
    async with open_blobs(tmp_path) as blobs:
        a = await blobs.add(pieces(shared + b"a"))
        b = await blobs.add(pieces(shared + b"b"))
        await blobs.delete(a.blob_id)
        assert await read_all(blobs, b.blob_id) == shared + b"b"


async def test_interrupted_upload_leaves_no_blob(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)

    async def failing() -> AsyncIterator[bytes]:
        async for piece in pieces(data[: 3 * CHUNK]):
            yield piece
        raise OSError("client went away")

    async with open_blobs(tmp_path) as blobs:
        with pytest.raises(OSError, match="went away"):
            await blobs.add(failing())
        assert await blobs.list_blobs() == []
        # The same bytes uploaded whole later are a complete blob.
        info = await blobs.add(pieces(data))
        assert await read_all(blobs, info.blob_id) == data


async def test_size_limit(tmp_path: Path) -> None:
    async with open_blobs(tmp_path, max_size=2 * CHUNK) as blobs:
        with pytest.raises(BlobTooLargeError):
            await blobs.add(pieces(os.urandom(2 * CHUNK + 1)))
        assert await blobs.list_blobs() == []


async def test_damaged_chunk_is_an_error_never_wrong_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    async with open_blobs(tmp_path) as blobs:
        info = await blobs.add(pieces(data))
        manifest = await blobs.manifest(info.blob_id)
        assert manifest is not None
        path = blobs.files.path(manifest.chunks[1])
        raw = bytearray(path.read_bytes())
        raw[10] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(StorageError, match="chunk 1"):
            await read_all(blobs, info.blob_id)
        assert blobs.metrics.chunks_damaged._value.get() == 1
        # The damaged file is gone: the chunk is missing, so a fetch would get it again.
        assert await blobs.missing_chunks(manifest) == [1]


async def test_partial_blob_becomes_visible_only_when_complete(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 5)
    chunker = Chunker(chunk_size=CHUNK)
    chunks = [c for c, _ in chunker.feed(data)]
    last, manifest = chunker.finish()
    assert last is not None
    chunks.append(last[0])
    context = b"\x07" * 32
    async with open_blobs(tmp_path) as blobs:
        await blobs.begin_partial(manifest, name="x")
        assert await blobs.missing_chunks(manifest) == [0, 1, 2, 3]
        assert not await blobs.put_chunk(manifest.chunks[0], chunks[1])  # wrong bytes
        assert await blobs.put_chunk(manifest.chunks[0], chunks[0])
        assert await blobs.put_chunk(manifest.chunks[2], chunks[2])
        assert not await blobs.has(manifest.blob_id)
        with pytest.raises(StorageError):
            await blobs.complete(manifest)
    # A restart keeps the partial manifest and the verified chunks.
    async with open_blobs(tmp_path) as blobs:
        assert await blobs.partial_manifest(manifest.blob_id) == manifest
        assert await blobs.missing_chunks(manifest) == [1, 3]
        for i in (1, 3):
            assert await blobs.put_chunk(manifest.chunks[i], chunks[i])
        info = await blobs.complete(manifest, context_id=context)
        assert info.contexts == [context]
        assert info.name == "x"
        assert await blobs.linked(context, manifest.blob_id)
        assert await blobs.partial_manifest(manifest.blob_id) is None
        assert await read_all(blobs, manifest.blob_id) == data


async def test_chunks_are_encrypted_at_rest(tmp_path: Path) -> None:
    marker = b"plaintext-marker-" * 100
    data = marker + os.urandom(2 * CHUNK)
    async with open_blobs(tmp_path, passphrase="pw") as blobs:
        info = await blobs.add(pieces(data))
        manifest = await blobs.manifest(info.blob_id)
        assert manifest is not None
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(files) == len(manifest.chunks)
    for path in files:
        content = path.read_bytes()
        assert b"plaintext-marker" not in content
        # File names do not give the chunk hashes away either.
        assert path.name not in {h.hex() for h in manifest.chunks}
    async with open_blobs(tmp_path, passphrase="pw") as blobs:
        assert await read_all(blobs, info.blob_id) == data


async def test_pins_and_links(tmp_path: Path) -> None:
    context = b"\x01" * 32
    async with open_blobs(tmp_path) as blobs:
        info = await blobs.add(pieces(b"abc"), context_id=context)
        assert info.contexts == [context]
        await blobs.pin(info.blob_id)
        got = await blobs.info(info.blob_id)
        assert got is not None
        assert got.pinned
        await blobs.pin(info.blob_id, pinned=False)
        got = await blobs.info(info.blob_id)
        assert got is not None
        assert not got.pinned
        await blobs.delete(info.blob_id)
        assert not await blobs.linked(context, info.blob_id)


async def test_gc_removes_only_what_nothing_references_after_the_retention(
    tmp_path: Path,
) -> None:
    now = [1_000_000.0]
    live, gone = b"\x01" * 32, b"\x02" * 32
    async with open_blobs(tmp_path, wall_clock=lambda: now[0]) as blobs:
        loose = await blobs.add(pieces(os.urandom(3 * CHUNK)))
        pinned = await blobs.add(pieces(os.urandom(2 * CHUNK)))
        await blobs.pin(pinned.blob_id)
        in_live = await blobs.add(pieces(os.urandom(CHUNK)), context_id=live)
        in_gone = await blobs.add(pieces(os.urandom(CHUNK)), context_id=gone)
        # Files are older than the retention (as if uploaded long ago).
        for path in (tmp_path / "blobs" / "chunks").rglob("*"):
            if path.is_file():
                os.utime(path, (now[0] - 7200, now[0] - 7200))

        async def gc() -> dict[str, int]:
            return await blobs.collect_garbage(3600.0, {live}, set())

        # First pass: the unreferenced ones are only marked.
        assert (await gc())["blobsRemoved"] == 0
        now[0] += 3599
        assert (await gc())["blobsRemoved"] == 0
        now[0] += 1
        result = await gc()
        assert result["blobsRemoved"] == 2
        assert result["blobChunksRemoved"] == 4
        left = {b.blob_id for b in await blobs.list_blobs()}
        assert left == {pinned.blob_id, in_live.blob_id}
        assert loose.blob_id not in left
        assert in_gone.blob_id not in left
        assert not await blobs.linked(gone, in_gone.blob_id)
        # Unpinned: marked now, removed a retention later; a new reference saves it.
        await blobs.pin(pinned.blob_id, pinned=False)
        await gc()
        now[0] += 1800
        await blobs.link(live, pinned.blob_id)
        now[0] += 3600
        assert (await gc())["blobsRemoved"] == 0
        assert await read_all(blobs, pinned.blob_id)


async def test_gc_drops_abandoned_partials_and_young_orphans_survive(tmp_path: Path) -> None:
    now = [1_000_000.0]
    async with open_blobs(tmp_path, wall_clock=lambda: now[0]) as blobs:
        chunker = Chunker(chunk_size=CHUNK)
        chunks = chunker.feed(os.urandom(2 * CHUNK))
        _, manifest = chunker.finish()
        await blobs.begin_partial(manifest)
        await blobs.put_chunk(chunks[0][1], chunks[0][0])
        # Running fetches keep their partial record.
        now[0] += 3600
        result = await blobs.collect_garbage(3600.0, set(), {manifest.blob_id})
        assert result["blobPartialsRemoved"] == 0
        # The orphan chunk file was written just now by the real clock, far ahead of this
        # test's clock: it is young, so it survives (it could belong to an upload).
        result = await blobs.collect_garbage(3600.0, set(), set())
        assert result["blobPartialsRemoved"] == 1
        assert await blobs.partial_manifest(manifest.blob_id) is None
        assert result["blobChunksRemoved"] == 0
        path = blobs.files.path(chunks[0][1])
        os.utime(path, (now[0] - 3600, now[0] - 3600))
        assert (await blobs.collect_garbage(3600.0, set(), set()))["blobChunksRemoved"] == 1
