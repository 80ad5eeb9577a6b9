"""Blobs in apps: `BlobRef` values in state, and reading a blob's bytes during a call.

    @app.method
    def attach(self, note: str, blob_id: str, name: str) -> BlobRef:
        ref = app.attach_blob(blob_id, name=name)     # the blob must be stored on this node
        self.files[note].set(ref)
        return ref

    @app.view
    def read(self, note: str) -> bytes:
        return app.read_blob(self.files[note].get())  # BlobNotAvailableError if not here yet

Theory of operation
-------------------
A `BlobRef` is a plain value (a msgspec Struct), stored like any other in a `LwwRegister`,
`Vector`, map value or nested inside one of those. Its encoding carries a tag
(`"kind": "trionode/blob"`), so the node finds references in any app's state without knowing
the app's types (`blob_refs`): garbage collection keeps what live state references, a node
serves a referenced blob to the context's members, and the eager fetch policy fetches what
arrives referenced. A value that merely looks like a reference (a dict with that tag and a
valid id) counts as one too; that is harmless (it only keeps or asks for that blob).

Calls are synchronous and pure, but blobs live in files and may not be here yet. So a call
reads them through a `BlobAccess` the node sets for the call, which only answers from what
the node loaded before the call ran. On a miss it raises `BlobLoadNeeded` (a BaseException,
so app code catching `Exception` cannot swallow it, and it is also remembered): the runtime
aborts the call untouched, the node loads what was asked for (or learns it is not here),
and runs the call again. Calls are deterministic given state and loaded data, so the rerun
reaches the same point and goes on. A blob that is not stored raises
`BlobNotAvailableError` inside the call (the app may catch it and show a placeholder), and
the node starts fetching it in the background — a call never waits on the network.
"""

from __future__ import annotations

import binascii
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Final, NamedTuple

import base58
import msgspec

from trionode.crdt import ROOT_ID, Kind, RegisterState, StateTree, Timestamp, VectorState
from trionode.crdt.entity import CONTAINERS, MAX_DEPTH
from trionode.crdt.hlc import latest
from trionode.sdk.errors import AppError, InvalidParamsError

BLOB_REF_KIND: Final = "trionode/blob"
"""The tag that marks a value as a blob reference (`"kind"` field of its encoding)."""
BLOB_ID_BYTES: Final = 32
_MARKER: Final = BLOB_REF_KIND.encode()
_MAX_NAME: Final = 1024
_MAX_MIME: Final = 255


class BlobRef(msgspec.Struct, frozen=True, tag_field="kind", tag=BLOB_REF_KIND):
    """A reference to a blob, to keep in state. Made by `app.attach_blob`.

    JSON (as views return it): `{"kind": "trionode/blob", "id": "<base58>", "size": 1234,
    "name": "photo.jpg", "mime": "image/jpeg"}`.
    """

    id: str
    """The blob id, base58 (the hash of its manifest)."""
    size: int
    """Its size in bytes, as the node that attached it stored it."""
    name: str = ""
    mime: str = ""

    @property
    def blob_id(self) -> bytes:
        """The raw 32-byte id (InvalidParamsError if `id` is not one)."""
        return parse_blob_id(self.id)


class BlobNotAvailableError(AppError):
    """The blob is not stored on this node yet; the node has started fetching it from the
    context's members. Try again later (a `blob_available` notice on the WebSocket says
    when)."""

    code = -32017


class UnknownBlobError(AppError):
    """`attach_blob` named a blob that is not stored on this node (upload it first)."""

    code = -32018


class BlobReadError(AppError):
    """A read beyond the per-call limits, outside the blob, or where blobs cannot be read."""

    code = -32019


def parse_blob_id(text: object) -> bytes:
    """A base58 blob id as 32 bytes (InvalidParamsError otherwise)."""
    if not isinstance(text, str) or not 30 <= len(text) <= 50:
        raise InvalidParamsError(f"{str(text)[:64]!r} is not a blob id (base58, 32 bytes)")
    try:
        raw = base58.b58decode(text)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != BLOB_ID_BYTES:
        raise InvalidParamsError(f"{text!r} is not a blob id (base58, 32 bytes)")
    return raw


def b58(raw: bytes) -> str:
    return base58.b58encode(raw).decode("ascii")


# -- finding references in state ----------------------------------------------------------


def refs_in_value(value: bytes) -> set[bytes]:
    """Blob ids referenced anywhere inside one encoded value (canonical msgpack)."""
    if _MARKER not in value:  # cheap: almost no value holds a reference
        return set()
    try:
        decoded = msgspec.msgpack.decode(value)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):  # a peer wrote it
        return set()
    found: set[bytes] = set()
    _walk(decoded, found, 0)
    return found


