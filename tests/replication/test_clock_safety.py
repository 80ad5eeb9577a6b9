"""Clock safety (issue 10, part 5): no received stamp can stop local writes.

A member signs deltas stamped in the future — in the header, or in a record inside the
body — and delivers them to a node. Within `sync.max_clock_drift` they apply; further
ahead they wait as pending until the node's clock catches up; beyond drift +
`replication.pending_timeout` they are refused, counted and not stored. Whatever arrives,
the node's own writes keep working, also after a restart. A member flooding pending with
orphans only evicts its own deltas.

The node runs on an in-process network under `autojump_clock`; its wall clock is pinned to
Trio's clock so that an hour of waiting costs nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from msgspec.structs import replace

from trionode.config import FileConfig, NodeConfig
from trionode.context.manager import StateAheadError
from trionode.context.records import STATE
from trionode.crdt import (
    HEAD,
    ROOT_ID,
    CounterState,
    Element,
    Entity,
    Kind,
    RegisterState,
    Slot,
    TextState,
    Timestamp,
    encode_entity,
    ntp64_from_unix,
)
from trionode.crdt.hlc import NTP64_MAX
from trionode.dag.delta import DeltaBody, SignedDelta, seal_delta, verify_delta
from trionode.net.memory import MemoryNetwork
from trionode.node import Node, open_node
from trionode.store.store import WriteBatch
from trionode.testing import CLUSTER_PORT, cluster_file_config, make_test_config, open_cluster

from .cluster_helpers import APPS, LIMIT, call, deltas, share, wait_converged, write

HOUR = 3600.0
FAR = NTP64_MAX


@attrs.define
class Setup:
    home: Path
    config: NodeConfig
    context: bytes = b""
    member: Ed25519PrivateKey = attrs.field(factory=Ed25519PrivateKey.generate)
    """A writer of the context that lives on no node: the test signs as it."""
    base: float = attrs.field(factory=time.time)
    """Wall time at Trio time 0: the node's wall clock is `base + trio.current_time()`."""

    @property
    def author(self) -> bytes:
        """`member`'s id."""
        return self.member.public_key().public_bytes_raw()


def _configure(tweak: Callable[[FileConfig], FileConfig] | None) -> Callable[..., FileConfig]:
    def settings(file: FileConfig) -> FileConfig:
        file = cluster_file_config(file)
        file = tweak(file) if tweak is not None else file
        listen = [f"/ip4/10.42.0.1/tcp/{CLUSTER_PORT}"]
        return replace(file, network=replace(file.network, listen=listen, bootstrap=[]))

    return settings


def _setup(tmp_path: Path, tweak: Callable[[FileConfig], FileConfig] | None = None) -> Setup:
    config, _ = make_test_config(tmp_path / "a", api=False, configure=_configure(tweak))
    return Setup(tmp_path / "a", replace(config, inline_store=True))


@asynccontextmanager
async def _running(setup: Setup) -> AsyncIterator[Node]:
    """Start (or restart) the node of `setup`, with a context and `setup.member` writing."""
    network = MemoryNetwork()
    try:
        async with open_node(setup.config, transport=network.transport()) as node:
            node.contexts.replicas.wall_clock = lambda: setup.base + trio.current_time()
            if not setup.context:
                app = await node.applications.install(str(APPS / "kv_store"))
                setup.context = (await node.contexts.create(app.application_id)).context_id
                await node.contexts.change_members(setup.context, [(setup.author, "member")])
            yield node
    finally:
        network.close()


def _now(setup: Setup, ahead: float = 0.0) -> int:
    return ntp64_from_unix(setup.base + trio.current_time() + ahead)


async def _sign(
    node: Node,
    setup: Setup,
    *,
    hlc: int,
    records: list[Entity] | None = None,
    parents: list[bytes] | None = None,
    author: Ed25519PrivateKey | None = None,
    after: SignedDelta | None = None,
) -> SignedDelta:
    """A delta by `setup.member` (or `author`) over the node's heads, sealed with the real
    functions under the context's current key (`after`: a parent the node lacks yet, whose
    version vector the new delta extends)."""
    context = setup.context
    record = await node.contexts.get(context)
    keys = await node.contexts.keys(context)
    if parents is None:
        parents = (await node.contexts.state(context))[1]
    author = author or setup.member
    if records is None:
        stamp = Timestamp(hlc, author.public_key().public_bytes_raw())
        records = [_register(b"from-the-member", stamp)]
    body = DeltaBody(records=[encode_entity(e) for e in records], events=[], root_hash=bytes(32))
    loaded = await node.contexts.replica(context)
    vv, _ = loaded.authority.merged_vv(parents)
    if after is not None:
        vv = dict(verify_delta(after, context_id=context).vv)
    return seal_delta(
        context_id=context,
        parents=parents,
        author=author,
        hlc=hlc,
        key_id=record.key_id,
        context_key=keys[record.key_id],
        body=body,
        seq=vv.get(author.public_key().public_bytes_raw()[:8], 0) + 1,
        vv=vv,
    )


