"""Per-context authorization state: the auth graph, each delta's version vector and the
verdicts (DESIGN §7.1; the ruleset itself is `trionode.auth.model`).

`ContextAuthority` is plain data and pure methods (no I/O): the manager feeds it every
delta it applies, in causal order, and asks it for verdicts. Everything it holds is
derived from signed delta headers, except the version vectors of *checkpoints* (heads
adopted from a snapshot or tree comparison, whose bodies we never saw), which the state's
source tells us, as it tells us the state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import attrs
import msgspec

from trionode.auth.finality import Finality, finality, vv_max, vv_min
from trionode.auth.model import (
    AuthGraph,
    Kind,
    Op,
    Resolution,
    StaticError,
    Verdict,
    application_of,
    base_application_of,
    tag,
    version_key,
)
from trionode.context.invitations import (
    InvitationError,
    SignedInvitation,
    decode_invitation,
    verify_signature,
)
from trionode.crdt import ntp64_from_unix
from trionode.dag.delta import GENESIS, AuthAction, DeltaHeader, header_vv
from trionode.errors import RemoteProtocolError

KINDS: Final = frozenset(k.value for k in Kind)


class AuthRejected(RemoteProtocolError):
    """A delta no honest member writes (a broken chain, an op without authority)."""


class DeltaMeta(msgspec.Struct, frozen=True):
    """An applied delta's header as authority needs it (one per delta held: a struct, not
    attrs, whose frozen `__init__` cost ~1 us per delta written or received)."""

    author: bytes
    seq: int
    vv: Mapping[bytes, int]
    key_id: int
    op: bool
    hlc: int = 0
    size: int = 0
    """Its wire bytes (0 where the caller did not say): what it weighs in the undo log."""


def op_from_header(delta_id: bytes, header: DeltaHeader) -> Op:
    """The resolver's view of an op delta (signature already checked)."""
    action = header.auth
    assert action is not None
    if action.kind not in KINDS:
        raise AuthRejected(f"unknown membership operation {action.kind!r}")
    kind = Kind(action.kind)
    fields: dict[str, object] = {}
    if kind is Kind.ADMIT:
        if action.invitation is None or action.invitation_signature is None:
            raise AuthRejected("an admission carries its signed invitation")
        signed = SignedInvitation(
            invitation=action.invitation, signature=action.invitation_signature
        )
        try:
            invitation = decode_invitation(signed)
            verify_signature(signed, invitation)
        except InvitationError as exc:
            raise AuthRejected(str(exc)) from None
        if invitation.context_id != header.context_id:
            raise AuthRejected("the invitation is for another context")
        if invitation.role != action.role:
            raise AuthRejected("the admission's role is not the invitation's")
        fields = {
            "invitation_id": invitation.id,
            "inviter": invitation.inviter,
            "invitee": invitation.invitee,
            "expires_at": ntp64_from_unix(max(0.0, min(invitation.expires_at, 2.0**32 - 1))),
        }
    elif kind is Kind.REVOKE:
        fields = {"invitation_id": action.invitation_id}
    elif kind in (Kind.CREATE, Kind.UPGRADE):
        # What a member needs to fetch the app (format 3; None in older ops).
        fields = {
            "application_id": action.application_id,
            "app_version": action.app_version,
            "app_name": action.app_name,
            "bundle_blob_id": action.bundle_blob_id,
            "app_signer": action.app_signer,
        }
    return Op(
        id=delta_id,
        author=header.author,
        seq=header.seq,
        vv=header_vv(header),
        kind=kind,
        target=action.member,
        role=action.role,
        hlc=header.hlc,
        key_id=action.key_id,
        parents=tuple(action.parents),
        **fields,  # type: ignore[arg-type]
    )


