"""libp2p identity keys (Ed25519) and PeerIds.

Keys travel as the ``PublicKey`` protobuf ``{ KeyType Type = 1; bytes Data = 2; }``, which
must be encoded deterministically (fields in order, both present, minimal varints). For
Ed25519 that is ``08 01 12 20 <32-byte key>``.

A PeerId is a multihash of that protobuf: the *identity* multihash
(``00 || uvarint(len) || pb``) when the protobuf is at most 42 bytes (so an Ed25519 PeerId
embeds its public key), SHA-256 (``12 20 || sha256(pb)``) otherwise (RSA). Its text form is
base58btc (``12D3KooW…`` for Ed25519, ``Qm…`` for SHA-256); the CIDv1 form
(``b`` + base32(``01 72 || multihash``)) is accepted when parsing.

Only Ed25519 keys can sign or verify here; other key types decode (so a PeerId can be
derived and compared) but :meth:`PublicKey.verify` rejects them.

Parsers treat their input as untrusted and raise RemoteProtocolError; code parsing local
configuration should catch it and raise ConfigError.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from dataclasses import dataclass

import base58
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from trionode.errors import LocalProtocolError, RemoteProtocolError
from trionode.wire import ed25519, protobuf
from trionode.wire.varint import BytesLike, decode_uvarint, encode_uvarint

MAX_KEY_PROTOBUF_SIZE = 4096
"""Largest key protobuf accepted (RSA-4096 public keys are about 550 bytes)."""

MAX_INLINE_KEY_LENGTH = 42
"""Key protobufs up to this size are embedded in the PeerId (identity multihash)."""

MULTIHASH_IDENTITY = 0x00
MULTIHASH_SHA2_256 = 0x12
MULTICODEC_LIBP2P_KEY = 0x72
CID_VERSION_1 = 0x01

ED25519_KEY_LENGTH = 32
ED25519_SIGNATURE_LENGTH = 64
_MAX_PEER_ID_TEXT_LENGTH = 256


class KeyType(enum.IntEnum):
    """The ``KeyType`` enum of the libp2p key protobuf."""

    RSA = 0
    ED25519 = 1
    SECP256K1 = 2
    ECDSA = 3


def _decode_key_protobuf(data: BytesLike, what: str) -> tuple[KeyType, bytes]:
    message = protobuf.decode_message(data, max_size=MAX_KEY_PROTOBUF_SIZE)
    raw_type = message.get_uint(1)
    key_data = message.get_bytes(2)
    if raw_type is None or key_data is None:
        raise RemoteProtocolError(f"{what} protobuf lacks Type or Data")
    try:
        key_type = KeyType(raw_type)
    except ValueError:
        raise RemoteProtocolError(f"unknown key type {raw_type}") from None
    return key_type, key_data


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A libp2p public key of any type; only Ed25519 can verify signatures."""

    key_type: KeyType
    data: bytes
    """The type-specific key bytes (for Ed25519, the raw 32-byte key)."""

    @classmethod
    def from_protobuf(cls, data: BytesLike) -> PublicKey:
        """Decode a ``PublicKey`` protobuf.

        Raises:
            RemoteProtocolError: malformed protobuf, unknown type, or a wrong-size Ed25519 key.
        """
        key_type, key_data = _decode_key_protobuf(data, "PublicKey")
        if key_type is KeyType.ED25519 and len(key_data) != ED25519_KEY_LENGTH:
            raise RemoteProtocolError(f"Ed25519 public key of {len(key_data)} bytes")
        return cls(key_type, key_data)

    @classmethod
    def from_ed25519_bytes(cls, raw: bytes) -> PublicKey:
        """Wrap a raw 32-byte Ed25519 public key.

        Raises:
            RemoteProtocolError: ``raw`` is not 32 bytes.
        """
        if len(raw) != ED25519_KEY_LENGTH:
            raise RemoteProtocolError(f"Ed25519 public key of {len(raw)} bytes")
        return cls(KeyType.ED25519, bytes(raw))

    def to_protobuf(self) -> bytes:
        """The deterministic ``PublicKey`` protobuf encoding."""
        return protobuf.encode_varint_field(1, int(self.key_type)) + protobuf.encode_bytes_field(
            2, self.data
        )

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is a valid signature of ``message`` by this key.

        Raises:
            RemoteProtocolError: the key type is not supported for verification.
        """
        if self.key_type is not KeyType.ED25519:
            raise RemoteProtocolError(f"cannot verify {self.key_type.name} signatures")
        return ed25519.verify(self.data, signature, message)  # (libsodium: see `ed25519`)

    def peer_id(self) -> PeerId:
        """The PeerId of this key."""
        return PeerId.from_public_key(self)


class PrivateKey:
    """An Ed25519 identity key pair (the only kind trionode generates)."""

    __slots__ = ("_peer_id", "_private", "_public", "_secret", "_seed")

    def __init__(self, seed: bytes) -> None:
        """Load from a 32-byte Ed25519 seed.

        Raises:
            LocalProtocolError: ``seed`` is not 32 bytes.
        """
        if len(seed) != ED25519_KEY_LENGTH:
            raise LocalProtocolError(f"Ed25519 seed must be 32 bytes, not {len(seed)}")
        self._seed = bytes(seed)
        self._private = Ed25519PrivateKey.from_private_bytes(self._seed)
        self._public = PublicKey(KeyType.ED25519, self._private.public_key().public_bytes_raw())
        self._secret = ed25519.secret_key(self._seed)
        self._peer_id = PeerId.from_public_key(self._public)
        """Derived once: every gossip message this node publishes is checked against it."""

    @classmethod
    def generate(cls) -> PrivateKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_protobuf(cls, data: BytesLike) -> PrivateKey:
        """Decode a ``PrivateKey`` protobuf (``seed || pub``, or legacy ``seed || pub || pub``).

        Raises:
            RemoteProtocolError: malformed, not Ed25519, or the embedded public key does not
                match the seed.
        """
        key_type, key_data = _decode_key_protobuf(data, "PrivateKey")
        if key_type is not KeyType.ED25519:
            raise RemoteProtocolError(f"unsupported private key type {key_type.name}")
        if len(key_data) not in {64, 96}:
            raise RemoteProtocolError(f"Ed25519 private key of {len(key_data)} bytes")
        seed, public = key_data[:32], key_data[32:64]
        if len(key_data) == 96 and key_data[64:] != public:
            raise RemoteProtocolError("legacy Ed25519 private key has mismatched public keys")
        key = cls(seed)
        if key.public_key.data != public:
            raise RemoteProtocolError("Ed25519 private key does not match its public key")
        return key

    def to_protobuf(self) -> bytes:
        """The ``PrivateKey`` protobuf (``Data = seed || pub``). Never send it anywhere."""
        return protobuf.encode_varint_field(1, int(KeyType.ED25519)) + protobuf.encode_bytes_field(
            2, self._seed + self._public.data
        )

    @property
    def seed(self) -> bytes:
        """The 32-byte Ed25519 seed."""
        return self._seed

    @property
    def public_key(self) -> PublicKey:
        """The matching public key."""
        return self._public

    def peer_id(self) -> PeerId:
        """Our PeerId."""
        return self._peer_id

    def sign(self, message: bytes) -> bytes:
        """An RFC 8032 Ed25519 signature (64 bytes) of ``message`` (libsodium: `ed25519`)."""
        return ed25519.sign_with(self._secret, message)

    def __repr__(self) -> str:
        return f"PrivateKey(<{self.peer_id()}>)"


def _b32_decode_lower_nopad(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded)
    except ValueError:
        raise RemoteProtocolError("invalid base32 in PeerId") from None


@dataclass(frozen=True, slots=True)
class PeerId:
    """A peer's identity: a multihash of its public key protobuf.

    Compare PeerIds with ``==``; display with ``str()`` (base58btc).
    """

    multihash: bytes

    def __post_init__(self) -> None:
        _validate_multihash(self.multihash)

    @classmethod
    def from_public_key(cls, key: PublicKey) -> PeerId:
        """Derive the PeerId of ``key`` (identity multihash if the protobuf is small)."""
        encoded = key.to_protobuf()
        if len(encoded) <= MAX_INLINE_KEY_LENGTH:
            return cls(bytes((MULTIHASH_IDENTITY,)) + encode_uvarint(len(encoded)) + encoded)
        return cls(bytes((MULTIHASH_SHA2_256, 32)) + hashlib.sha256(encoded).digest())

    @classmethod
    def from_bytes(cls, data: BytesLike) -> PeerId:
        """Parse a binary multihash PeerId.

        Raises:
            RemoteProtocolError: not an identity or SHA-256 multihash of valid size.
        """
        return cls(bytes(data))

    @classmethod
    def from_base58(cls, text: str) -> PeerId:
        """Parse the legacy base58btc text form.

        Raises:
            RemoteProtocolError: not base58, or not a valid PeerId multihash.
        """
        if not text or len(text) > _MAX_PEER_ID_TEXT_LENGTH:
            raise RemoteProtocolError("PeerId text has an invalid length")
        try:
            raw = base58.b58decode(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise RemoteProtocolError(f"invalid base58 PeerId {text!r}") from None
        return cls.from_bytes(raw)

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse either text form: base58btc (``12D3KooW…``/``Qm…``) or CIDv1 (``b…``).

        Raises:
            RemoteProtocolError: neither form parses to a valid PeerId.
        """
        if text.startswith("b") and len(text) <= _MAX_PEER_ID_TEXT_LENGTH:
            raw = _b32_decode_lower_nopad(text[1:])
            version = decode_uvarint(raw)
            if version is None or version[0] != CID_VERSION_1:
                raise RemoteProtocolError("PeerId CID is not CIDv1")
            codec = decode_uvarint(raw, version[1])
            if codec is None or codec[0] != MULTICODEC_LIBP2P_KEY:
                raise RemoteProtocolError("PeerId CID codec is not libp2p-key")
            return cls.from_bytes(raw[version[1] + codec[1] :])
        return cls.from_base58(text)

    def to_base58(self) -> str:
        """The base58btc text form."""
        return base58.b58encode(self.multihash).decode("ascii")

    def to_cid_string(self) -> str:
        """The CIDv1 text form: ``b`` + base32-lower-nopad(``01 72 || multihash``)."""
        raw = bytes((CID_VERSION_1, MULTICODEC_LIBP2P_KEY)) + self.multihash
        return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()!r})"

    def extract_public_key(self) -> PublicKey | None:
        """The embedded public key for identity-multihash PeerIds, else ``None``.

        Raises:
            RemoteProtocolError: the embedded bytes are not a valid key protobuf.
        """
        if self.multihash[0] != MULTIHASH_IDENTITY:
            return None
        decoded = decode_uvarint(self.multihash, 1)
        assert decoded is not None  # checked in __post_init__
        return PublicKey.from_protobuf(self.multihash[1 + decoded[1] :])

    def matches(self, key: PublicKey) -> bool:
        """Whether this PeerId was derived from ``key``."""
        return PeerId.from_public_key(key) == self


def _validate_multihash(multihash: bytes) -> None:
    decoded = decode_uvarint(multihash)
    if decoded is None:
        raise RemoteProtocolError("empty or truncated PeerId multihash")
    code, used = decoded
    length = decode_uvarint(multihash, used)
    if length is None:
        raise RemoteProtocolError("truncated PeerId multihash")
    digest_length, used_length = length
    if len(multihash) != used + used_length + digest_length:
        raise RemoteProtocolError("PeerId multihash length mismatch")
    if code == MULTIHASH_IDENTITY:
        if digest_length > MAX_INLINE_KEY_LENGTH:
            raise RemoteProtocolError("identity PeerId is longer than 42 bytes")
    elif code == MULTIHASH_SHA2_256:
        if digest_length != 32:
            raise RemoteProtocolError("SHA-256 PeerId digest is not 32 bytes")
    else:
        raise RemoteProtocolError(f"unsupported PeerId multihash code {code:#x}")
