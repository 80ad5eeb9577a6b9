"""What a join checks of an invitation, short of spending it (shared by the join itself and
the bundle fetch that may precede it)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trionode.context import invitations as inv, members
from trionode.context.manager import ContextManager


async def check_invitation(
    contexts: ContextManager,
    signed: inv.SignedInvitation,
    member: bytes,
    proof: bytes,
    proof_message: Callable[[bytes], bytes],
    *,
    now: float,
) -> inv.Invitation:
    """Everything a join checks of an invitation here, short of spending it: the admin's
    signature and rights, the context, the expiry, the role, the proof of possession of
    `member` (its signature over `proof_message(invitation id)`), and the invitee or
    one-time secret.

    Raises:
        InvitationError: any of it fails (the message says which).
        RemoteProtocolError: the invitation does not decode.
    """
    invitation = inv.decode_invitation(signed)
    inv.verify_signature(signed, invitation)
    context_id = invitation.context_id
    if context_id not in contexts.known_ids():
        raise inv.InvitationError("this node is not a member of that context")
    if invitation.expires_at < now:
        raise inv.InvitationError("the invitation has expired")
    if await contexts.role(context_id, invitation.inviter) != "admin":
        raise inv.InvitationError("the inviter is not an admin of the context")
    if invitation.role not in members.ROLES:
        raise inv.InvitationError("the invitation names an unknown role")
    try:
        Ed25519PublicKey.from_public_bytes(member).verify(proof, proof_message(invitation.id))
    except (InvalidSignature, ValueError):
        raise inv.InvitationError("no proof of possession of the member key") from None
    if invitation.invitee is not None and invitation.invitee != member:
        raise inv.InvitationError("the invitation is for another member key")
    if invitation.secret_sha256 is not None:
        secret = signed.secret
        if secret is None or hashlib.sha256(secret).digest() != invitation.secret_sha256:
            raise inv.InvitationError("the invitation's secret is missing or wrong")
    return invitation
