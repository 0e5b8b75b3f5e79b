"""Building, signing and sending transactions with a local key (web3.py, sync API).

Async callers run these in a worker thread (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

from typing import Any

from eth_account import Account
from hexbytes import HexBytes
from web3 import Web3
from web3.types import TxParams, TxReceipt

from lloom.errors import ChainError
from lloom.identity import Identity


def fees(w3: Web3) -> dict[str, int]:
    """EIP-1559 fee fields: twice the base fee plus a 1 gwei tip."""
    base = int(w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
    tip = 1_000_000_000
    return {"maxFeePerGas": 2 * base + tip, "maxPriorityFeePerGas": tip}


def sign_tx(identity: Identity, tx: dict[str, Any]) -> tuple[bytes, str]:
    """Sign a complete transaction; return (raw bytes, 0x hash)."""
    signed = Account.sign_transaction(tx, identity.private_key)
    return bytes(signed.raw_transaction), HexBytes(signed.hash).to_0x_hex()


def send_and_wait(w3: Web3, identity: Identity, tx: TxParams, timeout: float = 60) -> TxReceipt:
    """Fill nonce, gas and fees, sign, send, and wait for the receipt."""
    full: dict[str, Any] = dict(tx)
    full.setdefault("from", identity.address)
    full.setdefault("chainId", w3.eth.chain_id)
    full.setdefault(
        "nonce", w3.eth.get_transaction_count(Web3.to_checksum_address(identity.address), "pending")
    )
    full.update({k: v for k, v in fees(w3).items() if k not in full})
    if "gas" not in full:
        full["gas"] = int(w3.eth.estimate_gas(full) * 1.2)  # type: ignore[arg-type]
    raw, _ = sign_tx(identity, full)
    tx_hash = w3.eth.send_raw_transaction(raw)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout)
    if receipt["status"] != 1:
        raise ChainError(f"transaction {tx_hash.to_0x_hex()} reverted")
    return receipt


def deploy(w3: Web3, identity: Identity, abi: list[Any], bytecode: str) -> str:
    """Deploy a contract; return its checksum address."""
    factory = w3.eth.contract(abi=abi, bytecode=bytecode)
    tx = factory.constructor().build_transaction(
        {
            "from": identity.address,
            "nonce": w3.eth.get_transaction_count(Web3.to_checksum_address(identity.address)),
        }
    )
    receipt = send_and_wait(w3, identity, tx)
    address = receipt["contractAddress"]
    if address is None:
        raise ChainError("deployment produced no contract address")
    return str(address)
