"""Strict JSON for everything a client sends: request bodies, JSON-RPC and `/ws` messages.

Python's `json` accepts `NaN`, `Infinity` and `1e999` (which becomes infinity), and recurses
once per nesting level, so a body of a few thousand `[` raises RecursionError deep inside the
parser. `decode_json` refuses all of these with `BadInput` before they reach a handler: the
size is checked first, the nesting depth is measured by a linear scan that skips strings, and
only then does the parser run (with no constant or non-finite float allowed).

The field helpers below range-check numbers the same way everywhere: a bool is not a number
(`True` is an `int` in Python), non-finite values are refused, and every number has bounds.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any, Final, TypeVar

import msgspec

from trionode.errors import TrionodeError
from trionode.schemas import BASE58_ID

T = TypeVar("T")

# A JSON string (escapes included), written so the regex engine never backtracks.
_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP: Final = {"[": 1, "{": 1, "]": -1, "}": -1}


class BadInput(TrionodeError):
    """A client sent something we refuse; the message says what, in one line."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in `text` (brackets inside strings don't count).

    Invalid JSON may be over-counted (an unterminated string), never under-counted, so a
    caller that refuses deep input before parsing can't be fooled.
    """
    if text.count("[") + text.count("{") == 0:
        return 0
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(_DEPTH_STEP[c] for c in brackets), default=0)


def _refuse_constant(name: str) -> Any:
    raise BadInput(f"{name} is not JSON (only finite numbers are accepted)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadInput(f"number {text[:32]} is out of range")
    return value


def decode_json(raw: bytes | str, *, max_depth: int, max_size: int) -> Any:
    """Decode one JSON document strictly.

    Raises:
        BadInput: larger than `max_size` bytes, nested deeper than `max_depth`, not UTF-8,
            not JSON, or containing NaN/Infinity or a number too large for a float.
    """
    if len(raw) > max_size:
        raise BadInput(f"JSON document is larger than {max_size} bytes")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("JSON must be UTF-8") from None
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise BadInput(f"JSON is nested {depth} deep; the limit is {max_depth}")
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError as exc:  # JSONDecodeError, and int() past sys.get_int_max_str_digits
        raise BadInput(f"not JSON: {_one_line(str(exc))}") from None


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def number_field(
    body: dict[str, Any], key: str, *, default: float, maximum: float, minimum: float = 0.0
) -> float:
    """`body[key]` as a finite number in (`minimum`, `maximum`]; `default` if absent."""
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"{key} must be a number")
    if not math.isfinite(value) or not minimum < value <= maximum:
        raise BadInput(f"{key} must be a number greater than {minimum:g} and at most {maximum:g}")
    return float(value)


def int_field(value: object, key: str, *, minimum: int, maximum: int) -> int:
    """`value` as an integer in [`minimum`, `maximum`] (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{key} must be an integer")
    if not minimum <= value <= maximum:
        raise BadInput(f"{key} must be between {minimum} and {maximum}")
    return value


def typed(value: Any, kind: type[T], what: str = "body") -> T:
    """`value` (already decoded by `decode_json`) as `kind`, a `trionode.schemas` type.

    Raises:
        BadInput: a field is missing, unknown, of the wrong type or out of range.
    """
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `int`, got `str` - at `$.expiresIn`": name the field first.
        detail, _, where = str(exc).partition(" - at `$")
        detail = detail.replace(f"matching regex '{BASE58_ID}'", "that is a base58 id (32 bytes)")
        field = what + where.rstrip("`") if where else what
        raise BadInput(f"{field}: {_one_line(detail)}") from None
