"""Failover and bad input against real executor processes, driven by an in-process client.

The client library is called directly so the order of executors is chosen by the test,
which makes "the bad one first" deterministic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from multiaddr import Multiaddr

from lloom.client.session import StreamPool, request_with_failover, send_request
from lloom.errors import AllExecutorsFailed, RemoteError
from lloom.framing import encode_varint
from lloom.identity import Identity
from lloom.node.node import Node, NodeConfig, open_node
from lloom.node.streams import FramedStream
from lloom.protocol import llm
from lloom.readyline import ReadyLine
from tests.support.network import start_executor, start_mock, start_validator
from tests.support.procs import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def info(ready: ReadyLine) -> PeerInfo:
    return info_from_p2p_addr(Multiaddr(ready.listen[0]))


def chat(model: str = "mock-a", stream: bool = True, **extra: Any) -> llm.Request:
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "stream": stream}
    return llm.Request(llm.RequestKind.CHAT, body | extra)


@asynccontextmanager
async def client_node(boot: str) -> AsyncIterator[Node]:
    async with open_node(Identity.generate(), NodeConfig(bootstrap=[Multiaddr(boot)])) as node:
        yield node


async def test_fails_over_from_erroring_and_dead_executors(procs: Processes) -> None:
    _, good_url = start_mock(procs, "good-mock")
    _, bad_url = start_mock(procs, "bad-mock", "--fail-status", "500")
    _, v = start_validator(procs)
    boot = v.listen[0]
    _, erroring, _ = start_executor(procs, "erroring", boot, bad_url, ["mock-a"])
    dead_proc, dead, _ = start_executor(procs, "dead", boot, good_url, ["mock-a"])
    _, good, _ = start_executor(procs, "good", boot, good_url, ["mock-a"])
    dead_proc.kill()

    async with client_node(boot) as node:
        with trio.fail_after(60):
            with pytest.raises(RemoteError) as err:
                await send_request(node, info(erroring), chat())
            assert err.value.code == "backend_error"
            # the backend's own text stays in the executor's log, never reaches a peer
            assert err.value.message == "the executor's backend failed"

            chunks: list[dict[str, Any]] = []

            async def on_chunk(chunk: dict[str, Any]) -> None:
                chunks.append(chunk)

            result = await request_with_failover(
                node, [info(erroring), info(dead), info(good)], chat(), on_chunk
            )
            assert str(result.executor) == good.peer_id
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert text == "Echo: ping"

            with pytest.raises(AllExecutorsFailed) as all_failed:
                await request_with_failover(node, [info(erroring), info(dead)], chat())
            assert len(all_failed.value.errors) == 2


async def test_model_not_served_and_bad_requests_are_error_frames(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    _, ex, _ = start_executor(procs, "exec", v.listen[0], url, ["mock-a", "mock-b"])
    async with client_node(v.listen[0]) as node:
        with trio.fail_after(60):
            with pytest.raises(RemoteError) as err:
                await send_request(node, info(ex), chat("other-model"))
            assert err.value.code == "unknown_model"
            assert "mock-a, mock-b" in err.value.message
            with pytest.raises(RemoteError) as err:
                await send_request(node, info(ex), chat(temperature=7))
            assert err.value.code == "bad_request" and "temperature" in err.value.message
            # Not retryable: failover stops at once instead of trying others.
            with pytest.raises(RemoteError):
                await request_with_failover(node, [info(ex), info(ex)], chat(temperature=7))


async def _raw_exchange(node: Node, target: PeerInfo, data: bytes) -> llm.Message | None:
    await node.connect(target)
    raw = await node.host.new_stream(target.peer_id, [TProtocol(llm.PROTOCOL_ID)])
    await raw.write(data)
    framed = FramedStream(raw, read_timeout=10)
    frame = await framed.read_frame()
    await framed.close()
    return llm.decode(frame) if frame is not None else None


async def test_garbage_and_oversized_frames_then_a_good_request(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    _, ex, _ = start_executor(
        procs, "exec", v.listen[0], url, ["mock-a"], extra="[limits]\nmax_request_bytes = 4096"
    )
    target = info(ex)
    async with client_node(v.listen[0]) as node:
        with trio.fail_after(60):
            garbage = await _raw_exchange(node, target, encode_varint(5) + b"\xff\x00abc")
            assert isinstance(garbage, llm.Error) and garbage.code is llm.ErrorCode.BAD_REQUEST
            not_json = await _raw_exchange(node, target, encode_varint(3) + b"{{{")
            assert isinstance(not_json, llm.Error) and not_json.code is llm.ErrorCode.BAD_REQUEST
            huge = await _raw_exchange(node, target, encode_varint(10**9) + b"x" * 100)
            assert isinstance(huge, llm.Error) and huge.code is llm.ErrorCode.TOO_LARGE
            bad_varint = await _raw_exchange(node, target, b"\xff" * 12)
            assert isinstance(bad_varint, llm.Error)
            result = await send_request(node, target, chat(stream=False))
            assert result.response is not None
            assert result.response["choices"][0]["message"]["content"] == "Echo: ping"


async def test_busy_executor_refuses_and_client_fails_over(procs: Processes) -> None:
    _, slow_url = start_mock(procs, "slow", "--delay-ms", "1500")
    _, fast_url = start_mock(procs, "fast")
    _, v = start_validator(procs)
    boot = v.listen[0]
    _, busy, _ = start_executor(
        procs, "busy", boot, slow_url, ["mock-a"], extra="[limits]\nmax_concurrent_requests = 1"
    )
    _, other, _ = start_executor(procs, "other", boot, fast_url, ["mock-a"])
    async with client_node(boot) as node, trio.open_nursery() as nursery:
        with trio.fail_after(60):
            started = trio.Event()

            async def occupy() -> None:
                started.set()
                await send_request(node, info(busy), chat(stream=False))

            nursery.start_soon(occupy)
            await started.wait()
            # Wait until the executor is actually serving the first request.
            while True:
                try:
                    await send_request(node, info(busy), chat(stream=False))
                except RemoteError as exc:
                    assert exc.code == "busy"
                    break
                await trio.sleep(0.05)
            result = await request_with_failover(node, [info(busy), info(other)], chat())
            assert str(result.executor) == other.peer_id


async def test_streams_are_reused_and_a_closed_idle_stream_is_replaced(
    procs: Processes,
) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    _, ex, _ = start_executor(
        procs, "exec", v.listen[0], url, ["mock-a"], extra="[limits]\nkeepalive_secs = 0.5"
    )
    target = info(ex)
    async with client_node(v.listen[0]) as node:
        pool = StreamPool(node)
        with trio.fail_after(60):
            await send_request(node, target, chat(), pool=pool)
            kept = pool.take(target.peer_id)
            assert kept is not None
            await pool.give_back(target.peer_id, kept)
            await send_request(node, target, chat(stream=False), pool=pool)
            assert pool.take(target.peer_id) is kept  # the same stream served both
            await pool.give_back(target.peer_id, kept)
            await trio.sleep(1.0)  # past the executor's keep-alive: it closes the stream
            result = await send_request(node, target, chat(stream=False), pool=pool)
            assert result.response is not None
            assert pool.take(target.peer_id) is not kept
        await pool.close()
