"""lloom's HTTP servers (hypercorn, HTTP/1.1) send the standard reason phrase.

hypercorn 0.18.0 writes ``HTTP/1.1 200 \\r\\n``; ``h2load --h1`` counts such responses as
failed (issue 12). These tests read the raw status line from a real server on 127.0.0.1.
"""

from __future__ import annotations

import pytest
import trio
from hypercorn.protocol.h11 import H11Protocol
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lloom.httpserver import patch_hypercorn_reason_phrase, reason_phrase, start_http


async def status(request: Request) -> Response:
    return Response(b"x", status_code=int(request.path_params["code"]))


APP = Starlette(routes=[Route("/status/{code:int}", status)])


async def exchange(bound: str, request: bytes) -> bytes:
    """Send ``request`` raw, return everything the server answers until it closes."""
    host, port = bound.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        received = b""
        while chunk := await stream.receive_some():
            received += chunk
    return received


async def status_lines(requests: list[bytes]) -> list[bytes]:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await start_http(nursery, APP, "127.0.0.1", 0)
            answers = [await exchange(bound, r) for r in requests]
            nursery.cancel_scope.cancel()
    return [a.split(b"\r\n", 1)[0] for a in answers]


def get(path: str, *headers: bytes) -> bytes:
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("code", "line"),
    [
        (200, b"HTTP/1.1 200 OK"),
        (404, b"HTTP/1.1 404 Not Found"),
        (503, b"HTTP/1.1 503 Service Unavailable"),
        (599, b"HTTP/1.1 599 "),  # unknown code: still served, empty phrase
    ],
)
async def test_status_line_carries_the_reason_phrase(code: int, line: bytes) -> None:
    assert await status_lines([get(f"/status/{code}")]) == [line]


async def test_hypercorns_own_responses_carry_it_too() -> None:
    continued = get("/status/200", b"Content-Length: 1", b"Expect: 100-continue")
    lines = await status_lines([b"NOT HTTP\r\n\r\n", continued])
    assert lines == [b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 100 Continue"]


def test_the_patch_is_applied_once() -> None:
    patch_hypercorn_reason_phrase()
    patched = H11Protocol._send_h11_event
    patch_hypercorn_reason_phrase()
    assert H11Protocol._send_h11_event is patched
    assert getattr(patched, "_lloom_reason_phrase", False)


def test_reason_phrase() -> None:
    assert reason_phrase(200) == b"OK"
    assert reason_phrase(429) == b"Too Many Requests"
    assert reason_phrase(599) == b""
