"""Which blobs the contexts' states reference (`BlobRef` values, see `trionode.sdk.blobs`).

Garbage collection keeps referenced blobs; the eager fetch policy and blob reads in calls
ask whether a blob is referenced before fetching it. The answer is computed from the
state tree held in memory and cached per context under its root hash: the root hash covers
every visible value, so an unchanged hash means unchanged references, and an unchanged
context costs one hash lookup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from trionode.context.manager import ContextError
from trionode.crdt import StateTree
from trionode.sdk.blobs import blob_refs


class BlobReferences:
    """Args:
    tree: the live state tree of a context (ContextError if it is gone).
    """

    def __init__(self, tree: Callable[[bytes], Awaitable[StateTree]]) -> None:
        self._tree = tree
        self._cache: dict[bytes, tuple[bytes, frozenset[bytes]]] = {}

    async def of(self, context_id: bytes) -> frozenset[bytes]:
        """Blob ids the context's visible state references (ContextError if not held)."""
        tree = await self._tree(context_id)
        root = tree.root_hash()
        cached = self._cache.get(context_id)
        if cached is not None and cached[0] == root:
            return cached[1]
        refs = blob_refs(tree)
        self._cache[context_id] = (root, refs)
        return refs

    async def referenced(self, context_id: bytes, blob_id: bytes) -> bool:
        try:
            return blob_id in await self.of(context_id)
        except ContextError:
            return False

    async def all_of(self, context_ids: Iterable[bytes]) -> frozenset[bytes]:
        """Every blob referenced by any of the contexts (those gone meanwhile are skipped)."""
        found: set[bytes] = set()
        live = set(context_ids)
        for context_id in live:
            try:
                found |= await self.of(context_id)
            except ContextError:
                continue
        for gone in set(self._cache) - live:
            del self._cache[gone]
        return frozenset(found)
