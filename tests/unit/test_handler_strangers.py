"""The executor's request handler against hostile input, in memory (issue "Among strangers").

Each test here failed before the change it guards: a frame that stopped the executor, a
backend's text reaching a peer, one peer taking every slot, fields passed to the backend.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
import trio.testing

from lloom.errors import BackendHTTPError
from lloom.node.streams import FramedStream
from lloom.protocol import llm
from tests.unit.test_handler import (
    CLIENT,
    FakeBackend,
    ListSink,
    MemoryNetStream,
    chat,
    exchange,
    handler,
)


class RecordingBackend(FakeBackend):
    """Keeps the bodies that reached it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        body["content_utf8"] = json.dumps(body, ensure_ascii=False).encode()  # as httpx does
        self.bodies.append(body)
        return await super().chat(body)


def raw_request(body_json: str) -> bytes:
    return ('{"t":"request","kind":"chat","body":' + body_json + "}").encode()


@pytest.mark.parametrize(
    "body",
    [
        '{"model":"m","messages":[{"role":"user","content":"\\ud800x"}]}',
        '{"model":"m","messages":[{"role":"user","content":"hi"}],"seed":' + "9" * 5000 + "}",
        '{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
        '{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1e999}',
        '{"model":"m","messages":[{"\\udc00":"user","content":"hi"}]}',
    ],
    ids=["lone-surrogate", "5000-digit-int", "nan", "overflow", "surrogate-key"],
)
async def test_crashing_frames_are_bad_requests_and_the_stream_serves_on(body: str) -> None:
    backend = RecordingBackend(["ok"])
    msgs = await exchange(handler(backend), raw_request(body), chat(False))
    assert isinstance(msgs[0], llm.Error) and msgs[0].code is llm.ErrorCode.BAD_REQUEST
    assert isinstance(msgs[1], llm.Response) and isinstance(msgs[2], llm.End)
    assert len(backend.bodies) == 1  # only the good request reached the backend


class ExplodingBackend(FakeBackend):
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")


async def test_an_unexpected_exception_is_an_internal_error_frame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = handler(ExplodingBackend(["x"]))
    with caplog.at_level(logging.INFO, logger="lloom.executor.handler"):
        msgs = await exchange(h, chat(False), chat(False))
    assert [type(m) for m in msgs] == [llm.Error, llm.Error]
    first = msgs[0]
    assert isinstance(first, llm.Error)
    assert first.code is llm.ErrorCode.INTERNAL and first.message == "internal error"
    assert "surrogates" not in first.message
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 2 and "UnicodeEncodeError" in failures[0].getMessage()


async def test_backend_text_never_reaches_the_peer(caplog: pytest.LogCaptureFixture) -> None:
    secret = "backend at http://10.1.2.3:8000 rejected key sk-live-abcdefgh"
    h = handler(FakeBackend([], fail=BackendHTTPError(401, secret)))
    with caplog.at_level(logging.INFO, logger="lloom.executor.handler"):
        msgs = await exchange(h, chat(False))
    assert isinstance(msgs[0], llm.Error)
    assert msgs[0].code is llm.ErrorCode.BACKEND_ERROR and msgs[0].status == 401
    assert "10.1.2.3" not in msgs[0].message and "sk-" not in msgs[0].message
    assert any("10.1.2.3" in r.getMessage() for r in caplog.records)  # kept locally


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"best_of": 4}, "best_of"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"min_tokens": 500}, "min_tokens"),
        ({"id_slot": 0}, "id_slot"),
        ({"store": True}, "store"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"grammar": "root ::= x"}, "grammar"),
        ({"n": True}, "'n'"),
        ({"n": 1.0}, "'n'"),
    ],
)
async def test_fields_outside_the_allow_list_are_refused(extra: dict[str, Any], field: str) -> None:
    backend = RecordingBackend(["ok"])
    msgs = await exchange(handler(backend), chat(False, **extra))
    assert isinstance(msgs[0], llm.Error) and msgs[0].code is llm.ErrorCode.BAD_REQUEST
    assert field in msgs[0].message
    assert backend.bodies == []


async def test_max_tokens_is_clamped_and_set() -> None:
    backend = RecordingBackend(["ok"])
    await exchange(
        handler(backend, max_tokens=64), chat(False, max_tokens=10**9), chat(False, max_tokens=5)
    )
    await exchange(handler(backend, max_tokens=64), chat(False))
    assert [b["max_tokens"] for b in backend.bodies] == [64, 5, 64]


def image_request(url: str) -> bytes:
    content = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return llm.encode(llm.Request(llm.RequestKind.CHAT, body))


async def test_remote_media_only_where_the_backend_opts_in() -> None:
    backend = RecordingBackend(["ok"])
    internal = image_request("http://169.254.169.254/latest/meta-data")
    msgs = await exchange(handler(backend), internal, image_request("data:image/png;base64,AAAA"))
    assert isinstance(msgs[0], llm.Error) and "data: URL" in msgs[0].message
    assert isinstance(msgs[1], llm.Response)
    assert len(backend.bodies) == 1
    opted = handler(backend)
    opted.remote_media_models = frozenset({"m"})
    msgs = await exchange(opted, internal)
    assert isinstance(msgs[0], llm.Response)


async def test_one_peer_cannot_take_every_slot() -> None:
    h = handler(FakeBackend(["a"], delay=0.2), max_concurrent_requests=4, max_requests_per_peer=2)
    answers: list[llm.Message] = []

    async def one(address: str) -> None:
        a, b = trio.testing.memory_stream_pair()
        server = FramedStream(MemoryNetStream(a), read_timeout=5)  # type: ignore[arg-type]
        client = FramedStream(MemoryNetStream(b), read_timeout=5)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.handle, server, address)
            await client.write_frame(chat(False))
            await b.send_eof()
            answers.append(llm.decode(await client.read_frame() or b""))

    other = "0x" + "34" * 20
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one, CLIENT)
        await trio.testing.wait_all_tasks_blocked()  # the greedy peer has its four in
        nursery.start_soon(one, other)
    busy = [m for m in answers if isinstance(m, llm.Error)]
    assert len(busy) == 2 and all(m.code is llm.ErrorCode.BUSY for m in busy)
    assert "requests running here" in busy[0].message
    assert sum(isinstance(m, llm.Response) for m in answers) == 3  # the other peer was served


async def test_streams_per_peer_are_bounded() -> None:
    h = handler(FakeBackend(["a"]), max_streams_per_peer=2)
    held: list[tuple[FramedStream, FramedStream]] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            a, b = trio.testing.memory_stream_pair()
            server = FramedStream(MemoryNetStream(a), read_timeout=5)  # type: ignore[arg-type]
            client = FramedStream(MemoryNetStream(b), read_timeout=5)  # type: ignore[arg-type]
            held.append((server, client))
            nursery.start_soon(h.handle, server, CLIENT)
            await trio.testing.wait_all_tasks_blocked()
        third = llm.decode(await held[2][1].read_frame() or b"")
        assert isinstance(third, llm.Error) and third.code is llm.ErrorCode.BUSY
        assert "open streams" in third.message
        # the first two are still served
        await held[0][1].write_frame(chat(False))
        assert isinstance(llm.decode(await held[0][1].read_frame() or b""), llm.Response)
        nursery.cancel_scope.cancel()
    assert len(h._streams) == 0


async def test_every_stored_record_is_for_a_served_request() -> None:
    sink = ListSink()
    h = handler(FakeBackend(["a", "b"]), sink)
    await exchange(h, raw_request('{"model":"m","messages":"\\ud800"}'), chat(True))
    assert len(sink.records) == 1
