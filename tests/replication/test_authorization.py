"""Removal removes: the attacks of issue #10 on in-process clusters (DESIGN §7.1).

Each test forges what a hostile (removed, demoted) member would send, or arranges the
concurrency with partitions, and checks that every node reaches the same verdict.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.replication.cluster_helpers import (
    LIMIT,
    body_of,
    call,
    drain,
    forge,
    gossip,
    install,
    member_key,
    metric,
    share,
    subscribe,
    wait_converged,
    write,
)
from trionode.auth.model import Kind, Verdict
from trionode.context import invitations as inv
from trionode.context.authority import action
from trionode.context.join import MAX_MESSAGE
from trionode.context.manager import ContextError
from trionode.context.replication import topic_for
from trionode.dag.delta import DeltaBody, SignedDelta
from trionode.net.framed import FramedStream, StreamLimits
from trionode.node import Node
from trionode.testing import Cluster, open_cluster


async def forged_set(
    writer: Node,
    author_node: Node,
    context: bytes,
    key: str,
    value: str,
    *,
    parents: list[bytes] | None = None,
) -> SignedDelta:
    """A kv_store `set` body (taken from a second context of `writer`: entity ids do not
    depend on the context) forged as `author_node`'s member."""
    app_id = (await writer.contexts.get(context)).application_id
    donor = (await writer.contexts.create(app_id)).context_id
    body = await body_of(writer, donor, await write(writer, donor, "set", key=key, value=value))
    author = await member_key(author_node, context)
    return await forge(author_node, context, author, body, parents=parents)


async def member_id(node: Node, context: bytes) -> bytes:
    return (await node.contexts.member_key(context))[0]


async def verdict(node: Node, context: bytes, delta_id: bytes) -> Verdict | None:
    loaded = await node.contexts.replica(context)
    return loaded.authority.verdicts.get(delta_id)


async def roles(node: Node, context: bytes) -> dict[bytes, str]:
    return await node.contexts.roles(context)


async def heads(node: Node, context: bytes) -> list[bytes]:
    return (await node.contexts.state(context))[1]


async def test_removed_admin_cannot_regrant_itself(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], roles={1: "admin"})
            b_key = await member_key(b, context)
            b_member = b_key.public_key().public_bytes_raw()
            before = await heads(b, context)
            await cluster.partition([1])
            removal = await a.contexts.remove_member(context, b_member)
            await wait_converged(cluster, [a, c], context)
            # Concurrent with its removal (on the heads it had): filtered everywhere.
            concurrent = await forge(
                b,
                context,
                b_key,
                _empty(),
                parents=before,
                auth=action(Kind.GRANT, member=b_member, role="admin"),
            )
            got = await b.contexts.receive(context, concurrent.encode())
            assert not got.rejected, got.rejected
            await cluster.heal()
            await cluster.wait_mesh(topic_for(context))
            gossip(b, context, concurrent.encode())
            await wait_converged(cluster, [a, c], context)
            for node in (a, c):
                assert b_member not in await roles(node, context)
                resolution = (await node.contexts.replica(context)).authority.resolution()
                assert resolution.verdict_of_op(concurrent.id) is Verdict.FILTERED
            # After learning of its removal, a grant is rejected outright.
            removal_wire = await a.contexts.read_delta(context, removal.id)
            assert removal_wire is not None
            await b.contexts.receive(context, removal_wire)
            later = await forge(
                b, context, b_key, _empty(), auth=action(Kind.GRANT, member=b_member, role="admin")
            )
            result = await a.contexts.receive(context, later.encode())
            assert result.rejected
            assert "not a member" in result.rejected[0][1]
            # And it gets nothing by sync: no state, no deltas under the new key.
            with pytest.raises(ContextError, match="not a member"):
                await b.replicator.fetch(cluster.peer_ids[0], context, set(await heads(a, context)))


