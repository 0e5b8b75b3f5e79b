"""The executor's request handler in memory: fake backends, a memory stream, a list sink."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.network.stream.exceptions import StreamReset

from lloom.errors import BackendHTTPError, BackendUnreachable
from lloom.executor.handler import Limits, RequestHandler
from lloom.executor.usage import UsageRecord
from lloom.node.streams import FramedStream
from lloom.protocol import billing, llm

CLIENT = "0x" + "12" * 20


class MemoryNetStream:
    """The INetStream calls FramedStream makes, over a trio memory stream."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self.stream.receive_some(n)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamReset() from exc

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StreamReset() from exc

    async def close(self) -> None:
        await self.stream.aclose()

    async def reset(self) -> None:
        await self.stream.aclose()


class FakeBackend:
    def __init__(
        self,
        words: list[str],
        usage: bool = True,
        fail: Exception | None = None,
        delay: float = 0.0,
    ) -> None:
        self.words, self.usage, self.fail, self.delay = words, usage, fail, delay

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        await trio.sleep(self.delay)
        if self.fail:
            raise self.fail
        out: dict[str, Any] = {"choices": [{"message": {"content": "".join(self.words)}}]}
        if self.usage:
            out["usage"] = {"prompt_tokens": 7, "completion_tokens": len(self.words)}
        return out

    async def chat_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        if self.fail:
            raise self.fail
        for word in self.words:
            await trio.sleep(self.delay)
            yield {"choices": [{"delta": {"content": word}}]}
        if self.usage:
            yield {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9}}

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.chat(body)

    def completions_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        return self.chat_stream(body)


class ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        #: Every progress call: (record, final).
        self.progress_calls: list[tuple[UsageRecord, bool]] = []

    async def record(self, rec: UsageRecord, asked: llm.ReceiptRequest | None) -> None:
        self.records.append(rec)

    async def progress(self, rec: UsageRecord, final: bool = False) -> None:
        self.progress_calls.append((rec, final))


def chat(stream: bool, model: str = "m", **extra: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return llm.encode(llm.Request(llm.RequestKind.CHAT, body | extra))


async def exchange(
    handler: RequestHandler, *frames: bytes, max_frame: int = 1 << 20
) -> list[llm.Message]:
    """Send ``frames`` to the handler; return every message it answered."""
    a, b = trio.testing.memory_stream_pair()
    server = FramedStream(MemoryNetStream(a), max_frame=max_frame, read_timeout=5)  # type: ignore[arg-type]
    client = FramedStream(MemoryNetStream(b), read_timeout=5)  # type: ignore[arg-type]
    out: list[llm.Message] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.handle, server, CLIENT)
        for frame in frames:
            await client.write_frame(frame)
        await b.send_eof()  # no more requests: the executor answers, then closes
        while (answer := await client.read_frame()) is not None:
            out.append(llm.decode(answer))
    return out


def handler(backend: FakeBackend, sink: ListSink | None = None, **limits: Any) -> RequestHandler:
    return RequestHandler({"m": backend}, sink or ListSink(), Limits(**limits))


HI = billing.chat_prompt_tokens({"messages": [{"role": "user", "content": "hi"}]})


async def test_stream_bills_the_canonical_count_and_reports_the_backends() -> None:
    sink = ListSink()
    msgs = await exchange(handler(FakeBackend(["a ", "b"]), sink), chat(True))
    assert [type(m).__name__ for m in msgs] == ["Chunk", "Chunk", "End"]
    end = msgs[-1]
    assert isinstance(end, llm.End) and end.usage == llm.Usage(HI, billing.count("a b"))
    assert end.backend_usage == llm.Usage(7, 9)
    assert sink.records[0].request_id == end.request_id
    assert sink.records[0].client_address == CLIENT
    assert (sink.records[0].prompt_tokens, sink.records[0].completion_tokens) == (HI, 2)


async def test_billed_without_backend_usage_and_capped_at_max_tokens() -> None:
    sink = ListSink()
    h = handler(FakeBackend(["hello ", "world ", "again"], usage=False), sink, max_tokens=1)
    msgs = await exchange(h, chat(False), chat(False, max_tokens=2))
    end, capped = msgs[1], msgs[3]
    assert isinstance(msgs[0], llm.Response)
    assert isinstance(end, llm.End) and end.backend_usage is None
    assert end.usage == llm.Usage(HI, billing.count("hello world again"))  # 3: no client cap
    assert isinstance(capped, llm.End) and capped.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("fail", "code", "status"),
    [
        (BackendUnreachable("down"), llm.ErrorCode.BACKEND_UNREACHABLE, 502),
        (BackendHTTPError(500, "boom"), llm.ErrorCode.BACKEND_ERROR, 502),
        (BackendHTTPError(400, "context too long"), llm.ErrorCode.BACKEND_ERROR, 400),
    ],
)
async def test_backend_failures_are_error_frames(
    fail: Exception, code: llm.ErrorCode, status: int
) -> None:
    sink = ListSink()
    for stream in (True, False):
        msgs = await exchange(handler(FakeBackend([], fail=fail), sink), chat(stream))
        assert len(msgs) == 1 and isinstance(msgs[0], llm.Error)
        assert msgs[0].code is code and msgs[0].status == status
    assert sink.records == []


