"""The OpenAI backend client against the mock app, in-process (httpx.ASGITransport)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from lloom.errors import BackendError, BackendHTTPError, BackendTimeout, BackendUnreachable
from lloom.executor.backend import BackendSpec, OpenAIBackend
from lloom.httpserver import start_http
from tests.support.mock_openai import MockOptions, build_app

SPEC = BackendSpec("mock", "http://mock/v1", "sk-test", {"net-a": "mock-a", "mock-b": "mock-b"})


@asynccontextmanager
async def backend(options: MockOptions, spec: BackendSpec = SPEC) -> AsyncIterator[OpenAIBackend]:
    transport = httpx.ASGITransport(app=build_app(options))
    async with httpx.AsyncClient(transport=transport) as client:
        yield OpenAIBackend(spec, client)


def chat_body(model: str = "net-a", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}]} | extra


async def test_chat_rewrites_model_both_ways_and_sends_key() -> None:
    options = MockOptions()
    async with backend(options) as b:
        data = await b.chat(chat_body())
    assert data["model"] == "net-a"
    assert data["choices"][0]["message"]["content"] == "Echo: hi there"
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert options.seen[0]["model"] == "mock-a"
    assert options.seen[0]["stream"] is False
    assert options.seen_headers[0]["authorization"] == "Bearer sk-test"
    assert "sk-test" not in repr(SPEC)


async def test_stream_asks_for_usage_and_concatenates() -> None:
    options = MockOptions(reply="alpha beta  gamma")
    async with backend(options) as b:
        chunks = [c async for c in b.chat_stream(chat_body(stream_options={"x": 1}))]
    assert options.seen[0]["stream_options"] == {"x": 1, "include_usage": True}
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text == "alpha beta  gamma"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["model"] == "net-a" for c in chunks)


async def test_stream_without_usage() -> None:
    async with backend(MockOptions(usage=False)) as b:
        chunks = [c async for c in b.chat_stream(chat_body())]
    assert not any("usage" in c for c in chunks)


async def test_early_stop_closes_the_stream() -> None:
    async with backend(MockOptions(reply="a b c d e f")) as b:
        stream = b.chat_stream(chat_body())
        first = await anext(stream)
        await stream.aclose()
    assert first["choices"][0]["delta"]["role"] == "assistant"


async def test_legacy_completions() -> None:
    async with backend(MockOptions()) as b:
        data = await b.completions({"model": "mock-b", "prompt": "say"})
        chunks = [c async for c in b.completions_stream({"model": "mock-b", "prompt": "say"})]
    assert data["choices"][0]["text"] == "Echo: say"
    assert "".join(c["choices"][0].get("text", "") for c in chunks if c["choices"]) == "Echo: say"


async def test_http_errors_keep_status_and_message() -> None:
    async with backend(MockOptions(fail_status=500)) as b:
        with pytest.raises(BackendHTTPError) as err:
            await b.chat(chat_body())
        assert err.value.status == 500 and err.value.message == "mock failure"
        with pytest.raises(BackendHTTPError) as err:
            [c async for c in b.chat_stream(chat_body())]
        assert err.value.status == 500
    async with backend(MockOptions()) as b:
        with pytest.raises(BackendHTTPError) as err:
            await b.chat(chat_body("unmapped-model"))
        assert err.value.status == 404 and "not found" in err.value.message


async def test_unreachable_and_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = BackendSpec("gone", f"http://127.0.0.1:{port}/v1", None, {"m": "m"}, timeout=2)
    async with httpx.AsyncClient() as client:
        b = OpenAIBackend(spec, client)
        with pytest.raises(BackendUnreachable):
            await b.chat(chat_body("m"))
        with pytest.raises(BackendUnreachable):
            [c async for c in b.chat_stream(chat_body("m"))]
    # Timeouts are enforced by the real transport: serve the mock on 127.0.0.1.
    async with trio.open_nursery() as nursery:
        bound = await start_http(nursery, build_app(MockOptions(delay_ms=2000)), "127.0.0.1", 0)
        slow = BackendSpec("slow", f"http://{bound}/v1", None, {"mock-a": "mock-a"}, timeout=0.2)
        async with httpx.AsyncClient() as client:
            b = OpenAIBackend(slow, client)
            with pytest.raises(BackendTimeout):
                await b.chat(chat_body("mock-a"))
            with pytest.raises(BackendTimeout):
                [c async for c in b.chat_stream(chat_body("mock-a"))]
        nursery.cancel_scope.cancel()


async def test_garbage_stream_is_a_backend_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, text="data: {not json\n\n", headers={"content-type": "text/event-stream"}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        b = OpenAIBackend(SPEC, client)
        with pytest.raises(BackendError, match="malformed"):
            [c async for c in b.chat_stream(chat_body())]

    def plain(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="hello")

    async with httpx.AsyncClient(transport=httpx.MockTransport(plain)) as client:
        b = OpenAIBackend(SPEC, client)
        with pytest.raises(BackendError, match="non-JSON"):
            await b.chat(chat_body())
        with pytest.raises(BackendError, match="SSE"):
            [c async for c in b.chat_stream(chat_body())]
