"""`trionode context join` sends its request before the CLI loads its libraries.

A join's answer comes only once the node has taken the whole snapshot, so every moment the
command spends starting is a moment of the join: importing httpx, Trio and the client
(0.2 s on a quiet machine, several on a loaded one) came before the node even heard of it.
So `python -m trionode` (`__main__.py`) hands its arguments here first: if they are a plain
`context join` (`parse`: nothing this module does not understand, else it does nothing),
the request goes out at once, a thread waits for its answer, and the command then starts
as usual; its join action (`cli_contexts._join`) takes the answer of this request (`claim`)
instead of sending its own, and shows the progress meanwhile.

Only the standard library and `trionode.layout` (itself standard library only) load here,
and of those only what the request needs before it goes out: it is written to a socket as
it is (a POST with a JSON body), and `http.client` (with `email` and `ssl`, ~20 ms of a
start of ~60 ms on a quiet machine) loads in the answer's thread once it went out, to read
the answer, which comes only when the join is done.

The request is connected and written by the thread that starts the command, before it goes
on importing (`EarlyJoin.start`): written from the answer's thread, each of its steps (the
connect, the write) waited for the importing thread to hand over the GIL, up to its switch
interval (5 ms) each time, and the node heard of the join ~10 ms later.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import http.client

from trionode.errors import TrionodeError
from trionode.layout import default_home, read_api_url, read_token

JOIN_PATH: Final = "/admin-api/contexts/join"
_VALUED: Final = frozenset({"--home", "--api", "--token", "--timeout", "--trust-app"})
_FLAGS: Final = frozenset({"--json"})
DEFAULT_TIMEOUT: Final = 30.0
"""`--timeout`'s default (cli.py's client options)."""


class EarlyJoin:
    """A join request sent at once (`start`); its answer, read by a thread, once `done` is
    set."""

    def __init__(self, url: str, token: str, options: dict[str, str]) -> None:
        self.url = url
        self.token = token
        self.options = options
        """What `parse` read (the command's own arguments must say the same: `claim`)."""
        self.status: int | None = None
        self.body = b""
        self.error: OSError | http.client.HTTPException | None = None
        """Why no answer came (the node could not be reached, or took too long)."""
        self.done = threading.Event()
        self._request, self._address = _request(url, token, options)  # (ValueError: a bad port)

    @property
    def timeout(self) -> float:
        return float(self.options.get("--timeout", DEFAULT_TIMEOUT))

    def start(self) -> None:
        """Send the request from this thread (module doc), then read its answer in another."""
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection(self._address, self.timeout)
            sock.sendall(self._request)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self.error = exc
            self.done.set()
            return
        thread = threading.Thread(target=self._receive, args=(sock,), name="early-join")
        thread.daemon = True
        thread.start()

    def _receive(self, sock: socket.socket) -> None:
        try:
            with sock:
                # The request is out: what reads the answer may load now (module doc).
                import http.client  # noqa: PLC0415

                response = http.client.HTTPResponse(sock, method="POST")
                try:
                    response.begin()
                    self.body = response.read()
                    self.status = response.status
                except http.client.HTTPException as exc:
                    self.error = exc
                finally:
                    response.close()  # (its file on the socket: else left to the collector)
        except OSError as exc:
            self.error = exc
        finally:
            self.done.set()


def _request(url: str, token: str, options: dict[str, str]) -> tuple[bytes, tuple[str, int]]:
    """The join's HTTP/1.1 request to the node at `url`, as `http.client` would write it
    (`send` checked that nothing in it can break a header line), and where it goes. Raises
    ValueError for a URL without a valid port."""
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname or "", parts.port or 80)
    host = address[0]
    if ":" in host:
        host = f"[{host}]"
    if address[1] != 80:
        host = f"{host}:{address[1]}"
    body = json.dumps(
        {"invitation": options["invitation"], "trustApp": options.get("--trust-app")}
    ).encode()
    head = (
        f"POST {parts.path.rstrip('/') + JOIN_PATH} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Accept-Encoding: identity\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n\r\n"
    )
    return head.encode("ascii") + body, address


def _printable(text: str) -> bool:
    """Printable ASCII without spaces: safe in a request line or header value as it is."""
    return text.isascii() and text.isprintable() and " " not in text


_sent: EarlyJoin | None = None


def parse(argv: list[str]) -> dict[str, str] | None:
    """`context join INVITATION` with at most these options, each once (`--opt value` or
    `--opt=value`): `--home --api --token --timeout --trust-app --json`. None for anything
    else (another command, `--help`, an abbreviation, an option given twice...): argparse
    reads those, and the request goes the usual way."""
    if argv[:2] != ["context", "join"]:
        return None
    out: dict[str, str] = {}
    rest = argv[2:]
    at = 0
    while at < len(rest):
        word = rest[at]
        name, eq, value = word.partition("=")
        if name in _FLAGS and not eq:
            key = name
            value = ""
        elif name in _VALUED:
            key = name
            if not eq:
                at += 1
                if at >= len(rest) or rest[at].startswith("-"):
                    return None
                value = rest[at]
        elif not word.startswith("-") and "invitation" not in out:
            key, value = "invitation", word
        else:
            return None
        if key in out:
            return None
        out[key] = value
        at += 1
    return out if "invitation" in out else None


def send(argv: list[str]) -> EarlyJoin | None:
    """Send the join `argv` asks for now, if it is a plain `context join` whose node is
    named by `--api` or by its home's `api.url` over plain HTTP (anything else: None,
    nothing sent)."""
    global _sent  # noqa: PLW0603 - one command per process
    options = parse(argv)
    if options is None or _sent is not None:
        return None
    try:
        if not 0 < float(options.get("--timeout", DEFAULT_TIMEOUT)) < math.inf:
            return None
        home = Path(options.get("--home", default_home()))
        url = options["--api"] if "--api" in options else read_api_url(home)
        if url is None or not url.lower().startswith("http://"):
            return None  # (TLS, or a home without api.url: the command's own client)
        token = options["--token"] if "--token" in options else read_token(home)
        if not (_printable(token) and _printable(url)):
            return None  # (the command's own client says what is wrong with them)
        early = EarlyJoin(url, token, options)
    except (ValueError, TrionodeError):
        return None  # argparse or the command says what is wrong
    early.start()
    _sent = early
    return early


def claim(
    *,
    invitation: str,
    home: str,
    api: str | None,
    token: str | None,
    timeout: float,
    trust_app: str | None,
) -> EarlyJoin | None:
    """The join sent early, if one was for exactly these arguments (as argparse read
    them), taken once."""
    global _sent  # noqa: PLW0603
    early = _sent
    if early is None:
        return None
    options = early.options
    read = (
        options["invitation"],
        options.get("--home", default_home()),
        options.get("--api"),
        options.get("--token"),
        early.timeout,
        options.get("--trust-app"),
    )
    if read != (invitation, home, api, token, timeout, trust_app):
        return None
    _sent = None
    return early
