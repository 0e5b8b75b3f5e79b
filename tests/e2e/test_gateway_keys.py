"""A gateway with API keys, as real processes: anonymous callers spend nothing.

An anonymous request gets 401 and nothing is signed or even sent to an executor; a
`text/plain` POST and a foreign Host are refused; a keyed request is answered, signed, and
its `x-request-id` is in the executor's usage row. Without keys the gateway refuses to
listen beyond loopback.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from lloom.gateway.keys import new_key
from tests.e2e.test_accounting import EXECUTOR_KEY, chain_section, deploy
from tests.support.anvil import ANVIL_CHAIN_ID, start_anvil
from tests.support.network import (
    eventually,
    start_executor,
    start_gateway,
    start_mock,
    start_validator,
)
from tests.support.procs import Processes, script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

BODY = {"model": "mock-a", "messages": [{"role": "user", "content": "who pays?"}]}


def usage_rows(data_dir: Path) -> list[tuple[str | None, str | None]]:
    db = sqlite3.connect(data_dir / "usage.sqlite3")
    try:
        return db.execute("SELECT client_request_id, receipt FROM usage").fetchall()
    finally:
        db.close()


def test_a_keyed_gateway_spends_nothing_for_strangers(procs: Processes, tmp_path: Path) -> None:
    _, rpc = start_anvil(procs)
    contract = deploy(procs, rpc)
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    _, _, data_dir = start_executor(
        procs,
        "exec",
        v.listen[0],
        url,
        ["mock-a"],
        extra=chain_section(rpc, contract),
        key=EXECUTOR_KEY,
    )
    key = new_key()
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.alice]\nkey = "{key}"\nrequests_per_minute = 100\n')
    keys.chmod(0o600)
    _, base = start_gateway(
        procs,
        v.listen[0],
        "--keys-file",
        str(keys),
        "--chain-id",
        str(ANVIL_CHAIN_ID),
        "--contract",
        contract,
    )
    with httpx.Client(base_url=base, timeout=60) as http:
        anonymous = http.post("/chat/completions", json=BODY)
        assert anonymous.status_code == 401
        wrong = http.post("/chat/completions", json=BODY, headers={"authorization": "Bearer x"})
        assert wrong.status_code == 401
        auth = {"authorization": f"Bearer {key}"}
        plain = http.post(
            "/chat/completions", content=b"{}", headers={**auth, "content-type": "text/plain"}
        )
        assert plain.status_code == 415
        rebound = http.post(
            "/chat/completions", json=BODY, headers={**auth, "host": "evil.example:80"}
        )
        assert rebound.status_code == 403
        assert usage_rows(data_dir) == []  # nothing reached the executor, nothing was signed
        good = http.post("/chat/completions", json=BODY, headers=auth)
        assert good.status_code == 200, good.text
        assert good.headers["x-ratelimit-limit-requests"] == "100"
        request_id = good.headers["x-request-id"]
        metrics = http.get(base.removesuffix("/v1") + "/metrics", headers=auth).text
    eventually(lambda: usage_rows(data_dir) == [(request_id, "signed")], what="signed row")
    assert 'lloom_gateway_key_requests_total{key="alice"} 1.0' in metrics
    report = procs.run(
        "keys-usage",
        [
            script("lloom"),
            "keys",
            "usage",
            "--db",
            str(procs.root / "gateway" / "data" / "gateway-keys.sqlite3"),
            "--json",
        ],
    )
    assert report.returncode == 0, report.stderr
    assert '"key": "alice"' in report.stdout and '"requests": 1' in report.stdout


def test_no_keys_no_listening_beyond_loopback(procs: Processes) -> None:
    _, v = start_validator(procs)
    result = procs.run(
        "gateway-open",
        [
            script("lloom-client"),
            "gateway",
            "--listen",
            "0.0.0.0:0",
            "--bootstrap-nodes",
            v.listen[0],
        ],
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in result.stderr
