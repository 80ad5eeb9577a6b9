"""Behaviour of each collection under concurrency, transactions, GC and tree queries."""

from __future__ import annotations

import pytest

from trionode.crdt import (
    ROOT_ID,
    ClockDriftError,
    Counter,
    Kind,
    LwwRegister,
    StateTree,
    Text,
    Timestamp,
    TransactionError,
    UnorderedMap,
    UnorderedSet,
    Vector,
    counter,
    register,
    spec_for,
    text,
    unordered_map,
    unordered_set,
    vector,
)
from trionode.crdt.handles import CounterSpec, MapSpec, RegisterSpec, SetSpec, TextSpec, VectorSpec

from .crdt_helpers import DOC, KV, NESTED, NOTES, SECOND, T0, TAGS, VOTES, Replica, wire

REPLICA_NAMES = (b"A" * 32, b"B" * 32, b"C" * 32)


def _replicas(n: int = 3) -> list[Replica]:
    return [Replica(name) for name in REPLICA_NAMES[:n]]


def _sync(*replicas: Replica, log: list[list[bytes]]) -> None:
    for replica in replicas:
        for delta in log:
            replica.receive(delta)


# -- registers -------------------------------------------------------------------------


def test_lww_highest_hlc_then_writer_wins() -> None:
    a, b = _replicas(2)
    # same physical time on both: equal HLC times, the writer id decides (B > A)
    with a.begin() as tx:
        tx.field("reg", register(str)).set("from a")
        da = wire(tx.commit())
    with b.begin() as tx:
        tx.field("reg", register(str)).set("from b")
        db = wire(tx.commit())
    a.receive(db)
    b.receive(da)
    for r in (a, b):
        reg = r.tree.reader().field("reg", register(str))
        assert reg.get() == "from b"
        stamp = reg.stamp
        assert stamp is not None
        assert stamp.node == b.name
    # a later HLC wins regardless of writer
    a.physical += SECOND
    with a.begin() as tx:
        tx.field("reg", register(str)).set("later a")
        b.receive(wire(tx.commit()))
    assert b.tree.reader().field("reg", register(str)).get() == "later a"


# -- counters --------------------------------------------------------------------------


def test_concurrent_counter_increments_sum_exactly() -> None:
    replicas = _replicas()
    log = []
    for i, replica in enumerate(replicas):
        for _ in range(i + 2):
            with replica.begin() as tx:
                tx.field("count", counter()).increment(10)
                log.append(wire(tx.commit()))
        with replica.begin() as tx:
            tx.field("count", counter()).decrement(i + 1)
            log.append(wire(tx.commit()))
    _sync(*replicas, log=log * 2)  # duplicates count once
    expected = 10 * (2 + 3 + 4) - (1 + 2 + 3)
    for replica in replicas:
        assert replica.tree.reader().field("count", counter()).value() == expected


def test_counter_refuses_non_positive_amounts() -> None:
    (a,) = _replicas(1)
    with a.begin() as tx, pytest.raises(ValueError, match="positive"):
        tx.field("count", counter()).increment(0)


# -- maps and sets ---------------------------------------------------------------------


def test_removed_key_set_again_elsewhere_is_live_everywhere() -> None:
    a, b, c = _replicas()
    log = []
    with a.begin() as tx:
        tx.field("kv", KV)["k"].set("v1")
        log.append(wire(tx.commit()))
    _sync(a, b, c, log=log)
    with a.begin() as tx:
        assert tx.field("kv", KV).remove("k")
        log.append(wire(tx.commit()))
    b.receive(log[-1])
    b.physical += SECOND
    with b.begin() as tx:
        assert "k" not in tx.field("kv", KV)
        tx.field("kv", KV)["k"].set("v2")
        log.append(wire(tx.commit()))
    _sync(a, b, c, log=list(reversed(log)))
    for r in (a, b, c):
        kv = r.tree.reader().field("kv", KV)
        assert kv.keys() == ["k"]
        assert kv["k"].get() == "v2"


