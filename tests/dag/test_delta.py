from __future__ import annotations

import os

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, strategies as st

from trionode.dag.delta import (
    FORMAT_VERSION,
    GENESIS,
    AppEvent,
    AuthAction,
    CompactHeader,
    DeltaBody,
    SignedDelta,
    _signed_message,
    _signed_message_v4,
    decode_delta,
    delta_id,
    open_delta,
    seal_delta,
    verify_delta,
)
from trionode.errors import RemoteProtocolError

KEY = os.urandom(32)
CONTEXT = os.urandom(32)


def _delta(author: Ed25519PrivateKey | None = None) -> SignedDelta:
    return seal_delta(
        context_id=CONTEXT,
        parents=[GENESIS],
        author=author or Ed25519PrivateKey.generate(),
        hlc=123,
        key_id=0,
        context_key=KEY,
        body=DeltaBody(records=[b"r1"], events=[AppEvent("Inserted", b"{}")], root_hash=bytes(32)),
    )


def test_round_trip() -> None:
    delta = _delta()
    received = decode_delta(delta.encode())
    header = verify_delta(received, context_id=CONTEXT, expected_id=delta.id)
    assert header.context_id == CONTEXT
    body = open_delta(received, header, KEY)
    assert body.records == [b"r1"]
    assert body.events[0].name == "Inserted"


def test_wrong_id_signature_or_key_are_rejected() -> None:
    delta = _delta()
    with pytest.raises(RemoteProtocolError, match="id does not match"):
        verify_delta(delta, context_id=CONTEXT, expected_id=bytes(32))
    flipped = bytes([delta.ciphertext[-1] ^ 1])  # (never the byte it was)
    tampered = SignedDelta(delta.header, delta.ciphertext[:-1] + flipped, delta.signature)
    with pytest.raises(RemoteProtocolError, match="signature"):
        verify_delta(tampered, context_id=CONTEXT)
    forged = SignedDelta(delta.header, delta.ciphertext, bytes(64))
    with pytest.raises(RemoteProtocolError, match="signature"):
        verify_delta(forged, context_id=CONTEXT)
    header = verify_delta(delta, context_id=CONTEXT)
    with pytest.raises(RemoteProtocolError, match="decrypt"):
        open_delta(delta, header, os.urandom(32))


def test_id_covers_everything() -> None:
    a = _delta()
    b = SignedDelta(a.header, a.ciphertext, a.signature)
    assert delta_id(a) == delta_id(b)
    assert delta_id(a) != delta_id(_delta())


@given(st.binary(max_size=400))
def test_garbage_only_raises_the_typed_error(data: bytes) -> None:
    try:
        delta = decode_delta(data)
        verify_delta(delta, context_id=CONTEXT)
    except RemoteProtocolError:
        pass


@given(st.integers(min_value=0, max_value=2000), st.integers(min_value=0, max_value=255))
def test_mutated_deltas_are_rejected(position: int, value: int) -> None:
    wire = bytearray(_delta().encode())
    position %= len(wire)
    if wire[position] == value:
        return
    wire[position] = value

    def receive() -> None:
        delta = decode_delta(bytes(wire))
        open_delta(delta, verify_delta(delta, context_id=CONTEXT), KEY)

    with pytest.raises(RemoteProtocolError):
        receive()


def test_oversized_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_delta(b"\x00" * 100, max_size=10)


def _resealed(delta: SignedDelta, author: Ed25519PrivateKey, **changes: object) -> SignedDelta:
    """A format 2/3 `delta` with its header changed and signed again by `author` (a node
    that writes another format than this one would)."""
    header = msgspec.structs.replace(verify_delta(delta, context_id=CONTEXT), **changes)
    raw = msgspec.msgpack.encode(header)
    return SignedDelta(raw, delta.ciphertext, author.sign(_signed_message(raw, delta.ciphertext)))


