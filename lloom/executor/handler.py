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
    BackendTimeout,
    FrameTooLarge,
    InternalError,
    LloomError,
    NetworkError,
    PeerInputError,
    PeerTimeout,
    ProtocolError,
    Refused,
    as_lloom_error,
)
from lloom.executor.error_frames import error_frame
from lloom.executor.metrics import ExecutorMetrics
from lloom.executor.receipts import ReceiptBook
from lloom.executor.shares import Channels, Counter
from lloom.executor.usage import UsageRecord
from lloom.node.streams import FramedStream
from lloom.protocol import billing, llm, openai_body
from lloom.protocol.llm import ErrorCode, RequestKind
from lloom.protocol.openai_body import Policy

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

    async def record(self, rec: UsageRecord, asked: llm.ReceiptRequest | None) -> None:
        """Store one record with the receipt asked for it; return once it is durable."""
        ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-executor limits."""

    max_concurrent_requests: int = 16
    #: Requests one peer may have running at once (the rest of the slots stay for others).
    max_requests_per_peer: int = 8
    #: Streams one peer may hold open at once (idle ones included).
    max_streams_per_peer: int = 32
    #: Most completion tokens one request may ask for; larger or missing is set to this.
    max_tokens: int = 4096
    request_timeout_secs: float = 300.0
    max_request_bytes: int = 1_048_576
    #: How long a client may take to send its request after opening the stream.
    first_frame_timeout_secs: float = 30.0
    #: How long a stream may stay idle between requests before the executor closes it.
    keepalive_secs: float = 60.0
    #: How long the executor waits for the client's receipt after a request.
    receipt_timeout_secs: float = 10.0


@dataclass
class _Outcome:
    """What a backend call produced, for usage accounting."""

    text: str
    usage: llm.Usage | None


class RequestHandler:
    """Serves ``/lloom/llm/1.0.0`` requests with a set of backends.

    Every request runs inside a boundary: whatever it raises becomes one ``error`` frame
    and one log line, and the stream (or, at worst, only the stream) ends; nothing a peer
    sends reaches the node's task group.
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        usage: UsageSink,
        limits: Limits,
        receipts: ReceiptBook | None = None,
        metrics: ExecutorMetrics | None = None,
        *,
        remote_media_models: frozenset[str] = frozenset(),
    ) -> None:
        self.metrics = metrics or ExecutorMetrics()
        self.backends = dict(backends)
        self.usage = usage
        self.limits = limits
        self.receipts = receipts
        self.remote_media_models = remote_media_models
        self._slots = trio.Semaphore(limits.max_concurrent_requests)
        self._requests = Counter[str](limits.max_requests_per_peer, "requests running here")
        self._streams = Counter[str](limits.max_streams_per_peer, "open streams")
        self._channels = Channels[tuple[str, str]]()
        self.active = 0
        self.served = 0

    @property
    def models(self) -> list[str]:
        """Network model ids served, sorted."""
        return sorted(self.backends)

    def policy(self, model: str) -> Policy:
        """What may reach the backend of ``model``."""
        return Policy(self.limits.max_tokens, model in self.remote_media_models)

    async def handle(self, framed: FramedStream, client_address: str) -> None:
        """Serve requests on ``framed`` for the client at ``client_address``; never raises
        (but for cancellation).

        A stream carries requests one after another: after a terminal message the client
        may send the next request, or close. The stream is closed when the client closes
        it, stays idle longer than ``keepalive_secs``, breaks the framing, or when the
        client already holds ``max_streams_per_peer`` streams.
        """
        try:
            with self._streams.hold(client_address):
                await self._serve_stream(framed, client_address)
        except Refused as refusal:  # this peer holds too many streams
            await self._send_error(framed, refusal, client_address)
            await framed.discard()
        except Exception as exc:  # the last boundary: log, drop this stream, carry on
            self._log_failure(as_lloom_error(exc), exc, client_address)
            await framed.reset()

    async def _serve_stream(self, framed: FramedStream, client_address: str) -> None:
        timeout = self.limits.first_frame_timeout_secs
        pending: bytes | None = None
        while True:
            try:
                frame = pending if pending is not None else await framed.read_frame(timeout=timeout)
                pending = None
            except (FrameTooLarge, ProtocolError) as exc:
                # The framing is lost after a refused frame: answer, then drop the rest.
                await self._send_error(framed, exc, client_address)
                return await framed.discard()
            except NetworkError:  # a timeout, or the client reset the stream
                return await framed.reset()
            if frame is None:
                return await framed.close()
            try:
                pending = await self._one(framed, frame, client_address)
            except NetworkError as exc:
                logger.info("client %s went away: %s", client_address, exc)
                return await framed.reset()
            except Exception as exc:  # a request's boundary: one error frame, one log line
                if not await self._send_error(framed, exc, client_address):
                    return await framed.reset()
            timeout = self.limits.keepalive_secs

    async def _one(self, framed: FramedStream, frame: bytes, client_address: str) -> bytes | None:
        """Serve one request; return a next request that arrived in place of a receipt."""
        request, client_limit = self._parse(frame)
        backend = self.backends.get(request.model)
        if backend is None:
            raise Refused(
                ErrorCode.UNKNOWN_MODEL,
                f"model {request.model!r} is not served here; served: " + ", ".join(self.models),
            )
        with self._requests.hold(client_address):
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                raise Refused(
                    ErrorCode.BUSY,
                    f"executor busy ({self.limits.max_concurrent_requests} requests running)",
                ) from None
            try:
                record, backend_usage = await self._run(
                    framed, request, backend, client_address, client_limit
                )
            finally:
                self._slots.release()
        return await self._finish(framed, record, backend_usage)

    async def _run(
        self,
        framed: FramedStream,
        request: llm.Request,
        backend: Backend,
        client_address: str,
        client_limit: int | None,
    ) -> tuple[UsageRecord, llm.Usage | None]:
        """Serve one admitted request (a slot held)."""
        if self.receipts is not None and await self.receipts.blocked(client_address):
            raise Refused(
                ErrorCode.RECEIPT_REQUIRED,
                "too many of your requests are unsigned; sign receipts to be served",
            )
        self.active += 1
        self.metrics.active.inc()
        try:
            return await self._serve(framed, request, backend, client_address, client_limit)
        finally:
            self.active -= 1
            self.metrics.active.dec()

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

    def _parse(self, frame: bytes) -> tuple[llm.Request, int | None]:
        """The request as it goes to the backend, and the completion limit the client
        itself asked for (the billing cap; the policy may clamp the backend's lower)."""
        msg = llm.decode(frame)
        if not isinstance(msg, llm.Request):
            raise ProtocolError(f"expected a request message, not {type(msg).__name__}")
        model = msg.body.get("model")
        policy = self.policy(model) if isinstance(model, str) else Policy(self.limits.max_tokens)
        body = openai_body.normalize(msg.kind, msg.body, policy)  # validates msg.body too
        client_limit = openai_body.completion_limit(msg.body)
        return llm.Request(msg.kind, body, msg.request_id), client_limit

    async def _serve(
        self,
        framed: FramedStream,
        request: llm.Request,
        backend: Backend,
        client: str,
        client_limit: int | None,
    ) -> tuple[UsageRecord, llm.Usage | None]:
        """Stream the answer; return the usage record (not yet stored) and the backend's
        own usage report."""
        started = time.time()
        try:
            with trio.fail_after(self.limits.request_timeout_secs):
                if request.stream:
                    outcome = await self._stream(framed, request, backend)
                else:
                    outcome = await self._complete(framed, request, backend)
        except trio.TooSlowError:
            raise BackendTimeout(
                f"request exceeded {self.limits.request_timeout_secs:g} s"
            ) from None
        record = UsageRecord(
            request_id=uuid.uuid4().hex,
            client_address=client,
            model=request.model,
            prompt_tokens=billing.prompt_tokens(request.kind, request.body),
            completion_tokens=billing.completion_tokens(outcome.text, client_limit),
            created_at=started,
            client_request_id=request.request_id,
        )
        self.served += 1
        self.metrics.requests.labels(request.model).inc()
        self.metrics.tokens.labels(request.model, "prompt").inc(record.prompt_tokens)
        self.metrics.tokens.labels(request.model, "completion").inc(record.completion_tokens)
        self.metrics.latency.labels(request.model).observe(time.time() - started)
        return record, outcome.usage

    async def _finish(
        self, framed: FramedStream, record: UsageRecord, backend_usage: llm.Usage | None
    ) -> bytes | None:
        """Store the usage, end the request and collect its receipt, one request of a
        channel (client, model) at a time: each receipt asked adds to the last one signed,
        so two requests whose ends crossed can never ask for overlapping totals. Returns a
        next request that arrived in place of a receipt."""
        async with self._channels.one_at_a_time((record.client_address, record.model)):
            asked = None
            if self.receipts is not None:
                asked = await self.receipts.request_for(record)
            await self.usage.record(record, asked)
            usage = llm.Usage(record.prompt_tokens, record.completion_tokens)
            end = llm.End(record.request_id, record.model, usage, backend_usage, asked)
            await framed.write_frame(llm.encode(end))
            if asked is None:
                return None
            return await self._collect_receipt(framed, record, asked)

    async def _complete(
        self, framed: FramedStream, request: llm.Request, backend: Backend
    ) -> _Outcome:
        if request.kind is RequestKind.CHAT:
            data = await backend.chat(request.body)
        else:
            data = await backend.completions(request.body)
        await framed.write_frame(llm.encode(llm.Response(data)))
        return _Outcome(billing.delivered_text(data), _maybe_usage(data.get("usage")))

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
                parts.append(billing.delivered_text(chunk))
                await framed.write_frame(llm.encode(llm.Chunk(chunk)))
        return _Outcome("".join(parts), usage)

    async def _send_error(
        self, framed: FramedStream, exc: BaseException, client_address: str
    ) -> bool:
        """Log ``exc`` once and send its error frame; False if the client is gone."""
        error = as_lloom_error(exc)
        self._log_failure(error, exc, client_address)
        frame = error_frame(error)
        self.metrics.errors.labels(frame.code.value).inc()
        try:
            await framed.write_frame(llm.encode(frame))
        except NetworkError:
            return False
        return True

    @staticmethod
    def _log_failure(error: LloomError, exc: BaseException, client_address: str) -> None:
        """One log line per failed request; a traceback only for lloom's own bugs."""
        if isinstance(error, InternalError):
            logger.error(
                "request from %s failed: unexpected %s: %s",
                client_address,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
        elif isinstance(error, PeerInputError | Refused):
            logger.info("request from %s refused: %s: %s", client_address, error.code, error)
        else:
            logger.warning("request from %s failed: %s: %s", client_address, error.code, error)


def _maybe_usage(obj: object) -> llm.Usage | None:
    """The backend's usage report, or None if missing or malformed."""
    if obj is None:
        return None
    try:
        return llm.Usage.from_json(obj)
    except ProtocolError:
        logger.warning("backend reported malformed usage; counting tokens instead")
        return None