async def test_request_timeout() -> None:
    slow = FakeBackend(["a", "b", "c"], delay=0.5)
    msgs = await exchange(handler(slow, request_timeout_secs=0.2), chat(True))
    assert isinstance(msgs[-1], llm.Error) and msgs[-1].code is llm.ErrorCode.BACKEND_TIMEOUT


async def test_busy_when_full() -> None:
    h = handler(FakeBackend(["x"], delay=1.0), max_concurrent_requests=1)
    results: list[list[llm.Message]] = []

    async def one() -> None:
        results.append(await exchange(h, chat(False)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        busy = await exchange(h, chat(False))
    assert isinstance(busy[0], llm.Error) and busy[0].code is llm.ErrorCode.BUSY
    assert isinstance(results[0][-1], llm.End)
    assert h.active == 0


async def test_oversized_request_and_wrong_first_message() -> None:
    h = handler(FakeBackend(["x"]))
    msgs = await exchange(h, chat(False, padding="x" * 5000), max_frame=1000)
    assert isinstance(msgs[0], llm.Error) and msgs[0].code is llm.ErrorCode.TOO_LARGE
    msgs = await exchange(h, llm.encode(llm.Chunk({})))
    assert isinstance(msgs[0], llm.Error) and msgs[0].code is llm.ErrorCode.BAD_REQUEST


async def test_client_gone_mid_stream_keeps_what_was_delivered() -> None:
    sink = ListSink()
    h = handler(FakeBackend(["a"] * 50, delay=0.01), sink)
    a, b = trio.testing.memory_stream_pair()
    server = FramedStream(MemoryNetStream(a), read_timeout=5)  # type: ignore[arg-type]
    client = FramedStream(MemoryNetStream(b), read_timeout=5)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.handle, server, CLIENT)
        await client.write_frame(chat(True))
        assert await client.read_frame() is not None
        await b.aclose()
    assert sink.records == []  # no complete row: the answer never ended
    partial, final = sink.progress_calls[-1]
    assert final and 1 <= partial.completion_tokens < 50
    assert h.active == 0


class BreakingBackend(FakeBackend):
    """Streams its words, then fails."""

    async def chat_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        for word in self.words:
            await trio.sleep(self.delay)
            yield {"choices": [{"delta": {"content": word}}]}
        raise BackendUnreachable("backend died")


async def test_backend_dying_mid_stream_keeps_a_partial_row_of_what_was_sent() -> None:
    sink = ListSink()
    msgs = await exchange(handler(BreakingBackend(["one ", "two "]), sink), chat(True))
    assert [type(m).__name__ for m in msgs] == ["Chunk", "Chunk", "Error"]
    [(partial, final)] = sink.progress_calls
    assert final and partial.completion_tokens == billing.count("one two ")
    assert partial.prompt_tokens == HI and sink.records == []


async def test_a_streaming_answer_is_checkpointed_then_completed() -> None:
    sink = ListSink()
    h = handler(FakeBackend(["w "] * 8, delay=0.05), sink, checkpoint_secs=0.08)
    msgs = await exchange(h, chat(True))
    assert isinstance(msgs[-1], llm.End)
    checkpoints = [rec.completion_tokens for rec, final in sink.progress_calls if not final]
    assert len(checkpoints) >= 2 and checkpoints == sorted(checkpoints) and checkpoints[0] > 0
    assert {rec.request_id for rec, _ in sink.progress_calls} == {sink.records[0].request_id}
    assert sink.records[0].completion_tokens >= checkpoints[-1]


async def test_several_requests_on_one_stream() -> None:
    sink = ListSink()
    msgs = await exchange(
        handler(FakeBackend(["x"]), sink),
        chat(False),
        chat(True),
        chat(False, model="nope"),
        chat(False),
    )
    kinds = [type(m).__name__ for m in msgs]
    assert kinds == ["Response", "End", "Chunk", "End", "Error", "Response", "End"]
    assert len(sink.records) == 3


async def test_idle_stream_is_closed_after_keepalive() -> None:
    h = handler(FakeBackend(["x"]), keepalive_secs=0.2)
    a, b = trio.testing.memory_stream_pair()
    server = FramedStream(MemoryNetStream(a), read_timeout=5)  # type: ignore[arg-type]
    client = FramedStream(MemoryNetStream(b), read_timeout=5)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.handle, server, CLIENT)
        await client.write_frame(chat(False))
        assert isinstance(llm.decode(await client.read_frame() or b""), llm.Response)
        assert isinstance(llm.decode(await client.read_frame() or b""), llm.End)
        with trio.fail_after(3):
            assert await client.read_frame() is None


