"""`trionode.wire.aead` seals what PyNaCl seals and opens what it seals, and refuses (None,
never an exception or a read past a buffer) anything that does not authenticate or has a
wrong length."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt as seal

from trionode.wire.aead import open_xchacha20poly1305 as open_, seal_xchacha20poly1305 as seal_

keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=24, max_size=24)


@given(key=keys, nonce=nonces, plain=st.binary(max_size=1024), ad=st.binary(max_size=128))
def test_opens_what_pynacl_seals(key: bytes, nonce: bytes, plain: bytes, ad: bytes) -> None:
    assert open_(seal(plain, ad, nonce, key), ad, nonce, key) == plain


@given(
    key=keys,
    nonce=nonces,
    plain=st.binary(max_size=256),
    flip=st.integers(min_value=0),
    where=st.sampled_from(["ciphertext", "ad", "nonce", "key"]),
)
def test_anything_changed_does_not_open(
    key: bytes, nonce: bytes, plain: bytes, flip: int, where: str
) -> None:
    ad = b"header"
    ciphertext = seal(plain, ad, nonce, key)
    parts = {"ciphertext": ciphertext, "ad": ad, "nonce": nonce, "key": key}
    changed = bytearray(parts[where])
    changed[flip % len(changed)] ^= 1 << (flip % 8)
    parts[where] = bytes(changed)
    assert open_(parts["ciphertext"], parts["ad"], parts["nonce"], parts["key"]) is None


def test_wrong_lengths_are_refused() -> None:
    key, nonce = bytes(32), bytes(24)
    ciphertext = seal(b"x", b"", nonce, key)
    assert open_(ciphertext, b"", nonce, key[:31]) is None
    assert open_(ciphertext, b"", nonce, key + b"\0") is None
    assert open_(ciphertext, b"", nonce[:23], key) is None
    assert open_(ciphertext[:15], b"", nonce, key) is None
    assert open_(b"", b"", nonce, key) is None


@given(key=keys, nonce=nonces, plain=st.binary(max_size=1024), ad=st.binary(max_size=128))
def test_seals_what_pynacl_seals(key: bytes, nonce: bytes, plain: bytes, ad: bytes) -> None:
    assert seal_(plain, ad, nonce, key) == seal(plain, ad, nonce, key)


def test_sealing_with_wrong_lengths_raises() -> None:
    with pytest.raises(ValueError, match="32-byte key"):
        seal_(b"x", b"", bytes(24), bytes(31))
    with pytest.raises(ValueError, match="24-byte nonce"):
        seal_(b"x", b"", bytes(23), bytes(32))
