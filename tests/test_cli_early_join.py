"""`python -m trionode context join` sends its request before the CLI loads its libraries
(trionode/cli_early.py), and the command reads that request's answer as its own."""

from __future__ import annotations

import importlib.metadata
import json
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from trionode import cli_early

ROOT = Path(__file__).resolve().parents[1]
INVITATION = "trinv1notarealone"
CONTEXT = {
    "contextId": "11111111111111111111111111111111",
    "applicationId": "11111111111111111111111111111111",
    "createdAt": 1_700_000_000.0,
    "rootHash": "00" * 32,
    "heads": [],
    "members": [],
    "memberPublicKey": "11111111111111111111111111111111",
}


@pytest.mark.parametrize(
    ("argv", "read"),
    [
        (["context", "join", "trinv1x"], {"invitation": "trinv1x"}),
        (
            ["context", "join", "--api", "http://h:1", "trinv1x", "--token=t", "--json"],
            {"invitation": "trinv1x", "--api": "http://h:1", "--token": "t", "--json": ""},
        ),
        (
            ["context", "join", "trinv1x", "--home", "/h", "--timeout", "9", "--trust-app", "A"],
            {"invitation": "trinv1x", "--home": "/h", "--timeout": "9", "--trust-app": "A"},
        ),
    ],
)
def test_a_plain_join_is_read_early(argv: list[str], read: dict[str, str]) -> None:
    assert cli_early.parse(argv) == read


@pytest.mark.parametrize(
    "argv",
    [
        ["context", "list"],
        ["call", "join", "trinv1x"],
        ["context", "join"],
        ["context", "join", "trinv1x", "--help"],
        ["context", "join", "trinv1x", "other"],
        ["context", "join", "trinv1x", "--tok", "t"],  # (an abbreviation: argparse's)
        ["context", "join", "trinv1x", "--token"],
        ["context", "join", "trinv1x", "--token", "--json"],
        ["context", "join", "trinv1x", "--token", "a", "--token", "b"],
        ["context", "join", "trinv1x", "--json=1"],
        ["context", "join", "trinv1x", "--field", "contextId"],
    ],
)
def test_anything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert cli_early.parse(argv) is None


