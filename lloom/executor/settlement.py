"""Settling stored usage on chain, durably.

Each round (every ``batch_interval_secs``, on SIGUSR1, and every second while a settlement is
in flight) the :class:`Settler`

1. advances every settlement in flight: mined and ``confirmations`` deep -> ``confirmed``;
   mined in a block that is no longer canonical (a reorg) or gone from the node -> the *same*
   signed bytes are sent again; its nonce used by another transaction -> ``replaced``, and
   its usage goes into a later batch;
2. when nothing is in flight, builds the next batch: in ``verified`` mode one ``settle`` call
   with the best client-signed receipt of every channel that has unsettled tokens (up to
   ``max_batch``); in ``unverified`` mode one ``recordUsage`` transaction per usage row, the
   design's path, with consecutive nonces.

Before anything else a round checks that the chain is still the one it settled on
(:meth:`Settler.check_chain`): the same chain id and genesis block, and contract code at the
address. A chain that was reset or replaced makes every settlement made on it ``lost``
(its usage is unsettled again, so nothing leaves a nonce gap), and so does a confirmed one
whose nonce the account no longer shows as used (a chain rolled back to an older state);
with no contract at the
address the round stops there, with :attr:`RoundReport.halted` saying why (loudly, once), and
settlement resumes, with exact totals, once a contract is there again. A pending
transaction whose nonce is above the account's next one can never be mined; it is ``lost``
too.

Every transaction is signed once and stored (raw bytes and hash, in the same SQLite file as
the usage) *before* it is sent, so a SIGKILL at any point loses nothing: the next start
resumes it. A timeout or a "nonce too low" answer is resolved by looking the transaction up
by hash, never by signing a new one. Nothing is counted twice: the contract settles running
totals per channel, and a replayed or older receipt settles nothing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from eth_typing import HexStr
from web3 import Web3
from web3.exceptions import TransactionNotFound

from lloom.chain.contract import accounting
from lloom.chain.receipts import Receipt
from lloom.chain.tx import fees, sign_tx
from lloom.executor.usage import UsageStore
from lloom.identity import Identity

logger = logging.getLogger(__name__)

PENDING, CONFIRMED, REPLACED, FAILED = "pending", "confirmed", "replaced", "failed"
#: A settlement made on a chain that was since reset or replaced.
LOST = "lost"
#: Receipts closer than this to their deadline are not sent (they could expire in the pool).
DEADLINE_MARGIN_SECS = 120


@dataclass
class RoundReport:
    """What a settlement round did, for logs and the executor's stdout."""

    sent: list[tuple[str, int]] = field(default_factory=list)  # (tx hash, records)
    confirmed: list[tuple[str, int, int]] = field(default_factory=list)  # (hash, block, records)
    resent: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    #: Why settlement cannot proceed (no contract at the address), if it cannot.
    halted: str | None = None

    def lines(self) -> list[str]:
        """One stdout line per event."""
        out = [f"settlement sent tx={h} records={n}" for h, n in self.sent]
        out += [f"settlement resent tx={h}" for h in self.resent]
        out += [f"settlement replaced tx={h}" for h in self.replaced]
        out += [f"settlement failed tx={h}" for h in self.failed]
        out += [f"settlement lost tx={h} (chain reset; usage unsettled again)" for h in self.lost]
        out += [f"settlement confirmed tx={h} block={b} records={n}" for h, b, n in self.confirmed]
        return out


