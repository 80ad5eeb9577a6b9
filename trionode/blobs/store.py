"""The blob store: chunk files under `<home>/blobs`, metadata in LMDB's `blob_meta` column.

```
<home>/blobs/chunks/ab/abcdef…   one file per chunk, named by its hash (keyed hash when
                                 encrypted, so names do not reveal contents)
<home>/blobs/tmp/                chunk files being written; renamed into place when whole
blob_meta  b"b" + blob id        BlobRecord: the manifest of a complete blob
           b"p" + blob id        PartialRecord: a fetch in progress (its manifest)
           b"x" + context + id   the blob belongs to that context (peers fetch it through it)
           b"y" + id + context   the same link, found from the blob
           b"r" + context + id   a reference link: an app in that context attached the blob,
                                 or this node fetched it because the state references it;
                                 it authorises serving like b"x" but keeps the blob only
                                 while that context's state references it
           b"s" + id + context   the same reference link, found from the blob
           b"n" + blob id        pinned: never collected
           b"u" + blob id        when GC first found the blob unreferenced (wall clock)
```

Atomicity: a chunk file appears under its name only once it is complete (write to `tmp/`,
then rename), and a blob appears under its id only once every chunk is in place (the
`BlobRecord` is written last, in one LMDB transaction with whatever else changes). A crash
or a cancelled upload leaves at most orphan chunk files, which garbage collection removes.

Memory is bounded by one chunk per operation whatever the blob's size: uploads go through
the `Chunker`, reads yield one chunk (or part of one) at a time.

Integrity: every chunk is checked against its hash when it is read back (plain files) or
authenticated by the AEAD bound to its hash (encrypted files), so a damaged file is an
error, never wrong bytes. When `store.encrypted` is on, chunk files are sealed with
XChaCha20-Poly1305 under a key derived from the datastore key.

File I/O runs in worker threads like LMDB calls (on the Trio thread when the datastore is
`inline`, for in-process clusters under `autojump_clock`).
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from trionode.blobs.manifest import (
    CHUNK_SIZE,
    BlobNotFoundError,
    BlobTooLargeError,
    Chunker,
    InvalidManifestError,
    Manifest,
    chunk_hash,
    decode_manifest,
)
from trionode.errors import ReadOnlyError, StorageError
from trionode.store.encryption import ValueCipher
from trionode.store.lmdb_store import Column
from trionode.store.store import AsyncStore, BytesCodec, MsgpackCodec, Table, WriteBatch

R = TypeVar("R")

BLOBS_DIR: Final = "blobs"
_COMPLETE: Final = b"b"
_PARTIAL: Final = b"p"
_LINK: Final = b"x"
_LINKED_BY: Final = b"y"
_REF_LINK: Final = b"r"
_REF_LINKED_BY: Final = b"s"
_PIN: Final = b"n"
_UNREFERENCED: Final = b"u"
_CHUNK_AAD: Final = "blob-chunk"


class BlobRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    manifest: bytes
    created_at: float
    name: str | None = None


class PartialRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    manifest: bytes
    started_at: float
    name: str | None = None


_RECORDS = Table(Column.BLOB_META, BytesCodec(), MsgpackCodec(BlobRecord))
_PARTIALS = Table(Column.BLOB_META, BytesCodec(), MsgpackCodec(PartialRecord))
_FLAGS = Table(Column.BLOB_META, BytesCodec(), BytesCodec())


@attrs.frozen
class BlobInfo:
    blob_id: bytes
    size: int
    chunks: int
    created_at: float
    name: str | None
    pinned: bool
    contexts: list[bytes]


class BlobMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.added = Counter("trionode_blobs_added", "Blobs stored (uploaded)", registry=registry)
        self.bytes_added = Counter(
            "trionode_blob_bytes_added", "Bytes of uploaded blobs", registry=registry
        )
        self.chunks_written = Counter(
            "trionode_blob_chunks_written", "Chunk files written", registry=registry
        )
        self.chunks_damaged = Counter(
            "trionode_blob_chunks_damaged",
            "Stored chunk files that failed verification when read (removed)",
            registry=registry,
        )
        self.deleted = Counter("trionode_blobs_deleted", "Blobs deleted", registry=registry)
        self.collected = Counter(
            "trionode_gc_blobs_removed",
            "Unreferenced blobs, stale partial fetches and orphan chunk files removed by GC",
            ["kind"],
            registry=registry,
        )


class ChunkFiles:
    """Blocking access to chunk files (called through `BlobStore._io`)."""

    def __init__(self, root: Path, cipher: ValueCipher | None) -> None:
        self.root = root
        self._chunks = root / "chunks"
        self._tmp = root / "tmp"
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._seal = None if cipher is None else ValueCipher(cipher.subkey("blob-chunks"))
        self._name_key = None if cipher is None else cipher.subkey("blob-chunk-names")

    def path(self, digest: bytes) -> Path:
        if self._name_key is None:
            name = digest.hex()
        else:
            name = hashlib.blake2b(digest, key=self._name_key, digest_size=32).hexdigest()
        return self._chunks / name[:2] / name

    def has(self, digest: bytes) -> bool:
        return self.path(digest).is_file()

    def write(self, digest: bytes, data: bytes) -> bool:
        """Store a chunk whose hash the caller checked; False if it was already there."""
        final = self.path(digest)
        if final.is_file():
            return False
        stored = data if self._seal is None else self._seal.seal(_CHUNK_AAD, digest, data)
        tmp = self._tmp / f"{digest.hex()[:16]}.{secrets.token_hex(8)}"
        try:
            with tmp.open("wb") as f:
                f.write(stored)
            final.parent.mkdir(exist_ok=True)
            tmp.replace(final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write blob chunk: {exc.strerror}") from None
        return True

    def read(self, digest: bytes) -> bytes | None:
        """The chunk's bytes, verified; None if absent or damaged (a damaged file is removed)."""
        path = self.path(digest)
        try:
            stored = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read blob chunk: {exc.strerror}") from None
        if self._seal is None:
            data: bytes | None = stored if chunk_hash(stored) == digest else None
        else:
            try:
                data = self._seal.open(_CHUNK_AAD, digest, stored)
            except StorageError:
                data = None
        if data is None:
            path.unlink(missing_ok=True)
        return data

    def remove(self, digest: bytes) -> None:
        self.path(digest).unlink(missing_ok=True)

    def all_names(self) -> list[tuple[str, float]]:
        """Every chunk file (name, modification time)."""
        out: list[tuple[str, float]] = []
        for sub in self._chunks.iterdir():
            out.extend((f.name, f.stat().st_mtime) for f in sub.iterdir())
        return out

    def name(self, digest: bytes) -> str:
        return self.path(digest).name

    def remove_name(self, name: str) -> None:
        (self._chunks / name[:2] / name).unlink(missing_ok=True)

    def clear_tmp(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True, exist_ok=True)


