"""Pieces every lloom command line shares: key flags, error reporting, exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lloom.errors import LloomError
from lloom.identity import ENV_PRIVATE_KEY, Identity, load_identity
from lloom.paths import default_key_file

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
