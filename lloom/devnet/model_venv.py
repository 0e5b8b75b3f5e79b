"""Building the embedded model's virtualenv: ``lloom model-venv`` (and ``make model``).

A venv of its own, because llama-cpp-python compiles llama.cpp (about 4.5 minutes on
2 cores) and brings a web stack of its own. The exact versions are in
``requirements-model.txt`` next to this module; the list is complete, so it is installed with
``--no-deps``. A venv is only used once a build finished: a marker file records the hash
of the requirements it was built from, so an interrupted or outdated build is redone.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from lloom.errors import DevnetError

REQUIREMENTS = Path(__file__).resolve().parent / "requirements-model.txt"
#: Written into a venv once it is complete.
MARKER = ".lloom-model"
#: Lines of pip's output worth showing while it works.
SHOWN = ("Collecting ", "Building wheel", "Successfully", "ERROR", "error:")
HEARTBEAT_SECS = 15.0


def requirements_hash() -> str:
    """The hash of the pinned requirements, recorded in a finished venv."""
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def venv_python(venv: Path) -> Path:
    """The venv's interpreter."""
    return venv / "bin" / "python"


def is_built(venv: Path) -> bool:
    """Whether ``venv`` holds a finished build of the current requirements."""
    try:
        recorded = (venv / MARKER).read_text(encoding="ascii").strip()
    except OSError:
        return False
    return recorded == requirements_hash() and os.access(venv_python(venv), os.X_OK)


def build(venv: Path, say: Callable[[str], None], base_python: str = sys.executable) -> Path:
    """Create (or complete) the model venv at ``venv``; return its Python.

    Shows pip's main steps and a heartbeat while llama.cpp compiles.
    """
    if is_built(venv):
        say(f"the embedded model is already built in {venv}")
        return venv_python(venv)
    return trio.run(_build, venv, say, base_python)


async def _build(venv: Path, say: Callable[[str], None], base_python: str) -> Path:
    started = time.monotonic()
    (venv / MARKER).unlink(missing_ok=True)
    if not os.access(venv_python(venv), os.X_OK):
        say(f"creating a virtualenv at {venv}")
        await _run([base_python, "-m", "venv", str(venv)], say, started)
    say("installing llama-cpp-python's server and the SmolLM2 weights")
    say("(llama.cpp compiles once: about 4.5 minutes on 2 cores)")
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    await _run(
        [
            str(venv_python(venv)),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--no-deps",
            "-r",
            str(REQUIREMENTS),
        ],
        say,
        started,
        env,
    )
    (venv / MARKER).write_text(requirements_hash() + "\n", encoding="ascii")
    say(f"built the embedded model in {venv} ({time.monotonic() - started:.0f} s)")
    return venv_python(venv)


async def _run(
    argv: list[str], say: Callable[[str], None], started: float, env: dict[str, str] | None = None
) -> None:
    """Run ``argv``, showing the lines worth showing and a heartbeat; raise on failure."""
    tail: list[str] = []

    async def heartbeat() -> None:
        while True:
            await trio.sleep(HEARTBEAT_SECS)
            say(f"  … still building ({time.monotonic() - started:.0f} s)")

    code: int | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        try:
            code = await _pump(argv, env, tail, say)
        finally:
            nursery.cancel_scope.cancel()
    if code is None:
        raise DevnetError("cannot start the build: " + "\n".join(tail))
    if code != 0:
        raise DevnetError(
            f"{' '.join(argv[:4])} … failed (exit code {code}); its last lines:\n" + "\n".join(tail)
        )


async def _pump(
    argv: list[str], env: dict[str, str] | None, tail: list[str], say: Callable[[str], None]
) -> int | None:
    """Run ``argv`` to its end; keep its last lines in ``tail``; None if it cannot start."""
    try:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
    except OSError as exc:
        tail.append(f"{argv[0]}: {exc.strerror}")
        return None
    assert process.stdout is not None
    pending = b""
    async with process.stdout:
        while chunk := await process.stdout.receive_some(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                tail.append(line)
                del tail[:-30]
                if line.startswith(SHOWN):
                    say(f"  {line}")
    return await process.wait()
