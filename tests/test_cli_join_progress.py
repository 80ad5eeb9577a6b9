"""`trionode context join` shows the snapshot's progress (entries, bytes, rate, ETA): one
updating line on a terminal, plain lines otherwise; the same notices reach WebSocket
subscribers (trionode/cli_progress.py, SyncManager._snapshot_progress)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import base58
import msgspec
import pytest
import trio

from trionode.cli_progress import ProgressLine, describe
from trionode.config import FileConfig
from trionode.context.events import ContextEvent, EventHub, Notice, Replay
from trionode.context.folding import fold_all
from trionode.sync.driver import SyncServer
from trionode.testing import TestNode, open_test_node

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "apps"
ENTRIES = 120


def _notice(entries: int, *, done: bool = False, eta: float | None = 30.0) -> dict[str, Any]:
    return {
        "type": "snapshot_progress",
        "entries": entries,
        "entriesTotal": 1000,
        "bytes": entries * 2048,
        "entriesPerSecond": 250.0,
        "bytesPerSecond": 512_000,
        "etaSeconds": eta,
        "done": done,
    }


def test_a_notice_reads_as_entries_bytes_rate_and_eta() -> None:
    assert describe(_notice(250, eta=75.4)) == (
        "snapshot: 250/1,000 entries (25%), 500.0 KiB, 500.0 KiB/s, 250 entries/s, ETA 1:15"
    )
    assert describe(_notice(1000, done=True)).endswith("entries/s, done")
    assert "ETA" not in describe(_notice(0, eta=None))


def test_on_a_terminal_one_line_is_rewritten_in_place() -> None:
    out = io.StringIO()
    line = ProgressLine(out, tty=True)
    line.show(_notice(100))
    line.show(_notice(1000, done=True))
    line.close()
    text = out.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    assert text.count("\r") == 2
    assert text.rstrip().endswith("done")


def test_elsewhere_plain_lines_at_most_one_a_second_and_always_the_last() -> None:
    out = io.StringIO()
    now = [0.0]
    line = ProgressLine(out, tty=False, clock=lambda: now[0])
    for entries in (100, 200, 300):
        line.show(_notice(entries))
        now[0] += 0.4
    now[0] += 1.0
    line.show(_notice(400))
    line.show(_notice(1000, done=True))
    line.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [entry.split("/")[0] for entry in lines] == [
        "snapshot: 100",
        "snapshot: 400",
        "snapshot: 1,000",
    ]


def test_a_late_subscriber_gets_where_the_snapshot_stands() -> None:
    """`context join` sends its request before it can follow the progress
    (trionode/cli_early.py): a join shorter than the command's start-up is over before it
    subscribes. The context's latest snapshot progress goes to each new subscriber that
    asks for it (the command's follower), before the subscription's answer."""
    hub = EventHub()
    hub.notify("ctx", {"type": "blob_progress", "bytes": 1})
    hub.notify("ctx", _notice(100))
    hub.notify("ctx", _notice(1000, done=True))
    hub.notify("other", _notice(5))
    plain = hub.open()
    hub.add_contexts(plain, ["ctx"], None)  # not asked for: only what happens from now
    assert isinstance(plain.receive.receive_nowait(), Replay)
    with pytest.raises(trio.WouldBlock):
        plain.receive.receive_nowait()
    sub = hub.open()
    hub.add_contexts(sub, ["ctx"], None, progress=True)
    latest = sub.receive.receive_nowait()  # before the answer: once it is in, so is this
    assert isinstance(latest, Notice)
    assert latest.payload == _notice(1000, done=True)
    replay = sub.receive.receive_nowait()
    assert isinstance(replay, Replay)
    with pytest.raises(trio.WouldBlock):
        sub.receive.receive_nowait()
    hub.forget("ctx")
    again = hub.open()
    hub.add_contexts(again, ["ctx"], None, progress=True)
    assert isinstance(again.receive.receive_nowait(), Replay)
    with pytest.raises(trio.WouldBlock):
        again.receive.receive_nowait()


# -- end to end ---------------------------------------------------------------------------------


def _folding(file: FileConfig) -> FileConfig:
    """Small streamed pages (several batches), and history that folds when the test says."""
    return msgspec.structs.replace(
        file,
        store=msgspec.structs.replace(file.store, delta_retention=0.0, fold_interval=10_000.0),
        sync=msgspec.structs.replace(file.sync, snapshot_page_records=10, snapshot_window=2),
    )


async def _context_with_folded_history(member: TestNode) -> tuple[bytes, str]:
    """A kv_store context with ENTRIES entries whose history is folded (a joiner snapshots
    it), and an invitation to it."""
    node = member.node
    app = (await node.applications.install(str(APPS / "kv_store"))).application_id
    context = (await node.contexts.create(app)).context_id
    items = {f"k{i:04}": "v" * 200 for i in range(ENTRIES)}
    for key, value in items.items():
        await node.contexts.execute(context, "set", json.dumps({"key": key, "value": value}))
    await fold_all(node.contexts.replicas, retention=0.0, max_batch=1024)
    return context, await node.joins.invite(context)


def _slow_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page the member serves takes 50 ms: the snapshot lasts long enough to watch."""
    original = SyncServer._read_snapshot_page

    async def slow(*args: Any) -> Any:
        await trio.sleep(0.05)
        return await original(*args)

    monkeypatch.setattr(SyncServer, "_read_snapshot_page", slow)


@pytest.mark.real_network
async def test_subscribers_get_the_snapshots_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        open_test_node(tmp_path / "member", api=False, configure=_folding) as member,
        open_test_node(tmp_path / "joiner", api=False, configure=_folding) as joiner,
    ):
        context, invitation = await _context_with_folded_history(member)
        await joiner.node.applications.install(str(APPS / "kv_store"))
        _slow_pages(monkeypatch)
        hub = joiner.node.hub
        sub = hub.open()
        context_b58 = base58.b58encode(context).decode()
        hub.add_contexts(sub, [context_b58], None)
        with trio.fail_after(60):
            await joiner.node.joins.join(invitation)
        sub.close()
        received = [m async for m in sub.receive]
        notices = [
            m.payload
            for m in received
            if isinstance(m, Notice) and m.payload.get("type") == "snapshot_progress"
        ]
        # The state itself is announced once, as a change from sync (no delta), when the
        # snapshot is adopted: just before its last progress notice.
        states = [
            i
            for i, m in enumerate(received)
            if isinstance(m, ContextEvent) and m.origin == "sync" and not m.delta_id
        ]
        assert len(states) == 1
        done = next(
            i for i, m in enumerate(received) if isinstance(m, Notice) and m.payload["done"]
        )
        assert states[0] < done
        assert len(notices) >= 3
        counts = [n["entries"] for n in notices]
        assert counts == sorted(counts)
        last = notices[-1]
        assert last["done"] is True
        assert last["entries"] == last["entriesTotal"] >= ENTRIES
        assert last["bytes"] > ENTRIES * 200
        assert all(n["contextId"] == context_b58 for n in notices)
        assert any(n["etaSeconds"] is not None for n in notices[:-1])


