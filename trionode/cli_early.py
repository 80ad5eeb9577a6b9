"""`trionode context join` sends its request before the CLI loads its libraries.

A join's answer comes only once the node has taken the whole snapshot, so every moment the
command spends starting is a moment of the join: importing httpx, Trio and the client
(0.2 s on a quiet machine, several on a loaded one) came before the node even heard of it.
So the `trionode` command (`main`: the installed script and `python -m trionode`) hands
its arguments here first: if they are a plain `context join` (`parse`: nothing this module
does not understand, else it does nothing), the request goes out at once, a thread waits
for its answer, and the command then starts as usual; its join action
(`cli_contexts._join`) takes the answer of this request (`claim`) instead of sending its
own, and shows the progress meanwhile.

Only what the request needs loads before it goes out, and of that only modules the
interpreter has loaded anyway or builds in: `_socket` and `_thread` (the C modules under
`socket` and `threading`, which import `enum`, `selectors`, `functools`...), `trionode.errors`
and `trionode.layout` (which imports only `os`); the request is written as it is (a POST with
a JSON body of two plain strings, `_plain`). What `json`, `urllib.parse`, `pathlib`, `socket`,
`threading` and `typing` cost (~20 ms of ~45 in all) comes after, in the command's start.
`http.client` (with `email` and `ssl`) loads in the answer's thread once the request went
out, to read the answer, which comes only when the join is done.

The request is connected and written by the thread that starts the command, before it goes
on importing (`EarlyJoin.start`): written from the answer's thread, each of its steps (the
connect, the write) waited for the importing thread to hand over the GIL, up to its switch
interval (5 ms) each time, and the node heard of the join ~10 ms later.
"""

from __future__ import annotations

import _socket
import _thread
import sys

from trionode.errors import TrionodeError
from trionode.layout import default_home, read_api_url, read_token

TYPE_CHECKING = False  # (`typing` is not loaded for this: module doc)
if TYPE_CHECKING:
    import http.client
    from typing import Final, NoReturn

JOIN_PATH: Final = "/admin-api/contexts/join"
_VALUED: Final = frozenset({"--home", "--api", "--token", "--timeout", "--trust-app"})
_FLAGS: Final = frozenset({"--json"})
DEFAULT_TIMEOUT: Final = 30.0
"""`--timeout`'s default (cli.py's client options)."""


class Done:
    """Set once (`set`), by the answer's thread; `wait` until then: `threading.Event`'s,
    on a bare lock (module doc: `threading` loads with the command)."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()  # (held until set)

    def set(self) -> None:
        self._lock.release()

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it was set (within `timeout` seconds, if given)."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()
        return True


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
        self.done = Done()
        self._request, self._address = _request(url, token, options)  # (ValueError: see there)

    @property
    def timeout(self) -> float:
        return float(self.options.get("--timeout", DEFAULT_TIMEOUT))

    def start(self) -> None:
        """Send the request from this thread (module doc), then read its answer in another."""
        try:
            sock = _connect(self._address, self.timeout)
        except OSError as exc:
            self.error = exc
            self.done.set()
            return
        try:
            sock.sendall(self._request)
        except OSError as exc:
            sock.close()
            self.error = exc
            self.done.set()
            return
        _thread.start_new_thread(self._receive, (sock,))

    def _receive(self, raw: _socket.socket) -> None:
        try:
            # The request is out: what reads the answer may load now (module doc).
            import http.client  # noqa: PLC0415
            import socket  # noqa: PLC0415

            with socket.socket(fileno=raw.detach()) as sock:
                sock.settimeout(self.timeout)  # (a new socket object has none: blocking)
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


def _connect(address: tuple[str, int], timeout: float) -> _socket.socket:
    """A TCP connection to `address` (`socket.create_connection`'s, on the C module)."""
    error: OSError | None = None
    host, port = address
    for family, kind, proto, _, where in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
        except OSError as exc:
            sock.close()
            error = exc
        else:
            return sock
    raise error or OSError(f"{host} has no address")


def _request(url: str, token: str, options: dict[str, str]) -> tuple[bytes, tuple[str, int]]:
    """The join's HTTP/1.1 request to the node at `url`, as `http.client` would write it
    (`send` checked that nothing in it can break a header line or its JSON body), and where
    it goes. Raises ValueError for a URL `_split` does not read."""
    address, path = _split(url)
    host = address[0]
    if ":" in host:
        host = f"[{host}]"
    if address[1] != 80:
        host = f"{host}:{address[1]}"
    trust_app = options.get("--trust-app")
    trust = "null" if trust_app is None else f'"{trust_app}"'
    body = f'{{"invitation": "{options["invitation"]}", "trustApp": {trust}}}'.encode("ascii")
    head = (
        f"POST {path.rstrip('/') + JOIN_PATH} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Accept-Encoding: identity\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n\r\n"
    )
    return head.encode("ascii") + body, address


def _split(url: str) -> tuple[tuple[str, int], str]:
    """((host, port), path) of a plain `http://host[:port][/path]` URL, as `urllib.parse`
    reads them; ValueError for any other (a user, a query, a fragment, a port that is
    none): the command's own client reads those."""
    if url[:7].lower() != "http://" or any(c in url for c in "?#@"):
        raise ValueError(url)
    authority, slash, path = url[7:].partition("/")
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket:
            raise ValueError(url)
    else:
        host, colon, rest = authority.partition(":")
        rest = colon + rest
    digits = rest[1:]
    if rest[:1] not in ("", ":") or (digits and not (digits.isascii() and digits.isdigit())):
        raise ValueError(url)
    port = int(digits) if digits else 80
    if not host or not 0 < port < 65536:
        raise ValueError(url)
    return (host.lower(), port), slash + path


def _plain(text: str) -> bool:
    """Printable ASCII without spaces, quotes or backslashes: safe as it is in a request
    line, a header value or a JSON string."""
    return text.isascii() and text.isprintable() and not any(c in text for c in ' "\\')


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
        if not 0 < float(options.get("--timeout", DEFAULT_TIMEOUT)) < float("inf"):
            return None
        home = options.get("--home", default_home())
        url = options["--api"] if "--api" in options else read_api_url(home)
        if url is None or not url.lower().startswith("http://"):
            return None  # (TLS, or a home without api.url: the command's own client)
        token = options["--token"] if "--token" in options else read_token(home)
        plain = (token, url, options["invitation"], options.get("--trust-app", ""))
        if not all(map(_plain, plain)):
            return None  # (the command's own client sends it, or says what is wrong)
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


def main() -> NoReturn:
    """The `trionode` command: an early join (`send`), then the CLI (`cli.run`, which exits)."""
    send(sys.argv[1:])
    from trionode.cli import run  # noqa: PLC0415 - after the early join went out

    run()
