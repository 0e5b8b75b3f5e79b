"""The executor's side of client-signed receipts.

After each request the executor asks the client to sign the channel's running totals
(:class:`~lloom.protocol.llm.ReceiptRequest` in the ``end`` message): the last totals the
client signed, plus this request. Refused or missing receipts never enter them, so one
refusal does not stop a channel. A signature is checked
(it must recover to the client and cover exactly the totals asked) and the best one per
channel is kept for settlement. Each usage row notes what became of its receipt:
``signed``, ``refused: <reason>`` or ``missing``.
"""

from __future__ import annotations

import logging
import time

import trio

from lloom.chain.receipts import Domain, Receipt, signer_of
from lloom.executor.usage import UsageRecord, UsageStore
from lloom.protocol import llm

logger = logging.getLogger(__name__)

#: How long a receipt stays settleable.
DEFAULT_DEADLINE_SECS = 7 * 24 * 3600


class ReceiptBook:
    """Asks for, checks and keeps receipts; counts clients' unsigned requests."""

    def __init__(
        self,
        store: UsageStore,
        executor_address: str,
        domain: Domain | None = None,
        *,
        max_unsigned: int | None = None,
        deadline_secs: int = DEFAULT_DEADLINE_SECS,
    ) -> None:
        self.store = store
        self.executor = executor_address
        self.domain = domain
        self.max_unsigned = max_unsigned
        self.deadline_secs = deadline_secs

    async def request_for(self, rec: UsageRecord) -> llm.ReceiptRequest | None:
        """The receipt to ask for ``rec``, or None while the chain is unknown: the last
        totals the client signed on the channel (sent along, with its signature, so a client
        that lost its own record can check them) plus ``rec``'s usage."""
        if self.domain is None:
            return None
        rows = await trio.to_thread.run_sync(
            self.store.execute,
            "SELECT prompt_total, completion_total, deadline, signature FROM receipts "
            "WHERE client_address = ? AND model = ?",
            (rec.client_address, rec.model),
        )
        previous = None
        if rows:
            prompt, completion, deadline, signature = rows[0]
            previous = llm.SignedTotals(prompt, completion, deadline, bytes(signature))
        base = (0, 0) if previous is None else (previous.prompt_total, previous.completion_total)
        return llm.ReceiptRequest(
            self.executor,
            self.domain.chain_id,
            self.domain.contract,
            base[0] + rec.prompt_tokens,
            base[1] + rec.completion_tokens,
            int(time.time()) + self.deadline_secs,
            previous,
        )

    async def unsigned(self, client: str) -> int:
        """Requests of ``client`` whose receipt was refused or never came, since its last
        signed one (a client that signs again is served again)."""
        rows = await trio.to_thread.run_sync(
            self.store.execute,
            "SELECT COUNT(*) FROM usage WHERE client_address = ? AND receipt IS NOT NULL "
            "AND receipt != 'signed' AND created_at >= (SELECT COALESCE(MAX(created_at), 0) "
            "FROM usage WHERE client_address = ? AND receipt = 'signed')",
            (client, client),
        )
        return int(rows[0][0])

    async def blocked(self, client: str) -> bool:
        """Whether ``client`` has more unsigned usage outstanding than allowed."""
        if self.max_unsigned is None:
            return False
        return await self.unsigned(client) > self.max_unsigned

    async def settle_answer(
        self, rec: UsageRecord, asked: llm.ReceiptRequest, answer: llm.Message | None
    ) -> str:
        """Record the client's answer to ``asked``; return the row's receipt status."""
        if isinstance(answer, llm.SignedReceipt) and answer.request_id == rec.request_id:
            status = self._check(rec, asked, answer.signature)
        elif isinstance(answer, llm.Refusal):
            status = f"refused: {answer.reason[:200]}"
        else:
            status = "missing"
        if status != "signed":
            logger.warning(
                "request %s of %s: receipt %s", rec.request_id, rec.client_address, status
            )
        await trio.to_thread.run_sync(self._store, rec, asked, answer, status)
        return status

    def _check(self, rec: UsageRecord, asked: llm.ReceiptRequest, signature: bytes) -> str:
        assert self.domain is not None
        receipt = self._receipt(rec, asked, signature)
        if signer_of(self.domain, receipt) != rec.client_address:
            return "refused: bad signature"
        return "signed"

    def _receipt(self, rec: UsageRecord, asked: llm.ReceiptRequest, signature: bytes) -> Receipt:
        return Receipt(
            self.executor,
            rec.client_address,
            rec.model,
            asked.prompt_total,
            asked.completion_total,
            asked.deadline,
            signature,
        )

    def _store(
        self,
        rec: UsageRecord,
        asked: llm.ReceiptRequest,
        answer: llm.Message | None,
        status: str,
    ) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE usage SET receipt = ? WHERE request_id = ?", (status, rec.request_id)
            )
            if status != "signed" or not isinstance(answer, llm.SignedReceipt):
                return
            # Keep the receipt with the highest running total per channel.
            db.execute(
                "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (client_address, model) DO UPDATE SET "
                "prompt_total = excluded.prompt_total, "
                "completion_total = excluded.completion_total, "
                "deadline = excluded.deadline, signature = excluded.signature "
                "WHERE excluded.prompt_total + excluded.completion_total "
                "> receipts.prompt_total + receipts.completion_total",
                (
                    rec.client_address,
                    rec.model,
                    asked.prompt_total,
                    asked.completion_total,
                    asked.deadline,
                    answer.signature,
                ),
            )
