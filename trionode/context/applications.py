"""Installed applications: bundles the operator installed, kept in the datastore.

Installing reads a bundle from a local path, verifies it (a present signature must be
valid; unsigned bundles are accepted only because the operator installs them locally),
and stores the packed bundle itself in the `application` column, so the app keeps working
after its source directory is gone. Loading imports it once per process.

The packed bundle is also stored as a blob, pinned while the app is installed, and the
record names it: members serve that blob to joiners that do not have the app
(`trionode.context.app_bundles`), and uninstalling unpins it (GC removes it once no
context here uses it either).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import trio

from trionode.blobs.store import BlobStore
from trionode.context.errors import ContextBroken, ContextError, ContextNotFound
from trionode.context.notices import b58
from trionode.context.records import APPLICATIONS, ApplicationRecord
from trionode.errors import ReadOnlyError, TrionodeError
from trionode.sdk.bundle import (
    Bundle,
    BundleError,
    VerifiedBundle,
    load_app,
    load_bundle,
    pack_bundle,
    read_bundle,
    verify_bundle,
)
from trionode.store.lmdb_store import Column
from trionode.store.store import AsyncStore, BytesCodec, Table, WriteBatch

R = TypeVar("R")

BUNDLES = Table(Column.GENERIC, BytesCodec(), BytesCodec())
_BUNDLE_PREFIX = b"bundle/"
"""Packed bundles live in `generic` under bundle/<app id>, beside the records they belong to."""


class Applications:
    def __init__(
        self, store: AsyncStore, trusted_signers: list[str], blobs: BlobStore | None = None
    ) -> None:
        self._store = store
        self._trusted = trusted_signers
        self._blobs = blobs
        self._apps: dict[bytes, Any] = {}

    @property
    def trusted_signers(self) -> list[str]:
        return list(self._trusted)

    async def install(self, path: str) -> ApplicationRecord:
        """Read, verify and import the bundle at `path`, then store it.

        Importing it here checks the whole app (the entry point imports and is an `App`
        named as in the manifest, every state field is a replicated type, every entry
        point's signature is usable), so a broken bundle is refused now with the reason
        (ContextError) instead of failing later at `context create`.
        """

        return await self._install(lambda: load_bundle(path), str(path))

    async def install_packed(self, data: bytes, source: str) -> ApplicationRecord:
        """Like `install`, from an archive's bytes (.tar.gz, .tar or .zip) the operator
        uploaded through the admin API; `source` names it in messages and the record."""
        return await self._install(lambda: read_bundle(data, source=source), source)

    async def _install(self, read: Callable[[], Bundle], source: str) -> ApplicationRecord:
        def load_and_check() -> tuple[VerifiedBundle, Any]:
            # Installed by the operator (a path on this machine, or an upload with the
            # admin token): unsigned bundles are accepted.
            verified = verify_bundle(read(), self._trusted, installed_locally=True)
            return verified, load_app(verified)

        verified, app = await self._off_thread(load_and_check)
        return await self._record(verified, app, source, pack_bundle(verified.bundle))

    async def install_verified(
        self, verified: VerifiedBundle, packed: bytes, source: str, blob_id: bytes
    ) -> ApplicationRecord:
        """Import and record a bundle verified elsewhere: one fetched from a peer, whose
        packed bytes are `packed`, stored as blob `blob_id` (pinned from now on).
        ContextError with the reason if it does not load."""
        app = await self._off_thread(lambda: load_app(verified))
        return await self._record(verified, app, source, packed, blob_id)

    async def _off_thread(self, work: Callable[[], R]) -> R:
        try:
            if self._store.inline:  # test clusters on autojump_clock: no worker threads
                await trio.lowlevel.checkpoint()
                return work()
            return await trio.to_thread.run_sync(work)
        except BundleError as exc:
            raise ContextError(str(exc)) from None

    async def _record(
        self,
        verified: VerifiedBundle,
        app: Any,
        path: str,
        packed: bytes,
        blob_id: bytes | None = None,
    ) -> ApplicationRecord:
        bundle = verified.bundle
        self._apps[bundle.app_id] = app
        record = ApplicationRecord(
            application_id=bundle.app_id,
            name=bundle.name,
            version=bundle.version,
            path=path,
            installed_at=time.time(),
            trusted=True,
            bundle_blob_id=await self._store_blob(bundle, packed, blob_id),
            signer=verified.signer,
        )
        batch = WriteBatch()
        batch.put(APPLICATIONS, record.application_id, record)
        batch.put(BUNDLES, _BUNDLE_PREFIX + record.application_id, packed)
        await self._store.write(batch)
        return record

    async def _store_blob(
        self, bundle: Bundle, packed: bytes, blob_id: bytes | None = None
    ) -> bytes | None:
        """Pin the bundle's blob (`blob_id`, or stored now); None where blobs cannot be
        stored: a read-only node adds no blobs, so it does not serve apps it installed
        itself (it invites nobody either), only those it fetched."""
        if self._blobs is None:
            return None
        if blob_id is None:
            try:
                info = await self._blobs.add_bytes(
                    packed, name=f"{bundle.name}-{bundle.version}.tar.gz"
                )
            except ReadOnlyError:
                return None
            blob_id = info.blob_id
        await self._blobs.pin(blob_id)
        return blob_id

    async def bundle_blob(self, application_id: bytes) -> bytes | None:
        """The blob id of an installed app's bundle, storing the bundle as a (pinned) blob
        first if it was installed before bundles were blobs; None if not installed here."""
        record = await self._store.get(APPLICATIONS, application_id)
        if record is None:
            return None
        if record.bundle_blob_id is not None or self._blobs is None:
            return record.bundle_blob_id
        packed = await self._store.get(BUNDLES, _BUNDLE_PREFIX + application_id)
        if packed is None:
            return None
        blob_id = await self._store_blob(read_bundle(packed), packed)
        await self._store.put(
            APPLICATIONS, application_id, msgspec.structs.replace(record, bundle_blob_id=blob_id)
        )
        return blob_id

    async def uninstall(self, application_id: bytes) -> ApplicationRecord:
        """Forget an installed application and its stored bundle (ContextNotFound if
        it is not installed). Whether a context still uses it is the caller's question."""
        record = await self.get(application_id)
        batch = WriteBatch()
        batch.delete(APPLICATIONS, application_id)
        batch.delete(BUNDLES, _BUNDLE_PREFIX + application_id)
        await self._store.write(batch)
        if record.bundle_blob_id is not None and self._blobs is not None:
            await self._blobs.pin(record.bundle_blob_id, pinned=False)
        # Its modules stay imported: a context still running it (`--force`) keeps working
        # until the node restarts.
        self._apps.pop(application_id, None)
        return record

    async def installed(self) -> list[ApplicationRecord]:
        return [record for _, record in await self._store.scan(APPLICATIONS)]

    async def get(self, application_id: bytes) -> ApplicationRecord:
        record = await self._store.get(APPLICATIONS, application_id)
        if record is None:
            raise ContextNotFound(
                f"application {b58(application_id)} is not installed "
                "(install it with `trionode app install PATH`)"
            )
        return record

    async def load(self, application_id: bytes) -> Any:
        """The App object, importing the stored bundle the first time."""
        app = self._apps.get(application_id)
        if app is not None:
            return app
        record = await self.get(application_id)
        packed = await self._store.get(BUNDLES, _BUNDLE_PREFIX + application_id)
        if packed is None:
            raise ContextBroken(f"the bundle of {record.name} is missing from the store")
        try:
            bundle = read_bundle(packed, source=f"stored {record.name}@{record.version}")
            verified = verify_bundle(bundle, self._trusted, installed_locally=record.trusted)
            app = load_app(verified)
        except (BundleError, TrionodeError) as exc:
            raise ContextBroken(f"cannot load {record.name}: {exc}") from None
        self._apps[application_id] = app
        return app
