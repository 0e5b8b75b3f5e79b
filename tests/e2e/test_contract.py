"""The Accounting contract on anvil: the design's ABI, verified settlement, gas."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_typing import HexStr
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD

from lloom.chain.contract import ARTIFACT, accounting, artifact, connect
from lloom.chain.receipts import Domain, Receipt, sign, signer_of
from lloom.chain.tx import deploy, send_and_wait
from lloom.identity import Identity
from tests.support.anvil import KEYS, start_anvil
from tests.support.procs import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
EXECUTOR = Identity.from_hex(KEYS[0])


@pytest.fixture
def chain(procs: Processes) -> Iterator[tuple[Web3, Contract]]:
    _, url = start_anvil(procs)
    w3 = connect(url)
    address = deploy(w3, EXECUTOR, artifact()["abi"], artifact()["bytecode"])
    yield w3, accounting(w3, address)


def domain(w3: Web3, c: Contract) -> Domain:
    return Domain(w3.eth.chain_id, c.address)


def receipt_args(r: Receipt) -> tuple[Any, ...]:
    if r.signature == b"\x00" * 65:  # an unsigned receipt, as the contract would see it
        return (
            r.client,
            r.model,
            r.prompt_tokens,
            r.completion_tokens,
            r.deadline,
            b"\x00" * 32,
            b"\x00" * 32,
        )
    return r.contract_args()


def settle(w3: Web3, c: Contract, receipts: list[Receipt]) -> Any:
    tx = c.functions.settle([receipt_args(r) for r in receipts]).build_transaction(
        {"from": EXECUTOR.address}
    )
    return send_and_wait(w3, EXECUTOR, tx)


def events(c: Contract, receipt: Any) -> tuple[list[Any], list[Any]]:
    """(verified ``UsageSettled``, ``ReceiptRejected``) events of a settle transaction; a
    settle never emits the unverified kind."""
    assert not c.events.UsageRecorded().process_receipt(receipt, errors=DISCARD)
    ok = c.events.UsageSettled().process_receipt(receipt, errors=DISCARD)
    bad = c.events.ReceiptRejected().process_receipt(receipt, errors=DISCARD)
    return [e["args"] for e in ok], [e["args"] for e in bad]


def signed(
    w3: Web3, c: Contract, client: Identity, p: int, comp: int, deadline: int = 0, model: str = "m1"
) -> Receipt:
    deadline = deadline or int(time.time()) + 3600
    r = Receipt(EXECUTOR.address, client.address, model, p, comp, deadline)
    return sign(client, domain(w3, c), r)


def test_artifact_matches_a_fresh_compile(tmp_path: Path) -> None:
    out = tmp_path / "Accounting.json"
    subprocess.run(
        ["node", str(ROOT / "scripts/compile_contract.mjs"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert json.loads(out.read_text()) == json.loads(ARTIFACT.read_text()), (
        "lloom/chain/Accounting.json is stale: run make contract"
    )


def test_design_abi_is_kept(chain: tuple[Web3, Contract]) -> None:
    w3, c = chain
    assert c.functions.owner().call() == EXECUTOR.address
    client = Identity.generate()
    tx = c.functions.recordUsage(client.address, "gpt", 42).build_transaction(
        {"from": EXECUTOR.address}
    )
    rec = send_and_wait(w3, EXECUTOR, tx)
    ok = [e["args"] for e in c.events.UsageRecorded().process_receipt(rec, errors=DISCARD)]
    assert not c.events.UsageSettled().process_receipt(rec, errors=DISCARD)
    assert ok[0]["executor"] == EXECUTOR.address and ok[0]["client"] == client.address
    assert ok[0]["model"] == "gpt" and ok[0]["tokenCount"] == 42
    assert c.functions.totalTokensByExecutor(EXECUTOR.address).call() == 42
    assert c.functions.verifiedTokensByExecutor(EXECUTOR.address).call() == 0
    with pytest.raises(Exception, match="Token count must be positive"):
        c.functions.recordUsage(client.address, "gpt", 0).call({"from": EXECUTOR.address})


def test_verified_settlement_and_every_bad_receipt(chain: tuple[Web3, Contract]) -> None:
    w3, c = chain
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    good = signed(w3, c, alice, 10, 20)
    assert signer_of(domain(w3, c), good) == alice.address
    forged = Receipt(
        EXECUTOR.address,
        bob.address,
        "m1",
        5,
        5,
        good.deadline,
        sign(
            mallory,
            domain(w3, c),
            Receipt(EXECUTOR.address, mallory.address, "m1", 5, 5, good.deadline),
        ).signature,
    )
    expired = signed(w3, c, bob, 1, 1, deadline=int(time.time()) - 10)
    unsigned = Receipt(EXECUTOR.address, bob.address, "m1", 3, 3, good.deadline, b"\x00" * 65)
    v, r, s = good.vrs()
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high_s = Receipt(
        good.executor,
        good.client,
        good.model,
        good.prompt_tokens,
        good.completion_tokens,
        good.deadline,
        r + (n - int.from_bytes(s, "big")).to_bytes(32, "big") + bytes([55 - v]),
    )
    assert signer_of(domain(w3, c), high_s) is None
    rec = settle(w3, c, [good, forged, expired, unsigned, high_s])
    ok, bad = events(c, rec)
    assert [(e["client"], e["model"], e["tokenCount"]) for e in ok] == [(alice.address, "m1", 30)]
    assert [e["reason"] for e in bad] == [1, 2, 1, 1]
    assert c.functions.verifiedTokensByExecutor(EXECUTOR.address).call() == 30
    assert c.functions.totalTokensByExecutor(EXECUTOR.address).call() == 0  # the design's kind

    # Replay: the same receipt again settles nothing; a newer running total settles the rest.
    rec = settle(w3, c, [good, signed(w3, c, alice, 15, 40)])
    ok, bad = events(c, rec)
    assert [e["reason"] for e in bad] == [3]
    assert [e["tokenCount"] for e in ok] == [25]
    assert c.functions.verifiedTokensByExecutor(EXECUTOR.address).call() == 55
    # A receipt signed for another executor does not settle for this one.
    other = Receipt(bob.address, alice.address, "m1", 100, 100, good.deadline)
    stolen = sign(alice, domain(w3, c), other)
    ok, bad = events(c, settle(w3, c, [stolen]))
    assert not ok and [e["reason"] for e in bad] == [1]


def test_gas_per_request_verified(chain: tuple[Web3, Contract]) -> None:
    """100 requests from 10 clients settled in one transaction (running totals)."""
    w3, c = chain
    clients = [Identity.generate() for _ in range(10)]
    first = [signed(w3, c, cl, 50, 50) for cl in clients]  # opens the 10 channels
    gas_first = settle(w3, c, first)["gasUsed"]
    # Ten more requests per client since: one receipt each covers all ten.
    later = [signed(w3, c, cl, 50 + 10 * 7, 50 + 10 * 9) for cl in clients]
    gas_steady = settle(w3, c, later)["gasUsed"]
    print(
        f"gas per request: first settlement {gas_first / 100:.0f}, "
        f"steady state {gas_steady / 100:.0f}"
    )
    assert gas_steady / 100 <= 2000
    assert c.functions.verifiedTokensByExecutor(EXECUTOR.address).call() == 10 * (100 + 160)


def test_a_devnet_replaces_an_older_accounting_it_finds(procs: Processes) -> None:
    """A devnet's recorded contract is reused only if it is this version's (it has the
    verified totals); an older one — here a stand-in without them — is replaced."""
    from lloom.devnet.chain import ensure_contract

    _, rpc = start_anvil(procs)
    w3 = connect(rpc)
    # Creation code of a contract whose whole runtime code is STOP.
    stand_in = send_and_wait(w3, EXECUTOR, {"data": HexStr("0x6001600c60003960016000f300")})
    old = stand_in["contractAddress"]
    assert old is not None and w3.eth.get_code(old)
    address, chain_id, reused = ensure_contract(rpc, EXECUTOR, str(old))
    assert not reused and address != old and chain_id == 31337
    assert ensure_contract(rpc, EXECUTOR, address) == (address, chain_id, True)
