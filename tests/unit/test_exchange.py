"""The request exchange as pure state machines: both sides, stream reuse, busy refusals,
receipts, and mid-stream resume (no I/O anywhere)."""

from __future__ import annotations

from typing import Any

import pytest

from lloom.errors import (
    InternalError,
    InvalidRequest,
    NetworkError,
    ProtocolError,
    Refused,
)
from lloom.protocol import billing, llm
from lloom.protocol.client_exchange import (
    ChunkArrived,
    ClientExchange,
    ClientState,
    Ended,
    Failed,
    ResponseArrived,
    UnansweredClose,
)
from lloom.protocol.error_frames import error_frame
from lloom.protocol.executor_exchange import (
    ExecutorExchange,
    ExecutorState,
    ReceiptArrived,
    RequestArrived,
)
from lloom.protocol.openai_body import Policy
from lloom.protocol.resume import Delivered, Replay, ResumeMismatch, chunk_text, not_resumable

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
RECEIPT = llm.ReceiptRequest("0x" + "11" * 20, 1, "0x" + "22" * 20, 10, 5, 2_000_000_000)


def request(**extra: Any) -> llm.Request:
    return llm.Request(llm.RequestKind.CHAT, BODY | extra)


def delta(text: str, finish: str | None = None, **head: Any) -> dict[str, Any]:
    return {
        "id": "x",
        **head,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


def state(machine: ClientExchange | ExecutorExchange) -> ClientState | ExecutorState:
    """The machine's state, read through a call (mypy would narrow the attribute)."""
    return machine.state


def reusable(machine: ClientExchange) -> bool:
    return machine.reusable


def executor() -> ExecutorExchange:
    return ExecutorExchange(lambda model: Policy(max_tokens=100))


def test_client_stream_then_receipt_then_reuse() -> None:
    c = ClientExchange()
    frame = c.send(request())
    assert llm.decode(frame) == request()
    event = c.receive(llm.encode(llm.Chunk(delta("Hel"))))
    assert isinstance(event, ChunkArrived) and event.text == "Hel"
    c.receive(llm.encode(llm.Chunk(delta("lo"))))
    end = llm.End("r1", "m", llm.Usage(9, 1), receipt=RECEIPT)
    assert c.receive(llm.encode(end)) == Ended(end)
    assert state(c) is ClientState.RECEIPT and not reusable(c) and c.text == "Hello"
    with pytest.raises(InternalError):
        c.send(request())  # the receipt must be answered first
    answer = llm.Refusal("r1", "no")
    assert llm.decode(c.answer_receipt(answer)) == answer
    assert reusable(c)
    c.send(request(stream=False))  # the same stream carries the next request
    assert c.chunks == 0 and c.text == ""
    assert isinstance(c.receive(llm.encode(llm.Response({"choices": []}))), ResponseArrived)
    c.receive(llm.encode(llm.End("r2", "m", llm.Usage(9, 0))))
    assert reusable(c)


def test_client_error_frame_keeps_the_stream_but_garbage_closes_it() -> None:
    c = ClientExchange()
    c.send(request())
    busy = llm.Error(llm.ErrorCode.BUSY, "full")
    assert c.receive(llm.encode(busy)) == Failed(busy) and reusable(c)
    c.send(request())
    with pytest.raises(ProtocolError):
        c.receive(b"{not json")
    assert state(c) is ClientState.CLOSED and not reusable(c)
    c2 = ClientExchange()
    c2.send(request())
    with pytest.raises(ProtocolError, match="unexpected Request"):
        c2.receive(llm.encode(request()))
    c3 = ClientExchange()
    c3.send(request())
    c3.receive(llm.encode(llm.Chunk(delta("a"))))
    with pytest.raises(ProtocolError):  # a whole response after chunks is out of order
        c3.receive(llm.encode(llm.Response({"choices": []})))


def test_client_tells_an_idle_close_from_a_cut_answer() -> None:
    idle = ClientExchange()
    idle.closed()  # nothing was asked: a clean close
    unanswered = ClientExchange()
    unanswered.send(request())
    with pytest.raises(UnansweredClose):
        unanswered.closed()
    cut = ClientExchange()
    cut.send(request())
    cut.receive(llm.encode(llm.Chunk(delta("a"))))
    with pytest.raises(NetworkError) as info:
        cut.closed()
    assert not isinstance(info.value, UnansweredClose)


def test_executor_serves_refuses_busy_and_serves_again() -> None:
    e = executor()
    [arrived] = e.receive(llm.encode(request(max_tokens=5)))
    assert isinstance(arrived, RequestArrived) and arrived.client_limit == 5
    assert state(e) is ExecutorState.SERVING
    frame = e.send_error(error_frame(Refused(llm.ErrorCode.BUSY, "full")))
    assert isinstance(llm.decode(frame), llm.Error) and state(e) is ExecutorState.IDLE
    assert e.receive(llm.encode(request()))
    e.send_chunk(delta("a b"))
    assert e.usage() == llm.Usage(billing.chat_prompt_tokens(BODY), billing.count("a b"))
    e.send_end(llm.End("r", "m", e.usage()))
    assert state(e) is ExecutorState.IDLE
    with pytest.raises(InternalError):
        e.send_chunk(delta("late"))


def test_executor_validates_requests_and_stays_idle() -> None:
    e = executor()
    with pytest.raises(InvalidRequest):
        e.receive(llm.encode(request(temperature=7)))
    with pytest.raises(ProtocolError, match="expected a request"):
        e.receive(llm.encode(llm.Refusal("r", "no")))
    assert state(e) is ExecutorState.IDLE
    assert isinstance(e.receive(llm.encode(request()))[0], RequestArrived)


def test_executor_receipt_answers_silence_and_a_next_request_instead() -> None:
    e = executor()
    e.receive(llm.encode(request()))
    e.send_end(llm.End("r", "m", llm.Usage(1, 1), receipt=RECEIPT))
    assert state(e) is ExecutorState.RECEIPT
    answer = llm.SignedReceipt("r", b"\x01" * 65)
    assert e.receive(llm.encode(answer)) == [ReceiptArrived(answer)]
    # A client that does not sign sends its next request instead: both events, in order.
    e.receive(llm.encode(request()))
    e.send_end(llm.End("r2", "m", llm.Usage(1, 1), receipt=RECEIPT))
    missing, nxt = e.receive(llm.encode(request(stream=False)))
    assert missing == ReceiptArrived(None) and isinstance(nxt, RequestArrived)
    assert state(e) is ExecutorState.SERVING
    e.send_end(llm.End("r3", "m", llm.Usage(1, 1), receipt=RECEIPT))
    assert e.receive(b"garbage") == [ReceiptArrived(None)]
    e.receive(llm.encode(request()))
    e.send_end(llm.End("r4", "m", llm.Usage(1, 1), receipt=RECEIPT))
    assert e.receipt_timed_out() == ReceiptArrived(None) and state(e) is ExecutorState.IDLE


def test_resumed_request_bills_only_what_it_adds() -> None:
    whole = "The quick brown fox jumps over the lazy dog."
    delivered = "The quick brown"
    e = executor()
    e.receive(llm.encode(llm.Request(llm.RequestKind.CHAT, BODY, resume=delivered)))
    e.send_chunk(delta(whole))
    assert e.usage().completion_tokens == billing.count(whole) - billing.count(delivered)
    # Both executors' counts add up to the count of the whole answer.
    assert billing.count(delivered) + e.usage().completion_tokens == billing.count(whole)


def test_resumed_billing_rules() -> None:
    assert billing.resumed_completion_tokens("ab cd", "ab", None) == billing.count("ab cd") - 1
    assert billing.resumed_completion_tokens("ab", "ab cd", None) == 0  # still repeating
    assert billing.resumed_completion_tokens("xy zz", "ab", None) == billing.count("xy zz")
    assert billing.resumed_completion_tokens("ab cd ef gh", "ab", 2) == 1  # capped first


def test_request_resume_round_trips_and_is_checked() -> None:
    req = llm.Request(llm.RequestKind.CHAT, BODY, "id-1", resume="so far")
    assert llm.decode(llm.encode(req)) == req
    with pytest.raises(ProtocolError):
        llm.decode(b'{"t":"request","kind":"chat","body":{},"resume":{"delivered":5}}')
    with pytest.raises(ProtocolError):
        llm.decode(b'{"t":"request","kind":"chat","body":{},"resume":"text"}')


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({}, "reproducible"),
        ({"temperature": 0.7}, "reproducible"),
        ({"temperature": 0, "n": 2}, "several choices"),
        ({"temperature": 0, "logprobs": True}, "log probabilities"),
        ({"temperature": 0, "stream": False}, "not streamed"),
    ],
)
def test_what_cannot_be_resumed(extra: dict[str, Any], why: str) -> None:
    reason = not_resumable(request(**extra))
    assert reason is not None and why in reason


