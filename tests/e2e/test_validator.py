"""Validators, providers and lookups as real processes on 127.0.0.1 (port 0)."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.support.procs import Processes, script, start_validator

pytestmark = pytest.mark.e2e

#: How soon a killed provider must be gone from lookups. Measured: ~0.2 s (the validator
#: sees the TCP connection close at once and forgets the peer after py-libp2p's 0.1 s
#: connection clean-up). Documented in docs/node.md.
DEAD_PROVIDER_BOUND_S = 3.0


def lookup(procs: Processes, bootstrap: str, *extra: str) -> dict[str, object]:
    """Run ``lloom dht providers --json`` and return its document."""
    result = procs.run(
        "finder",
        [script("lloom"), "dht", "providers", "--bootstrap-nodes", bootstrap, "--json", *extra],
    )
    assert result.returncode in (0, 1), result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def provider_ids(doc: dict[str, object]) -> set[str]:
    providers = doc["providers"]
    assert isinstance(providers, list)
    return {p["peer_id"] for p in providers}


def start_provider(procs: Processes, name: str, bootstrap: str, *extra: str) -> str:
    proc = procs.start(
        name, [script("lloom"), "dht", "provide", "--bootstrap-nodes", bootstrap, *extra]
    )
    return proc.wait_ready().peer_id


def test_ready_line_and_clean_shutdown(procs: Processes) -> None:
    proc, ready = start_validator(procs)
    assert ready.role == "validator"
    assert ready.listen and all(a.endswith(f"/p2p/{ready.peer_id}") for a in ready.listen)
    assert all(a.startswith("/ip4/127.0.0.1/tcp/") for a in ready.listen)
    proc.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert proc.wait_exit(15) == 0


def test_provider_found_dialled_and_gone_after_kill(procs: Processes) -> None:
    _, v = start_validator(procs)
    boot = v.listen[0]
    provider = procs.start(
        "provider", [script("lloom"), "dht", "provide", "--bootstrap-nodes", boot]
    )
    pid = provider.wait_ready().peer_id

    doc = lookup(procs, boot, "--dial")
    providers = doc["providers"]
    assert isinstance(providers, list)
    assert [p["peer_id"] for p in providers] == [pid]
    assert "ping_ms" in providers[0], providers[0]
    assert providers[0]["path"] == "direct", providers[0]

    provider.kill()
    killed_at = time.monotonic()
    while pid in provider_ids(lookup(procs, boot)):
        assert time.monotonic() - killed_at < DEAD_PROVIDER_BOUND_S, "dead provider still found"


def test_bad_bootstrap_address_is_a_usage_error(procs: Processes) -> None:
    result = procs.run(
        "bad", [script("lloom-validator"), "--bootstrap-nodes", "/ip4/127.0.0.1/tcp/1"]
    )
    assert result.returncode == 2
    assert "must end in /p2p/" in result.stderr


def test_bad_key_is_a_usage_error(procs: Processes) -> None:
    result = procs.run("bad", [script("lloom-validator"), "--private-key", "0x1234"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: private key must be 32 bytes (64 hex digits), got 4 characters"
    ]


def test_two_validators_form_one_dht(procs: Processes) -> None:
    _, v1 = start_validator(procs, "v1")
    _, v2 = start_validator(procs, "v2", bootstrap=[v1.listen[0]])
    a = start_provider(procs, "provider-a", v1.listen[0], "--model", "m1")
    b = start_provider(procs, "provider-b", v2.listen[0], "--model", "m1")
    for boot in (v1.listen[0], v2.listen[0]):
        assert provider_ids(lookup(procs, boot, "--model", "m1")) == {a, b}
        assert provider_ids(lookup(procs, boot, "--model", "other")) == set()