def test_remove_wins_over_older_concurrent_write_and_loses_to_newer() -> None:
    a, b = _replicas(2)
    with a.begin() as tx:
        tx.field("kv", KV)["x"].set("old")
        tx.field("kv", KV)["y"].set("old")
        base = wire(tx.commit())
    b.receive(base)
    with a.begin() as tx:  # a writes x before b removes it ...
        tx.field("kv", KV)["x"].set("a")
        ax = wire(tx.commit())
    b.physical += SECOND
    with b.begin() as tx:
        tx.field("kv", KV).remove("x")
        tx.field("kv", KV).remove("y")
        brm = wire(tx.commit())
    a.physical += 2 * SECOND
    with a.begin() as tx:  # ... and writes y after it, concurrently
        assert tx.field("kv", KV)["y"].get() == "old"
        tx.field("kv", KV)["y"].set("a2")
        ay = wire(tx.commit())
    _sync(a, b, log=[ax, brm, ay])
    for r in (a, b):
        kv = r.tree.reader().field("kv", KV)
        assert "x" not in kv
        assert kv["y"].get() == "a2"


def test_removing_a_key_resets_its_nested_value() -> None:
    a, b = _replicas(2)
    log = []
    with a.begin() as tx:
        tx.field("votes", VOTES)["k"].increment(3)
        nested = tx.field("nested", NESTED)
        nested["outer"]["x"].set(1)
        nested["outer"]["y"].set(2)
        notes = tx.field("notes", NOTES)["n"]
        notes.insert(0, "old text")
        log.append(wire(tx.commit()))
    b.receive(log[-1])
    b.physical += SECOND
    with b.begin() as tx:
        tx.field("votes", VOTES).remove("k")
        tx.field("nested", NESTED).remove("outer")
        tx.field("notes", NOTES).remove("n")
        log.append(wire(tx.commit()))
    a.receive(log[-1])
    a.physical += 2 * SECOND
    with a.begin() as tx:
        tx.field("votes", VOTES)["k"].increment()
        tx.field("nested", NESTED)["outer"]["z"].set(3)
        tx.field("notes", NOTES)["n"].insert(0, "new")
        log.append(wire(tx.commit()))
    _sync(a, b, log=log)
    for r in (a, b):
        view = r.tree.reader()
        assert view.field("votes", VOTES)["k"].value() == 1
        outer = view.field("nested", NESTED)["outer"]
        assert {k: v.get() for k, v in outer.items()} == {"z": 3}
        assert view.field("notes", NOTES)["n"].value() == "new"
    assert a.tree.root_hash() == b.tree.root_hash()


def test_unobserved_removal_hides_older_edits_but_keeps_newer_ones() -> None:
    a, b = _replicas(2)
    with a.begin() as tx:
        tx.field("notes", NOTES)["n"].insert(0, "abc")
        base = wire(tx.commit())
    b.receive(base)
    with a.begin() as tx:
        tx.field("notes", NOTES).remove("n")
        rm = wire(tx.commit())
    b.physical += SECOND  # b has not seen the removal; its edit is newer by HLC
    with b.begin() as tx:
        tx.field("notes", NOTES)["n"].insert(2, "XY")  # positioned after the old "b"
        edit = wire(tx.commit())
    _sync(a, b, log=[rm, edit])
    for r in (a, b):
        # the old characters are reset; the newer run survives at the front
        assert r.tree.reader().field("notes", NOTES)["n"].value() == "XY"
    assert a.tree.root_hash() == b.tree.root_hash()


def test_set_add_remove_readd() -> None:
    a, b = _replicas(2)
    log = []
    with a.begin() as tx:
        tags = tx.field("tags", TAGS)
        assert tags.add("x")
        assert not tags.add("x")
        assert tags.add("y")
        log.append(wire(tx.commit()))
    with a.begin() as tx:
        assert tx.field("tags", TAGS).remove("x")
        assert not tx.field("tags", TAGS).remove("x")
        log.append(wire(tx.commit()))
    b.receive(log[1])  # the removal first: a tombstone for an id b never saw
    assert sorted(b.tree.reader().field("tags", TAGS)) == []
    b.receive(log[0])
    assert sorted(b.tree.reader().field("tags", TAGS)) == ["y"]
    b.physical += SECOND
    with b.begin() as tx:
        assert tx.field("tags", TAGS).add("x")
        log.append(wire(tx.commit()))
    a.receive(log[-1])
    for r in (a, b):
        tags = r.tree.reader().field("tags", TAGS)
        assert sorted(tags) == ["x", "y"]
        assert "x" in tags
        assert 5 not in tags  # wrong key type: simply absent


def test_map_clear_touch_and_typed_keys() -> None:
    (a,) = _replicas(1)
    spec = unordered_map(int, unordered_set(str))
    with a.begin() as tx:
        m = tx.field("m", spec)
        m[1].add("a")
        empty = m.touch(2)
        assert len(empty) == 0
        assert sorted(m.keys()) == [1, 2]
        assert len(m) == 2
        with pytest.raises(TypeError):
            m["1"]  # type: ignore[index]
        tx.commit()
    with a.begin() as tx:
        assert tx.field("m", spec).clear() == 2
        assert not tx.field("m", spec)
        tx.commit()
    assert a.tree.reader().field("m", spec).keys() == []


