"""A peer whose delta answer breaks `/trionode/sync/2`: an ancestor nobody asked for, a
forged one, more than were asked for. The fetch ends there, nothing bad is applied, and the
failure is counted by its reason (`trionode_delta_fetch_failures_total{reason}`: issue #16's
scale run needs to see which check fails). The peer is not disconnected: an honest node of
an older version could send such an answer (a delta with more parents than a header may
name, see tests/sync/test_wide_dags.py), and a disconnect turns one failed fetch into
connection churn."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from msgspec.structs import replace

from trionode.context.replication import SESSION_ERRORS
from trionode.net.host import Connection
from trionode.node import Node
from trionode.sync.driver import SyncChannel
from trionode.sync.machines import Responder
from trionode.testing import open_cluster
from trionode.wire.messages import DeltaResponse, SyncAuth, SyncMessage

from .cluster_helpers import metric, no_sync_timers, share, wait_converged, write

Tamper = Callable[[DeltaResponse, list[bytes]], DeltaResponse]


def _unrelated(answer: DeltaResponse, old: list[bytes]) -> DeltaResponse:
    # A genuine, signed delta of the context, but a parent of nothing in the answer.
    return replace(answer, ancestors=[old[0], *answer.ancestors])


def _forged(answer: DeltaResponse, _old: list[bytes]) -> DeltaResponse:
    wire = answer.ancestors[0]
    return replace(answer, ancestors=[wire[:-1] + bytes([wire[-1] ^ 1]), *answer.ancestors[1:]])


def _too_many(answer: DeltaResponse, old: list[bytes]) -> DeltaResponse:
    return replace(answer, ancestors=[*old * 1100, *answer.ancestors])


def _hostile(node: Node, tamper: Tamper, old: list[bytes]) -> None:
    """Make `node` tamper with every delta answer it serves."""
    server = node.replicator._server
    answer = server._answer

    async def tampering(
        channel: SyncChannel, conn: Connection, machine: Responder, auth: SyncAuth
    ) -> None:
        send = channel.send

        async def send_tampered(message: SyncMessage) -> None:
            if isinstance(message, DeltaResponse) and message.ancestors:
                message = tamper(message, old)
            await send(message)

        channel.send = send_tampered  # type: ignore[method-assign]
        await answer(channel, conn, machine, auth)

    server._answer = tampering  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        # The signed deltas that do belong in the answer are applied; the stray one never.
        (_unrelated, "unrequested"),
        (_forged, "remote_protocol_error"),
        (_too_many, "too_many_ids"),
    ],
)
async def test_a_bad_ancestor_answer_ends_the_fetch_and_is_counted_by_its_reason(
    tamper: Tamper,
    reason: str,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(2, tmp_path, configure=no_sync_timers) as cluster:
        a, b = cluster.nodes
        context = await share(cluster, [0, 1], app="chat")
        # (B's chain below grows on `second`: `first` is an ancestor, but a parent of none.)
        first = await write(b, context, "post", text="first")
        await write(b, context, "post", text="second")
        await wait_converged(cluster, [a, b], context)
        old = await b.contexts.read_delta(context, first)
        assert old is not None
        await cluster.partition([0])
        chain = [await write(b, context, "post", text=f"b{i}") for i in range(3)]
        await trio.sleep(10)  # past gossip's message cache: only a session brings them
        await cluster.heal()
        _hostile(b, tamper, [old])
        failures = "trionode_delta_fetch_failures_total"
        assert metric(a, failures, reason=reason) == 0
        if reason == "unrequested":
            await a.sync.sync_now(context, b.host.peer_id)  # (the rest of the answer is good)
        else:
            with pytest.raises(SESSION_ERRORS):
                await a.sync.sync_now(context, b.host.peer_id)
        assert metric(a, failures, reason=reason) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert b.host.peer_id in a.host.connections
        applied = await a.contexts.applied(context, [first, *chain])
        assert applied == ({first, *chain} if reason == "unrequested" else {first})
        # An honest answer later brings the chain, and counts no failure.
        b.replicator._server.__dict__.pop("_answer")
        await a.sync.sync_now(context, b.host.peer_id)
        assert set(await a.contexts.applied(context, chain)) == set(chain)
        assert metric(a, failures, reason=reason) == 1
