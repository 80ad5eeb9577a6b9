"""What the context layer persists, and where (DESIGN §9 columns).

| column        | key                               | value                              |
|---------------|-----------------------------------|------------------------------------|
| config        | context id                        | ContextRecord                      |
| identity      | context id ‖ "k" ‖ key id (8 B)   | a context key (32 B)               |
| identity      | context id ‖ "m" ‖ member pubkey  | our member private key (32 B seed) |
| state         | context id ‖ entity id            | encoded entity record              |
| state         | context id ‖ entity id ‖ seq (4 B)| a Text/Vector journal row: deltas  |
|               |                                   | since its record (crdt/rows.py)    |
| delta         | context id ‖ delta id             | SignedDelta wire bytes, or empty:  |
|               |                                   | a checkpoint (applied as state by  |
|               |                                   | a snapshot or tree comparison)     |
| pending       | context id ‖ delta id             | PendingRecord (waits for parents)  |
| generic       | "handler-run/" ‖ context ‖ delta ‖ index | HandlerRun (to run once)    |
| generic       | "snapshot-progress/" ‖ context    | SnapshotProgress (resume point)    |
| generic       | "bundle/" ‖ application id        | packed bundle (.tar.gz)            |
| generic       | "base/" ‖ context ‖ entity id     | state that arrived as state or was |
|               |                                   | folded (the base a rebuild joins); |
|               |                                   | empty: the same as the state row   |
| generic       | "ckvv/" ‖ context ‖ delta id      | a checkpoint's version vector (and |
|               |                                   | a folded delta's author and seq)   |
| meta          | "context-format"                  | storage format of contexts (3)     |
| application   | application id                    | ApplicationRecord                  |

One call's writes (state rows, the delta, the new heads and root) go in one WriteBatch, so
a crash leaves either all of a call or none of it; the delta processor commits the batches
of the calls and received deltas queued together in one transaction (`pipeline.py`).
"""

from __future__ import annotations

from typing import Final

import msgspec

from trionode.store.lmdb_store import Column
from trionode.store.store import BytesCodec, MsgpackCodec, Table

CONTEXT_ID_SIZE: Final = 32


class MemberRecord(msgspec.Struct, frozen=True):
    public_key: bytes
    role: str  # "admin" | "member" | "read-only"


class ContextRecord(msgspec.Struct, frozen=True):
    context_id: bytes
    application_id: bytes
    created_at: float
    root_hash: bytes
    heads: list[bytes]
    key_id: int
    members: list[MemberRecord]
    our_member: bytes
    """The public key this node acts as in the context."""
    base_application_id: bytes | None = None
    """The application the context was created with, once upgrades moved it to another
    (`application_id` follows the standing upgrades; None: never upgraded)."""


class PendingRecord(msgspec.Struct, frozen=True):
    """A received delta waiting for its parents."""

    delta: bytes
    received_at: float


class HandlerRun(msgspec.Struct, frozen=True):
    """An app event whose handlers this node still has to run (exactly once)."""

    name: str
    payload: bytes


class ApplicationRecord(msgspec.Struct, frozen=True):
    application_id: bytes
    name: str
    version: str
    path: str
    """Where the bundle lives on this node (directory or archive)."""
    installed_at: float
    trusted: bool
    """Installed by the operator (or signed by a trusted signer): may be executed."""
    bundle_blob_id: bytes | None = None
    """The blob holding the packed bundle (pinned while installed), which members serve to
    joiners; None for apps installed before bundles were blobs (made on first invite)."""
    signer: bytes | None = None
    """The bundle's verified signer (Ed25519 public key), None if unsigned."""


BYTES = BytesCodec()
CONTEXTS = Table(Column.CONFIG, BYTES, MsgpackCodec(ContextRecord))
IDENTITY = Table(Column.IDENTITY, BYTES, BYTES)
STATE = Table(Column.STATE, BYTES, BYTES)
DELTAS = Table(Column.DELTA, BYTES, BYTES)
PENDING = Table(Column.PENDING, BYTES, MsgpackCodec(PendingRecord))
HANDLER_RUNS = Table(Column.GENERIC, BYTES, MsgpackCodec(HandlerRun))
HANDLER_PREFIX = b"handler-run/"
APPLICATIONS = Table(Column.APPLICATION, BYTES, MsgpackCodec(ApplicationRecord))


def key_slot(context_id: bytes, key_id: int) -> bytes:
    return context_id + b"k" + key_id.to_bytes(8, "big")


def member_slot(context_id: bytes, public_key: bytes) -> bytes:
    return context_id + b"m" + public_key