# -- sequences -------------------------------------------------------------------------


def test_concurrent_text_inserts_interleave_identically() -> None:
    replicas = _replicas()
    with replicas[0].begin() as tx:
        tx.field("doc", DOC).insert(0, "ac")
        base = wire(tx.commit())
    _sync(*replicas[1:], log=[base])
    log = []
    for replica, run in zip(replicas, ("XXX", "YYY", "ZZZ"), strict=True):
        with replica.begin() as tx:
            tx.field("doc", DOC).insert(1, run)
            log.append(wire(tx.commit()))
    for i, replica in enumerate(replicas):
        _sync(replica, log=log[i:] + log[:i])  # each sees a different order
    texts = {r.tree.reader().field("doc", DOC).value() for r in replicas}
    assert len(texts) == 1
    (result,) = texts
    assert result[0] == "a"
    assert result[-1] == "c"
    for run in ("XXX", "YYY", "ZZZ"):
        assert run in result  # one writer's run stays contiguous
    assert len({r.tree.root_hash() for r in replicas}) == 1


def test_text_delete_and_concurrent_insert_inside_the_range() -> None:
    a, b = _replicas(2)
    with a.begin() as tx:
        tx.field("doc", DOC).insert(0, "hello world")
        base = wire(tx.commit())
    b.receive(base)
    with a.begin() as tx:
        tx.field("doc", DOC).delete(0, 6)
        da = wire(tx.commit())
    with b.begin() as tx:
        tx.field("doc", DOC).insert(3, "__")
        db = wire(tx.commit())
    a.receive(db)
    b.receive(da)
    for r in (a, b):
        assert r.tree.reader().field("doc", DOC).value() == "__world"


def test_text_edits_and_bounds() -> None:
    (a,) = _replicas(1)
    with a.begin() as tx:
        doc = tx.field("doc", DOC)
        doc.insert(0, "world")
        doc.insert(0, "hello ")
        doc.insert(len(doc), "!")
        doc.delete(5, 1)
        assert str(doc) == "helloworld!"
        with pytest.raises(IndexError):
            doc.insert(99, "x")
        with pytest.raises(IndexError):
            doc.delete(8, 5)
        tx.commit()
    assert a.tree.reader().field("doc", DOC).value() == "helloworld!"


def test_vector_operations_and_concurrent_set() -> None:
    a, b = _replicas(2)
    spec = vector(str)
    with a.begin() as tx:
        v = tx.field("v", spec)
        v.append("x")
        v.append("z")
        v.insert(1, "y")
        assert v.to_list() == ["x", "y", "z"]
        assert v[-1] == "z"
        assert v.pop(0) == "x"
        v[0] = "Y"
        assert list(v) == ["Y", "z"]
        with pytest.raises(IndexError):
            v[5]
        base = wire(tx.commit())
    b.receive(base)
    with a.begin() as tx:
        tx.field("v", spec)[1] = "from a"
        da = wire(tx.commit())
    b.physical += SECOND
    with b.begin() as tx:
        tx.field("v", spec)[1] = "from b"  # later HLC
        del tx.field("v", spec)[0]
        db = wire(tx.commit())
    a.receive(db)
    b.receive(da)
    for r in (a, b):
        assert r.tree.reader().field("v", spec).to_list() == ["from b"]


def test_a_few_thousand_characters_one_edit_per_call() -> None:
    (a,) = _replicas(1)
    other = Replica(b"Z" * 32)
    body = "lorem ipsum dolor sit amet " * 60  # 1620 characters
    for i, ch in enumerate(body):
        with a.begin() as tx:
            tx.field("doc", DOC).insert(i, ch)
            other.receive(wire(tx.commit()))
    with a.begin() as tx:
        tx.field("doc", DOC).delete(100, 1000)
        other.receive(wire(tx.commit()))
    expected = body[:100] + body[1100:]
    assert a.tree.reader().field("doc", DOC).value() == expected
    assert other.tree.reader().field("doc", DOC).value() == expected
    assert a.tree.root_hash() == other.tree.root_hash()


# -- transactions ----------------------------------------------------------------------


