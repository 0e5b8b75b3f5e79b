"""The ``[node]`` section every role reads, and the node flags over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lloom.cli.node_args import settings_from_args
from lloom.errors import ConfigError, UsageError
from lloom.executor.cli import build_parser as executor_parser
from lloom.gateway.cli import build_parser as gateway_parser
from lloom.node.relay import RelaySettings
from lloom.node.settings import NodeSettings, load_node_settings, parse_node
from lloom.validator.cli import build_parser as validator_parser

BOOT = "/ip4/127.0.0.1/tcp/4001/p2p/16Uiu2HAmSqLqhcgr3hmRsqT2CRbp7MjaX5FrGcgKJYVHnQNyasPX"


def test_a_validator_file_sets_node_and_relay_limits(tmp_path: Path) -> None:
    path = tmp_path / "validator.toml"
    path.write_text(
        f'[node]\nlisten = ["/ip4/0.0.0.0/tcp/4001"]\nbootstrap = ["{BOOT}"]\n'
        "[node.relay]\nmax_reservations = 10\nmax_reservations_per_ip = 2\n"
        "circuit_duration_secs = 0\n"
    )
    settings = load_node_settings(path, "validator")
    assert settings.relay == RelaySettings(
        max_reservations=10, max_reservations_per_ip=2, circuit_duration_secs=0
    )
    config = settings.node_config()
    assert config.dht_server and config.relay == settings.relay and not config.hole_punch
    assert [str(a) for a in config.bootstrap] == [BOOT]


@pytest.mark.parametrize(
    ("role", "table", "message"),
    [
        ("executor", {"relay": {}}, "node: unknown field 'relay' (a executor does not use it)"),
        ("validator", {"mdns": True}, "unknown field 'mdns' (a validator does not use it)"),
        ("client", {"metrics_listen": "127.0.0.1:1"}, "unknown field 'metrics_listen'"),
        ("gateway", {"colour": "red"}, "node: unknown field 'colour'"),
        ("executor", {"reachability": "maybe"}, "node.reachability: must be 'auto'"),
        ("executor", {"mdns": "yes"}, "node.mdns: expected true or false"),
        ("validator", {"relay": {"max_circuits": 0}}, "max_circuits must be at least 1"),
        ("validator", {"relay": {"reservation_ttl_secs": 30}}, "at least 120"),
        ("validator", {"relay": {"circuit_bytes": -1}}, "must be zero or more"),
        ("validator", {"relay": {"nope": 1}}, "node.relay: unknown field 'nope'"),
        ("executor", {"listen": "/ip4/0.0.0.0/tcp/1"}, "node.listen: expected a list"),
    ],
)
def test_bad_node_sections_are_one_line_errors(role: str, table: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_node("f.toml", table, role)
    assert message in str(err.value) and str(err.value).startswith("f.toml: ")


def test_a_validator_file_holds_only_node(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text("[node]\n[[backends]]\nname = 'x'\n")
    with pytest.raises(ConfigError, match="holds only \\[node\\]"):
        load_node_settings(path, "validator")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_node_settings(tmp_path / "missing.toml", "validator")


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text('[node]\nlisten = ["/ip4/0.0.0.0/tcp/4001"]\n')
    args = validator_parser().parse_args(
        ["--config", str(path), "--listen-address", "/ip4/127.0.0.1/tcp/0", "--no-relay"]
    )
    settings = settings_from_args(args, "validator")
    assert settings.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert not settings.relay.enabled and settings.node_config().relay is None


def test_executor_flags_over_its_config_section() -> None:
    base = NodeSettings.defaults("executor").override(bootstrap=(BOOT,))
    args = executor_parser().parse_args(
        ["--config", "c.toml", "--reachability", "private", "--mdns", "--no-hole-punch"]
    )
    settings = settings_from_args(args, "executor", base=base)
    assert settings.bootstrap == (BOOT,)  # from the file: no flag given
    assert (settings.reachability, settings.mdns, settings.hole_punch) == ("private", True, False)
    config = settings.node_config()
    assert config.reachability == "private" and config.mdns and not config.hole_punch


def test_a_node_needs_validators_or_mdns() -> None:
    with pytest.raises(UsageError, match=r"--bootstrap-nodes .* or --mdns"):
        settings_from_args(gateway_parser().parse_args([]), "gateway")
    lan = settings_from_args(gateway_parser().parse_args(["--mdns"]), "gateway")
    assert lan.mdns and not lan.bootstrap
    boot = settings_from_args(gateway_parser().parse_args(["--bootstrap-nodes", BOOT]), "gateway")
    assert boot.bootstrap == (BOOT,)


def test_bad_multiaddrs_are_usage_errors() -> None:
    settings = NodeSettings.defaults("client").override(bootstrap=("/ip4/1.2.3.4/tcp/1",))
    with pytest.raises(UsageError, match="must end in /p2p/<PeerId>"):
        settings.node_config()


def test_client_and_gateway_share_one_data_dir_other_roles_their_own() -> None:
    assert NodeSettings.defaults("client").data_dir == NodeSettings.defaults("gateway").data_dir
    assert NodeSettings.defaults("executor").data_dir.name == "executor"
    assert NodeSettings.defaults("validator").data_dir.name == "validator"
