"""Command-line options every client (``lloom-client`` and its gateway) shares: the chain
its receipts are for, and which executors it may use."""

from __future__ import annotations

import argparse
import re

from lloom.chain.receipts import Domain
from lloom.client.discovery import Choice
from lloom.client.observed import ExecutorBook
from lloom.errors import UsageError

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{30,100}")  # base58


def add_chain_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--chain-id`` and ``--contract``: the only chain a client signs receipts for."""
    parser.add_argument(
        "--chain-id",
        type=int,
        metavar="N",
        help="sign usage receipts for this chain only (with --contract; without both, "
        "receipts are refused)",
    )
    parser.add_argument(
        "--contract",
        metavar="0xADDRESS",
        help="the Accounting contract receipts are signed for (with --chain-id)",
    )


def domain_from_args(args: argparse.Namespace) -> Domain | None:
    """The receipt domain of ``--chain-id``/``--contract``, or None when neither is given."""
    if args.chain_id is None and args.contract is None:
        return None
    if args.chain_id is None or args.contract is None:
        raise UsageError("give --chain-id and --contract together")
    if args.chain_id <= 0:
        raise UsageError("--chain-id must be positive")
    if not _ADDRESS.fullmatch(args.contract):
        raise UsageError("--contract must be a 0x-prefixed 20-byte hex address")
    return Domain(args.chain_id, args.contract)


def add_choice_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--allow-executor`` and ``--deny-executor``."""
    parser.add_argument(
        "--allow-executor",
        action="append",
        default=[],
        metavar="PEER_ID",
        help="use only these executors (repeatable)",
    )
    parser.add_argument(
        "--deny-executor",
        action="append",
        default=[],
        metavar="PEER_ID",
        help="never use this executor (repeatable)",
    )


def choice_from_args(args: argparse.Namespace, book: ExecutorBook | None) -> Choice:
    """The executors ``--allow-executor``/``--deny-executor`` permit, ranked with ``book``."""
    for peer in [*args.allow_executor, *args.deny_executor]:
        if not _PEER_ID.fullmatch(peer):
            raise UsageError(f"{peer!r} is not a PeerId")
    return Choice(frozenset(args.allow_executor), frozenset(args.deny_executor), book)