class Settler:
    """Settles one executor's usage; all methods are synchronous (run them in a thread)."""

    def __init__(
        self,
        store: UsageStore,
        identity: Identity,
        w3: Web3,
        contract_address: str,
        *,
        mode: str = "verified",
        confirmations: int = 1,
        max_batch: int = 100,
    ) -> None:
        self.store = store
        self.identity = identity
        self.address = Web3.to_checksum_address(identity.address)
        self.w3 = w3
        self.contract = accounting(w3, contract_address)
        self.mode = mode
        self.confirmations = confirmations
        self.max_batch = max_batch

    # --- the round ------------------------------------------------------------------------

    def in_flight(self) -> int:
        """Settlements sent (or signed) and not yet final."""
        rows = self.store.execute("SELECT COUNT(*) FROM settlements WHERE status = ?", (PENDING,))
        return int(rows[0][0])

    def round(self) -> RoundReport:
        """Check the chain, advance settlements in flight, start a new batch when none is.

        While there is no contract to settle on, only the check runs and ``halted`` says why.
        """
        report = RoundReport()
        report.halted = self.check_chain(report)
        if report.halted is not None:
            return report
        for row in self.store.execute(
            "SELECT id, tx_hash, raw_tx, nonce, items FROM settlements "
            "WHERE status = ? ORDER BY nonce",
            (PENDING,),
        ):
            self._advance(row, report)
        if self.in_flight() == 0:
            self._start_batch(report)
        return report

    # --- the chain itself -------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        rows = self.store.execute("SELECT value FROM chain_meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def check_chain(self, report: RoundReport) -> str | None:
        """Make sure the chain still holds what was settled on it (see the module doc);
        return why settlement cannot proceed, or None."""
        chain = f"{self.w3.eth.chain_id}:{self.w3.eth.get_block(0)['hash'].to_0x_hex()}"
        known = self._meta("chain")
        if known is not None and known != chain:
            self._lose(
                "SELECT id, tx_hash FROM settlements WHERE status IN (?, ?)",
                (PENDING, CONFIRMED),
                report,
            )
            logger.error(
                "the chain was reset or replaced (was %s, now %s): every settlement made on "
                "it is lost and its usage will be settled again",
                known,
                chain,
            )
        if known != chain:
            with self.store.transaction() as db:
                db.execute(
                    "INSERT INTO chain_meta VALUES ('chain', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (chain,),
                )
        if not self.w3.eth.get_code(self.contract.address):
            return (
                f"no contract at {self.contract.address} on chain {self.w3.eth.chain_id}: "
                "was the chain reset? Settlement waits until the contract is deployed there "
                "again; usage is kept"
            )
        # A chain rolled back (a node restarted from an older state, a deep reorg): a
        # confirmed settlement whose nonce the account has not used is no longer there.
        mined = self.w3.eth.get_transaction_count(self.address, "latest")
        before = len(report.lost)
        self._lose(
            "SELECT id, tx_hash FROM settlements WHERE status = ? AND nonce >= ?",
            (CONFIRMED, mined),
            report,
        )
        if len(report.lost) > before:
            logger.error(
                "the chain no longer holds %d confirmed settlement(s) (the account's nonce is "
                "%d): their usage will be settled again",
                len(report.lost) - before,
                mined,
            )
        # A pending transaction above the account's next nonce can never be mined.
        next_nonce = self.w3.eth.get_transaction_count(self.address, "pending")
        self._lose(
            "SELECT id, tx_hash FROM settlements WHERE status = ? AND nonce > ?",
            (PENDING, next_nonce),
            report,
        )
        return None

    def _lose(self, query: str, params: tuple[Any, ...], report: RoundReport) -> None:
        rows = self.store.execute(query, params)
        for sid, tx_hash in rows:
            with self.store.transaction() as db:
                db.execute("UPDATE settlements SET status = ? WHERE id = ?", (LOST, sid))
                db.execute("UPDATE usage SET settlement_id = NULL WHERE settlement_id = ?", (sid,))
            report.lost.append(tx_hash)

    # --- settlements in flight ------------------------------------------------------------

    def _advance(self, row: tuple[Any, ...], report: RoundReport) -> None:
        sid, tx_hash, raw, nonce, items = row
        try:
            receipt = self.w3.eth.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            receipt = None
        if receipt is not None:
            block = self.w3.eth.get_block(receipt["blockNumber"])
            if block["hash"] != receipt["blockHash"]:
                receipt = None  # mined in a block a reorg replaced
        if receipt is None:
            self._not_mined(sid, tx_hash, raw, nonce, report)
            return
        if receipt["status"] != 1:
            self._set(sid, FAILED)
            report.failed.append(tx_hash)
            logger.error("settlement %s reverted; its usage goes into a later batch", tx_hash)
            return
        depth = self.w3.eth.block_number - receipt["blockNumber"] + 1
        if depth >= self.confirmations:
            number = int(receipt["blockNumber"])
            with self.store.transaction() as db:
                db.execute(
                    "UPDATE settlements SET status = ?, block_number = ?, block_hash = ? "
                    "WHERE id = ?",
                    (CONFIRMED, number, receipt["blockHash"].to_0x_hex(), sid),
                )
            report.confirmed.append((tx_hash, number, len(json.loads(items))))

    def _not_mined(
        self, sid: int, tx_hash: str, raw: bytes, nonce: int, report: RoundReport
    ) -> None:
        try:
            self.w3.eth.get_transaction(HexStr(tx_hash))
            return  # waiting in the pool
        except TransactionNotFound:
            pass
        if self.w3.eth.get_transaction_count(self.address, "latest") > nonce:
            # Our nonce went to another transaction: this one can never be mined.
            self._set(sid, REPLACED)
            report.replaced.append(tx_hash)
            return
        self._send(raw, tx_hash)
        report.resent.append(tx_hash)

    def _send(self, raw: bytes, tx_hash: str) -> None:
        """Send signed bytes; answers meaning "already there" are fine (checked by hash)."""
        try:
            self.w3.eth.send_raw_transaction(raw)
        except ValueError as exc:  # JSON-RPC errors: nonce too low, already known, ...
            logger.info("node answered %s for %s; will check by hash", exc, tx_hash)

    def _set(self, sid: int, status: str) -> None:
        """Mark a settlement final; a failed or replaced one frees its usage rows."""
        with self.store.transaction() as db:
            db.execute("UPDATE settlements SET status = ? WHERE id = ?", (status, sid))
            if status in (FAILED, REPLACED):
                db.execute("UPDATE usage SET settlement_id = NULL WHERE settlement_id = ?", (sid,))

    # --- new batches ----------------------------------------------------------------------

    def _next_nonce(self) -> int:
        rows = self.store.execute(
            "SELECT MAX(nonce) FROM settlements WHERE status IN (?, ?)", (PENDING, CONFIRMED)
        )
        stored = -1 if rows[0][0] is None else int(rows[0][0])
        return max(stored + 1, self.w3.eth.get_transaction_count(self.address, "pending"))

    def _start_batch(self, report: RoundReport) -> None:
        txs = self._verified_batch() if self.mode == "verified" else self._unverified_batch()
        for tx_hash, raw, records in txs:
            self._send(raw, tx_hash)
            report.sent.append((tx_hash, records))

    def settled_totals(self) -> dict[tuple[str, str], int]:
        """Per channel, the running total already in a confirmed or pending settlement."""
        best: dict[tuple[str, str], int] = {}
        for (items,) in self.store.execute(
            "SELECT items FROM settlements WHERE mode = 'verified' AND status IN (?, ?)",
            (PENDING, CONFIRMED),
        ):
            for item in json.loads(items):
                key = (item["client"], item["model"])
                best[key] = max(best.get(key, 0), int(item["total"]))
        return best

    def _verified_batch(self) -> list[tuple[str, bytes, int]]:
        done = self.settled_totals()
        horizon = int(time.time()) + DEADLINE_MARGIN_SECS
        batch: list[Receipt] = []
        for client, model, prompt, completion, deadline, signature in self.store.execute(
            "SELECT client_address, model, prompt_total, completion_total, deadline, signature "
            "FROM receipts ORDER BY client_address, model"
        ):
            if prompt + completion > done.get((client, model), 0) and deadline > horizon:
                batch.append(
                    Receipt(
                        self.identity.address,
                        client,
                        model,
                        prompt,
                        completion,
                        deadline,
                        bytes(signature),
                    )
                )
            if len(batch) >= self.max_batch:
                break
        if not batch:
            return []
        call = self.contract.functions.settle([r.contract_args() for r in batch])
        items = [{"client": r.client, "model": r.model, "total": r.total} for r in batch]
        return [self._sign_and_store(call, items, self._next_nonce())]

    def _unverified_batch(self) -> list[tuple[str, bytes, int]]:
        rows = self.store.execute(
            "SELECT request_id, client_address, model, prompt_tokens + completion_tokens "
            "FROM usage WHERE settlement_id IS NULL AND prompt_tokens + completion_tokens > 0 "
            "AND state != 'open' ORDER BY created_at LIMIT ?",
            (self.max_batch,),
        )
        out = []
        nonce = self._next_nonce() if rows else 0
        for request_id, client, model, total in rows:
            call = self.contract.functions.recordUsage(
                Web3.to_checksum_address(client), model, total
            )
            out.append(self._sign_and_store(call, [request_id], nonce, request_ids=[request_id]))
            nonce += 1
        return out

    def _sign_and_store(
        self, call: Any, items: list[Any], nonce: int, request_ids: list[str] | None = None
    ) -> tuple[str, bytes, int]:
        tx: dict[str, Any] = {
            "from": self.address,
            "nonce": nonce,
            "chainId": self.w3.eth.chain_id,
            **fees(self.w3),
        }
        tx["gas"] = int(call.estimate_gas({"from": self.address}) * 1.25) + 10_000
        built = call.build_transaction(tx)
        raw, tx_hash = sign_tx(self.identity, built)
        with self.store.transaction() as db:
            # The same batch with the same nonce signs to the same bytes: after a chain reset
            # a lost settlement comes back as itself.
            db.execute(
                "INSERT INTO settlements (mode, nonce, tx_hash, raw_tx, status, items, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tx_hash) DO UPDATE SET "
                "status = excluded.status, created_at = excluded.created_at, "
                "block_number = NULL, block_hash = NULL WHERE settlements.status = ?",
                (self.mode, nonce, tx_hash, raw, PENDING, json.dumps(items), time.time(), LOST),
            )
            (sid,) = db.execute(
                "SELECT id FROM settlements WHERE tx_hash = ? AND status = ?", (tx_hash, PENDING)
            ).fetchone()
            for request_id in request_ids or []:
                db.execute(
                    "UPDATE usage SET settlement_id = ? WHERE request_id = ?", (sid, request_id)
                )
        return tx_hash, raw, len(items)
