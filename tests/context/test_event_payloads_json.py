"""Event payloads read as JSON (`notices.payload_json`): msgspec reads what apps emit, and
anything it refuses gets the standard library's reading, as before it was used."""

from __future__ import annotations

import json
import math

import msgspec
from hypothesis import given, strategies as st

from trionode.context.notices import payload_json

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_what_apps_emit_reads_as_the_standard_library_reads_it(value: object) -> None:
    payload = msgspec.json.encode(value)
    assert payload_json(payload) == json.loads(payload)


@given(st.binary(max_size=64))
def test_any_bytes_read_as_the_standard_library_reads_them(payload: bytes) -> None:
    try:
        expected = json.loads(payload)
    except ValueError:
        expected = None
    got = payload_json(payload)
    if isinstance(expected, float) and math.isnan(expected):
        assert isinstance(got, float)
        assert math.isnan(got)
    else:
        assert got == expected


def test_what_msgspec_refuses_gets_the_standard_reading() -> None:
    assert payload_json(b'{"big": 1e400}') == {"big": math.inf}
    assert payload_json(b'"\\ud800"') == "\ud800"  # a lone surrogate
    assert payload_json(b"[NaN]")[0] != payload_json(b"[NaN]")[0]  # NaN, as json reads it
    assert payload_json(b"not json") is None
    assert payload_json(b"\xff\xfe") is None
