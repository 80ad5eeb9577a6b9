"""`trionode.wire.ed25519` (libsodium) signs exactly what `cryptography` (OpenSSL) signs and
agrees with it on every honest signature; anything malformed is refused, never raised."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, strategies as st

from trionode.wire import ed25519

SMALL_ORDER_KEY = bytes([1]) + bytes(31)
"""The encoding of the curve's identity point: a public key of order 1."""


def _openssl_verifies(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=2048))
def test_signatures_are_the_ones_openssl_makes_and_both_accept_them(
    seed: bytes, message: bytes
) -> None:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes_raw()
    signature = ed25519.sign(seed, message)
    assert signature == key.sign(message)  # (RFC 8032 signatures are deterministic)
    assert ed25519.sign_with(ed25519.secret_key(seed), message) == signature
    assert ed25519.verify(public, signature, message)
    assert _openssl_verifies(public, signature, message)


@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=512),
    flip=st.integers(min_value=0),
    where=st.sampled_from(["signature", "message", "key"]),
)
def test_a_changed_bit_is_refused_as_openssl_refuses_it(
    seed: bytes, message: bytes, flip: int, where: str
) -> None:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes_raw()
    signature = key.sign(message)
    parts = {"signature": signature, "message": message or b"\x00", "key": public}
    target = bytearray(parts[where])
    bit = flip % (8 * len(target))
    target[bit // 8] ^= 1 << (bit % 8)
    parts[where] = bytes(target)
    assert not ed25519.verify(parts["key"], parts["signature"], parts["message"])
    assert not _openssl_verifies(parts["key"], parts["signature"], parts["message"])


@given(public=st.binary(max_size=40), signature=st.binary(max_size=70), message=st.binary())
def test_garbage_is_refused_not_raised(public: bytes, signature: bytes, message: bytes) -> None:
    assert ed25519.verify(public, signature, message) is False


def test_a_small_order_key_verifies_nothing() -> None:
    # libsodium refuses it outright: a forger who picks such a key and `S` = 0 would
    # otherwise pass a cofactorless check for any message.
    forged = bytes([1]) + bytes(31) + bytes(32)  # R = identity, S = 0
    assert not ed25519.verify(SMALL_ORDER_KEY, forged, b"anything")
