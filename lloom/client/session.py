"""Sending requests to executors, and failing over between them.

:func:`send_request` runs one request on one executor. :func:`request_with_failover`
tries executors in order: an executor that fails before delivering its first chunk (dial
error, error frame, busy, timeout, broken stream) is skipped for the next; a failure after
chunks were delivered raises :class:`PartialResponseError`, since the caller already has
part of an answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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
from lloom.node.streams import FramedStream
from lloom.protocol import billing, llm

logger = logging.getLogger(__name__)

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


async def _open(node: Node, info: PeerInfo, timeout: float) -> FramedStream:
    await node.connect(info)
    try:
        with trio.fail_after(timeout):
            raw = await node.host.new_stream(info.peer_id, [TProtocol(llm.PROTOCOL_ID)])
    except trio.TooSlowError:
        raise PeerTimeout(f"{info.peer_id} did not open a stream in time") from None
    except Exception as exc:  # py-libp2p raises assorted types for a refused protocol
        raise DialError(f"{info.peer_id} refused {llm.PROTOCOL_ID}: {exc}") from exc
    return FramedStream(raw, max_frame=DEFAULT_MAX_FRAME, read_timeout=timeout)


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


async def _answer_receipt(
    framed: FramedStream,
    *,
    request: llm.Request,
    peer_id: ID,
    text: str,
    end: llm.End,
    signer: ReceiptSigner | None,
) -> bool:
    """Answer the receipt request of ``end``; whether it was refused."""
    answer: llm.Message
    if signer is None:
        answer = llm.Refusal(end.request_id, "this client does not sign receipts")
    else:
        answer = signer.answer(address_from_peer_id(peer_id), request, text, end)
        if isinstance(answer, llm.Refusal):
            logger.warning("refused to sign the executor's usage: %s", answer.reason)
    await framed.write_frame(llm.encode(answer))
    return isinstance(answer, llm.Refusal) and signer is not None


async def _exchange(
    framed: FramedStream,
    request: llm.Request,
    peer_id: ID,
    on_chunk: ChunkCallback | None,
    signer: ReceiptSigner | None = None,
) -> tuple[Result | None, int]:
    """One request on ``framed``; ``(None, 0)`` if the stream was already closed."""
    chunks = 0
    response: dict[str, Any] | None = None
    text: list[str] = []
    await framed.write_frame(llm.encode(request))
    while True:
        frame = await framed.read_frame()
        if frame is None:
            if chunks == 0 and response is None:
                return None, 0
            raise NetworkError("executor closed the stream without ending the request")
        msg = llm.decode(frame)
        match msg:
            case llm.Chunk(data=data):
                chunks += 1
                text.append(billing.delivered_text(data))
                if on_chunk is not None:
                    await on_chunk(data)
            case llm.Response(data=data):
                response = data
                text.append(billing.delivered_text(data))
            case llm.End():
                refused = False
                if msg.receipt is not None:
                    refused = await _answer_receipt(
                        framed,
                        request=request,
                        peer_id=peer_id,
                        text="".join(text),
                        end=msg,
                        signer=signer,
                    )
                return Result(peer_id, msg, response, chunks, refused), chunks
            case llm.Error(code=code, message=message):
                raise RemoteError(code.value, message)
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from executor")


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
    :class:`ProtocolError` when the executor misbehaves or vanishes.
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
            result, _ = await _exchange(reused, request, info.peer_id, counting, signer)
        except RemoteError:
            await pool.give_back(info.peer_id, reused)  # type: ignore[union-attr]
            raise
        except (NetworkError, ProtocolError):
            await reused.reset()
            if delivered:
                raise
            result = None  # the executor dropped the idle stream: open a fresh one
        if result is not None:
            await pool.give_back(info.peer_id, reused)  # type: ignore[union-attr]
            return result
    framed = await _open(node, info, idle_timeout)
    try:
        result, _ = await _exchange(framed, request, info.peer_id, on_chunk, signer)
    except RemoteError:
        await _finish(framed, pool, info.peer_id)
        raise
    except BaseException:
        await framed.reset()
        raise
    if result is None:
        await framed.reset()
        raise NetworkError("executor closed the stream without answering")
    await _finish(framed, pool, info.peer_id)
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
) -> Result:
    """Try ``candidates`` in order until one answers (see the module docstring); what each
    one did goes into ``book``."""
    errors: list[tuple[str, str]] = []
    delivered = 0
    first_at: float | None = None

    async def counting(chunk: dict[str, Any]) -> None:
        nonlocal delivered, first_at
        delivered += 1
        if first_at is None:
            first_at = trio.current_time()
        if on_chunk is not None:
            await on_chunk(chunk)

    deadline = trio.current_time() + total_timeout if total_timeout else float("inf")
    try:
        with trio.fail_at(deadline):
            for info in candidates:
                started = trio.current_time()
                try:
                    result = await send_request(
                        node,
                        info,
                        request,
                        counting,
                        idle_timeout=idle_timeout,
                        pool=pool,
                        signer=signer,
                    )
                    if book is not None:
                        _observe(book, result, started, first_at)
                    return result
                except (RemoteError, NetworkError, ProtocolError) as exc:
                    if book is not None and _misbehaved(exc):
                        book.failed(str(info.peer_id))
                    if delivered:
                        raise PartialResponseError(
                            f"executor {info.peer_id} failed after {delivered} chunk(s): {exc}"
                        ) from exc
                    if not retryable(exc):
                        raise
                    logger.info("executor %s failed, trying the next: %s", info.peer_id, exc)
                    errors.append((str(info.peer_id), str(exc)))
    except trio.TooSlowError:
        if delivered:
            raise PartialResponseError(
                f"timed out after {delivered} chunk(s) had been delivered"
            ) from None
        raise RequestTimeout(f"no answer within {total_timeout:g} s") from None
    raise AllExecutorsFailed(errors)