def test_only_ops_that_name_an_app_bundle_need_format_3() -> None:
    author = Ed25519PrivateKey.generate()
    body = DeltaBody(records=[], events=[], root_hash=bytes(32))
    common = {
        "context_id": CONTEXT,
        "parents": [GENESIS],
        "author": author,
        "hlc": 1,
        "key_id": 0,
        "context_key": KEY,
        "body": body,
    }
    upgrade = AuthAction(kind="upgrade", application_id=bytes(32), app_version="2.0")
    plain = seal_delta(**common, auth=upgrade, version=2)  # type: ignore[arg-type]
    assert verify_delta(plain, context_id=CONTEXT).version == 2
    named = msgspec.structs.replace(
        upgrade, bundle_blob_id=b"\x01" * 32, app_name="tally", app_signer=b"\x02" * 32
    )
    sealed = seal_delta(**common, auth=named, version=3)  # type: ignore[arg-type]
    header = verify_delta(decode_delta(sealed.encode()), context_id=CONTEXT)
    assert header.version == 3
    assert header.auth == named
    # Formats 4 and 5 carry the same refs.
    for version in (4, FORMAT_VERSION):
        newest = seal_delta(**common, auth=named, version=version)  # type: ignore[arg-type]
        header = verify_delta(decode_delta(newest.encode()), context_id=CONTEXT)
        assert header.version == version
        assert header.auth == named
    assert FORMAT_VERSION == 5
    # A format 2 header cannot name a bundle; unknown formats are refused.
    with pytest.raises(RemoteProtocolError, match="format 2 delta names no app bundle"):
        verify_delta(_resealed(sealed, author, version=2), context_id=CONTEXT)
    with pytest.raises(RemoteProtocolError, match="format 6 is not supported"):
        verify_delta(_resealed(sealed, author, version=6), context_id=CONTEXT)
    # A format 2 op without them (written before format 3) still loads, re-signed or not.
    assert verify_delta(_resealed(plain, author, version=2), context_id=CONTEXT).auth == upgrade


# -- format 4: the compact header ------------------------------------------------------------


def _compact_resealed(
    delta: SignedDelta, author: Ed25519PrivateKey, raw: bytes, context: bytes = CONTEXT
) -> SignedDelta:
    """`delta` with header bytes `raw`, signed by `author` as format 4 signs."""
    message = _signed_message_v4(context, raw, delta.ciphertext)
    return SignedDelta(raw, delta.ciphertext, author.sign(message))


def test_format_4_sends_neither_the_context_nor_the_authors_own_entry() -> None:
    author = Ed25519PrivateKey.generate()
    tag = author.public_key().public_bytes_raw()[:8]
    other = (b"\x01" * 8, 4)
    delta = seal_delta(
        context_id=CONTEXT,
        parents=[GENESIS],
        author=author,
        hlc=5,
        key_id=0,
        context_key=KEY,
        body=DeltaBody(records=[], events=[]),
        seq=3,
        vv={other[0]: other[1]},
    )
    assert CONTEXT not in delta.encode()
    wire = msgspec.msgpack.decode(delta.header, type=CompactHeader)
    assert wire.vv == [other]
    header = verify_delta(decode_delta(delta.encode()), context_id=CONTEXT)
    assert header.vv == sorted([other, (tag, 3)])
    # Under any other context it is not valid: the context id is signed.
    with pytest.raises(RemoteProtocolError, match="signature"):
        verify_delta(decode_delta(delta.encode()), context_id=os.urandom(32))
    # Nor once verified: the kept header names its context.
    with pytest.raises(RemoteProtocolError, match="another context"):
        verify_delta(delta, context_id=os.urandom(32))


def test_hostile_format_4_headers_are_refused() -> None:
    author = Ed25519PrivateKey.generate()
    delta = _delta(author)
    wire = msgspec.msgpack.decode(delta.header, type=CompactHeader)
    tag = author.public_key().public_bytes_raw()[:8]
    repeats = msgspec.structs.replace(wire, vv=[(tag, 1)])
    cases = {
        "repeats its own author": msgspec.msgpack.encode(repeats),
        "format 6 is not supported": msgspec.msgpack.encode(
            msgspec.structs.replace(wire, version=6)
        ),
        "malformed delta header": delta.header[:-3],
        "not canonical": b"\x99"  # the same fields, seq as a uint8 (not the fixint)
        + b"".join(
            b"\xcc\x01" if name == "seq" else msgspec.msgpack.encode(getattr(wire, name))
            for name in CompactHeader.__struct_fields__
        ),
    }
    for match, raw in cases.items():
        with pytest.raises(RemoteProtocolError, match=match):
            verify_delta(_compact_resealed(delta, author, raw), context_id=CONTEXT)
    # A format 2 header names its context, which must be the one it is read under.
    old = seal_delta(
        context_id=CONTEXT,
        parents=[GENESIS],
        author=author,
        hlc=1,
        key_id=0,
        context_key=KEY,
        body=DeltaBody(records=[b"r"], events=[], root_hash=bytes(32)),
        version=2,
    )
    with pytest.raises(RemoteProtocolError, match="another context"):
        verify_delta(decode_delta(old.encode()), context_id=os.urandom(32))
    header = verify_delta(decode_delta(old.encode()), context_id=CONTEXT)
    assert open_delta(decode_delta(old.encode()), header, KEY).records == [b"r"]
