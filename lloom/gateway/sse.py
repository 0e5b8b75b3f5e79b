"""Server-Sent Events as a plain ASGI response, for answers streamed through the gateway.

sse-starlette did this before; profiled under 64 concurrent streams it (with the anyio
task groups and locks around every event) took ~40 % of the gateway's CPU
(docs/benchmarks.md, "Streaming capacity"). SSE framing itself is two lines of code: an
event is ``data: <one line>\\n\\n`` (lloom's payloads are JSON, which never contains a raw
line break) and a comment is ``: <text>\\n\\n``. What this module adds is the ASGI side:

- the body is an async iterator of ready-made SSE bytes; each item is one ASGI ``send``
  (callers put every event already waiting into one item: one write, not one per event);
- a :class:`Live` handle lets the task producing the events write them to the connection
  itself once the body has caught up (``Live.direct``): one task switch less per event
  than handing each through a channel to the task serving the response;
- when the HTTP client goes away (``http.disconnect``) the iterator is closed at once and
  :class:`Live` refuses further writes (``trio.BrokenResourceError``), so whatever feeds
  the stream stops too (the gateway then resets the executor's stream, and the executor
  stops its backend).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, MutableMapping
from contextlib import aclosing
from typing import Any

import trio

#: The SSE ``data:`` line that ends an OpenAI stream.
DONE = b"data: [DONE]\n\n"

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

Scope = MutableMapping[str, Any]


def event(data: object) -> bytes:
    """One ``data:`` event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def comment(text: str) -> bytes:
    """One SSE comment line (ignored by clients, keeps the connection visibly alive)."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


class Live:
    """A streamed response as its producer sees it: while ``direct`` is false it hands
    events to the body's iterator; once true, it calls :meth:`write` itself and
    :meth:`finish` when done (the body's iterator then ends the response)."""

    def __init__(self) -> None:
        self.direct = False
        self.done = trio.Event()
        self.gone = False
        self._send: Any = None

    async def write(self, data: bytes) -> None:
        """Write SSE bytes (whole events) to the connection; ``trio.BrokenResourceError``
        when the client went away. Writes need no lock of their own: the server sends each
        ASGI message whole (hypercorn serialises them on the socket), and the only other
        writer, a ping, is a whole comment."""
        if self.gone or self._send is None:
            raise trio.BrokenResourceError("the HTTP client went away")
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    def finish(self) -> None:
        """The producer is done (whichever way)."""
        self.done.set()


class EventStream:
    """An ASGI app answering 200 with ``body``'s bytes as ``text/event-stream`` (``body``
    is closed when the client goes away), with ``live`` as the producer's handle."""

    def __init__(self, body: AsyncGenerator[bytes, None], live: Live | None = None) -> None:
        self.body = body
        self.live = live or Live()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """Serve the stream until ``body`` ends or the client disconnects."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
                await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                self.live._send = send
                await self._relay(send)
                # The body ended: the producer's last write (if it wrote) is done.
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        finally:
            self.live.gone = True

    async def _relay(self, send: Any) -> None:
        async with aclosing(self.body) as body:
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _watch_disconnect(self, receive: Any, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.live.gone = True
                scope.cancel()
                return