@attrs.define
class ContextAuthority:
    graph: AuthGraph = attrs.field(factory=AuthGraph)
    meta: dict[bytes, DeltaMeta] = attrs.field(factory=dict)
    checkpoint_vv: dict[bytes, dict[bytes, int]] = attrs.field(factory=dict)
    """Version vectors of checkpoints (heads adopted as state), as their source told us."""
    by_author_seq: dict[tuple[bytes, int], set[bytes]] = attrs.field(factory=dict)
    max_seq: dict[bytes, int] = attrs.field(factory=dict)
    """Author tag → highest sequence number recorded (our own next one follows it)."""
    verdicts: dict[bytes, Verdict] = attrs.field(factory=dict)
    """Verdict on each applied *data* delta (ops have theirs in the resolution)."""
    _judged: Resolution | None = None
    """The resolution the verdicts were last computed under."""
    _touched: set[bytes] = attrs.field(factory=set)
    """Authors whose deltas the next rejudge must judge again (they equivocated, or deltas
    of theirs were applied without a verdict of their own: `recheck`)."""
    latest: dict[bytes, tuple[int, Mapping[bytes, int]]] = attrs.field(factory=dict)
    """Author tag → (seq, vv) of its latest delta held: its implicit ack."""
    acks: dict[bytes, dict[bytes, int]] = attrs.field(factory=dict)
    """Author tag → the vector of its latest signed ack (trionode/auth/finality.py)."""
    _frontier: dict[bytes, int] = attrs.field(factory=dict)
    """Pointwise max of every recorded delta's vv."""
    _generation: int = 0
    _finality: tuple[tuple[int, int], Finality] | None = None
    folded: set[bytes] = attrs.field(factory=set)
    """Ids of deltas folded here (context/folding.py): their bodies are gone for good."""
    _undo: dict[bytes, int] = attrs.field(factory=dict)
    """Data deltas not seen final yet → their size (see `nonfinal_bytes`)."""
    _undo_bytes: int = 0
    _undo_final: Mapping[bytes, int] = attrs.field(factory=dict)
    """The final frontier `_undo` was last swept with."""

    # -- version vectors ------------------------------------------------------------------

    def vv_of(self, delta_id: bytes) -> Mapping[bytes, int] | None:
        if delta_id == GENESIS:
            return {}
        meta = self.meta.get(delta_id)
        if meta is not None:
            return meta.vv
        return self.checkpoint_vv.get(delta_id)

    def merged_vv(self, ids: Iterable[bytes]) -> tuple[dict[bytes, int], bool]:
        """The pointwise max of the ids' vectors, and whether every one was known."""
        out: dict[bytes, int] = {}
        complete = True
        for delta_id in ids:
            vv = self.vv_of(delta_id)
            if vv is None:
                complete = False
                continue
            for k, v in vv.items():
                if v > out.get(k, 0):
                    out[k] = v
        return out, complete

    def next_local(self, heads: Iterable[bytes], author: bytes) -> tuple[int, dict[bytes, int]]:
        """(seq, vv of the parents) for a delta `author` writes on `heads`."""
        vv, _ = self.merged_vv(heads)
        own = max(vv.get(tag(author), 0), self.max_seq.get(tag(author), 0))
        return own + 1, vv

    def check_chain(self, header: DeltaHeader) -> None:
        """The header's vv must be its parents' vv plus its own seq (where we know the
        parents'), so sequence numbers form one chain per honest author."""
        parents, complete = self.merged_vv(header.parents)
        vv = header_vv(header)
        own = tag(header.author)
        if header.seq != parents.get(own, 0) + 1 and complete:
            raise AuthRejected("the delta's sequence number does not follow its past")
        if complete:
            expected = dict(parents)
            expected[own] = header.seq
            if vv != expected:
                raise AuthRejected("the delta's version vector is not its parents'")
        elif any(vv.get(k, 0) < v for k, v in parents.items()) or header.seq <= parents.get(own, 0):
            raise AuthRejected("the delta's version vector goes backwards")

    # -- applying --------------------------------------------------------------------------

    def record(self, delta_id: bytes, header: DeltaHeader, size: int = 0) -> bool:
        """Remember an applied delta's meta (`size`: its wire bytes); True if it makes an
        author equivocate (a second delta with one (author, seq))."""
        vv = header_vv(header)
        op = header.auth is not None
        self.meta[delta_id] = DeltaMeta(
            header.author, header.seq, vv, header.key_id, op, header.hlc, size
        )
        if not op and delta_id not in self._undo:
            self._undo[delta_id] = size
            self._undo_bytes += size
        same = self.by_author_seq.setdefault((tag(header.author), header.seq), set())
        same.add(delta_id)
        author = tag(header.author)
        self.max_seq[author] = max(self.max_seq.get(author, 0), header.seq)
        known = self.latest.get(author)
        if known is None or header.seq > known[0]:
            self.latest[author] = (header.seq, vv)
        for k, v in vv.items():
            if v > self._frontier.get(k, 0):
                self._frontier[k] = v
        self._generation += 1
        if len(same) > 1:
            self._touched.add(header.author)
            return True
        return False

    def check_data(self, header: DeltaHeader) -> None:
        """Static checks of a data delta (raises AuthRejected: never stored)."""
        try:
            self.graph.check_data(header.author, header_vv(header), header.key_id)
        except StaticError as exc:
            raise AuthRejected(str(exc)) from None

    def check_op(self, delta_id: bytes, header: DeltaHeader) -> None:
        """Static checks of an op, without adding it (raises AuthRejected)."""
        try:
            self.graph.check(op_from_header(delta_id, header))
        except StaticError as exc:
            raise AuthRejected(str(exc)) from None

    def verdict_for(self, header: DeltaHeader) -> tuple[Verdict, str]:
        """The verdict a data delta not yet recorded would get."""
        return self.resolution().verdict(
            author=header.author,
            seq=header.seq,
            vv=header_vv(header),
            key_id=header.key_id,
            equivocating=bool(self.by_author_seq.get((tag(header.author), header.seq))),
        )

    def add_op(self, delta_id: bytes, header: DeltaHeader) -> Op:
        """Statically check and add an op (raises AuthRejected)."""
        op = op_from_header(delta_id, header)
        self._generation += 1
        try:
            return self.graph.add(op)
        except StaticError as exc:
            raise AuthRejected(str(exc)) from None

    # -- finality --------------------------------------------------------------------------

    def frontier(self) -> dict[bytes, int]:
        """What our DAG reaches: the max of every held delta's and checkpoint's vector."""
        return vv_max([self._frontier, *self.checkpoint_vv.values()])

    def note_ack(self, author: bytes, vv: Mapping[bytes, int]) -> bool:
        """Keep a (verified) signed ack if it says more than the one we hold; True if so."""
        key = tag(author)
        known = self.acks.get(key, {})
        merged = vv_max([known, vv])
        if merged == known:
            return False
        self.acks[key] = merged
        self._generation += 1
        return True

    def finality(self) -> Finality:
        """Which deltas are final (`trionode.auth.finality`), cached until something
        that can move it arrives."""
        stamp = (self._generation, len(self.checkpoint_vv))
        if self._finality is not None and self._finality[0] == stamp:
            return self._finality[1]
        candidates: dict[bytes, list[Mapping[bytes, int]]] = {
            t: [vv] for t, (_, vv) in self.latest.items()
        }
        for t, vv in self.acks.items():
            candidates.setdefault(t, []).append(vv)
        result = finality(self.resolution(), candidates, self.frontier())
        self._finality = (stamp, result)
        return result

    def fold(self, delta_id: bytes) -> None:
        """A final delta was folded (context/folding.py): it is a checkpoint from now on,
        known by its vector (and its (author, seq), kept in `by_author_seq` for
        equivocation), as it will be after a restart."""
        meta = self.meta.pop(delta_id)
        self.verdicts.pop(delta_id, None)
        self.checkpoint_vv[delta_id] = dict(meta.vv)
        self.folded.add(delta_id)
        self._undo_bytes -= self._undo.pop(delta_id, 0)

    def note_folded(self, delta_id: bytes, author_tag: bytes, seq: int) -> None:
        """A delta folded before a restart (only its vector is left, as a checkpoint): its
        (author, seq) is still taken, so a second delta with it equivocates."""
        self.by_author_seq.setdefault((author_tag, seq), set()).add(delta_id)
        self.max_seq[author_tag] = max(self.max_seq.get(author_tag, 0), seq)
        self.folded.add(delta_id)

    def nonfinal_bytes(self) -> int:
        """Wire bytes of the data deltas held that are not final: the undo log, which
        `auth.max_nonfinal_bytes` bounds. Kept as a running sum; the deltas that became
        final are swept out only when the final frontier moved."""
        final = self.finality()
        if final.final != self._undo_final:
            done = [i for i in self._undo if (m := self.meta.get(i)) and final.is_final(m.vv)]
            for delta_id in done:
                self._undo_bytes -= self._undo.pop(delta_id)
            self._undo_final = dict(final.final)
        return self._undo_bytes

    def undo_log_over(self, limit: int) -> bool:
        """`nonfinal_bytes() >= limit`, cheaply while the running sum (which only
        over-counts until swept) stays below: no finality computed per delta."""
        return self._undo_bytes >= limit and self.nonfinal_bytes() >= limit

    def acked_by_all(self, us: bytes) -> dict[bytes, int]:
        """What every other AckSet member than `us` has acknowledged (its latest ack or
        delta, counted or not yet; our own ack follows what we take): a delta within it is
        final as soon as we hold its past, so a full undo log still takes it (else a node
        that refused it could never count the acks that name it, and stall for good)."""
        final = self.finality()
        vectors: list[Mapping[bytes, int]] = []
        for member in final.ack_set - {us}:
            t = tag(member)
            latest = self.latest.get(t)
            seen = [vv for vv in (self.acks.get(t), latest and latest[1]) if vv]
            if not seen:
                return {}
            vectors.append(vv_max(seen))
        return vv_min(vectors) if vectors else {}

    def is_final(self, delta_id: bytes) -> bool:
        meta = self.meta.get(delta_id)
        return meta is not None and self.finality().is_final(meta.vv)

    def non_final_data(self) -> list[tuple[bytes, DeltaMeta]]:
        """The data deltas held whose verdict may still change (the undo log)."""
        f = self.finality()
        return [(i, m) for i, m in self.meta.items() if not m.op and not f.is_final(m.vv)]

    def resolution(self) -> Resolution:
        return self.graph.resolution()

    def judge(self, delta_id: bytes) -> tuple[Verdict, str]:
        meta = self.meta[delta_id]
        return self.resolution().verdict(
            author=meta.author,
            seq=meta.seq,
            vv=meta.vv,
            key_id=meta.key_id,
            equivocating=len(self.by_author_seq.get((tag(meta.author), meta.seq), ())) > 1,
        )

    def rejudge(self) -> dict[bytes, tuple[Verdict, Verdict]]:
        """Judge applied data deltas again after ops or equivocations arrived; {id: (was,
        now)} for those that changed (the state must lose or regain their effects).

        Only what can have changed is judged: the deltas of a new loss's subject and of
        equivocating authors, unless an op known before changed status (an authority
        cascade) or a new op lies in the past of deltas we hold (it came with state):
        then every delta is judged again."""
        new = self.resolution()
        old, self._judged = self._judged, new
        authors, self._touched = self._touched, set()
        everything = old is None
        if old is not None:
            for i in old.ops:
                if (i in old.standing) != (i in new.standing) or (i in old.filtered) != (
                    i in new.filtered
                ):
                    everything = True
                    break
        if not everything and old is not None:
            for i in set(new.ops) - set(old.ops):
                op = new.ops[i]
                if op.lost and op.subject is not None:
                    authors.add(op.subject)
                if any(op.in_past_of(m.vv) for m in self.meta.values() if not m.op):
                    everything = True
                    break
        changed: dict[bytes, tuple[Verdict, Verdict]] = {}
        for delta_id, was in list(self.verdicts.items()):
            if not everything and self.meta[delta_id].author not in authors:
                continue
            now, _ = self.judge(delta_id)
            if now is not was:
                changed[delta_id] = (was, now)
                self.verdicts[delta_id] = now
        return changed

    def recheck(self, author: bytes) -> None:
        """Judge `author`'s applied deltas again at the next `rejudge` (a verdict of theirs
        was assumed, not computed)."""
        self._touched.add(author)

    def judged(self) -> None:
        """Every verdict is current (after a load): later rejudges may be incremental."""
        self._judged = self.resolution()
        self._touched = set()

    # -- queries ---------------------------------------------------------------------------

    def auth_parents(self, vv: Mapping[bytes, int]) -> list[bytes]:
        """The maximal ops in the past named by `vv`: an op's auth parents."""
        past = [o for o in self.graph.ops.values() if o.in_past_of(vv)]
        # Deepest first: an op not covered yet is maximal, and the ancestors of the maximal
        # ones cover every other op (ancestor sets are closed), so only theirs are merged,
        # not every op's (O(n^2) for a context of n ops).
        past.sort(key=lambda o: o.order_key, reverse=True)
        covered: set[bytes] = set()
        parents: list[bytes] = []
        for o in past:
            if o.id not in covered:
                parents.append(o.id)
                covered |= o.ancestors
        return sorted(parents)

    @property
    def creations(self) -> set[bytes]:
        return {i for i, op in self.graph.ops.items() if op.kind is Kind.CREATE}

    def roles(self) -> dict[bytes, str]:
        return self.resolution().current()

    def role(self, member: bytes) -> str | None:
        return self.roles().get(member)

    def application(self) -> bytes | None:
        """The application standing upgrades moved the context to, else the one its create
        op names (None: neither, a context created before ops named apps)."""
        op = self.application_op()
        return None if op is None else op.application_id

    def application_op(self) -> Op | None:
        """The op that decides the context's application (see `application`)."""
        resolution = self.resolution()
        return application_of(resolution) or base_application_of(resolution)

    def application_ops(self) -> list[Op]:
        """Every op that names an app (the create op, upgrades standing or filtered), the
        highest version first: the apps members serve each other (`app_upgrades`)."""
        named = [
            op
            for op in self.graph.ops.values()
            if op.kind in (Kind.CREATE, Kind.UPGRADE) and op.application_id is not None
        ]
        return sorted(
            named,
            key=lambda op: (version_key(op.app_version or ""), op.application_id or b""),
            reverse=True,
        )


def action(kind: Kind, **fields: object) -> AuthAction:
    return AuthAction(kind=kind.value, **fields)  # type: ignore[arg-type]


_VV = msgspec.msgpack.Decoder(list[tuple[bytes, int]])
_ENC = msgspec.msgpack.Encoder()


def encode_vv(vv: Mapping[bytes, int]) -> bytes:
    return _ENC.encode(sorted(vv.items()))


def decode_vv(data: bytes) -> dict[bytes, int]:
    try:
        return dict(_VV.decode(data))
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise RemoteProtocolError("malformed version vector") from None
