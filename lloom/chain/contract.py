"""The compiled ``Accounting`` contract and thin web3.py helpers around it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from web3 import Web3
from web3.contract import Contract

from lloom.errors import ConfigError

#: Written by ``node scripts/compile_contract.mjs`` (``make contract``), checked in, and
#: shipped inside the package so an installed lloom can deploy the contract.
ARTIFACT = Path(__file__).resolve().parent / "Accounting.json"


@functools.cache
def artifact() -> dict[str, Any]:
    """The contract's ABI and creation bytecode."""
    try:
        data: dict[str, Any] = json.loads(ARTIFACT.read_text())
    except FileNotFoundError:
        raise ConfigError(f"contract artifact {ARTIFACT} is missing; run make contract") from None
    return data


def connect(rpc_url: str, timeout: float = 10.0) -> Web3:
    """A web3 connection over HTTP JSON-RPC."""
    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))


def accounting(w3: Web3, address: str) -> Contract:
    """The Accounting contract at ``address``."""
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=artifact()["abi"])
