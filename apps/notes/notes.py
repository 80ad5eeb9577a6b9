"""notes: one collaborative note — a last-writer-wins title and a shared text.

The text is an RGA (`Text`): concurrent inserts at the same place all survive, each run of
characters typed in one call stays together, and every node ends with the same text.
Positions are character offsets in the text as the calling node sees it.

Events: `TextInserted`, `TextDeleted`, `TitleChanged`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from trionode.sdk import App, AppError, LwwRegister, Text

app = App("notes")

Title = Annotated[str, msgspec.Meta(max_length=256)]
Position = Annotated[int, msgspec.Meta(ge=0)]
Length = Annotated[int, msgspec.Meta(ge=1)]
Chunk = Annotated[str, msgspec.Meta(min_length=1, max_length=64 * 1024)]


class TextInserted(msgspec.Struct):
    pos: int
    text: str
    by: str


class TextDeleted(msgspec.Struct):
    pos: int
    length: int
    by: str


class TitleChanged(msgspec.Struct):
    title: str
    by: str


class OutOfRange(AppError):
    """A position or range outside the current text."""

    code = 416


@app.state
class Note:
    body: Text
    heading: LwwRegister[str]

    @app.init
    def init(self, title: Title = "", text: str = "") -> None:
        if title:
            self.heading.set(title)
        if text:
            self.body.insert(0, text)

    @app.method
    def insert(self, pos: Position, text: Chunk) -> int:
        """Insert `text` before character `pos` (0..length); returns the new length."""
        length = len(self.body)
        if pos > length:
            raise OutOfRange(f"position {pos} is past the end ({length})", {"length": length})
        self.body.insert(pos, text)
        app.emit(TextInserted(pos=pos, text=text, by=app.executor_base58()))
        return length + len(text)

    @app.method
    def delete(self, pos: Position, length: Length) -> int:
        """Delete `length` characters from `pos`; returns the new length."""
        current = len(self.body)
        if pos + length > current:
            raise OutOfRange(
                f"range {pos}..{pos + length} is past the end ({current})", {"length": current}
            )
        self.body.delete(pos, length)
        app.emit(TextDeleted(pos=pos, length=length, by=app.executor_base58()))
        return current - length

    @app.view
    def text(self) -> str:
        return self.body.value()

    @app.method
    def set_title(self, title: Title) -> None:
        self.heading.set(title)
        app.emit(TitleChanged(title=title, by=app.executor_base58()))

    @app.view
    def title(self) -> str:
        return self.heading.get() or ""

    @app.view
    def snapshot(self) -> dict[str, Any]:
        """Title, text and length in one read."""
        body = self.body.value()
        return {"title": self.heading.get() or "", "text": body, "length": len(body)}
