"""Random histories with writes, grants, demotions and removals by several members, each
acting from its own (lagging) view, delivered in random orders with duplicates to three
replicas: the replicas reach identical verdicts, members, heads, root hashes and state.

The histories are forged with real keys and the real sealing functions (bodies taken from
a donor context of the writer node), so every check on the receive path runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path

import attrs
import msgspec
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.replication.cluster_helpers import LIMIT, body_of, install
from trionode.auth.model import AuthGraph, Kind, StaticError
from trionode.context.authority import AuthRejected, action, op_from_header
from trionode.context.invitations import seal_keys
from trionode.crdt import ntp64_from_unix
from trionode.dag.delta import (
    GENESIS,
    AuthAction,
    DeltaBody,
    SignedDelta,
    decode_delta,
    key_id_of,
    seal_delta,
    verify_delta,
)
from trionode.node import Node
from trionode.testing import open_cluster


@attrs.define
class Author:
    key: Ed25519PrivateKey
    view: set[bytes] = attrs.field(factory=set)
    key_id: int = 0

    @property
    def member(self) -> bytes:
        return self.key.public_key().public_bytes_raw()


@attrs.define
class World:
    context: bytes
    keys: dict[int, bytes]
    deltas: dict[bytes, SignedDelta] = attrs.field(factory=dict)
    ops: dict[bytes, SignedDelta] = attrs.field(factory=dict)
    wires: list[bytes] = attrs.field(factory=list)

    def vv(self, ids: set[bytes]) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for i in ids:
            for k, v in verify_delta(self.deltas[i], context_id=self.context).vv:
                out[k] = max(out.get(k, 0), v)
        return out

    def heads(self, view: set[bytes]) -> list[bytes]:
        parents = {
            p for i in view for p in verify_delta(self.deltas[i], context_id=self.context).parents
        }
        return sorted(view - parents) or [GENESIS]

    def seal(
        self, author: Author, body: DeltaBody, auth: AuthAction | None = None
    ) -> SignedDelta | None:
        parents = self.heads(author.view)
        vv = self.vv(author.view)
        seq = vv.get(author.member[:8], 0) + 1
        if auth is not None:
            # Auth parents: the maximal ops in this delta's past.
            past = [
                (i, verify_delta(o, context_id=self.context))
                for i, o in self.ops.items()
                if i in author.view
            ]
            maximal = [
                i
                for i, h in past
                if not any(j != i and dict(g.vv).get(h.author[:8], 0) >= h.seq for j, g in past)
            ]
            auth = msgspec.structs.replace(auth, parents=sorted(maximal))
        graph = AuthGraph()
        ordered = sorted(
            (
                (verify_delta(o, context_id=self.context), i)
                for i, o in self.ops.items()
                if i in author.view
            ),
            key=lambda item: (sum(v for _, v in item[0].vv), item[1]),
        )
        for h, i in ordered:
            with contextlib.suppress(StaticError, AuthRejected):
                graph.add(op_from_header(i, h))
        if auth is None:
            own = vv | {author.member[:8]: seq}
            key_id = graph.resolution().write_key(own, held=self.keys)
            if key_id is None:
                return None
            try:
                graph.check_data(author.member, own, key_id)
            except StaticError:
                return None  # it knows it may not write
            author.key_id = key_id
        delta = seal_delta(
            context_id=self.context,
            parents=parents,
            author=author.key,
            hlc=ntp64_from_unix(time.time()),
            key_id=author.key_id,
            context_key=self.keys[author.key_id],
            body=body,
            seq=seq,
            vv=vv,
            auth=auth,
        )
        if auth is not None:
            try:
                graph.check(op_from_header(delta.id, verify_delta(delta, context_id=self.context)))
            except (StaticError, AuthRejected):
                return None  # an honest node would not write it
        self.deltas[delta.id] = delta
        if auth is not None:
            self.ops[delta.id] = delta
        self.wires.append(delta.encode())
        author.view.add(delta.id)
        return delta


async def history(
    writer: Node, passive: Ed25519PrivateKey, rnd: random.Random, steps: int
) -> tuple[World, bytes, int]:
    app = await install(writer, "chat")
    record = await writer.contexts.create(app)
    context = record.context_id
    donor = (await writer.contexts.create(app)).context_id
    bodies = []
    for i in range(6):
        result = await writer.contexts.execute(donor, "set_topic", json.dumps({"topic": f"t{i}"}))
        assert result.delta_id is not None
        bodies.append(await body_of(writer, donor, result.delta_id))
    empty = DeltaBody(records=[], events=[], root_hash=bytes(32))
    genesis = await writer.contexts.read_delta(context, record.heads[0])
    assert genesis is not None
    _, a_key = await writer.contexts.member_key(context)
    keys = await writer.contexts.keys(context)
    world = World(context, dict(keys))
    first = decode_delta(genesis)
    world.deltas[first.id] = first
    world.ops[first.id] = first
    world.wires.append(genesis)
    people = [Author(a_key, {first.id}, record.key_id)] + [
        Author(Ed25519PrivateKey.generate(), set(), record.key_id) for _ in range(3)
    ]
    a = people[0]
    roles = ["admin", "member", "member"]
    for person, role in zip(people[1:], roles, strict=True):
        world.seal(a, empty, action(Kind.GRANT, member=person.member, role=role))
    world.seal(
        a,
        empty,
        action(Kind.GRANT, member=passive.public_key().public_bytes_raw(), role="read-only"),
    )
    for person in people[1:]:
        person.view = set(a.view)
    members = {p.member for p in people} | {passive.public_key().public_bytes_raw()}
    for _ in range(steps):
        who = rnd.choice(people)
        kind = rnd.choice(
            ["write", "write", "write", "merge", "merge", "remove", "demote", "grant"]
        )
        target = rnd.choice(people[1:])
        if kind == "merge":
            who.view |= target.view
        elif kind == "write":
            world.seal(who, rnd.choice(bodies))
        elif kind == "remove" and target is not who:
            new_key = os.urandom(32)
            new_id = key_id_of(new_key)
            world.keys[new_id] = new_key
            box = [(m, seal_keys({new_id: new_key}, m)) for m in sorted(members - {target.member})]
            world.seal(
                who, empty, action(Kind.REMOVE, member=target.member, key_id=new_id, key_box=box)
            )
        elif kind in ("demote", "grant"):
            role = "read-only" if kind == "demote" else rnd.choice(["admin", "member"])
            world.seal(who, empty, action(Kind.GRANT, member=target.member, role=role))
    return world, app, record.key_id


async def outcome(node: Node, context: bytes) -> tuple[object, ...]:
    loaded = await node.contexts.replica(context)
    root, heads, pending = await node.contexts.state(context)
    topic = (await node.contexts.execute(context, "topic", "{}")).result
    return (
        root,
        heads,
        pending,
        topic,
        sorted(loaded.authority.roles().items()),
        sorted(loaded.authority.verdicts.items()),
        sorted(loaded.authority.resolution().standing),
    )


async def _agree(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    with trio.fail_after(LIMIT):
        async with open_cluster(4, tmp_path, connect="none") as cluster:
            writer, *replicas = cluster
            passive = Ed25519PrivateKey.generate()
            world, app, genesis_key = await history(writer, passive, rnd, steps=30)
            outcomes = []
            for replica in replicas:
                await install(replica, "chat")
                await replica.contexts.adopt(
                    context_id=world.context,
                    application_id=app,
                    member_key=passive,
                    keys={genesis_key: world.keys[genesis_key]},
                    key_id=genesis_key,
                )
                wires = world.wires + rnd.sample(world.wires, len(world.wires) // 4)
                rnd.shuffle(wires)
                for wire in wires:
                    await replica.contexts.receive(world.context, wire)
                # Incremental re-judging agrees with judging everything from scratch.
                loaded = await replica.contexts.replica(world.context)
                for delta_id, verdict in loaded.authority.verdicts.items():
                    assert loaded.authority.judge(delta_id)[0] is verdict
                outcomes.append(await outcome(replica, world.context))
            assert outcomes[0] == outcomes[1] == outcomes[2]
            assert outcomes[0][2] == 0, "every delta applied (honest authors only build on those)"


@pytest.mark.parametrize("seed", range(4))
async def test_replicas_agree_whatever_the_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    await _agree(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4, 54))
async def test_replicas_agree_many_seeds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    await _agree(tmp_path, seed)