async def test_receipts_are_checked_kept_and_required(tmp_path: Path) -> None:
    from lloom.chain.receipts import Domain, Receipt, sign
    from lloom.executor.receipts import ReceiptBook
    from lloom.executor.usage import AsyncUsageStore, UsageStore
    from lloom.identity import Identity

    client = Identity.generate()
    executor = Identity.generate()
    domain = Domain(31337, "0x" + "5f" * 20)
    store = UsageStore(tmp_path / "u.db")
    book = ReceiptBook(store, executor.address, domain, max_unsigned=1)
    h = RequestHandler({"m": FakeBackend(["x"])}, AsyncUsageStore(store), Limits(), book)

    async def one(answer: str) -> llm.Message:
        a, b = trio.testing.memory_stream_pair()
        server = FramedStream(MemoryNetStream(a), read_timeout=5)  # type: ignore[arg-type]
        peer = FramedStream(MemoryNetStream(b), read_timeout=5)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.handle, server, client.address)
            await peer.write_frame(chat(False))
            while True:
                msg = llm.decode(await peer.read_frame() or b"")
                if isinstance(msg, llm.End):
                    asked = msg.receipt
                    assert asked is not None and asked.executor == executor.address
                    if answer == "sign":
                        r = Receipt(
                            executor.address,
                            client.address,
                            "m",
                            asked.prompt_total,
                            asked.completion_total,
                            asked.deadline,
                        )
                        sig = sign(client, domain, r).signature
                        await peer.write_frame(llm.encode(llm.SignedReceipt(msg.request_id, sig)))
                    elif answer == "forge":
                        other = Identity.generate()
                        r = Receipt(executor.address, other.address, "m", 1, 1, asked.deadline)
                        sig = sign(other, domain, r).signature
                        await peer.write_frame(llm.encode(llm.SignedReceipt(msg.request_id, sig)))
                    else:
                        await peer.write_frame(llm.encode(llm.Refusal(msg.request_id, "no")))
                if isinstance(msg, llm.End | llm.Error):
                    await b.send_eof()
                    nursery.cancel_scope.deadline = trio.current_time() + 5
                    return msg

    assert isinstance(await one("sign"), llm.End)
    assert isinstance(await one("forge"), llm.End)  # served; its receipt is refused
    statuses = [r[0] for r in store.execute("SELECT receipt FROM usage ORDER BY created_at")]
    assert statuses == ["signed", "refused: bad signature"]
    one_request = (HI, 1)
    assert store.execute("SELECT prompt_total, completion_total FROM receipts") == [one_request]
    assert isinstance(await one("refuse"), llm.End)  # 2 unsigned now: over the limit of 1
    blocked = await one("sign")
    assert isinstance(blocked, llm.Error) and blocked.code is llm.ErrorCode.RECEIPT_REQUIRED
    assert blocked.status == 402
    # Unsigned usage never entered the totals: the next receipt adds to the signed one.
    asked = await h.receipts.request_for(  # type: ignore[union-attr]
        UsageRecord("next", client.address, "m", HI, 1, 0.0)
    )
    assert asked is not None and (asked.prompt_total, asked.completion_total) == (2 * HI, 2)
    assert asked.previous is not None and asked.previous.prompt_total == HI
    store.close()


async def test_a_whole_response_goes_out_with_its_end_in_one_write_after_it_is_stored() -> None:
    writes: list[bytes] = []
    stored_before_write: list[bool] = []
    sink = ListSink()

    class Recording(MemoryNetStream):
        async def write(self, data: bytes) -> None:
            writes.append(data)
            stored_before_write.append(bool(sink.records))
            await super().write(data)

    a, b = trio.testing.memory_stream_pair()
    server = FramedStream(Recording(a), read_timeout=5)  # type: ignore[arg-type]
    client = FramedStream(MemoryNetStream(b), read_timeout=5)  # type: ignore[arg-type]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler(FakeBackend(["a ", "b"]), sink).handle, server, CLIENT)
            await client.write_frame(chat(False))
            await b.send_eof()
            answers = []
            while (frame := await client.read_frame()) is not None:
                answers.append(llm.decode(frame))
    assert [type(m).__name__ for m in answers] == ["Response", "End"]
    assert len(writes) == 1 and stored_before_write == [True]  # durable before the answer
