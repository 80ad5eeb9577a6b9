"""SHA-256 digests of many rows' parts in one call (`_digests.c` says why; issue #17).

`native` is the extension's `digests(rows, parts)` when it is built and bound to the
OpenSSL that Python's hashlib uses (and gives hashlib's digests on a known set of inputs),
else None: callers then hash through hashlib (`hashed`), the same digests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from hashlib import sha256
from typing import Final

INTERFACE: Final = 1
"""The extension's calling convention this module is written for (`_digests.c`'s)."""

try:
    import _hashlib  # (CPython's OpenSSL binding: the OpenSSL it links is bound)

    from trionode.crdt import _digests

    # (A build of an older source, left beside a newer checkout, takes other arguments:
    # it is passed over, not called.)
    _BUILT = getattr(_digests, "INTERFACE", None) == INTERFACE
except ImportError:  # (not built: no compiler when installing)
    _BUILT = False

Part = bytes | tuple[int, int]
"""Bytes (themselves), or `(start, end)`: `row[start:end]` (`end` -1: to the row's end)."""

Digests = Callable[[Sequence[bytes], tuple[Part, ...]], list[bytes]]


def hashed(rows: Sequence[bytes], parts: tuple[Part, ...]) -> list[bytes]:
    """For each row, the SHA-256 of its `parts` joined: what `native` gives, by hashlib."""
    return [
        sha256(
            b"".join(
                part if isinstance(part, bytes) else row[part[0] : None if part[1] < 0 else part[1]]
                for part in parts
            )
        ).digest()
        for row in rows
    ]


def _checked(found: Digests) -> bool:
    """Whether `found` gives hashlib's digests (lengths about SHA-256's block edges,
    constant and sliced parts, clamped slices, a large input)."""
    rows = [bytes(range(size % 256)) * (1 + size // 256) for size in (0, 1, 55, 56, 64, 200)]
    rows.append(b"\x07" * 70_000)
    cases: list[tuple[Part, ...]] = [
        ((0, -1),),
        (b"head", (3, 40), b"", (50, -1)),
        ((10, 5), (1000, 2000), b"x" * 100),
        ((0, 70_000), (0, -1)),
    ]
    return all(found(rows, parts) == hashed(rows, parts) for parts in cases)


def _bound() -> Digests | None:
    if not _BUILT:
        return None
    try:
        _digests.bind(_hashlib.__file__)
    except OSError:
        return None
    return _digests.digests if _checked(_digests.digests) else None


native: Final = _bound()
