"""Apps travel with the context: serving app bundles to joiners, and fetching them.

```
inviter                                          joiner (no app installed)
  invite: the invitation names the app             check_trust(ref, --trust-app) — before any
  (AppRef: id, name, version, signer, bundle         network: a trusted signer, or the operator
  blob id), signed with the rest                     named this app id
                                                   fetch the bundle blob over /trionode/blob/1
  BundleServing.allows_invitee: the invitation      with an InvitedOpen (the invitation and a
  checks out (as for a join, unspent) and the       proof of the member key it will join with)
  blob is the bundle of that context's app         verify: blob → bundle, its hash is the app
                                                     id the invitation names, its signature
                                                     holds, trust as above
                                                   install (pinned blob), then join
```
So an untrusted app is refused before the joiner contacts anyone, and a bundle that is not
the signed one (bytes changed after signing, another app) is refused before its code is
imported and before the invitation is spent.

`AppBundles.ensure_app_bundle` is the one entry point for "make sure this app is installed,
fetching it from these peers if it is missing": a join calls it with an invitation opener,
a member (e.g. a context upgrade) with the default membership proof.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trionode.blobs.manifest import BlobError
from trionode.blobs.protocol import InvitedOpen
from trionode.blobs.store import BlobStore
from trionode.blobs.transfer import BlobTransfer, Opener
from trionode.context import invitations as inv
from trionode.context.admission import check_invitation
from trionode.context.app_choice import describe
from trionode.context.applications import Applications
from trionode.context.errors import (
    ContextError,
    ContextNotFound,
    MissingPrerequisite,
    PeerFailed,
)
from trionode.context.manager import ContextManager, b58
from trionode.context.records import ApplicationRecord
from trionode.errors import RemoteProtocolError, StorageError
from trionode.net.host import Connection
from trionode.sdk.bundle import (
    DEFAULT_LIMITS,
    BundleError,
    BundleSignatureError,
    VerifiedBundle,
    parse_public_key,
    read_bundle,
    verify_bundle,
)
from trionode.wire.keys import PeerId

MAX_BUNDLE_BLOB: Final = DEFAULT_LIMITS.max_total_bytes
"""A bundle blob larger than a bundle may be is not fetched at all."""


class AppNotTrustedError(MissingPrerequisite):
    """The app is neither from a trusted signer nor named by `--trust-app`."""


class AppBundleRefusedError(PeerFailed):
    """The bundle that arrived is not the app the invitation names, or does not verify."""


class AppBundleUnavailableError(PeerFailed):
    """No peer could provide the bundle now."""


def invited_opener(
    signed: inv.SignedInvitation, invitation_id: bytes, member_key: Ed25519PrivateKey
) -> Opener:
    """Opens bundle fetches with an invitation (before joining): see trionode.blobs.protocol."""
    member = member_key.public_key().public_bytes_raw()
    encoded = inv.encode_signed(signed)

    async def open_invited(conn: Connection, blob_id: bytes) -> InvitedOpen:
        proof = member_key.sign(
            inv.bundle_proof_message(conn.noise.remote.handshake_hash, invitation_id)
        )
        return InvitedOpen(invitation=encoded, member=member, proof=proof, blob_id=blob_id)

    return open_invited


class BundleServing:
    """The serving side's answers about app bundles (`trionode.blobs.transfer.BundleAccess`)."""

    def __init__(
        self,
        contexts: ContextManager,
        applications: Applications,
        blobs: BlobStore,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.contexts = contexts
        self.applications = applications
        self.blobs = blobs
        self.wall_clock = wall_clock

    async def serves_bundle(self, context_id: bytes, blob_id: bytes) -> bool:
        # The bundles of every app the context's ops name (so a member that joined after an
        # upgrade can fetch the original app if that upgrade is cancelled), and of the app
        # the record names (contexts created before ops named apps).
        try:
            replica = await self.contexts.replica(context_id)
        except ContextError:
            return False
        apps = {op.application_id for op in replica.authority.application_ops()}
        apps.add(replica.record.application_id)
        for application_id in apps:
            if application_id is None:
                continue
            if await self.applications.bundle_blob(application_id) == blob_id:
                return await self.blobs.has(blob_id)
        return False

    async def allows_invitee(self, conn: Connection, request: InvitedOpen) -> bool:
        try:
            signed = inv.decode_signed(request.invitation)
            invitation = await check_invitation(
                self.contexts,
                signed,
                request.member,
                request.proof,
                partial(inv.bundle_proof_message, conn.noise.remote.handshake_hash),
                now=self.wall_clock(),
            )
        except (inv.InvitationError, RemoteProtocolError, ContextError):
            return False
        return await self.serves_bundle(invitation.context_id, request.blob_id)


class AppBundles:
    """Describe installed apps for invitations; fetch, verify and install missing ones."""

    def __init__(
        self, applications: Applications, blobs: BlobStore, transfer: BlobTransfer
    ) -> None:
        self.applications = applications
        self.blobs = blobs
        self.transfer = transfer

    async def ref(self, application_id: bytes) -> inv.AppRef | None:
        """How an invitation describes an installed app (None if it is not installed)."""
        blob_id = await self.applications.bundle_blob(application_id)
        if blob_id is None:
            return None
        record = await self.applications.get(application_id)
        return inv.AppRef(
            application_id=application_id,
            bundle_blob_id=blob_id,
            name=record.name,
            version=record.version,
            signer=record.signer,
        )

    def check_trust(self, ref: inv.AppRef, trust_app: bytes | None) -> None:
        """Refuse an app this node may not run, with the one line that says what to do.

        Raises:
            AppNotTrustedError: neither signed by a trusted signer nor `trust_app`.
        """
        if trust_app == ref.application_id:
            return
        trusted = {parse_public_key(s) for s in self.applications.trusted_signers}
        if ref.signer is not None and ref.signer in trusted:
            return
        app_id = b58(ref.application_id)
        if ref.signer is None:
            raise AppNotTrustedError(
                f"{describe(ref)} is not trusted: pass --trust-app {app_id} to run it"
            )
        raise AppNotTrustedError(
            f"{describe(ref)} is not trusted: pass --trust-app {app_id} or add "
            f"{b58(ref.signer)} to apps.trusted_signers"
        )

    async def ensure_app_bundle(
        self,
        ref: inv.AppRef,
        *,
        context_id: bytes,
        peers: list[PeerId] | None = None,
        trust_app: bytes | None = None,
        opener: Opener | None = None,
    ) -> ApplicationRecord:
        """The app's record, installing it first from its bundle blob if it is missing here.

        The blob is fetched from `peers` (default: members of `context_id`) with `opener`
        (default: this node's membership proof for `context_id`), and installed only if it
        is the app `ref` names and `check_trust` allows it.

        Raises:
            AppNotTrustedError: see `check_trust` (nothing is fetched).
            AppBundleUnavailableError: no peer could provide the bundle now.
            AppBundleRefusedError: what arrived is not that app, or its signature fails.
            ContextError: the bundle is that app but its code does not load.
        """
        try:
            return await self.applications.get(ref.application_id)
        except ContextNotFound:
            pass
        self.check_trust(ref, trust_app)
        blob_id = ref.bundle_blob_id
        try:
            await self.transfer.fetch(
                blob_id, context_id, peers=peers, opener=opener, max_size=MAX_BUNDLE_BLOB
            )
        except BlobError as exc:
            raise AppBundleUnavailableError(f"cannot fetch {describe(ref)}: {exc}") from None
        try:
            packed = b"".join([piece async for piece in await self.blobs.read(blob_id)])
            verified = self._verify(ref, packed, trust_app)
            return await self.applications.install_verified(
                verified, packed, f"blob:{b58(blob_id)}", blob_id
            )
        except (BundleError, StorageError, BlobError, ContextError) as exc:
            await self.blobs.delete(blob_id)  # never kept, never served on
            if isinstance(exc, ContextError):
                raise
            raise AppBundleRefusedError(f"{describe(ref)} refused: {exc}") from None

    def _verify(self, ref: inv.AppRef, packed: bytes, trust_app: bytes | None) -> VerifiedBundle:
        bundle = read_bundle(packed, source=f"the bundle of {ref.name} v{ref.version}")
        if bundle.app_id != ref.application_id:
            raise AppBundleRefusedError(
                f"{describe(ref)} refused: the bundle that arrived is another app "
                f"({b58(bundle.app_id)}): changed after signing, or not the one invited to"
            )
        manifest = bundle.manifest
        try:
            signer = None if manifest.signer is None else parse_public_key(manifest.signer)
        except ValueError as exc:
            raise BundleSignatureError(str(exc)) from None
        if (manifest.name, manifest.version, signer) != (ref.name, ref.version, ref.signer):
            raise AppBundleRefusedError(f"{describe(ref)} refused: the invitation misdescribes it")
        return verify_bundle(
            bundle,
            self.applications.trusted_signers,
            installed_locally=trust_app == ref.application_id,
        )
