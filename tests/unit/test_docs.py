"""The docs name every flag the code has, so they cannot drift silently."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from lloom.cli.main import build_parser as lloom_parser
from lloom.validator.cli import build_parser as validator_parser

DOCS = Path(__file__).resolve().parents[2] / "docs"


def flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of ``parser`` and its subcommands."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= flags(sub)
    return found


@pytest.mark.parametrize(
    ("parser", "doc"),
    [(validator_parser(), "validator.md"), (lloom_parser(), "cli.md")],
)
def test_every_flag_is_documented(parser: argparse.ArgumentParser, doc: str) -> None:
    text = (DOCS / doc).read_text()
    missing = sorted(f for f in flags(parser) if not re.search(rf"(?<![\w-]){f}(?![\w-])", text))
    assert not missing, f"{doc} does not document {missing}"
