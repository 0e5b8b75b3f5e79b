"""Settlement under faults: every test ends by checking exact on-chain totals."""

from __future__ import annotations

import signal
import sys
from typing import Any

import pytest

from lloom.chain.contract import accounting, connect
from tests.e2e.test_accounting import (
    CLIENT,
    EXECUTOR,
    EXECUTOR_KEY,
    ask,
    billed,
    chain_section,
    chain_usage,
    deploy,
    settle_now,
)
from tests.support.anvil import start_anvil
from tests.support.network import start_executor, start_mock, start_validator
from tests.support.procs import Proc, Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def rpc_call(url: str, method: str, params: list[Any]) -> Any:
    w3 = connect(url)
    return w3.provider.make_request(method, params)  # type: ignore[arg-type]


def total_on_chain(rpc: str, contract: str) -> int:
    c = accounting(connect(rpc), contract)
    return int(c.functions.verifiedTokensByExecutor(EXECUTOR).call())


def network(procs: Processes, rpc: str, contract: str, confirmations: int = 1) -> Any:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    boot = v.listen[0]
    ex, _, _ = start_executor(
        procs,
        "exec",
        boot,
        url,
        ["mock-a"],
        extra=chain_section(rpc, contract, confirmations=confirmations),
        key=EXECUTOR_KEY,
    )
    return ex, boot, url


def test_sigkill_with_unsettled_usage_then_restart(procs: Processes) -> None:
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    ex, boot, url = network(procs, rpc, contract)
    for prompt in ("one", "two two"):
        assert ask(procs, boot, prompt, contract=contract).returncode == 0
    ex.kill()
    restarted, _, _ = start_executor(
        procs, "exec", boot, url, ["mock-a"], extra=chain_section(rpc, contract), key=EXECUTOR_KEY
    )
    settle_now(restarted)
    assert total_on_chain(rpc, contract) == sum(billed("one")) + sum(billed("two two"))
    # The first executor's only round ran before it was ready, so both requests were still
    # unsettled at the kill: one batch settles them, once.
    events = [(e["client"], e["tokenCount"]) for e in chain_usage(rpc, contract)]
    assert events == [(CLIENT, sum(billed("one")) + sum(billed("two two")))]


def test_sigkill_with_a_settlement_in_flight(procs: Processes) -> None:
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    ex, boot, url = network(procs, rpc, contract, confirmations=3)
    assert ask(procs, boot, "in flight", contract=contract).returncode == 0
    assert ex.popen is not None
    ex.popen.send_signal(signal.SIGUSR1)
    ex.wait_for_line(lambda s: s.startswith("settlement sent"), 60)
    ex.kill()  # mined, but not yet 3 blocks deep
    restarted, _, _ = start_executor(
        procs,
        "exec",
        boot,
        url,
        ["mock-a"],
        extra=chain_section(rpc, contract, confirmations=3),
        key=EXECUTOR_KEY,
    )
    rpc_call(rpc, "anvil_mine", [3])
    restarted.wait_for_line(lambda s: s.startswith("settlement confirmed"), 60)
    assert total_on_chain(rpc, contract) == sum(billed("in flight"))
    assert len(chain_usage(rpc, contract)) == 1


def test_lost_reply_of_a_mined_transaction(procs: Processes) -> None:
    _, node = start_anvil(procs)
    contract = deploy(procs, node)
    proxy = procs.start(
        "proxy",
        [
            sys.executable,
            "-m",
            "tests.support.rpc_proxy",
            "--upstream",
            node,
            "--lose-send-replies",
            "1",
        ],
    )
    rpc = proxy.wait_for_line(lambda s: s.startswith("ready url=")).removeprefix("ready url=")
    ex, boot, _ = network(procs, rpc, contract)
    assert ask(procs, boot, "lost reply", contract=contract).returncode == 0
    settle_now(ex)
    proxy.wait_for_line(lambda s: s.startswith("lost reply 1"), 5)
    assert total_on_chain(node, contract) == sum(billed("lost reply"))
    assert len(chain_usage(node, contract)) == 1


def test_rpc_down_then_back(procs: Processes, tmp_path: Any) -> None:
    state = tmp_path / "chain.json"
    anvil, rpc = start_anvil(procs, "anvil", "--state", str(state))
    port = int(rpc.rsplit(":", 1)[1])
    contract = deploy(procs, rpc)
    ex, boot, _ = network(procs, rpc, contract)
    assert ask(procs, boot, "before", contract=contract).returncode == 0
    anvil.stop()  # the state is written on exit
    assert ask(procs, boot, "during outage", contract=contract).returncode == 0  # serving goes on
    assert ex.popen is not None
    ex.popen.send_signal(signal.SIGUSR1)
    start_anvil(procs, "anvil-again", "--state", str(state), port=port)
    ex.wait_for_line(lambda s: s.startswith("settlement confirmed"), 90)
    assert total_on_chain(rpc, contract) == sum(billed("before")) + sum(billed("during outage"))


