"""A mock OpenAI-compatible backend for tests and benchmarks.

``python -m tests.support.mock_openai [--host H] [--port 0] [--reply TEXT] [--no-usage]
[--delay-ms N] [--chunk-delay-ms N] [--fail-status N] [--inflate-usage K] [--models a,b]
[--api-key KEY] [--stall-after N] [--batch-step-ms N]``
prints exactly one line, ``ready url=http://HOST:PORT/v1``, once listening (port 0 picks a
free port; the line has the real one) and stops with exit code 0 on SIGINT or SIGTERM.

The reply is ``--reply`` or ``"Echo: " + the last user message`` (legacy: the prompt).
Streams send a role chunk (chat), one chunk per word with its whitespace (concatenating
the deltas gives the reply exactly), a chunk with ``finish_reason``, then a usage chunk
(``choices: []``) when ``stream_options.include_usage`` was asked and ``--no-usage`` not
given, then ``data: [DONE]``. Usage counts whitespace-separated words. ``--delay-ms``
waits before answering, ``--chunk-delay-ms`` before each word. Unknown models get 404
``model_not_found``, malformed bodies 400, and ``--fail-status N`` answers every
completion request with HTTP N, message ``mock failure``. With ``--api-key`` every request
without ``Authorization: Bearer KEY`` gets 401 ``invalid_api_key``. ``--stall-after N``
streams N words of an answer and then sends nothing more (an executor stuck mid-answer).
``--batch-step-ms N`` sends the words of every running stream together, one word each
every N ms on a shared clock, as a batched inference server (vLLM, llama.cpp with parallel
slots) emits one token per running sequence at each decoding step.

:func:`build_app` serves the same in-process (e.g. with ``httpx.ASGITransport``); its
:class:`MockOptions` records what it received, for assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lloom.httpserver import start_http

DEFAULT_MODELS = ("mock-a", "mock-b", "smollm2")


@dataclass
class MockOptions:
    """How the mock behaves, and what it has seen."""

    reply: str | None = None
    usage: bool = True
    delay_ms: int = 0
    chunk_delay_ms: int = 0
    fail_status: int = 0
    #: Multiply reported completion tokens (a dishonest backend/executor, for tests).
    inflate_usage: int = 1
    models: tuple[str, ...] = DEFAULT_MODELS
    #: When set, every request must carry ``Authorization: Bearer <api_key>`` (else 401).
    api_key: str | None = None
    #: Streams stop sending after this many words (and stay open), when set.
    stall_after: int | None = None
    #: Words of all streams go out together every this many ms (a batched server's steps).
    batch_step_ms: int = 0
    #: Every completion request body received (parsed), in order.
    seen: list[dict[str, Any]] = field(default_factory=list)
    #: The headers of those requests (lower-case names).
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    #: How each stream ended: "complete", or "aborted" when the client went away.
    stream_ends: list[str] = field(default_factory=list)
    #: Set whenever a stream ends (either way).
    stream_ended: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one completion request gets."""

    chat: bool
    model: str
    text: str
    usage: dict[str, int]


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """An OpenAI error response."""
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": code}},
        status_code=status,
    )


def _words(text: str) -> int:
    return len(text.split())


def _content_text(content: object) -> str:
    """A message's text: a string, or the text parts of a content-part list."""
    if isinstance(content, list):
        return " ".join(
            str(p.get("text") or "") for p in content if isinstance(p, dict) and "text" in p
        )
    return "" if content is None else str(content)


def _prompt_text(body: Mapping[str, Any]) -> str:
    if "messages" in body:
        return " ".join(_content_text(m.get("content")) for m in body["messages"])
    prompt = body.get("prompt", "")
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


def _reply(options: MockOptions, body: Mapping[str, Any]) -> str:
    if options.reply is not None:
        return options.reply
    if "messages" in body:
        users = [m for m in body["messages"] if m.get("role") == "user"]
        return "Echo: " + (_content_text(users[-1].get("content")) if users else "")
    return "Echo: " + _prompt_text(body)


def _pieces(text: str) -> list[str]:
    """Split into words keeping whitespace, so that ``"".join`` gives ``text`` back."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def _body_problem(body: object, chat: bool) -> str | None:
    """Why a parsed body is not a request this endpoint takes, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return "'messages' must be a list of objects"
    elif "prompt" not in body:
        return "'prompt' is required"
    return None


def _answer(options: MockOptions, body: Mapping[str, Any], chat: bool) -> _Answer:
    text = _reply(options, body)
    prompt = _words(_prompt_text(body))
    completion = _words(text) * options.inflate_usage
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    return _Answer(chat, str(body["model"]), text, usage)


def _completion(answer: _Answer, with_usage: bool) -> dict[str, Any]:
    """A complete ``chat.completion`` or ``text_completion`` object."""
    if answer.chat:
        head = {"id": "chatcmpl-mock", "object": "chat.completion"}
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": answer.text}}
    else:
        head = {"id": "cmpl-mock", "object": "text_completion"}
        choice = {"text": answer.text}
    out: dict[str, Any] = {
        **head,
        "created": int(time.time()),
        "model": answer.model,
        "choices": [{"index": 0, **choice, "finish_reason": "stop"}],
    }
    if with_usage:
        out["usage"] = answer.usage
    return out


