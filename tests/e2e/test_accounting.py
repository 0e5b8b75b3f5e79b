"""The design's end-to-end test (Step 10), with verified receipts, and accounting faults."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from web3 import Web3

from lloom.chain.contract import accounting, connect
from lloom.identity import Identity
from tests.support.anvil import KEYS, start_anvil
from tests.support.network import start_executor, start_mock, start_validator
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


def ask(procs: Processes, boot: str, prompt: str, key: str = CLIENT_KEY) -> Any:
    return procs.run(
        "client",
        [
            script("lloom-client"),
            "--private-key",
            key,
            "--bootstrap-nodes",
            boot,
            "--model",
            "mock-a",
            "--prompt",
            prompt,
        ],
    )


def settle_now(executor: Proc, timeout: float = 60) -> str:
    assert executor.popen is not None
    executor.popen.send_signal(signal.SIGUSR1)
    return executor.wait_for_line(lambda s: s.startswith("settlement confirmed"), timeout)


def chain_usage(rpc: str, contract: str) -> list[dict[str, Any]]:
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
    first = ask(procs, v.listen[0], "hello chain")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "Echo: hello chain\n"
    second = ask(procs, v.listen[0], "and again please")
    assert second.returncode == 0, second.stderr
    assert rows(data_dir) == [(2, 3, "signed"), (3, 4, "signed")]

    settle_now(ex_proc)
    events = chain_usage(rpc, contract)
    # One receipt (the running total) settles both requests.
    assert [(e["executor"], e["client"], e["model"], e["tokenCount"]) for e in events] == [
        (EXECUTOR, CLIENT, "mock-a", 12)
    ]
    c = accounting(connect(rpc), contract)
    assert c.functions.totalTokensByExecutor(EXECUTOR).call() == 12

    table = procs.run(
        "usage", [script("lloom"), "usage", "--rpc-url", rpc, "--contract", contract, "--json"]
    )
    assert table.returncode == 0, table.stderr
    assert json.loads(table.stdout)["total"] == 12

    # A third request later settles only what is new.
    assert ask(procs, v.listen[0], "three").returncode == 0
    settle_now(ex_proc)
    assert [e["tokenCount"] for e in chain_usage(rpc, contract)] == [12, 1 + 2]


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
        assert ask(procs, v.listen[0], prompt).returncode == 0
    settle_now(ex_proc)
    ex_proc.wait_for_line(lambda s: s.startswith("settlement confirmed"), 30)
    events = chain_usage(rpc, contract)
    assert sorted(e["tokenCount"] for e in events) == [1 + 2, 2 + 3]
    assert {e["client"] for e in events} == {CLIENT}


def test_client_refuses_inflated_usage(procs: Processes) -> None:
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
    result = ask(procs, v.listen[0], "how many tokens is this")
    assert result.returncode == 0
    assert "refused to sign the executor's usage: inflated usage" in result.stderr
    [(_, _, receipt)] = rows(data_dir)
    assert receipt.startswith("refused: inflated usage")
    assert ex_proc.popen is not None
    ex_proc.popen.send_signal(signal.SIGUSR1)
    # Nothing signed, nothing to settle: the chain stays empty.
    assert chain_usage(rpc, contract) == []
