"""The OpenAI backend client against the mock backend.

Most tests run the mock in-process through ``httpx.ASGITransport`` (no network); timeouts,
refused connections and aborted streams need a real socket, so those serve the mock on
127.0.0.1 (or use a port nobody listens on). One test runs the mock as a real process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lloom.errors import BackendError, BackendHTTPError, BackendTimeout, BackendUnreachable
from lloom.executor.backend import BackendSpec, OpenAIBackend
from lloom.httpserver import start_http
from tests.support.mock_openai import MockOptions, build_app

ROOT = Path(__file__).resolve().parents[2]
SPEC = BackendSpec("mock", "http://mock/v1", "sk-test", {"net-a": "mock-a", "mock-b": "mock-b"})


@asynccontextmanager
async def backend(options: MockOptions, spec: BackendSpec = SPEC) -> AsyncIterator[OpenAIBackend]:
    """A backend client talking to the mock app in-process."""
    transport = httpx.ASGITransport(app=build_app(options))
    async with httpx.AsyncClient(transport=transport) as client:
        yield OpenAIBackend(spec, client)


@asynccontextmanager
async def served(options: MockOptions) -> AsyncIterator[str]:
    """The mock served on 127.0.0.1; yields its /v1 URL."""
    async with trio.open_nursery() as nursery:
        bound = await start_http(nursery, build_app(options), "127.0.0.1", 0)
        yield f"http://{bound}/v1"
        nursery.cancel_scope.cancel()


def chat_body(model: str = "net-a", **extra: object) -> dict[str, Any]:
    """A chat request with one user message, "hi there"."""
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}]} | extra


def chunk_text(chunks: list[dict[str, Any]]) -> str:
    """The concatenated deltas (chat) or texts (legacy) of stream chunks."""
    parts = []
    for c in chunks:
        for choice in c["choices"]:
            parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(parts)


def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def answering(content_type: str, text: str) -> httpx.MockTransport:
    """A transport whose every answer is 200 with this body."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=text, headers={"content-type": content_type})

    return httpx.MockTransport(handler)


async def test_chat_rewrites_model_both_ways_and_sends_key() -> None:
    options = MockOptions()
    async with backend(options) as b:
        data = await b.chat(chat_body(stream_options={"include_usage": True}))
    assert data["model"] == "net-a"
    assert data["choices"][0]["message"]["content"] == "Echo: hi there"
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    sent = options.seen[0]
    assert sent["model"] == "mock-a"
    assert sent["stream"] is False
    assert "stream_options" not in sent
    assert options.seen_headers[0]["authorization"] == "Bearer sk-test"


async def test_no_key_no_authorization_header_and_key_not_in_repr() -> None:
    options = MockOptions()
    async with backend(options, BackendSpec("open", "http://mock/v1", None, {"m": "mock-a"})) as b:
        await b.chat(chat_body("m"))
    assert "authorization" not in options.seen_headers[0]
    assert "sk-test" not in repr(SPEC)


async def test_stream_asks_for_usage_and_deltas_concatenate() -> None:
    options = MockOptions(reply="alpha beta  gamma ")
    async with backend(options) as b:
        chunks = [c async for c in b.chat_stream(chat_body(stream_options={"x": 1}))]
    assert options.seen[0]["stream"] is True
    assert options.seen[0]["stream_options"] == {"x": 1, "include_usage": True}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunk_text(chunks) == "alpha beta  gamma "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert {c["model"] for c in chunks} == {"net-a"}


async def test_stream_without_usage() -> None:
    options = MockOptions(usage=False)
    async with backend(options) as b:
        chunks = [c async for c in b.chat_stream(chat_body())]
    assert options.seen[0]["stream_options"] == {"include_usage": True}
    assert chunk_text(chunks) == "Echo: hi there"
    assert not any("usage" in c for c in chunks)
    assert all(c["choices"] for c in chunks)


async def test_stream_headers_do_not_leak_into_later_requests() -> None:
    options = MockOptions()
    async with backend(options) as b:
        [c async for c in b.chat_stream(chat_body())]
        await b.chat(chat_body())
    assert options.seen_headers[0]["accept"] == "text/event-stream"
    assert options.seen_headers[1]["accept"] != "text/event-stream"


class Noting(httpx.AsyncByteStream):
    """A response body that notes in ``closed[index]`` when it is closed."""

    def __init__(self, inner: httpx.AsyncByteStream, closed: list[bool], index: int) -> None:
        self.inner, self.closed, self.index = inner, closed, index

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self.inner:
            yield part

    async def aclose(self) -> None:
        self.closed[self.index] = True
        await self.inner.aclose()


