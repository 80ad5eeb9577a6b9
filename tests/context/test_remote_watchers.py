"""Watchers that only deltas from peers can concern (the app follower, the eager blob
fetcher) are not woken by this node's own writes (issue #16: each woke twice per write)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import trio
import trio.testing

from tests.replication.cluster_helpers import LIMIT, call, share, wait_converged, write
from tests.replication.helpers import install
from trionode.context.events import Change, ContextEvent, EventHub, Subscription
from trionode.testing import open_cluster, open_test_node


def test_a_remote_only_watcher_sees_every_origin_but_local() -> None:
    hub = EventHub()
    everything = hub.watch()
    remote = hub.watch(remote_only=True)
    origins = ["local", "remote", "sync", "auth", "local"]
    for origin in origins:
        hub.publish(context_id="c", delta_id="d", root_hash="r", heads=[], events=[], origin=origin)

    def drain(sub: Subscription) -> list[str]:
        seen: list[str] = []
        while True:
            try:
                event = sub.receive.receive_nowait()
            except trio.WouldBlock:
                return seen
            assert isinstance(event, ContextEvent)
            seen.append(event.origin)

    assert drain(everything) == origins
    assert drain(remote) == ["remote", "sync", "auth"]
    remote.close()
    hub.publish(context_id="c", delta_id="d", root_hash="r", heads=[], events=[], origin="x")
    assert drain(everything) == ["x"]


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


async def test_local_writes_do_not_wake_the_app_follower_or_the_blob_fetcher(
    tmp_path: Path,
) -> None:
    async with open_test_node(tmp_path / "a", api=False) as test_node:
        node = test_node.node
        context = (await node.contexts.create(await install(node))).context_id
        await trio.testing.wait_all_tasks_blocked()
        steps = _Steps()
        trio.lowlevel.add_instrument(steps)
        try:
            for i in range(5):
                args = json.dumps({"key": f"k{i}", "value": "v"})
                await node.contexts.execute(context, "set", args)
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(steps)
        watchers = ("AppFollower._follow", "BlobFetcher._watch")
        woken = {name: n for name, n in steps.steps.items() if name.endswith(watchers)}
        assert woken == {}
        assert steps.steps  # (the instrument saw the writes' own steps)


def test_a_remote_only_watcher_hears_of_events_shown_early_once_they_are_durable() -> None:
    hub = EventHub()
    everything = hub.watch()
    remote = hub.watch(remote_only=True)

    def change(delta_id: str) -> Change:
        return Change("c", delta_id, "r", [], [], "remote")

    def drain(sub: Subscription) -> list[str]:
        seen: list[str] = []
        while True:
            try:
                event = sub.receive.receive_nowait()
            except trio.WouldBlock:
                return seen
            assert isinstance(event, ContextEvent)
            seen.append(event.delta_id)

    kept = hub.reserve([change("a"), change("b")])
    hub.show_early(kept[:1])
    assert (drain(everything), drain(remote)) == (["a"], [])
    hub.settle(kept, durable=True, early=1)
    assert (drain(everything), drain(remote)) == (["b"], ["a", "b"])
    lost = hub.reserve([change("c")])
    hub.show_early(lost)
    hub.settle(lost, durable=False, early=1)
    assert (drain(everything), drain(remote)) == (["c"], [])


def test_a_watcher_hears_only_the_events_it_wants() -> None:
    hub = EventHub()
    wanted = {"b", "d"}
    remote = hub.watch(remote_only=True, wants=lambda event: event.delta_id in wanted)
    everything = hub.watch(wants=lambda event: event.delta_id != "c")
    for delta_id in "abcd":
        hub.publish(
            context_id="c", delta_id=delta_id, root_hash="r", heads=[], events=[], origin="remote"
        )
    kept = hub.reserve(
        [Change("c", "e", "r", [], [], "remote"), Change("c", "b", "r", [], [], "x")]
    )
    hub.show_early(kept[:1])
    hub.settle(kept, durable=True, early=1)

    def drain(sub: Subscription) -> list[str]:
        seen: list[str] = []
        while True:
            try:
                event = sub.receive.receive_nowait()
            except trio.WouldBlock:
                return seen
            assert isinstance(event, ContextEvent)
            seen.append(event.delta_id)

    assert drain(remote) == ["b", "d", "b"]
    assert drain(everything) == ["a", "b", "d", "e", "b"]


async def test_received_data_deltas_wake_the_app_follower_and_blob_fetcher_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Once each has found nothing to do for a context (its app installed, its blob policy
    not eager), further data deltas received for it do not wake them (issue #16); the app
    moving on still does (tests/context/test_upgrade.py)."""
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context = await share(cluster, [0, 1])
            await write(a, context, "set", key="first", value="v")
            await wait_converged(cluster, [a, b], context)
            await trio.testing.wait_all_tasks_blocked()
            steps = _Steps()
            trio.lowlevel.add_instrument(steps)
            try:
                for i in range(5):
                    await write(a, context, "set", key=f"k{i}", value="v")
                await wait_converged(cluster, [a, b], context)
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert await call(b, context, "get", key="k4") == "v"
            watchers = ("AppFollower._follow", "BlobFetcher._watch")
            woken = {name: n for name, n in steps.steps.items() if name.endswith(watchers)}
            assert woken == {}
            assert steps.steps["delta-processor"]  # (b applied them meanwhile)