class _Node(BaseHTTPRequestHandler):
    """A stand-in for a node's API: answers every join with `answer`, records requests."""

    answer: ClassVar[tuple[int, dict[str, Any]]] = (200, CONTEXT)
    seen: ClassVar[list[tuple[str, str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append(("POST", self.path, dict(self.headers), body))
        status, answer = type(self).answer
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: object) -> None:
        return


@contextmanager
def _node(status: int, answer: dict[str, Any]) -> Iterator[tuple[str, list[Any]]]:
    class Node(_Node):
        pass

    Node.answer, Node.seen = (status, answer), []
    handler = Node
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()


SCRIPT = Path(sys.executable).parent / "trionode"
"""The installed script (`cli_early.main`, as `python -m trionode`)."""


def _join(
    api: str, *more: str, command: tuple[str, ...] = (sys.executable, "-m", "trionode")
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, "context", "join", INVITATION, "--api", api, *more],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("command", [(sys.executable, "-m", "trionode"), (str(SCRIPT),)])
def test_the_early_join_is_the_commands_one_request_and_its_answer(
    command: tuple[str, ...],
) -> None:
    with _node(200, CONTEXT) as (api, seen):
        done = _join(api, "--token=secret", "--json", "--trust-app", "AppId", command=command)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["contextId"] == CONTEXT["contextId"]
    assert len(seen) == 1  # sent once: the command took the early one's answer
    method, path, headers, body = seen[0]
    assert (method, path) == ("POST", "/admin-api/contexts/join")
    assert headers["Authorization"] == "Bearer secret"
    assert json.loads(body) == {"invitation": INVITATION, "trustApp": "AppId"}


def test_the_installed_script_sends_a_join_early() -> None:
    """`trionode context join` is `python -m trionode context join`: the request goes out
    before the CLI loads (the script's command had loaded it all, ~0.2 s, first)."""
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="trionode")
    assert script.value == "trionode.cli_early:main"


def test_the_nodes_refusal_of_an_early_join_is_the_commands_error() -> None:
    refusal = {"error": {"code": "forbidden", "message": "the invitation expired"}}
    with _node(403, refusal) as (api, seen):
        done = _join(api, "--token", "t")
    assert done.returncode == 1
    assert done.stderr.strip() == "trionode: 403: the invitation expired"
    assert len(seen) == 1


def test_an_early_join_to_no_node_says_it_cannot_reach_it() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # (closed again: nothing listens there)
    done = _join(f"http://127.0.0.1:{port}", "--token", "t")
    assert done.returncode == 1
    assert f"cannot reach node at http://127.0.0.1:{port}" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--api", "http://127.0.0.1:1", "--token", "t\r\nX-Other: 1"],
        ["--api", "http://127.0.0.1:1/a b", "--token", "t"],
        ["--api", "http://127.0.0.1:99999", "--token", "t"],
        ["--api", "http://127.0.0.1:1", "--token", "t\u00e9"],
        ["--api", "http://127.0.0.1:1", "--token", 't"'],
        ["--api", "http://127.0.0.1:1", "--token", "t", "--trust-app", "a\\b"],
        ["--api", "http://u@127.0.0.1:1", "--token", "t"],
        ["--api", "http://127.0.0.1:1/?q", "--token", "t"],
    ],
)
def test_a_join_whose_request_would_not_be_plain_http_is_not_sent_early(argv: list[str]) -> None:
    """The early request is written as it is (no HTTP or JSON library): a token or URL that
    could break its header lines or its body, a port that is none, or a URL not plainly
    `http://host:port/path` leaves the join to the command's own client, which refuses it or
    sends it."""
    assert cli_early.send(["context", "join", INVITATION, *argv]) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:2528",
        "http://127.0.0.1:2528/",
        "HTTP://Node.Example:80/base/path/",
        "http://localhost/api",
        "http://[::1]:8080/x",
        "http://[::1]",
        "http://h:",
    ],
)
def test_a_plain_url_is_read_as_urllib_reads_it(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    assert cli_early._split(url) == ((parts.hostname, parts.port or 80), parts.path)


@pytest.mark.parametrize(
    "url",
    ["http://h:0", "http://h:65536", "http://h:+1", "http://h:x", "http://:1", "http://[::1"],
)
def test_a_url_without_a_host_or_port_is_not_read(url: str) -> None:
    with pytest.raises(ValueError, match=re.escape(url)):
        cli_early._split(url)


def test_the_early_join_loads_no_http_library_before_its_request_is_out() -> None:
    """What reads the answer (`http.client`, with `email` and `ssl`) loads only after the
    request went out, and what the command loads (`socket`, `threading`, `json`, `pathlib`,
    `typing`...) after that: the module that sends it imports none of them."""
    probe = (
        "import sys, trionode.cli_early;"
        " print(sorted({'http.client', 'email', 'ssl', 'socket', 'threading', 'json',"
        " 'urllib.parse', 'pathlib', 'typing', 're', 'enum'} & set(sys.modules)))"
    )
    # (-S: what `site` loads is not this module's: a setuptools editable install's finder
    # loads pathlib and re there.)
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_early_join_is_written_before_send_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command goes on importing only once its request is out: the node has it in full
    when `send` returns, with no thread yet to run (the answer's thread only reads)."""
    monkeypatch.setattr(cli_early, "_sent", None)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        api = f"http://127.0.0.1:{listener.getsockname()[1]}"
        early = cli_early.send(["context", "join", INVITATION, "--api", api, "--token", "t"])
        assert early is not None
        listener.setblocking(False)  # what `send` wrote is here now, or this raises
        conn, _ = listener.accept()
        with conn:
            conn.setblocking(False)
            request = conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            assert head.startswith(b"POST /admin-api/contexts/join HTTP/1.1\r\n")
            assert json.loads(body) == {"invitation": INVITATION, "trustApp": None}
        # (Closed without an answer: the answer's thread says so.)
        assert early.done.wait(60)
        assert early.status is None
        assert early.error is not None
