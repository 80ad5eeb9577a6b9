"""A test app exercising every SDK feature (imported normally, not from a bundle)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Annotated, Any

import msgspec

from trionode.crdt import TransactionError
from trionode.sdk import App, AppError, Counter, LwwRegister, Text, UnorderedMap, UnorderedSet

app = App("probe")


class Noted(msgspec.Struct):
    n: int


@dataclasses.dataclass
class Tagged:
    tag: str
    extra: str = ""


class NotSerialisable:
    pass


class Refused(AppError):
    code = 1001


@app.state
class Probe:
    reg: LwwRegister[str]
    count: Counter
    tags: UnorderedSet[str]
    docs: UnorderedMap[str, Text]

    @app.init
    def setup(self, start: Annotated[int, msgspec.Meta(ge=0)] = 0, tag: str = "") -> None:
        if start:
            self.count.increment(start)
        if tag:
            self.tags.add(tag)

    @app.method
    def write_then_fail(self, mode: str) -> str:
        self.reg.set("written")
        self.count.increment()
        self.docs["d"].insert(0, "text")
        app.emit(Noted(n=1))
        if mode == "app":
            raise Refused("refused on purpose", {"why": "testing"})
        if mode == "bug":
            raise KeyError("boom")
        return "ok"

    @app.method
    def emit_many(self, n: int) -> list[int]:
        for i in range(n):
            app.emit(Noted(n=i))
        return list(range(n))

    @app.method
    def emit_mixed(self) -> None:
        app.emit(Noted(n=1))
        app.emit(Tagged(tag="t", extra="e"))
        app.emit(Noted(n=2))

    @app.method
    def emit_not_event(self, what: str) -> None:
        if what == "dict":
            app.emit({"n": 1})
        elif what == "class":
            app.emit(Noted)
        else:
            app.emit(Tagged(tag=NotSerialisable()))  # type: ignore[arg-type]

    @app.method
    def incr(self, by: int = 1) -> int:
        self.count.increment(by)
        return self.count.value()

    @app.method
    def typed(
        self,
        a: int,
        b: list[str],
        c: Annotated[float, msgspec.Meta(gt=0)] = 1.0,
        *,
        d: dict[str, int] | None = None,
        e: Noted | None = None,
    ) -> dict[str, Any]:
        return {"a": a, "b": b, "c": c, "d": d, "e": e}

    @app.method
    def bad_result(self) -> Any:
        self.reg.set("written")
        return self.reg

    @app.method
    def assign(self) -> None:
        self.reg = "nope"  # type: ignore[assignment]

    @app.method
    def new_ids(self, n: int) -> list[str]:
        return [app.unique_id() for _ in range(n)]

    @app.method
    def only_reads(self) -> str | None:
        return self.reg.get()

    @app.view
    def sneaky_write(self) -> None:
        self.reg.set("from a view")

    @app.view
    def swallowed_write(self) -> str:
        with contextlib.suppress(AppError, TransactionError):
            self.count.increment()  # the error is swallowed, yet the call must fail
        return "looks fine"

    @app.view
    def view_emit(self) -> None:
        app.emit(Noted(n=0))

    @app.view
    def view_unique_id(self) -> str:
        return app.unique_id()

    @app.view
    def who(self) -> dict[str, Any]:
        return {
            "executor": app.executor().hex(),
            "executor_b58": app.executor_base58(),
            "context": app.context_id().hex(),
            "now": app.now(),
        }

    @app.view
    def read(self) -> dict[str, Any]:
        return {
            "reg": self.reg.get(),
            "count": self.count.value(),
            "tags": sorted(self.tags),
            "docs": {k: t.value() for k, t in self.docs.items()},
        }

    @app.handler("Noted")
    def on_noted(self, n: int) -> None:
        self.count.increment(n + 1)

    @app.handler("Tagged")
    def on_tagged(self, event: Tagged) -> None:
        self.tags.add(event.tag)
        app.emit(Noted(n=len(event.extra)))

    @app.handler("Noted")
    @app.handler("Tagged")
    def audit(self) -> None:
        self.tags.add("audited")
