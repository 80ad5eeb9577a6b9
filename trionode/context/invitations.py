"""Invitations and `/trionode/join/1` (DESIGN §7).

An invitation is signed by an admin of the context. It names the context, the app, the
role, an expiry, and either the invitee's member key or the hash of a one-time secret; it
also carries the inviter's peer id and addresses, so the string alone is enough to join:

    trinv1<base58(msgpack(SignedInvitation))>

Joining: the joiner dials the inviter and opens `/trionode/join/1`; its request carries
the invitation, the secret (if any), its new member key, and a proof of possession: that
key's signature over the connection's Noise handshake hash and the invitation id. The
responder checks all of it (signature and admin rights of the inviter, context, expiry,
invitee or unused secret, proof), writes the membership delta, and answers with the
context keys sealed to the joiner (X25519 sealed box, the joiner's Ed25519 member key
converted), the application id and its heads. The joiner then syncs.

The invitation also describes the context's app (`AppRef`: id, name, version, signer and
the blob id of its bundle), signed with the rest, so that a joiner that does not have the
app can decide whether to trust it before anything is fetched, and fetch it from the
inviter (`trionode.context.app_bundles`). The app id is the bundle's hash and covers the
manifest, so the bundle that arrives is checked against what the invitation named.
"""

from __future__ import annotations

import hashlib
import os
from typing import Annotated, Final

import attrs
import base58
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import (
    crypto_box_seal,
    crypto_box_seal_open,
    crypto_sign_ed25519_pk_to_curve25519,
    crypto_sign_ed25519_sk_to_curve25519,
)
from nacl.exceptions import CryptoError

from trionode.errors import RemoteProtocolError, TrionodeError

PREFIX: Final = "trinv1"
JOIN_PROTOCOL: Final = "/trionode/join/1"
_INVITE_DOMAIN: Final = b"trionode/invitation/v1"
_JOIN_DOMAIN: Final = b"trionode/join/v1"
_BUNDLE_FETCH_DOMAIN: Final = b"trionode/bundle-fetch/v1"
MAX_INVITATION: Final = 16 * 1024

Id32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class InvitationError(TrionodeError):
    """An invitation is refused; the message says why (expired, forged, reused, …)."""


class AppRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The context's app as an invitation describes it."""

    application_id: Id32
    bundle_blob_id: Id32
    """The blob holding the packed bundle (`trionode.sdk.bundle.pack_bundle`)."""
    name: Annotated[str, msgspec.Meta(max_length=128)]
    version: Annotated[str, msgspec.Meta(max_length=64)]
    signer: Id32 | None = None
    """The bundle's signer (Ed25519 public key), None if it is unsigned."""


class Invitation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    context_id: Id32
    application_id: Id32
    role: str
    expires_at: float
    inviter: Id32
    """The admin's member key that signs this invitation."""
    inviter_peer: str
    inviter_addrs: Annotated[list[str], msgspec.Meta(max_length=16)]
    nonce: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    invitee: Id32 | None = None
    secret_sha256: Id32 | None = None
    app: AppRef | None = None
    """None in invitations from nodes that do not share bundles (the joiner must have the
    app installed)."""

    @property
    def id(self) -> bytes:
        return hashlib.sha256(_ENCODER.encode(self)).digest()


class SignedInvitation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    invitation: bytes
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
    secret: bytes | None = None
    """The one-time secret itself (only in the string handed to the invitee)."""


class JoinRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    invitation: SignedInvitation
    member: Id32
    proof: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


class JoinResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ok: bool
    error: str = ""
    application_id: bytes = b""
    heads: list[bytes] = msgspec.field(default_factory=list)
    key_id: int = 0
    sealed_keys: bytes = b""
    """crypto_box_seal(msgpack({key_id: key}), joiner's X25519 key)."""


_ENCODER = msgspec.msgpack.Encoder()
_SIGNED = msgspec.msgpack.Decoder(SignedInvitation)
_INVITATION = msgspec.msgpack.Decoder(Invitation)
_KEYS = msgspec.msgpack.Decoder(dict[int, Id32])


@attrs.frozen
class CreatedInvitation:
    text: str
    invitation: Invitation


