"""Hypothesis helpers shared by the wire tests: arbitrary chunking of byte strings."""

from __future__ import annotations

from hypothesis import strategies as st


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the (unsorted, possibly repeated) offsets in ``cuts``."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    chunks: list[bytes] = []
    start = 0
    for point in [*points, len(data)]:
        chunks.append(data[start:point])
        start = point
    return [c for c in chunks if c]


def chunkings(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """Every way of cutting ``data`` into non-empty chunks, including byte-by-byte."""
    if len(data) <= 1:
        return st.just([data] if data else [])
    byte_by_byte = st.just([data[i : i + 1] for i in range(len(data))])
    random_cuts = st.lists(st.integers(1, len(data) - 1), max_size=min(len(data), 64)).map(
        lambda cuts: split_at(data, cuts)
    )
    return st.one_of(byte_by_byte, random_cuts)
