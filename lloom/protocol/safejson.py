"""Parsing JSON from peers without letting them crash us.

CPython's C JSON parser can exhaust the C stack, and crash the whole process, on deeply
nested input (``[[[[…``) before Python's recursion limit applies. Everything lloom parses
from the network goes through :func:`safe_loads`, which checks nesting depth first.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lloom.errors import ProtocolError

#: Deepest JSON nesting accepted.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")

__all__ = ["MAX_JSON_DEPTH", "json_depth", "safe_loads"]


def json_depth(data: bytes) -> int:
    """Nesting depth of brackets in JSON text (strings ignored), or an upper bound of it
    when there are too few brackets to matter."""
    openers = data.count(b"[") + data.count(b"{")
    if openers <= MAX_JSON_DEPTH:
        return openers  # cannot be deeper than the number of openers
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def safe_loads(data: bytes, what: str = "message") -> Any:
    """``json.loads`` for untrusted bytes; raises :class:`ProtocolError`."""
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ProtocolError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from None
