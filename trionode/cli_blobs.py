"""`trionode blob add | get | ls | show | rm | pin | unpin`: blobs over the node's API.

`add` streams the file to the node (never read whole) and prints the blob id; `get` writes
the blob to a file, first asking the node to fetch it from members of `--context` when it
does not have it. Both show a progress bar (bytes, rate, ETA) when stderr is a terminal,
and stay quiet with `--json`.

`get` writes to `FILE.part` and renames it when complete, so FILE is never half written; a
`FILE.part` left by an interrupted `get` is resumed from where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final, TextIO

import msgspec
import trio

from trionode import schemas
from trionode.cli_contexts import Spec, table
from trionode.cli_progress import eta_text, size_text
from trionode.client import ApiError, Client

READ_SIZE: Final = 256 * 1024
REDRAW_SECONDS: Final = 0.1


_size = size_text


class Progress:
    """A one-line progress bar on a terminal: bytes, percentage, rate and ETA."""

    def __init__(
        self, total: int | None, label: str, *, out: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.total = total
        self.done = 0
        self._label = label
        self._out = out or sys.stderr
        self._enabled = enabled
        self._started = time.monotonic()
        self._drawn = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._enabled and now - self._drawn >= REDRAW_SECONDS:
            self._drawn = now
            self._out.write("\r" + self.line(now) + "\x1b[K")
            self._out.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        parts = [self._label, _size(self.done)]
        if self.total:
            parts[-1] += f" / {_size(self.total)}"
            parts.append(f"{100 * self.done / self.total:3.0f}%")
        parts.append(f"{_size(rate)}/s")
        if self.total and rate > 0:
            left = max(self.total - self.done, 0) / rate
            parts.append(eta_text(left))
        return "  ".join(parts)

    def close(self) -> None:
        if self._enabled:
            self._out.write("\r" + self.line(time.monotonic()) + "\x1b[K\n")
            self._out.flush()


def _progress(args: argparse.Namespace, total: int | None, label: str) -> Progress:
    return Progress(total, label, enabled=not args.json and sys.stderr.isatty())


async def _read_file(path: Path, progress: Progress) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as f:
        while piece := await f.read(READ_SIZE):
            progress.advance(len(piece))
            yield piece


async def _blob_add(client: Client, args: argparse.Namespace) -> Any:
    path = trio.Path(args.path)
    if not await path.is_file():
        raise ApiError(f"{args.path}: no such file")
    size = (await path.stat()).st_size
    progress = _progress(args, size, "upload")
    result = await client.add_blob(
        _read_file(Path(args.path), progress),
        size=size,
        context_id=args.context,
        name=args.name or os.path.basename(args.path),
    )
    progress.close()
    return result


async def _blob_get(client: Client, args: argparse.Namespace) -> Any:
    try:
        info = await client.blob(args.blob_id)
    except ApiError as exc:
        if exc.status != 404 or args.context is None:
            raise
        info = await client.fetch_blob(args.blob_id, args.context)
    target = trio.Path(args.output)
    part = trio.Path(args.output + ".part")
    start = (await part.stat()).st_size if await part.exists() else 0
    if start > info.size:
        start = 0
    progress = _progress(args, info.size, "download")
    progress.advance(start)
    async with await trio.open_file(part, "ab" if start else "wb") as f:
        async for piece in client.blob_content(args.blob_id, start=start):
            await f.write(piece)
            progress.advance(len(piece))
    progress.close()
    written = (await part.stat()).st_size
    if written != info.size:
        raise ApiError(f"download stopped at {written} of {info.size} bytes (run get again)")
    await part.replace(target)
    return {**msgspec.to_builtins(info), "path": str(target)}


async def _blob_list(client: Client, _args: argparse.Namespace) -> Any:
    return await client.blobs()


async def _blob_show(client: Client, args: argparse.Namespace) -> Any:
    return await client.blob(args.blob_id)


async def _blob_remove(client: Client, args: argparse.Namespace) -> Any:
    return await client.delete_blob(args.blob_id)


async def _blob_pin(client: Client, args: argparse.Namespace) -> Any:
    return await client.pin_blob(args.blob_id)


async def _blob_unpin(client: Client, args: argparse.Namespace) -> Any:
    return await client.pin_blob(args.blob_id, pinned=False)


def _render_id(result: schemas.Blob) -> str:
    return result.blob_id


def _render_saved(result: Any) -> str:
    return f"{result['path']}  {result['size']} bytes  {result['blobId']}"


def _render_blobs(result: schemas.BlobList) -> str:
    rows = [
        (b.blob_id, b.size, b.name or "-", "yes" if b.pinned else "", len(b.contexts))
        for b in result.blobs
    ]
    if not rows:
        return "no blobs"
    return table(rows, ("blob id", "bytes", "name", "pinned", "contexts"))


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="file to store")
    parser.add_argument("--context", help="context the blob belongs to (its members may fetch it)")
    parser.add_argument("--name", help="name to record (default: the file's name)")


def _get_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("blob_id", help="blob id (`trionode blob ls`)")
    parser.add_argument("-o", "--output", required=True, help="file to write")
    parser.add_argument("--context", help="fetch from members of this context if missing here")


def _id_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("blob_id", help="blob id (`trionode blob ls`)")


COMMANDS: list[Spec] = [
    ("blob add", "store a file as a blob and print its id", _blob_add, _render_id, _add_args),
    (
        "blob get",
        "write a blob to a file (fetching it if needed)",
        _blob_get,
        _render_saved,
        _get_args,
    ),
    ("blob ls", "list the blobs stored here", _blob_list, _render_blobs, None),
    ("blob show", "show one blob's size, chunks, pin and contexts", _blob_show, None, _id_arg),
    ("blob rm", "delete a blob from this node", _blob_remove, None, _id_arg),
    ("blob pin", "keep a blob here even when nothing references it", _blob_pin, None, _id_arg),
    (
        "blob unpin",
        "let garbage collection remove the blob when unreferenced",
        _blob_unpin,
        None,
        _id_arg,
    ),
]
