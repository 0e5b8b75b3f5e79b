"""The design's end-to-end test (Step 10), with verified receipts, and accounting faults."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from web3 import Web3

from lloom.chain.contract import accounting, connect
from lloom.identity import Identity
from lloom.protocol import billing
from tests.support.anvil import ANVIL_CHAIN_ID, KEYS, start_anvil
from tests.support.network import (
    eventually,
    start_executor,
    start_gateway,
    start_mock,
    start_validator,
)
from tests.support.procs import Proc, Processes, script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

DEPLOYER, EXECUTOR_KEY, CLIENT_KEY = KEYS[0], KEYS[1], KEYS[2]
EXECUTOR = Identity.from_hex(EXECUTOR_KEY).address
CLIENT = Identity.from_hex(CLIENT_KEY).address


def deploy(procs: Processes, rpc: str) -> str:
    result = procs.run(
        "deploy",
        [script("lloom"), "chain", "deploy", "--rpc-url", rpc, "--private-key", DEPLOYER, "--json"],
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert Web3.is_address(doc["address"])
    return str(doc["address"])


def chain_section(rpc: str, contract: str, mode: str = "verified", confirmations: int = 1) -> str:
    return (
        f'[chain]\nrpc_url = "{rpc}"\ncontract_address = "{contract}"\n'
        f'batch_interval_secs = 3600\nconfirmations = {confirmations}\nmode = "{mode}"\n'
    )


def ask(
    procs: Processes,
    boot: str,
    prompt: str,
    key: str = CLIENT_KEY,
    *flags: str,
    contract: str | None = None,
) -> Any:
    """``lloom-client`` with ``prompt``; signing receipts for ``contract`` on anvil's chain."""
    chain = ["--chain-id", str(ANVIL_CHAIN_ID), "--contract", contract] if contract else []
    return procs.run(
        "client",
        [
            script("lloom-client"),
            "--private-key",
            key,
            *chain,
            "--bootstrap-nodes",
            boot,
            "--model",
            "mock-a",
            "--prompt",
            prompt,
            *flags,
        ],
    )


def billed(prompt: str) -> tuple[int, int]:
    """The billing count of ``lloom-client --prompt PROMPT`` answered by the mock backend
    (which replies ``Echo: PROMPT``)."""
    body = {"messages": [{"role": "user", "content": prompt}]}
    return billing.chat_prompt_tokens(body), billing.count("Echo: " + prompt)


def settle_now(executor: Proc, timeout: float = 60) -> str:
    assert executor.popen is not None
    executor.popen.send_signal(signal.SIGUSR1)
    return executor.wait_for_line(lambda s: s.startswith("settlement confirmed"), timeout)


def chain_usage(rpc: str, contract: str) -> list[dict[str, Any]]:
    c = accounting(connect(rpc), contract)
    return [dict(e["args"]) for e in c.events.UsageSettled().get_logs(from_block=0)]


def unverified_usage(rpc: str, contract: str) -> list[dict[str, Any]]:
    c = accounting(connect(rpc), contract)
    return [dict(e["args"]) for e in c.events.UsageRecorded().get_logs(from_block=0)]


def rows(data_dir: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data_dir / "usage.sqlite3")
    try:
        return db.execute("SELECT prompt_tokens, completion_tokens, receipt FROM usage").fetchall()
    finally:
        db.close()


def test_design_end_to_end_with_verified_receipts(procs: Processes) -> None:
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    ex_proc, _, data_dir = start_executor(
        procs,
        "exec",
        v.listen[0],
        url,
        ["mock-a"],
        extra=chain_section(rpc, contract),
        key=EXECUTOR_KEY,
    )
    first = ask(procs, v.listen[0], "hello chain", contract=contract)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "Echo: hello chain\n"
    second = ask(procs, v.listen[0], "and again please", contract=contract)
    assert second.returncode == 0, second.stderr
    one, two = billed("hello chain"), billed("and again please")
    eventually(lambda: rows(data_dir) == [(*one, "signed"), (*two, "signed")], what="receipts")
    both = sum(one) + sum(two)

    settle_now(ex_proc)
    events = chain_usage(rpc, contract)
    # One receipt (the running total) settles both requests.
    assert [(e["executor"], e["client"], e["model"], e["tokenCount"]) for e in events] == [
        (EXECUTOR, CLIENT, "mock-a", both)
    ]
    c = accounting(connect(rpc), contract)
    assert c.functions.verifiedTokensByExecutor(EXECUTOR).call() == both
    assert c.functions.totalTokensByExecutor(EXECUTOR).call() == 0  # the unverified kind

    table = procs.run(
        "usage", [script("lloom"), "usage", "--rpc-url", rpc, "--contract", contract, "--json"]
    )
    assert table.returncode == 0, table.stderr
    assert json.loads(table.stdout)["total"] == both

    # A third request later settles only what is new.
    assert ask(procs, v.listen[0], "three", contract=contract).returncode == 0
    settle_now(ex_proc)
    assert [e["tokenCount"] for e in chain_usage(rpc, contract)] == [both, sum(billed("three"))]


