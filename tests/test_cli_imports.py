"""Client commands must not load the node: a `trionode call` pays only for argparse + httpx."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What the node needs and a client command must not import (httpx itself imports trio and
# anyio for its async pool, so those cannot be on this list; msgspec is allowed: the client
# decodes answers into `trionode.schemas`, about 7 ms on top of httpx's 100).
NODE_ONLY = (
    "quart",
    "quart_trio",
    "hypercorn",
    "cryptography",
    "nacl",
    "lmdb",
    "trionode.node",
    "trionode.config",
    "trionode.api",
    "trionode.wire",
    "multiaddr",  # the package costs ~35 ms to import (netaddr, cid): node side only
)
FORBIDDEN = (
    *NODE_ONLY,
    "trio_websocket",  # only `watch` needs WebSockets
    # httpx's own command-line client, which httpx imports whenever they are installed
    # (trionode.client keeps it out: a quarter of a client command's import time).
    "rich",
    "click",
    "pygments",
)


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "CTX", "get", "--args", '{"key": "a"}'],
        ["context", "list"],
        ["health"],
    ],
)
def test_client_commands_import_nothing_of_the_node(argv: list[str]) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from trionode.cli import main
        # The node is down (port 9): the request fails, which is enough to walk the path.
        assert main({argv!r} + ["--api", "http://127.0.0.1:9", "--token", "t"]) == 1
        print(" ".join(sorted(sys.modules)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    modules = set(result.stdout.split())
    assert "httpx" in modules  # the path was walked
    loaded = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN))
    assert loaded == []


def test_node_commands_still_load_the_node() -> None:
    """The names above are the real module names: the node side does import them."""
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; import trionode.cli_node; "
            f"print(sorted(m for m in {NODE_ONLY!r} if m not in sys.modules))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert check.stdout.strip() == "[]"


def test_a_client_command_ends_at_once_with_its_whole_output_and_its_status() -> None:
    """`python -m trionode` ends a command that did not load the node with `os._exit`
    (`cli.run`): what it printed to a pipe (block-buffered) still arrives whole, and its
    exit status is the command's, success and failure alike."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    from trionode.context.invitations import create_invitation  # noqa: PLC0415

    text = create_invitation(
        admin_key=Ed25519PrivateKey.generate(),
        context_id=b"\x01" * 32,
        application_id=b"\x02" * 32,
        role="member",
        expires_at=time.time() + 3600,
        inviter_peer="12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA",
        inviter_addrs=[f"/ip4/192.0.2.{i}/tcp/2428" for i in range(1, 17)],
    ).text
    shown = subprocess.run(
        [sys.executable, "-m", "trionode", "invitation", "show", text, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert len(json.loads(shown.stdout)["addresses"]) == 16
    down = subprocess.run(
        [sys.executable, "-m", "trionode", "health", "--api", "http://127.0.0.1:9", "--token", "t"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert down.returncode == 1
    assert down.stderr.startswith("trionode: ")
