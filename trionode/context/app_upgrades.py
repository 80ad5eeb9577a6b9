"""Following a context's app: a member that lacks the app the context moved to fetches its
bundle from the other members, then runs it.

Which app a context runs is replicated state: the highest standing upgrade op, else the
create op (`ContextAuthority.application_op`). Since delta format 3 both ops name the
app's bundle (blob id, name, version, signer), so every member can find it:

```
upgrade op applied (or a cancelled upgrade brings back the create op's app)
  └─ decided app installed here?  yes → it runs; nothing to do
       no → views run on the newest installed version the context named before; calls
            raise WaitingForApp (503 / JSON-RPC -32004) with the reason
            AppFollower: may this node run it?  (the trust rule below)
              no  → stays on the old app: a notice, a metric, the reason in the error
              yes → fetch the bundle blob from members, verify, install → it runs
```

The trust rule for an app that arrives with an upgrade: a bundle signed by a key in
`apps.trusted_signers` (as for joining), or signed by the same key as a version of the same
app that this node already runs for this context (the operator trusted that publisher for
this context, by installing it, by `--trust-app` when joining, or through a trusted
signer). An unsigned upgrade is never installed on its own: the operator installs it
(`trionode app install`), and the context switches at once.

Nothing is half-switched: until the bundle is installed no call runs on either version
(views excepted), and deltas from members already on the new version apply as usual (they
are state, not code). Members serve each other the bundle of every app the context's ops
name (`BundleServing`), so a member that joined after an upgrade can still fetch the
original app if that upgrade is later cancelled.
"""

from __future__ import annotations

import logging
import math

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from trionode.context import invitations as inv
from trionode.context.app_bundles import (
    AppBundles,
    AppBundleUnavailableError,
    AppNotTrustedError,
)
from trionode.context.app_choice import app_ref, describe, named_apps, waiting_message
from trionode.context.errors import ContextError, ContextNotFound
from trionode.context.events import ContextEvent, EventHub
from trionode.context.manager import ContextManager
from trionode.context.notices import b58, from_b58
from trionode.context.replicas import Replica

log = logging.getLogger(__name__)


def untrusted_reason(ref: inv.AppRef, context_id: bytes) -> str:
    """What the operator can do about an upgrade this node may not run on its own."""
    archive = f"{ref.name}-{ref.version}.tar.gz"
    signer = "" if ref.signer is None else f"add {b58(ref.signer)} to apps.trusted_signers, or "
    return (
        f"this node may not run it on its own: {signer}fetch and install it yourself: "
        f"`trionode blob get {b58(ref.bundle_blob_id)} -o {archive} --context "
        f"{b58(context_id)}` then `trionode app install {archive}`"
    )


class AppFollowerMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.outcomes = Counter(
            "trionode_app_follow",
            "Attempts to install the app a context moved to, by outcome (installed, "
            "untrusted, unavailable, refused, no_bundle)",
            ["outcome"],
            registry=registry,
        )
        self.waiting = Gauge(
            "trionode_contexts_waiting_for_app",
            "Contexts whose app is not installed on this node (calls refused, views run)",
            registry=registry,
        )


