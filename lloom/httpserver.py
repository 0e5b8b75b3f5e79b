"""Serving an ASGI app with hypercorn's trio worker, on a port that may be 0."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


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
    binds: list[str] = await nursery.start(_serve, app, hypercorn_config(host, port))
    return binds[0].split("://", 1)[1]


async def _serve(app: Any, config: Config, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    # ``Any``: the trio-typing stubs py-libp2p installs predate trio.TaskStatus.
    await serve(app, config, task_status=task_status)
