"""The request path with real processes: validator, mock backends, executors, the client."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from lloom.identity import Identity
from tests.e2e.test_accounting import billed
from tests.support.network import start_executor, start_mock, start_validator
from tests.support.procs import Processes, script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLIENT_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
CLIENT_ADDR = Identity.from_hex(CLIENT_KEY).address


def client(
    procs: Processes, boot: str, model: str, prompt: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return procs.run(
        "client",
        [
            script("lloom-client"),
            "--private-key",
            CLIENT_KEY,
            "--bootstrap-nodes",
            boot,
            "--model",
            model,
            "--prompt",
            prompt,
            *extra,
        ],
    )


def usage_rows(data_dir: Path) -> list[tuple[str, str, int, int]]:
    db = sqlite3.connect(data_dir / "usage.sqlite3")
    try:
        return db.execute(
            "SELECT client_address, model, prompt_tokens, completion_tokens FROM usage "
            "ORDER BY created_at"
        ).fetchall()
    finally:
        db.close()


def test_answers_route_by_model_and_record_usage(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    boot = v.listen[0]
    _, _, dir_a = start_executor(procs, "exec-a", boot, url, ["mock-a"])
    _, eb, dir_b = start_executor(procs, "exec-b", boot, url, ["mock-b"])

    result = client(procs, boot, "mock-a", "hello there world")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Echo: hello there world\n"

    for _ in range(3):
        result = client(procs, boot, "mock-b", "which one", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["executor"] == eb.peer_id
        assert doc["text"] == "Echo: which one"
        prompt, completion = billed("which one")
        assert doc["usage"] == {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        assert doc["backend_usage"]["prompt_tokens"] == 2  # the mock's own count, reported

    result = client(procs, boot, "mock-a", "non streaming", "--no-stream")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Echo: non streaming\n"

    assert usage_rows(dir_a) == [
        (CLIENT_ADDR, "mock-a", *billed("hello there world")),
        (CLIENT_ADDR, "mock-a", *billed("non streaming")),
    ]
    assert usage_rows(dir_b) == [(CLIENT_ADDR, "mock-b", *billed("which one"))] * 3


def test_unknown_model_is_a_clear_error(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    result = client(procs, v.listen[0], "no-such-model", "hi")
    assert result.returncode == 3
    assert result.stderr.strip().endswith("error: no executor serves model 'no-such-model'")
    assert result.stdout == ""


def test_bad_arguments_exit_2(procs: Processes) -> None:
    result = client(procs, "/ip4/127.0.0.1/tcp/1", "m", "hi")
    assert result.returncode == 2
    assert "/p2p/" in result.stderr
    result = client(
        procs,
        "/ip4/127.0.0.1/tcp/1/p2p/16Uiu2HAmMUjGmiUhJeiZgu6ZZnLRkE2VViR2JgjqtW9aTZnHQqgg",
        "m",
        "hi",
        "--temperature",
        "9",
    )
    assert result.returncode == 2
    assert "temperature" in result.stderr


def test_streaming_is_incremental(procs: Processes) -> None:
    _, url = start_mock(
        procs, "slow-mock", "--chunk-delay-ms", "400", "--reply", "one two three four"
    )
    _, v = start_validator(procs)
    start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    proc = procs.start(
        "streaming-client",
        [
            script("lloom-client"),
            "--private-key",
            CLIENT_KEY,
            "--bootstrap-nodes",
            v.listen[0],
            "--model",
            "mock-a",
            "--prompt",
            "go",
        ],
    )
    # The answer is one line, complete only at the end: watch the raw bytes arrive.
    first = proc.wait_for_output(b"one", timeout=30)
    assert b"four" not in first, "the whole answer arrived at once"
    assert proc.popen is not None and proc.popen.poll() is None
    proc.wait_for_output(b"four", timeout=30)
    assert proc.wait_exit(30) == 0
    assert bytes(proc.raw) == b"one two three four\n"


def test_usage_billed_when_backend_reports_none(procs: Processes) -> None:
    _, url = start_mock(procs, "mock-no-usage", "--no-usage")
    _, v = start_validator(procs)
    _, _, data_dir = start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    result = client(procs, v.listen[0], "mock-a", "count me please", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["backend_usage"] is None
    prompt, completion = billed("count me please")
    assert doc["usage"]["prompt_tokens"] == prompt
    assert doc["usage"]["completion_tokens"] == completion
    assert usage_rows(data_dir) == [(CLIENT_ADDR, "mock-a", prompt, completion)]


def test_sigkill_loses_no_answered_usage(procs: Processes) -> None:
    _, url = start_mock(procs)
    _, v = start_validator(procs)
    proc, _, data_dir = start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    for i in range(5):
        result = client(procs, v.listen[0], "mock-a", f"request {i}", "--no-stream")
        assert result.returncode == 0, result.stderr
    proc.kill()
    assert len(usage_rows(data_dir)) == 5


def test_failure_after_tokens_is_reported(procs: Processes) -> None:
    reply = ["--reply", "one two three four five six seven eight"]
    _, url = start_mock(procs, "slow-mock", "--chunk-delay-ms", "300", *reply)
    _, v = start_validator(procs)
    executor, _, _ = start_executor(procs, "exec", v.listen[0], url, ["mock-a"])
    proc = procs.start(
        "streaming-client",
        [
            script("lloom-client"),
            "--private-key",
            CLIENT_KEY,
            "--bootstrap-nodes",
            v.listen[0],
            "--model",
            "mock-a",
            "--prompt",
            "go",
        ],
    )
    proc.wait_for_output(b"two", timeout=30)
    executor.kill()
    assert proc.wait_exit(30) == 6
    assert b"eight" not in bytes(proc.raw)
    assert "failed after" in proc.log_path.read_text()


def test_executor_metrics_endpoint(procs: Processes) -> None:
    import httpx

    _, url = start_mock(procs)
    _, v = start_validator(procs)
    _, ready, _ = start_executor(
        procs, "exec", v.listen[0], url, ["mock-a"], node_extra='metrics_listen = "127.0.0.1:0"'
    )
    metrics_at = ready.get("metrics")
    assert metrics_at
    assert client(procs, v.listen[0], "mock-a", "count me").returncode == 0
    assert client(procs, v.listen[0], "nope", "x").returncode == 3
    text = httpx.get(f"http://{metrics_at}/metrics").text
    assert 'lloom_executor_requests_total{model="mock-a"} 1.0' in text
    completion = billed("count me")[1]
    assert f'lloom_executor_tokens_total{{kind="completion",model="mock-a"}} {completion}.0' in text
    assert "lloom_executor_settlement_halted 0.0" in text
    assert "lloom_executor_active_requests 0.0" in text
