"""Serving one request on one stream: validate, call the backend, stream back, store usage.

The handler talks to the world through three seams so tests can swap each:
a :class:`Backend` (an OpenAI-compatible server), a :class:`UsageSink` (the durable usage
store) and the framed stream itself. Every request ends with exactly one terminal frame,
``end`` or ``error``, and the usage row is stored *before* ``end`` is sent, so an answered
request is never lost, even if the executor is killed right after.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from lloom.errors import (
    BackendError,
    BackendHTTPError,
    BackendTimeout,
    BackendUnreachable,
    FrameTooLarge,
    NetworkError,
    PeerTimeout,
    ProtocolError,
    UsageError,
)
from lloom.executor.metrics import ExecutorMetrics
from lloom.executor.receipts import ReceiptBook
from lloom.executor.usage import UsageRecord
from lloom.node.streams import FramedStream
from lloom.protocol import llm, openai_body
from lloom.protocol.llm import ErrorCode, RequestKind
from lloom.tokens import count_chat_prompt, count_text

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """An OpenAI-compatible backend (see :mod:`lloom.executor.backend`)."""

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A complete chat completion."""
        ...

    def chat_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Chat completion chunks."""
        ...

    async def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """A complete legacy completion."""
        ...

    def completions_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Legacy completion chunks."""
        ...


