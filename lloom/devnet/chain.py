"""The devnet's chain set-up: fake ether for its accounts, the contract deployed once."""

from __future__ import annotations

from web3 import Web3
from web3.exceptions import Web3Exception

from lloom.chain.contract import accounting, artifact, connect
from lloom.chain.tx import deploy
from lloom.errors import ChainError, DevnetError
from lloom.identity import Identity

#: What a devnet account is topped up to on every start (anvil's fake ether).
FUNDING_WEI = 1000 * 10**18
ZERO_ADDRESS = "0x" + "00" * 20


def fund(rpc_url: str, addresses: list[str]) -> None:
    """Top up devnet accounts with anvil's fake ether (``anvil_setBalance``)."""
    w3 = connect(rpc_url)
    try:
        for address in addresses:
            checksum = Web3.to_checksum_address(address)
            if w3.eth.get_balance(checksum) < FUNDING_WEI // 2:
                w3.provider.make_request("anvil_setBalance", [checksum, hex(FUNDING_WEI)])  # type: ignore[arg-type]
    except (Web3Exception, OSError, ValueError) as exc:
        raise DevnetError(f"cannot fund devnet accounts on {rpc_url}: {exc}") from None


def _current(w3: Web3, address: str) -> bool:
    """Whether the contract at ``address`` is this lloom's Accounting (an older devnet's has
    no ``verifiedTokensByExecutor``: it is replaced, not reused)."""
    contract = accounting(w3, Web3.to_checksum_address(address))
    try:
        contract.functions.verifiedTokensByExecutor(ZERO_ADDRESS).call()
    except (Web3Exception, ValueError):
        return False
    return True


def ensure_contract(rpc_url: str, deployer: Identity, known: str | None) -> tuple[str, int, bool]:
    """(address, chain id, reused): the known Accounting if its code (this version's) is on
    chain, else a new one.

    Code at the recorded address means the chain state was kept; a chain started afresh
    (state file deleted) has none there, and gets a new deployment.
    """
    w3 = connect(rpc_url)
    try:
        chain_id = int(w3.eth.chain_id)
        if (
            known is not None
            and Web3.is_address(known)
            and w3.eth.get_code(Web3.to_checksum_address(known))
            and _current(w3, known)
        ):
            return known, chain_id, True
        address = deploy(w3, deployer, artifact()["abi"], artifact()["bytecode"])
    except (Web3Exception, OSError, ValueError, ChainError) as exc:
        raise DevnetError(f"cannot deploy Accounting on {rpc_url}: {exc}") from None
    return address, chain_id, False