async def test_demoted_and_removed_members_cannot_write(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2])
            c_member = await member_id(c, context)
            b_member = await member_id(b, context)
            await a.contexts.change_members(context, [(c_member, "read-only")])
            await a.contexts.remove_member(context, b_member)
            await wait_converged(cluster, [a, c], context)
            await cluster.settle()
            # Written on top of the demotion / removal: invalid, no effect anywhere.
            by_c = await forged_set(a, c, context, "c", "x")
            by_b = await forged_set(a, b, context, "b", "x")
            for forged in (by_c, by_b):
                result = await a.contexts.receive(context, forged.encode())
                assert result.rejected, "written where its author could not write"
                gossip(c, context, forged.encode())
            await wait_converged(cluster, [a, c], context)
            for node in (a, c):
                entries = await call(node, context, "entries")
                assert "c" not in entries
                assert "b" not in entries
                assert await node.contexts.read_delta(context, by_c.id) is None
                assert await node.contexts.read_delta(context, by_b.id) is None


async def test_write_concurrent_with_removal_is_filtered_whichever_arrives_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path) as cluster:
            a, b, victim, late = cluster
            context = await share(cluster, [0, 1, 2])
            gone_key = await member_key(victim, context)
            gone = gone_key.public_key().public_bytes_raw()
            before = await heads(a, context)
            # The victim's write, concurrent with its removal: B sees the write first.
            write_delta = await forged_set(a, victim, context, "late", "x", parents=before)
            await cluster.partition([0], [1])
            events = subscribe(b, context)
            await b.contexts.receive(context, write_delta.encode())
            assert (await call(b, context, "entries")).get("late") == "x"
            await a.contexts.remove_member(context, gone)
            await a.contexts.receive(context, write_delta.encode())  # A: removal first
            assert "late" not in await call(a, context, "entries")
            await cluster.heal()
            await wait_converged(cluster, [a, b], context)
            for node in (a, b):
                assert "late" not in await call(node, context, "entries")
                assert await verdict(node, context, write_delta.id) is Verdict.FILTERED
            # B's subscribers were told what was reverted.
            reverted = [
                e for event in drain(events) for e in event.events if e["name"] == "reverted"
            ]
            assert any(write_delta.id.hex() in e["payload"]["reverted"] for e in reverted)
            # A node joining later reaches the same verdict from the signed history.
            await install(late, "kv_store")
            await late.joins.join(await a.joins.invite(context))
            await wait_converged(cluster, [a, b, late], context)
            assert "late" not in await call(late, context, "entries")


async def test_mutual_admin_removal_resolves_alike(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], roles={1: "admin"})
            a_member = await member_id(a, context)
            b_member = await member_id(b, context)
            await cluster.partition([0], [1])
            await a.contexts.remove_member(context, b_member)
            await b.contexts.remove_member(context, a_member)
            await cluster.heal()
            await wait_converged(cluster, [a, c], context)
            # Both removals stand; no admin would be left, so the creator (the most senior
            # admin) stays admin; B is out.
            for node in (a, c):
                assert (await roles(node, context)).get(a_member) == "admin"
                assert b_member not in await roles(node, context)
            await write(c, context, "set", key="after", value="1")
            await wait_converged(cluster, [a, c], context)


async def test_concurrent_readd_does_not_resurrect(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], roles={1: "admin"})
            c_member = await member_id(c, context)
            await cluster.partition([0], [1])
            await a.contexts.remove_member(context, c_member)
            await b.contexts.change_members(context, [(c_member, "admin")])
            await cluster.heal()
            await wait_converged(cluster, [a, b], context)
            for node in (a, b):
                assert c_member not in await roles(node, context)