def test_what_can_be_resumed() -> None:
    assert not_resumable(request(temperature=0)) is None
    assert not_resumable(request(temperature=1.0, seed=7)) is None


def test_delivered_text_that_is_not_plain_blocks_resume() -> None:
    d = Delivered()
    d.add(delta("a"))
    assert d.why_not_resumable(request(temperature=0)) is None
    d.add({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]})
    assert "plain text" in str(d.why_not_resumable(request(temperature=0)))
    done = Delivered()
    done.add(delta("a", "stop"))
    assert "finished" in str(done.why_not_resumable(request(temperature=0)))
    assert chunk_text({"choices": [{"index": 0, "text": "legacy"}]}) == "legacy"
    assert chunk_text({"choices": [], "usage": {}}) == ""
    assert chunk_text({"choices": [{"index": 0}, {"index": 1}]}) is None


def _run_replay(delivered_chunks: list[str], rerun: list[dict[str, Any]]) -> list[dict[str, Any]]:
    d = Delivered()
    d.add(delta("") | {"id": "first", "created": 1})
    for text in delivered_chunks:
        d.add(delta(text) | {"id": "first", "created": 1})
    replay = Replay(d)
    return [out for chunk in rerun if (out := replay.feed(chunk)) is not None]


def test_replay_swallows_the_delivered_part_across_other_chunk_boundaries() -> None:
    rerun = [
        {
            "id": "second",
            "created": 2,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        },
        delta("The qu", id="second", created=2),
        delta("ick brown f", id="second", created=2),
        delta("ox jumps", id="second", created=2),
        delta("", "stop", id="second", created=2),
    ]
    out = _run_replay(["The quick ", "brown"], rerun)
    assert [chunk_text(c) for c in out] == [" f", "ox jumps", ""]
    assert all(c["id"] == "first" and c["created"] == 1 for c in out)
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_replay_refuses_a_different_answer() -> None:
    with pytest.raises(ResumeMismatch, match="differs"):
        _run_replay(["The quick "], [delta("The slow")])
    with pytest.raises(ResumeMismatch, match="differs"):
        _run_replay(["The quick ", "brown"], [delta("The quick red fox")])
    with pytest.raises(ResumeMismatch, match="ended before"):
        _run_replay(["The quick "], [delta("The", "stop")])
    with pytest.raises(ResumeMismatch, match="plain text"):
        _run_replay(["The"], [{"choices": [{"index": 0, "delta": {"tool_calls": []}}]}])


def test_replay_of_nothing_delivered_but_the_role_passes_the_first_text_on() -> None:
    out = _run_replay([], [delta(""), delta("Hi"), delta(" there")])
    assert [chunk_text(c) for c in out] == ["Hi", " there"]
