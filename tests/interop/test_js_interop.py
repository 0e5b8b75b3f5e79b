"""Interop with js-libp2p: a js node dials our validator, identifies and pings it, and
finds a Python provider through it. Runs ``tests/interop/js/probe.mjs`` with node."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lloom.dhtkeys import EXECUTOR_ROLE_NAME, cid_key, cid_string
from tests.support.procs import Processes, script, start_validator

pytestmark = [pytest.mark.interop, pytest.mark.e2e, pytest.mark.timeout(120)]

JS = Path(__file__).resolve().parent / "js"


def run_probe(procs: Processes, addr: str, *key_args: str) -> dict[str, object]:
    node = shutil.which("node")
    assert node, "node is required (make test installs the npm packages it needs)"
    assert (JS / "node_modules").is_dir(), "run make npm (make test does) first"
    result = procs.run(
        "js-probe",
        [node, str(JS / "probe.mjs"), "--addr", addr, *key_args, "--timeout-ms", "20000"],
        timeout=60,
    )
    assert result.stdout.strip(), f"probe printed nothing; stderr:\n{result.stderr[-4000:]}"
    doc: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, f"{doc}\n{result.stderr[-4000:]}"
    return doc


def test_js_node_identifies_pings_and_finds_python_provider(procs: Processes) -> None:
    _, validator = start_validator(procs)
    boot = validator.listen[0]
    provider = procs.start(
        "provider", [script("lloom"), "dht", "provide", "--bootstrap-nodes", boot]
    ).wait_ready()

    doc = run_probe(procs, boot, "--name", EXECUTOR_ROLE_NAME)
    assert doc["connected"] is True
    assert doc["remote_peer"] == validator.peer_id
    protocols = doc["protocols"]
    assert isinstance(protocols, list)
    assert "/ipfs/kad/1.0.0" in protocols
    assert "/ipfs/ping/1.0.0" in protocols
    assert isinstance(doc["ping_ms"], int | float)
    providers = doc["providers"]
    assert isinstance(providers, list)
    assert provider.peer_id in {p["peer_id"] for p in providers}

    # The CID text form computed in Python is the one js computes from the name.
    doc2 = run_probe(procs, boot, "--key", cid_string(cid_key(EXECUTOR_ROLE_NAME)))
    providers2 = doc2["providers"]
    assert isinstance(providers2, list)
    assert provider.peer_id in {p["peer_id"] for p in providers2}