@pytest.mark.real_network
@pytest.mark.parametrize("slow", [True, False])
async def test_context_join_prints_progress_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: bool
) -> None:
    """The command's request goes out before it loads what it follows the progress with
    (trionode/cli_early.py): a join that is not `slow` is over before the follower
    subscribed, and its last word (done, 100%) is shown all the same."""
    async with (
        open_test_node(tmp_path / "member", api=False, configure=_folding) as member,
        open_test_node(tmp_path / "joiner", configure=_folding) as joiner,
    ):
        context, invitation = await _context_with_folded_history(member)
        await joiner.node.applications.install(str(APPS / "kv_store"))
        if slow:
            _slow_pages(monkeypatch)
        with trio.fail_after(120):
            result = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "trionode",
                    "context",
                    "join",
                    invitation,
                    "--api",
                    joiner.api_url,
                    f"--token={joiner.token}",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=ROOT,
            )
        err = result.stderr.decode()
        assert result.returncode == 0, err
        lines = err.splitlines()
        assert "\r" not in err  # stderr is a pipe here: plain lines
        assert lines, "no progress shown"
        assert all(line.startswith("snapshot: ") for line in lines)
        assert lines[-1].endswith("done")
        assert "(100%)" in lines[-1]
        assert base58.b58encode(context).decode() in result.stdout.decode()  # the result
