"""The undo log is bounded (`auth.max_nonfinal_bytes`, context/finality.py): while a silent
admin holds finality back, a context stops taking *new* non-final data deltas — a local
call gets `FinalityBehind`, a received delta is refused without penalty and fetched again
later — and takes them again once finality moves. The lag metrics and the admin API's
finality status name the admin that holds it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from tests.replication.cluster_helpers import (
    LIMIT,
    b58,
    call,
    deltas,
    install,
    metric,
    share,
    wait_converged,
    write,
)
from trionode.api.context_errors import http_status, jsonrpc_code
from trionode.client import ApiError
from trionode.config import FileConfig, parse_config
from trionode.context.errors import FinalityBehind
from trionode.context.finality import finality_json
from trionode.errors import ConfigError
from trionode.node import Node
from trionode.testing import open_cluster, open_test_node

BOUND = 3000


def small_undo_log(config: FileConfig) -> FileConfig:
    return replace(config, auth=replace(config.auth, max_nonfinal_bytes=BOUND))


async def member(node: Node, context: bytes) -> str:
    return b58((await node.contexts.member_key(context))[0])


async def status(node: Node, context: bytes) -> dict[str, Any]:
    replica = await node.contexts.replica(context)
    return finality_json(
        replica.authority,
        node.contexts.replicas.wall_clock(),
        max_nonfinal_bytes=node.contexts.processor.max_nonfinal_bytes,
    )


async def write_until_refused(node: Node, context: bytes) -> tuple[int, FinalityBehind]:
    for i in range(200):
        try:
            await write(node, context, "set_title", title=f"title {i}")
        except FinalityBehind as exc:
            return i, exc
    raise AssertionError("200 writes and the undo log never filled")


async def test_a_full_undo_log_refuses_local_writes_until_finality_moves(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(
            3, tmp_path, configure=small_undo_log, clock_skews=[0.0, 0.0, 0.0]
        ) as cluster:
            a, b, c = cluster
            context = await share(cluster, [0, 1, 2], "notes", roles={1: "admin"})
            silent = await member(b, context)
            await cluster.partition([1])  # B's acks and deltas stop reaching A and C
            written, refused = await write_until_refused(c, context)
            assert written >= 2
            assert http_status(refused) == 503
            assert jsonrpc_code(refused) == -32006
            # Nothing of the refused call was kept; views still run.
            assert await call(c, context, "title") == f"title {written - 1}"
            await trio.sleep(120)
            await cluster.settle()
            # A has acknowledged everything meanwhile: B is the one finality waits for.
            with pytest.raises(FinalityBehind, match=f"once admin {silent} acknowledges them"):
                await write(c, context, "set_title", title="still refused")
            # The operator sees how far finality trails and which admin holds it back.
            shown = await status(c, context)
            assert shown["nonFinalBytes"] >= BOUND
            assert shown["maxNonFinalBytes"] == BOUND
            oldest = shown["oldestUnackedAdmin"]
            assert isinstance(oldest, dict)
            assert oldest["admin"] == silent
            assert oldest["seconds"] >= 120
            ctx = b58(context)
            assert metric(c, "trionode_finality_lag_deltas", context=ctx) >= written
            assert metric(c, "trionode_finality_lag_seconds", context=ctx) >= 120
            assert metric(c, "trionode_finality_nonfinal_bytes", context=ctx) >= BOUND
            unacked = "trionode_finality_oldest_unacked_admin_seconds"
            assert metric(c, unacked, context=ctx, admin=silent) >= 120
            # Membership operations are never held back (the remedy must stay possible).
            c_key = (await c.contexts.member_key(context))[0]
            await a.contexts.change_members(context, [(c_key, "member")])
            # B comes back, catches up and acks: finality moves and C writes again.
            await cluster.heal()
            await trio.sleep(b.config.sync.ack_interval * 2 + 1)
            await cluster.settle()
            assert (await status(c, context))["nonFinalBytes"] < BOUND
            await write(c, context, "set_title", title="after")
            await wait_converged(cluster, list(cluster), context)
            assert await call(b, context, "title") == "after"
            assert metric(c, "trionode_finality_lag_seconds", context=ctx) < 60


async def test_received_deltas_over_the_bound_are_refused_without_penalty_and_taken_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(3, tmp_path) as cluster:
            a, _, c = cluster
            context = await share(cluster, [0, 1, 2], "notes", roles={1: "admin"})
            await cluster.partition([1])
            # Only A's node bounds its undo log tightly; C writes on.
            a.contexts.processor.max_nonfinal_bytes = BOUND
            ids = [await write(c, context, "set_title", title=f"title {i}") for i in range(12)]
            await trio.sleep(30)
            await cluster.settle()
            refused = deltas(a, "refused_undo_full")
            assert refused >= 1
            assert await a.contexts.read_delta(context, ids[-1]) is None
            # Refused, not rejected: nothing counted against C, C still connected.
            assert metric(a, "trionode_deltas_total", outcome="rejected_invalid") == 0
            assert not [
                k for k in ("author", "role", "key", "malformed") if deltas(a, f"rejected_{k}")
            ]
            assert cluster.is_connected(0, 2)
            assert (await status(a, context))["nonFinalBytes"] >= BOUND
            # B returns and acks: A's finality moves, and the refused deltas come by sync.
            await cluster.heal()
            await wait_converged(cluster, list(cluster), context)
            for node in cluster:
                assert await call(node, context, "title") == "title 11"
            assert await a.contexts.read_delta(context, ids[-1]) is not None


@pytest.mark.parametrize("value", [0, -1, 1000])
def test_the_bound_is_checked_with_the_config(value: int) -> None:
    with pytest.raises(ConfigError, match=r"`auth.max_nonfinal_bytes`: Expected `int` >= 65536"):
        parse_config({"auth": {"max_nonfinal_bytes": value}}, source="config.toml")


async def test_a_json_rpc_caller_hears_finality_behind(tmp_path: Path) -> None:
    """Through the API on loopback: an admin whose node never comes online (a key granted
    admin and never used) holds finality back; calls end with -32006, views still run."""
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "a", configure=small_undo_log) as test_node:
            node = test_node.node
            context = (await node.contexts.create(await install(node, "notes"))).context_id
            absent = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
            await node.contexts.change_members(context, [(absent, "admin")])
            await write_until_refused(node, context)
            async with test_node.client() as client:
                with pytest.raises(ApiError) as refused:
                    await client.call(b58(context), "set_title", {"title": "one more"})
                assert refused.value.status == -32006
                assert f"once admin {b58(absent)} acknowledges them" in str(refused.value)
                assert (await client.call(b58(context), "title", {})) is not None
