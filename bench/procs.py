"""Starting the processes a benchmark measures, and waiting for them properly."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from lloom.readyline import ReadyLine

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """Start a process with stdout piped and stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT
        )


def wait_line(proc: subprocess.Popen[str], prefix: str) -> str:
    """The first stdout line starting with ``prefix`` (the process must print it)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            # Keep reading what it prints later, or a chatty child blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return line.strip()
    raise RuntimeError(f"{proc.args!r} exited before printing {prefix!r}")


def env(data_dir: Path) -> dict[str, str]:
    """A child environment with its own data dir."""
    out = dict(os.environ)
    out["LLOOM_DATA_DIR"] = str(data_dir)
    out["PYTHONUNBUFFERED"] = "1"
    return out


def validator(tmp: Path) -> tuple[subprocess.Popen[str], ReadyLine]:
    """A validator on 127.0.0.1."""
    proc = start(
        [str(BIN / "lloom-validator"), "--listen-address", "/ip4/127.0.0.1/tcp/0"],
        env(tmp / "validator"),
        tmp / "validator.log",
    )
    return proc, ReadyLine.parse(wait_line(proc, "ready "))


def mock(tmp: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    """The mock OpenAI backend; returns its /v1 URL."""
    proc = start(
        [sys.executable, "-m", "tests.support.mock_openai", *flags],
        env(tmp / "mock"),
        tmp / "mock.log",
    )
    return proc, wait_line(proc, "ready url=").removeprefix("ready url=")


def executor(
    tmp: Path, boot: str, url: str, models: list[str], extra: str = ""
) -> tuple[subprocess.Popen[str], ReadyLine]:
    """An executor with one backend."""
    config = tmp / "executor.toml"
    quoted = ", ".join(f'"{m}"' for m in models)
    config.write_text(
        f'[node]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\ndata_dir = "{tmp / "executor-state"}"\n'
        f'[[backends]]\nname = "mock"\nbase_url = "{url}"\nmodels = [{quoted}]\n{extra}'
    )
    proc = start(
        [str(BIN / "lloom-executor"), "--bootstrap-nodes", boot, "--config", str(config)],
        env(tmp / "executor"),
        tmp / "executor.log",
    )
    return proc, ReadyLine.parse(wait_line(proc, "ready "))


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stop(*procs: subprocess.Popen[str]) -> None:
    """Terminate and reap."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_http(url: str, timeout: float = 120.0) -> None:
    """Poll ``url`` until it answers 200 (readiness of a server without a ready line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout} s")


def gateway(tmp: Path, boot: str) -> tuple[subprocess.Popen[str], str]:
    """The OpenAI-compatible gateway; returns its /v1 URL."""
    proc = start(
        [
            str(BIN / "lloom-client"),
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--bootstrap-nodes",
            boot,
        ],
        env(tmp / "gateway"),
        tmp / "gateway.log",
    )
    ready = ReadyLine.parse(wait_line(proc, "ready "))
    return proc, f"http://{ready.get('http')}/v1"
