"""The gateway's HTTP layer in memory (httpx ASGITransport, a fake network side).

Regression tests for the issue "Among strangers": bodies that stopped the gateway, a
gateway anyone could spend, text/plain and foreign Host/Origin requests, per-key limits,
request ids, and the SSE comment while a stream waits for its first token.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import trio

from lloom.client.network import Listing, NetworkClient
from lloom.client.session import Result
from lloom.gateway.app import Access, GatewayApp
from lloom.gateway.guard import AccessPolicy
from lloom.gateway.keys import ApiKey, KeyRing, KeyUsage
from lloom.identity import Identity
from lloom.protocol import llm

EXECUTOR = Identity.generate().peer_id
KEY = "llm-" + "k" * 30


class FakeGateway:
    """What GatewayApp uses of a Gateway; answers with two chunks."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.requests: list[llm.Request] = []
        self.delay, self.fail = delay, fail
        self.nursery: trio.Nursery | None = None
        host = SimpleNamespace(get_connected_peers=lambda: [])
        self.node = SimpleNamespace(peer_id=EXECUTOR, host=host)
        self.loads = SimpleNamespace(current=dict)

    async def run(
        self,
        request: llm.Request,
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> Result:
        self.requests.append(request)
        await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if on_chunk is not None:
            for word in ("Hel", "lo"):
                await on_chunk({"choices": [{"index": 0, "delta": {"content": word}}]})
        end = llm.End("r1", request.model, llm.Usage(5, 2))
        response = None if request.stream else {"choices": [{"message": {"content": "Hello"}}]}
        return Result(EXECUTOR, end, response, 2)

    async def models(self) -> dict[str, Listing]:
        return {"m": Listing(1, 0)}


def app(fake: FakeGateway, access: Access | None = None, **attrs: Any) -> GatewayApp:
    gateway_app = GatewayApp(cast(NetworkClient, fake), access=access)
    for name, value in attrs.items():
        setattr(gateway_app, name, value)
    return gateway_app


def client(gateway_app: GatewayApp, host: str = "127.0.0.1:8080") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gateway_app.app)
    return httpx.AsyncClient(transport=transport, base_url=f"http://{host}")


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def with_nursery(fake: FakeGateway, body: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        fake.nursery = nursery
        await body()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "raw",
    [
        '{"model":"m","messages":[{"role":"user","content":"\\ud800x"}],"stream":%s}',
        '{"model":"m","messages":[{"role":"user","content":"hi"}],"seed":'
        + "9" * 5000
        + ',"stream":%s}',
    ],
    ids=["lone-surrogate", "5000-digits"],
)
async def test_crashing_bodies_get_400_and_the_gateway_serves_on(raw: str, stream: bool) -> None:
    fake = FakeGateway()

    async def body() -> None:
        async with client(app(fake)) as http:
            bad = await http.post(
                "/v1/chat/completions",
                content=raw % json.dumps(stream),
                headers={"content-type": "application/json"},
            )
            assert bad.status_code == 400
            assert bad.json()["error"]["type"] == "invalid_request_error"
            good = await http.post("/v1/chat/completions", json=BODY | {"stream": stream})
            assert good.status_code == 200

    await with_nursery(fake, body)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_an_unexpected_exception_is_an_openai_500(stream: bool) -> None:
    fake = FakeGateway(fail=RuntimeError("secret internals"))

    async def body() -> None:
        async with client(app(fake)) as http:
            answer = await http.post("/v1/chat/completions", json=BODY | {"stream": stream})
            assert answer.status_code == 500
            assert answer.json()["error"]["message"] == "internal error"
            fake.fail = None
            assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200

    await with_nursery(fake, body)


async def test_text_plain_and_foreign_hosts_and_origins_are_refused() -> None:
    fake = FakeGateway()
    async with client(app(fake)) as http:
        plain = await http.post(
            "/v1/chat/completions",
            content=json.dumps(BODY),
            headers={"content-type": "text/plain"},
        )
        assert plain.status_code == 415
        evil = await http.post(
            "/v1/chat/completions", json=BODY, headers={"origin": "https://evil.example"}
        )
        assert evil.status_code == 403 and "Origin" in evil.json()["error"]["message"]
        same = await http.post(
            "/v1/chat/completions", json=BODY, headers={"origin": "http://localhost:3000"}
        )
        assert same.status_code == 200
    async with client(app(fake), host="rebind.evil.example:8080") as http:
        rebound = await http.post("/v1/chat/completions", json=BODY)
        assert rebound.status_code == 403 and "Host" in rebound.json()["error"]["message"]
        assert (await http.get("/v1/models")).status_code == 403
    assert len(fake.requests) == 1


def test_access_policy_for_each_kind_of_listen_address() -> None:
    loop = AccessPolicy.for_listen("127.0.0.1")
    loop.check("GET", {"host": "localhost:8080"})
    loop.check("GET", {"host": "[::1]:8080"})
    wildcard = AccessPolicy.for_listen("0.0.0.0")
    assert wildcard.hosts is None
    wildcard.check("GET", {"host": "gpu-box.lan:8080"})
    named = AccessPolicy.for_listen("0.0.0.0", ["gateway.example"], ["https://app.example"])
    named.check("POST", {"host": "gateway.example", "content-type": "application/json"})
    named.check("GET", {"host": "gateway.example", "origin": "https://app.example"})
    with pytest.raises(Exception, match="Host"):
        named.check("GET", {"host": "other.example"})
    with pytest.raises(Exception, match="Origin"):
        named.check("GET", {"host": "gateway.example", "origin": "null"})


