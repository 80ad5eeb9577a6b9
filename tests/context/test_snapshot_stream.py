"""The pages of a snapshot stream whose member hashes its state beside it (one resumed
after a cursor without its root, from a state not built) come from the hashing read
(`SnapshotStream.push` / `page`): in order, whole, each within its limits, and the read
never runs more than `AHEAD_RECORDS` / `AHEAD_BYTES` ahead of the stream."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from trionode.context.final_state import FinalSlot, SnapshotView
from trionode.context.snapshot_state import AHEAD_BYTES, AHEAD_RECORDS, SnapshotStream
from trionode.errors import LocalProtocolError


def _stream(first: list[bytes], after: bytes | None) -> SnapshotStream:
    stream = SnapshotStream()
    view = SnapshotView(FinalSlot(), lambda _: None, None, 0, {})
    stream.open(view, first, after, resumed=True)
    assert stream.needs_hashing
    assert stream.shared
    return stream


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.integers(0, 2 * AHEAD_RECORDS), min_size=1, max_size=6),
    size=st.integers(1, 1000),
    max_records=st.integers(1, 5000),
    max_bytes=st.integers(1, 2 * AHEAD_BYTES),
)
def test_pages_come_from_the_hashing_read_in_order_within_bounds(
    chunks: list[int], size: int, max_records: int, max_bytes: int
) -> None:
    ids = [i.to_bytes(4, "big") for i in range(1, sum(chunks) + 1)]
    records = [i * (size // 4 + 1) for i in ids]

    async def main() -> None:
        stream = _stream([b"first"], b"\x00\x00\x00\x00")
        most = 0

        async def hash_read() -> None:
            nonlocal most
            at = 0
            for n, count in enumerate(chunks):
                await stream.push(
                    ids[at : at + count], records[at : at + count], last=n == len(chunks) - 1
                )
                most = max(most, len(stream.read))
                at += count

        sent: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hash_read)
            cursor: bytes | None = b"\x00\x00\x00\x00"
            while cursor is not None:
                page, cursor = await stream.page(cursor, max_records, max_bytes)
                assert len(page) <= max_records
                assert len(page) <= 1 or sum(map(len, page)) <= max_bytes
                assert page or cursor is None
                if cursor is not None:
                    assert cursor == ids[len(sent) + len(page) - 1]
                sent += page
        assert sent == records
        assert most <= AHEAD_RECORDS + max(chunks)

    trio.run(main)


async def test_a_page_out_of_order_is_a_local_error() -> None:
    stream = _stream([b"first"], b"\x01")
    with pytest.raises(LocalProtocolError):
        await stream.page(b"\x02", 10, 1000)
