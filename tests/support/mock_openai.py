"""A mock OpenAI-compatible backend for tests and benchmarks.

``python -m tests.support.mock_openai [--port 0] [--reply TEXT] [--no-usage] [--delay-ms N]
[--chunk-delay-ms N] [--fail-status N] [--models a,b]`` prints ``ready url=http://HOST:PORT/v1``
once listening. The reply is ``--reply`` or ``"Echo: " + the last user message``; streams
send one chunk per word (concatenating the deltas gives the reply exactly), then a chunk
with ``finish_reason``, then a usage chunk when ``stream_options.include_usage`` was asked
(and ``--no-usage`` not given). Usage counts whitespace-separated words. ``build_app``
serves the same in-process (e.g. with ``httpx.ASGITransport``).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lloom.httpserver import start_http


@dataclass
class MockOptions:
    """How the mock behaves."""

    reply: str | None = None
    usage: bool = True
    delay_ms: int = 0
    chunk_delay_ms: int = 0
    fail_status: int = 0
    #: Multiply reported completion tokens (a dishonest backend/executor, for tests).
    inflate_usage: int = 1
    models: tuple[str, ...] = ("mock-a", "mock-b", "smollm2")
    #: Every request body received, for assertions in-process.
    seen: list[dict[str, Any]] = field(default_factory=list)
    seen_headers: list[dict[str, str]] = field(default_factory=list)


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": code}},
        status_code=status,
    )


def _words(text: str) -> int:
    return len(text.split())


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(m.get("content") or "") for m in body["messages"])
    prompt = body.get("prompt", "")
    return " ".join(prompt) if isinstance(prompt, list) else str(prompt)


def _reply(options: MockOptions, body: dict[str, Any]) -> str:
    if options.reply is not None:
        return options.reply
    if "messages" in body:
        users = [m for m in body["messages"] if m.get("role") == "user"]
        last = users[-1].get("content") if users else ""
        return f"Echo: {last}"
    return f"Echo: {_prompt_text(body)}"


def _pieces(text: str) -> list[str]:
    """Split keeping whitespace, so that ``"".join`` gives ``text`` back."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def build_app(options: MockOptions) -> Starlette:
    """The mock as an ASGI app."""

    async def models(_: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in options.models]}
        )

    async def handle(request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError:
            return _error(400, "malformed JSON body")
        if not isinstance(body, dict):
            return _error(400, "body must be an object")
        options.seen.append(body)
        options.seen_headers.append(dict(request.headers))
        if options.delay_ms:
            await trio.sleep(options.delay_ms / 1000)
        if options.fail_status:
            return _error(options.fail_status, "mock failure")
        model = body.get("model")
        if model not in options.models:
            return _error(404, f"model {model!r} not found", "model_not_found")
        text = _reply(options, body)
        completion = _words(text) * options.inflate_usage
        usage = {
            "prompt_tokens": _words(_prompt_text(body)),
            "completion_tokens": completion,
            "total_tokens": _words(_prompt_text(body)) + completion,
        }
        if body.get("stream"):
            want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _sse(options, model, text, usage if want_usage and options.usage else None, chat),
                media_type="text/event-stream",
            )
        created = int(time.time())
        if chat:
            out: dict[str, Any] = {
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
            }
        else:
            out = {
                "id": "cmpl-mock",
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            }
        if options.usage:
            out["usage"] = usage
        return JSONResponse(out)

    async def chat(request: Request) -> Response:
        return await handle(request, chat=True)

    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


async def _sse(
    options: MockOptions, model: str, text: str, usage: dict[str, int] | None, chat: bool
) -> AsyncIterator[bytes]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": "chatcmpl-mock",
            "object": kind,
            "created": created,
            "model": model,
            "choices": [choice] if choice is not None else [],
        }
        obj.update(extra or {})
        return f"data: {json.dumps(obj)}\n\n".encode()

    if chat:
        yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}})
    for piece in _pieces(text):
        if options.chunk_delay_ms:
            await trio.sleep(options.chunk_delay_ms / 1000)
        if chat:
            yield chunk({"index": 0, "delta": {"content": piece}, "finish_reason": None})
        else:
            yield chunk({"index": 0, "text": piece, "finish_reason": None})
    done: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
    if chat:
        done["delta"] = {}
    else:
        done["text"] = ""
    yield chunk(done)
    if usage is not None:
        yield chunk(None, {"usage": usage})
    yield b"data: [DONE]\n\n"


def parse_args(argv: list[str] | None) -> tuple[str, int, MockOptions]:
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="mock_openai")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--reply")
    p.add_argument("--no-usage", action="store_true")
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--chunk-delay-ms", type=int, default=0)
    p.add_argument("--fail-status", type=int, default=0)
    p.add_argument("--inflate-usage", type=int, default=1)
    p.add_argument("--models", default="mock-a,mock-b,smollm2")
    a = p.parse_args(argv)
    options = MockOptions(
        reply=a.reply,
        usage=not a.no_usage,
        delay_ms=a.delay_ms,
        chunk_delay_ms=a.chunk_delay_ms,
        fail_status=a.fail_status,
        inflate_usage=a.inflate_usage,
        models=tuple(m for m in a.models.split(",") if m),
    )
    return a.host, a.port, options


async def serve(host: str, port: int, options: MockOptions) -> None:
    """Serve until SIGINT/SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await start_http(nursery, build_app(options), host, port)
            print(f"ready url=http://{bound}/v1", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    host, port, options = parse_args(argv)
    trio.run(serve, host, port, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
