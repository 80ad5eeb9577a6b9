"""The example apps end to end over real HTTP on a running node (API on a loopback port)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from trionode.testing import open_test_node

APPS = Path(__file__).resolve().parents[2] / "apps"

pytestmark = pytest.mark.real_network


async def test_chat_and_notes_over_http(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_test_node(tmp_path / "home") as node, node.client() as client:
            chat_app = await client.install_application(str(APPS / "chat"))
            notes_app = await client.install_application(str(APPS / "notes"))
            assert {a.name for a in (await client.applications()).applications} == {
                "chat",
                "notes",
            }

            chat = (
                await client.create_context(chat_app.application_id, {"topic": "hi"})
            ).context_id
            first = (await client.call(chat, "post", {"text": "hello"})).output
            await client.call(chat, "post", {"text": "world"})
            react = {"message_id": first, "emoji": "👍"}
            assert (await client.call(chat, "react", react)).output == 1
            assert (await client.call(chat, "react", react)).output == 2
            assert (await client.call(chat, "topic")).output == "hi"
            messages = (await client.call(chat, "messages")).output
            assert [m["text"] for m in messages] == ["hello", "world"]
            assert (await client.call(chat, "count")).output == 2

            notes = (
                await client.create_context(notes_app.application_id, {"title": "t", "text": "ac"})
            ).context_id
            await client.call(notes, "insert", {"pos": 1, "text": "b"})
            await client.call(notes, "insert", {"pos": 3, "text": "de"})
            await client.call(notes, "delete", {"pos": 0, "length": 1})
            assert (await client.call(notes, "text")).output == "bcde"
            assert (await client.call(notes, "title")).output == "t"
            contexts = (await client.contexts()).contexts
            assert {c.context_id for c in contexts} == {chat, notes}
