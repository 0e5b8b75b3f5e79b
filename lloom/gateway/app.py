"""The gateway's HTTP API (Starlette on hypercorn's trio worker), OpenAI-compatible.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as Server-Sent Events
ending in ``data: [DONE]``, or whole), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus) and ``GET /openapi.json``. Errors use OpenAI's error JSON with the right status:
400 malformed, 404 model not served, 413 too large, 503 no executor reachable, 504 timeout.
A streamed request fails over between executors until its first chunk; only then are the
response headers sent, so a failure before any token is still a proper HTTP error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lloom.client.network import NetworkClient
from lloom.client.session import Result
from lloom.errors import (
    AllExecutorsFailed,
    DiscoveryFailed,
    InvalidRequest,
    LloomError,
    RequestTooLarge,
)
from lloom.gateway import sse
from lloom.gateway.errors import ApiError, api_error
from lloom.gateway.guard import AccessPolicy, Guard, new_request_id
from lloom.gateway.keys import KeyRing, KeyUsage, Limiter, now
from lloom.gateway.metrics import Metrics
from lloom.gateway.sse import EventStream
from lloom.protocol import llm, openai_body
from lloom.protocol.safejson import safe_loads

logger = logging.getLogger(__name__)

#: Largest request body accepted (413 above).
MAX_BODY_BYTES = 1_048_576


def _operation(summary: str, body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK (JSON, or text/event-stream when stream is true)"},
            **{
                code: {"description": text, "content": {"application/json": {}}}
                for code, text in _ERRORS.items()
            },
        },
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    return op


_ERRORS = {
    "400": "malformed request",
    "404": "model not served by any executor",
    "413": "request too large",
    "503": "no executor reachable",
    "504": "timeout",
}


def _get(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}


#: The gateway's OpenAPI document (request bodies are OpenAI's, passed through).
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "lloom gateway", "version": "1", "description": "OpenAI-compatible API"},
    "paths": {
        "/v1/chat/completions": {"post": _operation("Create a chat completion", body=True)},
        "/v1/completions": {"post": _operation("Create a text completion", body=True)},
        "/v1/models": _get("Models served, with executor counts"),
        "/health": _get("Liveness"),
        "/metrics": _get("Prometheus metrics"),
    },
}


def _error(err: ApiError, metrics: Metrics) -> JSONResponse:
    metrics.errors.labels(err.code or err.type).inc()
    return JSONResponse(err.body(), status_code=err.status)


def _failure(exc: BaseException, metrics: Metrics) -> JSONResponse:
    """The answer for any exception of a request, logged once (a bug with its traceback)."""
    answer = api_error(exc)
    if isinstance(exc, LloomError):
        logger.info("request failed: %s: %s", answer.code, exc)
    else:
        logger.error("request failed: unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
    response = _error(answer, metrics)
    if isinstance(exc, DiscoveryFailed | AllExecutorsFailed):
        response.headers["retry-after"] = str(exc.retry_after)
    return response


async def _read_body(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length") or "0"
    if not length.isdigit() or len(length) > 12:
        raise InvalidRequest("bad Content-Length")
    if int(length) > MAX_BODY_BYTES:
        raise RequestTooLarge("request body too large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > MAX_BODY_BYTES:
            raise RequestTooLarge("request body too large")
    body = safe_loads(bytes(data), "request body")
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


@dataclass(frozen=True)
class Access:
    """Who may use the gateway: Host/Origin policy, API keys, and where key usage is kept."""

    policy: AccessPolicy = field(default_factory=lambda: AccessPolicy.for_listen("127.0.0.1"))
    keys: KeyRing = field(default_factory=lambda: KeyRing([]))
    usage: KeyUsage | None = None


class GatewayApp:
    """The HTTP endpoints, bound to one :class:`Gateway`, behind a :class:`Guard`."""

    #: Seconds a stream waits for its first token before it starts, with an SSE comment
    #: (then one every ``comment_every``), so long prefills do not hit idle timeouts.
    first_token_grace: float = 5.0
    comment_every: float = 5.0
    #: Seconds without a token after which a started stream gets an SSE comment.
    ping_every: float = 15.0

    def __init__(
        self, gateway: NetworkClient, metrics: Metrics | None = None, access: Access | None = None
    ) -> None:
        self.gateway = gateway
        self.m = metrics or Metrics()
        self.access = access or Access()
        self.limiter = Limiter()
        if self.access.usage is not None:
            today = now()
            for name, tokens in self.access.usage.today(today).items():
                self.limiter.set_tokens(name, today, tokens)
        self.routes = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.legacy, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"], include_in_schema=False),
            ]
        )
        self.app = Guard(self.routes, self.access.policy, self.access.keys, self.limiter, self.m)

    def _charge(self, request: Request, result: Result) -> None:
        """Count a finished request against its API key."""
        name = getattr(request.state, "api_key", None)
        if name is None:
            return
        usage = result.billed
        self.m.key_requests.labels(name).inc()
        self.m.key_tokens.labels(name, "prompt").inc(usage.prompt_tokens)
        self.m.key_tokens.labels(name, "completion").inc(usage.completion_tokens)
        moment = now()
        self.limiter.add_tokens(name, moment, usage.total_tokens)
        if self.access.usage is not None:
            self.access.usage.add(name, moment, usage.prompt_tokens, usage.completion_tokens)

    async def chat(self, request: Request) -> Response | EventStream:
        """
        summary: Create a chat completion (OpenAI-compatible), streamed or whole.
        """
        return await self._completions(request, llm.RequestKind.CHAT, "chat")

    async def legacy(self, request: Request) -> Response | EventStream:
        """
        summary: Create a text completion (OpenAI-compatible), streamed or whole.
        """
        return await self._completions(request, llm.RequestKind.COMPLETION, "completions")

    async def models(self, _: Request) -> Response:
        """
        summary: Models served on the network, with how many executors serve each and how many
        of them this gateway reaches directly or through a validator's relay.
        """
        self.m.requests.labels("models").inc()
        data = [
            {
                "id": model,
                "object": "model",
                "owned_by": "lloom",
                "executors": listing.executors,
                "paths": listing.to_json(),
            }
            for model, listing in sorted((await self.gateway.models()).items())
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, _: Request) -> Response:
        """
        summary: Liveness, connected peers and executors known.
        """
        return JSONResponse(
            {
                "status": "ok",
                "peer_id": str(self.gateway.node.peer_id),
                "connected_peers": len(self.gateway.node.host.get_connected_peers()),
                "executors_known": len(self.gateway.loads.current()),
            }
        )

    async def prometheus(self, _: Request) -> Response:
        """
        summary: Prometheus metrics.
        """
        self.m.executors.set(len(self.gateway.loads.current()))
        return Response(generate_latest(self.m.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, _: Request) -> Response:
        """The OpenAPI schema of these endpoints."""
        return JSONResponse(OPENAPI)

    async def _completions(
        self, request: Request, kind: llm.RequestKind, endpoint: str
    ) -> Response | EventStream:
        self.m.requests.labels(endpoint).inc()
        started = time.perf_counter()
        try:
            body = openai_body.normalize(kind, await _read_body(request))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            body.pop("stream_options", None)
            request_id = getattr(request.state, "request_id", None) or new_request_id()
            req = llm.Request(kind, body, request_id)
            if req.stream:
                call = _Call(request, endpoint, started, include_usage)
                return await self._stream(call, req)
            result = await self.gateway.run(req)
        except Exception as exc:  # the request's boundary: an OpenAI error, never a crash
            return _failure(exc, self.m)
        self._charge(request, result)
        self.m.latency.labels(endpoint).observe(time.perf_counter() - started)
        data = dict(result.response or {})
        data["usage"] = result.end.usage.to_json()
        return JSONResponse(data)

    async def _stream(self, call: _Call, req: llm.Request) -> Response | EventStream:
        send, receive = trio.open_memory_channel[Item](math.inf)
        live = sse.Live()

        async def deliver(item: Item) -> None:
            """Hand ``item`` to the response, or, once it caught up, write it."""
            if not live.direct:
                await send.send(item)
                return
            out: list[bytes] = []
            ended = self._encode(call, item, out)
            if ended:
                out.append(sse.DONE)
            await live.write(b"".join(out))
            if ended:
                live.finish()

        async def produce() -> None:
            async with send:
                try:
                    await deliver(await self.gateway.run(req, deliver))
                except trio.BrokenResourceError:
                    pass  # the HTTP client went away
                except Exception as exc:  # runs in the gateway's nursery: never let it out
                    with contextlib.suppress(trio.BrokenResourceError):
                        await deliver(exc)
                finally:
                    live.finish()

        if self.gateway.nursery is None:
            raise RuntimeError("the gateway's nursery is not set")
        self.gateway.nursery.start_soon(produce)
        first: Item | None = None
        with trio.move_on_after(self.first_token_grace):
            first = await receive.receive()
        if isinstance(first, BaseException):
            await receive.aclose()
            return _failure(first, self.m)
        return EventStream(self._events(call, first, receive, live), live)

    async def _events(
        self,
        call: _Call,
        first: Item | None,
        receive: trio.MemoryReceiveChannel[Item],
        live: sse.Live,
    ) -> AsyncGenerator[bytes, None]:
        """The SSE body: what waited goes out in one write; once nothing waits, the
        producer writes the rest itself (``live.direct``) and this only sends pings."""
        item = first
        async with receive:
            while item is None:  # a long prefill: keep the connection visibly alive
                yield sse.comment("waiting for the first token")
                with trio.move_on_after(self.comment_every):
                    item = await receive.receive()
            if not isinstance(item, BaseException):
                self.m.ttft.labels(call.endpoint).observe(time.perf_counter() - call.started)
            while True:
                out: list[bytes] = []
                ended = self._encode(call, item, out)
                if ended:
                    out.append(sse.DONE)
                yield b"".join(out)
                if ended:
                    return
                try:
                    item = receive.receive_nowait()
                except trio.WouldBlock:  # caught up: the producer writes from now on
                    live.direct = True
                    break
                except trio.EndOfChannel:  # the producer was cancelled (shutdown)
                    return
        while not live.done.is_set():
            with trio.move_on_after(self.ping_every):
                await live.done.wait()
            if not live.done.is_set():
                await live.write(sse.comment("ping"))

    def _encode(self, call: _Call, item: Item, out: list[bytes]) -> bool:
        """Append ``item``'s SSE bytes to ``out``; True when it ends the stream."""
        if isinstance(item, dict):
            out.append(sse.event(item))
            return False
        if isinstance(item, Result):
            self._charge(call.request, item)
            self.m.latency.labels(call.endpoint).observe(time.perf_counter() - call.started)
            if call.include_usage:
                out.append(sse.event(_usage_chunk(item)))
            return True
        # an executor failed after tokens were sent: say so in the stream
        self.m.errors.labels("partial_response").inc()
        logger.info("stream failed after tokens: %s", item)
        out.append(sse.event(api_error(item).body()))
        return True


Item = dict[str, Any] | Result | Exception


@dataclass(frozen=True, slots=True)
class _Call:
    """One HTTP call being answered."""

    request: Request
    endpoint: str
    started: float
    include_usage: bool = False


def build_app(
    gateway: NetworkClient, metrics: Metrics | None = None, access: Access | None = None
) -> Guard:
    """The ASGI app of ``gateway``."""
    return GatewayApp(gateway, metrics, access).app


def _usage_chunk(result: Result) -> dict[str, Any]:
    """OpenAI's final usage-only stream chunk."""
    return {
        "id": f"chatcmpl-{result.end.request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": result.end.model,
        "choices": [],
        "usage": result.billed.to_json(),
    }
