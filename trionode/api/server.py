"""Serve the API with hypercorn.trio.serve inside the caller's nursery."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio

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
    await serve(  # noqa: ASYNC128 - hypercorn calls started() once its sockets listen
        app, config, shutdown_trigger=shutdown_requested.wait, task_status=task_status
    )
