"""A snapshot carries final state plus the non-final deltas, signed, never the serving
peer's unsigned non-final state (local-first-auth.md §5.5).

The attack: member B applied C's write, which A's concurrent removal of C will filter; a
node joining through B before B learns of the removal must not take that write as
unsigned state (it could never undo it, and a tree comparison would spread it back)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.replication.cluster_helpers import (
    APPS,
    LIMIT,
    call,
    share,
    wait_converged,
    write,
)
from trionode.auth.model import Verdict
from trionode.testing import open_cluster


async def test_a_joiner_judges_the_non_final_deltas_itself(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path) as cluster:
            a, b, c, joiner = cluster
            context = await share(cluster, [0, 1, 2], "notes", roles={1: "admin"})
            await write(a, context, "insert", pos=0, text="honest ")
            await wait_converged(cluster, [a, b, c], context)
            c_member = (await c.contexts.member_key(context))[0]
            await cluster.partition([0])
            evil = await write(c, context, "insert", pos=0, text="EVIL ")
            await wait_converged(cluster, [b, c], context)
            await a.contexts.remove_member(context, c_member)
            # The joiner is admitted by B, whose state holds C's write (not final: A has
            # not acked it), and takes its snapshot from B.
            await joiner.applications.install(str(APPS / "notes"))
            await joiner.joins.join(await b.joins.invite(context))
            await wait_converged(cluster, [b, joiner], context)
            authority = (await joiner.contexts.replica(context)).authority
            assert authority.verdicts.get(evil) is Verdict.ACCEPTED, "came as a signed delta"
            await cluster.heal()
            await wait_converged(cluster, [a, b, joiner], context)
            for node in (a, b, joiner):
                assert await call(node, context, "text") == "honest "
                assert (await node.contexts.replica(context)).authority.verdicts.get(
                    evil
                ) is Verdict.FILTERED
            roots = {(await node.contexts.state(context))[0] for node in (a, b, joiner)}
            assert len(roots) == 1
