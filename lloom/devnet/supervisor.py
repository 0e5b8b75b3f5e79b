"""Child processes of the devnet: start, log, wait for a line, notice death, stop by PID.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only the devnet,
which then stops its children in reverse start order (SIGINT, then SIGTERM, then SIGKILL).
A child's stdout and stderr go to its log file; stdout is also read line by line so the
devnet can wait for readiness lines and relay the ones a person should see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import trio

from lloom.errors import DevnetError

#: Grace periods of a stop: SIGINT, then SIGTERM, then SIGKILL.
STOP_STEPS = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))


@dataclass(eq=False)
class Child:
    """One started child."""

    name: str
    argv: list[str]
    log_path: Path
    process: trio.Process
    relay: Callable[[str], str | None] | None = None
    lines: list[str] = field(default_factory=list)
    eof: bool = False
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int:
        """The child's PID."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or None while it runs."""
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the child's log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Supervisor:
    """Starts children in a nursery and stops them all, newest first."""

    def __init__(self, nursery: trio.Nursery, say: Callable[[str], None]) -> None:
        self.nursery = nursery
        self.say = say
        self.children: list[Child] = []
        self.stopping = False
        #: Set when a child exits on its own while the devnet runs.
        self.died = trio.Event()
        self.dead: Child | None = None

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        relay: Callable[[str], str | None] | None = None,
    ) -> Child:
        """Start ``argv``; ``relay`` maps a stdout line to what the devnet prints (or None)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("a", encoding="utf-8")
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started: {' '.join(argv)}\n")
        log.flush()
        try:
            process = await trio.lowlevel.open_process(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log.fileno(),
                env=dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            log.close()
            raise DevnetError(f"cannot start {name} ({argv[0]}): {exc.strerror}") from None
        child = Child(name, list(argv), log_path, process, relay)
        self.children.append(child)
        self.nursery.start_soon(self._read, child, log)
        return child

    async def _read(self, child: Child, log: IO[str]) -> None:
        """Copy stdout to the log, keep its lines, relay some; notice the exit."""
        assert child.process.stdout is not None
        pending = b""
        try:
            async with child.process.stdout:
                while chunk := await child.process.stdout.receive_some(65536):
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for raw in complete:
                        self._line(child, log, raw.decode(errors="replace"))
                if pending:
                    self._line(child, log, pending.decode(errors="replace"))
            await child.process.wait()
        finally:
            log.close()
            child.eof = True
            child._notify()
        if not self.stopping and self.dead is None:
            self.dead = child
            self.died.set()

    def _line(self, child: Child, log: IO[str], line: str) -> None:
        log.write(line + "\n")
        log.flush()
        child.lines.append(line)
        child._notify()
        if child.relay is not None and (shown := child.relay(line)) is not None:
            self.say(shown)

    async def wait_for_line(
        self, child: Child, predicate: Callable[[str], bool], timeout: float, what: str
    ) -> str:
        """The first stdout line of ``child`` matching ``predicate`` (already seen or new)."""
        seen = 0
        with trio.move_on_after(timeout):
            while True:
                for line in child.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(child.lines)
                if child.eof:
                    raise DevnetError(
                        f"{child.name} exited (code {child.returncode}) before {what}; "
                        f"its log {child.log_path} ends with:\n{child.log_tail()}"
                    )
                await child.changed.wait()
        raise DevnetError(
            f"{child.name} did not report {what} within {timeout:.0f} s; "
            f"its log {child.log_path} ends with:\n{child.log_tail()}"
        )

    def signal(self, name: str, signum: int) -> bool:
        """Send ``signum`` to the running child ``name``; whether there was one."""
        for child in self.children:
            if child.name == name and child.returncode is None:
                os.kill(child.pid, signum)
                return True
        return False

    async def stop_all(self) -> None:
        """Stop every child, newest first. Runs shielded: an interrupt cannot cut it short."""
        self.stopping = True
        with trio.CancelScope(shield=True):
            for child in reversed(self.children):
                await self._stop(child)

    async def _stop(self, child: Child) -> None:
        for signum, grace in STOP_STEPS:
            if child.returncode is not None:
                break
            try:
                if signum == signal.SIGKILL:  # the child's whole process group
                    os.killpg(child.pid, signum)
                else:
                    child.process.send_signal(signum)
            except ProcessLookupError:
                break
            with trio.move_on_after(grace):
                await child.process.wait()
        if child.returncode is None:  # pragma: no cover - SIGKILL does not fail
            self.say(f"warning: {child.name} (pid {child.pid}) did not exit")
        else:
            self.say(f"  stopped {child.name}")


def cmdline(pid: int) -> list[str] | None:
    """The command line of a running process as the kernel shows it, or None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:  # a zombie
        return None
    return [a.decode(errors="surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def still_ours(pid: int, argv: Sequence[str]) -> bool:
    """Whether ``pid`` is alive and still runs ``argv`` (a recorded child of a dead devnet).

    Compares the full command line, so a PID reused by another program is never touched.
    """
    return cmdline(pid) == list(argv)


def end_leftover(pid: int, argv: Sequence[str], timeout: float = 10.0) -> bool:
    """Stop a child a killed devnet left running, if ``pid`` is still that child."""
    if not still_ours(pid, argv):
        return False
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            # A devnet child leads its own process group: end what it started too.
            if os.getpgid(pid) == pid:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not still_ours(pid, argv):
                return True
            time.sleep(0.05)
    return not still_ours(pid, argv)
