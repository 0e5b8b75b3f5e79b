"""Start real lloom processes for end-to-end tests, wait for readiness, clean up by PID.

Every process is started with its own data dir and unbuffered output; stdout lines are
collected by a reader thread so tests can wait for a line under a deadline (never a fixed
sleep). Teardown stops each process by PID: SIGINT, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lloom.readyline import ReadyLine

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """Path of a console script installed in this virtualenv."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is not installed; run make install")
    return str(path)


@dataclass
class Proc:
    """One child process and what it printed."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    lines: list[str] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _reader: threading.Thread | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _eof: bool = False

    def start(self) -> Proc:
        """Start the process (stderr goes to the log file)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            bufsize=0,
        )
        log.close()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"read-{self.name}")
        self._reader.start()
        return self

    def _read(self) -> None:
        """Collect stdout as it arrives: raw bytes (for streaming checks) and lines."""
        assert self.popen is not None and self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            with self._changed:
                self.raw += chunk
                self._changed.notify_all()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                text = line.decode(errors="replace")
                self.lines.append(text)
                self._queue.put(text)
        if pending:
            self.lines.append(pending.decode(errors="replace"))
            self._queue.put(pending.decode(errors="replace"))
        with self._changed:
            self._eof = True
            self._changed.notify_all()
        self._queue.put(None)

    def wait_for_output(self, needle: bytes, timeout: float = 30.0) -> bytes:
        """All stdout so far once it contains ``needle`` (byte-level, no line needed)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while needle not in self.raw:
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    raise TimeoutError(f"{self.name}: {needle!r} not printed\n{self.log()}")
                self._changed.wait(remaining)
            return bytes(self.raw)

    @property
    def pid(self) -> int:
        """The child's PID."""
        assert self.popen is not None
        return self.popen.pid

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        """The first new stdout line matching ``predicate``; fails at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name}: no matching line within {timeout} s\n{self.log()}"
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(
                    f"{self.name} exited (code {self.popen and self.popen.poll()}) "
                    f"before the expected line\n{self.log()}"
                )
            if predicate(line):
                return line

    def wait_ready(self, timeout: float = 30.0) -> ReadyLine:
        """Wait for the ready line and parse it."""
        return ReadyLine.parse(self.wait_for_line(lambda s: s.startswith("ready "), timeout))

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit; return its exit code."""
        assert self.popen is not None
        code = self.popen.wait(timeout=timeout)
        self._close_pipe()
        return code

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        """After exit: let the reader drain stdout, then close the pipe."""
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.popen is not None and self.popen.stdout is not None:
            self.popen.stdout.close()

    def stop(self) -> int | None:
        """Stop gracefully: SIGINT, then SIGTERM, then SIGKILL."""
        assert self.popen is not None
        for sig, grace in ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        self._close_pipe()
        return self.popen.poll()

    def log(self) -> str:
        """Stdout and stderr so far, for failure messages."""
        err = self.log_path.read_text() if self.log_path.exists() else ""
        return (
            f"--- {self.name} stdout ---\n"
            + "\n".join(self.lines)
            + f"\n--- {self.name} stderr ---\n{err[-6000:]}"
        )


class Processes:
    """Starts processes for one test and stops all of them at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []

    def env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a child: its own data dir, unbuffered output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLOOM_")}
        env["LLOOM_DATA_DIR"] = str(self.root / name / "data")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        """Start ``argv`` as process ``name``."""
        proc = Proc(name, list(argv), self.env(name, env), self.root / name / "stderr.log")
        self.procs.append(proc.start())
        return proc

    def run(
        self,
        name: str,
        argv: Sequence[str],
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command to completion (killed at ``timeout``)."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(name, env),
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def stop_all(self) -> None:
        """Stop every process this test started, newest first."""
        for proc in reversed(self.procs):
            if proc.popen is not None:
                proc.stop()

    def logs(self) -> Iterator[str]:
        """Logs of every process."""
        for proc in self.procs:
            yield proc.log()


def start_validator(
    procs: Processes, name: str = "validator", bootstrap: Sequence[str] = ()
) -> tuple[Proc, ReadyLine]:
    """Start a validator on 127.0.0.1 port 0 and wait for its ready line."""
    argv = [script("lloom-validator"), "--listen-address", "/ip4/127.0.0.1/tcp/0"]
    if bootstrap:
        argv += ["--bootstrap-nodes", ",".join(bootstrap)]
    proc = procs.start(name, argv)
    return proc, proc.wait_ready()
