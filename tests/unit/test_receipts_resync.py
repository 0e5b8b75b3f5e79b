"""Receipts between a real handler (executor) and a real signer (client), in memory.

What the issue "Among strangers" asks of receipts: one refusal, a lost client ledger or two
requests whose ends cross never stop a channel; the client signs only for its chain and
contract, the model it asked for, the exact billing count, never an empty answer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from lloom.chain.receipts import Domain
from lloom.client.receipts import Ledger, ReceiptSigner, counted_usage
from lloom.client.session import _exchange
from lloom.executor.handler import Limits, RequestHandler
from lloom.executor.receipts import ReceiptBook
from lloom.executor.usage import AsyncUsageStore, UsageStore
from lloom.identity import Identity
from lloom.node.streams import FramedStream
from lloom.protocol import billing, llm
from tests.unit.test_handler import FakeBackend, MemoryNetStream

DOMAIN = Domain(31337, "0x" + "5f" * 20)
EXECUTOR = Identity.generate()
CLIENT = Identity.generate()


class Replies(FakeBackend):
    """Answers each request with the next reply of a list (an empty one included)."""

    def __init__(self, replies: list[str], delays: list[float] | None = None) -> None:
        super().__init__([])
        self.replies, self.delays = list(replies), list(delays or [])

    async def chat_stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        reply = self.replies.pop(0)
        await trio.sleep(self.delays.pop(0) if self.delays else 0)
        for word in reply.split(" ") if reply else []:
            yield {"choices": [{"delta": {"content": word + " "}}]}


def chat(prompt: str, model: str = "m") -> llm.Request:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    return llm.Request(llm.RequestKind.CHAT, body)


class Net:
    """An executor (handler + store + book) and a client (signer + ledger)."""

    def __init__(self, tmp_path: Path, backend: FakeBackend) -> None:
        self.tmp = tmp_path
        self.store = UsageStore(tmp_path / "usage.sqlite3")
        book = ReceiptBook(self.store, EXECUTOR.address, DOMAIN)
        self.handler = RequestHandler({"m": backend}, AsyncUsageStore(self.store), Limits(), book)
        self.ledger = Ledger(tmp_path / "ledger.sqlite3")
        self.signer = ReceiptSigner(CLIENT, self.ledger, DOMAIN)

    def lose_ledger(self) -> None:
        self.ledger.close()
        (self.tmp / "ledger.sqlite3").unlink()
        self.ledger = Ledger(self.tmp / "ledger.sqlite3")
        self.signer = ReceiptSigner(CLIENT, self.ledger, DOMAIN)

    async def ask(self, request: llm.Request) -> llm.End:
        a, b = trio.testing.memory_stream_pair()
        server = FramedStream(MemoryNetStream(a), read_timeout=5)  # type: ignore[arg-type]
        client = FramedStream(MemoryNetStream(b), read_timeout=5)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handler.handle, server, CLIENT.address)
            result = await _exchange(client, request, EXECUTOR.peer_id, None, self.signer)
            await b.send_eof()
        return result.end

    def statuses(self) -> list[str]:
        rows = self.store.execute("SELECT receipt FROM usage ORDER BY created_at")
        return [r[0] for r in rows]

    def signed_total(self) -> tuple[int, int]:
        rows = self.store.execute("SELECT prompt_total, completion_total FROM receipts")
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    def billed(self, only: str = "signed") -> tuple[int, int]:
        rows = self.store.execute(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM usage WHERE receipt = ?",
            (only,),
        )
        return int(rows[0][0]), int(rows[0][1])

    def close(self) -> None:
        self.store.close()
        self.ledger.close()


async def test_a_refusal_does_not_stop_the_channel(tmp_path: Path) -> None:
    net = Net(tmp_path, Replies(["one two", "", "three", "four five six"]))
    await net.ask(chat("a"))
    await net.ask(chat("b"))  # an empty answer: refused
    assert net.signer.last_refusal == "the answer was empty"
    await net.ask(chat("c"))
    await net.ask(chat("d"))
    assert net.statuses() == ["signed", "refused: the answer was empty", "signed", "signed"]
    assert net.signed_total() == net.billed("signed")  # exact: unsigned usage never entered
    net.close()


async def test_a_client_that_lost_its_ledger_carries_on(tmp_path: Path) -> None:
    net = Net(tmp_path, Replies(["one", "two", "three"]))
    await net.ask(chat("a"))
    await net.ask(chat("b"))
    net.lose_ledger()
    await net.ask(chat("c"))  # the executor's base carries the client's own signature
    assert net.statuses() == ["signed"] * 3
    assert net.signed_total() == net.billed("signed")
    assert net.ledger.signed(CLIENT.address, EXECUTOR.address, "m", DOMAIN) == net.signed_total()
    net.close()


async def test_ends_that_cross_still_sign_every_request(tmp_path: Path) -> None:
    # The first request's answer is slower: its end comes after the second's.
    net = Net(tmp_path, Replies(["slow answer", "fast"], delays=[0.2, 0.0]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.ask, chat("first"))
        await trio.sleep(0.05)
        nursery.start_soon(net.ask, chat("second"))
    assert net.statuses() == ["signed", "signed"]
    assert net.signed_total() == net.billed("signed")
    net.close()


async def test_many_concurrent_requests_on_one_channel(tmp_path: Path) -> None:
    net = Net(tmp_path, Replies([f"answer {i}" for i in range(8)]))
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(net.ask, chat(f"q{i}"))
    assert net.statuses() == ["signed"] * 8
    assert net.signed_total() == net.billed("signed")
    net.close()


def end_for(request: llm.Request, text: str, **changes: Any) -> tuple[llm.End, llm.ReceiptRequest]:
    usage = counted_usage(request, text)
    asked = llm.ReceiptRequest(
        changes.pop("executor", EXECUTOR.address),
        changes.pop("chain_id", DOMAIN.chain_id),
        changes.pop("contract", DOMAIN.contract),
        changes.pop("prompt_total", usage.prompt_tokens),
        changes.pop("completion_total", usage.completion_tokens),
        changes.pop("deadline", int(time.time()) + 7 * 86400),
        changes.pop("previous", None),
    )
    end = llm.End(
        "r", changes.pop("model", request.model), changes.pop("usage", usage), None, asked
    )
    return end, asked


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"model": "gpt-4o"}, "this client asked for 'm'"),
        ({"chain_id": 1}, "signs only for chain 31337"),
        ({"contract": "0x" + "66" * 20}, "signs only for chain"),
        ({"executor": "0x" + "77" * 20}, "receipt names executor"),
        ({"usage": llm.Usage(1, 1)}, "is not the billing count"),
        ({"prompt_total": 10**6}, "previous totals plus this request"),
        ({"deadline": 5}, "deadline out of range"),
    ],
)
async def test_what_a_rogue_executor_asks_is_refused(
    tmp_path: Path, changes: dict[str, Any], reason: str
) -> None:
    request = chat("hello")
    end, _ = end_for(request, "hi there", **changes)
    signer = ReceiptSigner(CLIENT, Ledger(tmp_path / "l.sqlite3"), DOMAIN)
    answer = signer.answer(EXECUTOR.address, request, "hi there", end)
    assert isinstance(answer, llm.Refusal) and reason in answer.reason
    signer.ledger.close()


async def test_a_base_above_the_ledger_needs_the_clients_own_signature(tmp_path: Path) -> None:
    request = chat("hello")
    forged = llm.SignedTotals(500, 500, int(time.time()) + 86400, b"\x01" * 65)
    end, asked = end_for(request, "hi there", previous=forged)
    end = llm.End(
        "r",
        "m",
        end.usage,
        None,
        llm.ReceiptRequest(
            asked.executor,
            asked.chain_id,
            asked.contract,
            500 + end.usage.prompt_tokens,
            500 + end.usage.completion_tokens,
            asked.deadline,
            forged,
        ),
    )
    signer = ReceiptSigner(CLIENT, Ledger(tmp_path / "l.sqlite3"), DOMAIN)
    answer = signer.answer(EXECUTOR.address, request, "hi there", end)
    assert isinstance(answer, llm.Refusal) and "no signature of its own" in answer.reason
    signer.ledger.close()


async def test_no_chain_configured_signs_nothing(tmp_path: Path) -> None:
    request = chat("hello")
    end, _ = end_for(request, "hi there")
    signer = ReceiptSigner(CLIENT, Ledger(tmp_path / "l.sqlite3"), None)
    answer = signer.answer(EXECUTOR.address, request, "hi there", end)
    assert isinstance(answer, llm.Refusal) and "not configured for a chain" in answer.reason
    signer.ledger.close()


async def test_never_beyond_max_tokens_nor_for_an_empty_answer(tmp_path: Path) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    request = llm.Request(llm.RequestKind.CHAT, body)
    text = "a long answer " * 40
    uncapped = llm.Usage(billing.prompt_tokens(request.kind, body), billing.count(text))
    end, _ = end_for(
        request,
        text,
        usage=uncapped,
        prompt_total=uncapped.prompt_tokens,
        completion_total=uncapped.completion_tokens,
    )
    signer = ReceiptSigner(CLIENT, Ledger(tmp_path / "l.sqlite3"), DOMAIN)
    answer = signer.answer(EXECUTOR.address, request, text, end)
    assert isinstance(answer, llm.Refusal) and "not the billing count" in answer.reason
    capped, _ = end_for(request, text)
    assert capped.usage.completion_tokens == 1  # what the client signs at most
    empty, _ = end_for(request, "")
    answer = signer.answer(EXECUTOR.address, request, "", empty)
    assert isinstance(answer, llm.Refusal) and answer.reason == "the answer was empty"
    signer.ledger.close()


async def test_a_resumed_request_is_signed_for_what_it_added(tmp_path: Path) -> None:
    """Both sides bill a resumed answer as the text it added to the delivered part, so the
    receipt of the executor that continued is signed."""
    net = Net(tmp_path, Replies(["one two three four"]))
    resumed = llm.Request(chat("count").kind, chat("count").body, resume="one two ")
    end = await net.ask(resumed)
    assert net.statuses() == ["signed"]
    added = billing.count("one two three four ") - billing.count("one two ")
    assert end.usage.completion_tokens == added
    net.close()
