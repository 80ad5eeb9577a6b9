"""Serve the API with hypercorn.trio.serve inside the caller's nursery."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from trionode.errors import ListenError

log = logging.getLogger(__name__)


async def serve_api(
    app: QuartTrio,
    host: str,
    port: int,
    shutdown_requested: trio.Event,
    *,
    graceful_timeout: float = 5.0,
    max_request_body: int = 8 * 1024 * 1024,
    max_ws_message: int = 64 * 1024,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_requested` is set; `started` reports the real URLs (port 0 too)."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("trionode.api.hypercorn")
    config.wsgi_max_body_size = max_request_body
    config.websocket_max_message_size = max_ws_message
    app.config["MAX_CONTENT_LENGTH"] = max_request_body
    # Bind here rather than inside hypercorn.trio.serve: there a port in use surfaces as an
    # OSError three exception groups deep that does not name the address.
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        raise ListenError(
            f"api: cannot listen on {config.bind[0]}: {exc.strerror or exc}"
            " (change `api.port` in config.toml or stop the other process)"
        ) from None
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
    await worker_serve(  # noqa: ASYNC128 - hypercorn calls started() once its sockets listen
        wrap_app(app, config.wsgi_max_body_size, None),
        config,
        sockets=sockets,
        shutdown_trigger=shutdown_requested.wait,
        task_status=task_status,
    )
