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

from lloom.errors import (
    AllExecutorsFailed,
    DialError,
    NetworkError,
    PartialResponseError,
    PeerTimeout,
    ProtocolError,
    RemoteError,
    RequestTimeout,
)
from lloom.framing import DEFAULT_MAX_FRAME
from lloom.node.node import Node
from lloom.node.streams import FramedStream
from lloom.protocol import llm

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


async def send_request(
    node: Node,
    info: PeerInfo,
    request: llm.Request,
    on_chunk: ChunkCallback | None = None,
    *,
    idle_timeout: float = 120.0,
) -> Result:
    """Run ``request`` on one executor; ``on_chunk`` receives streamed chunks.

    ``idle_timeout`` bounds the wait for each frame (the first token included).
    Raises :class:`RemoteError` for an error frame, :class:`NetworkError` or
    :class:`ProtocolError` when the executor misbehaves or vanishes.
    """
    framed = await _open(node, info, idle_timeout)
    chunks = 0
    response: dict[str, Any] | None = None
    try:
        await framed.write_frame(llm.encode(request))
        while True:
            frame = await framed.read_frame()
            if frame is None:
                raise NetworkError("executor closed the stream without ending the request")
            msg = llm.decode(frame)
            match msg:
                case llm.Chunk(data=data):
                    chunks += 1
                    if on_chunk is not None:
                        await on_chunk(data)
                case llm.Response(data=data):
                    response = data
                case llm.End():
                    return Result(info.peer_id, msg, response, chunks)
                case llm.Error(code=code, message=message):
                    raise RemoteError(code.value, message)
                case _:
                    raise ProtocolError(f"unexpected {type(msg).__name__} from executor")
    finally:
        await framed.close()


def retryable(exc: Exception) -> bool:
    """Whether another executor may succeed after ``exc``."""
    if isinstance(exc, RemoteError):
        try:
            return llm.ErrorCode(exc.code).retryable
        except ValueError:
            return True
    return isinstance(exc, NetworkError | ProtocolError)


async def request_with_failover(
    node: Node,
    candidates: Sequence[PeerInfo],
    request: llm.Request,
    on_chunk: ChunkCallback | None = None,
    *,
    idle_timeout: float = 120.0,
    total_timeout: float | None = None,
) -> Result:
    """Try ``candidates`` in order until one answers (see the module docstring)."""
    errors: list[tuple[str, str]] = []
    delivered = 0

    async def counting(chunk: dict[str, Any]) -> None:
        nonlocal delivered
        delivered += 1
        if on_chunk is not None:
            await on_chunk(chunk)

    deadline = trio.current_time() + total_timeout if total_timeout else float("inf")
    try:
        with trio.fail_at(deadline):
            for info in candidates:
                try:
                    return await send_request(
                        node, info, request, counting, idle_timeout=idle_timeout
                    )
                except (RemoteError, NetworkError, ProtocolError) as exc:
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
