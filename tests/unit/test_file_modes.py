"""Data dirs 0700, databases and configs 0600; a key file others can read is refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from lloom.client.receipts import Ledger
from lloom.errors import ConfigError, IdentityError
from lloom.executor.config import load_config
from lloom.executor.usage import UsageStore
from lloom.identity import Identity
from lloom.paths import private_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_usage_store_and_ledger_are_private(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "data" / "executor" / "usage.sqlite")
    ledger = Ledger(tmp_path / "client" / "ledger.sqlite")
    try:
        for folder in (tmp_path / "data", tmp_path / "data" / "executor", tmp_path / "client"):
            assert mode(folder) == 0o700
        for db in tmp_path.rglob("*.sqlite*"):
            assert mode(db) == 0o600, db
    finally:
        store.close()
        ledger.close()


def test_an_existing_open_data_dir_is_tightened(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    private_dir(folder)
    assert mode(folder) == 0o700


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    Identity.generate().write_key_file(path)
    assert mode(path) == 0o600
    Identity.from_key_file(path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match=r"chmod 600 .*node\.key"):
        Identity.from_key_file(path)


CONFIG = """
[[backends]]
name = "b"
base_url = "http://127.0.0.1:1/v1"
models = ["m"]
{key}
"""


def test_config_holding_a_key_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(key='api_key = "secret-value"'))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        load_config(path)
    assert "secret-value" not in str(info.value)
    path.chmod(0o600)
    assert load_config(path).backends[0].api_key == "secret-value"
    # Without a key in it, a config may be world-readable.
    path.write_text(CONFIG.format(key='api_key_env = "K"'))
    path.chmod(0o644)
    assert load_config(path, env={"K": "v"}).backends[0].api_key == "v"
