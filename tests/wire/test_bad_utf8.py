"""msgspec raises UnicodeDecodeError (not DecodeError) for a string field that is not UTF-8:
every decoder of what a peer sends must turn that into its own typed error too, or one
message from a peer escapes as an unexpected exception."""

from __future__ import annotations

import msgspec
import pytest

from trionode.context import invitations
from trionode.errors import RemoteProtocolError


def bad_utf8(message: msgspec.Struct, good: str) -> bytes:
    """`message` encoded, with the string `good` replaced by bytes of the same length that
    are not UTF-8 (the msgpack framing stays valid)."""
    wire = msgspec.msgpack.encode(message)
    assert wire.count(good.encode()) == 1
    return wire.replace(good.encode(), b"\xff" * len(good.encode()))


def test_a_join_response_with_a_bad_string_is_a_protocol_error() -> None:
    wire = bad_utf8(invitations.JoinResponse(ok=False, error="refused-here"), "refused-here")
    with pytest.raises(UnicodeDecodeError):
        msgspec.msgpack.decode(wire, type=invitations.JoinResponse)  # what msgspec does
    with pytest.raises(RemoteProtocolError, match="malformed join response"):
        invitations.decode_response(wire)


def test_an_invitation_with_a_bad_string_is_a_protocol_error() -> None:
    invitation = invitations.Invitation(
        context_id=b"c" * 32,
        application_id=b"a" * 32,
        role="member-role",
        expires_at=0.0,
        inviter=b"i" * 32,
        inviter_peer="peer-id-text",
        inviter_addrs=[],
        nonce=b"n" * 16,
    )
    signed = invitations.SignedInvitation(
        invitation=bad_utf8(invitation, "peer-id-text"), signature=b"s" * 64
    )
    with pytest.raises(RemoteProtocolError, match="malformed invitation"):
        invitations.decode_invitation(signed)
