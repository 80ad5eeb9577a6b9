"""The signed ack's wire format (trionode/auth/finality.py says what an ack means;
trionode/context/acks.py sends and receives them).

`SignedAck{ack, signature}` where `ack` is the msgpack of `Ack{version, context_id, author,
vv, hlc}` and the Ed25519 signature by `author` covers a domain tag and those bytes. Every
field is bounded, so a hostile peer's ack costs at most `MAX_ACK_BYTES` to look at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trionode.auth.model import TAG_BYTES
from trionode.errors import RemoteProtocolError

ACK_VERSION: Final = 1
MAX_ACK_ENTRIES: Final = 4096
"""Authors an ack may name: a context with more writers than this cannot finalise."""
MAX_ACK_BYTES: Final = 64 + MAX_ACK_ENTRIES * 24 + 256
_DOMAIN: Final = b"trionode/ack/v1"

Tag = Annotated[bytes, msgspec.Meta(min_length=TAG_BYTES, max_length=TAG_BYTES)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=(1 << 63) - 1)]


class Ack(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    version: int
    context_id: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    author: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    vv: Annotated[list[tuple[Tag, Seq]], msgspec.Meta(max_length=MAX_ACK_ENTRIES)]
    hlc: Annotated[int, msgspec.Meta(ge=0)]


class SignedAck(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    ack: bytes
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


_ENC = msgspec.msgpack.Encoder()
_ACK = msgspec.msgpack.Decoder(Ack)
_SIGNED = msgspec.msgpack.Decoder(SignedAck)


def sign_ack(
    member_key: Ed25519PrivateKey, context_id: bytes, vv: Mapping[bytes, int], hlc: int
) -> bytes:
    """A signed ack of `vv` in `context_id` by `member_key` (wire bytes)."""
    author = member_key.public_key().public_bytes_raw()
    ack = Ack(ACK_VERSION, context_id, author, sorted(vv.items()), hlc)
    body = _ENC.encode(ack)
    return _ENC.encode(SignedAck(body, member_key.sign(_DOMAIN + body)))


def open_ack(wire: bytes, context_id: bytes) -> Ack:
    """Decode and verify a signed ack (raises RemoteProtocolError)."""
    if len(wire) > MAX_ACK_BYTES:
        raise RemoteProtocolError(f"ack of {len(wire)} bytes exceeds {MAX_ACK_BYTES}")
    try:
        signed = _SIGNED.decode(wire)
        ack = _ACK.decode(signed.ack)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"malformed ack: {exc}") from None
    if ack.version != ACK_VERSION:
        raise RemoteProtocolError(f"ack version {ack.version} is not {ACK_VERSION}")
    if ack.context_id != context_id:
        raise RemoteProtocolError("ack for another context")
    if len({t for t, _ in ack.vv}) != len(ack.vv):
        raise RemoteProtocolError("ack names an author twice")
    try:
        Ed25519PublicKey.from_public_bytes(ack.author).verify(
            signed.signature, _DOMAIN + signed.ack
        )
    except (InvalidSignature, ValueError):
        raise RemoteProtocolError("bad ack signature") from None
    return ack
