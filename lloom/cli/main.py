"""The umbrella ``lloom`` command: identity, dht, chain, usage, devnet and keys."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import trio

from lloom import __version__
from lloom.cli import chain, devnet, dht, keys
from lloom.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_identity_args,
    identity_from_args,
    report_error,
    run_main,
)
from lloom.errors import IdentityError, LloomError
from lloom.identity import Identity
from lloom.logs import configure_logging
from lloom.paths import default_key_file


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lloom``."""
    parser = argparse.ArgumentParser(
        prog="lloom", description="lloom: a peer-to-peer network for LLM inference."
    )
    parser.add_argument("--version", action="version", version=f"lloom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ident = sub.add_parser(
        "identity",
        help="show a node identity (PeerId and EVM address), or create one",
        description="Print the PeerId and EVM address of a private key.",
    )
    add_identity_args(ident)
    ident.add_argument("--json", action="store_true", help="print JSON")
    ident_sub = ident.add_subparsers(dest="identity_command", metavar="SUBCOMMAND")
    new = ident_sub.add_parser(
        "new", help="generate a new key and write it to a key file (mode 0600)"
    )
    new.add_argument(
        "--key-file",
        dest="new_key_file",
        metavar="PATH",
        type=Path,
        help="where to write the key (default: the data dir's identity.key)",
    )
    new.add_argument("--force", action="store_true", help="overwrite an existing key file")
    new.add_argument("--json", dest="new_json", action="store_true", help="print JSON")
    dht.add_parsers(sub)
    chain.add_parsers(sub)
    devnet.add_parsers(sub)
    keys.add_parsers(sub)
    return parser


def _print_identity(ident: Identity, as_json: bool, key_file: Path | None = None) -> None:
    if as_json:
        doc: dict[str, str] = {"peer_id": str(ident.peer_id), "address": ident.address}
        if key_file is not None:
            doc["key_file"] = str(key_file)
        print(json.dumps(doc))
    else:
        print(f"peer_id: {ident.peer_id}")
        print(f"address: {ident.address}")
        if key_file is not None:
            print(f"key_file: {key_file}")


def _identity(args: argparse.Namespace) -> int:
    if args.identity_command == "new":
        if args.private_key is not None or args.key_file is not None:
            raise IdentityError("'identity new' takes its own --key-file after 'new'")
        path = args.new_key_file or default_key_file("identity")
        ident = Identity.generate()
        ident.write_key_file(path, overwrite=args.force)
        _print_identity(ident, args.new_json or args.json, key_file=path)
        return EXIT_OK
    _print_identity(identity_from_args(args), args.json)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run ``lloom`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", 0))
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "identity": _identity,
        "chain": chain.run_deploy,
        "usage": chain.run_usage,
        "devnet": devnet.run,
        "model-venv": devnet.run_model_venv,
        "dht": _dht,
        "keys": keys.run,
    }
    try:
        return commands[args.command](args)
    except LloomError as exc:
        return report_error(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _dht(args: argparse.Namespace) -> int:
    command = dht.find_providers if args.dht_command == "providers" else dht.provide
    return trio.run(command, args)


def run() -> None:
    """Console-script entry point."""
    run_main(main)
