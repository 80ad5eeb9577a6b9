"""The shape every background network service's ``run`` shares: start its loops in one
nursery it owns, report started, and cancel them when the node shuts down."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio

Loop = tuple[Callable[[], Awaitable[object]], str]
"""A loop to run and its task name (prefixed with the owner's name)."""


async def run_loops(
    owner: str,
    loops: Sequence[Loop],
    shutdown_requested: trio.Event | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``loops`` until ``shutdown_requested`` is set (or until cancelled, if None).

    Started as soon as every loop is scheduled. A loop that raises ends the others and the
    exception propagates to the caller's nursery, as with any owned task.
    """
    async with trio.open_nursery() as nursery:
        for loop, name in loops:
            nursery.start_soon(loop, name=f"{owner}:{name}")
        task_status.started()
        if shutdown_requested is not None:
            await shutdown_requested.wait()
            nursery.cancel_scope.cancel(reason="node shutting down")