def _walk(value: Any, found: set[bytes], depth: int) -> None:
    if depth > MAX_DEPTH * 4:
        return
    if isinstance(value, dict):
        if value.get("kind") == BLOB_REF_KIND:
            with contextlib.suppress(InvalidParamsError):
                found.add(parse_blob_id(value.get("id")))
        for item in value.values():
            _walk(item, found, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _walk(item, found, depth + 1)


def blob_refs(tree: StateTree) -> frozenset[bytes]:
    """Every blob id referenced by a visible value of the state (removed map entries,
    overwritten register values and deleted vector elements do not count)."""
    found: set[bytes] = set()
    for body in _visible_bodies(tree):
        if isinstance(body, RegisterState):
            found |= refs_in_value(body.value)
        else:
            for value in body:
                found |= refs_in_value(value)
    return frozenset(found)


def _visible_bodies(tree: StateTree) -> Iterator[RegisterState | list[bytes]]:
    """Values visible from the root, walking containers like the tree resolves them."""
    stack: list[tuple[bytes, Timestamp | None, int]] = [(ROOT_ID, None, 0)]
    while stack:
        parent, floor, depth = stack.pop()
        if depth >= MAX_DEPTH:
            continue
        for child_id in tree.children(parent):
            record = tree.get(child_id)
            if record is None or not record.is_live(floor):
                continue
            child_floor = latest(floor, record.removed)
            body = record.body
            if record.kind in CONTAINERS:
                stack.append((child_id, child_floor, depth + 1))
            elif record.kind is Kind.REGISTER and isinstance(body, RegisterState):
                if body.visible(child_floor):
                    yield body
            elif record.kind is Kind.VECTOR and isinstance(body, VectorState):
                yield body.values(child_floor)


# -- reading blobs during a call ----------------------------------------------------------


class BlobLoad(NamedTuple):
    """What a call asked for that the node had not loaded: a blob's size (`start` -1) or
    up to `length` bytes from `start` (None: to the end)."""

    blob_id: bytes
    start: int
    length: int | None

    @property
    def is_size(self) -> bool:
        return self.start < 0


class BlobLoadNeeded(BaseException):  # a signal to the node, not an error
    """The node must load `load` and run the call again (never reaches a client)."""

    def __init__(self, load: BlobLoad) -> None:
        super().__init__(load)
        self.load = load


class BlobAccess:
    """What one call may read of the blob store: answers loaded by the node before the call.

    Args:
        max_read: bytes one call may read from blobs in total (`blobs.call_read_max`).
        max_loads: separate loads (reruns) one call may need (`blobs.call_loads`).
    """

    def __init__(self, *, max_read: int, max_loads: int) -> None:
        self.max_read = max_read
        self.max_loads = max_loads
        self.sizes: dict[bytes, int | None] = {}
        """Blob id → size, or None: not stored here."""
        self.data: dict[tuple[bytes, int, int | None], bytes] = {}
        """(id, start, length) → the bytes read (at most `max_read` of them)."""
        self.needed: BlobLoad | None = None
        """Set by a miss; the node loads it (and clears it) before the rerun."""
        self.loads = 0
        self._read = 0

    def begin_run(self) -> None:
        """Before each run of the call: the read budget starts again."""
        self._read = 0
        self.needed = None

    def size(self, blob_id: bytes) -> int | None:
        """The blob's size, None if it is not stored here."""
        if blob_id not in self.sizes:
            self._miss(BlobLoad(blob_id, -1, None))
        return self.sizes[blob_id]

    def read(self, blob_id: bytes, start: int, length: int | None) -> bytes | None:
        """Up to `length` bytes from `start` (None: to the end); None if not stored here."""
        key = (blob_id, start, length)
        known = self.sizes.get(blob_id, 0)
        if blob_id not in self.sizes or (known is not None and key not in self.data):
            self._miss(BlobLoad(blob_id, start, length))
        size = self.sizes[blob_id]
        if size is None:
            return None
        if start > size:
            raise BlobReadError(
                f"start {start} is past the end of the blob ({size} bytes)", {"size": size}
            )
        want = size - start if length is None else min(length, size - start)
        if self._read + want > self.max_read:
            raise BlobReadError(
                f"a call may read at most {self.max_read} bytes of blobs "
                "(blobs.call_read_max); read a smaller range with start and length",
                {"limit": self.max_read, "size": size},
            )
        self._read += want
        return self.data[key][:want]

    def _miss(self, load: BlobLoad) -> None:
        if self.loads >= self.max_loads:
            raise BlobReadError(
                f"a call may load blobs at most {self.max_loads} times (blobs.call_loads)",
                {"limit": self.max_loads},
            )
        self.needed = load
        raise BlobLoadNeeded(load)


BLOB_ACCESS: ContextVar[BlobAccess | None] = ContextVar("trionode_blob_access", default=None)


def current_access(what: str) -> BlobAccess:
    access = BLOB_ACCESS.get()
    if access is None:
        raise BlobReadError(
            f"{what} works only in calls made through the node's API "
            "(not in event handlers or init)"
        )
    return access


def check_access_done() -> None:
    """Raise the pending load again if the app caught it and carried on (the runtime calls
    this after the app function returns, before anything is committed)."""
    access = BLOB_ACCESS.get()
    if access is not None and access.needed is not None:
        raise BlobLoadNeeded(access.needed)


__all__ = [
    "BLOB_ACCESS",
    "BLOB_REF_KIND",
    "BlobAccess",
    "BlobLoad",
    "BlobLoadNeeded",
    "BlobNotAvailableError",
    "BlobReadError",
    "BlobRef",
    "UnknownBlobError",
    "blob_refs",
    "check_access_done",
    "parse_blob_id",
    "refs_in_value",
]
