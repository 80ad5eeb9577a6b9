"""kv_store: a replicated string-to-string map (the reference's canonical example app).

Each key is a last-writer-wins register (by HLC, then writer id); removing a key is a
tombstone, and the later of a write and a removal decides whether it is present.

Events: `Inserted` (a new key), `Updated` (an existing key), `Removed`, `Cleared`.
Every node that applies a delta carrying them runs `count_event` as its own member, which
increments `handled`, a counter of handler runs across all nodes (`handler_calls`).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from trionode.sdk import App, AppError, Counter, LwwRegister, UnorderedMap

app = App("kv_store")

Key = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Value = Annotated[str, msgspec.Meta(max_length=1024 * 1024)]


class Inserted(msgspec.Struct):
    key: str
    value: str


class Updated(msgspec.Struct):
    key: str
    value: str


class Removed(msgspec.Struct):
    key: str


class Cleared(msgspec.Struct):
    count: int


class NotFound(AppError):
    """The key is not in the store."""

    code = 404


@app.state
class KvStore:
    items: UnorderedMap[str, LwwRegister[str]]
    handled: Counter

    @app.method
    def set(self, key: Key, value: Value) -> None:
        """Insert or overwrite `key`."""
        entry = self.items[key]
        if entry.exists():
            app.emit(Updated(key=key, value=value))
        else:
            app.emit(Inserted(key=key, value=value))
        entry.set(value)

    @app.view
    def get(self, key: str) -> str | None:
        """The value of `key`, or null."""
        return self.items[key].get()

    @app.view
    def get_required(self, key: str) -> str:
        """The value of `key`; an error (code 404) if it is missing."""
        value = self.items[key].get()
        if value is None:
            raise NotFound(f"no key {key!r}", {"key": key})
        return value

    @app.method
    def remove(self, key: str) -> str | None:
        """Remove `key`; returns its old value (null if it was missing)."""
        old = self.items[key].get()
        if self.items.remove(key):
            app.emit(Removed(key=key))
        return old

    @app.method
    def clear(self) -> int:
        """Remove every key; returns how many there were."""
        count = self.items.clear()
        if count:
            app.emit(Cleared(count=count))
        return count

    @app.view
    def entries(self) -> dict[str, str]:
        """Every key and value."""
        out = {}
        for key, register in self.items.items():
            value = register.get()
            if value is not None:
                out[key] = value
        return dict(sorted(out.items()))

    @app.view
    def len(self) -> int:
        """How many keys there are."""
        return len(self.items)

    @app.view
    def handler_calls(self) -> int:
        """How many times any node ran an event handler of this store."""
        return self.handled.value()

    @app.handler("Inserted")
    @app.handler("Updated")
    @app.handler("Removed")
    @app.handler("Cleared")
    def count_event(self) -> None:
        self.handled.increment()
