"""The client's side of receipts: check the usage an executor claims, then sign or refuse.

After a request the executor states its usage and asks the client to sign the channel's
running totals. The client signs only if

- the receipt names the executor it talked to (the address inside the executor's PeerId);
- the claimed usage is plausible against its own tiktoken count of what it sent and received:
  prompt <= 2 * counted + 64 and completion <= 1.5 * counted + 16 tokens (backends use other
  tokenizers and wrap prompts in chat templates, so this catches gross inflation, not a few
  tokens);
- the running totals do not exceed what this client has accepted on the channel so far plus
  this request (kept in a small SQLite ledger in the client's data dir);
- the deadline is between one minute and 31 days away.

Otherwise it refuses and says why; the executor then has nothing it can settle for it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lloom.chain.receipts import Domain, Receipt, sign
from lloom.identity import Identity
from lloom.protocol import llm
from lloom.tokens import count_chat_prompt, count_text

MIN_DEADLINE_SECS = 60
MAX_DEADLINE_SECS = 31 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far claimed usage may exceed the client's own count."""

    prompt_factor: float = 2.0
    prompt_slack: int = 64
    completion_factor: float = 1.5
    completion_slack: int = 16

    def prompt_ok(self, claimed: int, counted: int) -> bool:
        """Whether a claimed prompt count is plausible."""
        return claimed <= self.prompt_factor * counted + self.prompt_slack

    def completion_ok(self, claimed: int, counted: int) -> bool:
        """Whether a claimed completion count is plausible."""
        return claimed <= self.completion_factor * counted + self.completion_slack


def counted_prompt(request: llm.Request) -> int:
    """The client's own count of a request's prompt tokens."""
    body = request.body
    if request.kind is llm.RequestKind.CHAT:
        return count_chat_prompt(body["messages"])
    prompt = body["prompt"]
    return sum(count_text(p) for p in prompt) if isinstance(prompt, list) else count_text(prompt)


class Ledger:
    """What this client has accepted per channel (executor, model, chain, contract)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS accepted (executor TEXT, model TEXT, chain_id INTEGER, "
            "contract TEXT, prompt_total INTEGER, completion_total INTEGER, "
            "PRIMARY KEY (executor, model, chain_id, contract))"
        )
        self._lock = threading.Lock()

    def accepted(self, executor: str, model: str, domain: Domain) -> tuple[int, int]:
        """Running (prompt, completion) totals accepted so far."""
        with self._lock:
            row = self._db.execute(
                "SELECT prompt_total, completion_total FROM accepted WHERE executor = ? "
                "AND model = ? AND chain_id = ? AND contract = ?",
                (executor.lower(), model, domain.chain_id, domain.contract.lower()),
            ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def add(self, executor: str, model: str, domain: Domain, usage: llm.Usage) -> None:
        """Accept ``usage`` on the channel."""
        with self._lock:
            self._db.execute(
                "INSERT INTO accepted VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (executor, model, chain_id, contract) DO UPDATE SET "
                "prompt_total = prompt_total + excluded.prompt_total, "
                "completion_total = completion_total + excluded.completion_total",
                (
                    executor.lower(),
                    model,
                    domain.chain_id,
                    domain.contract.lower(),
                    usage.prompt_tokens,
                    usage.completion_tokens,
                ),
            )

    def close(self) -> None:
        """Close the ledger."""
        with self._lock:
            self._db.close()


class ReceiptSigner:
    """Decides, for one client identity, whether to sign what an executor asks."""

    def __init__(self, identity: Identity, ledger: Ledger, tolerance: Tolerance | None = None):
        self.identity = identity
        self.ledger = ledger
        self.tolerance = tolerance or Tolerance()
        #: The last refusal, for callers that report it.
        self.last_refusal: str | None = None

    def answer(
        self, executor_address: str, request: llm.Request, completion: str, end: llm.End
    ) -> llm.SignedReceipt | llm.Refusal:
        """Sign ``end.receipt`` or refuse it, with the reason."""
        reason = self._problem(executor_address, request, completion, end)
        if reason is not None:
            self.last_refusal = reason
            return llm.Refusal(end.request_id, reason)
        asked = end.receipt
        assert asked is not None
        domain = Domain(asked.chain_id, asked.contract)
        self.ledger.add(executor_address, end.model, domain, end.usage)
        receipt = Receipt(
            executor_address,
            self.identity.address,
            end.model,
            asked.prompt_total,
            asked.completion_total,
            asked.deadline,
        )
        return llm.SignedReceipt(end.request_id, sign(self.identity, domain, receipt).signature)

    def _problem(
        self, executor_address: str, request: llm.Request, completion: str, end: llm.End
    ) -> str | None:
        asked = end.receipt
        if asked is None:
            return "no receipt was asked for"
        if asked.executor.lower() != executor_address.lower():
            return f"receipt names executor {asked.executor}, not {executor_address}"
        inflated = self._inflated(request, completion, end.usage)
        if inflated is not None:
            return inflated
        now = time.time()
        if not now + MIN_DEADLINE_SECS <= asked.deadline <= now + MAX_DEADLINE_SECS:
            return "receipt deadline out of range"
        domain = Domain(asked.chain_id, asked.contract)
        done_p, done_c = self.ledger.accepted(executor_address, end.model, domain)
        if (
            asked.prompt_total > done_p + end.usage.prompt_tokens
            or asked.completion_total > done_c + end.usage.completion_tokens
        ):
            return (
                "running totals exceed what this client accepted: "
                f"asked {asked.prompt_total}/{asked.completion_total}, "
                f"accepted {done_p + end.usage.prompt_tokens}/"
                f"{done_c + end.usage.completion_tokens}"
            )
        return None

    def _inflated(self, request: llm.Request, completion: str, usage: llm.Usage) -> str | None:
        own_prompt, own_completion = counted_prompt(request), count_text(completion)
        if not self.tolerance.prompt_ok(usage.prompt_tokens, own_prompt):
            return (
                f"inflated usage: {usage.prompt_tokens} prompt tokens claimed, {own_prompt} counted"
            )
        if not self.tolerance.completion_ok(usage.completion_tokens, own_completion):
            return (
                f"inflated usage: {usage.completion_tokens} completion tokens claimed, "
                f"{own_completion} counted"
            )
        return None
