"""Every test here is ``e2e`` and ``netns``; the ``net`` fixture builds a topology.

Tests are skipped (with the reason shown by ``-rs``) where namespaces cannot be built:
not root, ``ip`` or ``nft`` missing, namespace creation refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netns import Topology, available, topology
from tests.support.procs import Processes

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of this directory ``e2e`` and ``netns``."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.netns)


@pytest.fixture
def net(procs: Processes) -> Iterator[Topology]:
    """A fresh topology; at teardown the test's processes are stopped (by PID) before
    its namespaces are deleted."""
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with topology() as built:
        try:
            yield built
        finally:
            procs.stop_all()
