"""Manifests and the chunker: pure properties (no I/O)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, strategies as st

from trionode.blobs.manifest import (
    MAX_CHUNKS,
    MAX_MANIFEST_BYTES,
    VERSION,
    BlobTooLargeError,
    Chunker,
    InvalidManifestError,
    Manifest,
    decode_manifest,
    expected_chunks,
)


def chunk_all(data: bytes, chunk_size: int, cuts: list[int]) -> tuple[list[bytes], Manifest]:
    chunker = Chunker(chunk_size=chunk_size)
    chunks: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        chunks += [c for c, _ in chunker.feed(data[start:cut])]
        start = cut
    last, manifest = chunker.finish()
    if last is not None:
        chunks.append(last[0])
    return chunks, manifest


@given(st.data())
def test_chunking_is_independent_of_how_the_bytes_arrive(data: st.DataObject) -> None:
    blob = data.draw(st.binary(max_size=3000))
    chunk_size = data.draw(st.integers(1, 700))
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=10))
    chunks, manifest = chunk_all(blob, chunk_size, cuts)
    whole_chunks, whole = chunk_all(blob, chunk_size, [])
    assert manifest == whole
    assert chunks == whole_chunks
    assert b"".join(chunks) == blob
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert [hashlib.sha256(c).digest() for c in chunks] == manifest.chunks
    assert len(manifest.chunks) == expected_chunks(len(blob), chunk_size)
    assert [manifest.chunk_length(i) for i in range(len(chunks))] == [len(c) for c in chunks]


@given(st.binary(max_size=2000), st.integers(1, 300))
def test_encode_decode_round_trip_and_id(blob: bytes, chunk_size: int) -> None:
    _, manifest = chunk_all(blob, chunk_size, [])
    encoded = manifest.encode()
    assert decode_manifest(encoded, expected_id=manifest.blob_id) == manifest
    assert manifest.blob_id == hashlib.sha256(encoded).digest()


@given(st.binary(max_size=2000), st.integers(1, 300), st.integers(0, 2000), st.integers(0, 2000))
def test_chunk_range_covers_exactly_the_requested_bytes(
    blob: bytes, chunk_size: int, start: int, stop: int
) -> None:
    chunks, manifest = chunk_all(blob, chunk_size, [])
    pieces = [chunks[i][a:b] for i, a, b in manifest.chunk_range(start, stop)]
    assert b"".join(pieces) == blob[start:stop]
    assert all(pieces)


def test_different_content_different_id() -> None:
    _, a = chunk_all(b"a" * 10, 4, [])
    _, b = chunk_all(b"a" * 9 + b"b", 4, [])
    assert a.blob_id != b.blob_id


@given(st.binary(max_size=400))
def test_garbage_raises_only_invalid_manifest(data: bytes) -> None:
    try:
        manifest = decode_manifest(data)
    except InvalidManifestError:
        return
    # Whatever decoded is canonical and self-consistent.
    assert manifest.encode() == data
    assert len(manifest.chunks) == expected_chunks(manifest.size, manifest.chunk_size)


@given(st.data())
def test_mutated_manifests_never_pass_as_the_original(data: st.DataObject) -> None:
    _, manifest = chunk_all(data.draw(st.binary(min_size=1, max_size=500)), 64, [])
    encoded = bytearray(manifest.encode())
    at = data.draw(st.integers(0, len(encoded) - 1))
    encoded[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(InvalidManifestError):
        decode_manifest(bytes(encoded), expected_id=manifest.blob_id)


def test_inconsistent_and_oversized_manifests_are_refused() -> None:
    h = b"\x01" * 32
    lying = Manifest(version=VERSION, size=100, chunk_size=10, chunks=[h])
    with pytest.raises(InvalidManifestError, match="cannot hold"):
        decode_manifest(lying.encode())
    future = Manifest(version=VERSION + 1, size=1, chunk_size=10, chunks=[h])
    with pytest.raises(InvalidManifestError, match="version"):
        decode_manifest(future.encode())
    with pytest.raises(InvalidManifestError, match="exceeds"):
        decode_manifest(b"\x00" * (MAX_MANIFEST_BYTES + 1))
    too_many = Manifest(
        version=VERSION, size=MAX_CHUNKS + 1, chunk_size=1, chunks=[h] * (MAX_CHUNKS + 1)
    )
    with pytest.raises(InvalidManifestError):
        decode_manifest(too_many.encode())


def test_chunker_enforces_the_size_limit() -> None:
    chunker = Chunker(chunk_size=4, max_size=10)
    chunker.feed(b"x" * 10)
    with pytest.raises(BlobTooLargeError):
        chunker.feed(b"x")