class AppFollower:
    """Installs the app each context moved to when this node lacks it (module docstring).

    It follows every applied delta (`EventHub.watch`) and checks a context again when the
    app its ops decide changes; a fetch no member could serve is retried every `retry`
    seconds; an app this node may not run is not (until the node restarts, or the operator
    installs it)."""

    def __init__(
        self,
        contexts: ContextManager,
        bundles: AppBundles,
        hub: EventHub,
        *,
        retry: float,
        metrics: AppFollowerMetrics,
    ) -> None:
        self._contexts = contexts
        self._bundles = bundles
        self._hub = hub
        self._retry = retry
        self.metrics = metrics
        self._checked: dict[bytes, bytes] = {}
        """Context → the app last decided for it and checked (installed, or waited for)."""
        self._again: set[bytes] = set()
        """Contexts to try again at the next retry."""

    @property
    def waits(self) -> dict[bytes, str]:
        return self._contexts.replicas.app_waits

    async def serve(
        self,
        shutdown_requested: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until shutdown is requested (a fetch in flight then stops; its verified
        chunks are kept for the next start)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._follow)
            task_status.started()
            await shutdown_requested.wait()
            nursery.cancel_scope.cancel(reason="node shutting down")

    async def _follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # (Only received deltas: what this node writes runs an app installed here, and its
        # own upgrades install first.)
        sub = self._hub.watch(remote_only=True, wants=self._concerns)
        task_status.started()
        dirty = set(self._contexts.known_ids())  # a restart finishes what it interrupted
        retry_at = math.inf
        try:
            while True:
                for context_id in sorted(dirty):
                    await self.check(context_id)
                if self._again and retry_at == math.inf:
                    retry_at = trio.current_time() + self._retry
                dirty = set()
                with trio.move_on_at(retry_at) as waited:
                    try:
                        items = [await sub.receive.receive()]
                        while True:  # one check per context for all that arrived meanwhile
                            try:
                                items.append(sub.receive.receive_nowait())
                            except trio.WouldBlock:
                                break
                        dirty = {
                            from_b58(name)  # (each context once)
                            for name in {i.context_id for i in items if isinstance(i, ContextEvent)}
                        }
                    except trio.EndOfChannel:  # fell behind: check everything again
                        sub.close()
                        sub = self._hub.watch(remote_only=True, wants=self._concerns)
                        dirty = set(self._contexts.known_ids())
                if waited.cancelled_caught:
                    dirty, self._again, retry_at = self._again, set(), math.inf
                    for context_id in dirty:
                        self._checked.pop(context_id, None)
        finally:
            sub.close()

    def _concerns(self, event: ContextEvent) -> bool:
        """Whether `check` may have something to do after `event`: the context's app is
        not the one checked last, or the context waits for its app, or that is not known
        without a read. (A data delta leaves the app as it was: most events need no check,
        and waking for each was two task steps per received delta, issue #16.)"""
        context_id = from_b58(event.context_id)
        decided = self._contexts.replicas.application_of(context_id)
        return (
            decided is None or self._checked.get(context_id) != decided or context_id in self.waits
        )

    async def check(self, context_id: bytes) -> None:
        """Make sure the app `context_id` runs is installed here, if this node may run it."""
        try:
            # The record first: a context whose app is installed is not even loaded (at
            # start every context is checked, and replicas load lazily).
            decided = (await self._contexts.get(context_id)).application_id
            if self._checked.get(context_id) == decided:
                # Decided before: only an install by the operator can have changed anything.
                if context_id in self.waits and await self._installed(decided):
                    self._ready(context_id, decided)
                return
            self._checked[context_id] = decided
            if await self._installed(decided):
                self._ready(context_id, decided)
                return
            replica = await self._contexts.replica(context_id)
        except ContextError:  # left or deleted meanwhile
            self._forget(context_id)
            return
        op = replica.authority.application_op()
        ref = None if op is None or op.application_id != decided else app_ref(op)
        if ref is None:
            self.metrics.outcomes.labels("no_bundle").inc()
            self._wait(
                replica,
                "the operation that chose it names no bundle (written by an older trionode): "
                "install it with `trionode app install PATH`",
            )
            return
        trust_app = await self._same_signer(replica, ref)
        try:
            self._bundles.check_trust(ref, trust_app)
        except AppNotTrustedError:
            self.metrics.outcomes.labels("untrusted").inc()
            self._wait(replica, untrusted_reason(ref, context_id))
            return
        self._wait(replica, "fetching its bundle from the context's members")
        try:
            await self._bundles.ensure_app_bundle(ref, context_id=context_id, trust_app=trust_app)
        except AppBundleUnavailableError as exc:
            self.metrics.outcomes.labels("unavailable").inc()
            self._again.add(context_id)
            self._wait(replica, f"{exc} (trying again every {self._retry:g} s)")
            return
        except ContextError as exc:  # refused: not that app, a bad signature, does not load
            self.metrics.outcomes.labels("refused").inc()
            self._again.add(context_id)
            self._wait(replica, f"{exc} (trying again every {self._retry:g} s)")
            return
        self.metrics.outcomes.labels("installed").inc()
        log.info("installed %s for context %s", describe(ref), b58(context_id))
        self._ready(context_id, decided)
        await self._contexts.run_pending_handlers()  # the runs that waited for it

    async def _installed(self, application_id: bytes) -> bool:
        try:
            await self._bundles.applications.get(application_id)
        except ContextNotFound:
            return False
        return True

    async def _same_signer(self, replica: Replica, ref: inv.AppRef) -> bytes | None:
        """`ref`'s app id if a version of the same app by the same signer runs here for
        this context (the trust rule's second half); None otherwise."""
        if ref.signer is None:
            return None
        for application_id in named_apps(replica):
            try:
                record = await self._bundles.applications.get(application_id)
            except ContextNotFound:
                continue
            if record.signer == ref.signer and record.name == ref.name:
                return ref.application_id
        return None

    def _wait(self, replica: Replica, reason: str) -> None:
        context_id = replica.context_id
        if self.waits.get(context_id) == reason:
            return
        first = context_id not in self.waits
        self.waits[context_id] = reason
        self.metrics.waiting.set(len(self.waits))
        message = waiting_message(replica, reason)
        log.log(logging.WARNING if first else logging.INFO, "%s", message)
        self._hub.notify(
            b58(context_id),
            {
                "type": "app_waiting",
                "contextId": b58(context_id),
                "applicationId": b58(replica.record.application_id),
                "reason": message,
            },
        )

    def _ready(self, context_id: bytes, application_id: bytes) -> None:
        self._again.discard(context_id)
        if self.waits.pop(context_id, None) is not None:
            self.metrics.waiting.set(len(self.waits))
            self._hub.notify(
                b58(context_id),
                {
                    "type": "app_ready",
                    "contextId": b58(context_id),
                    "applicationId": b58(application_id),
                },
            )

    def _forget(self, context_id: bytes) -> None:
        self._checked.pop(context_id, None)
        self._again.discard(context_id)
        if self.waits.pop(context_id, None) is not None:
            self.metrics.waiting.set(len(self.waits))
