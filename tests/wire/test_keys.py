from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, strategies as st

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire import protobuf
from trionode.wire.keys import KeyType, PeerId, PrivateKey, PublicKey

# peer-ids.md test vector
SPEC_KEY_PB = bytes.fromhex(
    "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
SPEC_CID = "bafzaajaiaejcahwr5d5ofrfbis4l5d6uwr57hu5tjodrypfm6yaq6dsc2r2pzyt6"

# RFC 8032 section 7.1, test 1
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_spec_peer_id_vector() -> None:
    key = PublicKey.from_protobuf(SPEC_KEY_PB)
    assert key.key_type is KeyType.ED25519
    assert key.to_protobuf() == SPEC_KEY_PB
    peer_id = key.peer_id()
    assert str(peer_id) == SPEC_PEER_ID
    assert peer_id.multihash == bytes.fromhex("0024") + SPEC_KEY_PB
    assert peer_id.to_cid_string() == SPEC_CID
    assert PeerId.from_string(SPEC_PEER_ID) == peer_id
    assert PeerId.from_string(SPEC_CID) == peer_id
    assert PeerId.from_base58(SPEC_PEER_ID) == peer_id
    assert peer_id.extract_public_key() == key
    assert peer_id.matches(key)
    assert repr(peer_id) == f"PeerId({SPEC_PEER_ID!r})"


def test_rfc8032_sign_and_verify() -> None:
    key = PrivateKey(RFC_SEED)
    assert key.public_key.data == RFC_PUBLIC
    assert key.sign(b"") == RFC_SIGNATURE
    assert key.public_key.verify(RFC_SIGNATURE, b"")
    assert not key.public_key.verify(RFC_SIGNATURE, b"x")
    assert not key.public_key.verify(RFC_SIGNATURE[:-1], b"")
    assert not key.public_key.verify(bytes(64), b"")
    assert str(key.peer_id()).startswith("12D3KooW")
    assert repr(key).startswith("PrivateKey(<12D3KooW")


def test_private_key_protobuf() -> None:
    key = PrivateKey(RFC_SEED)
    encoded = key.to_protobuf()
    assert encoded == bytes.fromhex("08011240") + RFC_SEED + RFC_PUBLIC
    assert PrivateKey.from_protobuf(encoded).seed == RFC_SEED
    legacy = protobuf.encode_varint_field(1, 1) + protobuf.encode_bytes_field(
        2, RFC_SEED + RFC_PUBLIC + RFC_PUBLIC
    )
    assert PrivateKey.from_protobuf(legacy).public_key == key.public_key
    bad_legacy = protobuf.encode_varint_field(1, 1) + protobuf.encode_bytes_field(
        2, RFC_SEED + RFC_PUBLIC + bytes(32)
    )
    with pytest.raises(RemoteProtocolError, match="mismatched"):
        PrivateKey.from_protobuf(bad_legacy)
    wrong_pub = protobuf.encode_varint_field(1, 1) + protobuf.encode_bytes_field(
        2, RFC_SEED + bytes(32)
    )
    with pytest.raises(RemoteProtocolError, match="does not match"):
        PrivateKey.from_protobuf(wrong_pub)
    rsa = protobuf.encode_varint_field(1, 0) + protobuf.encode_bytes_field(2, b"x" * 64)
    with pytest.raises(RemoteProtocolError, match="unsupported"):
        PrivateKey.from_protobuf(rsa)
    with pytest.raises(LocalProtocolError):
        PrivateKey(b"short")


def test_generate_is_random_and_self_consistent() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert a.peer_id() != b.peer_id()
    signature = a.sign(b"msg")
    assert a.public_key.verify(signature, b"msg")
    assert not b.public_key.verify(signature, b"msg")
    assert not a.peer_id().matches(b.public_key)


def test_sha256_peer_id_for_large_keys() -> None:
    key = PublicKey(KeyType.RSA, b"\x30" * 300)
    peer_id = key.peer_id()
    assert peer_id.multihash[:2] == b"\x12\x20"
    assert str(peer_id).startswith("Qm")
    assert peer_id.extract_public_key() is None
    assert PeerId.from_string(str(peer_id)) == peer_id
    assert PeerId.from_string(peer_id.to_cid_string()) == peer_id
    with pytest.raises(RemoteProtocolError, match="cannot verify"):
        key.verify(b"", b"")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes.fromhex("0801"),  # no data
        bytes.fromhex("1200"),  # no type
        bytes.fromhex("0809") + protobuf.encode_bytes_field(2, bytes(32)),  # unknown type
        bytes.fromhex("0801") + protobuf.encode_bytes_field(2, bytes(31)),  # short ed25519
    ],
)
def test_public_key_protobuf_rejects(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        PublicKey.from_protobuf(data)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0OIl",  # not base58
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3p",  # truncated
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N1",  # wrong length
        "bafzaajaiaejcahwr5d5ofrfbis4l5d6uwr57hu5tjodrypfm6yaq6dsc2r2pzyt",  # truncated cid
        "b!!!",
        "baaaa",
        "é",
    ],
)
def test_peer_id_text_rejects(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        PeerId.from_string(text)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"\x00\x2b" + bytes(43),  # identity longer than 42
        b"\x12\x1f" + bytes(31),  # sha256 with wrong digest size
        b"\x13\x20" + bytes(32),  # unknown hash
        b"\x00\x05\x01",  # length mismatch
    ],
)
def test_peer_id_bytes_rejects(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        PeerId.from_bytes(raw)


@given(st.binary(max_size=50))
def test_public_key_garbage(data: bytes) -> None:
    try:
        key = PublicKey.from_protobuf(data)
    except RemoteProtocolError:
        return
    key.peer_id()


@given(st.binary(max_size=50))
def test_peer_id_bytes_garbage(data: bytes) -> None:
    try:
        peer_id = PeerId.from_bytes(data)
    except RemoteProtocolError:
        return
    assert PeerId.from_string(str(peer_id)) == peer_id
    with contextlib.suppress(RemoteProtocolError):
        peer_id.extract_public_key()


@given(st.text(max_size=60))
def test_peer_id_text_garbage(text: str) -> None:
    with contextlib.suppress(RemoteProtocolError):
        PeerId.from_string(text)


@given(st.binary(min_size=32, max_size=32))
def test_round_trip_any_seed(seed: bytes) -> None:
    key = PrivateKey(seed)
    assert PrivateKey.from_protobuf(key.to_protobuf()).seed == seed
    peer_id = key.peer_id()
    assert PeerId.from_string(str(peer_id)) == peer_id
    assert peer_id.extract_public_key() == key.public_key
