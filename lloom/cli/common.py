"""Pieces every lloom command line shares: key flags, error reporting, exit codes."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from lloom.chain.receipts import Domain
from lloom.errors import LloomError, UsageError
from lloom.identity import ENV_PRIVATE_KEY, Identity, load_identity
from lloom.paths import default_key_file

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")

#: Exit codes shared by all commands.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_identity_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--private-key`` and ``--key-file``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--private-key",
        metavar="HEX",
        help=f"secp256k1 private key as hex (also from ${ENV_PRIVATE_KEY}); "
        "visible to other local users in the process list, prefer --key-file",
    )
    group.add_argument(
        "--key-file", metavar="PATH", type=Path, help="file holding the hex private key"
    )


def identity_from_args(args: argparse.Namespace, role: str | None = None) -> Identity:
    """Resolve the identity from flags, env, or (if ``role`` is given) the role's key file."""
    return load_identity(
        args.private_key,
        args.key_file,
        default_key_file=default_key_file(role) if role else None,
    )


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Console-script wrapper: run ``main`` and exit with its code."""
    sys.exit(main(None))


def report_error(exc: LloomError) -> int:
    """Print a one-line error to stderr and return the exit code for it."""
    print(f"error: {exc}", file=sys.stderr)
    return exc.exit_code


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
