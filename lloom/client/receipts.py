"""The client's side of receipts: check what an executor asks it to sign, then sign or refuse.

After a request the executor states its usage and asks the client to sign the channel's
running totals: the last totals the client signed on that channel (``previous``, with the
client's own signature) plus this request. The client signs only if

- it was configured with a chain id and contract (``--chain-id``/``--contract``) and the
  receipt is for exactly those: no configuration, no signature;
- the receipt names the executor it talked to (the address inside the executor's PeerId)
  and the model it asked for;
- the usage is the canonical billing count (:mod:`lloom.protocol.billing`) of what it sent
  and received, exactly (so never beyond its ``max_tokens``), and the answer was not empty;
- the totals are ``previous`` plus this usage, and ``previous`` is no more than what this
  client signed on the channel (its ledger, keyed by its own address), or carries this
  client's own valid signature (a client whose ledger was lost carries on);
- the deadline is between one minute and 31 days away.

Otherwise it refuses and says why; the executor then has nothing it can settle for it, and
the next receipt it asks starts again from the last signed totals.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from lloom.chain.receipts import Domain, Receipt, sign, signer_of
from lloom.identity import Identity
from lloom.protocol import billing, llm, openai_body
from lloom.sqlite import open_private_db

MIN_DEADLINE_SECS = 60
MAX_DEADLINE_SECS = 31 * 24 * 3600


def counted_usage(request: llm.Request, completion: str) -> llm.Usage:
    """The canonical billing count of ``request`` and the ``completion`` text received (of
    a resumed request, what it added to the text delivered before)."""
    limit = openai_body.completion_limit(request.body)
    if request.resume is None:
        completion_tokens = billing.completion_tokens(completion, limit)
    else:
        completion_tokens = billing.resumed_completion_tokens(completion, request.resume, limit)
    return llm.Usage(billing.prompt_tokens(request.kind, request.body), completion_tokens)


class Ledger:
    """The highest totals this client signed per channel (its address, executor, model,
    chain, contract), in SQLite (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self._db = open_private_db(
            path,
            "CREATE TABLE IF NOT EXISTS signed (client TEXT, executor TEXT, model TEXT, "
            "chain_id INTEGER, contract TEXT, prompt_total INTEGER, completion_total INTEGER, "
            "PRIMARY KEY (client, executor, model, chain_id, contract));",
        )
        self._lock = threading.Lock()

    @staticmethod
    def _key(client: str, executor: str, model: str, domain: Domain) -> tuple[object, ...]:
        return (client.lower(), executor.lower(), model, domain.chain_id, domain.contract.lower())

    def signed(self, client: str, executor: str, model: str, domain: Domain) -> tuple[int, int]:
        """The highest (prompt, completion) totals ``client`` signed on the channel."""
        with self._lock:
            row = self._db.execute(
                "SELECT prompt_total, completion_total FROM signed WHERE client = ? AND "
                "executor = ? AND model = ? AND chain_id = ? AND contract = ?",
                self._key(client, executor, model, domain),
            ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def raise_to(
        self, client: str, executor: str, model: str, domain: Domain, totals: tuple[int, int]
    ) -> None:
        """Note that ``client`` signed ``totals`` (kept only where higher)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO signed VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (client, executor, model, chain_id, contract) DO UPDATE SET "
                "prompt_total = MAX(prompt_total, excluded.prompt_total), "
                "completion_total = MAX(completion_total, excluded.completion_total)",
                (*self._key(client, executor, model, domain), *totals),
            )

    def close(self) -> None:
        """Close the ledger."""
        with self._lock:
            self._db.close()


class ReceiptSigner:
    """Decides, for one client identity and one chain, whether to sign what an executor asks.

    ``domain`` is the chain id and contract this client signs for; None signs nothing.
    """

    def __init__(self, identity: Identity, ledger: Ledger, domain: Domain | None) -> None:
        self.identity = identity
        self.ledger = ledger
        self.domain = domain
        #: The last refusal, for callers that report it.
        self.last_refusal: str | None = None

    def answer(
        self, executor_address: str, request: llm.Request, completion: str, end: llm.End
    ) -> llm.SignedReceipt | llm.Refusal:
        """Sign ``end.receipt`` or refuse it, with the reason."""
        reason = self._problem(executor_address, request, completion, end)
        asked = end.receipt
        if reason is not None or asked is None or self.domain is None:
            self.last_refusal = reason or "no receipt was asked for"
            return llm.Refusal(end.request_id, self.last_refusal)
        totals = (asked.prompt_total, asked.completion_total)
        receipt = Receipt(
            executor_address, self.identity.address, end.model, *totals, asked.deadline
        )
        signed = sign(self.identity, self.domain, receipt)
        self.ledger.raise_to(
            self.identity.address, executor_address, end.model, self.domain, totals
        )
        return llm.SignedReceipt(end.request_id, signed.signature)

    def _problem(
        self, executor_address: str, request: llm.Request, completion: str, end: llm.End
    ) -> str | None:
        """Why ``end.receipt`` must not be signed, or None."""
        asked = end.receipt
        if asked is None:
            return "no receipt was asked for"
        return (
            self._where_problem(executor_address, request, end, asked)
            or self._usage_problem(request, completion, end, asked)
            or self._base_problem(executor_address, end.model, asked)
        )

    def _where_problem(
        self, executor: str, request: llm.Request, end: llm.End, asked: llm.ReceiptRequest
    ) -> str | None:
        """The chain, contract, executor and model the receipt is for."""
        if self.domain is None:
            return "this client is not configured for a chain (--chain-id and --contract)"
        if (asked.chain_id, asked.contract.lower()) != (
            self.domain.chain_id,
            self.domain.contract.lower(),
        ):
            return (
                f"receipt is for chain {asked.chain_id} contract {asked.contract}; this client "
                f"signs only for chain {self.domain.chain_id} contract {self.domain.contract}"
            )
        if asked.executor.lower() != executor.lower():
            return f"receipt names executor {asked.executor}, not {executor}"
        if end.model != request.model:
            return f"receipt is for model {end.model!r}; this client asked for {request.model!r}"
        now = time.time()
        if not now + MIN_DEADLINE_SECS <= asked.deadline <= now + MAX_DEADLINE_SECS:
            return "receipt deadline out of range"
        return None

    @staticmethod
    def _usage_problem(
        request: llm.Request, completion: str, end: llm.End, asked: llm.ReceiptRequest
    ) -> str | None:
        """The usage must be the exact billing count, and the totals add it to the base."""
        if not completion:
            return "the answer was empty"
        own = counted_usage(request, completion)
        if end.usage != own:
            return (
                f"usage {end.usage.prompt_tokens}/{end.usage.completion_tokens} is not the "
                f"billing count {own.prompt_tokens}/{own.completion_tokens} (prompt/completion)"
            )
        base = asked.base
        if (asked.prompt_total, asked.completion_total) != (
            base[0] + own.prompt_tokens,
            base[1] + own.completion_tokens,
        ):
            return "running totals are not the previous totals plus this request"
        return None

    def _base_problem(self, executor: str, model: str, asked: llm.ReceiptRequest) -> str | None:
        """Whether the totals the request adds to are ones this client signed."""
        assert self.domain is not None
        mine = self.ledger.signed(self.identity.address, executor, model, self.domain)
        base, previous = asked.base, asked.previous
        if base[0] <= mine[0] and base[1] <= mine[1]:
            return None
        if previous is not None:
            earlier = Receipt(
                executor, self.identity.address, model, *base, previous.deadline, previous.signature
            )
            if signer_of(self.domain, earlier) == self.identity.address:
                return None
        return (
            f"previous totals {base[0]}/{base[1]} exceed what this client signed "
            f"({mine[0]}/{mine[1]}) and carry no signature of its own"
        )