def test_abort_and_unfinished_transactions_change_nothing() -> None:
    (a,) = _replicas(1)
    empty = a.tree.root_hash()
    with a.begin() as tx:
        tx.field("kv", KV)["k"].set("v")
        assert tx.field("kv", KV)["k"].get() == "v"  # reads its own writes
        tx.abort()

    def failing_call() -> None:
        with a.begin() as tx:
            tx.field("kv", KV)["k"].set("v")
            raise RuntimeError  # the app call failed: nothing is kept

    with pytest.raises(RuntimeError):
        failing_call()
    assert a.tree.root_hash() == empty
    assert len(a.tree) == 0
    with pytest.raises(TransactionError, match="closed"):
        tx.commit()


def test_read_only_and_interleaved_transactions() -> None:
    (a,) = _replicas(1)
    reader = a.tree.reader()
    with pytest.raises(TransactionError, match="read-only"):
        reader.field("count", counter()).increment()
    first = a.begin()
    second = a.begin()
    first.field("count", counter()).increment()
    second.field("count", counter()).increment()
    first.commit()
    with pytest.raises(TransactionError, match="another local transaction"):
        second.commit()
    assert a.tree.reader().field("count", counter()).value() == 1


def test_commit_returns_sorted_deltas_with_ancestor_touches() -> None:
    (a,) = _replicas(1)
    with a.begin() as tx:
        tx.field("nested", NESTED)["o"]["i"].set(1)
        deltas = tx.commit()
    assert [d.id for d in deltas] == sorted(d.id for d in deltas)
    kinds = sorted(d.kind for d in deltas)
    assert kinds == [Kind.REGISTER, Kind.MAP, Kind.MAP]
    assert len({d.added for d in deltas}) == 1  # every ancestor stamped with the write


def test_receive_too_far_in_the_future_waits() -> None:
    a, b = _replicas(2)
    b.clock = type(b.clock)(b.name, drift_tolerance=5.0)
    a.physical += 60 * SECOND
    with a.begin() as tx:
        tx.field("kv", KV)["k"].set("v")
        delta = wire(tx.commit())
    with pytest.raises(ClockDriftError) as info:
        b.receive(delta)
    assert info.value.wait_seconds > 50
    assert len(b.tree) == 0  # not applied, and not dropped by the crdt layer either
    b.physical += 60 * SECOND
    b.receive(delta)
    assert b.tree.reader().field("kv", KV)["k"].get() == "v"


# -- GC and tree queries ---------------------------------------------------------------


def test_gc_removes_only_old_tombstones_and_keeps_hashes() -> None:
    (a,) = _replicas(1)
    with a.begin() as tx:
        kv = tx.field("kv", KV)
        for key in "abc":
            kv[key].set(key)
        tx.field("doc", DOC).insert(0, "0123456789")
        tx.field("nested", NESTED)["o"]["i"].set(1)
        tx.commit()
    with a.begin() as tx:  # old tombstones
        tx.field("kv", KV).remove("a")
        tx.field("nested", NESTED).remove("o")
        tx.field("doc", DOC).delete(7, 3)  # a trailing run: leaves, unwound from the end
        tx.commit()
    horizon = a.physical + SECOND
    a.physical += 2 * SECOND
    with a.begin() as tx:  # new tombstones
        tx.field("kv", KV).remove("b")
        tx.field("doc", DOC).delete(0, 2)
        tx.commit()
    before = a.tree.root_hash()
    visible = a.tree.reader().field("doc", DOC).value()
    a.tree.drain_changes()

    dropped = a.tree.gc(horizon)

    # kv["a"], nested["o"] and its child, and two of the three old characters: "7" stays,
    # the run guard right after the live "6" (a run typed after "6" must not take its id)
    assert dropped == 1 + 2 + 2
    assert a.tree.root_hash() == before
    assert StateTree(a.tree.entities()).root_hash() == before
    view = a.tree.reader()
    assert view.field("doc", DOC).value() == visible == "23456"
    kv_b = view.field("kv", KV)["b"]
    record = a.tree.get(kv_b.entity_id)
    assert record is not None
    assert record.removed is not None  # the new tombstone stays
    assert a.tree.get(view.field("kv", KV)["a"].entity_id) is None
    changes = a.tree.drain_changes()
    assert len(changes.deleted) == 3
    assert changes.updated == {view.field("doc", DOC).entity_id}
    assert a.tree.gc(horizon) == 0


