"""More concurrent heads than a delta header may name (issue #16's 100-node row): a node
whose context has more heads than `MAX_PARENTS` (64; each member adds at most one, so it
takes 65 writing at once) writes deltas that every peer decodes and applies, and the heads
left out are taken by the next delta.

Before, such a node named every head, a delta no peer could decode: gossip dropped it,
every fetch that met it failed ("malformed delta header"), and everything written on it
waited as pending everywhere until evicted. The 65 members here are keys A admitted; their
concurrent deltas are signed with those keys and handed to both nodes, as gossip would."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trionode.context import invitations as inv
from trionode.dag.delta import MAX_PARENTS, DeltaBody
from trionode.testing import open_cluster

from .cluster_helpers import forge, header_of, no_sync_timers, share, wait_converged, write

WRITERS = MAX_PARENTS + 6


async def test_a_node_with_more_heads_than_a_delta_names_writes_deltas_its_peers_take(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_cluster(2, tmp_path, configure=no_sync_timers) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1], app="chat")
        keys = [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(WRITERS)]
        for key in keys:
            signed, _ = inv.parse_invitation(await a.joins.invite(context))
            await a.contexts.admit(
                context,
                inv.SignedInvitation(invitation=signed.invitation, signature=signed.signature),
                key.public_key().public_bytes_raw(),
                "member",
            )
        await wait_converged(cluster, [a, b], context)
        _, before, _ = await b.contexts.state(context)
        # B's own newest delta: concurrent with the members' below, so it stays a head.
        own = await write(b, context, "post", text="mine")
        await wait_converged(cluster, [a, b], context)
        body = DeltaBody(records=[], events=[], root_hash=bytes(32))
        wires = [(await forge(b, context, key, body, parents=before)).encode() for key in keys]
        for node in (a, b):
            for result in await node.contexts.receive_many(context, wires):
                assert not isinstance(result, Exception), result
        _, heads, _ = await b.contexts.state(context)
        assert len(heads) == WRITERS + 1
        # B writes on them: 64 parents, its own newest among them whatever its id.
        first = await write(b, context, "post", text="on 64 of them")
        parents = (await header_of(b, context, first)).parents
        assert len(parents) == MAX_PARENTS
        assert own in parents
        # A takes it by gossip; the next delta takes the heads left out.
        await wait_converged(cluster, [a, b], context)
        second = await write(b, context, "post", text="on the rest")
        assert len((await header_of(b, context, second)).parents) == WRITERS + 1 - MAX_PARENTS + 1
        await wait_converged(cluster, [a, b], context)
        _, heads, _ = await a.contexts.state(context)
        assert heads == [second]