class UsageSink(Protocol):
    """Where completed requests are recorded, durably, before the client is told."""

    async def record(self, rec: UsageRecord) -> tuple[int, int]:
        """Store one record; return only once it is durable, with the channel's running
        (prompt, completion) totals."""
        ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-executor limits."""

    max_concurrent_requests: int = 16
    request_timeout_secs: float = 300.0
    max_request_bytes: int = 1_048_576
    #: How long a client may take to send its request after opening the stream.
    first_frame_timeout_secs: float = 30.0
    #: How long a stream may stay idle between requests before the executor closes it.
    keepalive_secs: float = 60.0
    #: How long the executor waits for the client's receipt after a request.
    receipt_timeout_secs: float = 10.0


class RequestFailed(Exception):
    """Internal: carries the error frame to send."""

    def __init__(self, error: llm.Error) -> None:
        super().__init__(error.message)
        self.error = error


def _fail(code: ErrorCode, message: str, status: int = 0) -> RequestFailed:
    return RequestFailed(llm.Error(code, message, status))


@dataclass
class _Outcome:
    """What a backend call produced, for usage accounting."""

    text: str
    usage: llm.Usage | None


class RequestHandler:
    """Serves ``/lloom/llm/1.0.0`` requests with a set of backends."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        usage: UsageSink,
        limits: Limits,
        receipts: ReceiptBook | None = None,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self.metrics = metrics or ExecutorMetrics()
        self.backends = dict(backends)
        self.usage = usage
        self.limits = limits
        self.receipts = receipts
        self._slots = trio.Semaphore(limits.max_concurrent_requests)
        self.active = 0
        self.served = 0

    @property
    def models(self) -> list[str]:
        """Network model ids served, sorted."""
        return sorted(self.backends)

    async def handle(self, framed: FramedStream, client_address: str) -> None:
        """Serve requests on ``framed`` for the client at ``client_address``.

        A stream carries requests one after another: after a terminal message the client
        may send the next request, or close. The stream is closed when the client closes
        it, stays idle longer than ``keepalive_secs``, or breaks the framing.
        """
        timeout = self.limits.first_frame_timeout_secs
        pending: bytes | None = None
        while True:
            try:
                frame = pending if pending is not None else await framed.read_frame(timeout=timeout)
                pending = None
            except FrameTooLarge as exc:
                # The framing is lost after a refused frame: answer, then close.
                await self._send_error(framed, llm.Error(ErrorCode.TOO_LARGE, str(exc)))
                return await framed.close()
            except ProtocolError as exc:
                error = llm.Error(ErrorCode.BAD_REQUEST, f"malformed frame: {exc}")
                await self._send_error(framed, error)
                return await framed.close()
            except (PeerTimeout, NetworkError):
                return await framed.reset()
            if frame is None:
                return await framed.close()
            try:
                pending = await self._one(framed, frame, client_address)
            except RequestFailed as failed:
                if not await self._send_error(framed, failed.error):
                    return await framed.reset()
            except NetworkError as exc:
                logger.info("client %s went away: %s", client_address, exc)
                return await framed.reset()
            timeout = self.limits.keepalive_secs

    async def _one(self, framed: FramedStream, frame: bytes, client_address: str) -> bytes | None:
        """Serve one request; return a next request that arrived in place of a receipt."""
        request = self._parse(frame)
        backend = self.backends.get(request.model)
        if backend is None:
            raise _fail(
                ErrorCode.UNKNOWN_MODEL,
                f"model {request.model!r} is not served here; served: " + ", ".join(self.models),
            )
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            raise _fail(
                ErrorCode.BUSY,
                f"executor busy ({self.limits.max_concurrent_requests} requests running)",
            ) from None
        if self.receipts is not None and await self.receipts.blocked(client_address):
            self._slots.release()
            raise _fail(
                ErrorCode.RECEIPT_REQUIRED,
                "too many of your requests are unsigned; sign receipts to be served",
            )
        self.active += 1
        self.metrics.active.inc()
        try:
            record, asked = await self._serve(framed, request, backend, client_address)
        finally:
            self.active -= 1
            self.metrics.active.dec()
            self._slots.release()
        if asked is None or self.receipts is None:
            return None
        return await self._collect_receipt(framed, record, asked)

    async def _collect_receipt(
        self, framed: FramedStream, record: UsageRecord, asked: llm.ReceiptRequest
    ) -> bytes | None:
        assert self.receipts is not None
        answer: llm.Message | None = None
        leftover: bytes | None = None
        try:
            frame = await framed.read_frame(timeout=self.limits.receipt_timeout_secs)
            if frame is not None:
                answer = llm.decode(frame)
                if isinstance(answer, llm.Request):
                    leftover, answer = frame, None  # a client that does not sign receipts
        except (PeerTimeout, ProtocolError):
            answer = None
        await self.receipts.settle_answer(record, asked, answer)
        return leftover

    @staticmethod
    def _parse(frame: bytes) -> llm.Request:
        try:
            msg = llm.decode(frame)
        except ProtocolError as exc:
            raise _fail(ErrorCode.BAD_REQUEST, str(exc)) from None
        if not isinstance(msg, llm.Request):
            raise _fail(ErrorCode.BAD_REQUEST, "expected a request message")
        try:
            body = openai_body.normalize(msg.kind, msg.body)
        except UsageError as exc:
            raise _fail(ErrorCode.BAD_REQUEST, str(exc)) from None
        return llm.Request(msg.kind, body)

    async def _serve(
        self, framed: FramedStream, request: llm.Request, backend: Backend, client: str
    ) -> tuple[UsageRecord, llm.ReceiptRequest | None]:
        started = time.time()
        try:
            with trio.fail_after(self.limits.request_timeout_secs):
                if request.stream:
                    outcome = await self._stream(framed, request, backend)
                else:
                    outcome = await self._complete(framed, request, backend)
        except trio.TooSlowError:
            raise _fail(
                ErrorCode.BACKEND_TIMEOUT,
                f"request exceeded {self.limits.request_timeout_secs:g} s",
            ) from None
        except BackendHTTPError as exc:
            status = exc.status if 400 <= exc.status < 500 else 0
            raise _fail(ErrorCode.BACKEND_ERROR, str(exc), status) from None
        except BackendUnreachable as exc:
            raise _fail(ErrorCode.BACKEND_UNREACHABLE, str(exc)) from None
        except BackendTimeout as exc:
            raise _fail(ErrorCode.BACKEND_TIMEOUT, str(exc)) from None
        except BackendError as exc:
            raise _fail(ErrorCode.BACKEND_ERROR, str(exc)) from None
        usage, source = outcome.usage, "backend"
        if usage is None:
            usage, source = self._count(request, outcome.text), "counted"
        record = UsageRecord(
            request_id=uuid.uuid4().hex,
            client_address=client,
            model=request.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            created_at=started,
        )
        totals = await self.usage.record(record)
        self.served += 1
        self.metrics.requests.labels(request.model).inc()
        self.metrics.tokens.labels(request.model, "prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels(request.model, "completion").inc(usage.completion_tokens)
        self.metrics.latency.labels(request.model).observe(time.time() - started)
        asked = self.receipts.request_for(totals) if self.receipts is not None else None
        await framed.write_frame(
            llm.encode(llm.End(record.request_id, request.model, usage, source, asked))
        )
        return record, asked

    async def _complete(
        self, framed: FramedStream, request: llm.Request, backend: Backend
    ) -> _Outcome:
        if request.kind is RequestKind.CHAT:
            data = await backend.chat(request.body)
        else:
            data = await backend.completions(request.body)
        await framed.write_frame(llm.encode(llm.Response(data)))
        return _Outcome(_response_text(data), _maybe_usage(data.get("usage")))

    async def _stream(
        self, framed: FramedStream, request: llm.Request, backend: Backend
    ) -> _Outcome:
        chunks = (
            backend.chat_stream(request.body)
            if request.kind is RequestKind.CHAT
            else backend.completions_stream(request.body)
        )
        parts: list[str] = []
        usage: llm.Usage | None = None
        async with aclosing(chunks):
            async for chunk in chunks:
                if chunk.get("usage"):
                    usage = _maybe_usage(chunk["usage"]) or usage
                if not chunk.get("choices"):
                    continue  # the usage-only chunk; usage travels in the end frame
                parts.append(_chunk_text(chunk))
                await framed.write_frame(llm.encode(llm.Chunk(chunk)))
        return _Outcome("".join(parts), usage)

    def _count(self, request: llm.Request, completion: str) -> llm.Usage:
        body = request.body
        if request.kind is RequestKind.CHAT:
            prompt = count_chat_prompt(body["messages"])
        else:
            p = body["prompt"]
            prompt = sum(count_text(x) for x in p) if isinstance(p, list) else count_text(p)
        return llm.Usage(prompt, count_text(completion))

    async def _send_error(self, framed: FramedStream, error: llm.Error) -> bool:
        """Send an error frame; False if the client is gone."""
        logger.info("request failed: %s: %s", error.code.value, error.message)
        self.metrics.errors.labels(error.code.value).inc()
        try:
            await framed.write_frame(llm.encode(error))
        except NetworkError:
            return False
        return True


def _maybe_usage(obj: object) -> llm.Usage | None:
    """The backend's usage report, or None if missing or malformed."""
    if obj is None:
        return None
    try:
        return llm.Usage.from_json(obj)
    except ProtocolError:
        logger.warning("backend reported malformed usage; counting tokens instead")
        return None


def _response_text(data: Mapping[str, Any]) -> str:
    """The generated text of a complete chat or legacy completion object."""
    parts: list[str] = []
    for choice in data.get("choices") or []:
        message = choice.get("message") or {}
        parts.append(str(message.get("content") or choice.get("text") or ""))
    return "".join(parts)


def _chunk_text(chunk: Mapping[str, Any]) -> str:
    """The text a stream chunk adds."""
    parts: list[str] = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        parts.append(str(delta.get("content") or choice.get("text") or ""))
    return "".join(parts)
