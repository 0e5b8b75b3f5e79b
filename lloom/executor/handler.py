"""Serving one request on one stream: validate, call the backend, stream back, store usage.

The handler talks to the world through three seams so tests can swap each:
a :class:`Backend` (an OpenAI-compatible server), a :class:`UsageSink` (the durable usage
store) and the framed stream itself; the exchange's rules (what may follow what, what is
billed) are the pure state machine :class:`~lloom.protocol.executor_exchange.ExecutorExchange`.
Every request ends with exactly one terminal frame, ``end`` or ``error``, and the usage row
is stored *before* ``end`` is sent, so an answered request is never lost, even if the
executor is killed right after; a streaming answer is checkpointed while it runs, and one
that breaks off keeps what it delivered.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
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
from lloom.executor.metrics import ExecutorMetrics
from lloom.executor.receipts import ReceiptBook
from lloom.executor.shares import Channels, Counter
from lloom.executor.usage import UsageRecord
from lloom.node.streams import FramedStream
from lloom.protocol import llm
from lloom.protocol.error_frames import error_frame
from lloom.protocol.executor_exchange import (
    Event,
    ExecutorExchange,
    ReceiptArrived,
    RequestArrived,
)
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
    """Where requests are recorded, durably, before the client is told."""

    async def record(self, rec: UsageRecord, asked: llm.ReceiptRequest | None) -> None:
        """Store one completed request with the receipt asked for it; return once durable."""
        ...

    async def progress(self, rec: UsageRecord, final: bool = False) -> None:
        """Store what an answer still streaming delivered so far, or (``final``) what a
        broken-off answer delivered."""
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
    #: How often a streaming answer's delivered usage is checkpointed to the store.
    checkpoint_secs: float = 1.0


@dataclass(frozen=True, slots=True)
class Served:
    """A request served but not yet ended: its usage record (not yet stored), the
    backend's own usage report, and a whole response's frame still to send."""

    record: UsageRecord
    backend_usage: llm.Usage | None
    response: bytes | None = None


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
            await self._send_error(framed, None, refusal, client_address)
            await framed.discard()
        except Exception as exc:  # the last boundary: log, drop this stream, carry on
            self._log_failure(as_lloom_error(exc), exc, client_address)
            await framed.reset()

    async def _serve_stream(self, framed: FramedStream, client_address: str) -> None:
        exchange = ExecutorExchange(self.policy_for)
        timeout = self.limits.first_frame_timeout_secs
        pending: list[Event] = []
        while True:
            frame = b""
            if not pending:
                try:
                    read = await framed.read_frame(timeout=timeout)
                except (FrameTooLarge, ProtocolError) as exc:
                    # The framing is lost after a refused frame: answer, then drop the rest.
                    await self._send_error(framed, exchange, exc, client_address)
                    return await framed.discard()
                except NetworkError:  # a timeout, or the client reset the stream
                    return await framed.reset()
                if read is None:
                    return await framed.close()
                frame = read
            try:
                if not pending:
                    pending = exchange.receive(frame)
                event = pending.pop(0)
                if isinstance(event, RequestArrived):
                    pending = await self._one(framed, exchange, event, client_address)
            except NetworkError as exc:
                logger.info("client %s went away: %s", client_address, exc)
                return await framed.reset()
            except Exception as exc:  # a request's boundary: one error frame, one log line
                pending = []
                if not await self._send_error(framed, exchange, exc, client_address):
                    return await framed.reset()
            timeout = self.limits.keepalive_secs

    def policy_for(self, model: str | None) -> Policy:
        """What may reach the backend of ``model`` (the strictest policy for no model)."""
        return self.policy(model) if model is not None else Policy(self.limits.max_tokens)

    async def _one(
        self,
        framed: FramedStream,
        exchange: ExecutorExchange,
        arrived: RequestArrived,
        client_address: str,
    ) -> list[Event]:
        """Serve one request; return the events of a next request that arrived in place of
        a receipt."""
        request = arrived.request
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
                served = await self._run(framed, exchange, backend, client_address)
            finally:
                self._slots.release()
        return await self._finish(framed, exchange, served)

    async def _run(
        self,
        framed: FramedStream,
        exchange: ExecutorExchange,
        backend: Backend,
        client_address: str,
    ) -> Served:
        """Serve one admitted request (a slot held)."""
        if self.receipts is not None and await self.receipts.blocked(client_address):
            raise Refused(
                ErrorCode.RECEIPT_REQUIRED,
                "too many of your requests are unsigned; sign receipts to be served",
            )
        self.active += 1
        self.metrics.active.inc()
        try:
            return await self._serve(framed, exchange, backend, client_address)
        finally:
            self.active -= 1
            self.metrics.active.dec()

    async def _collect_receipt(
        self,
        framed: FramedStream,
        exchange: ExecutorExchange,
        record: UsageRecord,
        asked: llm.ReceiptRequest,
    ) -> list[Event]:
        assert self.receipts is not None
        events: list[Event] = []
        try:
            frame = await framed.read_frame(timeout=self.limits.receipt_timeout_secs)
            if frame is not None:
                events = exchange.receive(frame)
        except (PeerTimeout, ProtocolError):
            pass
        if not events:
            events = [exchange.receipt_timed_out()]
        answer = events.pop(0)
        assert isinstance(answer, ReceiptArrived)
        await self.receipts.settle_answer(record, asked, answer.answer)
        return events

    async def _serve(
        self,
        framed: FramedStream,
        exchange: ExecutorExchange,
        backend: Backend,
        client: str,
    ) -> Served:
        """Stream the answer, or make the whole response's frame; return them with the
        usage record (not yet stored) and the backend's own usage report. What a broken-off
        stream delivered is stored as partial usage."""
        assert exchange.current is not None
        request = exchange.current.request
        started = time.time()
        request_id = uuid.uuid4().hex

        def record() -> UsageRecord:
            usage = exchange.usage()
            return UsageRecord(
                request_id=request_id,
                client_address=client,
                model=request.model,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                created_at=started,
                client_request_id=request.request_id,
            )

        try:
            with trio.fail_after(self.limits.request_timeout_secs):
                response: bytes | None = None
                if request.stream:
                    backend_usage = await self._stream(framed, exchange, backend, record)
                else:
                    backend_usage, response = await self._complete(exchange, backend)
        except trio.TooSlowError:
            await self._keep_partial(exchange, record)
            raise BackendTimeout(
                f"request exceeded {self.limits.request_timeout_secs:g} s"
            ) from None
        except Exception:
            await self._keep_partial(exchange, record)
            raise
        rec = record()
        self.served += 1
        self.metrics.requests.labels(request.model).inc()
        self.metrics.tokens.labels(request.model, "prompt").inc(rec.prompt_tokens)
        self.metrics.tokens.labels(request.model, "completion").inc(rec.completion_tokens)
        self.metrics.latency.labels(request.model).observe(time.time() - started)
        return Served(rec, backend_usage, response)

    async def _keep_partial(
        self, exchange: ExecutorExchange, record: Callable[[], UsageRecord]
    ) -> None:
        """Store what a stream delivered before it broke off (nothing if it sent nothing)."""
        if not exchange.chunks:
            return
        with trio.move_on_after(10) as scope:
            scope.shield = True
            rec = record()
            await self.usage.progress(rec, final=True)
            logger.info(
                "request %s of %s broke off after %d chunk(s); kept %d completion tokens",
                rec.request_id,
                rec.client_address,
                exchange.chunks,
                rec.completion_tokens,
            )

    async def _finish(
        self, framed: FramedStream, exchange: ExecutorExchange, served: Served
    ) -> list[Event]:
        """Store the usage, end the request and collect its receipt, one request of a
        channel (client, model) at a time: each receipt asked adds to the last one signed,
        so two requests whose ends crossed can never ask for overlapping totals. A whole
        response goes out with the ``end`` frame, in one write (the client needs both
        before it is done). Returns the events of a next request that arrived in place of a
        receipt."""
        record = served.record
        async with self._channels.one_at_a_time((record.client_address, record.model)):
            asked = None
            if self.receipts is not None:
                asked = await self.receipts.request_for(record)
            await self.usage.record(record, asked)
            usage = llm.Usage(record.prompt_tokens, record.completion_tokens)
            end = llm.End(record.request_id, record.model, usage, served.backend_usage, asked)
            frames = [] if served.response is None else [served.response]
            await framed.write_frames([*frames, exchange.send_end(end)])
            if asked is None:
                return []
            return await self._collect_receipt(framed, exchange, record, asked)

    async def _complete(
        self, exchange: ExecutorExchange, backend: Backend
    ) -> tuple[llm.Usage | None, bytes]:
        """The backend's whole answer: its usage report and the response frame (sent
        with ``end``)."""
        assert exchange.current is not None
        request = exchange.current.request
        if request.kind is RequestKind.CHAT:
            data = await backend.chat(request.body)
        else:
            data = await backend.completions(request.body)
        return _maybe_usage(data.get("usage")), exchange.send_response(data)

    async def _stream(
        self,
        framed: FramedStream,
        exchange: ExecutorExchange,
        backend: Backend,
        record: Callable[[], UsageRecord],
    ) -> llm.Usage | None:
        """Relay the backend's chunks; checkpoint the delivered usage while they flow."""
        assert exchange.current is not None
        request = exchange.current.request
        chunks = (
            backend.chat_stream(request.body)
            if request.kind is RequestKind.CHAT
            else backend.completions_stream(request.body)
        )
        usage: llm.Usage | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._checkpoints, exchange, record)
            try:
                async with aclosing(chunks):
                    async for chunk in chunks:
                        if chunk.get("usage"):
                            usage = _maybe_usage(chunk["usage"]) or usage
                        if not chunk.get("choices"):
                            continue  # the usage-only chunk; usage travels in the end frame
                        await framed.write_frame(exchange.send_chunk(chunk))
            except Exception as exc:  # raised below, outside the nursery (no exception group)
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return usage

    async def _checkpoints(
        self, exchange: ExecutorExchange, record: Callable[[], UsageRecord]
    ) -> None:
        """Store the delivered usage of a streaming answer every ``checkpoint_secs`` (when
        it grew), so that even a killed executor keeps what it delivered."""
        stored = 0
        while True:
            await trio.sleep(self.limits.checkpoint_secs)
            if exchange.chunks > stored:
                stored = exchange.chunks
                await self.usage.progress(record())

    async def _send_error(
        self,
        framed: FramedStream,
        exchange: ExecutorExchange | None,
        exc: BaseException,
        client_address: str,
    ) -> bool:
        """Log ``exc`` once and send its error frame; False if the client is gone."""
        error = as_lloom_error(exc)
        self._log_failure(error, exc, client_address)
        frame = error_frame(error)
        self.metrics.errors.labels(frame.code.value).inc()
        data = exchange.send_error(frame) if exchange is not None else llm.encode(frame)
        try:
            await framed.write_frame(data)
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
