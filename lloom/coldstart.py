"""Start-up cost of one-shot commands: the cyclic garbage collector during imports.

Importing py-libp2p and its dependencies creates some 400,000 objects in half a second,
none of them garbage. The collector, triggered every 700 allocations, traverses them again
and again: on two cores that added 0.15 s to ``lloom-client``'s imports, and the full
collection at interpreter exit another 0.05 s. A command imports its modules inside
``with FrozenImports():``, which pauses the collector there and then exempts what the
imports created from every later collection (:func:`gc.freeze`), the one at exit included.
"""

from __future__ import annotations

import gc
from types import TracebackType


class FrozenImports:
    """``with FrozenImports(): import ...``: no collection inside the block; on leaving it,
    every object alive (the modules, classes and functions just imported, and whatever the
    process held before) is frozen, and the collector's previous state (enabled or not) is
    restored. Garbage that exists at that moment is kept until the process ends."""

    def __init__(self) -> None:
        self._was_enabled = False

    def __enter__(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Frozen before re-enabling: otherwise the next allocation would start a collection
        # of all of them at once (0.08 s).
        gc.freeze()
        if self._was_enabled:
            gc.enable()
