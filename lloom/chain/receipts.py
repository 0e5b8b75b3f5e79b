"""Client-signed usage receipts: EIP-712 typed data over a channel's running totals.

A channel is (executor, client, model). After each request the client signs the channel's
running prompt and completion totals; the contract settles the difference to what it has
already settled for the channel, so one signature settles every request since the last.

Domain: ``{"name": "lloom Accounting", "version": "1", "chainId", "verifyingContract"}``.
Type: ``Receipt(address executor,address client,string model,uint256 promptTokens,
uint256 completionTokens,uint256 deadline)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lloom.errors import ProtocolError
from lloom.identity import Identity

DOMAIN_NAME = "lloom Accounting"
DOMAIN_VERSION = "1"
RECEIPT_TYPE = [
    {"name": "executor", "type": "address"},
    {"name": "client", "type": "address"},
    {"name": "model", "type": "string"},
    {"name": "promptTokens", "type": "uint256"},
    {"name": "completionTokens", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]
SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def to_checksum_address(address: str) -> str:
    """``address`` in EIP-55 form; raises ``ValueError`` when it is not an address."""
    # eth_utils (with pydantic) takes a tenth of a second to import: only when needed.
    from eth_utils.address import to_checksum_address as checksum  # noqa: PLC0415

    return str(checksum(address))


@dataclass(frozen=True, slots=True)
class Domain:
    """Where receipts are valid: one chain, one contract."""

    chain_id: int
    contract: str

    def to_json(self) -> dict[str, Any]:
        """The EIP-712 domain object."""
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.contract),
        }


@dataclass(frozen=True, slots=True)
class Receipt:
    """A client's signature over a channel's running totals."""

    executor: str
    client: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    deadline: int
    signature: bytes = b""

    @property
    def total(self) -> int:
        """Running total of tokens the receipt covers."""
        return self.prompt_tokens + self.completion_tokens

    def message(self) -> dict[str, Any]:
        """The EIP-712 message."""
        return {
            "executor": to_checksum_address(self.executor),
            "client": to_checksum_address(self.client),
            "model": self.model,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "deadline": self.deadline,
        }

    def vrs(self) -> tuple[int, bytes, bytes]:
        """The signature as (v, r, s)."""
        if len(self.signature) != 65:
            raise ProtocolError("receipt signature must be 65 bytes")
        return self.signature[64], self.signature[:32], self.signature[32:64]

    def compact(self) -> tuple[bytes, bytes]:
        """The EIP-2098 compact signature (r, vs) the contract takes."""
        v, r, s = self.vrs()
        if v not in (27, 28):
            raise ProtocolError("receipt signature has a bad v")
        vs = int.from_bytes(s, "big") | ((v - 27) << 255)
        return r, vs.to_bytes(32, "big")

    def contract_args(self) -> tuple[str, str, int, int, int, bytes, bytes]:
        """The receipt as the contract's ``Receipt`` struct (the executor is msg.sender)."""
        r, vs = self.compact()
        client = to_checksum_address(self.client)
        return (
            client,
            self.model,
            self.prompt_tokens,
            self.completion_tokens,
            self.deadline,
            r,
            vs,
        )


def typed_data(domain: Domain, receipt: Receipt) -> dict[str, Any]:
    """The full EIP-712 document of ``receipt``."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Receipt": RECEIPT_TYPE,
        },
        "primaryType": "Receipt",
        "domain": domain.to_json(),
        "message": receipt.message(),
    }


def sign(identity: Identity, domain: Domain, receipt: Receipt) -> Receipt:
    """``receipt`` signed by ``identity`` (which must be its client); low-s, v in {27, 28}."""
    from eth_account import Account  # noqa: PLC0415 - 0.3 s to import; only when signing
    from eth_account.messages import encode_typed_data  # noqa: PLC0415

    if to_checksum_address(receipt.client) != identity.address:
        raise ProtocolError("a client can only sign receipts for its own address")
    signable = encode_typed_data(full_message=typed_data(domain, receipt))
    signed = Account.sign_message(signable, identity.private_key)
    signature = signed.r.to_bytes(32, "big") + signed.s.to_bytes(32, "big") + bytes([signed.v])
    return Receipt(
        receipt.executor,
        receipt.client,
        receipt.model,
        receipt.prompt_tokens,
        receipt.completion_tokens,
        receipt.deadline,
        signature,
    )


def signer_of(domain: Domain, receipt: Receipt) -> str | None:
    """The address that signed ``receipt``, or None for a malformed or high-s signature."""
    from eth_account import Account  # noqa: PLC0415 - 0.3 s to import; only when checking
    from eth_account.messages import encode_typed_data  # noqa: PLC0415

    try:
        v, r, s = receipt.vrs()
    except ProtocolError:
        return None
    if v not in (27, 28) or int.from_bytes(s, "big") > SECP256K1_HALF_N:
        return None
    signable = encode_typed_data(full_message=typed_data(domain, receipt))
    try:
        return str(Account.recover_message(signable, vrs=(v, r, s)))
    except Exception:  # eth-account raises several types for invalid points
        return None