def test_reorg_that_drops_a_settlement(procs: Processes) -> None:
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    ex, boot, _ = network(procs, rpc, contract, confirmations=2)
    assert ask(procs, boot, "reorg me", contract=contract).returncode == 0
    assert ex.popen is not None
    ex.popen.send_signal(signal.SIGUSR1)
    ex.wait_for_line(lambda s: s.startswith("settlement sent"), 60)
    assert total_on_chain(rpc, contract) == sum(billed("reorg me"))  # mined, 1 block deep
    assert "error" not in rpc_call(rpc, "anvil_reorg", [1, []])
    assert total_on_chain(rpc, contract) == 0  # the reorg dropped it
    ex.wait_for_line(lambda s: s.startswith("settlement resent"), 60)
    rpc_call(rpc, "anvil_mine", [1])
    ex.wait_for_line(lambda s: s.startswith("settlement confirmed"), 60)
    assert total_on_chain(rpc, contract) == sum(billed("reorg me"))
    assert len(chain_usage(rpc, contract)) == 1


def settled_then_reset(procs: Processes, *unsettled: str) -> tuple[Proc, str, str]:
    """A network whose request "one" was settled, then ``unsettled`` asked, then anvil
    restarted without its state (no contract, no settlement) and a round triggered.
    Returns the executor, the RPC URL and the (gone) contract's address."""
    anvil, rpc = start_anvil(procs)
    port = int(rpc.rsplit(":", 1)[1])
    contract = deploy(procs, rpc)
    ex, boot, _ = network(procs, rpc, contract)
    assert ask(procs, boot, "one", contract=contract).returncode == 0
    settle_now(ex)
    assert total_on_chain(rpc, contract) == sum(billed("one"))
    for prompt in unsettled:
        assert ask(procs, boot, prompt, contract=contract).returncode == 0
    anvil.stop()
    start_anvil(procs, "anvil-reset", port=port)  # a new chain: no state, no contract
    assert ex.popen is not None
    ex.popen.send_signal(signal.SIGUSR1)
    return ex, rpc, contract


def test_chain_reset_is_reported_then_everything_settles_on_the_new_contract(
    procs: Processes,
) -> None:
    """anvil restarted without its state: the settled batch is gone and the contract too.
    The executor says so (stdout, log, metric) and, once the contract is deployed again at
    the same address, settles all usage with exact totals, with no nonce gap."""
    ex, rpc, contract = settled_then_reset(procs, "two two")
    ex.wait_for_line(lambda s: s.startswith("settlement lost"), 60)  # the settled batch
    halted = ex.wait_for_line(lambda s: s.startswith("settlement halted"), 10)
    assert contract in halted and "reset" in halted
    assert deploy(procs, rpc) == contract  # the same deployer's first transaction
    ex.wait_for_line(lambda s: s == "settlement resumed", 60)
    ex.wait_for_line(lambda s: s.startswith("settlement confirmed"), 60)
    everything = sum(billed("one")) + sum(billed("two two"))
    assert total_on_chain(rpc, contract) == everything
    assert [e["tokenCount"] for e in chain_usage(rpc, contract)] == [everything]


def test_chain_rolled_back_below_the_stored_nonce(procs: Processes) -> None:
    """The chain returns to an older state (same genesis, contract still there) that lacks a
    confirmed settlement: the account's nonce is below the one stored. The executor marks
    it lost and settles everything again, with the chain's nonce: no gap, exact totals."""
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    ex, boot, _ = network(procs, rpc, contract)
    snapshot = rpc_call(rpc, "evm_snapshot", [])["result"]
    assert ask(procs, boot, "one", contract=contract).returncode == 0
    settle_now(ex)
    assert total_on_chain(rpc, contract) == sum(billed("one"))
    assert rpc_call(rpc, "evm_revert", [snapshot])["result"] is True
    assert total_on_chain(rpc, contract) == 0  # the settlement is gone, the contract is not
    assert ask(procs, boot, "two two", contract=contract).returncode == 0
    assert ex.popen is not None
    ex.popen.send_signal(signal.SIGUSR1)
    ex.wait_for_line(lambda s: s.startswith("settlement lost"), 60)
    ex.wait_for_line(lambda s: s.startswith("settlement confirmed"), 60)
    everything = sum(billed("one")) + sum(billed("two two"))
    assert total_on_chain(rpc, contract) == everything


def test_chain_reset_with_nothing_new_settles_the_same_batch_again(procs: Processes) -> None:
    """After a reset, the batch to send again can be the very transaction that was lost
    (same receipt, same nonce, same bytes): it comes back as itself."""
    ex, rpc, contract = settled_then_reset(procs)
    ex.wait_for_line(lambda s: s.startswith("settlement halted"), 60)
    assert deploy(procs, rpc) == contract
    ex.wait_for_line(lambda s: s.startswith("settlement confirmed"), 60)
    assert total_on_chain(rpc, contract) == sum(billed("one"))
