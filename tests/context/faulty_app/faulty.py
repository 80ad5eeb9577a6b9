"""A test app whose calls fail after writing, or write from a view."""

from __future__ import annotations

from trionode.sdk import App, AppError, LwwRegister, UnorderedMap

app = App("faulty")


class Refused(AppError):
    code = 409


@app.state
class Faulty:
    items: UnorderedMap[str, LwwRegister[str]]

    @app.method
    def set(self, key: str, value: str) -> None:
        self.items[key].set(value)

    @app.method
    def set_then_fail(self, key: str, value: str) -> None:
        self.items[key].set(value)
        raise Refused(f"refusing after writing {key!r}", {"key": key})

    @app.method
    def set_then_crash(self, key: str) -> None:
        self.items[key].set("x")
        raise ZeroDivisionError("a bug")

    @app.view
    def sneaky(self, key: str) -> None:
        self.items[key].set("written from a view")

    @app.view
    def get(self, key: str) -> str | None:
        return self.items[key].get()