def _register(name: bytes, stamp: Timestamp) -> Entity:
    return Entity(ROOT_ID, name, Kind.REGISTER, added=stamp, body=RegisterState(stamp, b'"x"'))


async def _local_write(node: Node, setup: Setup, value: str) -> None:
    args = json.dumps({"key": "mine", "value": value})
    result = await node.contexts.execute(setup.context, "set", args)
    assert result.delta_id is not None
    got = await node.contexts.execute(setup.context, "get", json.dumps({"key": "mine"}))
    assert got.result == value


async def _applied(node: Node, setup: Setup, delta_id: bytes) -> bool:
    return await node.contexts.read_delta(setup.context, delta_id) is not None


# -- a delta an hour ahead waits, then applies ------------------------------------------------


async def test_delta_an_hour_ahead_waits_until_the_clock_catches_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    setup = _setup(
        tmp_path,
        lambda f: replace(f, replication=replace(f.replication, pending_timeout=2 * HOUR)),
    )
    with trio.fail_after(3 * HOUR):
        async with _running(setup) as node:
            delta = await _sign(node, setup, hlc=_now(setup, ahead=HOUR))
            received = await node.contexts.receive(setup.context, delta.encode())
            assert received.applied == []
            assert received.refused == []
            assert (await node.contexts.state(setup.context))[2] == 1  # pending
            assert deltas(node, "deferred") == 1
            await _local_write(node, setup, "while it waits")  # never blocked

            await trio.sleep(HOUR - 10)  # still more than 5 s ahead
            assert not await _applied(node, setup, delta.id)
            assert (await node.contexts.state(setup.context))[2] == 1

            await trio.sleep(20)  # within drift now: the clock-wait task applied it
            assert await _applied(node, setup, delta.id)
            _root, heads, pending = await node.contexts.state(setup.context)
            assert pending == 0
            assert delta.id in heads
            await _local_write(node, setup, "after it applied")


async def test_waiting_delta_survives_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    setup = _setup(tmp_path)
    with trio.fail_after(HOUR):
        async with _running(setup) as node:
            delta = await _sign(node, setup, hlc=_now(setup, ahead=60))
            assert (await node.contexts.receive(setup.context, delta.encode())).applied == []
        async with _running(setup) as node:
            assert (await node.contexts.state(setup.context))[2] == 1
            await trio.sleep(60)
            assert await _applied(node, setup, delta.id)
            assert (await node.contexts.state(setup.context))[2] == 0


# -- the end of the 64-bit range, in the header or in the body -------------------------------


def _far_records(author: bytes, now: int) -> dict[str, Entity]:
    """One record per place an entity carries a stamp, each stamped 2^64-1 there."""
    far = Timestamp(FAR, author)
    ok = Timestamp(now, author)

    def text(elements: dict[Timestamp, Element[str]]) -> Entity:
        return Entity(ROOT_ID, b"t", Kind.TEXT, added=ok, body=TextState(elements))

    return {
        "register value": Entity(
            ROOT_ID, b"r", Kind.REGISTER, added=ok, body=RegisterState(far, b'"x"')
        ),
        "entity added": Entity(ROOT_ID, b"m", Kind.MAP, added=far),
        "entity tombstone": Entity(ROOT_ID, b"m", Kind.MAP, added=ok, removed=far),
        "counter run": Entity(
            ROOT_ID, b"c", Kind.COUNTER, added=ok, body=CounterState({author: Slot(far, 1, 0)})
        ),
        "sequence element id": text({far: Element(HEAD, "a", None, None)}),
        "sequence reference": text({ok: Element(far, "b", None, None)}),
        "sequence tombstone": text({ok: Element(HEAD, None, None, far)}),
    }


PLACES = list(_far_records(b"x", 0))


async def test_header_stamped_at_the_end_of_the_range_is_refused_and_writes_go_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    setup = _setup(tmp_path)
    with trio.fail_after(HOUR):
        async with _running(setup) as node:
            before = await node.contexts.state(setup.context)
            delta = await _sign(node, setup, hlc=FAR)
            received = await node.contexts.receive(setup.context, delta.encode())
            assert received.refused == [delta.id]
            assert received.applied == []
            assert deltas(node, "refused_ahead") == 1
            assert await node.contexts.state(setup.context) == before  # nothing stored
            await _local_write(node, setup, "one")
            # Not blacklisted: the same delta is judged again when it comes back.
            again = await node.contexts.receive(setup.context, delta.encode())
            assert again.refused == [delta.id]
            assert not again.duplicate
        async with _running(setup) as node:
            await _local_write(node, setup, "after a restart")


@pytest.mark.parametrize("place", PLACES)
async def test_record_stamped_at_the_end_of_the_range_is_refused_and_writes_go_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, place: str
) -> None:
    setup = _setup(tmp_path)
    with trio.fail_after(HOUR):
        async with _running(setup) as node:
            before = await node.contexts.state(setup.context)
            records = [_far_records(setup.author, _now(setup))[place]]
            delta = await _sign(node, setup, hlc=_now(setup), records=records)
            received = await node.contexts.receive(setup.context, delta.encode())
            assert received.refused == [delta.id]
            assert deltas(node, "refused_ahead") == 1
            assert await node.contexts.state(setup.context) == before
            await _local_write(node, setup, "one")
        async with _running(setup) as node:
            await _local_write(node, setup, "after a restart")