class BlobStore:
    """Content-addressed blobs. One per node; made in `node.py`."""

    def __init__(
        self,
        store: AsyncStore,
        home: Path,
        metrics: BlobMetrics,
        *,
        max_size: int,
        wall_clock: Callable[[], float] = time.time,
        chunk_size: int = CHUNK_SIZE,
        read_only: bool = False,
    ) -> None:
        self._store = store
        self.read_only = read_only
        """`node.mode = "read-only"`: uploads (`add`) are refused; chunks fetched for
        contexts this node follows are still kept (`put_chunk`)."""
        self.files = ChunkFiles(home / BLOBS_DIR, store.raw.cipher)
        self.metrics = metrics
        self.max_size = max_size
        self.wall_clock = wall_clock
        """Unix time for records and GC marks (tests on a virtual clock replace it)."""
        self._chunk_size = chunk_size
        self._limiter = trio.CapacityLimiter(4)
        self.files.clear_tmp()  # leftovers of a crash: never part of any blob

    async def _io(self, fn: Callable[..., R], *args: Any) -> R:
        if self._store.inline:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- adding ----------------------------------------------------------------------------

    async def add(
        self,
        source: AsyncIterable[bytes],
        *,
        context_id: bytes | None = None,
        name: str | None = None,
    ) -> BlobInfo:
        """Store the bytes `source` yields as a blob; visible under its id only when whole.

        BlobTooLargeError past `max_size` (what was written so far is orphaned, then collected);
        ReadOnlyError on a read-only node.
        """
        if self.read_only:
            raise ReadOnlyError("uploading a blob")
        chunker = Chunker(chunk_size=self._chunk_size, max_size=self.max_size)
        try:
            async for piece in source:
                for data, digest in chunker.feed(piece):
                    await self._write_chunk(digest, data)
        except BlobTooLargeError:
            # Close a generator source now rather than at garbage collection.
            if isinstance(source, AsyncGenerator):
                with trio.CancelScope(shield=True):
                    await source.aclose()
            raise
        last, manifest = chunker.finish()
        if last is not None:
            await self._write_chunk(last[1], last[0])
        blob_id = manifest.blob_id
        batch = WriteBatch()
        existing = await self._store.get(_RECORDS, _COMPLETE + blob_id)
        if existing is None:
            record = BlobRecord(manifest.encode(), self.wall_clock(), name)
            batch.put(_RECORDS, _COMPLETE + blob_id, record)
        if context_id is not None:
            _link(batch, context_id, blob_id)
        batch.delete(_FLAGS, _PARTIAL + blob_id)
        await self._store.write(batch)
        self.metrics.added.inc()
        self.metrics.bytes_added.inc(manifest.size)
        info = await self.info(blob_id)
        assert info is not None
        return info

    async def add_bytes(self, data: bytes, **kwargs: Any) -> BlobInfo:
        """Small blobs already in memory (tests, app bundles)."""

        async def one() -> AsyncIterator[bytes]:
            for i in range(0, len(data), self._chunk_size):
                yield data[i : i + self._chunk_size]
            await trio.lowlevel.checkpoint()

        return await self.add(one(), **kwargs)

    async def _write_chunk(self, digest: bytes, data: bytes) -> None:
        if await self._io(self.files.write, digest, data):
            self.metrics.chunks_written.inc()

    # -- partial blobs (fetches) -----------------------------------------------------------

    async def begin_partial(self, manifest: Manifest, name: str | None = None) -> None:
        """Remember a fetch in progress (its manifest survives restarts)."""
        blob_id = manifest.blob_id
        if await self._store.get(_PARTIALS, _PARTIAL + blob_id) is None:
            record = PartialRecord(manifest.encode(), self.wall_clock(), name)
            await self._store.put(_PARTIALS, _PARTIAL + blob_id, record)

    async def partial_manifest(self, blob_id: bytes) -> Manifest | None:
        record = await self._store.get(_PARTIALS, _PARTIAL + blob_id)
        if record is None:
            return None
        return _manifest_of(blob_id, _PARTIALS.values.encode(record))

    async def missing_chunks(self, manifest: Manifest) -> list[int]:
        """Indices of the chunks not stored yet (a chunk shared by indices counts for all)."""

        def check() -> list[int]:
            present: dict[bytes, bool] = {}
            return [
                i
                for i, digest in enumerate(manifest.chunks)
                if not present.setdefault(digest, self.files.has(digest))
            ]

        return await self._io(check)

    async def put_chunk(self, digest: bytes, data: bytes) -> bool:
        """Keep a chunk received from elsewhere, after checking its hash; False if it lies."""
        if chunk_hash(data) != digest:
            return False
        await self._write_chunk(digest, data)
        return True

    async def complete(
        self, manifest: Manifest, *, context_id: bytes | None = None, by_reference: bool = False
    ) -> BlobInfo:
        """Make a fetched blob visible under its id (every chunk must be here), linked to
        `context_id` (by reference: see the module docstring)."""
        if await self.missing_chunks(manifest):
            raise StorageError("cannot complete a blob whose chunks are not all stored")
        blob_id = manifest.blob_id
        partial = await self._store.get(_PARTIALS, _PARTIAL + blob_id)
        batch = WriteBatch()
        if await self._store.get(_RECORDS, _COMPLETE + blob_id) is None:
            name = None if partial is None else partial.name
            batch.put(
                _RECORDS,
                _COMPLETE + blob_id,
                BlobRecord(manifest.encode(), self.wall_clock(), name),
            )
        if context_id is not None:
            _link(batch, context_id, blob_id, by_reference=by_reference)
        batch.delete(_FLAGS, _PARTIAL + blob_id)
        await self._store.write(batch)
        info = await self.info(blob_id)
        assert info is not None
        return info

    # -- reading ---------------------------------------------------------------------------

    async def manifest(self, blob_id: bytes) -> Manifest | None:
        record = await self._store.get(_RECORDS, _COMPLETE + blob_id)
        if record is None:
            return None
        return _manifest_of(blob_id, _RECORDS.values.encode(record))

    async def has(self, blob_id: bytes) -> bool:
        return await self._store.get(_RECORDS, _COMPLETE + blob_id) is not None

    async def info(self, blob_id: bytes) -> BlobInfo | None:
        record = await self._store.get(_RECORDS, _COMPLETE + blob_id)
        if record is None:
            return None
        manifest = await self.manifest(blob_id)
        assert manifest is not None
        return await self._info(blob_id, record, manifest)

    async def _info(self, blob_id: bytes, record: BlobRecord, manifest: Manifest) -> BlobInfo:
        pinned = await self._store.get(_FLAGS, _PIN + blob_id) is not None
        contexts: list[bytes] = []
        for prefix in (_LINKED_BY, _REF_LINKED_BY):
            for key, _ in await self._store.scan(_FLAGS, prefix=prefix + blob_id):
                if (context := key[1 + len(blob_id) :]) not in contexts:
                    contexts.append(context)
        return BlobInfo(
            blob_id=blob_id,
            size=manifest.size,
            chunks=len(manifest.chunks),
            created_at=record.created_at,
            name=record.name,
            pinned=pinned,
            contexts=contexts,
        )

    async def list_blobs(self) -> list[BlobInfo]:
        rows = await self._store.scan(_RECORDS, prefix=_COMPLETE)
        out: list[BlobInfo] = []
        for key, record in rows:
            blob_id = key[1:]
            manifest = _manifest_of(blob_id, _RECORDS.values.encode(record))
            out.append(await self._info(blob_id, record, manifest))
        return out

    async def read(
        self, blob_id: bytes, start: int = 0, stop: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes of [start, stop), one chunk (or part of one) at a time.

        BlobNotFoundError if the blob is not stored; StorageError if a chunk is damaged.
        """
        manifest = await self.manifest(blob_id)
        if manifest is None:
            raise BlobNotFoundError(f"blob {blob_id.hex()} is not stored here")
        return self._read(manifest, start, manifest.size if stop is None else stop)

    async def _read(self, manifest: Manifest, start: int, stop: int) -> AsyncIterator[bytes]:
        for index, offset, end in manifest.chunk_range(start, stop):
            data = await self.read_chunk(manifest.chunks[index])
            if data is None:
                raise StorageError(f"chunk {index} of a stored blob is missing or damaged")
            yield data[offset:end] if (offset, end) != (0, len(data)) else data

    async def read_chunk(self, digest: bytes) -> bytes | None:
        """A verified chunk, or None (absent, or damaged and now removed)."""
        had = await self._io(self.files.has, digest)
        data = await self._io(self.files.read, digest)
        if data is None and had:
            self.metrics.chunks_damaged.inc()
        return data

    # -- contexts and pins -----------------------------------------------------------------

    async def link(self, context_id: bytes, blob_id: bytes, *, by_reference: bool = False) -> None:
        """The blob belongs to the context: its members may fetch it from here. A plain link
        keeps the blob while the context lives; a reference link only while the context's
        state references it (see `collect_garbage`)."""
        batch = WriteBatch()
        _link(batch, context_id, blob_id, by_reference=by_reference)
        await self._store.write(batch)

    async def linked(self, context_id: bytes, blob_id: bytes) -> bool:
        """Linked to the context, either way."""
        for prefix in (_LINK, _REF_LINK):
            if await self._store.get(_FLAGS, prefix + context_id + blob_id) is not None:
                return True
        return False

    async def pin(self, blob_id: bytes, *, pinned: bool = True) -> None:
        if pinned:
            await self._store.put(_FLAGS, _PIN + blob_id, b"")
        else:
            await self._store.delete(_FLAGS, _PIN + blob_id)

    # -- deleting --------------------------------------------------------------------------

    async def delete(self, blob_id: bytes) -> bool:
        """Forget a blob and remove its chunks that no other blob uses. False if unknown."""
        manifest = await self.manifest(blob_id)
        if manifest is None:
            return False
        batch = WriteBatch()
        batch.delete(_FLAGS, _COMPLETE + blob_id)
        batch.delete(_FLAGS, _PIN + blob_id)
        batch.delete(_FLAGS, _UNREFERENCED + blob_id)
        await self._unlink_all(batch, blob_id)
        await self._store.write(batch)
        used = await self._used_chunks()
        for digest in set(manifest.chunks) - used:
            await self._io(self.files.remove, digest)
        self.metrics.deleted.inc()
        return True

    # -- garbage collection ----------------------------------------------------------------

    async def collect_garbage(
        self,
        retention: float,
        live_contexts: set[bytes],
        busy: set[bytes],
        referenced: frozenset[bytes] | set[bytes] = frozenset(),
    ) -> dict[str, int]:
        """Remove what nothing has referenced for `retention` seconds.

        A complete blob is referenced while it is pinned, linked (plainly) to a context this
        node still holds, or in `referenced` (the blobs the live contexts' states reference);
        an unreferenced one is marked with the time GC first saw it so, and
        removed once the mark is `retention` old (a new reference clears the mark). A
        partial fetch is dropped when it started `retention` ago and is not running
        (`busy`); chunk files that belong to no blob or partial fetch go once their file is
        `retention` old (younger ones may belong to an upload in progress).
        """
        now = self.wall_clock()
        removed = {"blobsRemoved": 0, "blobPartialsRemoved": 0, "blobChunksRemoved": 0}
        pinned = {k[1:] for k, _ in await self._store.scan(_FLAGS, prefix=_PIN)}
        linked: set[bytes] = set()
        for key, _ in await self._store.scan(_FLAGS, prefix=_LINK):
            if key[1:33] in live_contexts:
                linked.add(key[33:])
        marks = dict(await self._store.scan(_FLAGS, prefix=_UNREFERENCED))
        batch = WriteBatch()
        for key, _ in await self._store.scan(_FLAGS, prefix=_COMPLETE):
            blob_id = key[1:]
            mark = marks.get(_UNREFERENCED + blob_id)
            if blob_id in pinned or blob_id in linked or blob_id in referenced:
                if mark is not None:
                    batch.delete(_FLAGS, _UNREFERENCED + blob_id)
                continue
            if mark is None:
                batch.put(_FLAGS, _UNREFERENCED + blob_id, _time(now))
            elif now - _untime(mark) >= retention:
                batch.delete(_FLAGS, _UNREFERENCED + blob_id)
                batch.delete(_FLAGS, _COMPLETE + blob_id)
                await self._unlink_all(batch, blob_id)
                removed["blobsRemoved"] += 1
        for key, record in await self._store.scan(_PARTIALS, prefix=_PARTIAL):
            if key[1:] not in busy and now - record.started_at >= retention:
                batch.delete(_FLAGS, key)
                removed["blobPartialsRemoved"] += 1
        if len(batch):
            await self._store.write(batch)
        used = {self.files.name(d) for d in await self._used_chunks()}
        for name, mtime in await self._io(self.files.all_names):
            if name not in used and now - mtime >= retention:
                await self._io(self.files.remove_name, name)
                removed["blobChunksRemoved"] += 1
        self.metrics.collected.labels("blob").inc(removed["blobsRemoved"])
        self.metrics.collected.labels("partial").inc(removed["blobPartialsRemoved"])
        self.metrics.collected.labels("chunk").inc(removed["blobChunksRemoved"])
        return removed

    async def _unlink_all(self, batch: WriteBatch, blob_id: bytes) -> None:
        for by_reference, prefix in ((False, _LINKED_BY), (True, _REF_LINKED_BY)):
            for key, _ in await self._store.scan(_FLAGS, prefix=prefix + blob_id):
                _unlink(batch, key[1 + len(blob_id) :], blob_id, by_reference=by_reference)

    async def _used_chunks(self) -> set[bytes]:
        """Chunks of every complete or partial blob."""
        used: set[bytes] = set()
        for prefix in (_COMPLETE, _PARTIAL):
            for key, value in await self._store.scan(_FLAGS, prefix=prefix):
                used.update(_manifest_of(key[1:], value).chunks)
        return used


def _time(unix: float) -> bytes:
    return struct.pack(">d", unix)


def _untime(raw: bytes) -> float:
    return float(struct.unpack(">d", raw)[0]) if len(raw) == 8 else 0.0


def _link(
    batch: WriteBatch, context_id: bytes, blob_id: bytes, *, by_reference: bool = False
) -> None:
    link, linked_by = (_REF_LINK, _REF_LINKED_BY) if by_reference else (_LINK, _LINKED_BY)
    batch.put(_FLAGS, link + context_id + blob_id, b"")
    batch.put(_FLAGS, linked_by + blob_id + context_id, b"")


def _unlink(
    batch: WriteBatch, context_id: bytes, blob_id: bytes, *, by_reference: bool = False
) -> None:
    link, linked_by = (_REF_LINK, _REF_LINKED_BY) if by_reference else (_LINK, _LINKED_BY)
    batch.delete(_FLAGS, link + context_id + blob_id)
    batch.delete(_FLAGS, linked_by + blob_id + context_id)


class _AnyRecord(msgspec.Struct, frozen=True):
    """What complete and partial records share."""

    manifest: bytes


_ANY_RECORD = MsgpackCodec(_AnyRecord)


def _manifest_of(blob_id: bytes, value: bytes) -> Manifest:
    try:
        return decode_manifest(_ANY_RECORD.decode(value).manifest, expected_id=blob_id)
    except InvalidManifestError as exc:
        raise StorageError(f"stored manifest of a blob is unreadable: {exc}") from None
