"""Group commit under SIGKILL: a real `trionode start` process takes a burst of concurrent
JSON-RPC calls, is killed with SIGKILL in the middle of it, and after a restart every call
it had acknowledged is there (acknowledged means durable: `trionode/context/pipeline.py`)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from tests.replication.test_processes import cli, init, running
from trionode.client.http import ApiError, open_client
from trionode.layout import read_api_url, read_token

pytestmark = pytest.mark.real_network

CLIENTS = 32
KILL_AFTER = 300
"""Acknowledged calls before the kill (the burst goes on while it lands)."""


# A writer's request cut by the SIGKILL leaves httpx's body iterator unfinished; its
# garbage collection warns. The writes are what this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_every_acknowledged_call_survives_sigkill_during_a_burst(tmp_path: Path) -> None:
    home = tmp_path / "a"
    await init(home)
    acknowledged: list[str] = []
    with trio.fail_after(240):
        async with running(home) as proc:
            app = await cli(
                home, "app", "install", str(Path(__file__).parents[2] / "apps/kv_store")
            )
            context = str((await cli(home, "context", "create", app["applicationId"]))["contextId"])
            url = read_api_url(home)
            assert url is not None
            enough = trio.Event()

            async def writer(client_no: int) -> None:
                async with open_client(url, read_token(home), request_timeout=30) as client:
                    for i in range(10_000):
                        key = f"c{client_no}-{i}"
                        try:
                            await client.call(context, "set", {"key": key, "value": key})
                        except ApiError as exc:
                            if exc.status is not None:
                                raise  # an answer: only "cannot reach the node" ends a writer
                            return  # the node is gone: this call was never acknowledged
                        acknowledged.append(key)
                        if len(acknowledged) >= KILL_AFTER:
                            enough.set()

            async with trio.open_nursery() as nursery:
                for n in range(CLIENTS):
                    nursery.start_soon(writer, n)
                await enough.wait()
                proc.send_signal(signal.SIGKILL)
                assert await proc.wait() == -signal.SIGKILL
        assert len(acknowledged) >= KILL_AFTER
        async with running(home):
            entries = await cli(home, "call", context, "entries")
    stored = entries["output"]
    missing = [key for key in acknowledged if stored.get(key) != key]
    assert not missing, f"{len(missing)} acknowledged calls lost: {missing[:5]}"
