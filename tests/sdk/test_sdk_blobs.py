"""Blobs in the SDK: references found in any app's state, and reads through `BlobAccess`
(a miss abandons the call untouched and asks the node to load; the app cannot swallow it)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import msgspec
import pytest
from hypothesis import given, strategies as st

from trionode.crdt import HybridClock, StateTree, ntp64_from_unix
from trionode.sdk import (
    App,
    BlobNotAvailableError,
    BlobRef,
    LwwRegister,
    UnknownBlobError,
    UnorderedMap,
    Vector,
)
from trionode.sdk.blobs import (
    BLOB_ACCESS,
    BlobAccess,
    BlobLoadNeeded,
    BlobReadError,
    b58,
    blob_refs,
    refs_in_value,
)
from trionode.sdk.runtime import CallOutcome, execute

app = App("blob_probe")


class Holder(msgspec.Struct):
    label: str
    refs: list[BlobRef]


@app.state
class Files:
    one: LwwRegister[BlobRef]
    named: UnorderedMap[str, LwwRegister[BlobRef]]
    nested: LwwRegister[Holder]
    listed: Vector[BlobRef]
    plain: LwwRegister[dict[str, Any]]

    @app.method
    def attach(self, blob_id: str, where: str = "one", key: str = "k") -> BlobRef:
        ref = app.attach_blob(blob_id, name=key)
        if where == "one":
            self.one.set(ref)
        elif where == "named":
            self.named[key].set(ref)
        elif where == "nested":
            self.nested.set(Holder(label=key, refs=[ref]))
        else:
            self.listed.append(ref)
        return ref

    @app.method
    def forget(self, key: str) -> None:
        self.named.remove(key)

    @app.method
    def set_plain(self, value: dict[str, Any]) -> None:
        self.plain.set(value)

    @app.view
    def read(self, start: int = 0, length: int | None = None) -> bytes:
        ref = self.one.get()
        assert ref is not None
        return app.read_blob(ref, start, length)

    @app.view
    def swallow(self) -> str:
        ref = self.one.get()
        assert ref is not None
        try:
            app.read_blob(ref)
        except BaseException:  # noqa: BLE001  # what a careless app might do
            return "swallowed"
        return "read"


EXECUTOR = hashlib.sha256(b"member").digest()
CONTEXT = hashlib.sha256(b"context").digest()


class Replica:
    """One node's view: a tree, and blobs it holds ({id: bytes})."""

    def __init__(self, blobs: dict[bytes, bytes]) -> None:
        self.tree = StateTree()
        self.clock = HybridClock(EXECUTOR)
        self.physical = ntp64_from_unix(1_700_000_000.0)
        self.blobs = blobs
        self.runs = 0

    def call(self, method: str, *, max_read: int = 1 << 20, **args: Any) -> CallOutcome:
        """Run like `trionode.blobs.calls.BlobCalls`: load what is missing, run again."""
        access = BlobAccess(max_read=max_read, max_loads=8)
        while True:
            self.physical += 1 << 20
            access.begin_run()
            token = BLOB_ACCESS.set(access)
            self.runs += 1
            try:
                return execute(
                    app,
                    self.tree,
                    self.clock,
                    self.physical,
                    method,
                    msgspec.json.encode(args),
                    executor=EXECUTOR,
                    context_id=CONTEXT,
                )
            except BlobLoadNeeded as needed:
                load = needed.load
            finally:
                BLOB_ACCESS.reset(token)
            access.loads += 1
            data = self.blobs.get(load.blob_id)
            access.sizes[load.blob_id] = None if data is None else len(data)
            if data is not None and not load.is_size:
                stop = len(data) if load.length is None else load.start + load.length
                access.data[load.blob_id, load.start, load.length] = data[load.start : stop]


BLOB = os.urandom(1000)
BLOB_ID = hashlib.sha256(b"blob").digest()


