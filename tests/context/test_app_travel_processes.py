"""Apps travel with the context between two `trionode start` processes on loopback.

B has no app installed. It joins a context whose app is signed by a signer it trusts and
calls it straight away; an unsigned app is refused with the one-line reason and accepted
with `--trust-app` once B has seen it with `trionode invitation show`.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import trio

from tests.blobs.test_two_nodes import raw_cli
from tests.replication.test_processes import ROOT, add_bootstrap, cli, init, running

pytestmark = pytest.mark.real_network


def trust(home: Path, signer: str) -> None:
    path = home / "config.toml"
    text = path.read_text()
    if "trusted_signers = []" in text:
        text = text.replace("trusted_signers = []", f'trusted_signers = ["{signer}"]')
    else:
        text += f'\n[apps]\ntrusted_signers = ["{signer}"]\n'
    path.write_text(text)
    assert tomllib.loads(text)["apps"]["trusted_signers"] == [signer]


async def test_joiner_without_the_app_fetches_a_trusted_one_and_refuses_an_unsigned_one(
    tmp_path: Path,
) -> None:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    for home in (a_home, b_home):
        await init(home)
    key = tmp_path / "apps.key"
    signer = (await cli(tmp_path, "app", "keygen", "--key", str(key)))["signer"]
    bundle = shutil.copytree(ROOT / "apps" / "kv_store", tmp_path / "kv_store")
    await cli(tmp_path, "app", "sign", str(bundle), "--key", str(key))
    trust(b_home, signer)
    with trio.fail_after(180):
        async with running(a_home):
            address = (await cli(a_home, "peers"))["listenAddrs"][0]
            add_bootstrap(b_home, address.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/"))
            async with running(b_home):
                # A signed app: B trusts its signer, so joining fetches and installs it.
                app = (await cli(a_home, "app", "install", str(bundle)))["applicationId"]
                context = (await cli(a_home, "context", "create", app))["contextId"]
                invitation = (await cli(a_home, "context", "invite", context))["invitation"]
                shown = await cli(b_home, "invitation", "show", invitation)
                assert shown["app"]["applicationId"] == app
                assert shown["app"]["name"] == "kv_store"
                assert shown["app"]["version"] == "0.1.0"
                assert shown["app"]["signer"] == signer
                assert (await cli(b_home, "app", "list"))["applications"] == []
                await cli(b_home, "context", "join", invitation)
                await cli(
                    b_home, "call", context, "set", "--args", json.dumps({"key": "k", "value": "b"})
                )
                got = await cli(b_home, "call", context, "get", "--args", '{"key": "k"}')
                assert got["output"] == "b"
                installed = (await cli(b_home, "app", "list"))["applications"]
                assert [a["applicationId"] for a in installed] == [app]

                # An unsigned app: one line saying what to do, nothing joined.
                chat = (await cli(a_home, "app", "install", str(ROOT / "apps" / "chat")))[
                    "applicationId"
                ]
                chat_context = (await cli(a_home, "context", "create", chat))["contextId"]
                text = (await cli(a_home, "context", "invite", chat_context))["invitation"]
                code, err, out = await raw_cli(b_home, "context", "join", text)
                assert code == 1
                assert out == b""
                assert err == (
                    f"trionode: 412: app {chat} (chat v0.1.0, unsigned) is not trusted: "
                    f"pass --trust-app {chat} to run it\n"
                )
                listed = (await cli(b_home, "context", "list"))["contexts"]
                assert [c["contextId"] for c in listed] == [context]
                # The operator looked (`invitation show`) and accepts this app id.
                await cli(b_home, "context", "join", text, "--trust-app", chat)
                await cli(b_home, "call", chat_context, "post", "--args", '{"text": "hello"}')
