"""Serving an ASGI app with hypercorn's trio worker, on a port that may be 0."""

from __future__ import annotations

import http
import logging
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import serve
from hypercorn.typing import H11SendableEvent


def reason_phrase(status_code: int) -> bytes:
    """The standard reason phrase of ``status_code`` (``b"OK"``); ``b""`` for unknown codes."""
    try:
        return http.HTTPStatus(status_code).phrase.encode("ascii")
    except ValueError:
        return b""


def patch_hypercorn_reason_phrase() -> None:
    """Make hypercorn's HTTP/1.1 status lines carry the reason phrase: ``HTTP/1.1 200 OK``.

    Why: hypercorn 0.18.0 (``hypercorn/protocol/h11.py``) builds every ``h11.Response`` and
    ``h11.InformationalResponse`` without ``reason``, so h11 writes ``HTTP/1.1 200 \\r\\n``.
    That is valid HTTP (RFC 9112 allows an empty reason) and curl, httpx and aiohttp accept it,
    but ``h2load --h1`` (nghttp2) counts every such response as failed, so the standard load
    tools could not measure the gateway (issue 12).

    How: ``H11Protocol._send_h11_event`` (the one place hypercorn hands a response to h11:
    app responses, its own error responses, ``100 Continue`` and ``101``) is wrapped to fill in
    ``http.HTTPStatus(status).phrase`` when the reason is empty; an unknown status code keeps an
    empty phrase. Applied once per process (idempotent), by :func:`start_http`.
    """
    original = H11Protocol._send_h11_event
    if getattr(original, "_lloom_reason_phrase", False):
        return

    async def _send_h11_event(self: H11Protocol, event: H11SendableEvent) -> None:
        if isinstance(event, h11.Response | h11.InformationalResponse) and not event.reason:
            event = type(event)(
                headers=event.headers,
                status_code=event.status_code,
                http_version=event.http_version,
                reason=reason_phrase(event.status_code),
            )
        await original(self, event)

    _send_h11_event._lloom_reason_phrase = True  # type: ignore[attr-defined]
    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]


def hypercorn_config(host: str, port: int) -> Config:
    """A quiet hypercorn config bound to ``host:port``."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("lloom.http")
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 75.0
    return config


async def start_http(nursery: trio.Nursery, app: Any, host: str, port: int) -> str:
    """Start serving ``app`` in ``nursery``; return the bound ``host:port``."""
    patch_hypercorn_reason_phrase()
    binds: list[str] = await nursery.start(_serve, app, hypercorn_config(host, port))
    return binds[0].split("://", 1)[1]


async def _serve(app: Any, config: Config, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    # ``Any``: the trio-typing stubs py-libp2p installs predate trio.TaskStatus.
    await serve(app, config, task_status=task_status)
