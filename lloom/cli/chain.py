"""``lloom chain deploy`` and ``lloom usage``: the Accounting contract from the command line."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

from web3 import Web3
from web3.exceptions import Web3Exception

from lloom.chain.contract import accounting, artifact, connect
from lloom.chain.tx import deploy
from lloom.cli.common import add_identity_args, identity_from_args
from lloom.errors import ChainError, ChainResetError, UsageError


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``chain deploy`` and ``usage``."""
    chain = sub.add_parser("chain", help="deploy the Accounting contract")
    csub = chain.add_subparsers(dest="chain_command", required=True, metavar="SUBCOMMAND")
    dep = csub.add_parser("deploy", help="deploy Accounting and print its address")
    dep.add_argument("--rpc-url", required=True, help="JSON-RPC endpoint")
    add_identity_args(dep)
    dep.add_argument("--json", action="store_true", help="print JSON")

    usage = sub.add_parser(
        "usage", help="print verified usage settled on chain (UsageSettled) and totals"
    )
    usage.add_argument("--rpc-url", required=True, help="JSON-RPC endpoint")
    usage.add_argument("--contract", required=True, metavar="ADDRESS", help="Accounting address")
    usage.add_argument("--executor", metavar="ADDRESS", help="only this executor's usage")
    usage.add_argument("--client", metavar="ADDRESS", help="only this client's usage")
    usage.add_argument("--from-block", type=int, default=0, metavar="N", help="first block")
    usage.add_argument(
        "--include-unverified",
        action="store_true",
        help="also show the design's unverified recordUsage events (labelled)",
    )
    usage.add_argument("--json", action="store_true", help="print JSON")


def _address(text: str | None, flag: str) -> str | None:
    if text is None:
        return None
    if not Web3.is_address(text):
        raise UsageError(f"{flag}: {text!r} is not an address")
    return Web3.to_checksum_address(text)


def run_deploy(args: argparse.Namespace) -> int:
    """``lloom chain deploy``."""
    identity = identity_from_args(args)
    w3 = connect(args.rpc_url)
    try:
        address = deploy(w3, identity, artifact()["abi"], artifact()["bytecode"])
        chain_id = w3.eth.chain_id
    except (Web3Exception, OSError, ValueError) as exc:
        raise ChainError(f"deployment failed: {exc}") from exc
    if args.json:
        print(json.dumps({"address": address, "chain_id": chain_id, "deployer": identity.address}))
    else:
        print(address)
    return 0


def run_usage(args: argparse.Namespace) -> int:
    """``lloom usage``."""
    executor = _address(args.executor, "--executor")
    client = _address(args.client, "--client")
    contract_address = _address(args.contract, "--contract")
    assert contract_address is not None
    w3 = connect(args.rpc_url)
    contract = accounting(w3, contract_address)
    try:
        deployed = bool(w3.eth.get_code(contract.address))
    except (Web3Exception, OSError, ValueError) as exc:
        raise ChainError(f"cannot reach the chain at {args.rpc_url}: {exc}") from exc
    if not deployed:
        raise ChainResetError(
            f"no contract at {contract.address} on chain {w3.eth.chain_id}: was the chain "
            "reset? Executors keep their usage and settle it once the contract is there again"
        )
    filters = {k: v for k, v in (("executor", executor), ("client", client)) if v}
    kinds = [("verified", contract.events.UsageSettled)]
    if args.include_unverified:
        kinds.append(("unverified", contract.events.UsageRecorded))
    rows = []
    for kind, event in kinds:
        try:
            logs = event().get_logs(from_block=args.from_block, argument_filters=filters or None)
        except (Web3Exception, OSError, ValueError) as exc:
            raise ChainError(f"cannot read events: {exc}") from exc
        rows += [_usage_row(kind, log) for log in logs]
    rows.sort(key=lambda r: (r["block"], r["kind"]))
    _print_usage(rows, args.include_unverified, args.json)
    return 0


def _usage_row(kind: str, log: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "block": int(log["blockNumber"]),
        "tx": log["transactionHash"].to_0x_hex(),
        "executor": log["args"]["executor"],
        "client": log["args"]["client"],
        "model": log["args"]["model"],
        "tokens": int(log["args"]["tokenCount"]),
        "timestamp": int(log["args"]["timestamp"]),
    }


def _print_usage(rows: list[dict[str, Any]], with_unverified: bool, as_json: bool) -> None:
    totals: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["kind"] == "verified":
            totals[row["executor"]] += row["tokens"]
    unverified = sum(r["tokens"] for r in rows if r["kind"] == "unverified")
    if as_json:
        doc: dict[str, Any] = {
            "events": rows,
            "totals_by_executor": totals,
            "total": sum(totals.values()),
        }
        if with_unverified:
            doc["unverified_total"] = unverified
        print(json.dumps(doc))
        return
    print(f"{'block':>7}  {'kind':10}  {'executor':42}  {'client':42}  {'model':20}  {'tokens':>8}")
    for row in rows:
        print(
            f"{row['block']:>7}  {row['kind']:10}  {row['executor']:42}  {row['client']:42}  "
            f"{row['model'][:20]:20}  {row['tokens']:>8}"
        )
    print(f"{len(rows)} event(s), {sum(totals.values())} verified tokens")
    for who, total in sorted(totals.items()):
        print(f"  executor {who}: {total} verified tokens")
    if with_unverified:
        print(f"  unverified (recordUsage, vouched for by executors alone): {unverified} tokens")
