"""`GET /admin-api/contexts/ID/sync` and `POST …/sync?peer=` on two real nodes (loopback)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from trionode.client import ApiError
from trionode.testing import open_test_nodes

KV_STORE = Path(__file__).resolve().parents[2] / "apps" / "kv_store"

pytestmark = pytest.mark.real_network


async def test_sync_status_per_peer_and_sync_with_one_peer(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with (
            open_test_nodes(2, tmp_path) as (first, second),
            first.client() as a,
            second.client() as b,
        ):
            app = await a.install_application(str(KV_STORE))
            await b.install_application(str(KV_STORE))
            context = (await a.create_context(app.application_id)).context_id
            invitation = (await a.invite(context)).invitation
            await b.join(invitation)
            before = time.time()
            synced = await b.request(
                "POST", f"/admin-api/contexts/{context}/sync?peer={first.node.peer_id}"
            )
            assert synced["pending"] == 0
            status = await b.request("GET", f"/admin-api/contexts/{context}/sync")
            assert status["contextId"] == context
            [peer] = status["peers"]
            assert peer["peerId"] == first.node.peer_id
            assert peer["connected"] is True
            assert peer["outcome"] == "ok"
            assert peer["lastSync"]["at"] >= before
            assert peer["lastSync"]["protocol"] in ("none", "delta", "snapshot", "tree")
            assert isinstance(peer["lastSync"]["deltas"], int)
            assert peer["lastError"] is None
            # Only the creator is admin: finality waits for nobody else's ack.
            finality = status["finality"]
            assert len(finality["ackSet"]) == 1
            assert finality["waitingFor"] == []
            assert finality["retired"] == []
            assert finality["nonFinalDeltas"] >= 0
            assert finality["lagSeconds"] >= 0

            # A peer id that is no peer id, one that is not connected, an unknown context.
            with pytest.raises(ApiError, match="400"):
                await b.request("POST", f"/admin-api/contexts/{context}/sync?peer=nope")
            stranger = "12D3KooWEGfdAWYfsx3tXMWSvrzrKhkRMNrQHnpwhwNQev9HoTPG"
            with pytest.raises(ApiError, match="502"):
                await b.request("POST", f"/admin-api/contexts/{context}/sync?peer={stranger}")
            status = await b.request("GET", f"/admin-api/contexts/{context}/sync")
            failed = {p["peerId"]: p for p in status["peers"]}[stranger]
            assert failed["connected"] is False
            assert failed["outcome"] == "failed"
            assert failed["lastSync"] is None
            assert failed["lastError"]["message"]
            unknown = "1" * 32
            with pytest.raises(ApiError, match="404"):
                await b.request("GET", f"/admin-api/contexts/{unknown}/sync")
