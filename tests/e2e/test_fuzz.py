"""Property-based fuzzing of a running executor and a running gateway (Hypothesis).

Random and adversarial input — lone surrogates, huge integers, deep nesting, NaN, wrong
types for every field, oversized strings, truncated frames, raw garbage — is sent to real
processes; afterwards each process must be alive and answer the next good request. The
number of examples is bounded, so the run is bounded in time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from lloom.errors import LloomError
from lloom.framing import encode_frame, encode_varint
from lloom.identity import Identity
from lloom.node.node import Node, NodeConfig, open_node
from lloom.node.streams import FramedStream
from lloom.protocol import llm
from tests.support.network import start_executor, start_gateway, start_mock, start_validator
from tests.support.procs import Proc, Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- what to send ------------------------------------------------------------------------

nasty_strings = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\ud800x", "\udfff", "\x00", "é" * 3, "<|endoftext|>", "../../etc/passwd"]),
    st.text(min_size=2000, max_size=5000),
)
nasty_numbers = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2**64, -(2**63), -1, 0, True, False]),
)
json_values = st.recursive(
    st.none() | st.booleans() | nasty_numbers | nasty_strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_strings, inner, max_size=4),
    max_leaves=20,
)
FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "n",
    "tools",
    "tool_choice",
    "response_format",
    "logit_bias",
    "seed",
    "best_of",
    "image_url",
]


@st.composite
def request_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A good chat body with one to three fields replaced by anything."""
    body: dict[str, Any] = {
        "model": "mock-a",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": draw(st.booleans()),
    }
    for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
        body[key] = draw(json_values)
    return body


def to_json(value: Any) -> bytes:
    """JSON text of anything, NaN and lone surrogates included."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


@st.composite
def huge_integer_bodies(draw: st.DrawFn) -> bytes:
    """A chat body whose field is an integer of thousands of digits (as JSON text: such an
    integer is never a Python object here, even Hypothesis' repr of it would fail)."""
    field = draw(st.sampled_from(["seed", "max_tokens", "n", "temperature", "model"]))
    digits = draw(st.integers(4000, 20000))
    return (
        b'{"model":"mock-a","messages":[{"role":"user","content":"hi"}],"'
        + field.encode()
        + b'":'
        + b"9" * digits
        + b"}"
    )


bodies = st.one_of(request_bodies().map(to_json), json_values.map(to_json), huge_integer_bodies())


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Bytes for a fresh request stream: framed or not, whole or cut short."""
    kind = draw(st.sampled_from(["request", "message", "garbage", "deep", "truncated"]))
    if kind == "request":
        payload = b'{"t":"request","kind":"chat","body":' + draw(bodies) + b"}"
    elif kind == "message":
        payload = to_json(
            {"t": draw(nasty_strings | st.sampled_from(["chunk", "end"]))}
            | {"body": draw(json_values)}
        )
    elif kind == "garbage":
        payload = draw(st.binary(max_size=300))
    elif kind == "deep":
        depth = draw(st.integers(60, 5000))
        payload = b'{"t":"request","kind":"chat","body":' + b"[" * depth + b"]" * depth + b"}"
    else:
        whole = to_json({"t": "request", "kind": "chat", "body": draw(request_bodies())})
        return encode_varint(len(whole) + draw(st.integers(1, 1000))) + whole
    return encode_frame(payload, max_size=1 << 24)


# --- a client node in a thread, driven from Hypothesis' synchronous examples -------------


@contextmanager
def node_thread(boot: str) -> Iterator[Callable[[Callable[[Node], Awaitable[Any]]], Any]]:
    """Run a libp2p client node in its own trio thread; yield ``call(fn)`` running
    ``await fn(node)`` there."""
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        config = NodeConfig(bootstrap=[Multiaddr(boot)])
        async with open_node(Identity.generate(), config) as node:
            holder["node"], holder["token"] = node, trio.lowlevel.current_trio_token()
            holder["stop"] = trio.Event()
            ready.set()
            await holder["stop"].wait()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(30), "client node did not start"

    def call(fn: Callable[[Node], Awaitable[Any]]) -> Any:
        return trio.from_thread.run(fn, holder["node"], trio_token=holder["token"])

    try:
        yield call
    finally:
        trio.from_thread.run_sync(holder["stop"].set, trio_token=holder["token"])
        thread.join(30)


def send_raw(target: str, data: bytes) -> Callable[[Node], Awaitable[None]]:
    """Open a fresh stream, write ``data``, read what comes back for a while, reset."""

    async def run(node: Node) -> None:
        info = info_from_p2p_addr(Multiaddr(target))
        step = "connect"
        try:
            with trio.fail_after(15):
                await node.connect(info)
                step = "open a stream"
                stream = await node.host.new_stream(info.peer_id, [TProtocol(llm.PROTOCOL_ID)])
                framed = FramedStream(stream, read_timeout=2)
                try:
                    step = "write"
                    await stream.write(data)
                    step = "read"
                    # Until the executor answers an error or an end (a stream it keeps open
                    # waits for the next request), closes, or 2 s pass (a cut frame).
                    with trio.move_on_after(2):
                        while (frame := await framed.read_frame()) is not None:
                            if isinstance(llm.decode(frame), llm.Error | llm.End):
                                break
                except LloomError:
                    pass  # the executor refused the bytes and closed or reset the stream
                finally:
                    step = "reset"
                    await framed.reset()
        except trio.TooSlowError:
            raise AssertionError(f"the executor did not let us {step} within 15 s") from None

    return run


def good_request(target: str) -> Callable[[Node], Awaitable[list[llm.Message]]]:
    async def run(node: Node) -> list[llm.Message]:
        info = info_from_p2p_addr(Multiaddr(target))
        stream = await node.host.new_stream(info.peer_id, [TProtocol(llm.PROTOCOL_ID)])
        framed = FramedStream(stream, read_timeout=10)
        body = {"model": "mock-a", "messages": [{"role": "user", "content": "still there?"}]}
        await framed.write_frame(llm.encode(llm.Request(llm.RequestKind.CHAT, body)))
        out = []
        while (frame := await framed.read_frame()) is not None:
            out.append(llm.decode(frame))
            if isinstance(out[-1], llm.End | llm.Error):
                break
        await framed.close()
        return out

    return run


def alive(proc: Proc) -> bool:
    return proc.popen is not None and proc.popen.poll() is None


def test_fuzzed_frames_do_not_stop_an_executor(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    executor, ready, _ = start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    target = ready.listen[0]
    with node_thread(v.listen[0]) as call:

        @FUZZ
        @given(frames())
        def fuzz(data: bytes) -> None:
            call(send_raw(target, data))
            assert alive(executor), "the executor stopped"

        fuzz()
        answer = call(good_request(target))
    assert alive(executor)
    assert isinstance(answer[0], llm.Response) and isinstance(answer[-1], llm.End)


def test_fuzzed_bodies_do_not_stop_a_gateway(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    gateway, base = start_gateway(procs, v.listen[0])
    with httpx.Client(base_url=base, timeout=30) as http:

        @FUZZ
        @given(bodies)
        def fuzz(body: bytes) -> None:
            answer = http.post(
                "/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code != 500, answer.text  # a 500 is a bug of lloom's
            if answer.status_code != 200:
                assert answer.json()["error"]["message"]
            assert alive(gateway), "the gateway stopped"

        fuzz()
        good = http.post(
            "/chat/completions",
            json={"model": "mock-a", "messages": [{"role": "user", "content": "still there?"}]},
        )
    assert alive(gateway)
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["message"]["content"] == "Echo: still there?"