def keyed(tmp_path: Path, **limits: Any) -> Access:
    ring = KeyRing([ApiKey("alice", KEY, **limits)])
    return Access(AccessPolicy.for_listen("127.0.0.1"), ring, KeyUsage(tmp_path / "k.sqlite3"))


async def test_keys_are_required_and_nothing_runs_without_one(tmp_path: Path) -> None:
    fake = FakeGateway()
    async with client(app(fake, keyed(tmp_path))) as http:
        anonymous = await http.post("/v1/chat/completions", json=BODY)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
        wrong = await http.post(
            "/v1/chat/completions", json=BODY, headers={"authorization": "Bearer " + "x" * 34}
        )
        assert wrong.status_code == 401
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/health")).status_code == 200
        assert fake.requests == []
        good = await http.post(
            "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"}
        )
        assert good.status_code == 200
    assert len(fake.requests) == 1


async def test_requests_per_minute_and_tokens_per_day(tmp_path: Path) -> None:
    fake = FakeGateway()
    auth = {"authorization": f"Bearer {KEY}"}
    access = keyed(tmp_path, requests_per_minute=2, tokens_per_day=100)
    async with client(app(fake, access)) as http:
        first = await http.post("/v1/chat/completions", json=BODY, headers=auth)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-remaining-tokens"] == "100"
        await http.post("/v1/chat/completions", json=BODY, headers=auth)
        third = await http.post("/v1/chat/completions", json=BODY, headers=auth)
        assert third.status_code == 429
        assert int(third.headers["retry-after"]) >= 1
        assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert len(fake.requests) == 2
    assert access.usage is not None
    assert access.usage.rows()[0][2:] == (2, 10, 4)  # requests, prompt, completion
    # a new gateway on the same database starts from today's tokens
    spent = keyed(tmp_path, tokens_per_day=14)
    async with client(app(fake, spent)) as http:
        over = await http.post("/v1/chat/completions", json=BODY, headers=auth)
        assert over.status_code == 429 and "tokens" in over.json()["error"]["message"]


async def test_every_response_has_a_request_id_that_reaches_the_executor() -> None:
    fake = FakeGateway()
    async with client(app(fake)) as http:
        ok = await http.post("/v1/chat/completions", json=BODY)
        refused = await http.post("/v1/chat/completions", content=b"x")
        models = await http.get("/v1/models")
    ids = [r.headers["x-request-id"] for r in (ok, refused, models)]
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == 3
    assert fake.requests[0].request_id == ids[0]


async def test_a_slow_first_token_starts_the_stream_with_a_comment() -> None:
    fake = FakeGateway(delay=0.3)

    async def body() -> None:
        gateway_app = app(fake, first_token_grace=0.05, comment_every=0.1)
        streamed = BODY | {"stream": True}
        async with (
            client(gateway_app) as http,
            http.stream("POST", "/v1/chat/completions", json=streamed) as answer,
        ):
            lines = [line async for line in answer.aiter_lines() if line]
        assert lines[0].startswith(": waiting for the first token")
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and len(data) == 3

    await with_nursery(fake, body)


class SlowStream(FakeGateway):
    """Streams ``words`` chunks ``gap`` s apart; notes how its run ended."""

    def __init__(self, words: int, gap: float) -> None:
        super().__init__()
        self.words, self.gap = words, gap
        self.ended = trio.Event()
        self.outcome = ""

    async def run(
        self,
        request: llm.Request,
        on_chunk: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> Result:
        assert on_chunk is not None
        try:
            for i in range(self.words):
                await on_chunk({"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]})
                await trio.sleep(self.gap)
            self.outcome = "complete"
        except trio.BrokenResourceError:
            self.outcome = "stopped: the client went away"
            raise
        finally:
            self.ended.set()
        return Result(EXECUTOR, llm.End("r1", request.model, llm.Usage(5, 2)), None, self.words)


async def serve_fake(fake: FakeGateway, nursery: trio.Nursery) -> str:
    from lloom.httpserver import start_http

    fake.nursery = nursery
    bound = await start_http(nursery, app(fake).app, "127.0.0.1", 0)
    return f"http://{bound}"


async def test_chunks_after_the_first_are_written_by_the_producer_in_order() -> None:
    fake = SlowStream(words=30, gap=0.01)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await serve_fake(fake, nursery)
            streamed = BODY | {"stream": True, "stream_options": {"include_usage": True}}
            async with (
                httpx.AsyncClient(base_url=url) as http,
                http.stream("POST", "/v1/chat/completions", json=streamed) as answer,
            ):
                assert answer.headers["content-type"].startswith("text/event-stream")
                data = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
            nursery.cancel_scope.cancel()
    words = [json.loads(d[6:])["choices"][0]["delta"]["content"] for d in data[:30]]
    assert words == [f"w{i} " for i in range(30)]
    assert json.loads(data[30][6:])["usage"]["total_tokens"] == 7  # include_usage
    assert data[31:] == ["data: [DONE]"] and fake.outcome == "complete"


async def test_a_client_that_goes_away_mid_stream_stops_the_request() -> None:
    fake = SlowStream(words=1000, gap=0.02)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await serve_fake(fake, nursery)
            host, port = url.removeprefix("http://").rsplit(":", 1)
            body = json.dumps(BODY | {"stream": True}).encode()
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            )
            received = b""
            async with await trio.open_tcp_stream(host, int(port)) as sock:
                await sock.send_all(head.encode() + body)
                while received.count(b"data: ") < 5:  # some chunks, then hang up
                    received += await sock.receive_some()
            await fake.ended.wait()
            nursery.cancel_scope.cancel()
    assert fake.outcome == "stopped: the client went away"
