"""``lloom keys``: make gateway API keys and show what each key used."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lloom.cli.common import EXIT_OK
from lloom.errors import UsageError
from lloom.gateway.keys import KeyUsage, new_key, now, utc_day
from lloom.paths import default_data_dir

#: Where a gateway keeps per-key usage, under its data dir.
KEY_USAGE_FILE = "gateway-keys.sqlite3"


def default_key_usage_path() -> Path:
    """The gateway's per-key usage database."""
    return default_data_dir() / KEY_USAGE_FILE


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys new`` and ``keys usage``."""
    keys = sub.add_parser("keys", help="gateway API keys: make one, show usage per key")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    new = keys_sub.add_parser("new", help="print a new random key as a keys-file table")
    new.add_argument("name", help="the key's name (letters, digits, - and _)")
    usage = keys_sub.add_parser("usage", help="requests and tokens per key and UTC day")
    usage.add_argument(
        "--db",
        type=Path,
        default=None,
        help=f"the gateway's key usage database (default: <data dir>/{KEY_USAGE_FILE})",
    )
    usage.add_argument("--days", type=int, default=7, help="how many days back (default 7)")
    usage.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``lloom keys …``."""
    if args.keys_command == "new":
        name = str(args.name)
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise UsageError("a key name is letters, digits, '-' and '_'")
        print(f'[keys.{name}]\nkey = "{new_key()}"\n# requests_per_minute = 60')
        print("# tokens_per_day = 200000")
        return EXIT_OK
    path = args.db or default_key_usage_path()
    if not path.exists():
        raise UsageError(f"no key usage at {path}: has a gateway with keys run here?")
    if args.days < 1:
        raise UsageError("--days must be positive")
    store = KeyUsage(path)
    try:
        rows = store.rows(since_day=utc_day(now()) - args.days + 1)
    finally:
        store.close()
    if args.json:
        keys = ("key", "day", "requests", "prompt_tokens", "completion_tokens")
        print(json.dumps([dict(zip(keys, row, strict=True)) for row in rows]))
        return EXIT_OK
    print(f"{'day (UTC)':10}  {'key':20}  {'requests':>9}  {'prompt':>10}  {'completion':>10}")
    for key, day, requests, prompt, completion in rows:
        date = _date(day)
        print(f"{date:10}  {key[:20]:20}  {requests:>9}  {prompt:>10}  {completion:>10}")
    return EXIT_OK


def _date(day: int) -> str:
    import datetime  # noqa: PLC0415 - only for printing

    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=day)).isoformat()
