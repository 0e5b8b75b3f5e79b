"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Processes


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nothing a test runs writes into the real user data dir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLOOM_DATA_DIR", str(tmp_path_factory.mktemp("lloom-data")))
    mp.delenv("LLOOM_PRIVATE_KEY", raising=False)
    yield
    mp.undo()


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    """Real processes for one test; all stopped by PID at teardown, logs shown on failure."""
    manager = Processes(tmp_path / "procs")
    try:
        yield manager
    finally:
        manager.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for text in manager.logs():
                print(text)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item so fixtures can see whether the test failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