def create_invitation(
    *,
    admin_key: Ed25519PrivateKey,
    context_id: bytes,
    application_id: bytes,
    role: str,
    expires_at: float,
    inviter_peer: str,
    inviter_addrs: list[str],
    invitee: bytes | None = None,
    app: AppRef | None = None,
) -> CreatedInvitation:
    """A signed invitation; without `invitee` it carries a fresh one-time secret."""
    secret = None if invitee is not None else os.urandom(32)
    invitation = Invitation(
        context_id=context_id,
        application_id=application_id,
        role=role,
        expires_at=expires_at,
        inviter=admin_key.public_key().public_bytes_raw(),
        inviter_peer=inviter_peer,
        inviter_addrs=inviter_addrs[:16],
        nonce=os.urandom(16),
        invitee=invitee,
        secret_sha256=None if secret is None else hashlib.sha256(secret).digest(),
        app=app,
    )
    body = _ENCODER.encode(invitation)
    signed = SignedInvitation(
        invitation=body, signature=admin_key.sign(_INVITE_DOMAIN + body), secret=secret
    )
    text = PREFIX + base58.b58encode(_ENCODER.encode(signed)).decode("ascii")
    return CreatedInvitation(text, invitation)


def parse_invitation(text: str) -> tuple[SignedInvitation, Invitation]:
    """Decode an invitation string and check its signature (not yet its rights/expiry)."""
    text = text.strip()
    if not text.startswith(PREFIX) or len(text) > MAX_INVITATION:
        raise InvitationError("not a trionode invitation (it should start with trinv1)")
    try:
        signed = _SIGNED.decode(base58.b58decode(text[len(PREFIX) :]))
        invitation = _INVITATION.decode(signed.invitation)
    except (ValueError, msgspec.DecodeError):
        raise InvitationError("the invitation is damaged (copy it again, whole)") from None
    verify_signature(signed, invitation)
    return signed, invitation


def verify_signature(signed: SignedInvitation, invitation: Invitation) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(invitation.inviter).verify(
            signed.signature, _INVITE_DOMAIN + signed.invitation
        )
    except (InvalidSignature, ValueError):
        raise InvitationError("the invitation's signature is not valid (forged?)") from None


def decode_invitation(signed: SignedInvitation) -> Invitation:
    try:
        invitation = _INVITATION.decode(signed.invitation)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise RemoteProtocolError("malformed invitation") from None
    return invitation


def proof_message(handshake_hash: bytes, invitation_id: bytes) -> bytes:
    return _JOIN_DOMAIN + handshake_hash + invitation_id


def bundle_proof_message(handshake_hash: bytes, invitation_id: bytes) -> bytes:
    """What an invitee signs to fetch the app bundle before joining (its own domain, so it
    can never stand in for a join proof)."""
    return _BUNDLE_FETCH_DOMAIN + handshake_hash + invitation_id


def decode_signed(data: bytes) -> SignedInvitation:
    try:
        return _SIGNED.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise RemoteProtocolError("malformed invitation") from None


def encode_signed(signed: SignedInvitation) -> bytes:
    return _ENCODER.encode(signed)


def seal_keys(keys: dict[int, bytes], member: bytes) -> bytes:
    recipient = crypto_sign_ed25519_pk_to_curve25519(member)
    return crypto_box_seal(_ENCODER.encode(keys), recipient)


def open_keys(sealed: bytes, member_key: Ed25519PrivateKey) -> dict[int, bytes]:
    public = member_key.public_key().public_bytes_raw()
    secret = crypto_sign_ed25519_sk_to_curve25519(member_key.private_bytes_raw() + public)
    try:
        plain = crypto_box_seal_open(sealed, crypto_sign_ed25519_pk_to_curve25519(public), secret)
        return _KEYS.decode(plain)
    except (CryptoError, msgspec.DecodeError, UnicodeDecodeError):
        raise RemoteProtocolError("the sealed context keys do not open") from None


def encode(message: JoinRequest | JoinResponse) -> bytes:
    return _ENCODER.encode(message)


_REQUEST = msgspec.msgpack.Decoder(JoinRequest)
_RESPONSE = msgspec.msgpack.Decoder(JoinResponse)


def decode_request(data: bytes) -> JoinRequest:
    try:
        return _REQUEST.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed join request: {exc}") from None


def decode_response(data: bytes) -> JoinResponse:
    try:
        return _RESPONSE.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed join response: {exc}") from None
