"""The OpenAI-compatible gateway, driven by the official ``openai`` SDK, in front of real
executor processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from lloom.protocol import billing
from tests.e2e.test_accounting import billed
from tests.support.network import start_executor, start_gateway, start_mock, start_validator
from tests.support.procs import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def gateway(procs: Processes) -> Iterator[str]:
    """A network (slow-streaming mock, validator, executor) and a gateway; its base URL."""
    _, url = start_mock(procs, "mock", "--chunk-delay-ms", "250")
    _, v = start_validator(procs)
    start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    _, base = start_gateway(procs, v.listen[0])
    yield base


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="not-needed", max_retries=0, timeout=60)


def test_chat_completion_and_usage(gateway: str) -> None:
    reply = sdk(gateway).chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": "hello gateway"}]
    )
    assert reply.choices[0].message.content == "Echo: hello gateway"
    assert reply.usage is not None
    assert reply.usage.total_tokens == sum(billed("hello gateway"))


def test_streaming_is_incremental(gateway: str) -> None:
    stream = sdk(gateway).chat.completions.create(
        model="mock-a",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[tuple[float, str]] = []
    usage: Any = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert "".join(t for _, t in arrivals) == "Echo: one two three four"
    # The mock sends a word every 250 ms: chunks must arrive spread out, not all at the end.
    assert arrivals[-1][0] - arrivals[0][0] > 0.5
    assert usage is not None
    assert usage.completion_tokens == billing.count("Echo: one two three four")


def test_models_lists_what_executors_announce(gateway: str) -> None:
    client = sdk(gateway)
    deadline = time.monotonic() + 30
    while not (ids := {m.id for m in client.models.list()}):  # announcements take a moment
        assert time.monotonic() < deadline, "no model announced"
        time.sleep(0.2)
    assert ids == {"mock-a"}


def test_errors_are_openai_errors(gateway: str) -> None:
    client = sdk(gateway)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such", messages=[{"role": "user", "content": "x"}])
    assert "no-such" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="mock-a", messages=[{"role": "user", "content": "x"}], temperature=9
        )
    assert "temperature" in str(bad.value)
    as_json = {"content-type": "application/json"}
    raw = httpx.post(f"{gateway}/chat/completions", content=b"{not json", headers=as_json)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    deep = httpx.post(f"{gateway}/chat/completions", content=b"[" * 100_000, headers=as_json)
    assert deep.status_code == 400
    huge = httpx.post(f"{gateway}/chat/completions", content=b"x" * 2_000_000, headers=as_json)
    assert huge.status_code == 413
    plain = httpx.post(f"{gateway}/chat/completions", content=b"{}")  # no Content-Type
    assert plain.status_code == 415


def test_health_metrics_openapi(gateway: str) -> None:
    root = gateway.removesuffix("/v1")
    sdk(gateway).chat.completions.create(
        model="mock-a", messages=[{"role": "user", "content": "m"}]
    )
    assert httpx.get(f"{root}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{root}/metrics").text
    assert 'lloom_gateway_requests_total{endpoint="chat"} 1.0' in metrics
    assert "lloom_gateway_request_seconds_bucket" in metrics
    schema = httpx.get(f"{root}/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


def test_completions_endpoint(gateway: str) -> None:
    reply = sdk(gateway).completions.create(model="mock-a", prompt="legacy")
    assert reply.choices[0].text == "Echo: legacy"


def test_timeout_is_504_and_no_reachable_executor_is_503(procs: Processes) -> None:
    _, url = start_mock(procs, "mock", "--delay-ms", "5000")  # slower than the gateway allows
    _, v = start_validator(procs)
    executor, _, _ = start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    _, base = start_gateway(procs, v.listen[0], "--timeout", "1")
    client = sdk(base)
    ask = {"model": "mock-a", "messages": [{"role": "user", "content": "x"}]}

    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as slow:
        client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert slow.value.status_code == 504, slow.value
    assert time.monotonic() - started < 10  # never a hang

    executor.kill()  # its provider record stays in the DHT: dialing it now fails
    with pytest.raises(openai.APIStatusError) as gone:
        client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert gone.value.status_code == 503, gone.value
    assert isinstance(gone.value.body, dict) and gone.value.body.get("code") == (
        "no_executor_reachable"
    )
