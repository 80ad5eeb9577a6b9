"""Membership changes of this node's member (grant, remove, leave, revoke, admit), written
through the delta processor like app calls: each is one job, staged in the processor's
batch under the replica's lock and answered once the batch holding it is durable
(`pipeline.py`). The checks that depend on the current membership run inside the job, so
they see every delta committed before it."""

from __future__ import annotations

from collections.abc import Callable

from trionode.auth.model import Kind
from trionode.context.authority import action
from trionode.context.errors import ContextError, ContextNotFound, NotPermitted
from trionode.context.invitations import SignedInvitation
from trionode.context.local_writes import LocalWriter
from trionode.context.pipeline import DeltaPipeline, LocalJob
from trionode.context.replicas import Replica
from trionode.dag.delta import AuthAction, SignedDelta


class Membership:
    def __init__(self, writer: LocalWriter, pipeline: DeltaPipeline) -> None:
        self._writer = writer
        self._pipeline = pipeline

    async def change_members(
        self, context_id: bytes, changes: list[tuple[bytes, str | None]]
    ) -> SignedDelta:
        """As an admin: grant roles (role) or remove members (None), one operation each,
        all in one commit; returns the last one's delta."""
        self._writer.writable("changing roles")
        if not changes:
            raise ContextError("no membership changes given")
        builds = [self._change_for(member, role) for member, role in changes]
        return await self._ops(context_id, builds)

    def _change_for(self, member: bytes, role: str | None) -> Callable[[Replica], AuthAction]:
        if role is None:
            return lambda replica: self._removal(replica, member)
        grant = action(Kind.GRANT, member=member, role=role)
        return lambda _replica: grant

    async def remove_member(self, context_id: bytes, member: bytes) -> SignedDelta:
        """As an admin: remove `member`; the operation introduces a new key, sealed to every
        remaining member (the removed one cannot open it). Deltas written concurrently with
        the removal by `member` are filtered on every node (`trionode.auth.model`)."""
        self._writer.writable("removing a member")
        return await self._ops(context_id, [lambda r: self._removal(r, member)])

    async def leave(self, context_id: bytes) -> SignedDelta:
        """Leave the context (refused for its last admin: appoint another first)."""
        self._writer.writable("leaving a context")
        return await self._ops(context_id, [lambda _r: action(Kind.LEAVE)])

    async def revoke_invitation(self, context_id: bytes, invitation_id: bytes) -> SignedDelta:
        """As an admin: no admission may spend this invitation after this operation."""
        self._writer.writable("revoking an invitation")
        revoke = action(Kind.REVOKE, invitation_id=invitation_id)
        return await self._ops(context_id, [lambda _r: revoke])

    async def admit(
        self, context_id: bytes, invitation: SignedInvitation, member: bytes, role: str
    ) -> SignedDelta:
        """Spend `invitation` on `member` in the replicated state: every node refuses a
        second spend once it holds this one (raises NotPermitted if already spent)."""
        self._writer.writable("admitting a member")
        admit = action(
            Kind.ADMIT,
            member=member,
            role=role,
            invitation=invitation.invitation,
            invitation_signature=invitation.signature,
        )
        return await self._ops(context_id, [lambda _r: admit])

    def _removal(self, replica: Replica, member: bytes) -> AuthAction:
        current = replica.authority.roles()
        if current.get(replica.record.our_member) != "admin":
            raise NotPermitted("only admins can remove members")
        if member not in current:
            raise ContextNotFound("not a member")
        if member == replica.record.our_member:
            raise ContextError("an admin cannot remove itself: leave instead")
        keep = [m for m in current if m != member]
        return self._writer.new_key_action(replica, Kind.REMOVE, keep, member)

    async def _ops(
        self, context_id: bytes, builds: list[Callable[[Replica], AuthAction]]
    ) -> SignedDelta:
        """Stage one operation per `builds` (each built from the replica as the previous
        one left it) in one job; the last one's delta once they are durable. An error
        (NotPermitted, ...) fails the job as a whole: nothing of it is written."""
        writer = self._writer

        def stage(job: LocalJob) -> tuple[SignedDelta, Callable[[], None]]:
            announce: list[Callable[[], None]] = []
            delta: SignedDelta | None = None
            for build in builds:
                auth = build(job.replica)  # (its checks raise before anything changed)
                job.progress.mutated = True
                delta, after = writer.stage_own_op(
                    job.replica, auth, job.batch, job.fresh, job.changes
                )
                announce.append(after)
            assert delta is not None

            def after_commit() -> None:
                for each in announce:
                    each()

            return delta, after_commit

        result = await self._pipeline.write(context_id, stage)
        assert isinstance(result, SignedDelta)
        return result
