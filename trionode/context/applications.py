"""Installed applications: bundles the operator installed, kept in the datastore.

Installing reads a bundle from a local path, verifies it (a present signature must be
valid; unsigned bundles are accepted only because the operator installs them locally),
and stores the packed bundle itself in the `application` column, so the app keeps working
after its source directory is gone. Loading imports it once per process.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from trionode.context.manager import ContextError, b58
from trionode.context.records import APPLICATIONS, ApplicationRecord
from trionode.errors import TrionodeError
from trionode.sdk.bundle import (
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

BUNDLES = Table(Column.GENERIC, BytesCodec(), BytesCodec())
_BUNDLE_PREFIX = b"bundle/"
"""Packed bundles live in `generic` under bundle/<app id>, beside the records they belong to."""


class Applications:
    def __init__(self, store: AsyncStore, trusted_signers: list[str]) -> None:
        self._store = store
        self._trusted = trusted_signers
        self._apps: dict[bytes, Any] = {}

    async def install(self, path: str) -> ApplicationRecord:
        """Read, verify and import the bundle at `path`, then store it.

        Importing it here checks the whole app (the entry point imports and is an `App`
        named as in the manifest, every state field is a replicated type, every entry
        point's signature is usable), so a broken bundle is refused now with the reason
        (ContextError, 400) instead of failing later at `context create`.
        """

        def load_and_check() -> tuple[VerifiedBundle, Any]:
            bundle = load_bundle(path)
            verified = verify_bundle(bundle, self._trusted, installed_locally=True)
            return verified, load_app(verified)

        try:
            if self._store.inline:  # test clusters on autojump_clock: no worker threads
                await trio.lowlevel.checkpoint()
                verified, app = load_and_check()
            else:
                verified, app = await trio.to_thread.run_sync(load_and_check)
        except BundleError as exc:
            raise ContextError(str(exc)) from None
        bundle = verified.bundle
        self._apps[bundle.app_id] = app
        record = ApplicationRecord(
            application_id=bundle.app_id,
            name=bundle.name,
            version=bundle.version,
            path=str(path),
            installed_at=time.time(),
            trusted=True,
        )
        batch = WriteBatch()
        batch.put(APPLICATIONS, record.application_id, record)
        batch.put(BUNDLES, _BUNDLE_PREFIX + record.application_id, pack_bundle(verified.bundle))
        await self._store.write(batch)
        return record

    async def uninstall(self, application_id: bytes) -> ApplicationRecord:
        """Forget an installed application and its stored bundle (ContextError 404 if it is
        not installed). Whether a context still uses it is the caller's question."""
        record = await self.get(application_id)
        batch = WriteBatch()
        batch.delete(APPLICATIONS, application_id)
        batch.delete(BUNDLES, _BUNDLE_PREFIX + application_id)
        await self._store.write(batch)
        # Its modules stay imported: a context still running it (`--force`) keeps working
        # until the node restarts.
        self._apps.pop(application_id, None)
        return record

    async def installed(self) -> list[ApplicationRecord]:
        return [record for _, record in await self._store.scan(APPLICATIONS)]

    async def get(self, application_id: bytes) -> ApplicationRecord:
        record = await self._store.get(APPLICATIONS, application_id)
        if record is None:
            raise ContextError(
                f"application {b58(application_id)} is not installed "
                "(install it with `trionode app install PATH`)",
                status=404,
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
            raise ContextError(f"the bundle of {record.name} is missing from the store", 500)
        try:
            bundle = read_bundle(packed, source=f"stored {record.name}@{record.version}")
            verified = verify_bundle(bundle, self._trusted, installed_locally=record.trusted)
            app = load_app(verified)
        except (BundleError, TrionodeError) as exc:
            raise ContextError(f"cannot load {record.name}: {exc}", 500) from None
        self._apps[application_id] = app
        return app
