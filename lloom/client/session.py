"""Sending requests to executors, and failing over between them.

:func:`send_request` runs one request on one executor. :func:`request_with_failover`
tries executors in order: an executor that fails before delivering its first chunk (dial
error, error frame, busy, timeout, broken stream) is skipped for the next. When one fails
after chunks were delivered, the answer is continued on the next executor if it can be
reproduced (:mod:`lloom.protocol.resume`: deterministic sampling, plain text), the re-run
checked against what was delivered; otherwise, or when no executor can continue it,
:class:`PartialResponseError` says why, since the caller already has part of an answer.
The exchange's rules live in :class:`~lloom.protocol.client_exchange.ClientExchange`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from lloom.client.observed import ExecutorBook
from lloom.client.receipts import ReceiptSigner
from lloom.errors import (
    AllExecutorsFailed,
    DialError,
    LloomError,
    NetworkError,
    PartialResponseError,
    PeerTimeout,
    ProtocolError,
    RemoteError,
    RequestTimeout,
)
from lloom.framing import DEFAULT_MAX_FRAME
from lloom.identity import address_from_peer_id
from lloom.node.node import Node
from lloom.node.relay import is_circuit
from lloom.node.streams import FramedStream
from lloom.protocol import billing, llm
from lloom.protocol.client_exchange import (
    ChunkArrived,
    ClientExchange,
    Ended,
    Failed,
    ResponseArrived,
    UnansweredClose,
)
from lloom.protocol.resume import Delivered, Replay, ResumeMismatch

logger = logging.getLogger(__name__)

#: Seconds without a frame after which a client pings the executor it waits for.
PROBE_SECS = 5.0
#: Seconds that ping may take before the executor counts as gone.
PROBE_TIMEOUT = 5.0

ChunkCallback = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Result:
    """A completed request."""

    executor: ID
    end: llm.End
    #: The complete response object (non-streaming requests only).
    response: dict[str, Any] | None
    chunks: int
    #: Whether this client refused the receipt the executor asked for.
    receipt_refused: bool = False
    #: This client's billing count of what executors that broke off delivered before
    #: ``executor`` continued the answer (one entry per executor; empty without resume).
    earlier: tuple[llm.Usage, ...] = ()
    #: How many times the answer was continued on another executor.
    resumes: int = 0
    #: How the answer came: "direct", or "relayed" through a validator.
    path: str = "direct"

    @property
    def billed(self) -> llm.Usage:
        """The usage of the whole answer over every executor that delivered part of it
        (each of them read the prompt, so a resumed answer bills it more than once)."""
        prompt = self.end.usage.prompt_tokens + sum(u.prompt_tokens for u in self.earlier)
        completion = self.end.usage.completion_tokens + sum(
            u.completion_tokens for u in self.earlier
        )
        return llm.Usage(prompt, completion)


def stream_path(framed: FramedStream) -> str:
    """ "relayed" when ``framed`` runs over a relayed connection, else "direct" (kept on
    the connection: reading its addresses costs ~0.1 ms, on every request)."""
    try:
        conn = framed.stream.muxed_conn
    except Exception:  # a stream without a connection: not a circuit
        return "direct"
    path = getattr(conn, "_lloom_path", None)
    if isinstance(path, str):
        return path
    try:
        addrs = conn.get_transport_addresses()
    except Exception:  # a connection type without addresses: not a circuit
        return "direct"
    path = "relayed" if any(is_circuit(a) for a in addrs) else "direct"
    with contextlib.suppress(AttributeError):  # a connection type that takes no attributes
        conn._lloom_path = path  # type: ignore[attr-defined]
    return path


async def _open(node: Node, info: PeerInfo, timeout: float) -> FramedStream:
    await node.connect(info)
    try:
        with trio.fail_after(timeout):
            raw = await node.host.new_stream(info.peer_id, [TProtocol(llm.PROTOCOL_ID)])
    except trio.TooSlowError:
        raise PeerTimeout(f"{info.peer_id} did not open a stream in time") from None
    except Exception as exc:  # py-libp2p raises assorted types for a refused protocol
        raise DialError(f"{info.peer_id} refused {llm.PROTOCOL_ID}: {exc}") from exc
    framed = FramedStream(raw, max_frame=DEFAULT_MAX_FRAME, read_timeout=timeout)
    # While an answer is awaited, a quiet executor is pinged: a cut connection fails
    # over within PROBE_SECS + PROBE_TIMEOUT s rather than after the idle timeout.
    framed.probe = partial(node.ping, info.peer_id, PROBE_TIMEOUT)
    framed.probe_every = PROBE_SECS
    return framed


class StreamPool:
    """Idle request streams to executors, reused by later requests.

    Opening a stream costs a multistream-select round trip (~2 ms on loopback); an
    executor serves any number of requests on one stream, one after another, until the
    stream stays idle longer than its keep-alive (60 s by default).
    """

    def __init__(self, node: Node, max_idle_per_peer: int = 16) -> None:
        self.node = node
        self.max_idle_per_peer = max_idle_per_peer
        self._idle: dict[ID, list[FramedStream]] = {}

    def take(self, peer_id: ID) -> FramedStream | None:
        """An idle stream to ``peer_id``, if any."""
        streams = self._idle.get(peer_id)
        return streams.pop() if streams else None

    async def give_back(self, peer_id: ID, framed: FramedStream) -> None:
        """Keep a stream whose last exchange ended cleanly."""
        streams = self._idle.setdefault(peer_id, [])
        if len(streams) < self.max_idle_per_peer:
            streams.append(framed)
        else:
            await framed.close()

    async def close(self) -> None:
        """Close every idle stream."""
        for streams in self._idle.values():
            for framed in streams:
                await framed.close()
        self._idle.clear()


def _receipt_answer(
    *,
    request: llm.Request,
    peer_id: ID,
    text: str,
    end: llm.End,
    signer: ReceiptSigner | None,
) -> llm.SignedReceipt | llm.Refusal:
    """The answer to the receipt request of ``end``."""
    if signer is None:
        return llm.Refusal(end.request_id, "this client does not sign receipts")
    answer = signer.answer(address_from_peer_id(peer_id), request, text, end)
    if isinstance(answer, llm.Refusal):
        logger.warning("refused to sign the executor's usage: %s", answer.reason)
    return answer


async def _exchange(
    framed: FramedStream,
    request: llm.Request,
    peer_id: ID,
    on_chunk: ChunkCallback | None,
    signer: ReceiptSigner | None = None,
) -> Result:
    """One request on ``framed``, driven by a :class:`ClientExchange`. Raises
    :class:`UnansweredClose` if the stream was closed before any answer, :class:`RemoteError`
    for an error frame (the stream stays usable)."""
    exchange = ClientExchange()
    await framed.write_frame(exchange.send(request))
    while True:
        frame = await framed.read_frame()
        if frame is None:
            exchange.closed()  # raises: a request was waiting
            raise NetworkError("executor closed the stream")  # pragma: no cover - unreachable
        match exchange.receive(frame):
            case ChunkArrived(data=data):
                if on_chunk is not None:
                    await on_chunk(data)
            case ResponseArrived():
                pass
            case Ended(end=end):
                refused = False
                if end.receipt is not None:
                    answer = _receipt_answer(
                        request=request, peer_id=peer_id, text=exchange.text, end=end, signer=signer
                    )
                    await framed.write_frame(exchange.answer_receipt(answer))
                    refused = isinstance(answer, llm.Refusal) and signer is not None
                return Result(peer_id, end, exchange.response, exchange.chunks, refused)
            case Failed(error=error):
                raise RemoteError(error.code.value, error.message)


async def send_request(
    node: Node,
    info: PeerInfo,
    request: llm.Request,
    on_chunk: ChunkCallback | None = None,
    *,
    idle_timeout: float = 120.0,
    pool: StreamPool | None = None,
    signer: ReceiptSigner | None = None,
) -> Result:
    """Run ``request`` on one executor; ``on_chunk`` receives streamed chunks.

    ``idle_timeout`` bounds the wait for each frame (the first token included). With a
    ``pool``, an idle stream is reused and the stream is kept for the next request.
    Raises :class:`RemoteError` for an error frame, :class:`NetworkError` or
    :class:`ProtocolError` when the executor misbehaves or vanishes; whatever ``on_chunk``
    raises ends the request (the stream is reset).
    """
    reused = pool.take(info.peer_id) if pool is not None else None
    if reused is not None:
        reused.read_timeout = idle_timeout
        delivered = 0

        async def counting(chunk: dict[str, Any]) -> None:
            nonlocal delivered
            delivered += 1
            if on_chunk is not None:
                await on_chunk(chunk)

        try:
            return await _run_on(
                reused, pool, request, peer_id=info.peer_id, on_chunk=counting, signer=signer
            )
        except PeerTimeout:
            raise
        except (NetworkError, ProtocolError):
            if delivered:
                raise
            # The executor dropped the idle stream (its keep-alive ran out): open a fresh one.
    framed = await _open(node, info, idle_timeout)
    try:
        return await _run_on(
            framed, pool, request, peer_id=info.peer_id, on_chunk=on_chunk, signer=signer
        )
    except UnansweredClose as exc:
        raise NetworkError("executor closed the stream without answering") from exc


async def _run_on(
    framed: FramedStream,
    pool: StreamPool | None,
    request: llm.Request,
    *,
    peer_id: ID,
    on_chunk: ChunkCallback | None,
    signer: ReceiptSigner | None,
) -> Result:
    """One exchange on ``framed``; the stream is kept (or closed) when it stays usable and
    reset otherwise."""
    try:
        result = await _exchange(framed, request, peer_id, on_chunk, signer)
        if stream_path(framed) != result.path:
            result = replace(result, path=stream_path(framed))
    except RemoteError:
        await _finish(framed, pool, peer_id)
        raise
    except BaseException:
        await framed.reset()
        raise
    await _finish(framed, pool, peer_id)
    return result


async def _finish(framed: FramedStream, pool: StreamPool | None, peer_id: ID) -> None:
    if pool is not None:
        await pool.give_back(peer_id, framed)
    else:
        await framed.close()


def _observe(book: ExecutorBook, result: Result, started: float, first_at: float | None) -> None:
    """Note a finished request: its time to first token, its speed, a refused receipt."""
    peer = str(result.executor)
    if result.receipt_refused:
        book.refused(peer)
        return
    now = trio.current_time()
    first = first_at if first_at is not None else now
    book.succeeded(peer, first - started, result.end.usage.completion_tokens, now - first)


#: Error codes that are no fault of the executor's (it is full; this client owes receipts).
_NO_FAULT = frozenset({"busy", "receipt_required", "bad_request", "too_large"})


def _misbehaved(exc: LloomError) -> bool:
    """Whether a failure counts against the executor."""
    return not (isinstance(exc, RemoteError) and exc.code in _NO_FAULT)


def retryable(exc: LloomError) -> bool:
    """Whether another executor may succeed after ``exc`` (see :mod:`lloom.errors`)."""
    return exc.retryable


#: Most times one answer is continued on another executor.
MAX_RESUMES = 2

MoreExecutors = Callable[[], Awaitable[Sequence[PeerInfo]]]


async def request_with_failover(
    node: Node,
    candidates: Sequence[PeerInfo],
    request: llm.Request,
    on_chunk: ChunkCallback | None = None,
    *,
    idle_timeout: float = 120.0,
    total_timeout: float | None = None,
    pool: StreamPool | None = None,
    signer: ReceiptSigner | None = None,
    book: ExecutorBook | None = None,
    more: MoreExecutors | None = None,
    on_busy: Callable[[ID], None] | None = None,
    on_unreachable: Callable[[ID], None] | None = None,
) -> Result:
    """Try ``candidates`` in order until one answers (see the module docstring); what each
    one did goes into ``book``, ``on_busy`` hears of each executor that refused as busy and
    ``on_unreachable`` of each that failed at the network level (dial, timeout, a broken
    connection). When the candidates run out, ``more`` (a fresh lookup) is asked once for
    executors not tried yet."""
    attempt = _Attempts(request, on_chunk, book)
    attempt.on_busy = on_busy
    attempt.on_unreachable = on_unreachable
    deadline = trio.current_time() + total_timeout if total_timeout else float("inf")
    queue, tried, asked_more = list(candidates), set(), more is None
    try:
        with trio.fail_at(deadline):
            while True:
                if not queue and not asked_more:
                    asked_more = True
                    assert more is not None
                    queue = [i for i in await more() if i.peer_id not in tried]
                if not queue:
                    break
                info = queue.pop(0)
                tried.add(info.peer_id)
                try:
                    return await attempt.run(
                        node, info, idle_timeout=idle_timeout, pool=pool, signer=signer
                    )
                except _TryNext:
                    continue
    except trio.TooSlowError:
        if attempt.delivered.chunks:
            raise PartialResponseError(
                f"timed out after {attempt.delivered.chunks} chunk(s) had been delivered"
            ) from None
        raise RequestTimeout(f"no answer within {total_timeout:g} s") from None
    if attempt.delivered.chunks:
        raise PartialResponseError(
            f"the answer broke off after {attempt.delivered.chunks} chunk(s) and no executor "
            f"could continue it: " + "; ".join(f"{p}: {e}" for p, e in attempt.errors)
        )
    raise AllExecutorsFailed(attempt.errors)


class _TryNext(Exception):
    """This executor failed in a way the next one may fix."""


class _Attempts:
    """The state of one request across executors: what was delivered to the caller, and
    how an answer that broke off is continued (:mod:`lloom.protocol.resume`)."""

    def __init__(
        self, request: llm.Request, on_chunk: ChunkCallback | None, book: ExecutorBook | None
    ) -> None:
        self.request = request
        self.on_chunk = on_chunk
        self.book = book
        self.delivered = Delivered()
        self.errors: list[tuple[str, str]] = []
        self.earlier: list[llm.Usage] = []
        self.replay: Replay | None = None
        self.first_at: float | None = None
        self.on_busy: Callable[[ID], None] | None = None
        self.on_unreachable: Callable[[ID], None] | None = None

    async def forward(self, chunk: dict[str, Any]) -> None:
        """Pass one chunk on (after the replay check of a resumed attempt)."""
        out = chunk if self.replay is None else self.replay.feed(chunk)
        if out is None:
            return
        self.delivered.add(out)
        if self.first_at is None:
            self.first_at = trio.current_time()
        if self.on_chunk is not None:
            await self.on_chunk(out)

    async def run(
        self,
        node: Node,
        info: PeerInfo,
        *,
        idle_timeout: float,
        pool: StreamPool | None,
        signer: ReceiptSigner | None,
    ) -> Result:
        """One attempt on ``info``: its result, or :class:`_TryNext`, or the error the
        caller gets."""
        peer = str(info.peer_id)
        resuming = self.delivered.chunks > 0
        self.replay = Replay(self.delivered) if resuming else None
        request = self.request
        if resuming:
            request = replace(request, resume=self.delivered.text)
        before = (self.delivered.chunks, self.delivered.text)
        started = trio.current_time()
        try:
            result = await send_request(
                node,
                info,
                request,
                self.forward,
                idle_timeout=idle_timeout,
                pool=pool,
                signer=signer,
            )
        except ResumeMismatch as exc:
            logger.info("executor %s could not continue the answer: %s", peer, exc)
            self.errors.append((peer, f"could not continue the answer: {exc}"))
            raise _TryNext from None
        except (RemoteError, NetworkError, ProtocolError) as exc:
            if self.book is not None and _misbehaved(exc):
                self.book.failed(peer)
            if isinstance(exc, RemoteError) and exc.code == "busy" and self.on_busy is not None:
                self.on_busy(info.peer_id)
            if isinstance(exc, NetworkError) and self.on_unreachable is not None:
                self.on_unreachable(info.peer_id)
            if self._complete(before):
                return self._ended_here(info, exc, before)
            self._failed(peer, exc, before)
            raise _TryNext from None
        if self.book is not None:
            _observe(self.book, result, started, self.first_at)
        return replace(result, earlier=tuple(self.earlier), resumes=len(self.earlier))

    def _complete(self, before: tuple[int, str]) -> bool:
        """Whether this attempt delivered the end of the answer (its ``finish_reason``):
        the user has it all, only the executor's final frame is missing."""
        single = self.request.body.get("n") in (None, 1)
        return single and self.delivered.finished and self.delivered.chunks > before[0]

    def _ended_here(self, info: PeerInfo, exc: LloomError, before: tuple[int, str]) -> Result:
        """The result of an answer delivered whole whose executor failed before its final
        frame (a cut connection): this client's own billing count, and no receipt."""
        logger.warning(
            "executor %s failed after the whole answer was delivered (%s); ending it here",
            info.peer_id,
            exc,
        )
        prompt = billing.prompt_tokens(self.request.kind, self.request.body)
        part = billing.count(self.delivered.text) - billing.count(before[1])
        request_id = str(self.delivered.identity.get("id", ""))
        end = llm.End(request_id, self.request.model, llm.Usage(prompt, max(0, part)))
        return Result(
            info.peer_id,
            end,
            None,
            self.delivered.chunks,
            earlier=tuple(self.earlier),
            resumes=len(self.earlier),
        )

    def _failed(self, peer: str, exc: LloomError, before: tuple[int, str]) -> None:
        """Note a failed attempt; raise what the caller gets when no other may help."""
        self.errors.append((peer, str(exc)))
        if not self.delivered.chunks:
            if not retryable(exc):
                raise exc
            logger.info("executor %s failed, trying the next: %s", peer, exc)
            return
        if self.delivered.chunks > before[0]:  # this executor delivered part of the answer
            part = billing.count(self.delivered.text) - billing.count(before[1])
            prompt = billing.prompt_tokens(self.request.kind, self.request.body)
            self.earlier.append(llm.Usage(prompt, max(0, part)))
        reason = self.delivered.why_not_resumable(self.request)
        if reason is None and not retryable(exc):
            reason = "the executor rejected the request"
        if reason is None and len(self.earlier) > MAX_RESUMES:
            reason = f"it was continued {MAX_RESUMES} times already"
        if reason is not None:
            raise PartialResponseError(
                f"executor {peer} failed after {self.delivered.chunks} chunk(s): {exc}; "
                f"the answer cannot be continued elsewhere: {reason}"
            ) from exc
        logger.info(
            "executor %s failed after %d chunk(s) (%s); continuing the answer on the next",
            peer,
            self.delivered.chunks,
            exc,
        )
