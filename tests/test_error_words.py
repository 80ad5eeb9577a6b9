"""Errors a user reads name what went wrong, even when the exception carries no text:
Trio's timeouts and broken streams print as empty strings, and a join that timed out dialing
its inviter used to end in "cannot reach the inviter <peer>: " and nothing after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from tests.replication.cluster_helpers import LIMIT, install
from trionode.context.errors import PeerFailed
from trionode.context.invitations import JOIN_PROTOCOL
from trionode.errors import describe
from trionode.net.host import Connection, StreamHandler
from trionode.node import Node
from trionode.testing import open_cluster


class Quiet(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (trio.TooSlowError(), "timed out"),
        (trio.BrokenResourceError(), "the connection broke"),
        (None, "no address to try"),
        (Quiet(), "Quiet"),
        (OSError("no route to host"), "no route to host"),
    ],
)
def test_describe_names_silent_errors(error: BaseException | None, words: str) -> None:
    assert describe(error) == words


async def _invite(a: Node, b: Node) -> tuple[bytes, str]:
    """A kv_store context on `a`, and an invitation to it for `b` (which has the app)."""
    app = await install(a, "kv_store")
    await install(b, "kv_store")
    context = (await a.contexts.create(app)).context_id
    return context, await a.joins.invite(context)


async def test_a_join_that_cannot_reach_its_inviter_says_why(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context, invitation = await _invite(a, b)
            await cluster.partition([0])
            with pytest.raises(PeerFailed) as failed:
                await b.joins.join(invitation)
            message = str(failed.value)
            assert message.startswith(f"cannot reach the inviter {cluster.peer_ids[0]}: ")
            assert message.split(": ", 1)[1].strip()
            assert context not in b.contexts.known_ids()


async def _never_answers(stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
    await trio.sleep_forever()


async def _hangs_up(stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
    await stream.receive_some()
    await trio.aclose_forcefully(stream)


@pytest.mark.parametrize(
    ("inviter", "words"),
    [(_never_answers, "timed out"), (_hangs_up, "ended")],
)
async def test_an_inviter_that_does_not_answer_the_join_is_a_peer_failure(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    inviter: StreamHandler,
    words: str,
) -> None:
    """A reset or a silent join stream is a PeerFailed (502 at the API) that says so, and
    the joiner is left as it was: no context, so trying again is possible."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context, invitation = await _invite(a, b)
            a.host.set_handler(JOIN_PROTOCOL, inviter)
            with pytest.raises(PeerFailed) as failed:
                await b.joins.join(invitation)
            assert str(failed.value).startswith(
                f"the inviter {cluster.peer_ids[0]} did not answer the join: "
            )
            assert words in str(failed.value)
            assert context not in b.contexts.known_ids()
