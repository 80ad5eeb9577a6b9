"""Many rows' digests in one call (`trionode.crdt.digests`, the `_digests` extension): the
SHA-256 of each row's parts joined, as hashlib gives it, whatever the rows and parts; bad
arguments are refused with typed errors, never read out of bounds."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.extension_builds import beside, older_build
from trionode.crdt import digests
from trionode.crdt.digests import Part, hashed, native

pytestmark = pytest.mark.skipif(native is None, reason="the _digests extension is not built")

slices = st.tuples(st.integers(0, 600), st.integers(-1, 600))
parts = st.lists(st.one_of(st.binary(max_size=130), slices), max_size=8).map(tuple)
rows = st.lists(st.binary(max_size=600), max_size=20)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(rows, parts)
def test_the_digests_are_hashlibs_of_each_rows_parts_joined(
    rows_: list[bytes], parts_: tuple[Part, ...]
) -> None:
    assert native is not None
    assert native(rows_, parts_) == hashed(rows_, parts_)
    assert native(tuple(rows_), parts_) == hashed(rows_, parts_)


def test_a_large_row_and_many_rows_hash_as_hashlib_hashes_them() -> None:
    assert native is not None
    big = [bytes(range(256)) * 4096, b""]
    whole: tuple[Part, ...] = ((0, -1),)
    assert native(big, whole) == hashed(big, whole)
    many = [i.to_bytes(4, "big") * (i % 50) for i in range(5000)]
    cut: tuple[Part, ...] = (b"\x94\x01", (2, 30), b"stamp", (40, -1))
    assert native(many, cut) == hashed(many, cut)


@pytest.mark.parametrize(
    ("rows_", "parts_", "error"),
    [
        ([b"row", "text"], ((0, -1),), TypeError),
        ([b"row", None], ((0, -1),), TypeError),
        (b"not a sequence of rows", ((0, -1),), TypeError),
        (5, ((0, -1),), TypeError),
        ([b"row"], [(0, -1)], TypeError),
        ([b"row"], ((0, -1),) * 9, TypeError),
        ([b"row"], ((0,),), TypeError),
        ([b"row"], ((0, 1, 2),), TypeError),
        ([b"row"], ("text",), TypeError),
        ([b"row"], ((-1, 2),), ValueError),
        ([b"row"], ((0, -2),), ValueError),
        ([b"row"], ((0, 1 << 70),), TypeError),
    ],
)
def test_bad_arguments_are_refused_with_typed_errors(
    rows_: object, parts_: object, error: type[Exception]
) -> None:
    assert native is not None
    with pytest.raises(error):
        native(rows_, parts_)  # type: ignore[arg-type]


def _digests_of_old(rows: object, parts: object) -> list[bytes]:
    raise TypeError("digests() takes exactly 3 arguments (2 given)")


def test_a_build_of_an_older_source_is_passed_over_not_called() -> None:
    """A checkout updated without `make` keeps the extension built from the older source
    beside it: rows are then hashed through hashlib, instead of each page's take failing
    on a call the old build cannot take."""
    stale = older_build("trionode.crdt._digests", bind=lambda path: None, digests=_digests_of_old)
    with beside(digests, stale):
        assert digests.native is None
    assert digests.native is not None
