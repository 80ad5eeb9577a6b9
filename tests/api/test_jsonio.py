"""The strict JSON decoder on its own: limits, non-finite numbers, and a depth property."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, strategies as st

from trionode.api.jsonio import BadInput, decode_json, int_field, nesting_depth, number_field

LIMITS = {"max_depth": 8, "max_size": 4096}


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


# Strings full of brackets, quotes and backslashes: what could fool a depth scanner.
_tricky_text = st.text(alphabet='[]{}"\\/ a\u00e9\n', max_size=12)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_tricky_text, inner, max_size=4),
    max_leaves=30,
)


@given(_json_values, st.booleans())
def test_nesting_depth_is_the_structural_depth(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert nesting_depth(text) == _depth(value)


@given(_json_values)
def test_decode_accepts_what_it_should_and_round_trips(value: Any) -> None:
    text = json.dumps(value)
    if _depth(value) <= 8 and len(text) <= 4096:
        assert decode_json(text, **LIMITS) == value
    else:
        with pytest.raises(BadInput):
            decode_json(text, **LIMITS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("NaN", "NaN is not JSON"),
        ('{"a": [Infinity]}', "Infinity is not JSON"),
        ("-Infinity", "-Infinity is not JSON"),
        ('{"expiresIn": 1e999}', "out of range"),
        ("-1e400", "out of range"),
        ("[" * 9 + "]" * 9, "nested 9 deep; the limit is 8"),
        ("[" * 4000, "nested 4000 deep"),  # not even closed: refused before parsing
        ("1" * 4097, "larger than 4096 bytes"),
        ("1" * 4300 + "1", "larger than"),
        ("{'a': 1}", "not JSON"),
        ("", "not JSON"),
    ],
)
def test_refused_with_a_one_line_reason(text: str, message: str) -> None:
    with pytest.raises(BadInput) as info:
        decode_json(text, **LIMITS)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_huge_integers_and_bad_utf8_are_refused() -> None:
    with pytest.raises(BadInput, match="not JSON"):
        decode_json("9" * 5000, max_depth=8, max_size=10_000)  # past int's digit limit
    with pytest.raises(BadInput, match="UTF-8"):
        decode_json(b'"\xff"', **LIMITS)


def test_brackets_in_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 1000, "b": '\\"[{' * 100})
    assert decode_json(text, **LIMITS)["a"] == "[" * 1000


def test_exactly_the_limit_is_accepted() -> None:
    assert decode_json("[" * 8 + "]" * 8, **LIMITS) == [[[[[[[[]]]]]]]]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "5", None, 0, -1, 11])
def test_number_field_refuses(value: object) -> None:
    with pytest.raises(BadInput, match="expiresIn must be a number"):
        number_field({"expiresIn": value}, "expiresIn", default=1.0, maximum=10.0)


def test_number_field_accepts_and_defaults() -> None:
    assert number_field({"x": 10}, "x", default=1.0, maximum=10.0) == 10.0
    assert number_field({"x": 0.5}, "x", default=1.0, maximum=10.0) == 0.5
    assert number_field({}, "x", default=1.0, maximum=10.0) == 1.0


@pytest.mark.parametrize("value", [True, 1.0, "1", -1, 101, None])
def test_int_field_refuses(value: object) -> None:
    with pytest.raises(BadInput, match="since must be"):
        int_field(value, "since", minimum=0, maximum=100)
