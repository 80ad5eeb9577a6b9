"""CRDT state: HLC, entity tree with Merkle hashes, collections. Pure and deterministic.

No I/O, no scheduling, no clock reads: callers pass physical time in (see `hlc.py`).

    tree = StateTree()
    clock = HybridClock(node_id)
    with tree.begin(clock, ntp64_from_unix(now)) as tx:
        items = tx.field("items", unordered_map(str, register(str)))
        items["k"].set("v")
        deltas = tx.commit()          # ship these; peers call tree.apply(deltas)
    tree.root_hash()
"""

from trionode.crdt.counter import CounterState, Slot
from trionode.crdt.encoding import (
    MAX_ENTITY_BYTES,
    ValueCodec,
    decode_entities,
    decode_entity,
    encode_entity,
)
from trionode.crdt.entity import ROOT_ID, Entity, Kind, child_id, max_stamp
from trionode.crdt.errors import SchemaError, TransactionError
from trionode.crdt.handles import (
    Counter,
    LwwRegister,
    Spec,
    Text,
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
from trionode.crdt.hlc import (
    ClockDriftError,
    HybridClock,
    Timestamp,
    ntp64_duration,
    ntp64_from_unix,
    ntp64_from_unix_ns,
    unix_from_ntp64,
)
from trionode.crdt.register import RegisterState
from trionode.crdt.sequence import HEAD, Element, SequenceState, TextState, VectorState
from trionode.crdt.transaction import EntityPath, Transaction
from trionode.crdt.tree import ChangeSet, NodeInfo, StateTree

__all__ = [
    "HEAD",
    "MAX_ENTITY_BYTES",
    "ROOT_ID",
    "ChangeSet",
    "ClockDriftError",
    "Counter",
    "CounterState",
    "Element",
    "Entity",
    "EntityPath",
    "HybridClock",
    "Kind",
    "LwwRegister",
    "NodeInfo",
    "RegisterState",
    "SchemaError",
    "SequenceState",
    "Slot",
    "Spec",
    "StateTree",
    "Text",
    "TextState",
    "Timestamp",
    "Transaction",
    "TransactionError",
    "UnorderedMap",
    "UnorderedSet",
    "ValueCodec",
    "Vector",
    "VectorState",
    "child_id",
    "counter",
    "decode_entities",
    "decode_entity",
    "encode_entity",
    "max_stamp",
    "ntp64_duration",
    "ntp64_from_unix",
    "ntp64_from_unix_ns",
    "register",
    "spec_for",
    "text",
    "unix_from_ntp64",
    "unordered_map",
    "unordered_set",
    "vector",
]
