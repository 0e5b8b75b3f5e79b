"""Parsing JSON from peers without letting them crash us.

Everything lloom parses from the network or from HTTP callers goes through
:func:`safe_loads`, which refuses, as a :class:`~lloom.errors.ProtocolError`:

- nesting deeper than :data:`MAX_JSON_DEPTH` (CPython's C parser can exhaust the C stack,
  and crash the whole process, on ``[[[[…`` before Python's recursion limit applies);
- integers of more than 4,300 digits (CPython raises a bare ``ValueError`` for them);
- ``NaN``, ``Infinity`` and numbers that overflow to infinity (not JSON, and not
  re-encodable by a strict encoder);
- strings holding a lone UTF-16 surrogate (``"\\ud800"``): valid JSON escapes, but text
  that cannot be encoded as UTF-8, so any later ``.encode()`` (httpx building the backend
  request, a frame sent on) would raise far from here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from lloom.errors import ProtocolError

#: Deepest JSON nesting accepted.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")
#: A ``\uD800``-``\uDFFF`` escape: the only way a surrogate gets into parsed JSON.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

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
        obj = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, over-long integers, the checks below
        raise ProtocolError(f"{what} is not acceptable JSON: {_short(exc)}") from None
    if _SURROGATE_ESCAPE.search(data) and _has_lone_surrogate(obj):
        raise ProtocolError(f"{what} holds a lone UTF-16 surrogate (not encodable as UTF-8)")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _short(exc: ValueError) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


def _has_lone_surrogate(obj: Any) -> bool:
    """Whether any string (key or value) in ``obj`` cannot be encoded as UTF-8."""
    todo = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False
