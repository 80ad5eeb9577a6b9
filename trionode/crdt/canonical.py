"""The one msgpack encoder every canonical byte string goes through.

Canonical forms are built only from ints, bytes, str, None, lists/tuples and NamedTuples
(never dicts or sets), with collections pre-sorted by the caller, so the msgspec encoding is
a pure function of the logical state: equal states give byte-identical output on every node.
msgspec always picks the shortest int/str/bin/array header, which keeps that true.
"""

from __future__ import annotations

from typing import Final

import msgspec

_ENCODER: Final = msgspec.msgpack.Encoder()
encode_form: Final = _ENCODER.encode
"""`canonical`, without its frame (for loops that run per write)."""


def canonical(obj: object) -> bytes:
    """Encode a canonical form (see module docstring for what may go in)."""
    return _ENCODER.encode(obj)