def test_gc_then_typing_after_a_collected_run_converges() -> None:
    # A run's next id is its writer's last id + 1, taken without the clock. If GC dropped
    # the tombstone that held that id, the writer would take it again, and a replica still
    # holding the tombstone would absorb the new character into it (the test failure that
    # `test_random_replicas_converge` hit at random).
    a, b = _replicas(2)
    log: list[list[bytes]] = []
    with a.begin() as tx:
        tx.field("doc", DOC).insert(0, "ab")
        log.append(wire(tx.commit()))
    with a.begin() as tx:
        tx.field("doc", DOC).delete(1, 1)
        log.append(wire(tx.commit()))
    _sync(b, log=log)
    a.tree.gc(max(a.physical, b.physical) + SECOND)
    for replica in (a, b):
        replica.physical += 2 * SECOND
    with a.begin() as tx:
        tx.field("doc", DOC).insert(1, "x")
        typed = wire(tx.commit())
    b.receive(typed)
    for replica in (a, b):
        assert replica.tree.reader().field("doc", DOC).value() == "ax"
    assert a.tree.root_hash() == b.tree.root_hash()


def test_entities_pages_by_id_and_node_info() -> None:
    (a,) = _replicas(1)
    with a.begin() as tx:
        kv = tx.field("kv", KV)
        for i in range(10):
            kv[str(i)].set("v")
        tx.commit()
    with a.begin() as tx:
        tx.field("kv", KV).remove("3")
        tx.commit()
    pages = []
    cursor = None
    while page := a.tree.entities(start_after=cursor, limit=4):
        pages.append(page)
        cursor = page[-1].id
    flat = [e.id for page in pages for e in page]
    assert flat == sorted(flat)
    assert len(flat) == len(a.tree) == 11

    root = a.tree.node(ROOT_ID)
    assert root.hash == a.tree.root_hash()
    ((field_id, field_hash),) = root.children
    assert field_hash == a.tree.entity_hash(field_id)
    info = a.tree.node(field_id)
    assert info.entity is not None
    assert info.entity.kind is Kind.MAP
    hidden = [cid for cid, h in info.children if h is None]
    removed_id = a.tree.reader().field("kv", KV)["3"].entity_id
    assert hidden == [removed_id]
    assert a.tree.entity_hash(removed_id) is None
    assert a.tree.node(b"\x01" * 32).entity is None


def test_out_of_order_children_attach_when_parent_arrives() -> None:
    a, b = _replicas(2)
    with a.begin() as tx:
        tx.field("nested", NESTED)["o"]["i"].set(1)
        deltas = tx.commit()
    child = next(d for d in deltas if d.kind is Kind.REGISTER)
    rest = [d for d in deltas if d is not child]
    b.tree.apply([child])
    assert b.tree.entity_hash(child.id) is None  # orphan: kept, not shown
    b.tree.apply(rest)
    assert b.tree.root_hash() == a.tree.root_hash()
    assert b.tree.entity_hash(child.id) is not None


# -- specs -----------------------------------------------------------------------------


def test_spec_for_annotations() -> None:
    spec = spec_for(UnorderedMap[str, UnorderedMap[int, LwwRegister[str]]])
    assert isinstance(spec, MapSpec)
    assert isinstance(spec.value, MapSpec)
    assert isinstance(spec.value.value, RegisterSpec)
    assert isinstance(spec_for(Counter), CounterSpec)
    assert isinstance(spec_for(Text), TextSpec)
    assert isinstance(spec_for(Vector[int]), VectorSpec)
    assert isinstance(spec_for(UnorderedSet[bytes]), SetSpec)
    with pytest.raises(TypeError, match="LwwRegister"):
        spec_for(UnorderedMap[str, str])
    (a,) = _replicas(1)
    with a.begin() as tx:
        tx.field("items", spec)["x"][1].set("one")
        tx.commit()
    assert a.tree.reader().field("items", spec)["x"][1].get() == "one"


def test_values_must_match_the_declared_type() -> None:
    (a,) = _replicas(1)
    with a.begin() as tx:
        with pytest.raises(TypeError):
            tx.field("reg", register(int)).set("nope")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="deeper"):
            _deep(tx.field("deep", text()).path)


def _deep(path: object) -> None:
    from trionode.crdt import EntityPath  # noqa: PLC0415

    assert isinstance(path, EntityPath)
    cursor = EntityPath(None, b"", Kind.OBJECT)
    for _ in range(40):
        cursor = cursor.child(b"x", Kind.MAP)


def test_stamp_properties() -> None:
    stamp = Timestamp(T0 | 7, b"n")
    assert stamp.logical == 7
    assert stamp.physical == T0 & ~0xFFFF
