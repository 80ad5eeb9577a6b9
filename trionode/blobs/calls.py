"""App calls that read or attach blobs: load what the call asked for, then run it again.

An app call is synchronous and cannot wait for files or the network (see the theory of
operation in `trionode.sdk.blobs`). `BlobCalls.execute` runs the call with a `BlobAccess`;
when the call asks for something not loaded yet, the call is abandoned untouched, this
loads it here (a size, or a bounded range of bytes, from the local store) and runs the call
again, at most `blobs.call_loads` times. A blob this node does not hold *for that context*
reads as missing: the call sees `BlobNotAvailableError`, and if the context's state
references the blob, a background fetch from the context's members starts.

A blob stored here only for other contexts reads as missing too (and is fetched "by
reference", which makes a member of this context vouch for it), and cannot be attached: a
caller cannot read another context's blob through an app by naming its id.
"""

from __future__ import annotations

from trionode.blobs.fetcher import BlobFetcher
from trionode.blobs.references import BlobReferences
from trionode.blobs.store import BlobStore
from trionode.config import BlobsSection
from trionode.context.manager import CallResult, ContextManager
from trionode.sdk.blobs import BLOB_ACCESS, BlobAccess, BlobLoad, BlobLoadNeeded


class BlobCalls:
    def __init__(
        self,
        contexts: ContextManager,
        blobs: BlobStore,
        references: BlobReferences,
        fetcher: BlobFetcher,
        *,
        config: BlobsSection,
    ) -> None:
        self._contexts = contexts
        self._blobs = blobs
        self._references = references
        self._fetcher = fetcher
        self._config = config

    async def execute(
        self, context_id: bytes, method: str, args_json: str, *, executor: bytes | None = None
    ) -> CallResult:
        """`ContextManager.execute`, with blob reads and attachments served (same errors,
        plus the blob errors of `trionode.sdk.blobs`)."""
        access = BlobAccess(max_read=self._config.call_read_max, max_loads=self._config.call_loads)
        while True:
            access.begin_run()
            token = BLOB_ACCESS.set(access)
            try:
                return await self._contexts.execute(
                    context_id, method, args_json, executor=executor
                )
            except BlobLoadNeeded as needed:
                load = needed.load
            finally:
                BLOB_ACCESS.reset(token)
            access.loads += 1
            await self._load(context_id, access, load)

    async def _load(self, context_id: bytes, access: BlobAccess, load: BlobLoad) -> None:
        blob_id = load.blob_id
        if load.is_size:
            # attach_blob: the caller's own upload (in no context yet, or in this one).
            # Attaching links it to this context (by reference), so this node serves it to
            # the members who will read it.
            info = await self._blobs.info(blob_id)
            if info is None or (info.contexts and context_id not in info.contexts):
                access.sizes[blob_id] = None
                return
            access.sizes[blob_id] = info.size
            await self._blobs.link(context_id, blob_id, by_reference=True)
            return
        manifest = await self._blobs.manifest(blob_id)
        if manifest is None or not await self._blobs.linked(context_id, blob_id):
            access.sizes[blob_id] = None
            if await self._references.referenced(context_id, blob_id):
                self._fetcher.request(context_id, blob_id)
            return
        access.sizes[blob_id] = manifest.size
        start = min(load.start, manifest.size)
        want = manifest.size - start if load.length is None else load.length
        stop = start + max(0, min(want, manifest.size - start, access.max_read))
        pieces = [piece async for piece in await self._blobs.read(blob_id, start, stop)]
        access.data[blob_id, load.start, load.length] = b"".join(pieces)
