"""Start a whole local network as processes: mock backends, validators, executors."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from lloom.readyline import ReadyLine
from tests.support.procs import Proc, Processes, script, start_validator


def start_mock(procs: Processes, name: str = "mock", *flags: str) -> tuple[Proc, str]:
    """Start the mock OpenAI backend; return it and its /v1 URL."""
    proc = procs.start(name, [sys.executable, "-m", "tests.support.mock_openai", *flags])
    line = proc.wait_for_line(lambda s: s.startswith("ready url="))
    return proc, line.removeprefix("ready url=")


def write_config(
    path: Path,
    backend_url: str,
    models: list[str],
    data_dir: Path,
    extra: str = "",
    node_extra: str = "",
) -> Path:
    """An executor config with one backend."""
    path.parent.mkdir(parents=True, exist_ok=True)
    quoted = ", ".join(f'"{m}"' for m in models)
    path.write_text(
        f"""
[node]
listen = ["/ip4/127.0.0.1/tcp/0"]
data_dir = "{data_dir}"
{node_extra}

[[backends]]
name = "mock"
base_url = "{backend_url}"
models = [{quoted}]
timeout_secs = 10

{extra}
"""
    )
    return path


def start_executor(
    procs: Processes,
    name: str,
    bootstrap: str,
    backend_url: str,
    models: list[str],
    extra: str = "",
    key: str | None = None,
    node_extra: str = "",
) -> tuple[Proc, ReadyLine, Path]:
    """Start an executor; return it, its ready line and its data dir."""
    data_dir = procs.root / name / "state"
    config = write_config(
        procs.root / name / "config.toml", backend_url, models, data_dir, extra, node_extra
    )
    argv = [script("lloom-executor"), "--bootstrap-nodes", bootstrap, "--config", str(config)]
    if key:
        argv += ["--private-key", key]
    proc = procs.start(name, argv)
    return proc, proc.wait_ready(), data_dir


def start_gateway(
    procs: Processes, bootstrap: str, *flags: str, name: str = "gateway"
) -> tuple[Proc, str]:
    """Start ``lloom-client gateway`` on 127.0.0.1 port 0; return it and its /v1 URL."""
    argv = [
        script("lloom-client"),
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--bootstrap-nodes",
        bootstrap,
        *flags,
    ]
    proc = procs.start(name, argv)
    ready = proc.wait_ready()
    assert ready.role == "gateway"
    return proc, f"http://{ready.get('http')}/v1"


def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait until ``check()`` holds (polling, under a deadline): for state another process
    writes just after it answered, such as a receipt stored after the answer ended."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or check}")
        time.sleep(0.05)


__all__ = [
    "eventually",
    "start_executor",
    "start_gateway",
    "start_mock",
    "start_validator",
    "write_config",
]