def _chunker(answer: _Answer) -> Callable[..., bytes]:
    """A function making one SSE event of this answer's stream."""
    created = int(time.time())
    head = (
        {"id": "chatcmpl-mock", "object": "chat.completion.chunk"}
        if answer.chat
        else {"id": "cmpl-mock", "object": "text_completion"}
    )

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> bytes:
        obj = {
            **head,
            "created": created,
            "model": answer.model,
            "choices": [] if choice is None else [{"index": 0, **choice}],
            **extra,
        }
        return f"data: {json.dumps(obj)}\n\n".encode()

    return chunk


async def _events(options: MockOptions, answer: _Answer, with_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body of a streamed answer."""
    chunk = _chunker(answer)
    if answer.chat:
        yield chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    for number, piece in enumerate(_pieces(answer.text)):
        if options.stall_after is not None and number >= options.stall_after:
            await trio.sleep_forever()
        if options.chunk_delay_ms:
            await trio.sleep(options.chunk_delay_ms / 1000)
        if options.batch_step_ms:
            step = options.batch_step_ms / 1000
            await trio.sleep_until((math.floor(trio.current_time() / step) + 1) * step)
        text = {"delta": {"content": piece}} if answer.chat else {"text": piece}
        yield chunk({**text, "finish_reason": None})
    end: dict[str, Any] = {"delta": {}} if answer.chat else {"text": ""}
    yield chunk({**end, "finish_reason": "stop"})
    if with_usage:
        yield chunk(None, usage=answer.usage)
    yield b"data: [DONE]\n\n"


async def _recorded(options: MockOptions, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``events``, noting in ``options`` whether the stream completed or was aborted."""
    outcome = "aborted"
    try:
        async for event in events:
            yield event
        outcome = "complete"
    finally:
        options.stream_ends.append(outcome)
        options.stream_ended.set()


def build_app(options: MockOptions) -> Starlette:
    """The mock as an ASGI app behaving as ``options`` say."""

    def unauthorized(request: Request) -> Response | None:
        if options.api_key is None:
            return None
        if request.headers.get("authorization") == f"Bearer {options.api_key}":
            return None
        return _error(401, "invalid API key", "invalid_api_key")

    async def models(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        data = [{"id": m, "object": "model", "owned_by": "mock"} for m in options.models]
        return JSONResponse({"object": "list", "data": data})

    async def handle(request: Request, chat: bool) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "malformed JSON body")
        problem = _body_problem(body, chat)
        if problem is not None:
            return _error(400, problem)
        options.seen.append(body)
        options.seen_headers.append(dict(request.headers))
        if options.delay_ms:
            await trio.sleep(options.delay_ms / 1000)
        if options.fail_status:
            return _error(options.fail_status, "mock failure")
        if body.get("model") not in options.models:
            return _error(404, f"model {body.get('model')!r} not found", "model_not_found")
        answer = _answer(options, body, chat)
        if not body.get("stream"):
            return JSONResponse(_completion(answer, options.usage))
        asked = (body.get("stream_options") or {}).get("include_usage") is True
        events = _events(options, answer, asked and options.usage)
        return StreamingResponse(_recorded(options, events), media_type="text/event-stream")

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


def parse_args(argv: list[str] | None) -> tuple[str, int, MockOptions]:
    """Command-line flags as (host, port, options)."""
    p = argparse.ArgumentParser(prog="python -m tests.support.mock_openai")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--reply")
    p.add_argument("--no-usage", action="store_true")
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--chunk-delay-ms", type=int, default=0)
    p.add_argument("--fail-status", type=int, default=0)
    p.add_argument("--inflate-usage", type=int, default=1)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--api-key", help="require this bearer token (else 401)")
    p.add_argument("--stall-after", type=int, help="stop streams after N words")
    p.add_argument(
        "--batch-step-ms", type=int, default=0, help="send every stream's next word together"
    )
    a = p.parse_args(argv)
    options = MockOptions(
        reply=a.reply,
        usage=not a.no_usage,
        delay_ms=a.delay_ms,
        chunk_delay_ms=a.chunk_delay_ms,
        fail_status=a.fail_status,
        inflate_usage=a.inflate_usage,
        models=tuple(m for m in a.models.split(",") if m),
        api_key=a.api_key,
        stall_after=a.stall_after,
        batch_step_ms=a.batch_step_ms,
    )
    return a.host, a.port, options


async def serve(host: str, port: int, options: MockOptions) -> None:
    """Serve until SIGINT/SIGTERM, after printing the ready line."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await start_http(nursery, build_app(options), host, port)
            print(f"ready url=http://{bound}/v1", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    host, port, options = parse_args(argv)
    trio.run(serve, host, port, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
