"""The app SDK: what an application module imports to define its state, calls and events.

    from trionode.sdk import App, AppError, LwwRegister, UnorderedMap

    app = App("kv_store")

    @app.state
    class KvStore:
        items: UnorderedMap[str, LwwRegister[str]]

        @app.method
        def set(self, key: str, value: str) -> None:
            self.items[key].set(value)

        @app.view
        def get(self, key: str) -> str | None:
            return self.items[key].get()

Pure: no Trio, no network. The node runs calls through `trionode.sdk.runtime`
(`execute`, `init_state`, `run_handler`) and gets apps from bundles through
`trionode.sdk.bundle` (`load_bundle`, `verify_bundle`, `load_app`). Blobs in state and
reading them in calls: `BlobRef`, `app.attach_blob`, `app.read_blob` (`trionode.sdk.blobs`).
"""

from trionode.crdt.handles import Counter, LwwRegister, Text, UnorderedMap, UnorderedSet, Vector
from trionode.sdk.app import App, EmittedEvent, EntryKind
from trionode.sdk.blobs import BlobNotAvailableError, BlobReadError, BlobRef, UnknownBlobError
from trionode.sdk.errors import (
    AlreadyInitializedError,
    AppDefinitionError,
    AppError,
    EventError,
    InvalidParamsError,
    MethodFailedError,
    MethodNotFoundError,
    NotInCallError,
    ReadOnlyCallError,
    ResultError,
    StateSchemaError,
    ViewWriteError,
)

__all__ = [
    "AlreadyInitializedError",
    "App",
    "AppDefinitionError",
    "AppError",
    "BlobNotAvailableError",
    "BlobReadError",
    "BlobRef",
    "Counter",
    "EmittedEvent",
    "EntryKind",
    "EventError",
    "InvalidParamsError",
    "LwwRegister",
    "MethodFailedError",
    "MethodNotFoundError",
    "NotInCallError",
    "ReadOnlyCallError",
    "ResultError",
    "StateSchemaError",
    "Text",
    "UnknownBlobError",
    "UnorderedMap",
    "UnorderedSet",
    "Vector",
    "ViewWriteError",
]