class Recorder(httpx.AsyncBaseTransport):
    """Wraps a transport; notes when each response's body is closed."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.closed: list[bool] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        self.closed.append(False)
        body = Noting(response.stream, self.closed, len(self.closed) - 1)
        return httpx.Response(response.status_code, headers=response.headers, stream=body)


async def test_early_stop_closes_the_response() -> None:
    recorder = Recorder(httpx.ASGITransport(app=build_app(MockOptions(reply="a b c d e f"))))
    async with httpx.AsyncClient(transport=recorder) as client:
        stream = OpenAIBackend(SPEC, client).chat_stream(chat_body())
        first = await anext(stream)
        assert recorder.closed == [False]
        await stream.aclose()
        assert recorder.closed == [True]
    assert first["choices"][0]["delta"]["role"] == "assistant"


# Stopping a real HTTP stream early closes the response (and its connection), but httpx and
# httpcore nest async generators without closing the inner ones; trio warns when the GC
# finalizes them. Harmless here, and only these are ignored.
HTTPX_GENERATORS = (
    "(AsyncHTTP11Connection._receive_response_body|HTTP11ConnectionByteStream.__aiter__"
    "|PoolByteStream.__aiter__|AsyncResponseStream.__aiter__|BoundAsyncStream.__aiter__)"
)


@pytest.mark.filterwarnings(
    f"ignore:Exception ignored in. <async_generator object {HTTPX_GENERATORS}"
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_early_stop_reaches_the_backend() -> None:
    options = MockOptions(reply=" ".join(["word"] * 200), chunk_delay_ms=20)
    async with served(options) as url, httpx.AsyncClient() as client:
        b = OpenAIBackend(BackendSpec("real", url, None, {"mock-a": "mock-a"}), client)
        async with aclosing(b.chat_stream(chat_body("mock-a"))) as chunks:
            async for _ in chunks:
                break
        with trio.fail_after(10):
            await options.stream_ended.wait()
    assert options.stream_ends == ["aborted"]


async def test_legacy_completions() -> None:
    options = MockOptions()
    async with backend(options) as b:
        data = await b.completions({"model": "mock-b", "prompt": "say it"})
        chunks = [c async for c in b.completions_stream({"model": "mock-b", "prompt": "say"})]
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "Echo: say it"
    assert data["usage"]["prompt_tokens"] == 2
    assert chunk_text(chunks) == "Echo: say"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert options.seen[1]["stream_options"] == {"include_usage": True}


async def test_list_models() -> None:
    async with backend(MockOptions(models=("x", "y"))) as b:
        assert await b.list_models() == ["x", "y"]


@pytest.mark.parametrize("call", ["chat", "chat_stream", "completions", "completions_stream"])
async def test_http_500_keeps_status_and_message(call: str) -> None:
    async with backend(MockOptions(fail_status=500)) as b:
        with pytest.raises(BackendHTTPError) as err:
            if call.endswith("_stream"):
                [c async for c in getattr(b, call)(chat_body(prompt="p"))]
            else:
                await getattr(b, call)(chat_body(prompt="p"))
    assert err.value.status == 500
    assert err.value.message == "mock failure"


async def test_unknown_model_is_404() -> None:
    async with backend(MockOptions()) as b:
        with pytest.raises(BackendHTTPError) as err:
            await b.chat(chat_body("unmapped-model"))
        assert err.value.status == 404 and err.value.message == "model 'unmapped-model' not found"
        with pytest.raises(BackendHTTPError) as err:
            [c async for c in b.chat_stream(chat_body("unmapped-model"))]
        assert err.value.status == 404


async def test_plain_text_error_body_is_the_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="x" * 600)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(BackendHTTPError) as err:
            await OpenAIBackend(SPEC, client).chat(chat_body())
    assert err.value.status == 503 and err.value.message == "x" * 500


async def test_unreachable() -> None:
    spec = BackendSpec("gone", f"http://127.0.0.1:{closed_port()}/v1", None, {"m": "m"}, 5)
    async with httpx.AsyncClient() as client:
        b = OpenAIBackend(spec, client)
        with pytest.raises(BackendUnreachable):
            await b.chat(chat_body("m"))
        with pytest.raises(BackendUnreachable):
            [c async for c in b.chat_stream(chat_body("m"))]
        with pytest.raises(BackendUnreachable):
            await b.list_models()


async def test_timeout_before_the_answer() -> None:
    async with served(MockOptions(delay_ms=3000)) as url, httpx.AsyncClient() as client:
        b = OpenAIBackend(BackendSpec("slow", url, None, {"mock-a": "mock-a"}, 0.2), client)
        with pytest.raises(BackendTimeout):
            await b.chat(chat_body("mock-a"))
        with pytest.raises(BackendTimeout):
            [c async for c in b.chat_stream(chat_body("mock-a"))]


async def test_timeout_between_chunks() -> None:
    options = MockOptions(reply="one two three", chunk_delay_ms=3000)
    async with served(options) as url, httpx.AsyncClient() as client:
        b = OpenAIBackend(BackendSpec("slow", url, None, {"mock-a": "mock-a"}, 0.5), client)
        received: list[dict[str, Any]] = []
        with pytest.raises(BackendTimeout):
            async for chunk in b.chat_stream(chat_body("mock-a")):
                received.append(chunk)
    assert [c["choices"][0]["delta"].get("role") for c in received] == ["assistant"]


async def test_garbage_sse_is_a_backend_error() -> None:
    async with httpx.AsyncClient(transport=answering("text/event-stream", "data: {no\n\n")) as c:
        with pytest.raises(BackendError, match="malformed stream event") as err:
            [x async for x in OpenAIBackend(SPEC, c).chat_stream(chat_body())]
    assert type(err.value) is BackendError


async def test_non_sse_stream_answer_is_a_backend_error() -> None:
    async with httpx.AsyncClient(transport=answering("application/json", "{}")) as client:
        with pytest.raises(BackendError, match="did not stream SSE") as err:
            [x async for x in OpenAIBackend(SPEC, client).chat_stream(chat_body())]
    assert type(err.value) is BackendError


@pytest.mark.parametrize("text", ["hello", "[1, 2]"])
async def test_non_object_json_answer_is_a_backend_error(text: str) -> None:
    async with httpx.AsyncClient(transport=answering("application/json", text)) as client:
        b = OpenAIBackend(SPEC, client)
        with pytest.raises(BackendError) as err:
            await b.chat(chat_body())
        assert type(err.value) is BackendError
        with pytest.raises(BackendError) as err:
            await b.list_models()
        assert type(err.value) is BackendError


async def test_error_event_mid_stream_is_an_http_error() -> None:
    body = 'data: {"choices": []}\n\ndata: {"error": {"message": "out of memory"}}\n\n'
    async with httpx.AsyncClient(transport=answering("text/event-stream", body)) as client:
        with pytest.raises(BackendHTTPError) as err:
            [x async for x in OpenAIBackend(SPEC, client).chat_stream(chat_body())]
    assert err.value.message == "out of memory"


async def test_mock_rejects_malformed_json() -> None:
    transport = httpx.ASGITransport(app=build_app(MockOptions()))
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
        response = await client.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    """One line from ``stream`` (without the newline); fails at end of stream."""
    data = b""
    while not data.endswith(b"\n"):
        part = await stream.receive_some(4096)
        if not part:
            raise AssertionError(f"stream ended before a full line: {data!r}")
        data += part
    return data.decode().rstrip("\n")


async def test_mock_as_a_process_prints_ready_and_exits_0_on_sigterm() -> None:
    argv = [sys.executable, "-m", "tests.support.mock_openai", "--port", "0", "--reply", "pong"]
    process = await trio.lowlevel.open_process(argv, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        with trio.fail_after(30):
            line = await read_line(process.stdout)
        assert line.startswith("ready url=http://127.0.0.1:") and line.endswith("/v1")
        url = line.removeprefix("ready url=")
        async with httpx.AsyncClient() as client:
            b = OpenAIBackend(BackendSpec("proc", url, None, {"m": "mock-a"}), client)
            data = await b.chat(chat_body("m"))
        assert data["choices"][0]["message"]["content"] == "pong"
        os.kill(process.pid, signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


def test_client_shards_bound_each_pool_and_requests_take_them_in_turn() -> None:
    from lloom.executor.backend import REQUESTS_PER_CLIENT, client_shards

    shards = client_shards(64)
    assert len(shards) == 64 // REQUESTS_PER_CLIENT
    assert len(client_shards(1)) == 1 and len(client_shards(10_000)) == 16
    backend = OpenAIBackend(SPEC, shards)
    used = [backend.client for _ in range(2 * len(shards))]
    assert set(map(id, used)) == set(map(id, shards))  # every shard, in turn
    assert used[: len(shards)] == used[len(shards) :]
    with pytest.raises(ValueError, match="at least one"):
        OpenAIBackend(SPEC, [])