async def test_concurrent_removals_get_distinct_keys_and_converge(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path) as cluster:
            a, b, c, d = cluster
            context = await share(cluster, [0, 1, 2, 3], roles={1: "admin"})
            c_member = await member_id(c, context)
            d_member = await member_id(d, context)
            await cluster.partition([0, 2], [1, 3])
            await a.contexts.remove_member(context, c_member)
            await b.contexts.remove_member(context, d_member)
            key_a = (await a.contexts.get(context)).key_id
            key_b = (await b.contexts.get(context)).key_id
            assert key_a != key_b
            # B writes under its key: when A receives it after the merge, A's event handler
            # writes, and no key A holds follows both removals: it must rotate first.
            await write(b, context, "set", key="b-side", value="1")
            ran = metric(a, "trionode_handler_runs_total", outcome="ok")
            await cluster.heal()
            await wait_converged(cluster, [a, b], context)
            assert metric(a, "trionode_handler_runs_total", outcome="ok") > ran
            loaded = await a.contexts.replica(context)
            assert any(o.kind is Kind.ROTATE for o in loaded.authority.graph.ops.values())
            # Neither key follows both removals: the next writer rotates, and both read it.
            await write(a, context, "set", key="k", value="1")
            await wait_converged(cluster, [a, b], context)
            assert await call(b, context, "entries") == await call(a, context, "entries")
            assert (await a.contexts.get(context)).key_id not in (key_a, key_b)
            keys_a = await a.contexts.keys(context)
            assert keys_a == await b.contexts.keys(context)
            for node in (c, d):
                held = await node.contexts.keys(context)
                assert (await a.contexts.get(context)).key_id not in held


async def spend(joiner: Node, via: Node, cluster: Cluster, text: str) -> inv.JoinResponse:
    """Present an invitation to `via` directly (as a hostile joiner may, whichever admin
    it names), with a fresh member key; returns the answer."""
    signed, invitation = inv.parse_invitation(text)
    key = Ed25519PrivateKey.generate()
    peer = cluster.peer_ids[cluster.nodes.index(via)]
    conn = joiner.host.connections.get(peer) or await joiner.host.connect(
        cluster.address(cluster.nodes.index(via))
    )
    _, stream = await conn.new_stream([inv.JOIN_PROTOCOL])
    async with stream:
        proof = key.sign(inv.proof_message(conn.noise.remote.handshake_hash, invitation.id))
        request = inv.JoinRequest(
            invitation=signed, member=key.public_key().public_bytes_raw(), proof=proof
        )
        framed = FramedStream(stream, StreamLimits(), max_frame=MAX_MESSAGE)
        await framed.send_frame(inv.encode(request))
        return inv.decode_response(await framed.receive_frame())


async def test_one_invitation_at_two_admins(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path) as cluster:
            a, b, c, d = cluster
            context = await share(cluster, [0, 1], roles={1: "admin"})
            # Sequential: spent at A, then refused at B once B has the admission.
            once = await a.joins.invite(context)
            first = await spend(c, a, cluster, once)
            assert first.ok
            await wait_converged(cluster, [a, b], context)
            second = await spend(d, b, cluster, once)
            assert not second.ok
            assert "already used" in second.error
            # Concurrent: two admins admit two different keys with one secret: it leaked,
            # so neither admission stands, on every node.
            twice = await a.joins.invite(context)
            await cluster.partition([0, 2], [1, 3])
            at_a = await spend(c, a, cluster, twice)
            at_b = await spend(d, b, cluster, twice)
            assert at_a.ok
            assert at_b.ok
            members_before = len(await roles(a, context))
            await cluster.heal()
            await wait_converged(cluster, [a, b], context)
            assert await roles(a, context) == await roles(b, context)
            assert len(await roles(a, context)) == members_before - 1
            # The filtered admissions were handed the keys of the moment: the next write
            # moves to a key they never get.
            leaked = (await a.contexts.get(context)).key_id
            await write(a, context, "set", key="after", value="1")
            await wait_converged(cluster, [a, b], context)
            fresh = (await a.contexts.get(context)).key_id
            assert fresh != leaked
            assert fresh in await b.contexts.keys(context)


def _empty() -> DeltaBody:
    return DeltaBody(records=[], events=[], root_hash=bytes(32))
