"""The docs name every flag the code has, so they cannot drift silently."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from lloom.cli.main import build_parser as lloom_parser
from lloom.client.cli import build_parser as client_parser
from lloom.executor.cli import build_parser as executor_parser
from lloom.executor.handler import Limits
from lloom.gateway.cli import build_parser as gateway_parser
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
    [
        (validator_parser(), "validator.md"),
        (lloom_parser(), "cli.md"),
        (executor_parser(), "executor.md"),
        (client_parser(), "client.md"),
        (gateway_parser(), "gateway.md"),
    ],
)
def test_every_flag_is_documented(parser: argparse.ArgumentParser, doc: str) -> None:
    text = (DOCS / doc).read_text()
    missing = sorted(f for f in flags(parser) if not re.search(rf"(?<![\w-]){f}(?![\w-])", text))
    assert not missing, f"{doc} does not document {missing}"


def config_keys(text: str) -> set[str]:
    """Every ``key =`` assignment in a TOML example, commented out or not."""
    return set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, re.M))


def test_every_config_key_is_documented() -> None:
    from lloom.executor import config
    from lloom.node.settings import ROLE_KEYS

    example = (DOCS.parent / "config.toml.example").read_text()
    doc = (DOCS / "executor.md").read_text()
    fields: set[str] = set()
    fields |= set(ROLE_KEYS["executor"]) | set(config.ChainSection.__dataclass_fields__)
    fields |= {"name", "base_url", "models", "api_key", "api_key_env", "timeout_secs"}
    fields |= {"allow_remote_media"}
    limits = set(Limits.__dataclass_fields__)
    fields |= limits - {"first_frame_timeout_secs", "receipt_timeout_secs"}
    missing_example = sorted(fields - config_keys(example))
    missing_doc = sorted(f for f in fields if f"`{f}`" not in doc and f".{f}`" not in doc)
    assert not missing_example, f"config.toml.example lacks {missing_example}"
    assert not missing_doc, f"docs/executor.md lacks {missing_doc}"
