"""The executor's config file: every error names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lloom.errors import ConfigError
from lloom.executor.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
[[backends]]
name = "a"
base_url = "http://127.0.0.1:8080/v1"
models = ["m1", "m2"]

[[backends]]
name = "b"
base_url = "https://api.example.com/v1"
models = { "net" = "backend/id" }
api_key_env = "KEY_B"
timeout_secs = 5

[limits]
max_concurrent_requests = 2
"""


def test_good_config() -> None:
    cfg = parse_config(GOOD, env={"KEY_B": "sk-secret"})
    assert cfg.served_models() == ["m1", "m2", "net"]
    b = cfg.backend_for("net")
    assert b is not None and b.models == {"net": "backend/id"} and b.timeout == 5
    assert b.api_key == "sk-secret"
    assert "sk-secret" not in repr(cfg)
    assert cfg.limits.max_concurrent_requests == 2
    assert cfg.limits.request_timeout_secs == 300
    assert cfg.chain is None
    assert cfg.backend_for("zzz") is None


def test_example_config_parses() -> None:
    cfg = load_config(ROOT / "config.toml.example", env={"OPENAI_API_KEY": "sk-x"})
    assert "smollm2" in cfg.served_models()
    assert cfg.limits.max_request_bytes == 1048576


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "backends: is required"),
        ("backends = []", "backends: at least one"),
        ("[[backends]]\nname = 1", "backends[0].name: expected a string"),
        ('[[backends]]\nname = "a"', "backends[0].base_url: is required"),
        (
            '[[backends]]\nname = "a"\nbase_url = "ftp://x"\nmodels = ["m"]',
            "backends[0].base_url: must be an http",
        ),
        (
            '[[backends]]\nname = "a"\nbase_url = "http://x/v1"\nmodels = []',
            "backends[0].models: must name at least one",
        ),
        (
            '[[backends]]\nname = "a"\nbase_url = "http://x/v1"\nmodels = ["bad id"]',
            "backends[0].models: invalid model id",
        ),
        (
            '[[backends]]\nname = "a"\nbase_url = "http://x/v1"\nmodels = ["m"]\nmodle = 1',
            "backends[0]: unknown field 'modle'",
        ),
        (
            '[[backends]]\nname = "a"\nbase_url = "http://x/v1"\nmodels = ["m"]\n'
            'api_key = "k"\napi_key_env = "E"',
            "not both",
        ),
        (
            '[[backends]]\nname = "a"\nbase_url = "http://x/v1"\nmodels = ["m"]\n'
            'api_key_env = "MISSING_VAR"',
            "backends[0].api_key_env: environment variable MISSING_VAR is not set",
        ),
        (
            '[[backends]]\nname = "a"\nbase_url = "http://x/v1"\nmodels = ["m"]\n'
            '[[backends]]\nname = "a"\nbase_url = "http://y/v1"\nmodels = ["n"]',
            "backends[1].name: duplicate",
        ),
        (GOOD + "max_conn = 3", "limits: unknown field 'max_conn'"),
        (
            GOOD.replace("max_concurrent_requests = 2", "max_concurrent_requests = 0"),
            "limits.max_concurrent_requests: must be positive",
        ),
        (
            GOOD.replace("max_concurrent_requests = 2", "max_concurrent_requests = true"),
            "limits.max_concurrent_requests: expected an integer",
        ),
        (GOOD + "[node]\nlisten = [1]", "node.listen: expected a list of strings"),
        (GOOD + '[chain]\nrpc_url = "http://x"', "chain.contract_address: is required"),
        (
            GOOD + '[chain]\nrpc_url = "http://x"\ncontract_address = "0x12"',
            "chain.contract_address: must be a 0x-prefixed",
        ),
        (
            GOOD + '[chain]\nrpc_url = "http://x"\ncontract_address = "0x' + "1" * 40 + '"\n'
            'mode = "fast"',
            "chain.mode: must be",
        ),
        ("surprise = 1\n" + GOOD, "(top level): unknown field 'surprise'"),
        ("[[backends]\n", "invalid TOML"),
    ],
)
def test_bad_configs_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "cfg.toml", env={"KEY_B": "k"})
    assert str(info.value).startswith("cfg.toml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_secret_never_in_errors() -> None:
    text = '[[backends]]\nname = "a"\napi_key = "sk-very-secret"\nmodels = ["m"]'
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert "sk-very-secret" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_chain_section() -> None:
    cfg = parse_config(
        GOOD
        + '[chain]\nrpc_url = "http://127.0.0.1:8545"\ncontract_address = "0x'
        + "a" * 40
        + '"\nconfirmations = 2',
        env={"KEY_B": "k"},
    )
    assert cfg.chain is not None
    assert cfg.chain.confirmations == 2 and cfg.chain.mode == "verified"
    assert cfg.chain.batch_interval_secs == 300
