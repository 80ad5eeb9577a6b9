"""Which app's code serves a call on a context: the app its ops decide, or, while that one
is not installed here (an upgrade still being fetched: `app_upgrades.py`), the previous
version for views only."""

from __future__ import annotations

from trionode.auth.model import Op
from trionode.context import invitations as inv
from trionode.context.errors import ContextNotFound, WaitingForApp
from trionode.context.local_writes import AppLoader
from trionode.context.notices import b58
from trionode.context.replicas import Replica, ReplicaStore
from trionode.sdk.app import App, EntryKind


def describe(ref: inv.AppRef) -> str:
    signer = "unsigned" if ref.signer is None else f"signer {b58(ref.signer)}"
    return f"app {b58(ref.application_id)} ({ref.name} v{ref.version}, {signer})"


def app_ref(op: Op) -> inv.AppRef | None:
    """How an op names its app's bundle (None: an op from before format 3 names none)."""
    if (
        op.application_id is None
        or op.bundle_blob_id is None
        or op.app_name is None
        or op.app_version is None
    ):
        return None
    return inv.AppRef(
        application_id=op.application_id,
        bundle_blob_id=op.bundle_blob_id,
        name=op.app_name,
        version=op.app_version,
        signer=op.app_signer,
    )


def named_apps(replica: Replica) -> list[bytes]:
    """The apps the context's ops name, the highest version first, then the one it was
    created with if no op names it (contexts from before format 3)."""
    named = [op.application_id for op in replica.authority.application_ops()]
    base = replica.record.base_application_id
    return [a for a in named if a is not None] + ([base] if base is not None else [])


def waiting_message(replica: Replica, reason: str | None) -> str:
    app = replica.record.application_id
    op = replica.authority.application_op()
    ref = None if op is None or op.application_id != app else app_ref(op)
    what = f"app {b58(app)}" if ref is None else describe(ref)
    return (
        f"context {b58(replica.context_id)} is waiting for {what}: "
        f"{reason or 'it is not installed on this node yet'}"
    )


async def running_app(
    apps: AppLoader, replicas: ReplicaStore, replica: Replica, method: str | None = None
) -> App:
    """The app whose code serves `method` on `replica`: the context's app if it is
    installed here. Otherwise a view runs on the newest installed version the context
    named before; anything else raises WaitingForApp (with why it waits, if known)."""
    decided = replica.record.application_id
    try:
        return await apps.load(decided)
    except ContextNotFound:
        pass
    if method is not None:
        for application_id in named_apps(replica):
            if application_id == decided:
                continue
            try:
                previous = await apps.load(application_id)
            except ContextNotFound:
                continue
            entry = previous.entry(method)
            if entry is not None and entry.kind is EntryKind.VIEW:
                return previous
            break
    raise WaitingForApp(waiting_message(replica, replicas.app_waits.get(replica.context_id)))
