"""notes: one collaborative note — a last-writer-wins title, a shared text, attachments.

The text is an RGA (`Text`): concurrent inserts at the same place all survive, each run of
characters typed in one call stays together, and every node ends with the same text.
Positions are character offsets in the text as the calling node sees it.

Attachments are blobs (files of any size) kept by name: `attach` references a blob the
caller uploaded to its node (`trionode blob add FILE`), `attachments` lists them, and
`read_attachment` returns a range of one's bytes (base64 in JSON). On another member's
node an attachment is fetched in the background the first time it is read (this app's
manifest says `"blobs": "on-read"`); until it is here, reading it fails with
`BlobNotAvailableError` (JSON-RPC -32017) — try again once the `blob_available` notice
arrives.

Events: `TextInserted`, `TextDeleted`, `TitleChanged`, `AttachmentAdded`,
`AttachmentRemoved`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from trionode.sdk import App, AppError, BlobRef, LwwRegister, Text, UnorderedMap

app = App("notes")

Title = Annotated[str, msgspec.Meta(max_length=256)]
Position = Annotated[int, msgspec.Meta(ge=0)]
Length = Annotated[int, msgspec.Meta(ge=1)]
Chunk = Annotated[str, msgspec.Meta(min_length=1, max_length=64 * 1024)]
FileName = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Mime = Annotated[str, msgspec.Meta(max_length=255)]
ReadLength = Annotated[int, msgspec.Meta(ge=1)]


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


class AttachmentAdded(msgspec.Struct):
    name: str
    blob_id: str
    size: int
    by: str


class AttachmentRemoved(msgspec.Struct):
    name: str
    by: str


class NoSuchAttachment(AppError):
    """No attachment of that name."""

    code = 404


class OutOfRange(AppError):
    """A position or range outside the current text."""

    code = 416


@app.state
class Note:
    body: Text
    heading: LwwRegister[str]
    files: UnorderedMap[str, LwwRegister[BlobRef]]

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

    @app.method
    def attach(
        self, blob_id: str, name: FileName, mime: Mime = "application/octet-stream"
    ) -> BlobRef:
        """Attach the blob `blob_id` (uploaded to this node) as `name`, replacing any
        attachment of that name; returns the reference kept in the note."""
        ref = app.attach_blob(blob_id, name=name, mime=mime)
        self.files[name].set(ref)
        app.emit(
            AttachmentAdded(name=name, blob_id=ref.id, size=ref.size, by=app.executor_base58())
        )
        return ref

    @app.method
    def detach(self, name: FileName) -> None:
        """Remove the attachment `name` (its blob goes once no state references it)."""
        if not self.files.remove(name):
            raise NoSuchAttachment(f"no attachment {name!r}", {"name": name})
        app.emit(AttachmentRemoved(name=name, by=app.executor_base58()))

    @app.view
    def attachments(self) -> list[BlobRef]:
        """Every attachment's reference (id, size, name, mime), by name."""
        refs = [ref for _, register in self.files.items() if (ref := register.get()) is not None]
        return sorted(refs, key=lambda ref: ref.name)

    @app.view
    def read_attachment(
        self, name: FileName, start: Position = 0, length: ReadLength | None = None
    ) -> dict[str, Any]:
        """Up to `length` bytes of attachment `name` from `start` (default: all of it, within
        the node's per-call limit): `{"name", "mime", "size", "start", "data"}` with `data`
        base64. Raises BlobNotAvailableError while the blob is still being fetched."""
        ref = self.files[name].get() if name in self.files else None
        if ref is None:
            raise NoSuchAttachment(f"no attachment {name!r}", {"name": name})
        data = app.read_blob(ref, start, length)
        return {"name": ref.name, "mime": ref.mime, "size": ref.size, "start": start, "data": data}