def test_unverified_mode_records_each_request(procs: Processes) -> None:
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    ex_proc, _, _ = start_executor(
        procs,
        "exec",
        v.listen[0],
        url,
        ["mock-a"],
        extra=chain_section(rpc, contract, mode="unverified"),
        key=EXECUTOR_KEY,
    )
    for prompt in ("one", "two words"):
        assert ask(procs, v.listen[0], prompt, contract=contract).returncode == 0
    settle_now(ex_proc)
    ex_proc.wait_for_line(lambda s: s.startswith("settlement confirmed"), 30)
    events = unverified_usage(rpc, contract)
    expected = sorted(sum(billed(p)) for p in ("one", "two words"))
    assert sorted(e["tokenCount"] for e in events) == expected
    assert chain_usage(rpc, contract) == []  # nothing verified
    usage = [script("lloom"), "usage", "--rpc-url", rpc, "--contract", contract, "--json"]
    verified = json.loads(procs.run("usage", usage).stdout)
    assert verified["total"] == 0 and verified["events"] == []
    both = json.loads(procs.run("usage-all", [*usage, "--include-unverified"]).stdout)
    assert sorted(e["tokens"] for e in both["events"]) == expected
    assert {e["kind"] for e in both["events"]} == {"unverified"}
    assert both["unverified_total"] == sum(expected) and both["total"] == 0
    assert {e["client"] for e in events} == {CLIENT}


def test_a_backend_that_inflates_its_usage_bills_nothing_more(procs: Processes) -> None:
    """The billed count is the canonical one both sides compute; what the backend claims
    is reported beside it and bills nothing."""
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    _, url = start_mock(procs, "inflating-mock", "--inflate-usage", "50")
    _, v = start_validator(procs)
    ex_proc, _, data_dir = start_executor(
        procs,
        "exec",
        v.listen[0],
        url,
        ["mock-a"],
        extra=chain_section(rpc, contract),
        key=EXECUTOR_KEY,
    )
    prompt = "how many tokens is this"
    result = ask(procs, v.listen[0], prompt, CLIENT_KEY, "--json", contract=contract)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    expected = billed(prompt)
    assert (doc["usage"]["prompt_tokens"], doc["usage"]["completion_tokens"]) == expected
    assert doc["backend_usage"]["completion_tokens"] > 10 * expected[1]
    eventually(lambda: rows(data_dir) == [(*expected, "signed")], what="the receipt")
    settle_now(ex_proc)
    assert [e["tokenCount"] for e in chain_usage(rpc, contract)] == [sum(expected)]


def test_refusal_lost_ledger_and_crossing_ends_still_settle_exactly(procs: Processes) -> None:
    """A client that refused once, lost its ledger, and a gateway whose two concurrent
    answers end in the other order: every later request is signed and settled on chain,
    and the total settled is exactly the executor's signed usage rows."""
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    _, url = start_mock(procs, "slow-mock", "--chunk-delay-ms", "40")
    _, v = start_validator(procs)
    boot = v.listen[0]
    ex_proc, _, data_dir = start_executor(
        procs, "exec", boot, url, ["mock-a"], extra=chain_section(rpc, contract), key=EXECUTOR_KEY
    )
    assert ask(procs, boot, "first", contract=contract).returncode == 0
    other = "0x" + "66" * 20
    refused = ask(procs, boot, "signed for another contract?", contract=other)
    assert refused.returncode == 0 and "signs only for chain" in refused.stderr
    for ledger in (procs.root / "client" / "data").glob("client-ledger.sqlite3*"):
        ledger.unlink()  # the client lost its record of what it signed
    after = ask(procs, boot, "after losing the ledger", contract=contract)
    assert after.returncode == 0 and "refused" not in after.stderr, after.stderr

    # A gateway (one channel: its key, this model): a long answer and a short one at once.
    _, base = start_gateway(procs, boot, "--chain-id", str(ANVIL_CHAIN_ID), "--contract", contract)
    long_prompt = " ".join(["word"] * 40)

    async def both() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:

            async def one(prompt: str) -> None:
                body = {"model": "mock-a", "messages": [{"role": "user", "content": prompt}]}
                answer = await http.post("/chat/completions", json=body)
                assert answer.status_code == 200, answer.text

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, long_prompt)
                await trio.sleep(0.1)
                nursery.start_soon(one, "short")

    trio.run(both)
    # The executor stores each receipt as it arrives, just after the answer ended.
    eventually(lambda: all(r[2] is not None for r in rows(data_dir)), what="receipts stored")
    statuses = [r[2] for r in rows(data_dir)]
    assert statuses.count("signed") == 4 and len(statuses) == 5, statuses
    signed = [(p, c) for p, c, status in rows(data_dir) if status == "signed"]
    settle_now(ex_proc)
    settled = sum(p + c for p, c in signed)
    c = accounting(connect(rpc), contract)
    assert c.functions.verifiedTokensByExecutor(EXECUTOR).call() == settled
    # the CLI's channel and the gateway's channel, one receipt each
    assert sorted(e["tokenCount"] for e in chain_usage(rpc, contract)) == sorted(
        [sum(p + c for p, c in signed[:2]), sum(p + c for p, c in signed[2:])]
    )
