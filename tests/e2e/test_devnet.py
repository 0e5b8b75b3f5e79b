"""``lloom devnet`` as a person runs it: the real SmolLM2 model answering through the gateway
with its usage settled on anvil; Ctrl-C stopping every child; a second run reusing the chain
and the contract; leftovers of a killed devnet cleaned up; a second devnet refused."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lloom.devnet.layout import Layout, read_state
from lloom.devnet.supervisor import end_leftover
from tests.support.network import start_mock
from tests.support.procs import Proc, Processes, script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
MODEL_PYTHON = ROOT / ".venv-model" / "bin" / "python"


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """The devnet's data dir; whatever a killed devnet recorded is ended by PID afterwards."""
    path = tmp_path / "devnet"
    yield path
    if (Layout(path).state).exists():
        running = read_state(Layout(path)).running
        for child in running.children.values() if running else ():
            end_leftover(child.pid, child.argv)


def start_devnet(procs: Processes, name: str, data_dir: Path, *flags: str) -> Proc:
    """Start ``lloom devnet`` on ports chosen by the OS; wait until it says it is ready."""
    argv = [
        script("lloom"),
        "devnet",
        "--data-dir",
        str(data_dir),
        "--rpc-port",
        "0",
        "--p2p-port",
        "0",
        "--gateway-port",
        "0",
        "--settle-interval",
        "3600",
        *flags,
    ]
    home = procs.root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {"HOME": str(home), "DEVNET_BACKEND_KEY": "sk-devnet-test"}
    proc = procs.start(name, argv, env=env)
    proc.wait_for_line(lambda s: s.startswith("devnet ready "), timeout=240)
    return proc


def running(data_dir: Path) -> Any:
    state = read_state(Layout(data_dir))
    assert state.running is not None
    return state


def usage(procs: Processes, rpc_url: str, contract: str) -> dict[str, Any]:
    result = procs.run(
        "usage", [script("lloom"), "usage", "--rpc-url", rpc_url, "--contract", contract, "--json"]
    )
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_real_model_answers_and_usage_is_settled(procs: Processes, data_dir: Path) -> None:
    assert MODEL_PYTHON.exists(), f"{MODEL_PYTHON} missing: run make model (make test does)"
    devnet = start_devnet(procs, "devnet", data_dir, "--model-python", str(MODEL_PYTHON))
    state = running(data_dir)
    run = state.running
    sdk = openai.OpenAI(base_url=run.gateway_url, api_key="unused", max_retries=0, timeout=120)

    reply = sdk.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=24,
        temperature=0,
    )
    text = reply.choices[0].message.content
    assert text and text.strip(), reply
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in sdk.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=24,
            stream=True,
        )
        if chunk.choices
    ]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip()

    os.kill(devnet.pid, signal.SIGUSR1)  # the devnet relays it: settle now
    devnet.wait_for_line(lambda s: s.startswith("executor: settlement confirmed"), timeout=60)
    settled = usage(procs, run.rpc_url, state.contract)
    assert settled["total"] > 0
    assert set(settled["totals_by_executor"]) == {run.executor_address}

    children = [c.pid for c in run.children.values()]
    assert len(children) == 5 and all(alive(pid) for pid in children)
    os.kill(devnet.pid, signal.SIGINT)  # what Ctrl-C sends
    assert devnet.wait_exit(timeout=60) == 0
    assert not any(alive(pid) for pid in children)
    assert read_state(Layout(data_dir)).running is None

    again = start_devnet(procs, "devnet-2", data_dir, "--model-python", str(MODEL_PYTHON))
    assert f"reusing Accounting at {state.contract}" in "\n".join(again.lines)
    second = running(data_dir)
    assert second.contract == state.contract
    assert usage(procs, second.running.rpc_url, state.contract)["total"] == settled["total"]


def test_killed_devnet_leftovers_are_ended_and_a_second_devnet_refused(
    procs: Processes, data_dir: Path
) -> None:
    _, backend = start_mock(procs, "mock", "--api-key", "sk-devnet-test")
    flags = ["--backend-url", backend, "--model", "devnet-model", "--backend-model", "mock-a"]
    flags += ["--backend-api-key-env", "DEVNET_BACKEND_KEY"]
    first = start_devnet(procs, "devnet", data_dir, *flags)
    run = running(data_dir).running
    children = run.children

    # The executor found the backend's key in its environment, not in its config file.
    reply = httpx.post(
        run.gateway_url + "/chat/completions",
        json={"model": "devnet-model", "messages": [{"role": "user", "content": "keyed"}]},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "Echo: keyed"
    assert "sk-devnet-test" not in (data_dir / "executor.toml").read_text()

    refused = procs.run("devnet-again", [script("lloom"), "devnet", "--data-dir", str(data_dir)])
    assert refused.returncode == 1
    assert "another lloom devnet" in refused.stderr

    first.kill()  # SIGKILL: no chance to stop its children
    assert all(alive(c.pid) for c in children.values())

    second = start_devnet(procs, "devnet-2", data_dir, *flags)
    for name, child in children.items():
        assert f"stopped {name} (pid {child.pid}) left running" in "\n".join(second.lines)
        assert not alive(child.pid)
    os.kill(second.pid, signal.SIGTERM)
    assert second.wait_exit(timeout=60) == 0


def test_missing_model_fails_before_starting_anything(procs: Processes, tmp_path: Path) -> None:
    result = procs.run(
        "devnet",
        [
            script("lloom"),
            "devnet",
            "--data-dir",
            str(tmp_path / "d"),
            "--model-python",
            sys.executable,
        ],
    )
    assert result.returncode == 1
    assert "make model" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "d" / "logs").exists()
