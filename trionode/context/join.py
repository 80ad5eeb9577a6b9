"""The two sides of joining a context: issuing invitations and `/trionode/join/1`."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final, Protocol

import base58
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trionode.context import invitations as inv, join_timeline, members, snapshot
from trionode.context.admission import check_invitation
from trionode.context.app_bundles import AppBundles, invited_opener
from trionode.context.applications import Applications
from trionode.context.errors import (
    AlreadyExists,
    ContextError,
    MissingPrerequisite,
    NotPermitted,
    PeerFailed,
)
from trionode.context.manager import ContextManager
from trionode.context.records import ContextRecord
from trionode.context.replication import SESSION_ERRORS, OpenedStream, Replicator, topic_for
from trionode.errors import PeerError, ProtocolError, ReadOnlyError, StreamEndedError, describe
from trionode.net import member_peers
from trionode.net.framed import FramedStream
from trionode.net.host import Connection, Host
from trionode.store.store import AsyncStore, WriteBatch
from trionode.wire.keys import PeerId
from trionode.wire.multiaddr import Multiaddr

log = logging.getLogger(__name__)

MAX_MESSAGE: Final = 64 * 1024


class SyncSession(Protocol):
    """Runs a sync session for a context with a peer now (`SyncManager.sync_now`), on the
    sync stream `opened` if given."""

    def __call__(
        self, context_id: bytes, peer: PeerId, *, opened: OpenedStream | None = None
    ) -> Awaitable[int]: ...


class JoinService:
    def __init__(
        self,
        contexts: ContextManager,
        applications: Applications,
        host: Host,
        replicator: Replicator,
        store: AsyncStore,
        *,
        sync_session: SyncSession | None = None,
        wall_clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
        app_bundles: AppBundles | None = None,
    ) -> None:
        self.contexts = contexts
        self.applications = applications
        self.host = host
        self.replicator = replicator
        self.sync_session = sync_session
        """Run a sync session for a context with a peer now (the sync manager's): the
        first sync of a join, a snapshot. Without it the join fetches the deltas."""
        self.store = store
        self.wall_clock = wall_clock
        self.timeout = timeout
        self.app_bundles = app_bundles
        """Fetches a missing app from the inviter; None: joiners must install it first."""
        self._lock = trio.Lock()
        host.set_handler(inv.JOIN_PROTOCOL, self._serve)

    # -- inviting --------------------------------------------------------------------------

    async def invite(
        self,
        context_id: bytes,
        *,
        role: str = "member",
        expires_in: float = 7 * 86400,
        invitee: bytes | None = None,
    ) -> str:
        if self.contexts.read_only:
            # Its admission would be a write here, so the invitation could never be spent.
            raise ReadOnlyError("inviting")
        if role not in members.ROLES:
            raise ContextError(f"role must be one of {', '.join(members.ROLES)}")
        record = await self.contexts.get(context_id)
        member, key = await self.contexts.member_key(context_id)
        if await self.contexts.role(context_id, member) != "admin":
            raise NotPermitted("only admins can invite")
        created = inv.create_invitation(
            admin_key=key,
            context_id=context_id,
            application_id=record.application_id,
            role=role,
            expires_at=self.wall_clock() + expires_in,
            inviter_peer=str(self.host.peer_id),
            inviter_addrs=[str(a) for a in self.host.advertised_addrs],
            invitee=invitee,
            app=None
            if self.app_bundles is None
            else await self.app_bundles.ref(record.application_id),
        )
        return created.text

    # -- joining ---------------------------------------------------------------------------

    async def join(
        self,
        text: str,
        *,
        member_key: Ed25519PrivateKey | None = None,
        trust_app: bytes | None = None,
    ) -> ContextRecord:
        """Join the context an invitation names.

        If its app is not installed here, the invitation's description of it decides first
        whether it may run here (a trusted signer, or `trust_app` is its id: else
        AppNotTrustedError, before any network); then its bundle is fetched from the
        inviter, verified and installed (see trionode.context.app_bundles), and only then is
        the invitation spent.
        """
        with join_timeline.timeline() as line:
            record = await self._join(text, member_key=member_key, trust_app=trust_app)
            line.mark("done")
        # The phases of this join (benchmarks/join_bench.py prints them as its breakdown).
        log.info("join of %s: %s", base58.b58encode(record.context_id).decode(), line.line())
        return record

    async def _join(
        self, text: str, *, member_key: Ed25519PrivateKey | None, trust_app: bytes | None
    ) -> ContextRecord:
        try:
            signed, invitation = inv.parse_invitation(text)
        except inv.InvitationError as exc:
            raise ContextError(str(exc)) from None
        if invitation.expires_at < self.wall_clock():
            raise ContextError("the invitation has expired")
        if invitation.context_id in self.contexts.known_ids():
            raise AlreadyExists("this node is already a member of that context")
        ref = await self._missing_app(invitation, trust_app)
        if invitation.invitee is not None and member_key is None:
            raise ContextError("this invitation is for a specific member key; pass that key")
        key = member_key or Ed25519PrivateKey.generate()
        member = key.public_key().public_bytes_raw()
        peer = PeerId.from_string(invitation.inviter_peer)
        conn = await self._connect(peer, invitation.inviter_addrs)
        join_timeline.mark("connected")
        if ref is not None:
            assert self.app_bundles is not None
            await self.app_bundles.ensure_app_bundle(
                ref,
                context_id=invitation.context_id,
                peers=[peer],
                trust_app=trust_app,
                opener=invited_opener(signed, invitation.id, key),
            )
        # The first sync's stream is negotiated while the inviter admits us (its durable
        # write): one round trip less between the admission and the snapshot. Closed here
        # if the session did not take it (a refusal, a replaced connection...).
        opened: OpenedStream | None = None
        try:
            try:
                with trio.fail_after(self.timeout):
                    _, stream = await conn.new_stream([inv.JOIN_PROTOCOL])
                    async with stream:
                        proof = key.sign(
                            inv.proof_message(conn.noise.remote.handshake_hash, invitation.id)
                        )
                        request = inv.JoinRequest(invitation=signed, member=member, proof=proof)
                        framed = self._framed(stream, requester=True)
                        await framed.send_frame(inv.encode(request))
                        opened = await self._open_sync_stream(conn)
                        response = inv.decode_response(await framed.receive_frame())
            except (
                trio.TooSlowError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                StreamEndedError,
            ) as exc:
                # Nothing was spent here yet: the user may simply try again.
                raise PeerFailed(
                    f"the inviter {peer} did not answer the join: {describe(exc)}"
                ) from None
            if not response.ok:
                raise NotPermitted(f"the inviter refused: {response.error}")
            join_timeline.mark("admitted")
            record = await self._adopt(invitation, peer, conn, key, response)
            join_timeline.mark("adopted")
            await self._first_sync(invitation, peer, response.heads, opened)
            join_timeline.mark("synced")
        finally:
            if opened is not None:
                await trio.aclose_forcefully(opened.stream)
        return await self.contexts.get(record.context_id)

    async def _adopt(
        self,
        invitation: inv.Invitation,
        peer: PeerId,
        conn: Connection,
        key: Ed25519PrivateKey,
        response: inv.JoinResponse,
    ) -> ContextRecord:
        """Become a member of the context we were admitted to (one commit)."""
        keys = inv.open_keys(response.sealed_keys, key)
        # The first sync may take long, and a node killed during it must find a peer of
        # the context when it restarts (the snapshot resumes with the inviter).
        remember = await member_peers.remember(
            self.store, conn, topic_for(invitation.context_id), invitation.inviter_addrs
        )

        def with_context(batch: WriteBatch) -> None:
            # One commit with the context (one fsync, not three): no session ever sees it
            # without the snapshot's marker, nor a restart without the inviter's address.
            if self.sync_session is not None:
                snapshot.stage_begin(
                    batch, invitation.context_id, source=invitation.inviter, peer=str(peer)
                )
            remember(batch)

        record = await self.contexts.adopt(
            context_id=invitation.context_id,
            application_id=invitation.application_id,
            member_key=key,
            keys=keys,
            key_id=response.key_id,
            extra=with_context,
        )
        self.replicator.subscribe(invitation.context_id)
        return record

    async def _open_sync_stream(self, conn: Connection) -> OpenedStream | None:
        """A sync stream on `conn` for the first sync, or None (no sessions here, or it
        could not be opened: the session opens its own, and says what fails)."""
        if self.sync_session is None:
            return None
        try:
            return await self.replicator.open_sync_stream(conn)
        except (
            PeerError,
            ProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            return None

    async def _missing_app(
        self, invitation: inv.Invitation, trust_app: bytes | None
    ) -> inv.AppRef | None:
        """None if the app is installed here; its description if it can be fetched and may
        run here. Raises ContextError (412) with what to do otherwise."""
        try:
            await self.applications.get(invitation.application_id)
        except ContextError:
            pass
        else:
            return None
        ref = invitation.app
        if ref is None or self.app_bundles is None:
            app = base58.b58encode(invitation.application_id).decode()
            raise MissingPrerequisite(
                f"install the context's application first (application id {app}): "
                "`trionode app install PATH`"
            )
        if ref.application_id != invitation.application_id:
            raise ContextError("the invitation is inconsistent: it names two different apps")
        self.app_bundles.check_trust(ref, trust_app)
        return ref

    async def _first_sync(
        self,
        invitation: inv.Invitation,
        peer: PeerId,
        heads: list[bytes],
        opened: OpenedStream | None = None,
    ) -> None:
        """A snapshot from the inviter, then the deltas written since (the sync manager's
        session). The inviting admin's key, which signed the invitation, is the one source
        of unsigned state this node can trust yet: the snapshot marker names it. If this
        sync fails, the node is still a member and sync sessions finish the job."""
        context_id = invitation.context_id
        session = self.sync_session
        try:
            if session is None:
                with trio.fail_after(self.timeout):
                    await self.replicator.fetch(peer, context_id, set(heads))
                return
            await session(context_id, peer, opened=opened)
        except SESSION_ERRORS as exc:
            log.warning(
                "joined %s; its first sync failed (%s): sync sessions will complete it",
                base58.b58encode(context_id).decode(),
                describe(exc),
            )

    async def _connect(self, peer: PeerId, addrs: list[str]) -> Connection:
        existing = self.host.connections.get(peer)
        if existing is not None and not existing.closed:
            return existing
        last: Exception | None = None
        for text in addrs:
            try:
                addr = Multiaddr.from_string(text).with_peer_id(peer)
                # The inviter is an admin of the context (it signed the invitation): a
                # member, so the dial is never refused for lack of room.
                return await self.host.connect(addr, member=True)
            except (PeerError, ProtocolError, trio.TooSlowError) as exc:
                last = exc
        raise PeerFailed(f"cannot reach the inviter {peer}: {describe(last)}")

    # -- serving ---------------------------------------------------------------------------

    def _framed(self, stream: trio.abc.Stream, *, requester: bool) -> FramedStream:
        limits = self.host.stream_limits
        return FramedStream(
            stream,
            limits.for_requester() if requester else limits,
            max_frame=MAX_MESSAGE,
            what="join stream",
        )

    async def _serve(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        framed = self._framed(stream, requester=False)
        request = inv.decode_request(await framed.receive_frame())
        async with self._lock:  # one join at a time: a one-time secret is used once
            try:
                response = await self._admit(request, conn)
            except inv.InvitationError as exc:
                log.info("join refused for %s: %s", conn.peer_id, exc)
                response = inv.JoinResponse(ok=False, error=str(exc))
        await framed.send_frame(inv.encode(response))
        await stream.send_eof()

    async def _admit(self, request: inv.JoinRequest, conn: Connection) -> inv.JoinResponse:
        signed = request.invitation
        invitation = await check_invitation(
            self.contexts,
            signed,
            request.member,
            request.proof,
            partial(inv.proof_message, conn.noise.remote.handshake_hash),
            now=self.wall_clock(),
        )
        context_id = invitation.context_id
        # The spend is an operation in the replicated state: every node that holds it
        # refuses a second spend, and concurrent spends resolve alike everywhere.
        try:
            await self.contexts.admit(
                context_id,
                inv.SignedInvitation(invitation=signed.invitation, signature=signed.signature),
                request.member,
                invitation.role,
            )
        except (ContextError, ReadOnlyError) as exc:
            raise inv.InvitationError(str(exc)) from None
        keys = await self.contexts.keys(context_id)
        _, heads, _ = await self.contexts.state(context_id)
        record = await self.contexts.get(context_id)
        return inv.JoinResponse(
            ok=True,
            application_id=record.application_id,
            heads=heads,
            key_id=record.key_id,
            sealed_keys=inv.seal_keys(keys, request.member),
        )
