"""The devnet's pure pieces: its state file, the executor config it writes, its snippets,
and the check that keeps it from touching a process it did not start."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lloom.cli.main import main as lloom_main
from lloom.devnet.layout import (
    Child,
    DevnetState,
    Layout,
    Running,
    executor_config,
    read_state,
    snippets,
    summary,
    write_state,
)
from lloom.devnet.supervisor import end_leftover, still_ours
from lloom.devnet.tools import find_embedded_model
from lloom.errors import DevnetError
from lloom.executor.config import parse_config


def running(data_dir: str = "/tmp/dn/cli") -> Running:
    return Running(
        pid=42,
        rpc_url="http://127.0.0.1:8545",
        validator="/ip4/127.0.0.1/tcp/4001/p2p/16Uiu2HAmXYZ",
        executor_peer_id="16Uiu2HAmABC",
        executor_address="0x" + "11" * 20,
        backend_url="http://127.0.0.1:9000/v1",
        gateway_url="http://127.0.0.1:8080/v1",
        model="smollm2",
        cli_key_file=data_dir + "/../keys/cli.key",
        cli_data_dir=data_dir,
        children={"anvil": Child(pid=7, argv=["anvil", "--port", "0"])},
    )


def test_state_round_trips(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert read_state(layout) == DevnetState()  # first run: nothing yet
    state = DevnetState(chain_id=31337, contract="0x" + "ab" * 20, running=running())
    write_state(layout, state)
    assert read_state(layout) == state
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"version": 99}', "unknown layout"),
        ('{"version": 1, "chain_id": "x"}', "malformed"),
        ('{"version": 1, "running": {"pid": 1}}', "malformed"),
    ],
)
def test_unreadable_state_is_an_error_not_replaced(tmp_path: Path, text: str, message: str) -> None:
    layout = Layout(tmp_path)
    layout.state.write_text(text)
    with pytest.raises(DevnetError, match=message):
        read_state(layout)
    assert layout.state.read_text() == text


def config_text(data_dir: Path, **overrides: Any) -> str:
    """The devnet's executor config, with ``overrides`` over typical values."""
    args: dict[str, Any] = {
        "listen": "/ip4/127.0.0.1/tcp/0",
        "data_dir": data_dir,
        "backend_url": "http://127.0.0.1:9000/v1",
        "model": "smollm2",
        "backend_model": "SmolLM2-135M",
        "rpc_url": "http://127.0.0.1:8545",
        "contract": "0x" + "ab" * 20,
        "settle_interval": 7.5,
    }
    return executor_config(**(args | overrides))


def test_executor_config_is_valid_for_the_executor(tmp_path: Path) -> None:
    text = config_text(tmp_path / 'odd "dir"')
    config = parse_config(text, env={})
    assert config.node.data_dir == tmp_path / 'odd "dir"'
    (backend,) = config.backends
    assert dict(backend.models) == {"smollm2": "SmolLM2-135M"}
    assert config.chain is not None
    assert config.chain.batch_interval_secs == 7.5
    assert config.chain.contract_address.lower() == "0x" + "ab" * 20


def test_summary_names_every_endpoint(tmp_path: Path) -> None:
    run = running()
    state = DevnetState(chain_id=31337, contract="0x" + "ab" * 20, running=run)
    text = summary(run, state, tmp_path, 3.6)
    assert "lloom devnet is up (3.6 s)" in text and "chain id 31337" in text
    for value in (run.rpc_url, run.validator, run.gateway_url, run.backend_url, state.contract):
        assert str(value) in text
    assert "kill -USR1 42" in text  # the devnet's own PID, from the recorded state


def test_snippets_are_pasteable() -> None:
    text = snippets(running("/tmp/my dir/cli"), "0x" + "ab" * 20, 4242)
    assert "http://127.0.0.1:8080/v1/chat/completions" in text
    assert 'OpenAI(base_url="http://127.0.0.1:8080/v1"' in text
    assert "kill -USR1 4242" in text
    client = next(line.strip() for line in text.splitlines() if "lloom-client" in line)
    words = shlex.split(client)
    assert words[0] == "LLOOM_DATA_DIR=/tmp/my dir/cli"  # an assignment, even with a space
    assert words[1] == "lloom-client" and "--bootstrap-nodes" in words
    curl = next(line for line in text.splitlines() if line.strip().startswith("-d "))
    assert '"model": "smollm2"' in shlex.split(curl.strip())[1]


def test_leftover_check_never_touches_another_program() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = subprocess.Popen(argv)
    try:
        # The kernel shows the new command line once the child has exec'd: wait for it.
        deadline = time.monotonic() + 10
        while not still_ours(proc.pid, argv) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert still_ours(proc.pid, argv)
        assert not still_ours(proc.pid, [*argv, "other"])
        assert not end_leftover(proc.pid, [sys.executable, "-c", "something else"])
        assert proc.poll() is None
        assert end_leftover(proc.pid, argv)
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not still_ours(proc.pid, argv)


def test_missing_model_python_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DevnetError, match="make model"):
        find_embedded_model(Path(sys.executable), None)  # this venv has no llama_cpp
    with pytest.raises(DevnetError, match="not an executable"):
        find_embedded_model(tmp_path / "nope", None)


def test_devnet_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        lloom_main(["devnet", "--rpc-port", "70000"])
    assert "not a TCP port" in capsys.readouterr().err
    assert lloom_main(["devnet", "--host", "localhost"]) == 2
    assert "IPv4" in capsys.readouterr().err
    assert lloom_main(["devnet", "--model-threads", "0"]) == 2


def test_a_backend_key_is_named_never_written(tmp_path: Path) -> None:
    text = config_text(
        tmp_path, backend_url="https://api.openai.com/v1", api_key_env="DEVNET_TEST_KEY"
    )
    assert "sk-secret" not in text and 'api_key_env = "DEVNET_TEST_KEY"' in text
    (backend,) = parse_config(text, env={"DEVNET_TEST_KEY": "sk-secret"}).backends
    assert backend.api_key == "sk-secret"


def test_backend_key_flags_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DEVNET_TEST_KEY", raising=False)
    base = ["devnet", "--data-dir", str(tmp_path / "d"), "--backend-api-key-env", "DEVNET_TEST_KEY"]
    assert lloom_main(base) == 1
    assert "needs --backend-url" in capsys.readouterr().err
    assert lloom_main([*base, "--backend-url", "http://127.0.0.1:9/v1"]) == 1
    assert "$DEVNET_TEST_KEY is not set" in capsys.readouterr().err
