"""Deltas over gossip between real nodes on loopback (SCENARIOS 1, 5, 16, 17, 18, 20)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from trionode.context.manager import ContextError
from trionode.dag.delta import decode_delta, verify_delta
from trionode.node import Node

from .helpers import call, connect_all, install, open_nodes, share, wait_converged

pytestmark = pytest.mark.real_network


async def test_join_then_linear_propagation(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_nodes(3, tmp_path) as (a, b, c):
            await connect_all([a, b, c])
            context = await share([a, b, c])
            written = await a.contexts.execute(context, "set", '{"key": "k", "value": "v1"}')
            assert written.delta_id is not None

            # kv_store's handler for the Inserted event runs on B and C (not on the author),
            # one delta each on top of A's write, some time after they applied it.
            async def handled() -> bool:
                calls = [await call(node, context, "handler_calls") for node in (a, b, c)]
                return calls == [2, 2, 2]

            await wait_converged([a, b, c], context, also=handled)
            for node in (a, b, c):
                assert await call(node, context, "get", key="k") == "v1"
            # Whether one handler's delta had the other's as parent is a race: one head or
            # two, each with A's write as its parent or grandparent.
            _, heads, _ = await a.contexts.state(context)
            assert 1 <= len(heads) <= 2
            for head in heads:
                assert written.delta_id in await _ancestors(a, context, head, depth=2)
            record = await b.contexts.get(context)
            assert {m.role for m in record.members} == {"admin", "member"}
            assert len(record.members) == 3


async def _ancestors(node: Node, context: bytes, delta: bytes, *, depth: int) -> set[bytes]:
    """The ids up to `depth` parent links above `delta`."""
    found: set[bytes] = set()
    level = [delta]
    for _ in range(depth):
        parents: list[bytes] = []
        for delta_id in level:
            wire = await node.contexts.read_delta(context, delta_id)
            assert wire is not None
            parents += verify_delta(decode_delta(wire), context_id=context).parents
        found.update(parents)
        level = parents
    return found


async def test_concurrent_writes_merge_and_collapse(tmp_path: Path) -> None:
    # chat has no event handlers, so nothing writes behind the test's back.
    with trio.fail_after(60):
        async with open_nodes(2, tmp_path) as (a, b):
            await connect_all([a, b])
            context = await share([a, b], app="chat")
            await wait_converged([a, b], context)
            _, common, _ = await a.contexts.state(context)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(call, a, context, "post", text="from a"))
                nursery.start_soon(partial(call, b, context, "post", text="from b"))
            await wait_converged([a, b], context)
            _, before, _ = await a.contexts.state(context)
            assert len(before) == 2  # both concurrent writes are heads, on both nodes
            assert before != common
            result = await a.contexts.execute(context, "post", '{"text": "after"}')
            assert result.delta_id is not None
            wire = await a.contexts.read_delta(context, result.delta_id)
            assert wire is not None
            assert (
                verify_delta(decode_delta(wire), context_id=context).parents == before
            )  # the write merges them
            await wait_converged([a, b], context)
            _, heads, _ = await b.contexts.state(context)
            assert heads == [result.delta_id]
            texts = [m["text"] for m in await call(b, context, "messages")]
            assert sorted(texts[:2]) == ["from a", "from b"]
            assert texts[2] == "after"


async def test_non_member_relays_but_learns_nothing(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_nodes(3, tmp_path) as (a, b, outsider):
            await connect_all([a, b, outsider])
            context = await share([a, b])
            await call(a, context, "set", key="secret", value="s")
            await wait_converged([a, b], context)
            assert context not in outsider.contexts.known_ids()
            with pytest.raises(ContextError):
                await outsider.contexts.get(context)


async def test_invitations_are_checked(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_nodes(3, tmp_path) as (a, b, c):
            await connect_all([a, b, c])
            for node in (a, b, c):
                await install(node)
            context = await share([a])
            text = await a.joins.invite(context)
            await b.joins.join(text)
            with pytest.raises(ContextError, match="already used"):
                await c.joins.join(text)  # one-time
            forged = text[:-6] + ("A" if text[-6] != "A" else "B") + text[-5:]
            with pytest.raises(ContextError):
                await c.joins.join(forged)
            expired = await a.joins.invite(context, expires_in=-1.0)  # expired on issue
            with pytest.raises(ContextError, match="expired"):
                await c.joins.join(expired)
            assert context not in c.contexts.known_ids()


async def _next_event_or_tick(node: Node) -> None:
    # The rejection leaves no applied delta to wait for: re-check on the next pubsub
    # heartbeat tick (0.2 s here), an event of the node rather than an arbitrary sleep.
    await node.pubsub.wait_heartbeat()


async def test_removed_member_cannot_read_new_deltas(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_nodes(3, tmp_path) as (a, b, d):
            await connect_all([a, b, d])
            context = await share([a, b, d])
            await call(a, context, "set", key="old", value="1")
            await wait_converged([a, b, d], context)
            d_member, _ = await d.contexts.member_key(context)
            await a.contexts.remove_member(context, d_member)
            new = await a.contexts.execute(context, "set", '{"key": "new", "value": "2"}')
            assert new.delta_id is not None
            await wait_converged([a, b], context)
            assert await call(b, context, "get", key="new") == "2"
            assert await call(b, context, "get", key="old") == "1"
            rotated = (await a.contexts.get(context)).key_id
            assert rotated in await b.contexts.keys(context)  # b learned the rotated key
            # d received the removal (sealed with the old key) but cannot open the new key,
            # so the new delta is refused there, and d can no longer call.
            registry = d.metrics.registry
            with trio.fail_after(10):
                while not registry.get_sample_value(
                    "trionode_deltas_total", {"outcome": "rejected_key"}
                ):
                    await _next_event_or_tick(d)
            assert await d.contexts.read_delta(context, new.delta_id) is None
            assert rotated not in await d.contexts.keys(context)
            with pytest.raises(ContextError, match=r"not \(or no longer\) a member"):
                await call(d, context, "get", key="old")
