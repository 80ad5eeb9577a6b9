"""A gossip message or sync frame whose msgpack names a string that is not UTF-8 is
malformed input like any other: msgspec raises `UnicodeDecodeError` for it (not a
`DecodeError`), which once escaped the decoders and ended the node's network event task."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from trionode.context.replication import topic_for
from trionode.errors import RemoteProtocolError
from trionode.testing import open_cluster
from trionode.wire.messages import decode_gossip, decode_sync

from .cluster_helpers import LIMIT, metric, share, wait_converged, write

NOT_UTF8_TAG = b"\x81\xa4type\xa2\x80\x80"  # {"type": <2 bytes that are not UTF-8>}


@pytest.mark.parametrize("decode", [decode_gossip, decode_sync])
def test_a_string_that_is_not_utf8_is_the_typed_error(decode: object) -> None:
    assert callable(decode)
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode(NOT_UTF8_TAG)


async def test_such_gossip_is_counted_and_the_node_carries_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster.nodes
            context = await share(cluster, [0, 1])
            await cluster.wait_mesh(topic_for(context))
            before = metric(b, "trionode_deltas_total", outcome="rejected_malformed")
            a.pubsub.publish(topic_for(context), NOT_UTF8_TAG)
            await write(a, context, "set", key="after", value="it")
            await wait_converged(cluster, [a, b], context)
            assert metric(b, "trionode_deltas_total", outcome="rejected_malformed") == before + 1
