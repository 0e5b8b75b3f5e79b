"""Imports with the collector paused, then frozen (lloom.coldstart)."""

from __future__ import annotations

import gc

from lloom.coldstart import FrozenImports


def test_collector_paused_inside_and_restored_after() -> None:
    assert gc.isenabled()
    try:
        with FrozenImports():
            assert not gc.isenabled()
            made = [object() for _ in range(10)]
        assert gc.isenabled()
        # What existed when the block ended is out of the collector's sight.
        assert gc.get_freeze_count() > 0
        assert made
    finally:
        gc.unfreeze()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    try:
        with FrozenImports():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
