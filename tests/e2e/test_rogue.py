"""A rogue executor (a test double) among honest ones: it claims the model, answers junk and
asks to be paid for another model. The client never signs for it, and ranks it below an
honest executor from its first misdeed on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from lloom.chain.receipts import Domain
from lloom.client.discovery import Choice
from lloom.client.network import NetworkClient
from lloom.client.observed import ExecutorBook
from lloom.client.receipts import Ledger, ReceiptSigner
from lloom.client.session import request_with_failover
from lloom.identity import Identity
from tests.e2e.test_failover import chat, client_node, info
from tests.support.network import start_executor, start_mock, start_validator
from tests.support.procs import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DOMAIN = Domain(31337, "0x" + "5f" * 20)


async def test_a_rogue_is_refused_and_ranked_last(procs: Processes, tmp_path: Path) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    boot = v.listen[0]
    _, honest, _ = start_executor(procs, "honest", boot, url, ["mock-a"])
    rogue_proc = procs.start(
        "rogue",
        [
            sys.executable,
            "-m",
            "tests.support.rogue_executor",
            "--bootstrap",
            boot,
            "--model",
            "mock-a",
            "--chain-id",
            str(DOMAIN.chain_id),
            "--contract",
            DOMAIN.contract,
        ],
    )
    rogue = rogue_proc.wait_ready()
    book = ExecutorBook(tmp_path / "executors.sqlite3")
    signer = ReceiptSigner(Identity.generate(), Ledger(tmp_path / "ledger.sqlite3"), DOMAIN)
    async with client_node(boot) as node:
        with trio.fail_after(60):
            # The rogue first (as if it had been ranked first): it answers junk.
            first = await request_with_failover(
                node, [info(rogue), info(honest)], chat(), signer=signer, book=book
            )
            assert str(first.executor) == rogue.peer_id and first.receipt_refused
            assert signer.last_refusal is not None and "gpt-4o" in signer.last_refusal
            # From now on it goes last, whatever the DHT or its announcements say.
            order = await NetworkClient(node, None, choice=Choice(book=book)).executors("mock-a")
            assert [str(i.peer_id) for i in order] == [honest.peer_id, rogue.peer_id]
            for _ in range(3):
                result = await request_with_failover(node, order, chat(), book=book)
                assert str(result.executor) == honest.peer_id
    line = rogue_proc.wait_for_line(lambda s: s.startswith("rogue "), 10)
    assert line.startswith("rogue refusal")
    assert not [s for s in rogue_proc.lines if s.startswith("rogue receipt")]
    signer.ledger.close()
    book.save()
    seen = ExecutorBook(tmp_path / "executors.sqlite3").get(rogue.peer_id)
    assert seen is not None and seen.refusals == 1 and seen.successes == 0