def test_attach_takes_the_size_from_the_store_and_reads_rerun_until_loaded() -> None:
    replica = Replica({BLOB_ID: BLOB})
    out = replica.call("attach", blob_id=b58(BLOB_ID))
    assert out.result == {
        "kind": "trionode/blob",
        "id": b58(BLOB_ID),
        "size": 1000,
        "name": "k",
        "mime": "",
    }
    assert blob_refs(replica.tree) == {BLOB_ID}
    replica.runs = 0
    assert msgspec.json.decode(replica.call("read").result_json, type=bytes) == BLOB
    assert replica.runs == 2  # abandoned once for the load, then run with the bytes
    part = replica.call("read", start=10, length=5).result_json
    assert msgspec.json.decode(part, type=bytes) == BLOB[10:15]


def test_unknown_missing_and_over_budget_are_typed_errors() -> None:
    replica = Replica({})
    with pytest.raises(UnknownBlobError):
        replica.call("attach", blob_id=b58(BLOB_ID))
    assert len(replica.tree) == 0  # nothing written
    holder = Replica({BLOB_ID: BLOB})
    holder.call("attach", blob_id=b58(BLOB_ID))
    holder.blobs.clear()  # as on another member's node: referenced, not stored
    with pytest.raises(BlobNotAvailableError) as caught:
        holder.call("read")
    assert caught.value.to_jsonrpc()["code"] == -32017
    holder.blobs[BLOB_ID] = BLOB
    with pytest.raises(BlobReadError):
        holder.call("read", max_read=999)
    assert len(holder.call("read", max_read=1000).result_json) > 1000


def test_an_app_cannot_swallow_a_load() -> None:
    replica = Replica({BLOB_ID: BLOB})
    replica.call("attach", blob_id=b58(BLOB_ID))
    assert replica.call("swallow").result == "read"


def test_reads_outside_a_node_call_are_refused() -> None:
    replica = Replica({BLOB_ID: BLOB})
    with pytest.raises(BlobReadError):
        execute(
            app,
            replica.tree,
            replica.clock,
            replica.physical,
            "attach",
            msgspec.json.encode({"blob_id": b58(BLOB_ID)}),
            executor=EXECUTOR,
            context_id=CONTEXT,
        )


@pytest.mark.parametrize("where", ["one", "named", "nested", "listed"])
def test_references_are_found_wherever_a_value_holds_them(where: str) -> None:
    replica = Replica({BLOB_ID: BLOB})
    replica.call("attach", blob_id=b58(BLOB_ID), where=where)
    assert blob_refs(replica.tree) == {BLOB_ID}


def test_removed_and_overwritten_references_no_longer_count() -> None:
    other = hashlib.sha256(b"other").digest()
    replica = Replica({BLOB_ID: BLOB, other: b"x"})
    replica.call("attach", blob_id=b58(BLOB_ID), where="named", key="a")
    replica.call("attach", blob_id=b58(other), where="named", key="b")
    assert blob_refs(replica.tree) == {BLOB_ID, other}
    replica.call("forget", key="a")
    assert blob_refs(replica.tree) == {other}
    replica.call("attach", blob_id=b58(BLOB_ID), where="one")
    replica.call("attach", blob_id=b58(other), where="one")
    assert blob_refs(replica.tree) == {other}


def test_a_plain_value_shaped_like_a_reference_counts_and_junk_does_not() -> None:
    replica = Replica({})
    replica.call("set_plain", value={"x": [{"kind": "trionode/blob", "id": b58(BLOB_ID)}]})
    assert blob_refs(replica.tree) == {BLOB_ID}
    replica.call("set_plain", value={"kind": "trionode/blob", "id": "not base58 0OIl"})
    assert blob_refs(replica.tree) == frozenset()


@given(st.binary(max_size=200))
def test_any_bytes_scan_without_error(data: bytes) -> None:
    assert isinstance(refs_in_value(b"trionode/blob" + data), set)
    assert isinstance(refs_in_value(data + b"trionode/blob"), set)


def test_hostile_values_scan_to_nothing() -> None:
    deep = b"\x91" * 100_000 + b"\xad" + b"trionode/blob"
    assert refs_in_value(deep) == set()
    ref = msgspec.msgpack.encode({"kind": "trionode/blob", "id": b58(BLOB_ID)})
    assert refs_in_value(b"\x91" * 1000 + ref) == set()  # past the depth we walk
    assert refs_in_value(b"\x91" * 10 + ref) == {BLOB_ID}