async def test_refused_delta_does_not_stop_its_descendants_for_good(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A child of a refused delta waits for it like for any missing parent (and expires)."""
    setup = _setup(tmp_path)
    with trio.fail_after(HOUR):
        async with _running(setup) as node:
            bad = await _sign(node, setup, hlc=FAR)
            child = await _sign(node, setup, hlc=_now(setup), parents=[bad.id])
            assert (await node.contexts.receive(setup.context, bad.encode())).refused
            received = await node.contexts.receive(setup.context, child.encode())
            assert received.missing == {bad.id}
            await _local_write(node, setup, "still fine")


# -- state is checked too --------------------------------------------------------------------


async def test_state_stamped_beyond_drift_is_refused_whole(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    setup = _setup(tmp_path)
    with trio.fail_after(HOUR):
        async with _running(setup) as node:
            before = await node.contexts.state(setup.context)
            fine = _register(b"fine", Timestamp(_now(setup), setup.author))
            for place, record in _far_records(setup.author, _now(setup)).items():
                with pytest.raises(StateAheadError):
                    await node.contexts.merge_state(setup.context, [fine, record])
                assert await node.contexts.state(setup.context) == before, place
            assert deltas(node, "refused_state_ahead") == len(PLACES)
            # A minute ahead is refused too (state cannot wait); within drift it joins.
            minute = _register(b"soon", Timestamp(_now(setup, ahead=60), setup.author))
            with pytest.raises(StateAheadError):
                await node.contexts.merge_state(setup.context, [minute])
            assert await node.contexts.merge_state(setup.context, [fine]) == 1
            await _local_write(node, setup, "after state")


async def test_state_poisoned_by_an_older_version_does_not_stop_writes_after_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An older version let a 2^64-1 stamp into the state: the clock ignores it on load."""
    setup = _setup(tmp_path)
    with trio.fail_after(HOUR):
        async with _running(setup) as node:
            batch = WriteBatch()
            for record in _far_records(setup.author, _now(setup)).values():
                batch.put(STATE, setup.context + record.id, encode_entity(record))
            await node.store.write(batch)
        async with _running(setup) as node:
            await _local_write(node, setup, "despite the poison")
            await _local_write(node, setup, "and again")


# -- flooding pending ------------------------------------------------------------------------


async def test_member_flooding_pending_cannot_evict_another_members_delta(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    quota = 4

    def small(file: FileConfig) -> FileConfig:
        replication = replace(file.replication, max_pending=20, max_pending_per_author=quota)
        return replace(file, replication=replication)

    setup = _setup(tmp_path, small)
    flooder = Ed25519PrivateKey.generate()
    with trio.fail_after(HOUR):
        async with _running(setup) as node:
            public = flooder.public_key().public_bytes_raw()
            await node.contexts.change_members(setup.context, [(public, "member")])
            # The honest member's two deltas: the child arrives first and waits.
            first = await _sign(node, setup, hlc=_now(setup))
            second = await _sign(node, setup, hlc=_now(setup), parents=[first.id], after=first)
            assert (await node.contexts.receive(setup.context, second.encode())).missing
            for _ in range(10 * quota):
                orphan = await _sign(
                    node, setup, hlc=_now(setup), parents=[os.urandom(32)], author=flooder
                )
                await node.contexts.receive(setup.context, orphan.encode())
            assert deltas(node, "evicted") == 10 * quota - quota
            assert (await node.contexts.state(setup.context))[2] == quota + 1
            received = await node.contexts.receive(setup.context, first.encode())
            assert received.applied == [first.id, second.id]


# -- end to end: a node whose clock runs fast -------------------------------------------------


async def test_writes_of_a_node_whose_clock_runs_fast_wait_then_converge(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT):
        async with open_cluster(2, tmp_path) as cluster:
            a, b = cluster
            context = await share(cluster, [0, 1])
            base = time.time() - trio.current_time()
            a.contexts.replicas.wall_clock = lambda: base + trio.current_time()
            b.contexts.replicas.wall_clock = lambda: base + trio.current_time() + 30
            start = trio.current_time()
            delta_id = await write(b, context, "set", key="k", value="fast")
            await cluster.settle()
            assert await a.contexts.read_delta(context, delta_id) is None  # gossiped, waiting
            assert deltas(a, "deferred") >= 1
            await wait_converged(cluster, [a, b], context)
            assert trio.current_time() - start >= 25  # 30 s ahead, 5 s of them tolerated
            assert await call(a, context, "get", key="k") == "fast"
            # Meanwhile a's own writes were never held up, and b takes them at once.
            mine = await write(a, context, "set", key="a", value="slow")
            await cluster.settle()
            assert await b.contexts.read_delta(context, mine) is not None
