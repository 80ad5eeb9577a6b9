"""Blob manifests and the chunker: pure code, no I/O (DESIGN §9).

A blob is cut into chunks of `CHUNK_SIZE` bytes (the last one shorter); each chunk is named
by its SHA-256. The **manifest** lists the blob's size, the chunk size and the ordered chunk
hashes; the **blob id** is the SHA-256 of the manifest's canonical encoding. So an id pins
down every byte, yet a receiver can check each chunk on its own as it arrives, long before
the whole blob is there, and keep what it verified across interruptions.

The encoding is msgpack of a fixed-order array (`[version, size, chunk_size, [hashes...]]`);
`decode_manifest` accepts only the canonical form (it re-encodes and compares), so one blob
has exactly one id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Annotated, Final

import msgspec

from trionode.errors import TrionodeError

CHUNK_SIZE: Final = 1024 * 1024
"""Chunk size of every blob this node creates (part of the blob id, so not a setting)."""
MAX_CHUNK_SIZE: Final = 4 * 1024 * 1024
"""Largest chunk size accepted in a manifest from elsewhere."""
MAX_CHUNKS: Final = 65536
"""Chunks in one manifest: 64 GiB at 1 MiB chunks, and a manifest of at most ~2.2 MB."""
MAX_MANIFEST_BYTES: Final = 16 + MAX_CHUNKS * 34
VERSION: Final = 1
HASH_SIZE: Final = 32

Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_SIZE, max_length=HASH_SIZE)]


class BlobError(TrionodeError):
    """A blob operation failed (base of the blob errors)."""


class InvalidManifestError(BlobError):
    """Bytes that claim to be a manifest are not a valid, canonical one."""


class BlobNotFoundError(BlobError):
    """No complete blob with this id is stored here."""


class BlobTooLargeError(BlobError):
    """A blob would exceed the size limit."""


class Manifest(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    version: int
    size: Annotated[int, msgspec.Meta(ge=0)]
    chunk_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_SIZE)]
    chunks: Annotated[list[Hash], msgspec.Meta(max_length=MAX_CHUNKS)]

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @property
    def blob_id(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

    def chunk_length(self, index: int) -> int:
        """The byte length of chunk `index` (only the last one may be shorter)."""
        if not 0 <= index < len(self.chunks):
            raise IndexError(index)
        if index < len(self.chunks) - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (len(self.chunks) - 1)

    def chunk_range(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """For the byte range [start, stop): (chunk index, offset in it, end in it), in order."""
        start = max(start, 0)
        stop = min(stop, self.size)
        while start < stop:
            index = start // self.chunk_size
            offset = start - index * self.chunk_size
            end = min(self.chunk_size, stop - index * self.chunk_size)
            yield index, offset, end
            start = index * self.chunk_size + end


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Manifest)


def expected_chunks(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def decode_manifest(data: bytes, *, expected_id: bytes | None = None) -> Manifest:
    """Parse and validate a manifest; InvalidManifestError for anything else.

    With `expected_id`, the bytes must also hash to that blob id.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidManifestError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
    if expected_id is not None and hashlib.sha256(data).digest() != expected_id:
        raise InvalidManifestError("manifest does not hash to the requested blob id")
    try:
        manifest = _DECODER.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidManifestError(f"malformed manifest: {exc}") from None
    if manifest.version != VERSION:
        raise InvalidManifestError(f"unsupported manifest version {manifest.version}")
    if len(manifest.chunks) != expected_chunks(manifest.size, manifest.chunk_size):
        raise InvalidManifestError(
            f"{len(manifest.chunks)} chunks cannot hold {manifest.size} bytes "
            f"in chunks of {manifest.chunk_size}"
        )
    if manifest.encode() != data:
        raise InvalidManifestError("manifest is not in canonical form")
    return manifest


def chunk_hash(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


class Chunker:
    """Cuts a stream of bytes into chunks and builds the manifest, holding at most one chunk.

    `feed` returns the chunks it completed (data and hash, in order); `finish` returns the
    last, shorter chunk (if any) and the manifest.
    """

    def __init__(self, *, chunk_size: int = CHUNK_SIZE, max_size: int | None = None) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be 1..{MAX_CHUNK_SIZE}")
        self._chunk_size = chunk_size
        self._max_size = min(max_size or chunk_size * MAX_CHUNKS, chunk_size * MAX_CHUNKS)
        self._buffer = bytearray()
        self._hashes: list[bytes] = []
        self.size = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
        self.size += len(data)
        if self.size > self._max_size:
            raise BlobTooLargeError(f"blob exceeds the limit of {self._max_size} bytes")
        self._buffer += data
        done: list[tuple[bytes, bytes]] = []
        while len(self._buffer) >= self._chunk_size:
            chunk = bytes(self._buffer[: self._chunk_size])
            del self._buffer[: self._chunk_size]
            done.append(self._emit(chunk))
        return done

    def finish(self) -> tuple[tuple[bytes, bytes] | None, Manifest]:
        last = self._emit(bytes(self._buffer)) if self._buffer else None
        self._buffer.clear()
        manifest = Manifest(
            version=VERSION, size=self.size, chunk_size=self._chunk_size, chunks=self._hashes
        )
        return last, manifest

    def _emit(self, chunk: bytes) -> tuple[bytes, bytes]:
        digest = chunk_hash(chunk)
        self._hashes.append(digest)
        return chunk, digest
